"""Every family matches transformers on tiny random configs (float32, max abs <= 1e-4)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import cca_jax
import tiny

TOL = 1e-4


def hf_logits(model, ids, attention_mask=None):
    with torch.no_grad():
        kw = {} if attention_mask is None else {"attention_mask": torch.as_tensor(attention_mask)}
        return model(torch.as_tensor(ids, dtype=torch.long), **kw).logits.float().numpy()


def hf_projections(model, ids):
    """Per-layer q/k/v projection outputs and MLP hidden activations, via hooks."""
    got = {"q": [], "k": [], "v": [], "mlp": []}
    hooks = []
    for layer in model.model.layers:
        a = layer.self_attn
        for name, mod in (("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj)):
            hooks.append(mod.register_forward_hook(lambda m, i, o, name=name: got[name].append(o.detach().numpy())))
        hooks.append(layer.mlp.down_proj.register_forward_hook(
            lambda m, i, o: got["mlp"].append(i[0].detach().numpy())))
    hf_logits(model, ids)
    for h in hooks:
        h.remove()
    return {k: np.stack(v) for k, v in got.items()}


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_logits_and_components_match_transformers(hf_dirs, family):
    hf, d = hf_dirs[family]
    model, _ = cca_jax.load_model(d)
    ids = tiny.tokens(2, 13)  # longer than the sliding window (4)
    assert ids.shape[1] > tiny.WINDOW
    ref = hf_logits(hf, ids)
    out = model(jnp.asarray(ids), collect=True)
    assert np.abs(np.asarray(out.logits) - ref).max() <= TOL
    # the checks would pass trivially if logits were flat: make sure they are not
    assert ref.std() > 0.1
    cfg = model.config
    proj = hf_projections(hf, ids)
    L, B, T = cfg.num_layers, 2, 13
    for name, n in (("q", cfg.num_heads), ("k", cfg.num_kv_heads), ("v", cfg.num_kv_heads)):
        want = proj[name].reshape(L, B, T, n, cfg.head_dim)
        assert np.abs(np.asarray(out.activations[name]) - want).max() <= TOL, name
    assert np.abs(np.asarray(out.activations["mlp"]) - proj["mlp"]).max() <= TOL


def test_softcaps_and_window_are_active(hf_dirs):
    """Gemma-2's caps and window change the logits: the parity test exercises them."""
    _, d = hf_dirs["gemma2"]
    model, _ = cca_jax.load_model(d)
    ids = jnp.asarray(tiny.tokens(2, 13))
    base = np.asarray(model(ids).logits)
    assert np.abs(base).max() <= model.config.final_logit_softcap
    for change in ({"attn_logit_softcap": None}, {"final_logit_softcap": None}, {"sliding_window": 1000}):
        other = cca_jax.forward(model.config.replace(**change), model.params(), ids).logits
        assert np.abs(np.asarray(other) - base).max() > 1e-3, change


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_left_padding_matches_unpadded(hf_dirs, family):
    _, d = hf_dirs[family]
    model, _ = cca_jax.load_model(d)
    ids = tiny.tokens(1, 9, seed=3)
    pad = 4
    padded = np.concatenate([np.zeros((1, pad), np.int32), ids], axis=1)
    mask = np.concatenate([np.zeros((1, pad), bool), np.ones((1, 9), bool)], axis=1)
    a = np.asarray(model(jnp.asarray(ids)).logits)[0]
    b = np.asarray(model(jnp.asarray(padded), mask=jnp.asarray(mask)).logits)[0, pad:]
    assert np.abs(a - b).max() <= TOL


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_kv_cache_prefill_then_decode_matches_full_forward(hf_dirs, family):
    _, d = hf_dirs[family]
    model, _ = cca_jax.load_model(d)
    ids = jnp.asarray(tiny.tokens(2, 11, seed=1))
    full = np.asarray(model(ids).logits)
    cache = cca_jax.init_cache(model.config, batch=2, size=16)
    out = model(ids[:, :6], cache=cache)
    steps = [np.asarray(out.logits)]
    cache = out.cache
    for t in range(6, 11):
        out = model(ids[:, t:t + 1], cache=cache)
        cache = out.cache
        steps.append(np.asarray(out.logits))
    assert int(cache.index) == 11
    assert np.abs(np.concatenate(steps, axis=1) - full).max() <= TOL


def test_logits_at_positions(hf_dirs):
    _, d = hf_dirs["qwen2"]
    model, _ = cca_jax.load_model(d)
    ids = jnp.asarray(tiny.tokens(2, 10))
    full = np.asarray(model(ids).logits)
    at = np.array([[9, 3], [0, 5]])
    part = np.asarray(model(ids, at=jnp.asarray(at)).logits)
    assert part.shape == (2, 2, tiny.VOCAB)
    for b in range(2):
        np.testing.assert_array_equal(part[b], full[b, at[b]])
