"""XLA flags cca_jax sets before JAX starts its backends (at ``import cca_jax``).

``--xla_gpu_enable_triton_gemm=false``: XLA:GPU then hands matrix products to cuBLAS
instead of generating and autotuning Triton kernels for each product it fuses. On an
H200 this halves the compile time of the run's largest programs (bench/compile_probe.py:
27.3 -> 13.3 s; amplification's gradient 18.3 -> 6.7 s) at the same speed (prefill,
amplification) or 5% slower (a decode chunk), so a first run is a minute faster. Other
backends ignore the flag.

A flag the user already put in ``XLA_FLAGS`` (either value) is left alone;
``CCA_JAX_XLA_DEFAULTS=0`` keeps XLA's own defaults. Setting the variable has no effect
once JAX has started its backends (a program that computed with JAX before importing
cca_jax keeps the flags it started with).
"""

from __future__ import annotations

import os
from typing import MutableMapping

FLAGS = ("--xla_gpu_enable_triton_gemm=false",)


def apply(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Add ``FLAGS`` to ``environ["XLA_FLAGS"]`` where the user set none of them: the added ones."""
    if environ.get("CCA_JAX_XLA_DEFAULTS", "1").strip() == "0":
        return []
    have = environ.get("XLA_FLAGS", "")
    names = {f.split("=")[0] for f in have.split()}
    added = [f for f in FLAGS if f.split("=")[0] not in names]
    if added:
        environ["XLA_FLAGS"] = " ".join([have, *added]).strip()
    return added
