"""Float32 runs trace with full float32 matmuls (GPUs default to TF32): the context, the
programs it traces, and the pipeline running its stages inside it."""

import jax
import jax.numpy as jnp
import pytest

from cca_jax import pipeline, precision, runconfig


@pytest.fixture(autouse=True)
def jax_default():
    """JAX's own default (conftest sets "highest" for the whole suite)."""
    with jax.default_matmul_precision(None):
        yield


def _dot_text() -> str:
    x = jnp.ones((4, 4), jnp.float32)
    return jax.jit(lambda a, b: a @ b).lower(x, x).as_text()


def test_float32_traces_highest_and_other_dtypes_keep_the_default():
    assert jax.config.jax_default_matmul_precision is None
    assert "HIGHEST" not in _dot_text()
    with precision.for_dtype(jnp.float32):
        assert jax.config.jax_default_matmul_precision == "highest"
        assert "HIGHEST" in _dot_text()  # the lowered dot asks for full precision
    for dt in (jnp.bfloat16, jnp.float16, "bfloat16", "auto"):  # auto: the dtype is not known yet
        with precision.for_dtype(dt):
            assert jax.config.jax_default_matmul_precision is None
    assert jax.config.jax_default_matmul_precision is None  # restored


def test_a_precision_the_user_chose_is_kept():
    with jax.default_matmul_precision("tensorfloat32"), precision.for_dtype("float32"):
        assert jax.config.jax_default_matmul_precision == "tensorfloat32"


@pytest.mark.parametrize("dtype, expected", [("float32", "highest"), ("bfloat16", None)])
def test_the_pipeline_runs_its_stages_in_the_dtype_context(tmp_path, monkeypatch, dtype, expected):
    seen = {}

    def stages(r, config, on_step):
        seen["precision"] = jax.config.jax_default_matmul_precision
        return {"stages": "recorded"}

    monkeypatch.setattr(pipeline, "_stages", stages)
    cfg = runconfig.load("tiny", [f"dtype={dtype}"])
    assert pipeline.run(cfg, tmp_path / "run", progress=False, log=lambda s: None) == {"stages": "recorded"}
    assert seen["precision"] == expected
