"""The circuit as an optax transformation (circuit_optimizer, circuit_value_and_grad):
nothing outside the circuit's rows moves, whatever the inner optimizer; no optimizer
state for frozen leaves; the pipeline's amplification is this mechanism."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cca_jax
from cca_jax import pipeline, runconfig, stages
from cca_jax.cca import components
from cca_jax.cca.examples import batches
from tiny import CONFIG, circuit_examples, small_mask


@pytest.fixture(scope="module")
def model(hf_dirs):
    return cca_jax.load_model(hf_dirs["qwen2"][1])[0]  # q/k/v biases


def _loss(model):
    exs = circuit_examples(6)
    b = batches(exs, 6, 0)[0]
    tokens, mask = jnp.asarray(b.tokens), jnp.asarray(b.mask)
    d, u = jnp.asarray(b.desired), jnp.asarray(b.undesired)

    def loss_fn(params):  # a user's own loss: logit difference plus an L2 pull to zero
        lg = cca_jax.forward(model.config, params, tokens, mask=mask).logits[:, -1]
        rows = jnp.arange(lg.shape[0])
        return -jnp.mean(lg[rows, d] - lg[rows, u]) + 1e-3 * jnp.sum(params["layers"]["mlp"]["up"] ** 2)

    return loss_fn


def _bits(x):
    x = np.asarray(x)
    return x.view(np.uint32 if x.dtype.itemsize == 4 else np.uint16)


INNER = {
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "lion": lambda: optax.lion(1e-3, weight_decay=0.1),
    "chain": lambda: optax.chain(optax.clip_by_global_norm(0.5),
                                 optax.adam(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 5))),
}


@pytest.mark.parametrize("inner", list(INNER))
@pytest.mark.parametrize("grads", ["circuit", "full"])
def test_only_circuit_rows_move_under_any_inner_optimizer(model, inner, grads):
    params = model.params()
    mask = small_mask(model.config)
    opt = cca_jax.circuit_optimizer(INNER[inner](), mask, params, targets=("q", "k", "v", "up", "o"))
    state = opt.init(params)
    # no optimizer state for frozen leaves: every state array belongs to a selected leaf
    sel_shapes = sorted(tuple(x.shape) for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(opt.selection)) if s)
    state_shapes = {tuple(x.shape) for x in jax.tree.leaves(state) if np.ndim(x)}
    assert state_shapes and state_shapes <= set(sel_shapes)
    n_state = sum(int(np.size(x)) for x in jax.tree.leaves(state))
    n_sel = sum(int(np.prod(s)) for s in sel_shapes)
    assert n_state < 3 * n_sel  # at most two moments + counters: nothing sized like the frozen leaves
    loss_fn = _loss(model)

    @jax.jit
    def step(params, state):
        if grads == "circuit":
            loss, g = cca_jax.circuit_value_and_grad(loss_fn, params, opt.selection)
        else:
            loss, g = jax.value_and_grad(loss_fn)(params)
        upd, state = opt.update(g, state, params)
        # the efficient path passes None for frozen leaves: apply_updates keeps them as they are
        new = cca_jax.apply_circuit_updates(params, upd) if grads == "circuit" else optax.apply_updates(params, upd)
        return new, state

    p = params
    for _ in range(5):
        p, state = step(p, state)
    rows = components.update_masks(mask, params, ("q", "k", "v", "up", "o"))
    moved_any = 0
    for (path, before), after, r in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(p),
                                        jax.tree.leaves(rows, is_leaf=lambda x: x is None)):
        b, a = _bits(before), _bits(after)
        if r is None:
            assert (a == b).all(), path  # frozen leaf: bit-identical
            continue
        sel = np.broadcast_to(np.asarray(r) != 0, b.shape)
        assert (a[~sel] == b[~sel]).all(), path  # rows outside the circuit: bit-identical
        # every circuit row moved (each selected head/neuron row has changed entries)
        changed = (a != b) & sel
        assert changed.any(), path
        moved_any += 1
    assert moved_any >= 8  # q, k, v, o, up and the q/k/v biases


def test_negative_zero_weights_stay_negative_zero(model):
    """-0.0 is the one additive identity for every float: a frozen -0.0 weight stays -0.0."""
    params = model.params()
    params = {**params, "layers": {**params["layers"], "attn": {
        **params["layers"]["attn"], "q": params["layers"]["attn"]["q"].at[0, 0, 0, 0].set(-0.0)}}}
    mask = small_mask(model.config)  # q head 1 of layer 0 only: (0, :, 0, :) is outside the circuit
    opt = cca_jax.circuit_optimizer(optax.sgd(1.0), mask, params)
    g = jax.tree.map(jnp.ones_like, params)
    upd, _ = opt.update(g, opt.init(params), params)
    new = optax.apply_updates(params, upd)
    assert np.signbit(np.asarray(new["layers"]["attn"]["q"])[0, 0, 0, 0])


def test_pipeline_amplification_is_plain_masked_gradient_descent(tmp_path):
    """The tiny run's amplified weights equal an independent computation: jax.grad of the
    full-batch loss over the whole tree, W -= lr * grad on circuit rows only (float32)."""
    cfg = runconfig.load(CONFIG, ["amplify.steps=2", "amplify.eval_steps=[2]", "dcm.epochs=2"])
    pipeline.run(cfg, tmp_path, progress=False, log=lambda s: None)
    model, _ = cca_jax.load_model(cfg.model)
    params = model.params()
    from cca_jax.cca import examples as ex_lib

    exs = ex_lib.load(tmp_path / "stages" / "localize" / "examples.jsonl")
    mask = components.load(tmp_path / "stages" / "circuit" / "mask.npz")
    bs = batches(exs, cfg.amplify.batch_size, seed=0, pad=0)

    def loss(p):
        total = 0.0
        for b in bs:
            lg = cca_jax.forward(model.config, p, jnp.asarray(b.tokens), mask=jnp.asarray(b.mask)).logits[:, -1]
            rows = np.arange(len(b.desired))
            total = total - jnp.sum(lg[rows, b.desired] - lg[rows, b.undesired])
        return total / len(exs)

    rows = components.update_masks(mask, params, cfg.amplify.targets)
    p = params
    for _ in range(2):
        g = jax.grad(loss)(p)
        p = jax.tree.map(lambda w, gg, r: w if r is None else w - cfg.amplify.lr * gg * r, p, g, rows,
                         is_leaf=lambda x: x is None)
    saved = pipeline.saved_master(tmp_path, "amplify", "current")
    want = stages.flatten(p)
    assert set(saved) == {"layers.attn.q", "layers.attn.k", "layers.attn.v", "layers.mlp.up"}
    for k, v in saved.items():
        np.testing.assert_allclose(np.asarray(v), np.asarray(want[k]), rtol=0, atol=2e-6)
