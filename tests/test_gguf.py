"""Real weights: SmolLM2-135M-Instruct GGUF against transformers' own GGUF loader."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import cca_jax
import tiny

PROMPTS = [
    "Q: Tom has 3 apples and buys 5 more. How many apples does he have?\nA: Let's think step by step.",
    "The capital of France is",
    "def fibonacci(n):",
    "As an expert problem solver, solve step by step the following mathematical questions.",
]


@pytest.fixture(scope="module")
def smollm2_path():
    return tiny.smollm2_path()


@pytest.fixture(scope="module")
def both(smollm2_path):
    ours, tok = cca_jax.load_model(smollm2_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    return ours, tok, ref, ref_tok


def test_config_from_gguf_metadata(both):
    ours, _, ref, _ = both
    cfg = ours.config
    assert (cfg.family, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("llama", 30, 9, 3, 64)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (576, 1536, 49152)
    assert cfg.tie_word_embeddings and cfg.rope.theta == ref.config.rope_parameters["rope_theta"]
    assert "lm_head" not in ours.params()


def test_logits_match_transformers_gguf_loader(both):
    ours, tok, ref, ref_tok = both
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        assert ids == ref_tok(prompt)["input_ids"]
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits.numpy()
        got = np.asarray(ours(jnp.asarray([ids])).logits)
        assert np.abs(got - want).max() <= 1e-3, prompt
        assert np.array_equal(got[0, -1].argmax(), want[0, -1].argmax())


def test_gguf_weights_equal_transformers_dequantized(both):
    """Tensor by tensor (q/k un-permuted as transformers does), for layers 0 and 29."""
    ours, _, ref, _ = both
    p = ours.params()
    sd = ref.state_dict()
    cfg = ours.config
    for layer in (0, 29):
        q = sd[f"model.layers.{layer}.self_attn.q_proj.weight"].numpy()
        np.testing.assert_array_equal(np.asarray(p["layers"]["attn"]["q"][layer]), q.T.reshape(576, 9, 64))
        k = sd[f"model.layers.{layer}.self_attn.k_proj.weight"].numpy()
        np.testing.assert_array_equal(np.asarray(p["layers"]["attn"]["k"][layer]), k.T.reshape(576, 3, 64))
        up = sd[f"model.layers.{layer}.mlp.up_proj.weight"].numpy()
        np.testing.assert_array_equal(np.asarray(p["layers"]["mlp"]["up"][layer]), up.T)
    assert cfg.num_components == 30 * (9 + 2 * 3 + 1536)


def test_greedy_generation_token_identical_to_transformers(both):
    """8 prompts of different lengths sharing a 2-shot context (the prefix cache path)."""
    from cca_jax.data.prompt import build_prompt
    from cca_jax.generate import common_prefix_len, generate

    ours, tok, ref, _ = both
    questions = ["Tom has 3 apples and buys 5 more. How many apples does he have?",
                 "A box holds 12 eggs. How many eggs are in 4 boxes?",
                 "Sara had 40 dollars and spent 15. How much is left?",
                 "What is 7 times 8?",
                 "A train travels 60 miles per hour for 3 hours. How far does it go?",
                 "Ben reads 20 pages a day. How many pages does he read in a week?",
                 "There are 9 birds on a tree and 4 fly away. How many birds are left?",
                 "Lily has twice as many marbles as Sam, who has 14. How many marbles do they have together?"]
    prompts = [tok(build_prompt(q, n_shots=2))["input_ids"] for q in questions]
    assert len({len(p) for p in prompts}) > 1 and common_prefix_len(prompts) > 50
    T = max(len(p) for p in prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    att = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        att[i, T - len(p):] = 1
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=att, max_new_tokens=24, do_sample=False,
                           eos_token_id=tok.eos_token_id, pad_token_id=pad)
    want = []
    for row in out[:, T:].tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id) + 1]
        want.append(row)
    got = generate(ours, prompts, 24, eos_token_id=tok.eos_token_id, pad_token_id=pad)
    assert got == want


def test_chat_template_prompt(both):
    from cca_jax.data.prompt import encode

    _, tok, _, _ = both
    plain = encode(tok, "What is 2 + 2?")
    chat = encode(tok, "What is 2 + 2?", chat_template=True)
    text = tok.decode(chat)
    assert "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")
    assert tok.decode(plain) in text and len(chat) > len(plain)


def test_tokenizer_from_the_parsed_reader_equals_transformers(both):
    """load_model parses the GGUF once and hands that reader to transformers' tokenizer
    converter: the same tokenizer as ``AutoTokenizer(gguf_file=...)``'s own parse."""
    _, tok, _, ref_tok = both
    assert type(tok) is type(ref_tok)
    assert tok.get_vocab() == ref_tok.get_vocab()
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.chat_template) == (
        ref_tok.bos_token, ref_tok.eos_token, ref_tok.pad_token, ref_tok.chat_template)
    text = "Janet's ducks lay 16 eggs. 16 - 3 - 4 = <<16-3-4=9>>9 \u00e9\u65e5 <|im_end|>\n#### 9"
    assert tok(text).input_ids == ref_tok(text).input_ids


def test_fast_reader_reads_what_gguf_reads(smollm2_path):
    """Our reader (plain-array slicing) against gguf's own: every field and tensor."""
    import gguf

    from cca_jax.weights import gguf as gguf_lib

    ours, theirs = gguf_lib.reader(smollm2_path), gguf.GGUFReader(str(smollm2_path))
    assert type(ours) is not gguf.GGUFReader  # the fast path is the one tested
    assert list(ours.fields) == list(theirs.fields)
    for name, f in theirs.fields.items():
        g = ours.fields[name]
        assert (g.offset, g.types, g.data) == (f.offset, f.types, f.data), name
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(g.parts, f.parts)), name
    assert [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in ours.tensors] == [
        (t.name, t.tensor_type, list(t.shape), t.data_offset) for t in theirs.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(ours.tensors, theirs.tensors))
