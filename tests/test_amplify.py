"""Masked amplification: optax restricts updates to circuit rows; ablation; masters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cca_jax
from cca_jax.cca import amplify as amp
from cca_jax.cca import components
from cca_jax.cca.examples import batches, make_batch
from tiny import circuit_examples as examples, small_mask


@pytest.fixture(scope="module")
def model(hf_dirs):
    return cca_jax.load_model(hf_dirs["qwen2"][1])[0]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_updates_only_circuit_rows(model, optimizer):
    cfg, params = model.config, model.params()
    acfg = amp.AmplifyConfig(optimizer=optimizer, lr=1e-2, targets=("q", "k", "v", "up", "o"))
    mask = small_mask(cfg)
    opt = amp.make_optimizer(acfg, mask, params)
    master, opt_state, frozen = amp.init_state(params, opt)
    exs = examples(6)
    loss, grad = amp.full_batch_grad(cfg, master, frozen, batches(exs, 4, 0), len(exs))
    master, _ = amp.step_fn(opt)(master, opt_state, grad)
    new = amp.working_params(master, frozen, jnp.float32)
    old_a, new_a = params["layers"]["attn"], new["layers"]["attn"]
    dq = np.abs(np.asarray(new_a["q"] - old_a["q"])).max(axis=(1, 3))
    assert dq[0, 1] > 0 and (np.delete(dq.ravel(), 1) == 0).all()
    dqb = np.abs(np.asarray(new_a["q_bias"] - old_a["q_bias"])).max(axis=2)
    assert dqb[0, 1] > 0 and dqb.sum() == dqb[0, 1]
    do = np.abs(np.asarray(new_a["o"] - old_a["o"])).max(axis=(2, 3))  # o follows the q heads
    assert do[0, 1] > 0 and do.sum() == do[0, 1]
    du = np.abs(np.asarray(new["layers"]["mlp"]["up"] - params["layers"]["mlp"]["up"])).max(axis=1)
    assert du[1, 3] > 0 and du.sum() == du[1, 3]
    # untouched leaves are the very same arrays
    assert new["layers"]["mlp"]["down"] is params["layers"]["mlp"]["down"]
    assert new["embed"] is params["embed"]


def test_full_batch_gradient_is_the_mean_over_all_examples(model):
    cfg, params = model.config, model.params()
    exs = examples(7)
    sel, _ = amp.selection_and_masks(small_mask(cfg), params, amp.AmplifyConfig())
    train, frozen = amp.split_params(params, sel)
    l_split, g_split = amp.full_batch_grad(cfg, train, frozen, batches(exs, 3, 0), len(exs))
    one = make_batch(exs, length=16)
    l_one, g_one = amp.full_batch_grad(cfg, train, frozen, [one], len(exs))
    np.testing.assert_allclose(l_split, l_one, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_split), jax.tree.leaves(g_one)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_ablation_updates_every_parameter(model):
    cfg, params = model.config, model.params()
    acfg = amp.AmplifyConfig(update_using_mask=False, lr=1e-2)
    sel, rows = amp.selection_and_masks(None, params, acfg)
    assert all(jax.tree.leaves(sel))
    opt = amp.make_optimizer(acfg, None, params)
    master, opt_state, frozen = amp.init_state(params, opt)
    exs = examples(4)
    _, grad = amp.full_batch_grad(cfg, master, frozen, batches(exs, 4, 0), len(exs))
    master, _ = amp.step_fn(opt)(master, opt_state, grad)
    assert np.abs(np.asarray(master["embed"] - params["embed"])).max() > 0
    assert np.abs(np.asarray(master["layers"]["mlp"]["down"] - params["layers"]["mlp"]["down"])).max() > 0


def test_float32_masters_keep_small_steps_that_bf16_would_round_away(model):
    cfg = model.config
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.params())
    acfg = amp.AmplifyConfig(lr=1e-4)
    opt = amp.make_optimizer(acfg, components.binarize(components.full(cfg)), params16)
    master, opt_state, frozen = amp.init_state(params16, opt)
    assert master["layers"]["attn"]["q"].dtype == jnp.float32
    exs = examples(4)
    apply = amp.step_fn(opt)
    for _ in range(3):
        train16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), master)
        _, grad = amp.full_batch_grad(cfg, train16, frozen, batches(exs, 4, 0), len(exs))
        master, opt_state = apply(master, opt_state, grad)
    q0 = np.asarray(params16["layers"]["attn"]["q"], np.float32)
    moved = np.abs(np.asarray(master["layers"]["attn"]["q"]) - q0) > 0
    # a direct bf16 update would round most of these steps away
    direct = np.asarray((params16["layers"]["attn"]["q"].astype(jnp.float32)
                         - 1e-4 * grad["layers"]["attn"]["q"]).astype(jnp.bfloat16), np.float32)
    assert moved.mean() > 0.9 and (direct != q0).mean() < moved.mean()


@pytest.mark.parametrize("remat", [False, "dots"])
def test_unrolled_layers_give_the_scanned_gradient(model, remat):
    """amplify.unroll runs the layers unrolled (per-layer saved activations): the same loss
    and gradient as the scanned layers."""
    cfg, params = model.config, model.params()
    acfg = amp.AmplifyConfig(targets=("q", "k", "v", "up"))
    sel, _ = amp.selection_and_masks(small_mask(cfg), params, acfg)
    train, frozen = amp.split_params(params, sel)
    bs = batches(examples(6), 4, 0)
    l_scan, g_scan = amp.full_batch_grad(cfg, train, frozen, bs, 6, remat)
    l_unr, g_unr = amp.full_batch_grad(cfg, train, frozen, bs, 6, remat, unroll=True)
    assert abs(l_scan - l_unr) <= 1e-5 * max(1.0, abs(l_scan))
    leaves = [(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_unr))]
    assert len(leaves) >= 4 and max(np.abs(a).max() for a, _ in leaves) > 1e-4
    assert max(np.abs(a - b).max() for a, b in leaves) <= 1e-5


def test_loss_is_the_mean_logit_difference_of_the_full_forward(model):
    """The loss reads only the desired/undesired logits: it equals -mean(logit diff) taken
    from the model's full output at the last position."""
    cfg, params = model.config, model.params()
    sel, _ = amp.selection_and_masks(small_mask(cfg), params, amp.AmplifyConfig())
    train, frozen = amp.split_params(params, sel)
    exs = examples(5)
    b = make_batch(exs, length=16)
    loss, _ = amp.full_batch_grad(cfg, train, frozen, [b], len(exs))
    lg = np.asarray(model(jnp.asarray(b.tokens), mask=jnp.asarray(b.mask)).logits[:, -1])
    rows = np.arange(len(exs))
    want = -np.mean(lg[rows, b.desired] - lg[rows, b.undesired])
    assert abs(want) > 1e-3 and abs(loss - want) <= 1e-5 * max(1.0, abs(want))


def test_bias_updates_are_an_option(model):
    """(c) the original updates projection weights only: amplify.biases false leaves
    Qwen2's q/k/v biases alone while the circuit's weight rows move; true (the default)
    moves the circuit's bias rows too."""
    cfg, params = model.config, model.params()
    exs = examples(6)
    moved = {}
    for biases in (False, True):
        acfg = amp.AmplifyConfig(lr=1e-2, biases=biases)
        opt = amp.make_optimizer(acfg, small_mask(cfg), params)
        master, opt_state, frozen = amp.init_state(params, opt)
        _, grad = amp.full_batch_grad(cfg, master, frozen, batches(exs, 6, 0), len(exs))
        new = amp.working_params(amp.step_fn(opt)(master, opt_state, grad)[0], frozen, jnp.float32)
        a0, a1 = params["layers"]["attn"], new["layers"]["attn"]
        moved[biases] = (float(np.abs(np.asarray(a1["q_bias"] - a0["q_bias"])).max()),
                         float(np.abs(np.asarray(a1["q"] - a0["q"])).max()))
    assert moved[False][0] == 0.0 and moved[False][1] > 0
    assert moved[True][0] > 0 and moved[True][1] > 0
    assert amp.AmplifyConfig().biases is True


def test_a_shared_context_run_once_gives_the_gradient_of_running_it_in_every_row(model):
    """amplify.share_prefix: the few-shot context every example starts with runs once
    per micro-batch; the loss and the gradient equal running it in every row."""
    cfg, params = model.config, model.params()
    context = tuple(int(t) for t in np.random.default_rng(5).integers(3, 60, 24))
    exs = [e.__class__(context + e.prefix, e.desired, e.undesired, e.template, e.instance) for e in examples(7)]
    prefix, rest = amp.shared_context(exs)
    assert prefix.shape == (1, 24) and [len(r.prefix) for r in rest] == [len(e.prefix) - 24 for e in exs]
    assert amp.shared_context(exs, share=False)[0] is None and amp.shared_context(exs[:1])[0] is None
    sel, _ = amp.selection_and_masks(small_mask(cfg), params, amp.AmplifyConfig())
    train, frozen = amp.split_params(params, sel)
    l_all, g_all = amp.full_batch_grad(cfg, train, frozen, batches(exs, 3, 0, pad_rows=True), len(exs))
    l_one, g_one = amp.full_batch_grad(cfg, train, frozen, batches(rest, 3, 0, pad_rows=True), len(exs),
                                       prefix=prefix)
    np.testing.assert_allclose(l_one, l_all, rtol=1e-5)
    nonzero = 0
    for a, b in zip(jax.tree.leaves(g_one), jax.tree.leaves(g_all)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
        nonzero += int(np.count_nonzero(np.asarray(b)))
    assert nonzero > 0
    # the trainer cuts the context off and steps exactly as the unshared one does
    mask = small_mask(cfg)
    steps = {}
    for share in (True, False):
        t = amp.Amplifier(model, exs, mask, amp.AmplifyConfig(lr=1e-2, batch_size=3, share_prefix=share))
        assert (t.prefix is not None) == share
        master, state = t.init()
        master, _, info = t.step(master, state, 1)
        steps[share] = (info["loss"], master)
    np.testing.assert_allclose(steps[True][0], steps[False][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(steps[True][1]), jax.tree.leaves(steps[False][1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
