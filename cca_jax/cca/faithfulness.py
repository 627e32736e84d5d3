"""Faithfulness of a circuit: how much of the model's logit difference at the pivots the
circuit alone carries.

Every component outside the circuit is mean-ablated at the pivotal (last) position, where
DCM's mask acts (so, like DCM's steps, the calls run that position alone on each batch's
prefix cache): its activation is replaced by its mean over all localization examples.
The fraction is LD(circuit only) / LD(full model), LD the mean logit difference
(desired - undesired) over the examples; LD with every component ablated is reported too
(what the fraction would be for an empty circuit).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cca_jax import mesh as mesh_lib
from cca_jax import timing
from cca_jax.cca import components, dcm
from cca_jax.cca.examples import LocalizationExample, batches as make_batches
from cca_jax.cca.objective import logit_diffs
from cca_jax.config import ModelConfig
from cca_jax.model.intervention import Intervention
from cca_jax.model.transformer import forward


def _last_token(cfg: ModelConfig, params, cache, last, desired, undesired, **kw):
    """The last position on top of the batch's prefix cache (exact: what DCM's steps run,
    sharing its compiled prefix-cache program): (logit differences (B,), the output)."""
    B = last.shape[0]
    ids = jnp.concatenate([desired, undesired])  # only the 2B logits read
    out = forward(cfg, params, last[:, None], cache=cache, at=jnp.zeros((B, 1), jnp.int32), vocab=ids, **kw)
    return logit_diffs(out.logits[:, 0].astype(jnp.float32), jnp.arange(B), jnp.arange(B, 2 * B)), out


@functools.partial(jax.jit, static_argnames=("cfg",))
def _clean(cfg: ModelConfig, params, cache, last, desired, undesired, weights):
    """(weighted sum of the logit differences, per component its weighted sum of
    activations); ``weights`` 0 on padded rows, so they add nothing to either."""
    ld, out = _last_token(cfg, params, cache, last, desired, undesired, collect=True)
    acts = {k: _row_sum(out.activations[k][:, :, 0].astype(jnp.float32), weights) for k in components.TYPES}
    return jnp.sum(weights * ld), acts


def _row_sum(acts, weights):
    """(layers, B, ...) -> (layers, ...): the sum over rows weighted by (B,) ``weights``."""
    return (acts * weights.reshape((1, -1) + (1,) * (acts.ndim - 2))).sum(axis=1)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _ablated(cfg: ModelConfig, params, cache, last, desired, undesired, weights, means, keep):
    iv = Intervention(where=jnp.ones((last.shape[0], 1), bool), replace=means,
                      replace_mask={k: ~v for k, v in keep.items()})
    return jnp.sum(weights * _last_token(cfg, params, cache, last, desired, undesired, intervention=iv)[0])


def faithfulness(model, examples: Sequence[LocalizationExample], mask: dict, batch_size: int = 8,
                 pad_token_id: int = 0) -> dict:
    """{"ld_full", "ld_circuit", "ld_all_ablated", "fraction"} for ``mask`` on ``examples``."""
    cfg, params = model.config, model.params()
    # padded to one row count (weight 0 on the added rows): one program per function
    bs = make_batches(examples, batch_size, seed=0, pad=pad_token_id, pad_rows=True)
    whole = mesh_lib.whole_rows(params)  # placed as DCM places its batches
    args = [tuple(mesh_lib.rows(x, params, whole=whole) for x in (b.tokens[:, -1], b.desired, b.undesired, b.weights))
            for b in bs]

    def caches():  # batch by batch, each dropped after its calls (made twice: never all alive)
        for b in bs:
            yield dcm.prefix_caches(cfg, params, [b], stacked=True)[0]

    # the batches' sums add up on the host (float32, in batch order, as on the device):
    # small eager device ops would each compile a program of their own
    clean = timing.fetch([_clean(cfg, params, c, *a) for c, a in zip(caches(), args)])
    n = len(examples)
    sums = {k: functools.reduce(np.add, (acts[k] for _, acts in clean)) for k in components.TYPES}
    means = {k: jnp.asarray((v / np.float32(n)).astype(model.dtype)) for k, v in sums.items()}
    # on the device once (a transfer, no program), not again with every batch's call
    keep = jax.device_put({k: np.asarray(mask[k]).astype(bool) for k in components.TYPES})
    none = jax.device_put({k: np.zeros(v.shape, bool) for k, v in keep.items()})
    ld_c, ld_0 = timing.fetch(tuple(zip(*[(_ablated(cfg, params, c, *a, means, keep),
                                            _ablated(cfg, params, c, *a, means, none))
                                           for c, a in zip(caches(), args)])))
    ld_full, ld_c, ld_0 = (float(np.sum(np.asarray(x, np.float32))) / n
                           for x in ([s for s, _ in clean], ld_c, ld_0))
    return {"ld_full": ld_full, "ld_circuit": ld_c, "ld_all_ablated": ld_0,
            "fraction": ld_c / ld_full if ld_full != 0 else None, "examples": n,
            "ablation": "mean over the examples, at the pivotal position"}
