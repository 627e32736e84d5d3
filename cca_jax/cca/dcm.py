"""Desiderata-based Component Masking (SPEC 3): learn which components decide the pivot.

A mask m (one float per query head, KV head and MLP neuron) scales each component's
activation by 2*m at the last position; Adam pushes the logit difference (desired -
undesired) up while an L1 penalty pushes m down. Because m acts only at the last
position and the weights are frozen, the keys/values of all earlier positions are
computed once per batch and every step runs the last position alone (exact).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cca_jax import mesh as mesh_lib
from cca_jax import timing, validate
from cca_jax.cca import components
from cca_jax.cca.examples import Batch, LocalizationExample, batches as make_batches
from cca_jax.cca.objective import logit_diff
from cca_jax.config import ModelConfig
from cca_jax.errors import CCAError
from cca_jax.model.intervention import Intervention
from cca_jax.model.prefill import prefix_cache
from cca_jax.model.transformer import forward

MODES = ("reference", "fixed")


@dataclasses.dataclass(frozen=True)
class DCMConfig:
    reg: float = 0.01
    batch_size: int = 8
    epochs: int = 50
    lr: float = 5e-3
    lr_decay: float = 0.9
    decay_every_epochs: int = 5
    mode: str = "fixed"
    # reference: stop once the kept count is unchanged for int(0.2 * batches per epoch)
    # batches in a row (counter reset each epoch). With Adam every unopposed m falls by
    # about lr per step, so the bulk crosses 0.5 together after ~0.5/lr steps; the few
    # components that cross first trigger that rule before the bulk does, and the mask
    # keeps nearly everything. fixed: stop once the count is unchanged for a whole epoch.
    early_stop: str = "fixed"
    seed: int = 0
    # a circuit of about this fraction of components: reg is searched by bisection (in log
    # space, one DCM run per probe) until the kept fraction is within target_tolerance
    # (relative) of it, or target_max_runs runs; the closest run's mask is the circuit
    target_fraction: float | None = None
    target_tolerance: float = 0.2
    target_max_runs: int = 8
    # run each step's layers unrolled over per-layer weights rather than scanned: faster
    # steps, but the step compiles every layer (on an H200, Qwen2.5-0.5B's 24 layers: ~45 s
    # to compile against ~1 s for all its steps); the same computation either way (up to
    # float rounding)
    unroll: bool = False

    def __post_init__(self):
        v = validate
        v.check_fields(self, "dcm", {
            "reg": v.at_least(0), "batch_size": v.COUNT, "epochs": v.COUNT, "lr": v.above(0),
            "lr_decay": (v.above(0), v.at_most(1)), "decay_every_epochs": v.COUNT, "mode": v.one_of(*MODES),
            "early_stop": v.one_of(*MODES), "seed": v.SEED, "target_fraction": (v.above(0), v.below(1)),
            "target_tolerance": v.above(0), "target_max_runs": v.COUNT})


def _scale_iv(m: dict, where: jax.Array) -> Intervention:
    return Intervention(where=where, scale={k: 2.0 * v for k, v in m.items()})


def l1(m: dict, mode: str) -> jax.Array:
    """sum |m|. reference: the original's ``torch.norm(m, p=1)``, whose gradient at m = 0 is
    0; JAX's |x| has gradient 1 there (m is clamped to [0, 1], so only m = 0 differs)."""
    if mode == "reference":
        return sum(jnp.sum(v * jax.lax.stop_gradient(jnp.sign(v))) for v in m.values())
    return sum(jnp.sum(jnp.abs(v)) for v in m.values())


def loss_full(cfg: ModelConfig, params, m: dict, batch: Batch, reg: float, mode: str) -> jax.Array:
    """The DCM loss with a plain full forward over the whole prefix (the reference path)."""
    B, T = batch.tokens.shape
    where = jnp.zeros((B, T), bool).at[:, -1].set(True)
    out = forward(cfg, params, jnp.asarray(batch.tokens), mask=jnp.asarray(batch.mask),
                  at=jnp.full((B, 1), T - 1), intervention=_scale_iv(m, where),
                  final_softcap=(mode == "fixed"))
    lg = out.logits[:, 0]
    return -logit_diff(lg, jnp.asarray(batch.desired), jnp.asarray(batch.undesired), mode,
                       jnp.asarray(batch.weights)) + reg * l1(m, mode)


def loss_cached(cfg: ModelConfig, params, m: dict, cache, last_tokens, desired, undesired, reg, mode,
                weights=None):
    """The same loss, running only the last position on top of the cached prefix.
    ``weights`` (B,): 0 on padded rows (``examples.Batch``); None: every row is real."""
    B = last_tokens.shape[0]
    # only the 2B logits the loss reads: (B, 2B) over [desired | undesired] ids
    ids = jnp.concatenate([desired, undesired])
    out = forward(cfg, params, last_tokens[:, None], cache=cache, at=jnp.zeros((B, 1), jnp.int32),
                  intervention=_scale_iv(m, jnp.ones((B, 1), bool)), final_softcap=(mode == "fixed"), vocab=ids)
    lg = out.logits[:, 0]
    return -logit_diff(lg, jnp.arange(B), jnp.arange(B, 2 * B), mode, weights) + reg * l1(m, mode)


def make_optimizer(config: DCMConfig, batches_per_epoch: int) -> optax.GradientTransformation:
    """Adam with the learning rate times ``lr_decay`` every ``decay_every_epochs`` epochs."""
    return _adam(float(config.lr), int(config.decay_every_epochs * batches_per_epoch), float(config.lr_decay))


@functools.lru_cache(maxsize=64)
def _adam(lr: float, transition_steps: int, decay_rate: float) -> optax.GradientTransformation:
    # one object per setting: mask_step takes the optimizer as a static argument, so a
    # new object per train_mask call (a size search, a sweep) would compile the step again
    schedule = optax.exponential_decay(lr, transition_steps=transition_steps, decay_rate=decay_rate, staircase=True)
    return optax.adam(schedule)


@functools.partial(jax.jit, static_argnames=("cfg", "opt", "mode"), donate_argnames=("m", "state"))
def mask_step(cfg: ModelConfig, opt, reg: float, mode: str, params, m: dict, state, cache, last, desired,
              undesired, weights=None):
    """One DCM step on a cached batch: Adam on the mask, clamp to [0, 1]. Returns
    (m, state, loss, kept). ``weights`` (B,): 0 on padded rows, a traced argument so a
    padded last batch runs the same program as the full ones. ``params`` is an argument,
    not a closure constant, so the model weights are never baked into the compiled program. ``m`` and ``state`` are donated
    (do not use them after the call): the new ones then live where the old ones did, so
    a GPU replays the step's recorded command buffer with fewer addresses to update."""
    loss, g = jax.value_and_grad(loss_cached, argnums=2)(cfg, params, m, cache, last, desired, undesired,
                                                          reg, mode, weights)
    upd, state = opt.update(g, state, m)
    m = optax.apply_updates(m, upd)
    m = jax.tree.map(lambda x: jnp.clip(x, 0.0, 1.0), m)
    kept = sum(jnp.sum(x > 0.5) for x in m.values())
    return m, state, loss, kept


@dataclasses.dataclass
class DCMResult:
    mask: dict  # binary (numpy bool)
    m: dict  # the learned floats
    history: list  # per step: epoch, step, loss, kept
    stopped_early: bool


def patience_for(batches_per_epoch: int, early_stop: str = "reference") -> int:
    if early_stop == "fixed":
        return batches_per_epoch
    return int(0.2 * batches_per_epoch)


@functools.partial(jax.jit, static_argnames=("cfg", "sharding", "stacked"))
def placed_prefix_cache(cfg: ModelConfig, params, tokens, mask, sharding, stacked: bool = False):
    cache = prefix_cache(cfg, params, tokens, mask)
    return mesh_lib.constrain_cache(cache.stacked() if stacked else cache, sharding)


def prefix_caches(cfg, params, bs, on_host: bool = False, stacked: bool = False):
    """Each batch's prefix cache; on a mesh laid out like the weights (KV heads over tp,
    rows over the data axis, or whole on every device when the weights are replicated:
    ``mesh.whole_rows``); ``on_host``: parked in host memory, streamed in per step;
    ``stacked``: its buffers as one array each, for steps scanned over the layers."""
    out = []
    whole = mesh_lib.whole_rows(params)
    for b in bs:
        cs = mesh_lib.cache_sharding(params, b.tokens.shape[0], cfg.num_kv_heads, whole)
        c = placed_prefix_cache(cfg, params, mesh_lib.rows(b.tokens, params, whole=whole),
                                mesh_lib.rows(b.mask, params, whole=whole), cs, stacked)
        out.append(mesh_lib.to_memory(c, "pinned_host") if on_host else c)
    return out


def cache_bytes(cfg: ModelConfig, examples: Sequence[LocalizationExample], batch_size: int, dtype) -> int:
    """Bytes of every DCM prefix cache together (all devices), before any is made."""
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize + 4
    return sum(b.tokens.size for b in make_batches(examples, batch_size, 0, 0, pad_rows=True)) * per_token


@jax.jit
def _copy(tree):
    """A copy of the mask and optimizer state, one program (not one per leaf)."""
    return jax.tree.map(jnp.copy, tree)


def train_mask(model, examples: Sequence[LocalizationExample], config: DCMConfig, pad_token_id: int = 0,
               progress: bool = True, caches_on_host: bool = False) -> DCMResult:
    """Learn the DCM mask on ``examples``. Early stop (SPEC 3, reference): the kept count
    unchanged for ``int(0.2 * batches_per_epoch)`` batches in a row (counter reset each
    epoch) while not everything is kept; fixed: unchanged for a whole epoch.
    ``model`` may be sharded over a mesh (``cca_jax.mesh``: the batches and caches follow
    its layout); ``caches_on_host``: the prefix caches wait in host memory and each
    step's is copied in (the next one while the current step runs), for when they do not
    fit on the devices."""
    if not examples:
        raise CCAError("DCM needs at least one localization example")
    cfg = model.config
    # reference: a new shuffled loader every epoch (seed + epoch) regroups the examples
    # into new batches; fixed: batches drawn once, their order shuffled every epoch
    regroup = config.mode == "reference"
    # every batch padded to one row count (padded rows weigh 0): one compiled step and cache
    bs = make_batches(examples, config.batch_size, config.seed, pad_token_id, pad_rows=True)
    stacked = not config.unroll  # scanned steps (``DCMConfig.unroll``)
    caches = prefix_caches(cfg, model.params(), bs, caches_on_host, stacked)
    # stacked weights scan the layers; per-layer buffers (unstack_layers) unroll them
    params = model.params() if stacked else mesh_lib.per_layer(model.params())
    whole = mesh_lib.whole_rows(model.params())  # replicated weights: one device's program on every device
    n_b = len(bs)
    opt = make_optimizer(config, n_b)
    m = components.full(cfg, 1.0)
    state = opt.init(m)
    reg = jnp.float32(config.reg)

    def step(m, state, cache, last, desired, undesired, weights):
        return timing.step(f"mask_step {desired.shape[0]}x{cache.size}", mask_step, cfg, opt, reg, config.mode,
                           params, m, state, cache, last, desired, undesired, weights)

    total = components.total(cfg)
    patience = patience_for(n_b, config.early_stop)
    history, stopped = [], False
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.epochs * n_b, desc="dcm", unit="step")
    prev = total
    rng = np.random.default_rng(config.seed)
    same = 0

    def placed(bs):  # each batch's step inputs on the devices once, not at every step
        return [tuple(mesh_lib.rows(x, params, whole=whole) for x in (b.tokens[:, -1], b.desired, b.undesired, b.weights))
                for b in bs]

    def settle(epoch, loss, kept) -> bool:
        """Record a step (its loss and kept count read back); True: the early stop ends here."""
        nonlocal same, prev
        loss, kept = timing.fetch((loss, kept))
        kept = int(kept)
        history.append({"epoch": epoch, "step": len(history), "loss": float(loss), "kept": kept})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.3f}", kept=kept)
        same = same + 1 if kept == prev else 0
        prev = kept
        return kept < total and same >= patience

    inputs = placed(bs)
    for epoch in range(config.epochs):
        if config.early_stop == "reference":
            same = 0
        if regroup and epoch > 0:
            bs = make_batches(examples, config.batch_size, config.seed + epoch, pad_token_id, pad_rows=True)
            caches = prefix_caches(cfg, model.params(), bs, caches_on_host, stacked)
            inputs = placed(bs)
        order = list(range(n_b) if regroup else rng.permutation(n_b))
        ahead = mesh_lib.to_memory(caches[order[0]], "device") if caches_on_host else None
        # each step is sent before the previous one's loss and kept count are read back, so
        # the device never waits for the host; a step sent after the one the early stop
        # ends on is dropped. The step donates the mask and state it is given: where the
        # previous step could be the last (its count unchanged would reach the patience),
        # a copy of its mask and state is kept first.
        pending = None
        for i, bi in enumerate(order):
            cache = ahead if caches_on_host else caches[bi]
            if caches_on_host and i + 1 < len(order):  # the next batch's cache copies in during this step
                ahead = mesh_lib.to_memory(caches[order[i + 1]], "device")
            kept_copy = _copy((m, state)) if pending is not None and same + 1 >= patience else None
            sent = step(m, state, cache, *inputs[bi])
            del cache
            if pending is not None and settle(epoch, *pending):
                m, state = kept_copy
                stopped = True
                break
            m, state, *pending = sent  # pending: the sent step's loss and kept count
        if not stopped and pending is not None and settle(epoch, *pending):
            stopped = True
        if stopped:
            break
    if bar is not None:
        bar.close()
    m = mesh_lib.host(m)
    return DCMResult(components.binarize(m), {k: np.asarray(v) for k, v in m.items()}, history, stopped)
