"""Paired statistics on per-item correctness: does one model (or method) beat another on
the same test items, and is a gain larger than chance across seeds?

Records are dicts with "template", "instance" and "correct" (the runs' test.jsonl rows).
Accuracy is the unweighted mean over templates of per-template accuracy (SPEC 0), so the
bootstraps resample items within templates (templates are the fixed set), or whole
templates when some template has a single item (nothing to resample within it).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from cca_jax.errors import CCAError


def _by_item(records: Sequence[dict]) -> dict[tuple[int, int], bool]:
    return {(int(r["template"]), int(r["instance"])): bool(r["correct"]) for r in records}


def align(a: Sequence[dict], b: Sequence[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(templates, correct_a, correct_b) over the items both hold, in a fixed order."""
    ia, ib = _by_item(a), _by_item(b)
    common = sorted(set(ia) & set(ib))
    if not common:
        raise CCAError("the two runs share no test items: a paired comparison needs the same test split")
    t = np.asarray([k[0] for k in common])
    return t, np.asarray([ia[k] for k in common]), np.asarray([ib[k] for k in common])


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """Exact (binomial) McNemar test on paired outcomes: ``a_only`` items only A got right,
    ``b_only`` only B; two-sided p-value of "both equally likely" given the discordant ones."""
    a_only = int(np.sum(correct_a & ~correct_b))
    b_only = int(np.sum(~correct_a & correct_b))
    n, k = a_only + b_only, min(a_only, b_only)
    if n == 0:
        p = 1.0
    else:
        tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
        p = min(1.0, 2 * tail)
    return {"a_only": a_only, "b_only": b_only, "p_value": p}


def _template_mean(templates: np.ndarray, values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Unweighted mean over templates of each template's (weighted) item mean; ``values``
    (n,) and ``weights`` (B, n) bootstrap counts -> (B,)."""
    out = np.zeros(weights.shape[0])
    uniq = np.unique(templates)
    for t in uniq:
        sel = templates == t
        w = weights[:, sel]
        out += (w @ values[sel]) / np.maximum(w.sum(axis=1), 1e-12)
    return out / len(uniq)


def _item_weights(templates: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap counts (n_boot, n): items resampled within their templates, or whole
    templates resampled when a template has only one item."""
    uniq, counts = np.unique(templates, return_counts=True)
    w = np.zeros((n_boot, len(templates)))
    if counts.min() < 2:
        picks = rng.integers(0, len(uniq), size=(n_boot, len(uniq)))
        for j, t in enumerate(uniq):
            w[:, templates == t] = (picks == j).sum(axis=1, keepdims=True)
        return w
    for t in uniq:
        idx = np.flatnonzero(templates == t)
        draws = rng.integers(0, len(idx), size=(n_boot, len(idx)))
        for j, i in enumerate(idx):
            w[:, i] = (draws == j).sum(axis=1)
    return w


def accuracy(templates: np.ndarray, correct: np.ndarray) -> float:
    return float(_template_mean(templates, correct.astype(float), np.ones((1, len(correct))))[0])


def paired_bootstrap(templates: np.ndarray, correct_a: np.ndarray, correct_b: np.ndarray, n_boot: int = 4000,
                     seed: int = 0) -> dict:
    """B's accuracy minus A's on the same items, with a 95% paired-bootstrap interval and
    a two-sided bootstrap p-value (twice the share of resamples on the other side of 0)."""
    rng = np.random.default_rng(seed)
    w = _item_weights(templates, n_boot, rng)
    diff = correct_b.astype(float) - correct_a.astype(float)
    boots = _template_mean(templates, diff, w)
    delta = accuracy(templates, correct_b) - accuracy(templates, correct_a)
    low, high = np.percentile(boots, [2.5, 97.5])
    p = 1.0 if delta == 0 else min(1.0, 2 * float(np.mean(boots <= 0) if delta > 0 else np.mean(boots >= 0)))
    return {"delta": delta, "ci": [float(low), float(high)], "p_value": p, "n_items": int(len(templates))}


def compare(records_a: Sequence[dict], records_b: Sequence[dict], n_boot: int = 4000, seed: int = 0) -> dict:
    """Both tests for B against A on their common test items."""
    t, a, b = align(records_a, records_b)
    return {**paired_bootstrap(t, a, b, n_boot, seed), "mcnemar": mcnemar_exact(a, b),
            "accuracy_a": accuracy(t, a), "accuracy_b": accuracy(t, b)}


def over_seeds(pairs: Sequence[tuple[Sequence[dict], Sequence[dict]]], n_boot: int = 4000, seed: int = 0) -> dict:
    """B minus A averaged over seeds (each pair one seed's (records_a, records_b) on the
    same items: a gain is (before, after), a method comparison (method A, method B)), with
    a 95% interval over seeds and items and a two-sided bootstrap p-value: each resample
    draws seeds with replacement and, within each, items (paired) within templates."""
    if not pairs:
        raise CCAError("no runs to aggregate")
    rng = np.random.default_rng(seed)
    deltas, per_seed, mcn = [], [], []
    for a_recs, b_recs in pairs:
        t, a, b = align(a_recs, b_recs)
        deltas.append(accuracy(t, b) - accuracy(t, a))
        per_seed.append(_template_mean(t, b.astype(float) - a.astype(float), _item_weights(t, n_boot, rng)))
        mcn.append(mcnemar_exact(a, b))
    per_seed = np.stack(per_seed)  # (seeds, n_boot)
    pick = rng.integers(0, len(pairs), size=(n_boot, len(pairs)))
    boots = per_seed[pick, np.arange(n_boot)[:, None]].mean(axis=1)
    mean = float(np.mean(deltas))
    low, high = np.percentile(boots, [2.5, 97.5])
    p = 1.0 if mean == 0 else min(1.0, 2 * float(np.mean(boots <= 0) if mean > 0 else np.mean(boots >= 0)))
    return {"mean_delta": mean, "ci": [float(low), float(high)], "p_value": p, "seeds": len(pairs),
            "delta_per_seed": [float(d) for d in deltas], "mcnemar_per_seed": mcn}
