"""The decoder: pure functions over parameter pytrees, wrapped in a Flax NNX module."""

from cca_jax.model.cache import KVCache, init_cache
from cca_jax.model.intervention import Intervention
from cca_jax.model.transformer import ForwardOutput, Transformer, forward, init_params

__all__ = ["ForwardOutput", "Intervention", "KVCache", "Transformer", "forward", "init_cache", "init_params"]
