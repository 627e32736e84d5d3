"""Bad configs and options (issue 18, defects 7, 9, 10): every one ends in exit 2 and one
line ``cca-jax: error: ...`` before any work, and nothing is written."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

import tiny
from cca_jax import cli, paths, pipeline, runconfig
from cca_jax.cca.amplify import AmplifyConfig
from cca_jax.errors import CCAError

CONFIG = "configs/tiny.yaml"  # tests run from the repository root
TINY_MODEL = str(Path(CONFIG).parent / "models" / "tiny-llama.yaml")


@pytest.fixture(autouse=True)
def no_pipeline(monkeypatch):
    """A bad input must be refused before the pipeline (or a model load) starts."""

    def refuse(*a, **k):
        raise AssertionError("the pipeline ran on a bad input")

    monkeypatch.setattr(pipeline, "run", refuse)
    monkeypatch.setattr("cca_jax.load_model", refuse)


def fails(capsys, argv, *expected) -> str:
    """Run the CLI in-process: exit 2, exactly one stderr line ``cca-jax: error: ...``
    holding every ``expected`` text, no traceback; returns the line. That it is refused
    before any work is the ``no_pipeline`` fixture's check (not a wall-clock bound, which
    a loaded CI machine would break)."""
    return tiny.cli_error(capsys, argv, *expected)


def read_only(path: Path, monkeypatch) -> None:
    """Make ``path`` read-only; as root (who may write anyway) os.access answers as the
    permission bits say, i.e. as for any other user."""
    path.chmod(0o555)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: real(p, mode, **k) if not mode & os.W_OK
                            else bool(os.stat(p).st_mode & 0o200))


# -- cca-jax run: bad --set values, checked at load (defects 7 and 9) --------------------

@pytest.mark.parametrize("setting, expected", [
    ("dcm.reg=abc", "dcm.reg must be a number, got 'abc'"),
    ("amplify.eval_steps=5", "amplify.eval_steps must be a list of integers, got 5"),
    ("amplify.steps=0", "amplify.steps must be >= 1, got 0"),
    ("amplify.lr=0", "amplify.lr must be > 0, got 0.0"),
    ("amplify.lr=.nan", "amplify.lr must be a number"),
    ("amplify.batch_size=0", "amplify.batch_size must be >= 1, got 0"),
    ("amplify.eval_steps=[2, -4]", "every value of amplify.eval_steps must be >= 1, got -4"),
    ("amplify.steps=2.5", "amplify.steps must be an integer, got 2.5"),
    ("amplify.targets=[]", "amplify.targets is empty"),
    ("eval.batch_size=0", "eval.batch_size must be >= 1, got 0"),
    ("eval.shots=-1", "eval.shots must be >= 0, got -1"),
    ("eval.answer_mode=loose", "eval.answer_mode must be one of"),
    ("data.seed=-1", "data.seed must be >= 0, got -1"),
    ("data.per_template=0", "data.per_template must be >= 1"),
    ("data.template_ids=[]", "data.template_ids is empty"),
    ("localize=dcmm", "localize must be one of dcm, patching, attribution, random, got 'dcmm'"),
    ("patching.mode=ones", "patching.mode must be one of zero, mean, counterfactual"),
    ("patching.by=pos", "patching.by must be one of neg, abs"),
    ("patching.fraction=1.5", "patching.fraction must be <= 1"),
    ("pivots.n_samples=0", "pivots.n_samples must be >= 1"),
    ("dcm.epochs=0", "dcm.epochs must be >= 1"),
    ("dcm.lr_decay=0", "dcm.lr_decay must be > 0"),
    ("sft.steps=0", "sft.steps must be >= 1"),
    ("side_effects.tasks=[mmlu, gpqa]", "every value of side_effects.tasks must be one of"),
    ("side_effects.batch_size=0", "side_effects.batch_size must be >= 1"),
    ("tokenizer=bert", "tokenizer must be 'char' or null"),
    ("export=maybe", "export must be true or false, got 'maybe'"),
    ("dcm.reg=[1", "--set dcm.reg=[1: the value is not valid YAML"),
])
def test_run_bad_setting_is_one_line_before_any_work(tmp_path, capsys, setting, expected):
    out = tmp_path / "run"
    line = fails(capsys, ["run", CONFIG, "--quiet", "--out", str(out), "--set", setting], expected)
    assert "--set" in expected or line.startswith(f"cca-jax: error: {CONFIG}: ")  # names the file
    assert not out.exists()  # no run dir, no config.yaml, no stages


def test_library_configs_check_their_numbers():
    with pytest.raises(CCAError, match="amplify.steps must be >= 1, got 0"):
        AmplifyConfig(steps=0)
    with pytest.raises(CCAError, match="amplify.lr must be > 0"):
        AmplifyConfig(lr=-1e-4)
    with pytest.raises(CCAError, match="sft.lora_r must be >= 1"):
        runconfig.SFTConfig(lora_r=0)


def test_every_shipped_config_passes_and_values_are_normalized():
    for path in sorted(Path("configs").glob("*.yaml")):
        runconfig.load(path)  # the checks refuse nothing that the project ships
    cfg = runconfig.load(CONFIG, ["sft.lr=1e-5", "amplify.lr=1", "amplify.eval_steps=[2, 4]", "patching.top_k=8"])
    assert cfg.sft.lr == 1e-5 and isinstance(cfg.amplify.lr, float)  # YAML reads 1e-5 as text
    assert cfg.amplify.eval_steps == (2, 4) and cfg.patching.top_k == 8


# -- cca-jax run: what cannot be a config --------------------------------------------------

def test_run_config_is_a_directory(tmp_path, capsys):
    fails(capsys, ["run", str(tmp_path), "--out", str(tmp_path / "run")], "is a directory")
    assert list(tmp_path.iterdir()) == []


def test_run_config_is_not_utf8(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_bytes(b"model: \xff\xfe tiny\n")
    fails(capsys, ["run", str(cfg), "--out", str(tmp_path / "run")], str(cfg), "not a UTF-8 text file")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, kind", [("just a string\n", "str"), ("- model: x\n", "list"), ("42\n", "int")])
def test_run_config_is_a_yaml_scalar_or_list(tmp_path, capsys, text, kind):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    fails(capsys, ["run", str(cfg), "--out", str(tmp_path / "run")], "is a mapping of keys", f"a YAML {kind}")
    assert not (tmp_path / "run").exists()


def test_run_section_is_not_a_mapping(tmp_path, capsys):
    fails(capsys, ["run", CONFIG, "--out", str(tmp_path / "run"), "--set", "dcm=5"], "dcm must be a mapping")
    assert not (tmp_path / "run").exists()


# -- cca-jax run: --out that cannot be a run directory -----------------------------------

def test_run_out_is_an_existing_file(tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("not ours\n")
    fails(capsys, ["run", CONFIG, "--out", str(out)], str(out), "exists and is not a directory")
    assert out.read_text() == "not ours\n"


def test_run_out_below_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    fails(capsys, ["run", CONFIG, "--out", str(tmp_path / "f" / "run")], "is a file, not a directory")
    assert (tmp_path / "f").read_text() == "x"


def test_run_out_in_a_read_only_directory(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(ro, monkeypatch)
    try:
        fails(capsys, ["run", CONFIG, "--out", str(ro / "run")], f"{ro} is not writable")
        fails(capsys, ["run", CONFIG, "--out", str(ro)], f"{ro} is not writable")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_check_run_dir_accepts_a_new_or_existing_writable_directory(tmp_path):
    assert paths.check_run_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # a check, not a mkdir
    assert paths.check_run_dir(tmp_path) == tmp_path


# -- cca-jax eval / data: numeric options ------------------------------------------------

@pytest.mark.parametrize("option, value, expected", [
    ("--batch-size", "0", "--batch-size must be >= 1, got 0"),
    ("--shots", "-1", "--shots must be >= 0, got -1"),
    ("--limit", "0", "--limit must be >= 1, got 0"),
    ("--max-new-tokens", "0", "--max-new-tokens must be >= 1, got 0"),
    ("--per-template", "0", "--per-template must be >= 1, got 0"),
    ("--seed", "-1", "--seed must be >= 0, got -1"),
])
def test_eval_bad_number(tmp_path, capsys, option, value, expected):
    out = tmp_path / "ev"
    fails(capsys, ["eval", "--model", "no-such-model", "--data", "toy:digits", option, value, "--out", str(out)],
          expected)
    assert not out.exists()


def test_usage_errors_are_one_line_too(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "--model", "x", "--batch-size", "abc", "--out", str(tmp_path / "ev")])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cca-jax: error: cca-jax eval: argument --batch-size")
    assert not (tmp_path / "ev").exists()


def test_eval_out_is_a_file(tmp_path, capsys):
    out = tmp_path / "ev"
    out.write_text("mine\n")
    fails(capsys, ["eval", "--model", "no-such-model", "--data", "toy:digits", "--out", str(out)],
          "exists and is not a directory")
    assert out.read_text() == "mine\n"


def test_data_bad_per_template(tmp_path, capsys):
    out = tmp_path / "d.jsonl"
    fails(capsys, ["data", "gsm-symbolic", "--per-template", "0", "--out", str(out)], "--per-template must be >= 1")
    assert not out.exists()


# -- cca-jax bench-tasks -----------------------------------------------------------------

def test_bench_tasks_out_is_a_directory_checked_first(tmp_path, capsys):
    # /no/such data would fail too, later: --out is checked before anything is read
    fails(capsys, ["bench-tasks", "--model", TINY_MODEL, "--tasks", "gsm8k_cot_8shot", "--data-dir", "/no/such",
                   "--out", str(tmp_path)], "is a directory", "give a file path")
    assert list(tmp_path.iterdir()) == []


def test_bench_tasks_out_in_a_read_only_directory(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(ro, monkeypatch)
    try:
        fails(capsys, ["bench-tasks", "--model", TINY_MODEL, "--tasks", "gsm8k_cot_8shot", "--out", str(ro / "r.json")],
              "is not writable")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("option", ["--batch-size", "--max-new-tokens"])
def test_bench_tasks_bad_number(tmp_path, capsys, option):
    out = tmp_path / "r.json"
    fails(capsys, ["bench-tasks", "--model", TINY_MODEL, option, "0", "--out", str(out)], f"{option} must be >= 1")
    assert not out.exists()


def test_bench_tasks_empty_task_is_valid_json(tmp_path, capsys, monkeypatch):
    monkeypatch.undo()  # this one runs the model
    data = tmp_path / "eval"
    (data / "gsm8k").mkdir(parents=True)
    (data / "gsm8k" / "test.jsonl").write_text("")
    out = tmp_path / "r.json"
    assert cli.main(["bench-tasks", "--model", TINY_MODEL, "--tokenizer", "char", "--tasks", "gsm8k_cot_8shot",
                     "--data-dir", str(data), "--quiet", "--out", str(out)]) == 0

    def no_nan(token):
        raise AssertionError(f"{token} in the JSON")

    res = json.loads(out.read_text(), parse_constant=no_nan)
    assert res["tasks"]["gsm8k_cot_8shot"]["score"] is None and res["tasks"]["gsm8k_cot_8shot"]["n"] == 0
    assert "gsm8k_cot_8shot: acc n/a (no items) (n=0" in capsys.readouterr().out


def test_finite_or_null():
    from cca_jax.evaluate.tasks import finite_or_null

    got = finite_or_null({"a": float("nan"), "b": [1.0, float("inf"), np.float32("nan")], "c": (2, "x")})
    assert got == {"a": None, "b": [1.0, None, None], "c": [2, "x"]}


# -- cca-jax compare / circuit compare on what is not a finished run ----------------------

def _summary_dir(tmp_path, content: bytes | str) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    f = d / "summary.json"
    f.write_bytes(content) if isinstance(content, bytes) else f.write_text(content)
    return d


@pytest.mark.parametrize("content, expected", [
    ("[]", "a JSON list, not an object"),
    ("{}", "no test_accuracy_before object"),
    (json.dumps({"test_accuracy_before": {"overall": 0.1, "low": 0, "high": 0.2},
                 "test_accuracy_after": {"overall": "high", "low": 0, "high": 1}}), "test_accuracy_after.overall"),
    (json.dumps({"test_accuracy_before": {"overall": 0.1, "low": 0, "high": 0.2},
                 "test_accuracy_after": {"overall": 0.2, "low": 0.1, "high": 0.3},
                 "side_effects": {"mmlu": {"before": 0.5}}}), "side_effects.mmlu lacks"),
    (b"\xff\xfe{}", "not UTF-8"),
    ("{", "not valid JSON"),
])
def test_compare_malformed_summary(tmp_path, capsys, content, expected):
    d = _summary_dir(tmp_path, content)
    out = tmp_path / "cmp"
    fails(capsys, ["compare", str(d), "--out", str(out)], str(d / "summary.json"), expected)
    assert not out.exists()


def test_compare_summary_is_a_directory(tmp_path, capsys):
    (tmp_path / "run" / "summary.json").mkdir(parents=True)
    fails(capsys, ["compare", str(tmp_path / "run"), "--out", str(tmp_path / "cmp")], "no summary.json")
    assert not (tmp_path / "cmp").exists()


def test_compare_out_is_a_file(tmp_path, capsys):
    (tmp_path / "cmp").write_text("keep\n")
    fails(capsys, ["compare", str(tmp_path), "--out", str(tmp_path / "cmp")], "exists and is not a directory")
    assert (tmp_path / "cmp").read_text() == "keep\n"


def _mask_run(root: Path, name: str, write) -> Path:
    d = root / name / "stages" / "circuit"
    d.mkdir(parents=True)
    write(d / "mask.npz")
    return root / name


def _good_mask(path: Path) -> None:
    np.savez(path, **{t: np.zeros((2, 4), bool) for t in ("q", "k", "v", "mlp")})


@pytest.mark.parametrize("bad, expected", [
    (lambda p: p.write_bytes(b"not a zip"), "not a readable circuit mask"),
    (lambda p: np.savez(p, q=np.zeros((2, 4), bool)), "no k, v, mlp array(s)"),
    (lambda p: np.savez(p, **{t: np.zeros(4, bool) for t in ("q", "k", "v", "mlp")}), "is not (layers, components)"),
])
def test_circuit_compare_malformed_mask(tmp_path, capsys, bad, expected):
    a = _mask_run(tmp_path, "a", _good_mask)
    b = _mask_run(tmp_path, "b", bad)
    out = tmp_path / "cmp"
    fails(capsys, ["circuit", "compare", str(a), str(b), "--out", str(out)],
          str(b / "stages" / "circuit" / "mask.npz"), expected)
    assert not out.exists()


def test_circuit_compare_missing_mask(tmp_path, capsys):
    a = _mask_run(tmp_path, "a", _good_mask)
    (tmp_path / "b").mkdir()
    fails(capsys, ["circuit", "compare", str(a), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")],
          "no circuit mask")
    assert not (tmp_path / "cmp").exists()


def test_circuit_compare_out_is_a_file(tmp_path, capsys):
    a, b = (_mask_run(tmp_path, n, _good_mask) for n in ("a", "b"))
    (tmp_path / "cmp").write_text("keep\n")
    fails(capsys, ["circuit", "compare", str(a), str(b), "--out", str(tmp_path / "cmp")],
          "exists and is not a directory")
    assert (tmp_path / "cmp").read_text() == "keep\n"
