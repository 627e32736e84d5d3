"""Float32 runs trace with full float32 matmuls (GPUs default to TF32): the model's own
products (precision.of), the context, the programs it traces, and the pipeline running
its stages inside it."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import cca_jax
from cca_jax import generate as gen
from cca_jax import pipeline, precision, runconfig
from cca_jax.model.params import unstack_layers
from cca_jax.model.prefill import prefix_cache


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


# The model's own products carry their precision (precision.of): a float32 model computes
# in full float32 with no context, whoever calls it; half precision traces as before.

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny-llama.yaml")


@functools.cache
def _tiny(dtype: str, attention: str = "xla"):
    model, _ = cca_jax.load_model(TINY, dtype, with_tokenizer=False, attention=attention)
    return model


def _dots(text: str) -> list[str]:
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert dots, "the program has no matrix products to check"
    return dots


def _highest(text: str) -> bool:
    """Every dot of the lowered program asks for full precision (none does: False)."""
    marks = ["precision = [HIGHEST, HIGHEST]" in d for d in _dots(text)]
    assert all(marks) or not any(marks), "some dots ask for HIGHEST, some do not"
    return all(marks)


def _calls(model):
    """Lowered programs of the model's call kinds: (name, text). No cache (the scan over
    stacked layers), per-layer merged weights, a read of a cache (DCM and patching
    steps), a write into one (decoding), and a gradient (amplification)."""
    cfg, params = model.config, model.params()
    toks = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % cfg.vocab_size
    mask = jnp.ones(toks.shape, bool)
    per_layer = unstack_layers(params)
    cache = prefix_cache(cfg, params, toks, mask)
    last = toks[:, -1:]

    def lower(f, *args):
        return jax.jit(f).lower(*args).as_text()

    def loss(p, t):
        return cca_jax.forward(cfg, p, t).logits.sum()

    return [
        ("no cache", lower(lambda p, t: cca_jax.forward(cfg, p, t).logits, params, toks)),
        ("per-layer", lower(lambda p, t: cca_jax.forward(cfg, p, t).logits, per_layer, toks)),
        ("read cache", lower(lambda p, t, c: cca_jax.forward(cfg, p, t, cache=c).logits, per_layer, last, cache)),
        ("write cache", lower(lambda p, t, c: cca_jax.forward(cfg, p, t, cache=c, write_first=True).logits,
                              per_layer, last, cache)),
        ("gradient", lower(jax.grad(loss), params, toks)),
    ]


def test_a_float32_model_computes_in_full_precision_with_no_context():
    assert jax.config.jax_default_matmul_precision is None
    for name, text in _calls(_tiny("float32")):
        assert _highest(text), name


def test_fused_attention_of_a_float32_model_asks_for_full_precision(monkeypatch):
    tokamax = pytest.importorskip("tokamax")
    seen = []
    original = tokamax.dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("precision"))
        return original(*args, **kwargs)

    monkeypatch.setattr(tokamax, "dot_product_attention", spy)
    for dtype, expected in (("float32", jax.lax.Precision.HIGHEST), ("bfloat16", None)):
        model = _tiny(dtype, "tokamax")
        seen.clear()
        jax.jit(lambda p, t, m=model: cca_jax.forward(m.config, p, t).logits).lower(
            model.params(), jnp.zeros((1, 8), jnp.int32))
        assert seen and all(p == expected for p in seen), (dtype, seen)


def test_a_bfloat16_model_traces_as_without_a_precision(monkeypatch):
    """Half precision: no dot asks for HIGHEST, and the programs are exactly those of
    products with no precision argument (its speed is unchanged)."""
    real = [text for _, text in _calls(_tiny("bfloat16"))]
    assert not any(_highest(t) for t in real)
    f32 = [text for _, text in _calls(_tiny("float32"))]
    monkeypatch.setattr(precision, "of", lambda *arrays: None)
    assert real == [text for _, text in _calls(_tiny("bfloat16"))]
    assert f32 != [text for _, text in _calls(_tiny("float32"))]  # the patch took effect


@pytest.mark.parametrize("chosen", ["bfloat16", "tensorfloat32"])
def test_a_precision_the_user_set_stands_for_a_float32_model(chosen):
    with jax.default_matmul_precision(chosen):
        assert precision.of(jnp.ones(2, jnp.float32)) is None
        for name, text in _calls(_tiny("float32")):
            assert not _highest(text), (chosen, name)
    with jax.default_matmul_precision("highest"):  # the user's "highest" is honoured too
        assert all(_highest(text) for _, text in _calls(_tiny("float32")))


def test_precision_of_its_operands():
    f32, bf16 = jnp.ones(2, jnp.float32), jnp.ones(2, jnp.bfloat16)
    assert precision.of(f32, f32) == jax.lax.Precision.HIGHEST
    assert precision.of(f32, bf16) is None  # mixed: JAX's default
    assert precision.of(bf16) is None and precision.of(jnp.ones(2, jnp.float16)) is None


@pytest.mark.parametrize("dtype, expected", [("float32", True), ("bfloat16", False)])
def test_generate_decodes_a_float32_model_in_full_precision(monkeypatch, dtype, expected):
    """cca_jax.generate with no context: its prefill and decode programs (lowered with the
    arguments generate passes them) ask for HIGHEST on float32, not on bfloat16."""
    lowered = []

    def recording(fn):
        def call(*args, **kwargs):
            lowered.append(fn.lower(*args, **kwargs).as_text())
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(gen, "prefill", recording(gen.prefill))
    monkeypatch.setattr(gen, "decode_chunk", recording(gen.decode_chunk))
    out = gen.generate(_tiny(dtype), [[1, 2, 3, 4], [5, 6, 7]], 3, eos_token_id=[], chunk=2)
    assert [len(o) for o in out] == [3, 3]
    assert len(lowered) >= 3  # the prefill and two decode chunks
    assert all(_highest(t) == expected for t in lowered)
