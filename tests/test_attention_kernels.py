"""attention: tokamax (fused kernels) computes what the XLA path computes.

On CPU tokamax runs its XLA reference, so these tests check our side of the call: the
layout, grouped heads, soft-cap and scale, the padding/window mask, index causality and
the rows that see no key. The Mosaic GPU kernels themselves are compared on the GPU by
bench/attention_probe.py (bf16: max difference from a float32 reference printed there).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cca_jax
import tiny
from cca_jax import runconfig
from cca_jax.config import ModelConfig
from cca_jax.errors import CCAError
from cca_jax.generate import generate
from cca_jax.model import attention, attention_kernels

TOL = 1e-5


def _cfg(window=5):
    return ModelConfig(family="gemma2", vocab_size=32, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                       head_dim=16, intermediate_size=32, query_pre_attn_scalar=24, attn_logit_softcap=5.0,
                       sliding_window=window, sliding_layers=(window is not None,))


def _inputs(B=3, T=12, H=4, KV=2, Dh=16):
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, T, H, Dh)) * 3  # large scores: the soft-cap matters
    k = jax.random.normal(ks[1], (B, T, KV, Dh)) * 3
    v = jax.random.normal(ks[2], (B, T, KV, Dh))
    mask = np.arange(T)[None] >= np.array([0, 3, 5])[:, None]  # left padding
    mask[2, -2:] = False  # and right padding
    pos = jnp.asarray(np.cumsum(mask, 1) - 1)
    kpos = jnp.where(jnp.asarray(mask), pos, -1)
    return q, k, v, pos, kpos, jax.random.normal(ks[3], q.shape)


def _xla(cfg, q, k, v, pos, kpos, sliding, blocks):
    B, T, H, Dh = q.shape
    qg = q.reshape(B, T, k.shape[2], H // k.shape[2], Dh)
    return attention.attend_blocks(cfg, *attention.heads_major(qg, k, v), pos, kpos, sliding, blocks).reshape(q.shape)


@pytest.mark.parametrize("sliding", [False, True])
@pytest.mark.parametrize("index_causal", [True, False])
def test_fused_attention_matches_xla_with_padding_and_window(sliding, index_causal):
    cfg = _cfg()
    q, k, v, pos, kpos, cot = _inputs()
    sl = jnp.asarray(sliding)

    def ours(q, k, v):
        return _xla(cfg, q, k, v, pos, kpos, sl, 2)

    def fused(q, k, v):
        return attention_kernels.attend_self(cfg, q, k, v, pos, kpos, sl, index_causal, implementation="xla")

    a, b = ours(q, k, v), fused(q, k, v)
    assert np.isfinite(np.asarray(b)).all()
    assert np.abs(np.asarray(a - b)).max() <= TOL
    assert np.abs(np.asarray(b[1, :3])).max() == 0.0  # left padding sees no key: zero rows
    ga = jax.grad(lambda *x: jnp.sum(ours(*x) * cot), (0, 1, 2))(q, k, v)
    gb = jax.grad(lambda *x: jnp.sum(fused(*x) * cot), (0, 1, 2))(q, k, v)
    for x, y in zip(ga, gb):
        assert np.isfinite(np.asarray(y)).all()
        assert np.abs(np.asarray(x - y)).max() <= TOL


def test_no_query_row_reaches_the_kernel_empty(monkeypatch):
    """A softmax row with every key masked is 0/0 in a flash kernel; the XLA reference on
    CPU copes, a GPU kernel need not. Every row the kernel sees keeps one key."""
    import tokamax

    cfg = _cfg()
    q, k, v, pos, kpos, _ = _inputs()
    seen = {}
    original = tokamax.dot_product_attention

    def spy(*args, mask=None, is_causal=False, **kw):
        allowed = np.asarray(mask)[:, 0]
        if is_causal:
            allowed = allowed & np.tril(np.ones(allowed.shape[-2:], bool))
        seen["rows"] = allowed.any(-1)
        return original(*args, mask=mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(tokamax, "dot_product_attention", spy)
    attention_kernels.attend_self(cfg, q, k, v, pos, kpos, jnp.asarray(True), True, implementation="xla")
    assert seen["rows"].all()


def test_fused_attention_follows_positions_when_not_causal_by_index():
    """Positions that run backwards: index causality would be wrong, the mask alone is right."""
    cfg = _cfg(window=None)
    q, k, v, _, _, _ = _inputs(B=1, T=6)
    pos = jnp.asarray([[5, 4, 3, 2, 1, 0]])
    ref = _xla(cfg, q, k, v, pos, pos, jnp.asarray(False), 1)
    got = attention_kernels.attend_self(cfg, q, k, v, pos, pos, jnp.asarray(False), False, implementation="xla")
    assert np.abs(np.asarray(ref - got)).max() <= TOL
    wrong = attention_kernels.attend_self(cfg, q, k, v, pos, pos, jnp.asarray(False), True, implementation="xla")
    assert np.abs(np.asarray(ref - wrong)).max() > 1e-2


@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_model_with_tokamax_attention_matches_xla(hf_dirs, family):
    """Whole models: logits, the prefill into an empty cache, greedy generation and the
    gradient of a loss agree between attention: xla and attention: tokamax (its default
    implementation choice, as a user on this platform gets it)."""
    _, d = hf_dirs[family]
    m_x, _ = cca_jax.load_model(d)
    m_t = m_x.with_attention("tokamax")
    assert m_t.config.attention == "tokamax" and m_x.config.attention == "xla"
    ids = tiny.tokens(2, 13, seed=3)
    mask = np.ones((2, 13), bool)
    mask[1, :4] = False
    kw = dict(mask=jnp.asarray(mask))
    lx, lt = (np.asarray(m(jnp.asarray(ids), **kw).logits) for m in (m_x, m_t))
    assert np.abs(lx - lt)[mask].max() <= 1e-4
    cx, ct = (m(jnp.asarray(ids), cache=cca_jax.init_cache(m.config, batch=2, size=16), **kw) for m in (m_x, m_t))
    for x, y in zip(cx.cache.k + cx.cache.v, ct.cache.k + ct.cache.v):
        assert np.abs(np.asarray(x - y)).max() <= 1e-4
    prompts = [list(ids[0, :9]), list(ids[1, 2:11])]
    gen = [generate(m, prompts, 6, eos_token_id=None) for m in (m_x, m_t)]
    assert gen[0] == gen[1]

    def loss(params, cfg):
        out = cca_jax.forward(cfg, params, jnp.asarray(ids), at=jnp.full((2, 1), 12), **kw)
        return jnp.sum(out.logits[:, 0, :5])

    gx = jax.grad(loss)(m_x.params(), m_x.config)
    gt = jax.grad(loss)(m_t.params(), m_t.config)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), gx, gt))
    assert max(diffs) <= 1e-4


def test_attention_setting_errors_are_one_line(monkeypatch, hf_dirs):
    with pytest.raises(CCAError, match="attention must be one of"):
        cca_jax.load_model("/nonexistent/model", attention="flash")  # checked before the path
    with pytest.raises(CCAError, match="attention must be one of"):
        runconfig.from_dict({"model": "x", "attention": "flash"})
    assert runconfig.from_dict({"model": "x", "attention": "tokamax"}).attention == "tokamax"
    _, d = hf_dirs["llama"]
    model = cca_jax.load_model(d)[0].with_attention("tokamax")
    assert "attention" not in model.config.to_dict()  # a runtime choice: not saved with checkpoints
    monkeypatch.setitem(sys.modules, "tokamax", None)  # as if not installed
    with pytest.raises(CCAError, match=r"pip install 'cca_jax\[kernels\]'") as err:
        model(jnp.asarray(tiny.tokens(1, 5)))
    assert "\n" not in str(err.value)
