"""dtype "auto" (issue 23): models load in the dtype their weights are stored in (gemma-2's
config.json says float32 over bfloat16 weights: the headers decide), by default in
load_model, the CLI and run configs."""

import json
import types

import pytest
import torch

import cca_jax
from cca_jax import cli, load, runconfig
from cca_jax.errors import CCAError


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """A tiny gemma-2 checkpoint stored in bfloat16 whose config.json claims float32, as
    google/gemma-2-2b-it's does."""
    import tiny

    d = tmp_path_factory.mktemp("bf16")
    tiny.hf_model("gemma2").to(torch.bfloat16).save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["dtype"] = cfg["torch_dtype"] = "float32"
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_auto_is_the_stored_dtype(bf16_dir, hf_dirs):
    model, _ = cca_jax.load_model(bf16_dir)
    assert str(model.dtype) == "bfloat16"
    model, _ = cca_jax.load_model(bf16_dir, dtype="float32")  # asked for: as asked
    assert str(model.dtype) == "float32"
    model, _ = cca_jax.load_model(hf_dirs["llama"][1])  # stored in float32
    assert str(model.dtype) == "float32"
    with pytest.raises(CCAError, match="unknown dtype 'float8'"):
        cca_jax.load_model(bf16_dir, dtype="float8")


def test_gguf_auto_dtype():
    def reader(*tensors):
        return types.SimpleNamespace(tensors=[types.SimpleNamespace(tensor_type=types.SimpleNamespace(name=t), n_elements=n)
                                              for t, n in tensors])

    assert load._gguf_dtype(reader(("Q4_1", 1000), ("F32", 10))) == "float32"  # dequantized values
    assert load._gguf_dtype(reader(("BF16", 1000), ("F32", 10))) == "bfloat16"
    assert load._gguf_dtype(reader(("F16", 1000), ("Q8_0", 10))) == "float16"


def test_cli_and_run_configs_default_to_auto(bf16_dir, capsys):
    assert cli.main(["info", str(bf16_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "bfloat16"
    assert runconfig.from_dict({"model": "m"}).dtype == "auto"
    assert runconfig.from_dict({"model": "m", "dtype": "bf16"}).dtype == "bf16"
    with pytest.raises(CCAError, match="dtype must be a dtype: auto"):
        runconfig.from_dict({"model": "m", "dtype": "int4"})
    for sub in ("info", "export", "eval", "bench-tasks"):
        action = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices[sub]._actions
                      if a.dest == "dtype")
        assert action.default == "auto", sub
