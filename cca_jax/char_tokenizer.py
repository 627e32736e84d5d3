"""A character-level tokenizer for tiny random test models (no download, fixed size)."""

from __future__ import annotations

import string

SPECIALS = ["<pad>", "<unk>", "<eos>"]


def char_tokenizer(vocab_size: int = 128):
    """Printable ASCII + newline, padded with unused symbols to exactly ``vocab_size``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    vocab = SPECIALS + chars
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size must be >= {len(vocab)}")
    vocab += [f"<unused_{i}>" for i in range(vocab_size - len(vocab))]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
