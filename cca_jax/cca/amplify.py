"""Amplification (SPEC 4): gradient steps on the circuit's rows only.

Loss: -sum_b(logit_desired - logit_undesired) / N over the whole train set (full batch),
plain forward, logits at the last position. The few-shot context every example starts
with is run once per micro-batch (one row, differentiated like the rest) and its keys
and values are shared by the rows: the same loss and gradient as running it in every
row, for a fraction of the work (``share_prefix``). Only the target leaves (q, k, v, up by
default) are differentiated (``circuit.circuit_value_and_grad``) and the optimizer is
``circuit.circuit_optimizer``: every row outside the circuit gets exactly zero update.
Updated leaves keep float32 master copies, so a 1e-4 step does not round away in
bf16/fp16 weights; every other parameter is never touched (bit-identical).
``amplify`` runs the whole stage (steps, val selection, checkpoints) through
``train_loop``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cca_jax.cca import circuit, components
from cca_jax.cca.examples import Batch, batches as make_batches
from cca_jax import mesh as mesh_lib
from cca_jax import timing, validate
from cca_jax.cca.objective import logit_diffs
from cca_jax.config import ModelConfig
from cca_jax.errors import CCAError
from cca_jax.model.cache import init_cache, tile_cache
from cca_jax.model.transformer import forward, layer_list

# SPEC 4: val accuracy at these steps (and step 0, the unchanged model)
EVAL_STEPS = (2, 4, 5, 6, 8, 10, 15, 20, 25, 30, 35, 40, 45, 50)


@dataclasses.dataclass(frozen=True)
class AmplifyConfig:
    steps: int = 50
    lr: float = 1e-4  # W <- W - lr * grad, i.e. the reference's c = -1e-4
    optimizer: str = "sgd"  # sgd | adam
    targets: tuple[str, ...] = components.DEFAULT_TARGETS
    update_using_mask: bool = True  # False: the ablation that updates all parameters
    # also the targets' biases (Qwen2's q/k/v) on circuit rows; the original release
    # updates weights only
    biases: bool = True
    batch_size: int = 8  # micro-batch for the full-batch gradient
    eval_steps: tuple[int, ...] = EVAL_STEPS
    remat: bool | str = False  # True / a policy name of model.transformer.REMAT_POLICIES
    # run the layers unrolled rather than scanned: each layer's saved activations stay
    # their own buffers instead of being copied into the scan's stacked ones (faster on
    # a GPU; compiles more slowly)
    unroll: bool = False
    # run the context every example starts with once per micro-batch (its gradient summed
    # over the rows) instead of in every row: the same loss and gradient, up to rounding
    share_prefix: bool = True

    def __post_init__(self):
        validate.check_fields(self, "amplify", {
            "steps": validate.COUNT, "lr": validate.above(0), "optimizer": validate.one_of("sgd", "adam"),
            "batch_size": validate.COUNT, "eval_steps": validate.COUNT})
        if not self.targets:
            raise CCAError(f"amplify.targets is empty: choose from "
                           f"{', '.join(components.DEFAULT_TARGETS + components.OPTIONAL_TARGETS)}")
        components.targets_of(self.targets)
        if self.remat is not False:
            from cca_jax.model.transformer import remat_policy

            remat_policy(self.remat)


def selection_and_masks(mask, params, config: AmplifyConfig):
    """(selection, row_masks): which leaves train (bool per leaf) and their circuit rows."""
    if not config.update_using_mask:  # ablation: every parameter, every row
        return circuit.circuit_masks(None, params, targets="all")
    if mask is None:
        raise CCAError("update_using_mask needs a circuit mask")
    return circuit.circuit_masks(mask, params, config.targets, config.biases)


def make_optimizer(config: AmplifyConfig, mask, params) -> circuit.CircuitOptimizer:
    """SPEC 4's plain gradient step (or Adam) on the circuit's rows only."""
    inner = optax.sgd(config.lr) if config.optimizer == "sgd" else optax.adam(config.lr)
    if not config.update_using_mask:
        return circuit.circuit_optimizer(inner, None, params, targets="all")
    if mask is None:
        raise CCAError("update_using_mask needs a circuit mask")
    return circuit.circuit_optimizer(inner, mask, params, config.targets, config.biases)


split_params, merge_params = circuit.split_params, circuit.merge_params


def _shared_cache(params, cfg, prefix, rows: int, size: int, remat):
    """The keys/values of the shared context ``prefix`` (1, P), computed once from
    ``params`` (so differentiated through) and repeated for ``rows`` rows, in a cache of
    ``size`` slots: the backward pass sums the rows' cotangents into the one context."""
    cache = init_cache(cfg, 1, size, params["embed"].dtype)
    cache = forward(cfg, params, prefix, cache=cache, at=jnp.zeros((1, 1), jnp.int32), remat=remat).cache
    return tile_cache(cache, rows)


def _loss_sum(params, cfg, batch_tokens, batch_mask, desired, undesired, remat, weights=None, prefix=None):
    B, T = batch_tokens.shape
    cache = None if prefix is None else _shared_cache(params, cfg, prefix, B, prefix.shape[1] + T, remat)
    # only the 2B logits the loss reads (B, 2B) over [desired | undesired]: the rest of the
    # output matmul and its gradient (a read of the whole vocabulary each way) are skipped
    out = forward(cfg, params, batch_tokens, mask=batch_mask, cache=cache, at=jnp.full((B, 1), T - 1), remat=remat,
                  vocab=jnp.concatenate([desired, undesired]))
    diffs = logit_diffs(out.logits[:, 0], jnp.arange(B), jnp.arange(B, 2 * B))
    if weights is not None:  # padded rows (weight 0, desired == undesired) add exactly 0, gradient too
        diffs = weights.astype(diffs.dtype) * diffs
    return -jnp.sum(diffs)


def _per_layer(tree):
    return {**tree, "layers": layer_list(tree["layers"])}


def _trained(train):
    return jax.tree.map(lambda x: x is not None, train, is_leaf=lambda x: x is None)


@functools.partial(jax.jit, static_argnames=("cfg", "remat", "unroll"))
def grad_sum(train, frozen, cfg, tokens, mask, desired, undesired, remat=False, unroll=False, weights=None,
             prefix=None):
    """(-sum over rows of the logit difference, its gradient); ``weights`` (B,): 0 on
    padded rows (``examples.Batch``), None: every row is real. ``prefix`` (1, P): a
    context every row starts with, ``tokens`` then being each row's rest (None: none)."""
    params, selection = merge_params(train, frozen), _trained(train)
    if not unroll:
        return circuit.circuit_value_and_grad(_loss_sum, params, selection, cfg, tokens, mask, desired, undesired,
                                              remat, weights, prefix)
    # layers unrolled: differentiate with respect to per-layer slices and stack their
    # gradients once, instead of XLA assembling each stacked gradient from padded slices
    n = cfg.num_layers
    loss, g = circuit.circuit_value_and_grad(_loss_sum, _per_layer(params),
                                             {**selection, "layers": (selection["layers"],) * n},
                                             cfg, tokens, mask, desired, undesired, remat, weights, prefix)
    return loss, {**g, "layers": jax.tree.map(lambda *a: jnp.stack(a), *g["layers"])}


def full_batch_grad(cfg: ModelConfig, train, frozen, batches: Sequence[Batch], n: int, remat: bool = False,
                    unroll: bool = False, prefix=None):
    """(loss, grad) of -sum(logit diff)/N over all batches, accumulated in float32; ``n``
    the number of real examples (padded rows weigh 0). The batches are dispatched back to
    back; the loss is read once, at the end. ``prefix`` (1, P): the context every row of
    every batch starts with (``shared_context``), the batches holding the rest."""
    losses, total = [], None
    if prefix is not None:
        prefix = mesh_lib.rows(prefix, frozen, whole=True)  # one row, on every device
    for b in batches:
        # on a mesh, rows over the data axis of the weights' layout (cca_jax.mesh)
        kind = (f"grad_sum {b.tokens.shape[0]}x{b.tokens.shape[1]}"
                + (f" after a shared {prefix.shape[1]}" if prefix is not None else ""))
        loss, g = timing.step(kind, grad_sum, train, frozen, cfg, *(mesh_lib.rows(x, frozen) for x in
                                                                    (b.tokens, b.mask, b.desired, b.undesired)),
                              remat, unroll, mesh_lib.rows(b.weights, frozen), prefix)
        total = _accumulate(total, g, 1.0 / n)
        losses.append(loss)
    return float(sum(timing.fetch(losses))) / n, total


@functools.partial(jax.jit, donate_argnums=0)
def _accumulate(total, g, scale):
    """total + g * scale in float32, in place (one float32 copy of the gradient alive)."""
    if total is None:
        return jax.tree.map(lambda x: x.astype(jnp.float32) * scale, g)
    return jax.tree.map(lambda t, x: t + x.astype(jnp.float32) * scale, total, g)


# a shorter shared context is not worth a second pass (and a cache) per micro-batch
MIN_SHARED = 16


def shared_context(examples: Sequence, share: bool = True) -> tuple[np.ndarray | None, list]:
    """(the context (1, P) int32 every example's prefix starts with, the examples with it
    cut off) when ``share`` and it is at least ``MIN_SHARED`` tokens (each keeps at least
    one token); else (None, the examples unchanged)."""
    from cca_jax.generate import common_prefix_len

    P = common_prefix_len([e.prefix for e in examples]) if share and len(examples) > 1 else 0
    if P < MIN_SHARED:
        return None, list(examples)
    return (np.asarray([examples[0].prefix[:P]], np.int32),
            [dataclasses.replace(e, prefix=e.prefix[P:]) for e in examples])


def warm(model, examples: Sequence, config: AmplifyConfig, pad_token_id: int = 0):
    """Compile ahead, on a background thread, the gradient program ``Amplifier`` will run
    on ``examples`` (its leaves chosen by ``config.targets``, as any circuit with rows in
    each target chooses them), while the device works on something else (DCM): the
    started thread, or None (no examples; a device mesh)."""
    from cca_jax.cca.examples import batches as make_batches

    params = model.params()
    if not examples or mesh_lib.mesh_of(params) is not None:
        return None
    if config.update_using_mask:
        selection, _ = circuit.circuit_masks(None, params, config.targets, config.biases)
    else:
        selection, _ = circuit.circuit_masks(None, params, targets="all")
    train, frozen = split_params(params, selection)
    prefix, rest = shared_context(examples, config.share_prefix)
    b = make_batches(rest, config.batch_size, seed=0, pad=pad_token_id, pad_rows=True)[0]
    sds = jax.ShapeDtypeStruct
    args = (jax.tree.map(lambda x: sds(x.shape, model.dtype), train), frozen, model.config,
            sds(b.tokens.shape, jnp.int32), sds(b.mask.shape, jnp.bool_), sds(b.desired.shape, jnp.int32),
            sds(b.undesired.shape, jnp.int32), config.remat, config.unroll, sds(b.weights.shape, jnp.float32),
            None if prefix is None else sds(prefix.shape, jnp.int32))
    return timing.compile_ahead([(grad_sum, args)])


def working_params(master, frozen, dtype):
    return merge_params(jax.tree.map(lambda x: x.astype(dtype), master), frozen)


def init_state(params, optimizer: circuit.CircuitOptimizer):
    """(master, opt_state, frozen): float32 masters of the optimizer's selected leaves
    (None elsewhere), its state, and the untouched leaves (None where trained)."""
    train, frozen = split_params(params, optimizer.selection)
    # a copy even when the weights are float32 already: the update donates the masters
    master = jax.tree.map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True), train)
    return master, optimizer.init(master), frozen


def step_fn(optimizer):
    """The jitted update. It donates ``master`` and ``opt_state`` (the new masters reuse the
    old ones' memory; a gemma-2-9b step did not fit one 80 GB GPU without this): callers
    must not use the arrays they passed in afterwards."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def apply(master, opt_state, grad):
        upd, opt_state = optimizer.update(grad, opt_state, master)
        return circuit.apply_updates(master, upd), opt_state

    return apply



class Amplifier:
    """``train_loop.Trainer`` for amplification: full-batch gradient steps on the circuit."""

    def __init__(self, model, examples: Sequence, mask, config: AmplifyConfig, pad_token_id: int = 0):
        if not examples:
            raise CCAError("amplification needs at least one localization example")
        self.name, self.steps, self.config = "amplification", config.steps, config
        self.cfg, self.dtype, self.n = model.config, model.dtype, len(examples)
        self.params = model.params()
        self.opt = make_optimizer(config, mask, self.params)
        self.frozen = split_params(self.params, self.opt.selection)[1]
        # the context shared by every example runs once per micro-batch (SPEC 4's loss unchanged)
        self.prefix, rest = shared_context(examples, config.share_prefix)
        # the last batch padded to the others' rows (weight 0): one compiled gradient program
        self.batches = make_batches(rest, config.batch_size, seed=0, pad=pad_token_id, pad_rows=True)
        self._apply = step_fn(self.opt)

    def init(self):
        master, opt_state, _ = init_state(self.params, self.opt)
        return master, opt_state

    def step(self, master, opt_state, step):
        # the gradient of the model as it runs (working dtype); the update lands in float32
        train_now = jax.tree.map(lambda x: x.astype(self.dtype), master)
        loss, grad = full_batch_grad(self.cfg, train_now, self.frozen, self.batches, self.n, self.config.remat,
                                     self.config.unroll, self.prefix)
        del train_now  # peak memory: the working copy is not needed for the update
        master, opt_state = self._apply(master, opt_state, grad)
        return master, opt_state, {"loss": loss}

    def is_eval_step(self, step):
        return step in self.config.eval_steps

    def working_params(self, master):
        return working_params(master, self.frozen, self.dtype)


@dataclasses.dataclass
class AmplifyResult:
    params: dict  # the best step's parameters (working dtype)
    master: dict  # its float32 masters (None at untouched leaves)
    best_step: int
    best_val: float
    history: list
    seconds: float


def amplify(model, examples: Sequence, mask, config: AmplifyConfig = AmplifyConfig(), *,
            evaluate=None, val0: float = float("-inf"), checkpoint_dir=None, key: str = "", pad_token_id: int = 0,
            progress: bool = True, on_step=None, log=print) -> AmplifyResult:
    """SPEC 4 on ``model``: ``config.steps`` steps on ``mask``'s circuit (``components``
    booleans), keeping the step with the best ``evaluate(model_with_params) -> accuracy``
    (step 0, the unchanged model, scores ``val0``). Without ``evaluate``, the last step.

    checkpoint_dir: where steps are checkpointed; a rerun with the same ``key`` resumes
    there. None: a temporary directory, removed at the end.
    """
    import tempfile
    from pathlib import Path

    from cca_jax import train_loop

    trainer = Amplifier(model, examples, mask, config, pad_token_id)
    score = None if evaluate is None else (lambda params, step: evaluate(model.with_params(params)))
    with tempfile.TemporaryDirectory(prefix="cca_amplify_") as tmp:
        ckpt = train_loop.Checkpoints(Path(checkpoint_dir) if checkpoint_dir is not None else Path(tmp), key)
        res = train_loop.train_and_select(trainer, score, val0, ckpt, progress=progress, on_step=on_step, log=log)
    return AmplifyResult(trainer.working_params(res.best_master), res.best_master, res.best_step, res.best_val,
                         res.history, res.seconds)
