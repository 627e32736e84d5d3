"""Patching: the vmapped patch of every component equals one-at-a-time patching."""

import jax.numpy as jnp
import numpy as np
import pytest

import cca_jax
from cca_jax.cca import components, dcm, patching
from cca_jax.cca.examples import make_batch
from tiny import circuit_examples as examples


@pytest.fixture(scope="module")
def setup(hf_dirs):
    model, _ = cca_jax.load_model(hf_dirs["gemma2"][1])
    cfg, params = model.config, model.params()
    b = make_batch(examples(5), length=16)
    cache = dcm.prefix_cache(cfg, params, jnp.asarray(b.tokens), jnp.asarray(b.mask))
    last, d, u = jnp.asarray(b.tokens[:, -1]), jnp.asarray(b.desired), jnp.asarray(b.undesired)
    clean = patching.last_activations(cfg, params, cache, last)
    return cfg, params, cache, last, d, u, clean


@pytest.mark.parametrize("mode", ["zero", "mean", "counterfactual"])
def test_vmapped_equals_loop(setup, mode):
    cfg, params, cache, last, d, u, clean = setup
    cf = {k: jnp.roll(v, 1, axis=1) for k, v in clean.items()}  # another example's activations
    values = patching.patch_values(clean, mode, cf)
    eff = patching.patching_effects(cfg, params, cache, last, d, u, values, chunk=64)
    worst = 0.0
    for kind, s in components.shapes(cfg).items():
        assert eff[kind].shape == s
        for layer in range(s[0]):
            for unit in range(s[1]):
                want = patching.patch_one(cfg, params, cache, last, d, u, values, kind, layer, unit)
                worst = max(worst, abs(float(eff[kind][layer, unit]) - want))
    # float32 rounding only: vmap batches the matmuls, which changes summation order
    assert worst <= 2e-6, worst
    assert np.abs(np.concatenate([eff[k].ravel() for k in eff])).max() > 1e-3


def test_attribution_is_the_first_order_patching_effect(setup):
    """For a small patch the estimate and the real effect agree to second order."""
    cfg, params, cache, last, d, u, clean = setup
    target = patching.patch_values(clean, "mean")
    eps = 1e-2
    small = {k: clean[k] + eps * (target[k] - clean[k]) for k in clean}
    eff = patching.patching_effects(cfg, params, cache, last, d, u, small)
    att = patching.attribution_effects(cfg, params, cache, last, d, u, small, clean)
    a = np.concatenate([att[k].ravel() for k in patching.TYPES])
    p = np.concatenate([eff[k].ravel() for k in patching.TYPES])
    assert np.abs(a).max() > 1e-4
    assert np.corrcoef(a, p)[0, 1] > 0.999
    assert np.abs(a - p).max() <= 0.05 * np.abs(a).max()
    # linear in the patch: the full patch's estimate is the small one scaled by 1/eps
    full = patching.attribution_effects(cfg, params, cache, last, d, u, target, clean)
    np.testing.assert_allclose(np.concatenate([full[k].ravel() for k in patching.TYPES]), a / eps,
                               rtol=1e-3, atol=1e-5)


def test_select_budget():
    eff = {"q": np.array([[0.5, -2.0]]), "k": np.array([[-0.1]]), "v": np.array([[3.0]]),
           "mlp": np.array([[-1.0, 0.0, -0.2]])}
    m = patching.select(eff, top_k=2, by="neg")
    assert m["q"].tolist() == [[False, True]] and m["mlp"].tolist() == [[True, False, False]]
    m = patching.select(eff, top_k=2, by="abs")
    assert m["v"].tolist() == [[True]] and m["q"].tolist() == [[False, True]]
    assert components.count(patching.select(eff, fraction=0.5)) == 4
