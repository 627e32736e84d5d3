"""Localization data (SPEC 2): pivotal tokens where a trace turns right or wrong.

For each train item: the greedy trace, then up to ``n_samples`` sampled traces until one's
correctness differs from greedy's (sampling is batched across items, one round per try).

prefix:    the first position where the greedy and sampled ids differ is the pivot.
branching: walk the sampled trace and complete greedily from each prefix; the first
           prefix whose completion's correctness flips is the pivot. Completions only
           change where the sampled token differs from the greedy choice at that prefix,
           and the greedy choices along the whole trace come from one teacher-forced
           forward; so only those positions are completed, a batch at a time, stopping
           at the first flip (same result as the original's one-position-at-a-time loop).
Token ids are kept as generated; pairs with desired == undesired are dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cca_jax import validate
from cca_jax.cca.examples import LocalizationExample
from cca_jax.generate import generate
from cca_jax.mesh import host

METHODS = ("prefix", "branching")


@dataclasses.dataclass(frozen=True)
class PivotConfig:
    method: str = "prefix"
    n_samples: int = 10
    # reference: temperature 1.0 always (what the original ran); intended: 1.2 when greedy
    # is correct, 0.8 when it is wrong (what its code meant to do)
    temperature_mode: str = "reference"
    top_k: int | None = 50
    max_new_tokens: int = 512
    branch_batch: int = 8
    seed: int = 0
    # rows per sampling batch (null: eval.batch_size). Set, every round runs batches of
    # one size, this or fewer rows for fewer items (rounded up to a multiple of 64):
    # one compiled program for all rounds, and on a large GPU a few wide batches
    batch_size: int | None = None

    def __post_init__(self):
        v = validate
        v.check_fields(self, "pivots", {
            "method": v.one_of(*METHODS), "n_samples": v.COUNT, "temperature_mode": v.one_of("reference", "intended"),
            "top_k": v.COUNT, "max_new_tokens": v.COUNT, "branch_batch": v.COUNT, "seed": v.SEED,
            "batch_size": v.COUNT})


def sampling_rows(batch_size: int, items: int) -> int:
    """Rows of every sampling batch for ``items`` items and ``pivots.batch_size``: all in
    one batch when they fit, its rows rounded up to a multiple of 64 (or a power of two
    below 64) so that runs of similar sizes share the compiled programs."""
    need = -(-items // -(-items // batch_size))  # the rows of the fewest even batches
    rounded = 1 << (need - 1).bit_length() if need <= 64 else -(-need // 64) * 64
    return min(batch_size, rounded)


@dataclasses.dataclass(frozen=True)
class Trace:
    prompt: tuple[int, ...]
    tokens: tuple[int, ...]  # generated ids
    correct: bool


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None  # one is a prefix of the other: no pivot


def prefix_pivot(greedy: Trace, sampled: Trace, template: int, instance: int) -> LocalizationExample | None:
    i = first_difference(greedy.tokens, sampled.tokens)
    if i is None:
        return None
    right, wrong = (greedy, sampled) if greedy.correct else (sampled, greedy)
    d, u = right.tokens[i], wrong.tokens[i]
    if d == u:
        return None
    return LocalizationExample(tuple(greedy.prompt) + tuple(greedy.tokens[:i]), int(d), int(u), template, instance)


def greedy_choices(model, prompt: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
    """argmax next token after prompt + tokens[:j], for every j (teacher forced)."""
    seq = jnp.asarray([list(prompt) + list(tokens)], jnp.int32)
    at = jnp.arange(len(prompt) - 1, len(prompt) - 1 + len(tokens))[None]
    # host: logits spanning several processes' devices are gathered
    return host(jnp.argmax(model(seq, at=at).logits[0], axis=-1))


def branching_pivot(model, greedy: Trace, sampled: Trace, judge: Callable[[Sequence[int]], bool],
                    template: int, instance: int, config: PivotConfig, gen_kw: dict) -> LocalizationExample | None:
    g = greedy_choices(model, sampled.prompt, sampled.tokens)
    cand = [j for j in range(len(sampled.tokens)) if sampled.tokens[j] != g[j]]
    for c0 in range(0, len(cand), config.branch_batch):
        group = cand[c0:c0 + config.branch_batch]
        prompts = [list(sampled.prompt) + list(sampled.tokens[:j + 1]) for j in group]
        # one budget for the group (the longest any branch may use); greedy decoding is
        # deterministic, so cutting each to its own budget equals generating it alone
        budget = config.max_new_tokens - min(group) - 1
        outs = generate(model, prompts, budget, **gen_kw) if budget > 0 else [[] for _ in group]
        for j, out in zip(group, outs):
            out = list(out)[: max(0, config.max_new_tokens - j - 1)]
            branch_ok = judge(list(sampled.tokens[:j + 1]) + out)
            if branch_ok != greedy.correct:
                d, u = (sampled.tokens[j], int(g[j])) if branch_ok else (int(g[j]), sampled.tokens[j])
                if d == u:
                    return None
                return LocalizationExample(tuple(sampled.prompt) + tuple(sampled.tokens[:j]), int(d), int(u),
                                           template, instance)
    return None


def _temperature(config: PivotConfig, correct: bool) -> float:
    return 1.0 if config.temperature_mode == "reference" else (1.2 if correct else 0.8)


def _round_kwargs(config: PivotConfig, gen_kw: dict, items: int) -> dict:
    if config.batch_size is not None and items:  # one batch shape for every round
        return {**gen_kw, "batch_size": sampling_rows(config.batch_size, items), "fixed_rows": True}
    return gen_kw


def warm(model, greedy: Sequence[Trace], config: PivotConfig, gen_kw: dict) -> list:
    """Compile ahead, on background threads, the sampling programs of ``localize``'s first
    round (with ``batch_size`` set, every round's): the started threads."""
    from cca_jax.generate import warm as warm_generate

    kw = {k: v for k, v in _round_kwargs(config, gen_kw, len(greedy)).items() if k != "stop"}
    by_temp: dict[float, list] = {}
    for g in greedy:
        by_temp.setdefault(_temperature(config, g.correct), []).append(list(g.prompt))
    threads = [warm_generate(model, prompts, config.max_new_tokens, temperature=t, top_k=config.top_k, **kw)
               for t, prompts in sorted(by_temp.items())]
    return [t for t in threads if t is not None]


def localize(model, greedy: Sequence[Trace], keys: Sequence[tuple[int, int]],
             judge_for: Callable[[int], Callable[[Sequence[int]], bool]], config: PivotConfig,
             gen_kw: dict, progress: bool = True) -> tuple[list[LocalizationExample], dict]:
    """Localization examples for items with greedy traces ``greedy`` and (template,
    instance) ``keys``. ``judge_for(i)`` scores generated ids of item i. Returns the
    examples and counts (items, with a differing sample, examples, dropped)."""
    key = jax.random.key(config.seed)
    pending = list(range(len(greedy)))
    gen_kw = _round_kwargs(config, gen_kw, len(pending))
    found: dict[int, Trace] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.n_samples, desc="sample traces", unit="round")
    for r in range(config.n_samples):
        if not pending:
            break
        by_temp: dict[float, list[int]] = {}  # one generate call per temperature
        for i in pending:
            by_temp.setdefault(_temperature(config, greedy[i].correct), []).append(i)
        for t, group in sorted(by_temp.items()):
            key, sub = jax.random.split(key)
            outs = generate(model, [list(greedy[i].prompt) for i in group], config.max_new_tokens,
                            temperature=t, top_k=config.top_k, key=sub, **gen_kw)
            for i, out in zip(group, outs):
                ok = judge_for(i)(out)
                if ok != greedy[i].correct:
                    found[i] = Trace(greedy[i].prompt, tuple(out), ok)
        pending = [i for i in pending if i not in found]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(flipped=len(found))
    if bar is not None:
        bar.close()
    examples, dropped = [], 0
    for i in sorted(found):
        t, inst = keys[i]
        if config.method == "prefix":
            ex = prefix_pivot(greedy[i], found[i], t, inst)
        else:
            ex = branching_pivot(model, greedy[i], found[i], judge_for(i), t, inst, config, gen_kw)
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    stats = {"items": len(greedy), "flipped": len(found), "examples": len(examples), "dropped": dropped}
    return examples, stats
