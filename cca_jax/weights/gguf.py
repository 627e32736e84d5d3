"""GGUF files: config from the metadata, tensors dequantized with the ``gguf`` package.

Tensors are renamed to their Hugging Face names through the ``gguf`` package's own name
map and then go through the same table as safetensors checkpoints. Two fix-ups undo what
llama.cpp's converter does: llama-architecture q/k rows are permuted for its rotary layout,
and Gemma norm weights hold (1 + w).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cca_jax import config as config_lib
from cca_jax.config import ModelConfig
from cca_jax.errors import CCAError
from cca_jax.weights import mapping

# GGUF general.architecture -> transformers model_type
_ARCHS = {"llama": "llama", "qwen2": "qwen2", "gemma2": "gemma2", "gemma3": "gemma3_text", "olmo2": "olmo2"}
# metadata key (after "<arch>.") -> transformers config field
_KEYS = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.sliding_window": "sliding_window",
    "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping",
    "vocab_size": "vocab_size",
}


def _reader_class():
    """gguf's reader, parsing from a plain array view of its memory map: slicing a
    ``np.memmap`` runs ``__array_finalize__`` per slice, and a 150k-token vocabulary is
    millions of slices (42 s of a 110 s load of Qwen2.5-0.5B on 2 cores). Where gguf's
    private ``_get`` changes shape, its own class is used unchanged (only slower)."""
    import inspect

    import gguf

    base = gguf.GGUFReader
    if list(inspect.signature(base._get).parameters) != ["self", "offset", "dtype", "count", "override_order"]:
        return base

    class Reader(base):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None or plain.base is not self.data:
                plain = self._plain = self.data.view(np.ndarray)
            count = int(count)
            end = offset + np.dtype(dtype).itemsize * count
            arr = plain[offset:end].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return Reader


def reader(path: Path):
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise CCAError("reading .gguf files needs the gguf package: pip install gguf") from None
    try:
        return _reader_class()(str(path))
    except Exception as err:
        raise CCAError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def hf_config(reader, path: Path):
    """A transformers config for the GGUF's model (the same defaults transformers uses)."""
    import transformers

    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise CCAError(
            f"{path}: unsupported GGUF architecture {arch!r}: supported are {', '.join(_ARCHS)}"
        )
    kw: dict[str, Any] = {}
    for key, field in _KEYS.items():
        v = _field(reader, f"{arch}.{key}")
        if v is not None:
            kw[field] = v
    if "vocab_size" not in kw:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise CCAError(f"{path}: no {arch}.vocab_size and no tokenizer.ggml.tokens: cannot tell the vocabulary size")
        kw["vocab_size"] = len(tokens.data)
    if arch == "llama" and "head_dim" not in kw:
        dim = _field(reader, "llama.rope.dimension_count")
        if dim:
            kw["head_dim"] = dim
    config_lib.check_hf_sizes(kw, str(path))  # before transformers builds per-layer lists
    rope = {"rope_type": "default", "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0))}
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise CCAError(f"{path}: unsupported GGUF rope scaling {scaling!r}")
        rope.update(rope_type="linear", factor=float(_field(reader, f"{arch}.rope.scaling.factor")))
    if arch == "gemma3":
        local = {"rope_type": "default", "rope_theta": 10000.0}
        kw["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
    else:
        kw["rope_parameters"] = rope
    for key, field in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                       ("padding_token_id", "pad_token_id")):
        v = _field(reader, f"tokenizer.ggml.{key}")
        if v is not None:
            kw[field] = int(v)
    names = {t.name for t in reader.tensors}
    kw["tie_word_embeddings"] = "output.weight" not in names
    try:
        return transformers.AutoConfig.for_model(_ARCHS[arch], **kw), arch
    except Exception as err:  # transformers' own validation, its lines joined into one
        why = " ".join(str(err).split())[:400]
        raise CCAError(f"{path}: transformers rejects this model's metadata ({type(err).__name__}: {why})") from None


def read_config(path: Path) -> tuple[ModelConfig, Any]:
    hf_cfg, _ = hf_config(reader(path), path)
    return config_lib.from_hf(hf_cfg), hf_cfg


def _hf_name(names: dict[str, str], t, arch: str, path: Path) -> str:
    hf_name = names.get(t.name)
    if hf_name is None:
        raise CCAError(
            f"{path}: unknown GGUF tensor {t.name!r} for a {arch} model: the file is a variant "
            f"this loader does not support"
        )
    return hf_name


def tensor_shapes(reader, cfg: ModelConfig, arch: str, path: Path) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every GGUF tensor from the header (nothing dequantized). GGUF
    lists dimensions fastest first; reversed, they are the HF (numpy) order that
    ``iter_tensors`` yields."""
    names = mapping.gguf_names(cfg, arch)
    for t in reader.tensors:
        yield _hf_name(names, t, arch, path), tuple(int(n) for n in reversed(t.shape))


def _dequantized(t, cfg: ModelConfig, arch: str) -> np.ndarray:
    import gguf

    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    fix = fixup(t.name, arch)
    return undo_fixup(w[None], fix, fixup_heads(cfg, fix))[0]


def iter_tensors(reader, cfg: ModelConfig, arch: str, path: Path,
                 workers: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 tensor) for every GGUF tensor in file order, dequantized on
    ``workers`` threads (numpy releases the GIL in the block arithmetic), at most
    2 x workers tensors ahead of the consumer so memory stays bounded."""
    import collections
    from concurrent.futures import ThreadPoolExecutor

    names = mapping.gguf_names(cfg, arch)
    todo = [(_hf_name(names, t, arch, path), t) for t in reader.tensors]  # names checked first
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        ahead: collections.deque = collections.deque()
        it = iter(todo)
        for name, t in itertools.islice(it, 2 * workers):
            ahead.append((name, pool.submit(_dequantized, t, cfg, arch)))
        while ahead:
            name, fut = ahead.popleft()
            nxt = next(it, None)
            if nxt is not None:
                ahead.append((nxt[0], pool.submit(_dequantized, nxt[1], cfg, arch)))
            yield name, fut.result()


@contextlib.contextmanager
def _parsed_once(path: Path, parsed):
    """While transformers builds the tokenizer, its ``gguf.GGUFReader(path)`` gets the
    reader we already parsed (the same fields, so the same tokenizer), not a second parse
    of the whole vocabulary. Any other file is read as usual."""
    import gguf

    if parsed is None:
        yield
        return
    original = gguf.GGUFReader
    target = os.path.realpath(path)

    def reuse(p, *args, **kwargs):
        if not args and not kwargs and os.path.realpath(p) == target:
            return parsed
        return original(p, *args, **kwargs)

    gguf.GGUFReader = reuse
    try:
        yield
    finally:
        gguf.GGUFReader = original


def load_tokenizer(path: Path, parsed=None):
    """transformers' tokenizer for the GGUF (``AutoTokenizer(gguf_file=...)``); ``parsed``,
    this file's reader if one is at hand, saves parsing the metadata again."""
    import transformers

    try:
        with _parsed_once(path, parsed):
            return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception:  # tokenizers without a transformers converter: model still usable
        return None


def fixup(name: str, arch: str) -> str | None:
    """What llama.cpp's converter did to this GGUF tensor that the loader undoes:
    "unpermute_q"/"unpermute_k" (llama's rotary row order), "minus_one" (Gemma's 1 + w norms)."""
    if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
        return "unpermute_q" if "attn_q" in name else "unpermute_k"
    if arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):
        return "minus_one"
    return None


def fixup_heads(cfg: ModelConfig, fix: str | None) -> int:
    """The head count a q/k un-permute splits rows by."""
    return cfg.num_kv_heads if fix == "unpermute_k" else cfg.num_heads


def undo_fixup(x, fix: str | None, heads: int):
    """``x`` (n, *hf_shape), numpy or jax: undo ``fixup``'s change on each of n tensors.
    The un-permute turns llama.cpp's rotary row order back into rotate-half."""
    if fix == "minus_one":
        return x - 1.0
    if fix in ("unpermute_q", "unpermute_k"):
        n, rows = x.shape[:2]
        if rows % (2 * heads):
            return x  # a wrong shape, which the checks name
        dim = rows // heads // 2
        return x.reshape(n, heads, dim, 2, *x.shape[2:]).swapaxes(2, 3).reshape(x.shape)
    return x


def records(reader, cfg: ModelConfig, arch: str, path: Path) -> list[dict] | None:
    """Where every tensor's bytes are in the file: HF name, GGML format, HF-order shape,
    byte offset and length, fix-up. None for a big-endian file (read by the host path)."""
    if getattr(reader, "byte_order", "I") != "I":
        return None
    names = mapping.gguf_names(cfg, arch)
    return [{"name": _hf_name(names, t, arch, path), "format": t.tensor_type.name,
             "shape": [int(n) for n in reversed(t.shape)], "offset": int(t.data_offset),
             "nbytes": int(t.n_bytes), "fixup": fixup(t.name, arch)} for t in reader.tensors]
