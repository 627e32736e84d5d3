"""The whole CCA pipeline on the tiny random model: masks, untouched weights, resume."""

import json
import shutil

import jax
import numpy as np
import pytest

from cca_jax import cli, pipeline, runconfig
from cca_jax.cca import components

from tiny import CONFIG  # noqa: E402


class Killed(Exception):
    pass


def _master(run_dir):
    """The final float32 master copies (the last committed checkpoint: path -> array)."""
    return {k: np.asarray(v) for k, v in pipeline.saved_master(run_dir, "amplify", "current").items()}


def _strip(summary):
    return {k: v for k, v in summary.items() if k not in ("timings_seconds", "wall_seconds")}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_full")
    cfg = runconfig.load(CONFIG)
    return cfg, d, pipeline.run(cfg, d, progress=False, log=lambda s: None)


def test_masks_binary_and_summary(full_run):
    cfg, d, s = full_run
    mask = components.load(d / "stages" / "circuit" / "mask.npz")
    assert all(v.dtype == bool for v in mask.values())
    assert s["components_selected"] == components.count(mask)
    assert 0 < s["components_selected"] < s["components_total"]
    assert 0 < s["fraction_parameters_changed"] < 1
    for key in ("components_total", "fraction_components", "val_accuracy_by_step", "test_accuracy_before",
                "test_accuracy_after", "timings_seconds"):
        assert key in s
    assert set(s["val_accuracy_by_step"]) == {"0", "2", "4", "6"}
    assert s["localization"]["examples"] > 0
    assert (d / "plots" / "val_accuracy.png").stat().st_size > 1000
    assert json.loads((d / "summary.json").read_text()) == json.loads(json.dumps(s))


def test_only_circuit_rows_change(full_run):
    """Non-circuit weights bit-identical; every target leaf's circuit rows changed."""
    cfg, d, s = full_run
    import cca_jax
    model, _ = cca_jax.load_model(cfg.model)
    params = model.params()
    mask = components.load(d / "stages" / "circuit" / "mask.npz")
    master = _master(d)
    trained = {"layers.attn.q": "q", "layers.attn.k": "k", "layers.attn.v": "v", "layers.mlp.up": "mlp"}
    assert set(master) == set(trained)  # nothing else was even a candidate for change
    p = {"q": params["layers"]["attn"]["q"], "k": params["layers"]["attn"]["k"],
         "v": params["layers"]["attn"]["v"], "mlp": params["layers"]["mlp"]["up"]}
    for path, kind in trained.items():
        before, after, m = np.asarray(p[kind]), master[path], mask[kind]
        # component axis: heads at axis 2 of (L, D, N, Dh); neurons at axis 2 of (L, D, F)
        diff = np.abs(after - before)
        per_comp = diff.max(axis=(1, 3)) if diff.ndim == 4 else diff.max(axis=1)
        assert (per_comp[~m] == 0).all(), path  # bit-identical outside the circuit
        assert (per_comp[m] > 0).all(), path  # every selected row moved


def test_killed_run_resumes_to_the_same_result(full_run, tmp_path):
    cfg, _, want = full_run

    def kill(step):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        pipeline.run(cfg, tmp_path, progress=False, on_amplify_step=kill, log=lambda s: None)
    assert json.loads((tmp_path / "stages" / "amplify" / "progress.json").read_text())["step"] == 2
    logs = []
    got = pipeline.run(cfg, tmp_path, progress=False, log=logs.append)
    assert any("resuming amplification at step 2" in m for m in logs)
    assert _strip(got) == _strip(want)
    a, b = _master(tmp_path), _master(full_run[1])
    assert set(a) == set(b)
    for k in b:
        np.testing.assert_array_equal(a[k], b[k])


def test_finished_stages_are_reused(full_run, tmp_path):
    cfg, d, want = full_run
    shutil.copytree(d, tmp_path / "r", dirs_exist_ok=True)
    got = pipeline.run(cfg, tmp_path / "r", progress=False, log=lambda s: None)
    assert _strip(got) == _strip(want)
    # changing the DCM regulariser reruns the circuit stage and what follows, not before
    cfg2 = runconfig.load(CONFIG, ["dcm.reg=0.02"])
    base_done = (tmp_path / "r" / "stages" / "base_eval" / "done.json").read_text()
    pipeline.run(cfg2, tmp_path / "r", progress=False, log=lambda s: None)
    assert (tmp_path / "r" / "stages" / "base_eval" / "done.json").read_text() == base_done


def test_cli_run_and_config_errors(tmp_path, capsys):
    assert cli.main(["run", str(CONFIG), "--quiet", "--out", str(tmp_path / "cli"),
                     "--set", "amplify.steps=2", "--set", "amplify.eval_steps=[2]"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy before" in out and "components" in out
    assert cli.main(["run", str(CONFIG), "--set", "dcm.regg=1"]) == 2
    assert "unknown key(s) regg" in capsys.readouterr().err
    assert cli.main(["run", str(tmp_path / "nope.yaml")]) == 2


def test_export_of_the_amplified_model(full_run, tmp_path):
    """export: true writes the best-step weights as a HF directory transformers loads."""
    import cca_jax
    import torch
    import transformers

    cfg, d, _ = full_run
    shutil.copytree(d, tmp_path / "r", dirs_exist_ok=True)
    cfg2 = runconfig.load(CONFIG, ["export=true", "amplify.eval_steps=[2,4,6]"])
    pipeline.run(cfg2, tmp_path / "r", progress=False, log=lambda s: None)
    out = tmp_path / "r" / "amplified"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours, _ = cca_jax.load_model(out)
    ids = np.arange(3, 15)[None]
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(jax.numpy.asarray(ids)).logits), ref, atol=1e-4)


@pytest.mark.parametrize("method", ["patching", "attribution"])
def test_pipeline_with_patching_circuits(full_run, tmp_path, method):
    """localize: patching | attribution reuse the earlier stages and amplify their mask."""
    cfg, d, _ = full_run
    shutil.copytree(d, tmp_path / "r", dirs_exist_ok=True)
    cfg2 = runconfig.load(CONFIG, [f"localize={method}", "patching.top_k=20"])
    s = pipeline.run(cfg2, tmp_path / "r", progress=False, log=lambda m: None)
    assert s["components_selected"] == 20
    eff = np.load(tmp_path / "r" / "stages" / "circuit" / "effects.npz")
    assert set(eff.files) == {"q", "k", "v", "mlp"}


def test_circuit_compare(full_run, tmp_path, capsys):
    from cca_jax.cca import compare

    cfg, d, _ = full_run
    shutil.copytree(d, tmp_path / "att", dirs_exist_ok=True)
    pipeline.run(runconfig.load(CONFIG, ["localize=attribution", "patching.top_k=40"]), tmp_path / "att",
                 progress=False, log=lambda m: None)
    assert cli.main(["circuit", "compare", str(d), str(tmp_path / "att"), "--out", str(tmp_path / "cmp")]) == 0
    res = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    pair = res["pairs"][0]
    a = components.load(d / "stages" / "circuit" / "mask.npz")
    b = components.load(tmp_path / "att" / "stages" / "circuit" / "mask.npz")
    flat = lambda m: np.concatenate([m[t].ravel() for t in components.TYPES])
    assert pair["overall"] == pytest.approx((flat(a) & flat(b)).sum() / (flat(a) | flat(b)).sum())
    assert len(pair["per_layer"]["mlp"]) == 2
    # the attribution run's own mask is exactly its top-40 components by effect
    assert res["runs"][str(tmp_path / "att")][f"vs_top_effects_of:{tmp_path / 'att'}"] == 1.0
    assert (tmp_path / "cmp" / "compare.png").exists()
    assert "Jaccard" in capsys.readouterr().out
    assert compare.jaccard(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert cli.main(["circuit", "compare", str(d)]) == 2


def test_edited_or_truncated_stage_files_are_recomputed(full_run, tmp_path):
    """A stage whose files changed since it finished (half of base_eval's test records
    dropped, a truncated mask, a truncated progress record, a truncated done.json) runs
    again: the summary is the uninterrupted run's, with no traceback."""
    cfg, d, want = full_run
    r = tmp_path / "r"
    shutil.copytree(d, r)
    st = r / "stages"
    lines = (st / "base_eval" / "test.jsonl").read_text().splitlines(keepends=True)
    (st / "base_eval" / "test.jsonl").write_text("".join(lines[: len(lines) // 2]))
    (st / "circuit" / "mask.npz").write_bytes((st / "circuit" / "mask.npz").read_bytes()[:50])
    prog = (st / "amplify" / "progress.json").read_text()
    (st / "amplify" / "progress.json").write_text(prog[: len(prog) // 2])
    (st / "test" / "done.json").write_text('{"key": ')
    logs = []
    got = pipeline.run(cfg, r, progress=False, log=logs.append)
    assert _strip(got) == _strip(want)
    for name in ("base_eval", "circuit", "amplify"):
        assert any(f"stage {name}: its files changed" in m for m in logs), name
    # the localization stage (its inputs and files unchanged) was reused, not rerun
    assert (st / "localize" / "done.json").read_text() == (d / "stages" / "localize" / "done.json").read_text()


def test_summary_splits_each_stage_and_a_warm_cache_compiles_nothing(tmp_path):
    """timings_seconds: per stage total, compile (with the XLA compile count), device and
    host. A second run in a new process with the same compilation cache compiles nothing."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, CCA_JAX_COMPILE_CACHE=str(tmp_path / "xla"), JAX_PLATFORMS="cpu")
    args = [sys.executable, "-m", "cca_jax.cli", "run", str(CONFIG), "--quiet", "--set", "amplify.steps=2",
            "--set", "amplify.eval_steps=[2]", "--set", "dcm.epochs=1"]
    runs = []
    for name in ("cold", "warm"):
        proc = subprocess.run(args + ["--out", str(tmp_path / name)], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads((tmp_path / name / "summary.json").read_text())["timings_seconds"])
    cold, warm = runs
    stages_run = ("load_model", "base_eval", "localize", "circuit", "amplify", "test_eval")
    for t in (cold, warm):
        assert set(stages_run) <= set(t)
        for v in t.values():
            assert set(v) >= {"total", "compile", "compiles", "cache_hits", "device", "host"}
            assert v["total"] >= 0 and abs(v["compile"] + v["device"] + v["host"] - v["total"]) < 0.01 + 1e-3 * v["total"]
    assert sum(v["compiles"] for v in cold.values()) > 20 and cold["base_eval"]["compiles"] > 0
    assert sum(v["compiles"] for v in warm.values()) == 0, warm
    assert sum(v["cache_hits"] for v in warm.values()) >= sum(v["compiles"] for v in cold.values()) // 2
    assert (tmp_path / "cold" / "report.md").read_text().count("| base_eval |") == 1
    # amplification's own split: the steps, the val evaluation at step 2, the checkpoint
    for t in (cold, warm):
        loop = t["amplify"]["loop"]
        assert set(loop) == {"steps", "val_eval", "checkpoints", "steps_split", "val_eval_split"}
        secs = [loop[k] for k in ("steps", "val_eval", "checkpoints")]
        assert min(secs) > 0 and sum(secs) <= t["amplify"]["total"] + 0.01
        for k in ("steps", "val_eval"):  # each part's own compile / device / host
            assert abs(sum(loop[f"{k}_split"].values()) - loop[k]) < 0.01, loop
    assert cold["amplify"]["loop"]["steps_split"]["compile"] > 0  # the first step compiles the gradient
    assert "amplify: steps " in (tmp_path / "cold" / "report.md").read_text()
    # which programs the compile time went to: DCM's step and prefix cache, by name; a warm
    # cache compiles none of them (cache hits are not counted as compiles)
    progs = cold["circuit"]["programs"]
    assert progs["mask_step"][0] == 1 and progs["placed_prefix_cache"][0] == 1
    assert list(progs.values()) == sorted(progs.values(), key=lambda p: -p[1])
    assert sum(p[1] for p in progs.values()) <= cold["circuit"]["compile"] + 0.01  # each rounded to 1 ms
    assert all(n == 0 for v in warm.values() for n, _ in v["programs"].values()), warm
    assert "- circuit: mask_step 1/" in (tmp_path / "cold" / "report.md").read_text()
    # the compile seconds by phase: tracing, lowering, XLA's compile; they add up to the total
    for v in cold.values():
        assert set(v["compile_phases"]) <= {"trace", "lower", "xla"}
        assert abs(sum(v["compile_phases"].values()) - v["compile"]) < 0.01
    assert cold["circuit"]["compile_phases"]["xla"] > 0 and cold["circuit"]["compile_phases"]["trace"] > 0
    assert "; trace " in (tmp_path / "cold" / "report.md").read_text()
    # the run's time outside the stages: its checks and data (setup), the process start
    # before run() and the whole run; the stages fit inside it
    for name in ("cold", "warm"):
        s = json.loads((tmp_path / name / "summary.json").read_text())
        w = s["wall_seconds"]
        assert w["import_to_run"] > 0 and w["plots_and_report"] > 0
        assert sum(v["total"] for v in s["timings_seconds"].values()) <= w["run"] + 0.01
        assert s["timings_seconds"]["setup"]["total"] > 0
    assert "Whole run: " in (tmp_path / "cold" / "report.md").read_text()
    # compiled ahead on background threads while the device worked (generate.warm,
    # amplify.warm): the test budget's and pivot sampling's programs during the base
    # evaluation, amplification's gradient during DCM; their stages then compile none
    assert cold["base_eval"]["compiles_background"] >= 2 and cold["circuit"]["compiles_background"] == 1
    assert cold["localize"]["programs"].get("decode_chunk", [0])[0] == 0, cold["localize"]["programs"]
    assert cold["amplify"]["programs"].get("grad_sum", [0])[0] == 0, cold["amplify"]["programs"]
    assert all(v["compiles_background"] == 0 for v in warm.values())
    # the device programs each stage ran, by kind and shape: a stage's cost at its steps' speed
    work = {k: v["work"] for k, v in cold.items()}
    assert any(k.startswith("decode_chunk ") and k.endswith("greedy 32 steps") for k in work["base_eval"])
    assert any(k.startswith("decode_chunk ") and " T=1 top_k=" in k for k in work["localize"])
    assert sum(n for k, n in work["circuit"].items() if k.startswith("mask_step ")) > 0
    assert sum(n for k, n in work["amplify"].items() if k.startswith("grad_sum ")) > 0
    assert work == {k: v["work"] for k, v in warm.items()}  # the same work, warm or cold
