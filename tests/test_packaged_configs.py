"""Run configs by name from any folder, and the checks before anything heavy (issue 23):
a missing data path, a missing extra, a missing model or an unwritable output folder is
one line before any download, load or write."""

from pathlib import Path

import pytest

import tiny
from cca_jax import cli, preflight, runconfig
from cca_jax.errors import CCAError

ROOT = Path(__file__).parent.parent


def fails(capsys, argv, *expected):
    return tiny.cli_error(capsys, argv, *expected)


def test_configs_by_name_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert set(runconfig.names()) >= {"tiny", "demo", "gemma-2-2b-it", "smollm2-135m"}
    for ref in ("tiny", "tiny.yaml", "configs/tiny.yaml"):
        assert runconfig.resolve(ref) == runconfig.configs_dir() / "tiny.yaml"
    cfg = runconfig.load("tiny", ["amplify.steps=2"])
    assert cfg.tokenizer == "char" and cfg.amplify.steps == 2
    assert Path(cfg.model) == runconfig.configs_dir() / "models" / "tiny-llama.yaml"  # next to the config
    assert runconfig.packaged("configs/models/tiny-llama.yaml") == runconfig.configs_dir() / "models" / "tiny-llama.yaml"
    assert runconfig.packaged("../etc/passwd") is None and runconfig.packaged("/abs/tiny.yaml") is None
    local = tmp_path / "tiny.yaml"  # a file of the user's wins over the packaged one
    local.write_text((ROOT / "configs" / "tiny.yaml").read_text().replace("per_template: 20", "per_template: 7"))
    assert runconfig.load("tiny.yaml").data.per_template == 7
    assert runconfig.load("tiny").data.per_template == 20
    with pytest.raises(CCAError, match=r"no such config file: nope \(and no packaged config of that name: .*tiny"):
        runconfig.load("nope")


def test_the_checkout_configs_are_the_packaged_ones():
    # in a checkout the top-level configs/ is the source the wheel copies (tests/test_wheel.py)
    assert runconfig.configs_dir() in (ROOT / "configs", ROOT / "cca_jax" / "configs")
    assert not (ROOT / "cca_jax" / "configs").exists()  # one copy in the repository


def test_configs_command_lists_and_prints(capsys):
    assert cli.main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "tiny " in out and "gemma-2-2b-it " in out and "A tiny random model" in out
    assert cli.main(["configs", "gemma-2-2b-it"]) == 0
    assert capsys.readouterr().out == (ROOT / "configs" / "gemma-2-2b-it.yaml").read_text()
    fails(capsys, ["configs", "nope"], "no such config file: nope")


def test_run_by_name_checks_the_data_path_before_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # not the checkout: ../shared/data is not there
    out = tmp_path / "run"
    err = fails(capsys, ["run", "qwen2.5-coder-0.5b", "--out", str(out)],
                "data.templates ../shared/data/gsm_symbolic/templates/symbolic: no such file or directory",
                f"current folder, {tmp_path}", "--set data.templates=hub:main")
    assert "pip install" not in err  # the data is checked before the model package
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_preflight_order_and_messages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = {"model": str(ROOT / "configs" / "models" / "tiny-llama.yaml"), "tokenizer": "char",
            "data": {"templates": "toy:digits"}}

    def cfg(**over):
        raw = {**base, **over}
        return runconfig.from_dict(raw)

    preflight.check(cfg(), tmp_path / "run")  # fine: nothing raised, nothing written
    assert list(tmp_path.iterdir()) == []
    real = preflight._installed
    monkeypatch.setattr(preflight, "_installed", lambda m: False if m == "tokamax" else real(m))
    with pytest.raises(CCAError, match=r"attention: tokamax needs .*pip install 'cca-jax\[kernels\]'.*attention=xla"):
        preflight.check(cfg(attention="tokamax"))
    with pytest.raises(CCAError, match="a model YAML has random weights and no tokenizer: set tokenizer: char"):
        preflight.check(cfg(tokenizer=None))
    with pytest.raises(CCAError, match="model /no/such/model: no such file or directory"):
        preflight.check(cfg(model="/no/such/model"))
    with pytest.raises(CCAError, match="data.templates hub:p9: the hub's configs are"):
        preflight.check(cfg(data={"templates": "hub:p9"}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CCAError, match="model nobody/no-such-model: HF_HUB_OFFLINE is set and it is not in the hub cache"):
        preflight.check(cfg(model="nobody/no-such-model", tokenizer=None))
    with pytest.raises(CCAError, match="random.like: /no/run holds no circuit"):
        preflight.check(cfg(localize="random", random={"like": "/no/run"}))
    # side-effect data is read now, not after training
    with pytest.raises(CCAError, match="--data-dir /no/such: no such directory"):
        preflight.check(cfg(side_effects={"tasks": ["mmlu_5shot"], "data_dir": "/no/such"}))
    # the output folder comes first
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CCAError, match="exists and is not a directory"):
        preflight.check(cfg(model="/no/such/model"), tmp_path / "afile")


def test_demo_from_a_wheel_like_install_finds_its_config(tmp_path, monkeypatch):
    from cca_jax import demo

    monkeypatch.chdir(tmp_path)
    cfg, path = demo.build_config(log=lambda s: None)
    assert path == runconfig.configs_dir() / "demo.yaml" and cfg.model == demo.DEFAULT_MODEL
    cfg, path = demo.build_config(config="tiny", log=lambda s: None)
    assert path.name == "tiny.yaml" and cfg.tokenizer == "char"
