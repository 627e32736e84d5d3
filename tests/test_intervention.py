"""Interventions: scale/replace per head and per neuron at chosen positions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import cca_jax
import tiny
from tiny import TOL, hf_logits


@pytest.mark.parametrize("family", ["qwen2", "olmo2", "gemma3"])
def test_zeroing_components_equals_zeroing_their_weights(hf_dirs, family):
    """Scale 0 on q head 1 of layer 0, kv head 0 of layer 1 (k and v) and neuron 7 of
    layer 2, at every position == transformers with those weight rows zeroed."""
    hf, d = hf_dirs[family]
    model, _ = cca_jax.load_model(d)
    cfg = model.config
    L, H, KV, F, Dh = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, cfg.head_dim
    ids = tiny.tokens(2, 9)
    scale = {"q": np.ones((L, H)), "k": np.ones((L, KV)), "v": np.ones((L, KV)), "mlp": np.ones((L, F))}
    scale["q"][0, 1] = 0
    scale["k"][1, 0] = 0
    scale["v"][1, 0] = 0
    scale["mlp"][2, 7] = 0
    iv = cca_jax.Intervention(where=jnp.ones(ids.shape, bool), scale={k: jnp.asarray(v, jnp.float32) for k, v in scale.items()})
    ours = np.asarray(model(jnp.asarray(ids), intervention=iv).logits)

    state = {k: v.clone() for k, v in hf.state_dict().items()}
    with torch.no_grad():
        layers = hf.model.layers
        for proj, layer, head in (("q_proj", 0, 1), ("k_proj", 1, 0), ("v_proj", 1, 0)):
            lin = getattr(layers[layer].self_attn, proj)
            lin.weight[head * Dh:(head + 1) * Dh] = 0
            if lin.bias is not None:
                lin.bias[head * Dh:(head + 1) * Dh] = 0
        layers[2].mlp.down_proj.weight[:, 7] = 0
        ref = hf_logits(hf, ids)
    hf.load_state_dict(state)
    assert np.abs(ours - ref).max() <= TOL
    assert np.abs(ours - np.asarray(model(jnp.asarray(ids)).logits)).max() > 1e-3


def test_intervention_only_at_selected_positions(hf_dirs):
    _, d = hf_dirs["llama"]
    model, _ = cca_jax.load_model(d)
    cfg = model.config
    ids = jnp.asarray(tiny.tokens(2, 8))
    lengths = jnp.asarray([8, 5])
    iv = cca_jax.Intervention.at_last(
        lengths, 8, scale={"mlp": jnp.zeros((cfg.num_layers, cfg.intermediate_size))})
    base = np.asarray(model(ids).logits)
    out = np.asarray(model(ids, intervention=iv).logits)
    # row 1 acts at position 4: positions before it are untouched, 4 and later change
    np.testing.assert_array_equal(out[1, :4], base[1, :4])
    assert np.abs(out[1, 4] - base[1, 4]).max() > 1e-3
    np.testing.assert_array_equal(out[0, :7], base[0, :7])
    assert np.abs(out[0, 7] - base[0, 7]).max() > 1e-3


def test_replace_with_own_activation_is_identity_and_batch_axis(hf_dirs):
    _, d = hf_dirs["gemma2"]
    model, _ = cca_jax.load_model(d)
    ids = jnp.asarray(tiny.tokens(2, 7))
    last = jnp.asarray([[6], [6]])
    base = model(ids, collect=True, at=last)
    acts = {k: v[:, :, 0] for k, v in base.activations.items() if k in ("q", "k", "v", "mlp")}
    iv = cca_jax.Intervention.at_last(jnp.asarray([7, 7]), 7, replace=acts)
    out = model(ids, intervention=iv, at=last)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(base.logits), atol=1e-5)
    # replace row 0's activations with row 1's: row 0 moves, row 1 stays
    swapped = {k: jnp.stack([v[:, 1], v[:, 1]], axis=1) for k, v in acts.items()}
    iv = cca_jax.Intervention.at_last(jnp.asarray([7, 7]), 7, replace=swapped)
    out = np.asarray(model(ids, intervention=iv, at=last).logits)
    np.testing.assert_allclose(out[1], np.asarray(base.logits)[1], atol=1e-5)
    assert np.abs(out[0] - np.asarray(base.logits)[0]).max() > 1e-3


def test_mask_gradient_flows_through_scale(hf_dirs):
    """DCM differentiates the logit difference with respect to per-component scales."""
    _, d = hf_dirs["olmo2"]
    model, _ = cca_jax.load_model(d)
    cfg, params = model.config, model.params()
    ids = jnp.asarray(tiny.tokens(2, 6))
    shapes = {"q": (cfg.num_layers, cfg.num_heads), "k": (cfg.num_layers, cfg.num_kv_heads),
              "v": (cfg.num_layers, cfg.num_kv_heads), "mlp": (cfg.num_layers, cfg.intermediate_size)}

    def loss(m):
        iv = cca_jax.Intervention.at_last(jnp.asarray([6, 6]), 6, scale={k: 2 * v for k, v in m.items()})
        lg = cca_jax.forward(cfg, params, ids, intervention=iv, at=jnp.asarray([[5], [5]])).logits[:, 0]
        return -(lg[:, 3] - lg[:, 4]).mean()

    m = {k: jnp.full(s, 0.5) for k, s in shapes.items()}
    g = jax.grad(loss)(m)
    eps = 1e-3
    for k in shapes:
        assert g[k].shape == shapes[k]
        bump = dict(m)
        bump[k] = m[k].at[1, 0].add(eps)
        numeric = (loss(bump) - loss(m)) / eps
        np.testing.assert_allclose(float(g[k][1, 0]), float(numeric), rtol=2e-2, atol=1e-4)
