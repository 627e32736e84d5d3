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
    """Left-padded prefixes: the last token of every row sits in the last column."""

    tokens: np.ndarray  # (B, T) int32
    mask: np.ndarray  # (B, T) bool
    desired: np.ndarray  # (B,) int32
    undesired: np.ndarray  # (B,) int32


def make_batch(examples: Sequence[LocalizationExample], pad: int = 0, length: int | None = None) -> Batch:
    T = length or max(len(e.prefix) for e in examples)
    toks = np.full((len(examples), T), pad, np.int32)
    mask = np.zeros((len(examples), T), bool)
    for i, e in enumerate(examples):
        toks[i, T - len(e.prefix):] = e.prefix
        mask[i, T - len(e.prefix):] = True
    return Batch(toks, mask, np.asarray([e.desired for e in examples], np.int32),
                 np.asarray([e.undesired for e in examples], np.int32))


def batches(examples: Sequence[LocalizationExample], batch_size: int, seed: int, pad: int = 0,
            bucket: int = 16) -> list[Batch]:
    """Fixed batches (shuffled once with ``seed``), all padded to one length (the longest
    prefix rounded up to ``bucket``) so every step reuses one compiled program. A last
    partial batch is kept as it is (one more shape)."""
    order = np.random.default_rng(seed).permutation(len(examples))
    T = max(len(e.prefix) for e in examples)
    T = -(-T // bucket) * bucket
    return [make_batch([examples[i] for i in order[b:b + batch_size]], pad, T)
            for b in range(0, len(order), batch_size)]
