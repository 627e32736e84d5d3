"""`cca-jax compare`: CCA vs fine-tuning table from summaries, side effects in the pipeline."""

import json
import subprocess
import sys

import pytest

from cca_jax import methods_compare
from cca_jax.errors import CCAError


def _summary(method, before, after, frac, se=None):
    acc = lambda x: {"overall": x, "low": x - 0.05, "high": x + 0.05, "per_template": {}, "n_items": 40}  # noqa: E731
    s = {"model": "m", "method": method, "test_accuracy_before": acc(before), "test_accuracy_after": acc(after),
         "fraction_components": frac, "fraction_parameters_changed": frac / 2, "best_step": 4}
    if se:
        s["side_effects"] = se
    return s


def test_table_markdown_and_files(tmp_path):
    runs = []
    for name, s in (("cca", _summary("cca", 0.1, 0.2, 0.03, {"mmlu": {"before": 0.5, "after": 0.48, "delta": -0.02, "n": 20,
                                                                 "delta_ci": [-0.1, 0.06], "better": 3, "worse": 4}})),
                    ("lora", _summary("sft_lora", 0.1, 0.15, 1.0, {"mmlu": {"before": 0.5, "after": 0.40, "delta": -0.10, "n": 20},
                                                                   "triviaqa": {"before": 0.2, "after": 0.1, "delta": -0.1, "n": 20}}))):
        d = tmp_path / name
        d.mkdir()
        (d / "summary.json").write_text(json.dumps(s))
        runs.append(str(d))
    t, md = methods_compare.write(runs, tmp_path / "out")
    assert t["tasks"] == ["mmlu", "triviaqa"]
    assert [r["method"] for r in t["rows"]] == ["cca", "sft_lora"]
    assert t["rows"][0]["test_after_ci"] == pytest.approx([0.15, 0.25])
    lines = md.splitlines()
    assert "mmlu Δ" in lines[0] and "triviaqa Δ" in lines[0]
    assert "-0.020 [-0.100, +0.060] (0.500→0.480, n=20, 3 better / 4 worse)" in lines[2]
    assert lines[2].rstrip().endswith("| - |")  # cca has no triviaqa
    assert "-0.100 (0.500→0.400, n=20) |" in lines[3]  # a summary without paired intervals
    assert "3.00%" in lines[2] and "100.00%" in lines[3]
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["rows"][1]["side_effects"]["mmlu"]["delta"] == -0.10
    assert (tmp_path / "out" / "compare.png").stat().st_size > 1000


def test_errors(tmp_path):
    with pytest.raises(CCAError, match="no summary.json"):
        methods_compare.table([str(tmp_path)])
    (tmp_path / "summary.json").write_text("{")
    with pytest.raises(CCAError, match="not valid JSON"):
        methods_compare.table([str(tmp_path)])
    r = subprocess.run([sys.executable, "-m", "cca_jax.cli", "compare", str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "summary.json" in r.stderr


def test_pipeline_side_effects_stage(tmp_path):
    """A tiny run with side_effects: before/after per task in the summary, from the stage files."""
    from cca_jax import pipeline, runconfig

    data = tmp_path / "eval" / "truthfulqa"
    data.mkdir(parents=True)
    mc = [{"question": f"q{i}?", "mc1_targets": {"a": 1, "b": 0}, "mc2_targets": {"a": 1, "b": 0, "c": 0}}
          for i in range(4)]
    (data / "mc_task.json").write_text(json.dumps(mc))
    cfg = runconfig.load("configs/tiny.yaml", ["side_effects.tasks=[truthfulqa_mc1, truthfulqa_mc2]",
                                               f"side_effects.data_dir={tmp_path / 'eval'}", "amplify.steps=2",
                                               "amplify.eval_steps=[2]", "dcm.epochs=1"])
    s = pipeline.run(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    se = s["side_effects"]
    assert set(se) == {"truthfulqa_mc1", "truthfulqa_mc2"}
    for t, v in se.items():
        assert v["n"] == 4 and v["delta"] == pytest.approx(v["after"] - v["before"])
        assert v["delta_ci"][0] <= v["delta"] + 1e-9 and v["delta"] <= v["delta_ci"][1] + 1e-9
        assert v["better"] + v["worse"] <= 4
        before = json.loads((tmp_path / "run/stages/side_effects_before/results.json").read_text())[t]["score"]
        assert v["before"] == before
    assert "side_effects_before" in s["timings_seconds"]


def test_paired_delta_counts_items_that_moved():
    from cca_jax.evaluate import tasks

    rec = lambda xs: {"records": [{"correct": bool(x)} for x in xs]}
    d = tasks.paired_delta(rec([1, 0, 0, 1] * 5), rec([1, 1, 0, 0] * 5))
    assert d["delta"] == 0 and (d["better"], d["worse"]) == (5, 5)
    assert d["delta_ci"][0] < 0 < d["delta_ci"][1]
    same = tasks.paired_delta(rec([1, 0] * 10), rec([1, 0] * 10))
    assert same["delta_ci"] == [0.0, 0.0] and same["better"] == same["worse"] == 0
    up = tasks.paired_delta(rec([0] * 20), rec([1] * 10 + [0] * 10))
    assert up["delta"] == 0.5 and up["delta_ci"][0] > 0.2  # 10 of 20 gained: clearly above zero
    mc2 = tasks.paired_delta({"records": [{"score": 0.25}, {"score": 0.5}]}, {"records": [{"score": 0.5}, {"score": 0.5}]})
    assert mc2["delta"] == pytest.approx(0.125) and (mc2["better"], mc2["worse"]) == (1, 0)
    with pytest.raises(CCAError, match="same items"):
        tasks.paired_delta(rec([1, 0]), rec([1]))
