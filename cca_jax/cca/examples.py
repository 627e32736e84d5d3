"""Localization examples (pivotal tokens) and batching them for the forward pass."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from cca_jax.errors import CCAError


@dataclasses.dataclass(frozen=True)
class LocalizationExample:
    prefix: tuple[int, ...]  # prompt + shared generated tokens, ids as generated
    desired: int  # the token toward the correct answer
    undesired: int
    template: int
    instance: int

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["prefix"] = list(self.prefix)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "LocalizationExample":
        return cls(tuple(int(t) for t in d["prefix"]), int(d["desired"]), int(d["undesired"]),
                   int(d["template"]), int(d["instance"]))


def save(examples: Sequence[LocalizationExample], path: str | os.PathLike) -> Path:
    from cca_jax.data.gsm_symbolic import write_jsonl

    return write_jsonl([e.to_json() for e in examples], path)


def load(path: str | os.PathLike) -> list[LocalizationExample]:
    p = Path(path)
    if not p.exists():
        raise CCAError(f"no such localization file: {p}")
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(LocalizationExample.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError) as err:
                raise CCAError(f"{p}:{n}: not a localization example ({err})") from None
    return out


@dataclasses.dataclass(frozen=True)
class Batch:
    """Left-padded prefixes: the last token of every row sits in the last column.

    ``weights`` (B,) float32: 1 a real row, 0 a padded one (a copy of a real row's prefix
    with desired == undesired, there only so every batch has one shape); None: all real.
    Every loss and average over rows weights them, so padded rows contribute nothing."""

    tokens: np.ndarray  # (B, T) int32
    mask: np.ndarray  # (B, T) bool
    desired: np.ndarray  # (B,) int32
    undesired: np.ndarray  # (B,) int32
    weights: np.ndarray | None = None

    def __post_init__(self):
        if self.weights is None:
            object.__setattr__(self, "weights", np.ones(len(self.desired), np.float32))

    @property
    def real(self) -> int:
        """The number of real (not padded) rows."""
        return int(np.count_nonzero(self.weights))


def make_batch(examples: Sequence[LocalizationExample], pad: int = 0, length: int | None = None,
               rows: int | None = None) -> Batch:
    """``rows``: pad to this many rows with copies of the first example whose desired and
    undesired tokens are the same (weight 0): a copy of a real prefix, so no row is empty
    (an all-masked row would give NaN attention)."""
    T = length or max(len(e.prefix) for e in examples)
    n = len(examples)
    B = max(rows or n, n)
    toks = np.full((B, T), pad, np.int32)
    mask = np.zeros((B, T), bool)
    for i, e in enumerate(examples):
        toks[i, T - len(e.prefix):] = e.prefix
        mask[i, T - len(e.prefix):] = True
    toks[n:], mask[n:] = toks[0], mask[0]
    desired = np.asarray([e.desired for e in examples] + [examples[0].desired] * (B - n), np.int32)
    undesired = np.asarray([e.undesired for e in examples] + [examples[0].desired] * (B - n), np.int32)
    return Batch(toks, mask, desired, undesired, (np.arange(B) < n).astype(np.float32))


def batches(examples: Sequence[LocalizationExample], batch_size: int, seed: int, pad: int = 0,
            bucket: int = 16, pad_rows: bool = False) -> list[Batch]:
    """Fixed batches (shuffled once with ``seed``), all padded to one length (the longest
    prefix rounded up to ``bucket``) so every step reuses one compiled program.
    ``pad_rows``: a last partial batch is padded to min(batch_size, len(examples)) rows
    (``Batch.weights`` 0 on the added rows), so it too reuses that program; without it the
    last batch keeps its own size (one more shape; for callers that do not read weights)."""
    order = np.random.default_rng(seed).permutation(len(examples))
    T = max(len(e.prefix) for e in examples)
    T = -(-T // bucket) * bucket
    rows = min(batch_size, len(examples)) if pad_rows else None
    return [make_batch([examples[i] for i in order[b:b + batch_size]], pad, T, rows)
            for b in range(0, len(order), batch_size)]
