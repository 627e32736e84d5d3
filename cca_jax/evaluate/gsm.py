"""GSM-Symbolic accuracy: generate, extract, score; per template and overall with a 95%
interval. Overall accuracy is the unweighted mean of per-template accuracies (SPEC 0)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from cca_jax import atomic
from cca_jax.data import answers
from cca_jax.data.gsm_symbolic import Item, by_template, write_jsonl
from cca_jax.data.prompt import encode


@dataclasses.dataclass(frozen=True)
class Accuracy:
    overall: float
    low: float  # 95% bootstrap interval; ``interval`` says what was resampled
    high: float
    per_template: dict[int, float]
    n_items: int
    interval: str = "items"  # items (within templates) | templates (see accuracy)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["per_template"] = {str(k): v for k, v in self.per_template.items()}
        return d


def accuracy(records: Sequence[dict], n_boot: int = 2000, seed: int = 0) -> Accuracy:
    """records: dicts with "template" and "correct".

    The interval resamples items within each template (stratified) when every template
    has at least two items: the templates are the fixed set the accuracy is defined over
    (SPEC 0's mean of per-template accuracies), so item sampling is the uncertainty, and
    SPEC's 20 test items per template measure it. A template of one item has no spread
    under that scheme, so with any such template (an eval of one item per template gives
    a zero-width "interval") the templates are resampled instead, each with its observed
    accuracy: the spread of per-template accuracies already holds their item noise, and
    it is the only spread such data can show."""
    groups: dict[int, list[bool]] = {}
    for r in records:
        groups.setdefault(int(r["template"]), []).append(bool(r["correct"]))
    if not groups:
        return Accuracy(float("nan"), float("nan"), float("nan"), {}, 0)
    per = {t: float(np.mean(v)) for t, v in sorted(groups.items())}
    overall = float(np.mean(list(per.values())))
    rng = np.random.default_rng(seed)
    if min(len(v) for v in groups.values()) >= 2:
        boots = np.zeros(n_boot)
        for v in groups.values():
            arr = np.asarray(v, float)
            boots += rng.choice(arr, size=(n_boot, len(arr)), replace=True).mean(axis=1)
        boots /= len(groups)
        how = "items"
    else:
        accs = np.asarray(list(per.values()))
        boots = accs[rng.integers(0, len(accs), size=(n_boot, len(accs)))].mean(axis=1)
        how = "templates"
    low, high = np.percentile(boots, [2.5, 97.5])
    return Accuracy(overall, float(low), float(high), per, len(records), how)


def _generate_options(model, tokenizer, batch_size: int, generation: dict | None) -> dict:
    """The ``generate`` options of an evaluation (also what ``warm`` compiles for)."""
    from cca_jax.generate import stop_ids

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return dict(batch_size=batch_size, eos_token_id=stop_ids(model, tokenizer), pad_token_id=pad,
                **(generation or {}))


def warm(model, tokenizer, items: Sequence[Item], *, max_new_tokens: int = 512, batch_size: int = 32,
         n_shots: int = 8, chat_template: bool = False, generation: dict | None = None):
    """Compile ahead, on a background thread, the programs ``evaluate`` with these
    arguments will run (``generate.warm``): the thread, or None."""
    from cca_jax.generate import warm as warm_generate

    prompts = [encode(tokenizer, it.question, n_shots, chat_template) for it in items]
    return warm_generate(model, prompts, max_new_tokens, **_generate_options(model, tokenizer, batch_size, generation))


def evaluate(
    model,
    tokenizer,
    items: Sequence[Item],
    *,
    mode: str = "fixed",
    max_new_tokens: int = 512,
    batch_size: int = 32,
    n_shots: int = 8,
    chat_template: bool = False,
    progress: bool = True,
    desc: str = "eval",
    generation: dict | None = None,
) -> tuple[Accuracy, list[dict]]:
    """Greedy-generate an answer for every item and score it. Returns (accuracy, records).
    ``generation``: more ``generate`` options (speculative decoding: a run config's
    ``generation.options()``)."""
    from cca_jax.generate import generate

    prompts = [encode(tokenizer, it.question, n_shots, chat_template) for it in items]
    records: list[dict | None] = [None] * len(items)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc=desc, unit="q")
    n_correct = 0

    def on_batch(indices, outputs):
        nonlocal n_correct
        for i, gen in zip(indices, outputs):
            it = items[i]
            text = tokenizer.decode(gen, skip_special_tokens=True)
            pred = answers.extract(text, mode)
            ok = answers.is_correct(pred, it.answer)
            n_correct += ok
            records[i] = {
                "template": it.template, "instance": it.instance, "question": it.question,
                "prompt_tokens": prompts[i], "generated_tokens": list(gen), "generated_text": text,
                "extracted": pred, "gold": it.answer, "correct": ok,
            }
        if bar is not None:
            done = sum(r is not None for r in records)
            bar.update(len(indices))
            bar.set_postfix(acc=f"{n_correct / max(done, 1):.3f}")

    generate(model, prompts, max_new_tokens, stop=answers.stop_rule(tokenizer), on_batch=on_batch,
             **_generate_options(model, tokenizer, batch_size, generation))
    if bar is not None:
        bar.close()
    recs = [r for r in records if r is not None]
    return accuracy(recs), recs


def write_results(out_dir: str | os.PathLike, acc: Accuracy, records: Sequence[dict], meta: dict) -> Path:
    """results.json and items.jsonl in ``out_dir``, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(records, out / "items.jsonl")
    atomic.write_json(out / "results.json", {**meta, "accuracy": acc.to_json()})
    return out


def select(items: Sequence[Item], templates: Sequence[int] | None = None, limit: int | None = None) -> list[Item]:
    """Filter to ``templates``; then at most ``limit`` items, taken round-robin over
    templates so every template stays represented."""
    groups = by_template([it for it in items if templates is None or it.template in set(templates)])
    if limit is None:
        return [it for g in groups.values() for it in g]
    out, k = [], 0
    while len(out) < limit and any(k < len(g) for g in groups.values()):
        for g in groups.values():
            if k < len(g) and len(out) < limit:
                out.append(g[k])
        k += 1
    return out
