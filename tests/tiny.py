"""Shared test helpers: tiny random transformers models of every family (built in the
test process), localization examples and circuits for them, the tiny run config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

CONFIG = Path(__file__).parent.parent / "configs" / "tiny.yaml"  # the tiny random run
FAMILIES = ("llama", "qwen2", "gemma2", "gemma3", "olmo2")
VOCAB = 96
WINDOW = 4  # sliding window: tests use sequences longer than this


def hf_config(family: str, **over):
    common = dict(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    common.update(over)
    if family == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        c = transformers.LlamaConfig(**{"rope_parameters": rope, "tie_word_embeddings": False, **common})
    elif family == "qwen2":
        c = transformers.Qwen2Config(**{"rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
                                        "tie_word_embeddings": True, **common})
    elif family == "gemma2":
        c = transformers.Gemma2Config(**{
            "query_pre_attn_scalar": 24, "sliding_window": WINDOW, "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 3.0,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"], **common})
    elif family == "gemma3":
        rope = {"full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
        c = transformers.Gemma3TextConfig(**{
            "query_pre_attn_scalar": 16, "sliding_window": WINDOW, "rope_parameters": rope,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"], **common})
    elif family == "olmo2":
        c = transformers.Olmo2Config(**{"tie_word_embeddings": False, **common})
    else:
        raise ValueError(family)
    c._attn_implementation = "eager"
    return c


def hf_model(family: str, seed: int = 0, **over):
    """A transformers model with weights drawn large enough that every path matters."""
    cfg = hf_config(family, **over)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                base = 0.0 if family.startswith("gemma") else 1.0
                p.copy_(base + 0.2 * noise)
            else:
                p.copy_(0.15 * noise)
    return model.eval()


def tokens(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, VOCAB, size=(batch, length)).astype(np.int32)


def circuit_examples(n: int = 6, seed: int = 0):
    """Random localization examples (prefix 5-13 tokens, desired/undesired ids)."""
    from cca_jax.cca.examples import LocalizationExample

    rng = np.random.default_rng(seed)
    return [LocalizationExample(tuple(int(t) for t in rng.integers(3, VOCAB, int(rng.integers(5, 14)))),
                                int(rng.integers(3, VOCAB)), int(rng.integers(3, VOCAB)), 1, i)
            for i in range(n)]


def small_mask(cfg):
    """A circuit of one query head, one key head, one value head and one neuron."""
    from cca_jax.cca import components

    m = {k: np.zeros(s, bool) for k, s in components.shapes(cfg).items()}
    m["q"][0, 1] = m["k"][1, 0] = m["v"][2, 1] = m["mlp"][1, 3] = True
    return m
