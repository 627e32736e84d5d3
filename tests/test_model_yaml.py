"""Architectures as YAML: random-weight models of real sizes for benchmarks."""

import dataclasses
from pathlib import Path

import pytest
import transformers

import cca_jax
from cca_jax import config as config_lib
from cca_jax import model_yaml
from cca_jax.errors import CCAError

CONFIGS = Path(__file__).parent.parent / "configs" / "models"


def test_gemma_2_2b_yaml_is_the_transformers_gemma2_default():
    """transformers' Gemma2Config() defaults are gemma-2-2b's architecture."""
    ours, _ = model_yaml.read(CONFIGS / "gemma-2-2b.yaml")
    ref = config_lib.from_hf(transformers.Gemma2Config())
    ignore = {"max_position_embeddings"}
    for f in dataclasses.fields(ours):
        if f.name not in ignore:
            assert getattr(ours, f.name) == getattr(ref, f.name), f.name
    assert ours.num_components == 26 * (8 + 2 * 4 + 9216)  # SPEC sizes


def test_gemma_2_9b_sizes():
    cfg, _ = model_yaml.read(CONFIGS / "gemma-2-9b.yaml")
    assert cfg.num_components == 42 * (16 + 2 * 8 + 14336)


def test_yaml_model_loads_with_seeded_weights():
    a, tok = cca_jax.load_model(CONFIGS / "tiny-llama.yaml")
    b, _ = cca_jax.load_model(CONFIGS / "tiny-llama.yaml")
    assert tok is None
    import numpy as np
    np.testing.assert_array_equal(np.asarray(a.params()["embed"]), np.asarray(b.params()["embed"]))


def test_unknown_yaml_field(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text((CONFIGS / "tiny-llama.yaml").read_text() + "num_expertz: 4\n")
    with pytest.raises(CCAError, match="unknown field\\(s\\) num_expertz"):
        model_yaml.read(p)
