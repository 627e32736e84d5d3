"""Float32 means float32. On NVIDIA GPUs from Ampere on, JAX computes float32 matrix
products in TF32 by default (inputs rounded to a 10-bit mantissa). A "float32" run there
would then differ from the CPU, from transformers and the original PyTorch release (which
keep full float32 matmuls by default), and from itself on another mesh: sampled pivots
diverged between one and two H200s (BENCHMARKS.md, eighth session).

The model's own matrix products (projections, attention, the output head) therefore take
their precision from their operands' dtype (``of``): float32 operands ask for full
precision, whoever calls the model (``forward``, ``generate``, patching, DCM, amplify,
the lm-eval adapter) and with no context needed. Half-precision products keep JAX's
default (their programs are unchanged), and a precision the user chose
(``JAX_DEFAULT_MATMUL_PRECISION`` or ``jax.config``) always stands. ``for_dtype`` is
the same choice as a context, for products the model code does not own: the pipeline
and a few CLI commands run their stages inside it."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp


def of(*arrays):
    """The ``precision=`` for a matrix product of ``arrays``: ``Precision.HIGHEST`` when
    all are float32 and the user has set no precision, else None (JAX's default or the
    user's choice). Read at trace time; JAX keys its compiled programs on the setting."""
    if jax.config.jax_default_matmul_precision is not None:
        return None
    if arrays and all(jnp.dtype(a.dtype) == jnp.float32 for a in arrays):
        return jax.lax.Precision.HIGHEST
    return None


def for_dtype(dtype):
    """A context for computing with a model of ``dtype``: ``jax.default_matmul_precision
    ("highest")`` for float32 when no precision is set, else nothing ("auto": nothing).
    The model's own products carry their precision already (``of``); this covers any
    product computed outside the model code. JAX keys its compiled programs on this
    setting, so programs traced inside and outside never mix (and a program used on both
    sides compiles twice)."""
    if isinstance(dtype, str) and dtype == "auto":  # not known before the model loads
        return contextlib.nullcontext()
    if jnp.dtype(dtype) != jnp.float32 or jax.config.jax_default_matmul_precision is not None:
        return contextlib.nullcontext()
    return jax.default_matmul_precision("highest")
