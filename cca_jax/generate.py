"""Batched generation: prefill, then a compiled decode loop over a static-shape KV cache.

``generate`` takes token-id lists and returns the generated token ids exactly as
generated (never decoded and re-tokenized). Prompts of different lengths share a batch
through left padding. When every prompt starts with the same context (a few-shot
prompt), that context is encoded once and its cache reused for every batch.

The decode loop runs ``chunk`` steps per compiled call; between calls the host checks the
per-sequence stop rule (e.g. "the answer sentence is complete") on the tokens so far and
ends finished rows, so a batch stops as soon as all its rows have stopped. While no row
has finished, the next chunk is sent before the last one's tokens are read, so the device
never waits for the host between chunks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cca_jax.config import ModelConfig
from cca_jax.errors import CCAError
from cca_jax.model.cache import KVCache, init_cache
from cca_jax.model.transformer import forward, unstack_layers

# A stop rule sees one row's generated ids and returns how many to keep, or None to go on.
StopRule = Callable[[Sequence[int]], "int | None"]


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise CCAError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise CCAError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise CCAError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: jax.Array, s: Sampling) -> jax.Array:
    """Temperature, then top-k, then top-p (transformers' order and definitions).

    Removed tokens get -inf. top-k keeps the k largest logits (ties at the k-th kept);
    top-p keeps the smallest set of most likely tokens whose probability reaches p.
    """
    x = logits.astype(jnp.float32)
    if s.temperature > 0:
        x = x / s.temperature
    if s.top_k is not None and s.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, s.top_k)[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if s.top_p is not None and s.top_p < 1.0:
        order = jnp.argsort(x, axis=-1)  # ascending, as transformers does
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_x, axis=-1), axis=-1)
        remove_sorted = cum <= (1.0 - s.top_p)
        remove_sorted = remove_sorted.at[..., -1].set(False)  # keep at least one
        remove = jnp.zeros_like(remove_sorted).at[
            jnp.arange(x.shape[0])[:, None], order].set(remove_sorted)
        x = jnp.where(remove, -jnp.inf, x)
    return x


def next_token(key: jax.Array, logits: jax.Array, s: Sampling) -> jax.Array:
    if s.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, s), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _prefill(cfg: ModelConfig, params, tokens, mask, cache):
    last = jnp.full((tokens.shape[0], 1), tokens.shape[1] - 1)
    out = forward(cfg, params, tokens, mask=mask, cache=cache, at=last)
    return out.logits[:, 0], out.cache


# decode steps write each token's keys/values into the cache before attending (one
# softmax over the buffer, fewer kernels per layer than reading it as a constant)
DECODE_WRITE_FIRST = True
# generate sends the next decode chunk before reading the last one's tokens (see generate)
DECODE_AHEAD = True


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "sampling"), donate_argnames=("cache",))
def _decode(cfg: ModelConfig, params, cache: KVCache, logits, done, key, eos, pad, steps: int, sampling: Sampling):
    """``steps`` decode steps. Finished rows emit ``pad`` and are masked out of the cache."""

    def step(carry, _):
        cache, logits, done, key = carry
        key, sub = jax.random.split(key)
        tok = next_token(sub, logits, sampling)
        tok = jnp.where(done, pad, tok)
        emitted_done = done
        done = done | jnp.isin(tok, eos)
        out = forward(cfg, params, tok[:, None], mask=~emitted_done[:, None], cache=cache,
                      at=jnp.zeros((tok.shape[0], 1), jnp.int32), write_first=DECODE_WRITE_FIRST)
        return (out.cache, out.logits[:, 0], done, key), tok

    (cache, logits, done, key), toks = jax.lax.scan(step, (cache, logits, done, key), None, length=steps)
    return cache, logits, done, key, toks.T


def _bucket(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


def _left_pad(rows: Sequence[Sequence[int]], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    toks = np.full((len(rows), length), pad, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        if len(r):
            toks[i, length - len(r):] = r
            mask[i, length - len(r):] = True
    return toks, mask


def common_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix shared by all prompts, leaving each at least one token."""
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


@functools.partial(jax.jit, static_argnames=("batch",))
def _tile_cache(cache: KVCache, batch: int) -> KVCache:
    return KVCache(
        k=tuple(jnp.repeat(k, batch, axis=0) for k in cache.k), v=tuple(jnp.repeat(v, batch, axis=0) for v in cache.v),
        pos=jnp.repeat(cache.pos, batch, axis=0), index=cache.index,
    )


def stop_ids(model, tokenizer=None) -> list[int]:
    """EOS ids of the model config and the tokenizer together."""
    eos = model.config.eos_token_id
    ids = set([eos] if isinstance(eos, int) else list(eos or ()))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _eos_ids(model, eos) -> np.ndarray:
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        eos = ()
    ids = [eos] if isinstance(eos, int) else list(eos)
    return np.asarray(ids or [-1], np.int32)


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop: StopRule | None = None,
    key: jax.Array | None = None,
    *,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    batch_size: int = 32,
    chunk: int = 32,
    share_prefix: bool = True,
    min_shared_prefix: int = 8,
    progress: bool = False,
    on_batch: Callable[[list[int], list[list[int]]], None] | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` for each prompt (lists of token ids).

    Rows end at an EOS token (kept, as transformers does), when ``stop`` says so (cut to
    what it keeps), or at ``max_new_tokens``. Sampling with a fixed ``key`` is reproducible
    for the same prompts and batch size. Returns the generated ids per prompt, in order.
    ``on_batch(indices, outputs)`` is called as each batch finishes (progress, scoring).
    """
    sampling = Sampling(temperature, top_k, top_p)
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise CCAError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise CCAError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if sampling.temperature > 0 and key is None:
        raise CCAError("sampling (temperature > 0) needs an explicit PRNG key: key=jax.random.key(seed)")
    key = key if key is not None else jax.random.key(0)
    # stacked weights for prefills (one scanned block), per-layer buffers for the
    # memory-bound decode steps (see unstack_layers)
    cfg, stacked = model.config, model.params()
    params = unstack_layers(stacked)
    dtype = model.dtype
    eos = jnp.asarray(_eos_ids(model, eos_token_id))

    shared = common_prefix_len(prompts) if share_prefix and len(prompts) > 1 else 0
    if shared < min_shared_prefix:
        shared = 0
    # the cache layout every batch shares: [shared prefix | padded suffixes | new tokens]
    suffix_len = _bucket(max(len(p) - shared for p in prompts), 16)
    size = _bucket(shared + suffix_len + max_new_tokens, 128)
    prefix_cache = None
    if shared:
        c = init_cache(cfg, 1, size, dtype)
        _, prefix_cache = _prefill(cfg, stacked, jnp.asarray([prompts[0][:shared]], jnp.int32),
                                   jnp.ones((1, shared), bool), c)

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # less padding per batch
    results: list[list[int] | None] = [None] * len(prompts)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc="generate", unit="seq")
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        rows = [prompts[i][shared:] for i in idx]
        n = len(rows)
        if n < batch_size and len(order) > batch_size:  # keep one compiled shape: pad rows
            rows = rows + [rows[-1]] * (batch_size - n)
        toks, mask = _left_pad(rows, suffix_len, pad_token_id)
        cache = _tile_cache(prefix_cache, len(rows)) if shared else init_cache(cfg, len(rows), size, dtype)
        logits, cache = _prefill(cfg, stacked, jnp.asarray(toks), jnp.asarray(mask), cache)
        out = np.zeros((len(rows), 0), np.int32)
        stopped = np.zeros(len(rows), bool)
        keep = [None] * len(rows)
        key, batch_key = jax.random.split(key)
        sent = 0  # decode steps dispatched so far

        def launch(cache, logits, done, batch_key):
            nonlocal sent
            steps = min(chunk, max_new_tokens - sent)
            sent += steps
            if stopped.any():  # rows the stop rule ended
                done = done | jnp.asarray(stopped)
            return _decode(cfg, params, cache, logits, done, batch_key, eos, pad_token_id, steps, sampling)

        pending = launch(cache, logits, jnp.zeros((len(rows),), bool), batch_key)
        any_done = False
        while pending is not None:
            cache, logits, done, batch_key, new = pending
            pending = None
            # while no row has finished, the next chunk is sent before this one's tokens are
            # read, so the device does not wait for the host between chunks (once rows
            # finish, a chunk sent ahead could be wasted work: then one at a time)
            if DECODE_AHEAD and not any_done and sent < max_new_tokens:
                pending = launch(cache, logits, done, batch_key)
            out = np.concatenate([out, np.asarray(new)], axis=1)
            done_host = np.asarray(done)
            if stop is not None:
                for r in range(n):
                    if not stopped[r]:
                        k = stop(_row(out[r], np.asarray(eos)))
                        if k is not None:
                            stopped[r], keep[r] = True, k
            finished = done_host | stopped
            any_done = bool(finished[:n].any())
            if finished[:n].all():
                break
            if pending is None and sent < max_new_tokens:
                pending = launch(cache, logits, done, batch_key)
        for r, i in enumerate(idx):
            seq = _row(out[r], np.asarray(eos))
            results[i] = list(seq[:keep[r]] if keep[r] is not None else seq)
        if on_batch is not None:
            on_batch(list(idx), [results[i] for i in idx])
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


def _row(tokens: np.ndarray, eos: np.ndarray) -> list[int]:
    """A row's ids up to and including its first EOS."""
    hits = np.nonzero(np.isin(tokens, eos))[0]
    end = int(hits[0]) + 1 if len(hits) else len(tokens)
    return [int(t) for t in tokens[:end]]
