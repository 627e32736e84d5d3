"""DCM: the cached-prefix step equals the full forward; masks, schedule, early stop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cca_jax
import tiny
from cca_jax.cca import components, dcm
from cca_jax.cca.examples import make_batch


examples = tiny.circuit_examples


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("family,mode", [("gemma2", "fixed"), ("gemma2", "reference"), ("qwen2", "fixed"),
                                         ("olmo2", "reference")])
def test_cached_prefix_step_equals_full_forward(hf_dirs, family, mode):
    _, d = hf_dirs[family]
    model, _ = cca_jax.load_model(d)
    cfg, params = model.config, model.params()
    batch = make_batch(examples(), length=16)
    assert batch.mask[:, 0].sum() < len(batch.mask)  # rows of different lengths (left padding)
    key = jax.random.key(0)
    m = {k: jax.random.uniform(jax.random.fold_in(key, i), s) for i, (k, s) in enumerate(components.shapes(cfg).items())}
    full_l, full_g = jax.value_and_grad(dcm.loss_full, argnums=2)(cfg, params, m, batch, 0.01, mode)
    cache = dcm.prefix_cache(cfg, params, jnp.asarray(batch.tokens), jnp.asarray(batch.mask))
    c_l, c_g = jax.value_and_grad(dcm.loss_cached, argnums=2)(
        cfg, params, m, cache, jnp.asarray(batch.tokens[:, -1]), jnp.asarray(batch.desired),
        jnp.asarray(batch.undesired), 0.01, mode)
    assert rel_err(c_l, full_l) <= 1e-5
    for k in m:
        assert rel_err(c_g[k], full_g[k]) <= 1e-5, k
        assert np.abs(np.asarray(full_g[k])).max() > 0


def test_reference_loss_is_the_cross_product_mean():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((3, 7)), jnp.float32)
    d, u = jnp.asarray([1, 2, 3]), jnp.asarray([4, 5, 6])
    ref = np.mean([[logits[i, d[j]] - logits[i, u[j]] for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(dcm.logit_diff(logits, d, u, "reference"), ref, rtol=1e-6)
    fixed = np.mean([logits[i, d[i]] - logits[i, u[i]] for i in range(3)])
    np.testing.assert_allclose(dcm.logit_diff(logits, d, u, "fixed"), fixed, rtol=1e-6)


def test_reference_reads_logits_before_final_softcap(hf_dirs):
    _, d = hf_dirs["gemma2"]
    model, _ = cca_jax.load_model(d)
    ids = jnp.asarray(tiny.tokens(1, 6))
    raw = np.asarray(cca_jax.forward(model.config, model.params(), ids, final_softcap=False).logits)
    capped = np.asarray(model(ids).logits)
    cap = model.config.final_logit_softcap
    np.testing.assert_allclose(np.tanh(raw / cap) * cap, capped, atol=1e-5)
    assert np.abs(raw).max() > cap


def test_train_mask_binary_clamped_and_stops(hf_dirs):
    _, d = hf_dirs["llama"]
    model, _ = cca_jax.load_model(d)
    ex = examples(12)
    res = dcm.train_mask(model, ex, dcm.DCMConfig(reg=0.05, batch_size=4, epochs=30, lr=0.05,
                                                  early_stop="reference"), progress=False)
    for k, v in res.mask.items():
        assert v.dtype == bool and v.shape == components.shapes(model.config)[k]
        assert (res.m[k] >= 0).all() and (res.m[k] <= 1).all()
    kept = components.count(res.mask)
    assert 0 < kept < components.total(model.config)
    # 3 batches per epoch -> patience int(0.6) = 0: stop at the first step that drops a component
    assert res.stopped_early and res.history[-1]["kept"] < components.total(model.config)
    assert all(h["kept"] == components.total(model.config) for h in res.history[:-1])
    assert dcm.patience_for(26) == 5 and dcm.patience_for(4) == 0 and dcm.patience_for(26, "fixed") == 26
    # steps are sent ahead of reading the previous one's count: the mask returned is the
    # last recorded step's, not the one sent after it
    assert kept == res.history[-1]["kept"]


def test_early_stop_with_patience_returns_the_stopping_steps_mask(hf_dirs):
    """6 batches an epoch (patience 1): the stop comes after a repeated count, mid-epoch or
    at an epoch's end; the mask is the one of the step recorded last."""
    _, d = hf_dirs["llama"]
    model, _ = cca_jax.load_model(d)
    res = dcm.train_mask(model, examples(12), dcm.DCMConfig(reg=0.05, batch_size=2, epochs=30, lr=0.05,
                                                            early_stop="reference"), progress=False)
    assert res.stopped_early and res.history[-1]["kept"] == res.history[-2]["kept"]
    assert components.count(res.mask) == res.history[-1]["kept"] < components.total(model.config)


def test_a_second_train_mask_with_the_same_settings_compiles_no_step(hf_dirs):
    """A size search or a sweep calls train_mask again: the step is not compiled again."""
    from cca_jax import timing

    _, d = hf_dirs["llama"]
    model, _ = cca_jax.load_model(d)
    config = dcm.DCMConfig(reg=0.05, batch_size=4, epochs=1, lr=0.05)
    dcm.train_mask(model, examples(8), config, progress=False)
    with timing.account() as acc:
        dcm.train_mask(model, examples(8), config, progress=False)
    assert acc.compiles == 0


@pytest.mark.parametrize("family", ["gemma2", "qwen2"])
def test_scanned_and_unrolled_steps_learn_the_same_mask(hf_dirs, family):
    """dcm.unroll picks how the step compiles (layers scanned over stacked weights and
    caches, or unrolled over per-layer ones), not what it computes."""
    _, d = hf_dirs[family]
    model, _ = cca_jax.load_model(d)
    runs = [dcm.train_mask(model, examples(12), dcm.DCMConfig(reg=0.05, batch_size=4, epochs=6, lr=0.05,
                                                               unroll=unroll), progress=False)
            for unroll in (False, True)]
    scanned, unrolled = runs
    assert [h["kept"] for h in scanned.history] == [h["kept"] for h in unrolled.history]
    assert min(h["kept"] for h in scanned.history) < components.total(model.config)  # it learned something
    np.testing.assert_allclose([h["loss"] for h in scanned.history], [h["loss"] for h in unrolled.history],
                               rtol=1e-5)
    for k in scanned.m:
        np.testing.assert_allclose(scanned.m[k], unrolled.m[k], atol=1e-5)
        assert (scanned.mask[k] == unrolled.mask[k]).all()


def test_fixed_early_stop_waits_for_a_stable_epoch(hf_dirs):
    _, d = hf_dirs["llama"]
    model, _ = cca_jax.load_model(d)
    total = components.total(model.config)
    res = dcm.train_mask(model, examples(12), dcm.DCMConfig(reg=0.05, batch_size=4, epochs=40, lr=0.05),
                         progress=False)
    kept = [h["kept"] for h in res.history]
    if res.stopped_early:  # the last 3 steps (one epoch) did not change the count
        assert len(set(kept[-4:])) == 1 and kept[-1] < total
    # it ran past the reference rule's stopping point (the first step that drops a component)
    first_drop = next(i for i, k in enumerate(kept) if k < total)
    assert len(kept) > first_drop + 1


def test_mask_save_load_npz(tmp_path):
    cfg = cca_jax.config.from_hf(tiny.hf_config("llama"))
    mask = components.binarize(components.full(cfg, 0.7))
    p = components.save(mask, tmp_path / "mask.npz")
    back = components.load(p)
    assert components.count(back) == components.total(cfg)
    components.check(back, cfg)


# -- fidelity to the original release (SPEC 3; issue 22, points a, b and d) -----------------

def test_reference_l1_has_zero_gradient_at_zero():
    """(b) torch.norm(m, p=1) has gradient 0 at m = 0 (the original); JAX's |m| has 1."""
    m = {"q": jnp.asarray([[0.0, 0.5, 1.0]])}
    g_ref = jax.grad(lambda m: dcm.l1(m, "reference"))(m)["q"]
    g_fix = jax.grad(lambda m: dcm.l1(m, "fixed"))(m)["q"]
    np.testing.assert_array_equal(np.asarray(g_ref), [[0.0, 1.0, 1.0]])
    np.testing.assert_array_equal(np.asarray(g_fix), [[1.0, 1.0, 1.0]])
    assert float(dcm.l1(m, "reference")) == float(dcm.l1(m, "fixed")) == 1.5


@pytest.mark.parametrize("mode", ["reference", "fixed"])
def test_reference_regroups_examples_into_new_batches_every_epoch(hf_dirs, monkeypatch, mode):
    """(a) the original builds a new shuffled loader each epoch (seed + epoch): new
    batches; fixed draws the batches once and only reorders them."""
    model, _ = cca_jax.load_model(hf_dirs["llama"][1])
    seeds, real = [], dcm.make_batches

    def spy(exs, batch_size, seed, pad=0, **kw):
        seeds.append(seed)
        return real(exs, batch_size, seed, pad, **kw)

    monkeypatch.setattr(dcm, "make_batches", spy)
    cfg = dcm.DCMConfig(epochs=3, batch_size=4, seed=7, mode=mode, early_stop="fixed", reg=0.0)
    res = dcm.train_mask(model, examples(12), cfg, progress=False)
    assert len(res.history) == 9  # reg 0: nothing pruned, no early stop
    assert seeds == ([7, 8, 9] if mode == "reference" else [7])


def test_olmo2_key_heads_are_masked_before_k_norm_in_float32(hf_dirs):
    """(d) the original writes OLMo-2's k outputs after k_norm has run, so in float32 its
    backward fails and in float16 K heads >= 1 are never masked. Ours masks the raw k
    projection of every KV head: masking head 1 changes the output, and its mask has a
    gradient, in float32."""
    model, _ = cca_jax.load_model(hf_dirs["olmo2"][1], dtype="float32")
    cfg, params = model.config, model.params()
    b = make_batch(examples(4), length=12)
    m = components.full(cfg, 0.5)  # the identity
    base = dcm.loss_full(cfg, params, m, b, 0.0, "fixed")
    m1 = {**m, "k": m["k"].at[:, 1].set(0.0)}
    assert abs(float(dcm.loss_full(cfg, params, m1, b, 0.0, "fixed")) - float(base)) > 1e-4
    g = jax.grad(lambda mm: dcm.loss_full(cfg, params, mm, b, 0.0, "fixed"))(m)
    assert float(jnp.abs(g["k"][:, 1]).max()) > 0 and np.isfinite(np.asarray(g["k"])).all()
