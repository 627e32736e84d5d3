"""Per-component effects at the pivotal position: activation patching and attribution.

Effect of component c = LD(c patched) - LD(clean), LD = mean over examples of
logit[desired] - logit[undesired] at the last position. A patch replaces c's activation
at the last position (a q/k/v head's raw projection output, or an MLP neuron) by zero,
by its mean over the examples, or by its value on counterfactual prefixes.

Patching: ``vmap`` over components, in memory-bounded chunks, each a one-token forward on
top of the examples' cached prefix keys/values, so one compiled call patches thousands.
Attribution: the first-order estimate (patched - clean activation) . dLD/d(activation),
for every component from one forward and one backward pass.
Effects come back as a ComponentMask-shaped dict: {"q": (L, H), "k"/"v": (L, KV), "mlp": (L, F)}.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cca_jax.cca import components
from cca_jax.cca.objective import logit_diff
from cca_jax.config import ModelConfig
from cca_jax.errors import CCAError
from cca_jax.model.intervention import Intervention
from cca_jax.model.params import unstack_layers
from cca_jax.model.prefill import prefix_cache
from cca_jax.model.transformer import forward

MODES = ("zero", "mean", "counterfactual")
TYPES = components.TYPES


def _last(cfg, params, cache, last, iv=None, collect=False):
    B = last.shape[0]
    return forward(cfg, params, last[:, None], cache=cache, at=jnp.zeros((B, 1), jnp.int32),
                   intervention=iv, collect=collect)


def last_activations(cfg: ModelConfig, params, cache, last_tokens) -> dict:
    """Clean activations at the last position: q/k/v (L, B, N, Dh), mlp (L, B, F)."""
    acts = _last(cfg, params, cache, last_tokens, collect=True).activations
    return {k: acts[k][:, :, 0] for k in TYPES}


def patch_values(clean: dict, mode: str, counterfactual: dict | None = None) -> dict:
    """The replacement activations, shaped like ``clean`` ((L, B, ...))."""
    if mode == "zero":
        return {k: jnp.zeros_like(v) for k, v in clean.items()}
    if mode == "mean":
        return {k: jnp.broadcast_to(v.mean(axis=1, keepdims=True), v.shape) for k, v in clean.items()}
    if mode == "counterfactual":
        if counterfactual is None:
            raise CCAError("counterfactual patching needs counterfactual activations")
        return counterfactual
    raise CCAError(f"patching mode must be one of {MODES}, got {mode!r}")


def _offsets(cfg: ModelConfig):
    shapes = components.shapes(cfg)
    sizes = [int(np.prod(shapes[t])) for t in TYPES]
    return shapes, np.cumsum([0] + sizes)


def _one_hot(cfg: ModelConfig, idx):
    """Replace masks selecting the single component with flat index ``idx``."""
    shapes, off = _offsets(cfg)
    return {t: (jnp.arange(off[i + 1] - off[i]) == idx - off[i]).reshape(shapes[t]) for i, t in enumerate(TYPES)}


@functools.partial(jax.jit, static_argnames=("cfg",))
def _patch_chunk(cfg, params, cache, last, desired, undesired, values, idx):
    def one(i):
        iv = Intervention(where=jnp.ones((last.shape[0], 1), bool), replace=values,
                          replace_mask=_one_hot(cfg, i))
        return logit_diff(_last(cfg, params, cache, last, iv).logits[:, 0], desired, undesired)

    return jax.vmap(one)(idx)


def patching_effects(cfg: ModelConfig, params, cache, last_tokens, desired, undesired, values: dict,
                     chunk: int = 256, progress: bool = False, indices=None) -> dict:
    """Activation patching of every component (vmapped, ``chunk`` components per call).

    indices: patch only these flat component indices (q, k, v, mlp order, row-major);
    the others come back as NaN."""
    clean = float(logit_diff(_last(cfg, params, cache, last_tokens).logits[:, 0], desired, undesired))
    shapes, off = _offsets(cfg)
    n_all = int(off[-1])
    order = np.arange(n_all) if indices is None else np.asarray(indices)
    n = len(order)
    flat = np.full(n_all, np.nan, np.float32)
    out = np.zeros(n, np.float32)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="patching", unit="comp")
    padded = np.concatenate([order, np.full((-n) % chunk, order[-1] if n else 0)])  # one shape
    for s in range(0, n, chunk):
        idx = jnp.asarray(padded[s:s + chunk])
        vals = _patch_chunk(cfg, params, cache, last_tokens, desired, undesired, values, idx)
        out[s:min(s + chunk, n)] = np.asarray(vals)[: min(chunk, n - s)] - clean
        if bar is not None:
            bar.update(min(chunk, n - s))
    if bar is not None:
        bar.close()
    flat[order] = out
    return {t: flat[off[i]:off[i + 1]].reshape(shapes[t]) for i, t in enumerate(TYPES)}


@functools.partial(jax.jit, static_argnames=("cfg", "kind"))
def _patch_one(cfg, params, cache, last, desired, undesired, values, kind, layer, unit):
    masks = {t: jnp.zeros(s, bool) for t, s in components.shapes(cfg).items()}
    masks[kind] = masks[kind].at[layer, unit].set(True)
    iv = Intervention(where=jnp.ones((last.shape[0], 1), bool), replace=values, replace_mask=masks)
    patched = logit_diff(_last(cfg, params, cache, last, iv).logits[:, 0], desired, undesired)
    return patched - logit_diff(_last(cfg, params, cache, last).logits[:, 0], desired, undesired)


def patch_one(cfg: ModelConfig, params, cache, last_tokens, desired, undesired, values: dict,
              kind: str, layer: int, unit: int) -> float:
    """One component patched on its own, no vmap (the plain reference for the vmapped path)."""
    return float(_patch_one(cfg, params, cache, last_tokens, desired, undesired, values, kind, layer, unit))


def attribution_effects(cfg: ModelConfig, params, cache, last_tokens, desired, undesired, values: dict,
                        clean: dict) -> dict:
    """First-order estimate of every patching effect from one forward and one backward:
    the gradient with respect to a zero ``add`` on every activation is dLD/d(activation),
    with every later component still computed (so indirect effects are included)."""

    def ld_of(add):
        iv = Intervention(where=jnp.ones((last_tokens.shape[0], 1), bool), add=add)
        return logit_diff(_last(cfg, params, cache, last_tokens, iv).logits[:, 0], desired, undesired)

    grads = jax.grad(ld_of)({k: jnp.zeros_like(v) for k, v in clean.items()})
    out = {}
    for t in TYPES:
        delta = (values[t] - clean[t]).astype(jnp.float32) * grads[t].astype(jnp.float32)
        # heads: sum over head_dim; then sum over examples (LD is already a batch mean)
        out[t] = np.asarray(delta.sum(axis=-1).sum(axis=1) if delta.ndim == 4 else delta.sum(axis=1))
    return out


def select(effects: dict, top_k: int | None = None, fraction: float | None = None, by: str = "neg") -> dict:
    """A binary mask of the ``top_k`` (or ``fraction`` of all) components by effect.

    by="neg": the components whose patching most lowers the logit difference (most
    needed for the desired token); "abs": the largest effects of either sign."""
    flat = np.concatenate([np.asarray(effects[t]).ravel() for t in TYPES])
    if (top_k is None) == (fraction is None):
        raise CCAError("select needs exactly one of top_k and fraction")
    k = int(top_k if top_k is not None else round(fraction * flat.size))
    k = max(0, min(k, flat.size))
    score = -flat if by == "neg" else np.abs(flat) if by == "abs" else None
    if score is None:
        raise CCAError(f"select by must be 'neg' or 'abs', got {by!r}")
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-score, kind="stable")[:k]] = True
    out, o = {}, 0
    for t in TYPES:
        n = np.asarray(effects[t]).size
        out[t] = keep[o:o + n].reshape(np.shape(effects[t]))
        o += n
    return out


def effects_over_examples(model, examples, method: str, mode: str = "mean", batch_size: int = 8,
                          chunk: int = 256, pad_token_id: int = 0, progress: bool = False) -> dict:
    """Effects averaged over batches of localization examples (example-weighted).

    method: "patching" (vmapped, exact) or "attribution" (first-order estimate).
    Counterfactual values are another example's activations in the same batch."""
    from cca_jax.cca.examples import batches

    if method not in ("patching", "attribution"):
        raise CCAError(f"method must be 'patching' or 'attribution', got {method!r}")
    cfg, stacked = model.config, model.params()
    params = unstack_layers(stacked)  # per-layer buffers for the one-token steps: see unstack_layers
    total, n = None, 0
    for b in batches(examples, batch_size, seed=0, pad=pad_token_id):
        cache = prefix_cache(cfg, stacked, jnp.asarray(b.tokens), jnp.asarray(b.mask))
        last, d, u = jnp.asarray(b.tokens[:, -1]), jnp.asarray(b.desired), jnp.asarray(b.undesired)
        clean = last_activations(cfg, params, cache, last)
        cf = {k: jnp.roll(v, 1, axis=1) for k, v in clean.items()} if mode == "counterfactual" else None
        values = patch_values(clean, mode, cf)
        if method == "patching":
            eff = patching_effects(cfg, params, cache, last, d, u, values, chunk=chunk, progress=progress)
        else:
            eff = attribution_effects(cfg, params, cache, last, d, u, values, clean)
        w = len(b.desired)
        total = {k: w * np.asarray(v) for k, v in eff.items()} if total is None else \
            {k: total[k] + w * np.asarray(eff[k]) for k in total}
        n += w
    return {k: v / n for k, v in total.items()}
