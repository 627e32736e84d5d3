"""cca_jax's XLA flag defaults: added at import, never over a user's own setting."""

import os
import subprocess
import sys

from cca_jax import xla_flags


def test_the_defaults_are_added_unless_the_user_set_them_or_opted_out():
    env = {}
    assert xla_flags.apply(env) == list(xla_flags.FLAGS) and env["XLA_FLAGS"] == " ".join(xla_flags.FLAGS)
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/d"}
    xla_flags.apply(env)
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/d --xla_gpu_enable_triton_gemm=false"
    assert xla_flags.apply(env) == [] and env["XLA_FLAGS"].count("triton_gemm") == 1  # applied once
    env = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"}  # the user's value stays
    assert xla_flags.apply(env) == [] and env["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=true"
    env = {"CCA_JAX_XLA_DEFAULTS": "0"}
    assert xla_flags.apply(env) == [] and "XLA_FLAGS" not in env


def test_importing_cca_jax_sets_them_before_jax_starts_and_jax_accepts_them():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "CCA_JAX_XLA_DEFAULTS")}
    code = "import os, cca_jax, jax.numpy as jnp; print(int(jnp.ones(3).sum()), os.environ['XLA_FLAGS'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-1500:]
    assert out.stdout.split() == ["3", "--xla_gpu_enable_triton_gemm=false"]
