"""Amplification (SPEC 4): gradient steps on the circuit's rows only.

Loss: -sum_b(logit_desired - logit_undesired) / N over the whole train set (full batch),
plain forward, logits at the last position. Only the target leaves (q, k, v, up by
default) are differentiated; the optimizer chain ends with a per-row multiply that keeps
every row outside the circuit at exactly zero update. Updated leaves keep float32
master copies, so a 1e-4 step does not round away in bf16/fp16 weights; every other
parameter is never touched (bit-identical).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from cca_jax.cca import components
from cca_jax.cca.examples import Batch
from cca_jax.config import ModelConfig
from cca_jax.errors import CCAError
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
    batch_size: int = 8  # micro-batch for the full-batch gradient
    eval_steps: tuple[int, ...] = EVAL_STEPS
    remat: bool | str = False  # True / a policy name of model.transformer.REMAT_POLICIES
    # run the layers unrolled rather than scanned: each layer's saved activations stay
    # their own buffers instead of being copied into the scan's stacked ones (faster on
    # a GPU; compiles more slowly)
    unroll: bool = False

    def __post_init__(self):
        # types and ranges (steps, lr, batch_size, eval_steps >= 1, optimizer): runconfig.RULES
        # (imported here: runconfig imports this module)
        from cca_jax.runconfig import check_fields

        check_fields(self, "amplify")
        if not self.targets:
            raise CCAError(f"amplify.targets is empty: choose from "
                           f"{', '.join(components.DEFAULT_TARGETS + components.OPTIONAL_TARGETS)}")
        components.targets_of(self.targets)
        if self.remat is not False:
            from cca_jax.model.transformer import remat_policy

            remat_policy(self.remat)


def restrict_rows(update_masks) -> optax.GradientTransformation:
    """Multiply each update by its per-row mask (1 on circuit rows, 0 elsewhere)."""

    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, update_masks), state

    return optax.GradientTransformation(init, update)


def split_params(params, selection):
    """(trainable, frozen): the selected leaves and the rest (None in the other tree)."""
    train = jax.tree.map(lambda p, s: p if s else None, params, selection)
    frozen = jax.tree.map(lambda p, s: None if s else p, params, selection)
    return train, frozen


def merge_params(train, frozen):
    return jax.tree.map(lambda a, b: b if a is None else a, train, frozen, is_leaf=lambda x: x is None)


def make_optimizer(config: AmplifyConfig, update_masks) -> optax.GradientTransformation:
    base = optax.sgd(config.lr) if config.optimizer == "sgd" else optax.adam(config.lr)
    return optax.chain(base, restrict_rows(update_masks))


def selection_and_masks(mask, params, config: AmplifyConfig):
    """Which leaves train (bool tree) and their row masks (trainable leaves only)."""
    if config.update_using_mask:
        if mask is None:
            raise CCAError("update_using_mask needs a circuit mask")
        upd = components.update_masks(mask, params, config.targets)
    else:  # ablation: every parameter, every row
        upd = jax.tree.map(lambda p: jnp.ones((1,) * p.ndim, jnp.float32), params)
    selection = components.leaf_selection(upd)
    row_masks = jax.tree.map(lambda u, s: u if s else None, upd, selection, is_leaf=lambda u: u is None)
    return selection, row_masks


def _loss_sum(train, frozen, cfg, batch_tokens, batch_mask, desired, undesired, remat):
    params = merge_params(train, frozen)
    B, T = batch_tokens.shape
    # only the 2B logits the loss reads (B, 2B) over [desired | undesired]: the rest of the
    # output matmul and its gradient (a read of the whole vocabulary each way) are skipped
    out = forward(cfg, params, batch_tokens, mask=batch_mask, at=jnp.full((B, 1), T - 1), remat=remat,
                  vocab=jnp.concatenate([desired, undesired]))
    lg = out.logits[:, 0]
    d = jnp.take_along_axis(lg, jnp.arange(B)[:, None], axis=1)[:, 0]
    u = jnp.take_along_axis(lg, B + jnp.arange(B)[:, None], axis=1)[:, 0]
    return -jnp.sum(d - u)


def _per_layer(tree):
    return {**tree, "layers": layer_list(tree["layers"])}


@functools.partial(jax.jit, static_argnames=("cfg", "remat", "unroll"))
def _grad_sum(train, frozen, cfg, tokens, mask, desired, undesired, remat=False, unroll=False):
    if not unroll:
        return jax.value_and_grad(_loss_sum)(train, frozen, cfg, tokens, mask, desired, undesired, remat)
    # layers unrolled: differentiate with respect to per-layer slices and stack their
    # gradients once, instead of XLA assembling each stacked gradient from padded slices
    loss, g = jax.value_and_grad(_loss_sum)(_per_layer(train), _per_layer(frozen), cfg, tokens, mask, desired,
                                            undesired, remat)
    return loss, {**g, "layers": jax.tree.map(lambda *a: jnp.stack(a), *g["layers"])}


def full_batch_grad(cfg: ModelConfig, train, frozen, batches: Sequence[Batch], n: int, remat: bool = False,
                    unroll: bool = False):
    """(loss, grad) of -sum(logit diff)/N over all batches, accumulated in float32."""
    total_loss, total = 0.0, None
    for b in batches:
        loss, g = _grad_sum(train, frozen, cfg, jnp.asarray(b.tokens), jnp.asarray(b.mask),
                            jnp.asarray(b.desired), jnp.asarray(b.undesired), remat, unroll)
        total = _accumulate(total, g, 1.0 / n)
        total_loss += float(loss)
    return total_loss / n, total


@functools.partial(jax.jit, donate_argnums=0)
def _accumulate(total, g, scale):
    """total + g * scale in float32, in place (one float32 copy of the gradient alive)."""
    if total is None:
        return jax.tree.map(lambda x: x.astype(jnp.float32) * scale, g)
    return jax.tree.map(lambda t, x: t + x.astype(jnp.float32) * scale, total, g)


@dataclasses.dataclass
class AmplifyState:
    step: int
    master: Any  # float32 copies of the trainable leaves
    opt_state: Any
    history: list  # [{"step", "loss", "val_accuracy"?}]
    best_step: int
    best_val: float


def working_params(master, frozen, dtype):
    return merge_params(jax.tree.map(lambda x: x.astype(dtype), master), frozen)


def init_state(params, selection, optimizer) -> tuple[AmplifyState, Any]:
    train, frozen = split_params(params, selection)
    # a copy even when the weights are float32 already: the update donates the masters
    master = jax.tree.map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True), train)
    return AmplifyState(0, master, optimizer.init(master), [], 0, float("-inf")), frozen


def step_fn(optimizer):
    """The jitted update. It donates ``master`` and ``opt_state`` (the new masters reuse the
    old ones' memory; a gemma-2-9b step did not fit one 80 GB GPU without this): callers
    must not use the arrays they passed in afterwards."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def apply(master, opt_state, grad):
        upd, opt_state = optimizer.update(grad, opt_state, master)
        return optax.apply_updates(master, upd), opt_state

    return apply

