"""Batched continuation log-likelihoods on top of a shared-prefix KV cache.

A request is a ``(context_ids, continuation_ids)`` pair that follows a prefix every request
shares (a few-shot context). The prefix is encoded once into a KV cache; each batch tiles
that cache and runs only the requests' own tokens, reading the log-probabilities of the
continuation tokens (logits only at those positions, never the full (T, V) matrix).

Requests whose input rows are identical (the same context with different one-token
continuations, e.g. MMLU's " A".." D") share one row. Shapes are bucketed (batch, row
length, read-out positions, cache size) so a run compiles only a handful of programs.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cca_jax import mesh as mesh_lib
from cca_jax import timing
from cca_jax.config import ModelConfig
from cca_jax.errors import CCAError
from cca_jax.generate import common_prefix_len
from cca_jax.model.cache import init_cache, tile_cache
from cca_jax.model.prefill import left_pad, prefill
from cca_jax.model.transformer import forward

Pair = tuple[Sequence[int], Sequence[int]]


def bucket(n: int, minimum: int = 16) -> int:
    """The smallest of minimum * {1, 1.5, 2, 3, 4, 6, 8, ...} (rounded up to 8) that holds n."""
    size = minimum
    while size < n:
        half = size + size // 2
        size = half if half >= n and half % 8 == 0 else size * 2
    return size


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score(cfg: ModelConfig, params, tokens, mask, cache, at, targets):
    """log p(targets) read at positions ``at`` (B, P) of ``tokens``; and whether each is the argmax."""
    logits = forward(cfg, params, tokens, mask=mask, cache=cache, at=at).logits  # (B, P, V)
    logp = jax.nn.log_softmax(logits, axis=-1)
    got = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return got, jnp.argmax(logits, axis=-1) == targets


def encode_pairs(tokenizer, contexts: Sequence[str], continuations: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """Token ids of (context, continuation) text pairs, as the evaluation harness does it:
    encode context + continuation whole and split at the context's length (so " A" after
    "Answer:" gets the token it gets in running text), falling back to a separate encoding
    when the whole does not start with the context's tokens."""
    unique = list(dict.fromkeys(contexts))
    ids = dict(zip(unique, tokenizer(unique)["input_ids"])) if unique else {}
    whole = tokenizer([c + x for c, x in zip(contexts, continuations)])["input_ids"] if unique else []
    out = []
    for text, w, x in zip(contexts, whole, continuations):
        c, w = list(ids[text]), list(w)
        if len(w) > len(c) and w[: len(c)] == c:
            out.append((c, w[len(c):]))
        else:
            out.append((c, list(tokenizer(x, add_special_tokens=False)["input_ids"])))
    return out


def shared_prefix(sequences: Sequence[Sequence[int]], min_len: int = 8) -> int:
    """How many leading tokens all sequences share (each keeps at least one of its own);
    0 when fewer than ``min_len``."""
    if not sequences:
        return 0
    n = common_prefix_len(sequences)
    return n if n >= min_len else 0


def _rows(pairs):
    """One row per distinct input (context + continuation[:-1]): (rows, per row its
    (position, target) read-outs, per pair (row, first read-out, how many))."""
    rows: list[list[int]] = []
    row_of: dict[tuple, int] = {}
    entries: list[list[tuple[int, int]]] = []
    where: list[tuple[int, int, int]] = []
    for c, x in pairs:
        row = c + x[:-1]
        r = row_of.setdefault(tuple(row), len(rows))
        if r == len(rows):
            rows.append(row)
            entries.append([])
        where.append((r, len(entries[r]), len(x)))
        entries[r].extend((len(c) - 1 + j, t) for j, t in enumerate(x))
    return rows, entries, where


def _prefix_cache(model, params, prefix, size, pad_token_id):
    """The shared prefix's one-row cache (right-padded: padding slots hold position -1)."""
    cfg, dtype = model.config, model.dtype
    prefix_len = bucket(len(prefix))
    toks = np.full((1, prefix_len), pad_token_id, np.int32)
    toks[0, : len(prefix)] = prefix
    mask = np.zeros((1, prefix_len), bool)
    mask[0, : len(prefix)] = True
    cs = mesh_lib.cache_sharding(params, 1, cfg.num_kv_heads)
    return prefill(cfg, params, jnp.asarray(toks), jnp.asarray(mask), init_cache(cfg, 1, size, dtype, cs))[1]


def _batch_arrays(rows, entries, idx, b, pad_token_id):
    """A batch of ``b`` rows (the last repeated) left-padded: tokens, mask, read-out
    positions and their targets."""
    batch = [rows[r] for r in idx] + [rows[idx[-1]]] * (b - len(idx))
    T = bucket(max(len(x) for x in batch))
    P = _pow2(max(len(entries[r]) for r in idx))
    toks, mask = left_pad(batch, T, pad_token_id)
    at = np.zeros((b, P), np.int32)
    tgt = np.zeros((b, P), np.int32)
    for i, r in enumerate(idx):
        off = T - len(rows[r])
        for j, (p, t) in enumerate(entries[r]):
            at[i, j], tgt[i, j] = off + p, t
    return toks, mask, at, tgt


def continuation_logprobs(
    model,
    prefix_ids: Sequence[int],
    pairs: Sequence[Pair],
    *,
    batch_size: int = 16,
    pad_token_id: int = 0,
    with_greedy: bool = False,
    max_slots: int = 1 << 15,
    progress=False,
    desc: str = "loglik",
):
    """Per pair, the log-probabilities of the continuation tokens given prefix + context.

    ``prefix_ids + context + continuation`` is the scored text; ``sum(result[i])`` is the
    continuation's log-likelihood. The prefix is encoded once and its KV cache reused for
    every batch. ``max_slots`` bounds batch x cache length (memory): long prompts run in
    smaller batches. ``progress``: True for a tqdm bar, or an open bar to advance (by pairs).
    Returns ``list[list[float]]``; with ``with_greedy`` also, per pair, whether every
    continuation token is the argmax (the harness's ``is_greedy``).
    """
    prefix = [int(t) for t in prefix_ids]
    pairs = [([int(t) for t in c], [int(t) for t in x]) for c, x in pairs]
    if any(not x for _, x in pairs):
        raise CCAError("every continuation needs at least one token")
    if not pairs:
        return ([], []) if with_greedy else []
    if any(not c for c, _ in pairs):
        if not prefix:
            raise CCAError("a continuation needs a context or prefix token before it")
        # the prefix's last token goes back into every row: its logits score the first token
        prefix, pairs = prefix[:-1], [([prefix[-1], *c], x) for c, x in pairs]
    rows, entries, where = _rows(pairs)
    params = model.params()
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
    size = bucket(bucket(len(prefix)) + bucket(len(rows[order[0]])), 128) if prefix else 0
    # rows per batch: batch_size, fewer when the cache is long (memory), a power of two
    # when there are fewer rows than that (one compiled shape per size)
    b = min(batch_size, max(1, max_slots // max(size, bucket(len(rows[order[0]])))))
    b = b if len(rows) > b else _pow2(len(rows))
    prefix_cache = _prefix_cache(model, params, prefix, size, pad_token_id) if prefix else None
    bar, own_bar = (_tqdm_bar(len(pairs), desc), True) if progress is True else (progress or None, False)
    pairs_of_row = np.bincount([w[0] for w in where], minlength=len(rows))
    row_lp: list[np.ndarray | None] = [None] * len(rows)
    row_greedy: list[np.ndarray | None] = [None] * len(rows)
    for b0 in range(0, len(order), b):
        idx = order[b0:b0 + b]
        toks, mask, at, tgt = _batch_arrays(rows, entries, idx, b, pad_token_id)
        # on a mesh: rows over the data axis, the cache laid out like the weights (cca_jax.mesh)
        cs = mesh_lib.cache_sharding(params, b, model.config.num_kv_heads)
        cache = tile_cache(prefix_cache, b, cs) if prefix_cache is not None else None
        lp, greedy = _score(model.config, params, *(mesh_lib.rows(x, params) for x in (toks, mask)), cache,
                            *(mesh_lib.rows(x, params) for x in (at, tgt)))
        lp, greedy = timing.fetch((lp, greedy))
        for i, r in enumerate(idx):
            row_lp[r], row_greedy[r] = lp[i, : len(entries[r])], greedy[i, : len(entries[r])]
        if bar is not None:
            bar.update(int(sum(pairs_of_row[r] for r in idx)))
    if own_bar:
        bar.close()
    out = [[float(v) for v in row_lp[r][s:s + n]] for r, s, n in where]
    if with_greedy:
        return out, [bool(row_greedy[r][s:s + n].all()) for r, s, n in where]
    return out


def _tqdm_bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="req")


def loglikelihoods(
    model,
    pairs: Sequence[Pair],
    *,
    batch_size: int = 16,
    pad_token_id: int = 0,
    min_shared_prefix: int = 8,
    progress=False,
    desc: str = "loglik",
) -> list[float]:
    """Sum of continuation log-probabilities per (full context, continuation) pair; the
    token prefix all contexts share is found and cached once."""
    if not pairs:
        return []
    n = shared_prefix([c for c, _ in pairs], min_shared_prefix)
    prefix = list(pairs[0][0][:n])
    lps = continuation_logprobs(model, prefix, [(c[n:], x) for c, x in pairs], batch_size=batch_size,
                                pad_token_id=pad_token_id, progress=progress, desc=desc)
    return [float(sum(v)) for v in lps]
