"""Bad input gets one clear line (CCAError / exit status 2), never a traceback."""

import json
import subprocess
import sys

import pytest

import cca_jax
import tiny
from cca_jax import cli
from cca_jax.errors import CCAError


write_gguf = tiny.write_gguf


def one_line_error(argv, capsys):
    return tiny.cli_error(capsys, argv)


def test_valid_tiny_gguf_loads(tmp_path):
    model, tok = cca_jax.load_model(write_gguf(tmp_path / "ok.gguf"), with_tokenizer=False)
    assert model.config.num_layers == 1 and model.config.tie_word_embeddings


def test_missing_path(capsys):
    err = one_line_error(["info", "/nonexistent/model-dir"], capsys)
    assert "no such file or directory: /nonexistent/model-dir" in err
    one_line_error(["info", "./missing.gguf"], capsys)


def test_directory_without_weights(tmp_path, capsys, hf_dirs):
    _, src = hf_dirs["llama"]
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    err = one_line_error(["info", str(tmp_path)], capsys)
    assert "no model weights (*.safetensors)" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in one_line_error(["info", str(empty)], capsys)


def test_pickle_weights_refused(tmp_path, hf_dirs, capsys):
    _, src = hf_dirs["llama"]
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    assert "no pickle" in one_line_error(["info", str(tmp_path)], capsys)


def test_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    err = one_line_error(["info", str(tmp_path)], capsys)
    assert "unsupported architecture 'gpt2'" in err


def test_unsupported_config_feature_names_the_field(hf_dirs):
    import tiny

    cfg = tiny.hf_config("llama")
    cfg.rope_parameters = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
    with pytest.raises(CCAError, match="rope_type 'yarn'"):
        cca_jax.config.from_hf(cfg)
    cfg = tiny.hf_config("qwen2")
    cfg.hidden_act = "relu2"
    with pytest.raises(CCAError, match="hidden_act 'relu2'"):
        cca_jax.config.from_hf(cfg)


def test_gguf_with_unknown_tensor(tmp_path, capsys):
    path = write_gguf(tmp_path / "bad.gguf", extra_tensor=("blk.0.mystery.weight", (8,)))
    err = one_line_error(["info", str(path)], capsys)
    assert "unknown GGUF tensor 'blk.0.mystery.weight'" in err


def test_unsupported_gguf_architecture(tmp_path, capsys):
    path = write_gguf(tmp_path / "bad_arch.gguf", arch="bert")
    assert "unsupported GGUF architecture 'bert'" in one_line_error(["info", str(path)], capsys)


def test_not_a_gguf(tmp_path, capsys):
    f = tmp_path / "junk.gguf"
    f.write_bytes(b"hello world, not gguf")
    assert "not a readable GGUF file" in one_line_error(["info", str(f)], capsys)


def test_dtype_typo(tmp_path, capsys):
    path = write_gguf(tmp_path / "ok.gguf")
    err = one_line_error(["info", str(path), "--dtype", "bfloat61"], capsys)
    assert "unknown dtype 'bfloat61'" in err and "bfloat16" in err


def test_hub_id_offline_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = one_line_error(["info", "no-such-org/no-such-model"], capsys)
    assert "cannot download 'no-such-org/no-such-model'" in err


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cca_jax.cli", "info", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_device_out_of_memory_is_one_line_and_other_errors_still_raise(monkeypatch, capsys):
    class XlaRuntimeError(RuntimeError):
        pass

    def oom(args):
        raise XlaRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.04GiB "
                              "with allocator GPU_0_bfc on device 0.\n--- trace ---")

    parser = cli.build_parser()
    args = parser.parse_args(["info", "x"])
    monkeypatch.setattr(cli, "build_parser", lambda: type("P", (), {"parse_args": lambda self, a: args})())
    monkeypatch.setattr(args, "func", oom)
    assert cli.main(["info", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ran out of memory" in err[0] and "12.04GiB" in err[0] and "rerun" in err[0]

    def other(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(args, "func", other)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["info", "x"])
