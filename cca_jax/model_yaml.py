"""Architectures written as YAML: random-weight models of a real size (benchmarks, tests).

Keys are ModelConfig fields, plus ``sliding_pattern`` (a list repeated over the layers to
make ``sliding_layers``) and ``seed`` (the weights' PRNG seed). Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from cca_jax.config import ModelConfig, RopeConfig
from cca_jax.errors import CCAError

_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
_ROPE_FIELDS = {f.name for f in dataclasses.fields(RopeConfig)}


def read(path: str | Path) -> tuple[ModelConfig, int]:
    """(config, seed) from a model YAML file."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise CCAError(f"{path}: invalid YAML ({err})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise CCAError(f"{path}: expected a mapping of ModelConfig fields")
    raw = dict(raw)
    seed = int(raw.pop("seed", 0))
    pattern = raw.pop("sliding_pattern", None)
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise CCAError(f"{path}: unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(_FIELDS))}")
    if pattern is not None:
        n = int(raw["num_layers"])
        raw["sliding_layers"] = tuple(bool(pattern[i % len(pattern)]) for i in range(n))
    for key in ("rope", "rope_local"):
        if raw.get(key) is not None:
            bad = sorted(set(raw[key]) - _ROPE_FIELDS)
            if bad:
                raise CCAError(f"{path}: unknown {key} field(s) {', '.join(bad)}")
            raw[key] = RopeConfig(**raw[key])
    if "sliding_layers" in raw:
        raw["sliding_layers"] = tuple(raw["sliding_layers"])
    try:
        return ModelConfig(**raw), seed
    except TypeError as err:
        raise CCAError(f"{path}: {err}") from None
