"""Float32 means float32. On NVIDIA GPUs from Ampere on, JAX computes float32 matrix
products in TF32 by default (inputs rounded to a 10-bit mantissa). A "float32" run there
would then differ from the CPU, from transformers and the original PyTorch release (which
keep full float32 matmuls by default), and from itself on another mesh: sampled pivots
diverged between one and two H200s (BENCHMARKS.md, eighth session). Runs in float32
therefore trace their programs with full-precision matmuls, unless the user chose a
precision (``JAX_DEFAULT_MATMUL_PRECISION`` or ``jax.config``)."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp


def for_dtype(dtype):
    """A context for computing with a model of ``dtype``: ``jax.default_matmul_precision
    ("highest")`` for float32 when no precision is set, else nothing ("auto": nothing).
    JAX keys its compiled programs on this setting, so programs traced inside and outside
    never mix (and a program used on both sides compiles twice)."""
    if isinstance(dtype, str) and dtype == "auto":  # not known before the model loads
        return contextlib.nullcontext()
    if jnp.dtype(dtype) != jnp.float32 or jax.config.jax_default_matmul_precision is not None:
        return contextlib.nullcontext()
    return jax.default_matmul_precision("highest")
