"""Issue 23's smaller defects: task names that say their protocol (old names refused with
the new one), GSM-Symbolic instances written in the hub's schema, and report plots that
leave a notebook's matplotlib backend alone."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from cca_jax import cli, runconfig, runs
from cca_jax.data import gsm_symbolic
from cca_jax.errors import CCAError
from cca_jax.evaluate import tasks

ROOT = Path(__file__).parent.parent
TINY_MODEL = str(ROOT / "configs" / "models" / "tiny-llama.yaml")


@pytest.mark.parametrize("old, new", sorted(tasks.RENAMED.items()))
def test_old_task_names_are_refused_with_the_new_one(tmp_path, capsys, old, new):
    out = tmp_path / "r.json"
    assert cli.main(["bench-tasks", "--model", TINY_MODEL, "--tokenizer", "char", "--tasks", old,
                     "--data-dir", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"cca-jax: error: task {old!r} is now {new!r} (its protocol differs from lm-evaluation-harness's "
                   f"{old}; for that one: cca-jax lm-eval --tasks {old} ...)\n")
    assert not out.exists()
    with pytest.raises(CCAError, match=f"every value of side_effects.tasks must be one of .*{old} is now {new}"):
        runconfig.from_dict({"model": "m", "side_effects": {"tasks": [old]}})


def test_names_say_their_protocol():
    assert tasks.TASKS == ("mmlu_5shot", "truthfulqa_mc1", "truthfulqa_mc2", "triviaqa_5shot", "gsm8k_cot_8shot")
    # the harness strips MMLU questions; so does mmlu_5shot (its requests are the harness's)
    it = tasks.MMLUItem("x", 0, "  Q?\n", ("a", "b", "c", "d"), "A")
    assert tasks.mmlu_question(it) == "Q?\nA. a\nB. b\nC. c\nD. d\nAnswer:"


def test_runs_written_before_the_renaming_still_read(tmp_path):
    cfg = runconfig.from_dict({"model": "m", "side_effects": {"tasks": ["mmlu_5shot", "gsm8k_cot_8shot"]}}).to_dict()
    cfg["side_effects"]["tasks"] = ["mmlu", "gsm8k"]  # as an earlier version wrote config.yaml
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert runs.read_config(tmp_path).side_effects.tasks == ("mmlu_5shot", "gsm8k_cot_8shot")


@pytest.mark.parametrize("source", ["builtin", "shared"])
def test_instances_are_written_in_the_hubs_schema(tmp_path, capsys, source):
    templates = "builtin" if source == "builtin" else str(ROOT.parent / "shared" / "data" / "gsm_symbolic" / "templates"
                                                            / "symbolic")
    if source == "shared" and not Path(templates).is_dir():
        pytest.skip("../shared/data is not here")
    out = tmp_path / "inst.jsonl"
    assert cli.main(["data", "gsm-symbolic", "--templates", templates, "--per-template", "2", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    want = gsm_symbolic.from_templates(gsm_symbolic.load_template_source(templates), 2, 0)
    assert len(rows) == len(want)
    raw = {}
    for f in (sorted((ROOT / "cca_jax" / "data" / "builtin").glob("*.json")) if source == "builtin"
              else sorted(Path(templates).glob("*.json"))):
        t = json.loads(f.read_text())
        raw[t["id_orig"]] = t
    for row, item in zip(rows, want):
        # apple/GSM-Symbolic's fields: the answer is the solution text ending in "#### N"
        assert list(row)[:5] == ["id", "instance", "question", "answer", "original_id"]
        assert isinstance(row["answer"], str) and row["answer"].rstrip().split("####")[-1].strip()
        assert row["original_id"] == item.template and row["id"] == raw[item.template]["id_shuffled"]
        assert row["original_question"] == raw[item.template]["question"]
        assert "answer_text" not in row and "template" not in row
    assert gsm_symbolic.read_jsonl(out) == want  # and it reads back as the same items


def test_plots_leave_the_matplotlib_backend_alone(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    from cca_jax import report, views
    from cca_jax.cca import components

    rng = np.random.default_rng(0)
    mask = {"q": rng.random((2, 4)) > 0.5, "k": rng.random((2, 2)) > 0.5, "v": rng.random((2, 2)) > 0.5,
            "mlp": rng.random((2, 16)) > 0.7}
    components.save(mask, tmp_path / "stages" / "circuit" / "mask.npz")
    acc = {"overall": 0.5, "low": 0.4, "high": 0.6, "n_items": 10, "per_template": {"1": 0.5}}
    summary = {"model": "m", "val_accuracy_by_step": {"0": 0.1, "2": 0.3}, "best_step": 2,
               "components_per_layer": {"q": [1, 2], "mlp": [3, 4]}, "components_selected": 10,
               "components_total": 24, "fraction_components": 0.4, "fraction_parameters_changed": 0.01,
               "test_accuracy_before": acc, "test_accuracy_after": acc}
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # stands in for a notebook's inline backend
    try:
        files = report.plots(summary, tmp_path)
        files += views.write_pngs(mask, tmp_path / "more")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert len(files) >= 5 and all(f.stat().st_size > 1000 and f.read_bytes()[:4] == b"\x89PNG" for f in files)
    src = "".join(p.read_text() for p in (ROOT / "cca_jax").rglob("*.py"))
    assert "matplotlib.use(" not in src  # no module of the package switches backends
