"""config.from_hf: every attribute is read or known to leave the forward pass alone;
anything else is an error naming it. Mistral's sliding window covers every layer."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import cca_jax
import tiny
from cca_jax import config as config_lib
from cca_jax.errors import UnsupportedConfigError


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_every_family_config_is_fully_understood(family):
    assert config_lib.unknown_attributes(tiny.hf_config(family)) == []


def test_unknown_attributes_are_refused_by_name():
    raw = tiny.hf_config("llama").to_dict()
    raw["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    raw["use_swa_everywhere"] = True
    with pytest.raises(UnsupportedConfigError, match="quantization_config, use_swa_everywhere"):
        config_lib.from_hf(raw)
    cfg = config_lib.from_hf(raw, strict=False)  # the caller's choice
    assert cfg.family == "llama"
    # generation settings and bookkeeping of older config.json files are not errors
    raw = tiny.hf_config("qwen2").to_dict()
    raw.update(temperature=0.7, top_p=0.8, torch_dtype="bfloat16", transformers_version="4.43.1",
               architectures=["Qwen2ForCausalLM"], max_window_layers=21, rope_theta=1e6)
    assert config_lib.from_hf(raw).family == "qwen2"


def test_config_json_written_by_transformers_4_loads():
    """transformers 4.53 saves its base fields too (here as its GGUF converter wrote
    SmolLM2's config.json): token ids and flags no decoder forward reads."""
    raw = tiny.hf_config("llama").to_dict()
    raw.update(unk_token_id=0, sep_token_id=None, pruned_heads={}, is_decoder=False, add_cross_attention=False,
               torchscript=False, use_bfloat16=False, tie_encoder_decoder=False, finetuning_task=None, prefix=None,
               task_specific_params=None, tf_legacy_loss=False, cross_attention_hidden_size=None,
               _model_name_or_path="Smollm2 135M", transformers_version="4.53.0", torch_dtype="float32")
    assert config_lib.unknown_attributes(raw) == []
    assert config_lib.from_hf(raw).family == "llama"


def test_mistral_sliding_window_covers_every_layer_and_matches_transformers():
    hf_cfg = transformers.MistralConfig(vocab_size=tiny.VOCAB, hidden_size=48, intermediate_size=80,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=12, sliding_window=4, max_position_embeddings=64,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = config_lib.from_hf(hf_cfg)
    assert cfg.sliding_window == 4 and cfg.sliding_layers == (True, True)
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(0.15 * torch.randn(p.shape))
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model, _ = cca_jax.load_model(d, dtype="float32", with_tokenizer=False)
    ids = tiny.tokens(2, 11)  # longer than the window
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(ids)).logits)
    assert np.abs(ours - ref).max() <= 1e-4
    # without the window the logits differ: the window is really applied
    full = config_lib.from_hf({**hf_cfg.to_dict(), "sliding_window": None})
    assert full.sliding_window is None
    unwindowed = np.asarray(cca_jax.forward(full, model.params(), jnp.asarray(ids)).logits)
    assert np.abs(unwindowed - ref).max() > 1e-3
