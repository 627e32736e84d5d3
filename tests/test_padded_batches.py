"""Fixed batches padded to one row count: padded rows weigh 0 in DCM, amplification and
faithfulness (the same losses and gradients as the partial batch), and a step is compiled
once however many examples there are."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cca_jax
from cca_jax.cca import amplify as amp
from cca_jax.cca import components, dcm
from cca_jax.cca.examples import Batch, batches
from cca_jax.cca.faithfulness import faithfulness
from tiny import circuit_examples as examples, small_mask


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(scope="module")
def model(hf_dirs):
    return cca_jax.load_model(hf_dirs["llama"][1])[0]


def random_m(cfg):
    key = jax.random.key(0)
    return {k: jax.random.uniform(jax.random.fold_in(key, i), s)
            for i, (k, s) in enumerate(components.shapes(cfg).items())}


def last_batches(n=9, size=4):
    """(padded, unpadded) last batch of ``n`` examples in batches of ``size``."""
    padded, plain = batches(examples(n), size, 0, pad_rows=True), batches(examples(n), size, 0)
    return padded[-1], plain[-1]


def test_padded_rows_copy_a_real_row_and_weigh_zero():
    padded, plain = batches(examples(9), 4, 0, pad_rows=True), batches(examples(9), 4, 0)
    assert [b.tokens.shape[0] for b in plain] == [4, 4, 1]
    assert [b.tokens.shape for b in padded] == [(4, 16)] * 3
    assert [b.real for b in padded] == [4, 4, 1] and [b.real for b in plain] == [4, 4, 1]
    last, real = padded[-1], plain[-1]
    np.testing.assert_array_equal(last.weights, [1, 0, 0, 0])
    assert last.weights.dtype == np.float32
    for x, y in zip((last.tokens, last.mask, last.desired, last.undesired), (real.tokens, real.mask, real.desired,
                                                                             real.undesired)):
        np.testing.assert_array_equal(x[:1], y)
    assert (last.tokens[1:] == last.tokens[0]).all() and (last.mask[1:] == last.mask[0]).all()
    assert (last.desired[1:] == last.undesired[1:]).all()
    # full batches are as before; a lone small batch is not blown up to batch_size
    for a, b in zip(padded[:2], plain[:2]):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.weights, np.ones(4, np.float32))
    (lone,) = batches(examples(3), 8, 0, pad_rows=True)
    assert lone.tokens.shape[0] == 3 and lone.real == 3


@pytest.mark.parametrize("mode", ["fixed", "reference"])
def test_dcm_padded_last_batch_gives_the_partial_batch_loss_and_gradient(model, mode):
    cfg, params = model.config, model.params()
    m = random_m(cfg)

    @jax.jit  # jitted: eager op-by-op gradients of the whole forward are slow
    def full(m, tokens, mask, desired, undesired, weights):
        return jax.value_and_grad(dcm.loss_full, argnums=2)(cfg, params, m, Batch(tokens, mask, desired, undesired,
                                                                                  weights), 0.01, mode)

    @jax.jit
    def cached(m, tokens, mask, desired, undesired, weights):
        cache = dcm.prefix_cache(cfg, params, tokens, mask)
        return jax.value_and_grad(dcm.loss_cached, argnums=2)(cfg, params, m, cache, tokens[:, -1], desired,
                                                              undesired, 0.01, mode, weights)

    for n, size in ((7, 4),):  # a last batch of three real rows and one padded
        padded, plain = last_batches(n, size)
        assert padded.real < padded.tokens.shape[0] == size
        args_p = [jnp.asarray(x) for x in (padded.tokens, padded.mask, padded.desired, padded.undesired,
                                           padded.weights)]
        args_u = [jnp.asarray(x) for x in (plain.tokens, plain.mask, plain.desired, plain.undesired)]
        lu, gu = full(m, *args_u, jnp.asarray(plain.weights))
        # float rounding only: a forward over 4 rows and one over 1 take different kernels
        for lp, gp in (full(m, *args_p), cached(m, *args_p)):
            assert rel_err(lp, lu) <= 1e-5, (n, float(lp), float(lu))
            for k in m:
                assert rel_err(gp[k], gu[k]) <= 1e-5, k
        for k in m:
            assert np.abs(np.asarray(gu[k])).max() > 0
        # the partial batch on its own through the cached path (weights None: all real)
        cu, cgu = cached(m, *args_u, None)
        assert rel_err(cu, lu) <= 1e-5 and all(rel_err(cgu[k], gu[k]) <= 1e-5 for k in m)


@pytest.mark.parametrize("mode", ["fixed", "reference"])
def test_dcm_weights_of_all_ones_give_todays_loss(model, mode):
    cfg, params = model.config, model.params()
    m = random_m(cfg)
    b = batches(examples(8), 4, 0, pad_rows=True)[0]
    cache = dcm.prefix_cache(cfg, params, jnp.asarray(b.tokens), jnp.asarray(b.mask))
    args = (cfg, params, m, cache, jnp.asarray(b.tokens[:, -1]), jnp.asarray(b.desired), jnp.asarray(b.undesired),
            0.01, mode)
    lw, gw = jax.value_and_grad(dcm.loss_cached, argnums=2)(*args, jnp.ones(4, jnp.float32))
    l0, g0 = jax.value_and_grad(dcm.loss_cached, argnums=2)(*args)
    assert rel_err(lw, l0) <= 1e-6
    for k in m:
        assert rel_err(gw[k], g0[k]) <= 1e-6, k
    # and the weighted objective is the mean over real rows / real pairs
    lg = jnp.asarray(np.random.default_rng(0).standard_normal((3, 9)), jnp.float32)
    d, u, w = jnp.asarray([1, 2, 3]), jnp.asarray([4, 5, 3]), jnp.asarray([1.0, 1.0, 0.0])
    if mode == "reference":
        want = np.mean([[lg[i, d[j]] - lg[i, u[j]] for j in range(2)] for i in range(2)])
    else:
        want = np.mean([lg[i, d[i]] - lg[i, u[i]] for i in range(2)])
    np.testing.assert_allclose(dcm.logit_diff(lg, d, u, mode, w), want, rtol=1e-6)


def test_amplify_padded_last_batch_adds_exactly_the_partial_batch(hf_dirs):
    qwen = cca_jax.load_model(hf_dirs["qwen2"][1])[0]
    cfg, params = qwen.config, qwen.params()
    sel, _ = amp.selection_and_masks(small_mask(cfg), params, amp.AmplifyConfig())
    train, frozen = amp.split_params(params, sel)
    padded, plain = last_batches(9, 4)
    lp, gp = amp.grad_sum(train, frozen, cfg, *(jnp.asarray(x) for x in (padded.tokens, padded.mask, padded.desired,
                                                                           padded.undesired)),
                          weights=jnp.asarray(padded.weights))
    lu, gu = amp.grad_sum(train, frozen, cfg, *(jnp.asarray(x) for x in (plain.tokens, plain.mask, plain.desired,
                                                                          plain.undesired)))
    assert rel_err(lp, lu) <= 1e-5
    leaves = [(a, b) for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gu))]
    assert leaves and any(np.abs(np.asarray(b)).max() > 0 for _, b in leaves)
    for a, b in leaves:
        assert rel_err(a, b) <= 1e-5
    # the full-batch gradient over padded batches: the mean over the 9 real examples
    exs = examples(9)
    l_pad, g_pad = amp.full_batch_grad(cfg, train, frozen, batches(exs, 4, 0, pad_rows=True), len(exs))
    l_one, g_one = amp.full_batch_grad(cfg, train, frozen, batches(exs, 9, 0), len(exs))
    np.testing.assert_allclose(l_pad, l_one, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_pad), jax.tree.leaves(g_one)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_faithfulness_ignores_padded_rows(model):
    exs = examples(9)
    mask = components.random_fraction(model.config, 0.5, 0)
    padded, one = faithfulness(model, exs, mask, 4), faithfulness(model, exs, mask, 9)  # 4,4,1(+3) vs one batch
    for k in ("ld_full", "ld_circuit", "ld_all_ablated"):
        assert padded[k] == pytest.approx(one[k], rel=1e-5, abs=1e-6), k
    assert padded["examples"] == 9


@pytest.mark.parametrize("mode", ["fixed", "reference"])
def test_train_mask_compiles_one_step_and_one_cache_program(model, mode):
    """9 examples in batches of 4 (4, 4, 1): the last batch is padded, so mask_step and
    the prefix cache compile once (reference regroups every epoch: still one shape)."""
    dcm.mask_step.clear_cache()
    dcm.placed_prefix_cache.clear_cache()
    # a small lr: nothing crosses 0.5, so no early stop before the second epoch's regrouping
    config = dcm.DCMConfig(reg=0.01, batch_size=4, epochs=2, lr=1e-3, mode=mode, early_stop=mode)
    res = dcm.train_mask(model, examples(9), config, progress=False)
    assert len(res.history) == 6
    assert dcm.mask_step._cache_size() == 1
    assert dcm.placed_prefix_cache._cache_size() == 1
