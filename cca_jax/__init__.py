"""cca_jax: Constructive Circuit Amplification in JAX."""

import time as _time

IMPORTED_AT = _time.perf_counter()  # a run's summary counts its start-up from here (wall_seconds)

from cca_jax import xla_flags as _xla_flags

_xla_flags.apply()  # before JAX starts a backend (see cca_jax/xla_flags.py)

from cca_jax.cca.circuit import apply_updates as apply_circuit_updates  # noqa: E402 (flags first)
from cca_jax.cca.circuit import circuit_optimizer, circuit_value_and_grad
from cca_jax.config import ModelConfig
from cca_jax.errors import CCAError
from cca_jax.load import export_hf, load_model, restore_checkpoint, save_checkpoint
from cca_jax.model import ForwardOutput, Intervention, KVCache, Transformer, forward, init_cache, init_params
from cca_jax.weights.sharding import make_mesh, shard_params

from cca_jax.version import VERSION as __version__  # noqa: E402, F401 (the package version)

__all__ = [
    "CCAError", "ForwardOutput", "Intervention", "KVCache", "ModelConfig", "Transformer",
    "apply_circuit_updates", "circuit_optimizer", "circuit_value_and_grad", "export_hf", "forward", "init_cache", "init_params", "load_model", "make_mesh",
    "restore_checkpoint", "save_checkpoint", "shard_params",
]
