"""Fused (flash) attention from tokamax for calls without a cache: the prefill and the
amplification step. Soft-capped, grouped-query and causal, forward and backward, without
materialising the (T, S) scores; on an H100/H200 tokamax runs its Mosaic GPU kernels, on a
TPU its Mosaic TPU ones, elsewhere its XLA reference.

Optional: ``pip install 'cca_jax[kernels]'``; ``attention: xla`` (the default) never
imports tokamax.
"""

from __future__ import annotations

import jax.numpy as jnp

from cca_jax import precision
from cca_jax.errors import CCAError
from cca_jax.model.attention import scores_mask


def import_tokamax():
    """The tokamax module, or a one-line CCAError saying how to install it."""
    try:
        import tokamax
    except ImportError as e:
        raise CCAError(f"attention: tokamax needs the tokamax package, which failed to import ({e}): "
                       "pip install 'cca_jax[kernels]', or set attention: xla") from e
    from absl import flags

    if not flags.FLAGS.is_parsed():
        # tokamax < 0.0.13 (the last for Python 3.11) parses the whole sys.argv as absl
        # flags on first use and raises on the host program's own (`--set`, pytest's -q);
        # mark them parsed (absl's defaults): later versions read only their own flags
        flags.FLAGS.mark_as_parsed()
    return tokamax


def attend_self(cfg, q, k, v, q_pos, k_pos, sliding, index_causal: bool, implementation: str = "auto",
                dense_mask: bool = True):
    """Causal attention over a call's own tokens. q (B,T,H,Dh), k/v (B,T,KV,Dh);
    q_pos (B,T) rope positions, k_pos (B,T) positions with -1 for padding; sliding: this
    layer uses the sliding window (a traced bool). Returns (B,T,H,Dh); rows of padding
    queries that see no key are 0, as in the XLA path.

    index_causal: causality also by index, so the kernel skips the blocks above the
    diagonal: exact when a later token never has an earlier position (default positions);
    otherwise the position mask alone decides. dense_mask=False (benchmarks only) drops
    the padding/window mask."""
    tokamax = import_tokamax()
    T = q.shape[1]
    mask = scores_mask(q_pos, k_pos, sliding, cfg)  # (B, T, S)
    seen = mask.any(-1)  # (B, T)
    # a query that sees no key (left padding) attends to itself instead, so that no row of
    # the kernel's softmax is empty (0/0); its output is zeroed below
    mask = mask | (jnp.eye(T, dtype=bool)[None] & ~seen[:, :, None])
    out = tokamax.dot_product_attention(
        q, k, v,
        mask=mask[:, None] if dense_mask else None,
        is_causal=index_causal,
        scale=cfg.scale,
        logits_soft_cap=cfg.attn_logit_softcap,
        precision=precision.of(q, k, v),  # float32: full float32 (the XLA reference's dots too)
        # None: tokamax tries its kernels for the platform in turn (Mosaic GPU on sm90+,
        # Mosaic TPU, Triton) and falls back to its XLA reference
        implementation=None if implementation == "auto" else implementation,
    )
    return jnp.where(seen[:, :, None, None], out, jnp.zeros((), out.dtype))
