"""Side-effect benchmarks: does CCA leave the rest of the model intact?

Each name says its protocol, so a score is never mistaken for lm-evaluation-harness's
task of a similar name (run those through the harness: ``cca_jax.lm_eval_adapter``):

    mmlu_5shot       5-shot (the first 5 dev items of the same subject), Hendrycks' prompt;
                     the answer is the letter whose " A".." D" continuation is most likely.
                     Accuracy. The same requests as lm-eval's ``mmlu`` with
                     ``--num_fewshot 5`` (lm-eval's default is 0-shot).
    truthfulqa_mc1   the QA primer of the TruthfulQA paper, then "Q: ...\\nA:"; log-likelihood
                     of " {choice}" per choice. MC1: the argmax choice is the true one.
                     lm-eval's ``truthfulqa_mc1`` (0-shot, the same primer).
    truthfulqa_mc2   same scores; the normalized probability mass on the true answers
                     (lm-eval's ``truthfulqa_mc2``).
    triviaqa_5shot   5-shot "Question: ...\\nAnswer: ...", greedy, cut at a newline; exact
                     match after SQuAD normalization against any alias (lm-eval's
                     ``triviaqa`` is 0-shot with another prompt).
    gsm8k_cot_8shot  the project's 8-shot chain-of-thought prompt, greedy, its answer
                     extraction; gold is the number after "####" (lm-eval's ``gsm8k`` is
                     5-shot without chain of thought).

Data is read from a directory laid out like ``../shared/data/eval`` (``mmlu/{dev,test}/
*.csv``, ``truthfulqa/mc_task.json``, ``triviaqa/triviaqa_sm_sub.jsonl``,
``gsm8k/test.jsonl``): ``data_dir``, else ``$CCA_JAX_EVAL_DATA``, else
``../shared/data/eval`` if it exists. Log-likelihoods come from ``loglik`` (few-shot
context encoded once per prompt group into a KV cache); generation from ``generate``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import string
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from cca_jax.errors import CCAError
from cca_jax.evaluate import loglik
from cca_jax.evaluate.task_data import DATA_OF_TASK, LETTERS  # noqa: F401 (re-exported)

TASKS = ("mmlu_5shot", "truthfulqa_mc1", "truthfulqa_mc2", "triviaqa_5shot", "gsm8k_cot_8shot")
# earlier names, now refused with the new one: they were lm-eval's names for other protocols
RENAMED = {"mmlu": "mmlu_5shot", "triviaqa": "triviaqa_5shot", "gsm8k": "gsm8k_cot_8shot"}
ENV_DATA = "CCA_JAX_EVAL_DATA"
HUB = "hub"  # --data-dir value: download the data once (evaluate/hub_data.py)
DEFAULT_DATA = Path("..") / "shared" / "data" / "eval"

# the six primer Q/A pairs of the TruthfulQA paper (its "QA" preset), as lm-eval uses them
TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


# -- items --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MMLUItem:
    subject: str
    index: int  # row in the subject's csv
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A".."D"


@dataclasses.dataclass(frozen=True)
class TruthfulQAItem:
    index: int
    question: str
    mc1: tuple[tuple[str, int], ...]  # (choice, label 1 = true)
    mc2: tuple[tuple[str, int], ...]


@dataclasses.dataclass(frozen=True)
class TriviaQAItem:
    index: int  # line in the jsonl
    question: str
    answer: str
    aliases: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class GSM8KItem:
    index: int
    question: str
    answer_text: str
    gold: float


# -- data ---------------------------------------------------------------------------------

def resolve_data_dir(data_dir: str | os.PathLike | None = None, tasks: Iterable[str] = ()) -> Path:
    """``data_dir``, else $CCA_JAX_EVAL_DATA, else ../shared/data/eval (relative to the cwd).
    ``hub`` (as either): what ``tasks`` need, downloaded from the hub once into a cache."""
    for given, what in ((data_dir, "--data-dir"), (os.environ.get(ENV_DATA) or None, f"${ENV_DATA}")):
        if given is not None and str(given) == HUB:
            from cca_jax.evaluate import hub_data

            return hub_data.materialize(tasks)
        if given is not None:
            p = Path(given).expanduser()
            if not p.is_dir():
                raise CCAError(f"{what} {given}: no such directory (it should hold mmlu/, truthfulqa/, "
                               f"triviaqa/, gsm8k/ as ../shared/data/eval does)")
            return p
    if DEFAULT_DATA.is_dir():
        return DEFAULT_DATA.resolve()
    raise CCAError(f"no evaluation data: pass --data-dir DIR (or --data-dir hub to download it) or set {ENV_DATA} "
                   f"to a directory laid out like ../shared/data/eval (mmlu/, truthfulqa/, triviaqa/, gsm8k/)")


def parse_tasks(tasks: str | Iterable[str]) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown and unknown[0] in RENAMED:
        old = unknown[0]
        raise CCAError(f"task {old!r} is now {RENAMED[old]!r} (its protocol differs from lm-evaluation-harness's "
                       f"{old}; for that one: cca-jax lm-eval --tasks {old} ...)")
    if unknown:
        raise CCAError(f"unknown task {unknown[0]!r}: choose from {', '.join(TASKS)}")
    if not names:
        raise CCAError(f"no tasks given: choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def _need(path: Path, task: str) -> Path:
    if not path.exists():
        raise CCAError(f"{path}: missing (needed by {task}); point --data-dir or ${ENV_DATA} at a complete copy "
                       f"of ../shared/data/eval")
    return path


def _read_mmlu_csv(path: Path, subject: str) -> list[MMLUItem]:
    items = []
    with open(path, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f)):
            if len(row) != 6 or row[5].strip() not in LETTERS:
                raise CCAError(f"{path}:{n + 1}: expected question,A,B,C,D,answer with answer one of A-D")
            items.append(MMLUItem(subject, n, row[0], tuple(row[1:5]), row[5].strip()))
    return items


def load_mmlu(data_dir: Path, split: str = "test") -> tuple[dict[str, list[MMLUItem]], dict[str, list[MMLUItem]]]:
    """(items by subject of ``split``, dev items by subject), subjects sorted."""
    root = _need(data_dir / "mmlu" / split, "mmlu")
    files = sorted(root.glob(f"*_{split}.csv"))
    if not files:
        raise CCAError(f"{root}: no *_{split}.csv files (needed by mmlu)")
    items, dev = {}, {}
    for f in files:
        subject = f.name[: -len(f"_{split}.csv")]
        items[subject] = _read_mmlu_csv(f, subject)
        dev[subject] = _read_mmlu_csv(_need(data_dir / "mmlu" / "dev" / f"{subject}_dev.csv", "mmlu"), subject)
    return items, dev


def round_robin(groups: dict[str, list], limit: int | None) -> list:
    """At most ``limit`` items, taken in turn from each group (all of them if None)."""
    if limit is None:
        return [it for g in groups.values() for it in g]
    out, k = [], 0
    while len(out) < limit and any(k < len(g) for g in groups.values()):
        for g in groups.values():
            if k < len(g) and len(out) < limit:
                out.append(g[k])
        k += 1
    return out


def load_truthfulqa(data_dir: Path) -> list[TruthfulQAItem]:
    path = _need(data_dir / "truthfulqa" / "mc_task.json", "truthfulqa")
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [TruthfulQAItem(i, r["question"], tuple((c, int(v)) for c, v in r["mc1_targets"].items()),
                           tuple((c, int(v)) for c, v in r["mc2_targets"].items())) for i, r in enumerate(rows)]


_TRIVIA_Q = re.compile(r"^Question:\s*(.*?)\s*\nAnswer:\s*$", re.S)


def load_triviaqa(data_dir: Path) -> list[TriviaQAItem]:
    path = _need(data_dir / "triviaqa" / "triviaqa_sm_sub.jsonl", "triviaqa")
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            r = json.loads(line)
            if "question" in r:
                q = r["question"]
            else:
                m = _TRIVIA_Q.match(r["context"])
                q = m.group(1) if m else r["context"]
            aliases = r.get("aliases") or (r["answer"].get("aliases") if isinstance(r["answer"], dict) else [])
            answer = r["answer"]["value"] if isinstance(r["answer"], dict) else r["answer"]
            items.append(TriviaQAItem(n, q, answer, tuple(dict.fromkeys([answer, *aliases]))))
    return items


def load_gsm8k(data_dir: Path) -> list[GSM8KItem]:
    from cca_jax.data import answers

    path = _need(data_dir / "gsm8k" / "test.jsonl", "gsm8k")
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if line.strip():
                r = json.loads(line)
                items.append(GSM8KItem(n, r["question"], r["answer"], answers.gold(r["answer"])))
    return items


def check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise CCAError(f"--limit must be a positive integer, got {limit!r}")


def prepare(tasks: str | Iterable[str], *, limit: int | None = None, data_dir=None,
            triviaqa_shots: int = 5) -> dict:
    """Parse task names, find the data and take the ``limit`` subset: everything that can go
    wrong before a model is loaded. Returns the data per task group."""
    names = parse_tasks(tasks)
    check_limit(limit)
    root = resolve_data_dir(data_dir, names)
    data: dict = {"tasks": names, "data_dir": str(root)}
    if "mmlu_5shot" in names:
        items, dev = load_mmlu(root)
        data["mmlu"] = (round_robin(items, limit), dev)
    if {"truthfulqa_mc1", "truthfulqa_mc2"} & set(names):
        data["truthfulqa"] = load_truthfulqa(root)[:limit]
    if "triviaqa_5shot" in names:
        items = load_triviaqa(root)
        # the first items are the fixed shots; the rest are evaluated
        data["triviaqa"] = (items[triviaqa_shots:][:limit], items[:triviaqa_shots])
    if "gsm8k_cot_8shot" in names:
        data["gsm8k"] = load_gsm8k(root)[:limit]
    return data


# -- prompts ------------------------------------------------------------------------------

def mmlu_question(item: MMLUItem, with_answer: bool = False) -> str:
    text = item.question.strip() + "".join(f"\n{k}. {c}" for k, c in zip(LETTERS, item.choices)) + "\nAnswer:"
    return text + (f" {item.answer}\n\n" if with_answer else "")


def mmlu_prompt(item: MMLUItem, shots: Sequence[MMLUItem]) -> str:
    head = f"The following are multiple choice questions (with answers) about {item.subject.replace('_', ' ')}.\n\n"
    return head + "".join(mmlu_question(s, True) for s in shots) + mmlu_question(item)


def truthfulqa_prompt(question: str) -> str:
    return f"{TRUTHFULQA_PRIMER}\n\nQ: {question}\nA:"


def triviaqa_prompt(question: str, shots: Sequence[TriviaQAItem]) -> str:
    ctx = "".join(f"Question: {s.question}\nAnswer: {s.answer}\n\n" for s in shots)
    return f"{ctx}Question: {question}\nAnswer:"


# -- metrics ------------------------------------------------------------------------------

def mc1_correct(lls: Sequence[float], labels: Sequence[int]) -> bool:
    """The most likely choice (the first of ties) is a true one."""
    return bool(labels[int(np.argmax(lls))] == 1)


def mc2_score(lls: Sequence[float], labels: Sequence[int]) -> float:
    """Probability mass on the true choices: sum exp(ll) over true / over all."""
    ll = np.asarray(lls, np.float64)
    p = np.exp(ll - ll.max())
    return float(p[np.asarray(labels) == 1].sum() / p.sum())


def normalize_answer(s: str) -> str:
    """SQuAD normalization: lowercase, drop punctuation, drop articles, squeeze whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, aliases: Iterable[str]) -> bool:
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in aliases)


# -- scoring ------------------------------------------------------------------------------

def _bar(total: int, desc: str, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="req")


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def score_contexts(model, tokenizer, contexts: Sequence[str], continuations: Sequence[str], *,
                   batch_size: int = 16, progress=False, min_shared_prefix: int = 8) -> list[float]:
    """Log-likelihood of each continuation after its context; the token prefix all contexts
    share is encoded once. ``progress``: an open tqdm bar to advance, or False."""
    pairs = loglik.encode_pairs(tokenizer, contexts, continuations)
    n = loglik.shared_prefix([c for c, _ in pairs], min_shared_prefix)
    lps = loglik.continuation_logprobs(model, pairs[0][0][:n] if pairs else [], [(c[n:], x) for c, x in pairs],
                                       batch_size=batch_size, pad_token_id=_pad_id(tokenizer), progress=progress)
    return [float(sum(v)) for v in lps]


def eval_mmlu(model, tokenizer, items: Sequence[MMLUItem], dev: dict[str, list[MMLUItem]], *,
              n_shots: int = 5, batch_size: int = 16, progress: bool = True) -> dict:
    by_subject: dict[str, list[MMLUItem]] = {}
    for it in items:
        by_subject.setdefault(it.subject, []).append(it)
    bar = _bar(len(items) * len(LETTERS), "mmlu_5shot", progress)
    records = []
    for subject, its in by_subject.items():  # one shared 5-shot prefix per subject
        shots = dev[subject][:n_shots]
        contexts = [mmlu_prompt(it, shots) for it in its for _ in LETTERS]
        lls = score_contexts(model, tokenizer, contexts, [f" {k}" for _ in its for k in LETTERS],
                             batch_size=batch_size, progress=bar or False)
        for i, it in enumerate(its):
            ll = lls[4 * i: 4 * i + 4]
            pred = LETTERS[int(np.argmax(ll))]
            records.append({"subject": subject, "index": it.index, "gold": it.answer, "pred": pred,
                            "lls": ll, "correct": pred == it.answer})
    if bar is not None:
        bar.close()
    per = {}
    for r in records:
        s = per.setdefault(r["subject"], {"n": 0, "correct": 0})
        s["n"] += 1
        s["correct"] += int(r["correct"])
    for s in per.values():
        s["accuracy"] = s["correct"] / s["n"]
    return {"metric": "acc", "score": _mean(r["correct"] for r in records), "n": len(records),
            "shots": n_shots, "per_subject": per, "records": records}


def truthfulqa_lls(model, tokenizer, items: Sequence[TruthfulQAItem], *, batch_size: int = 16,
                   progress: bool = True) -> list[dict[str, float]]:
    """Per item, the log-likelihood of " {choice}" for every MC1 and MC2 choice."""
    keys = [(i, c) for i, it in enumerate(items) for c in dict.fromkeys(c for c, _ in it.mc1 + it.mc2)]
    bar = _bar(len(keys), "truthfulqa", progress)
    lls = score_contexts(model, tokenizer, [truthfulqa_prompt(items[i].question) for i, _ in keys],
                         [f" {c}" for _, c in keys], batch_size=batch_size, progress=bar or False)
    if bar is not None:
        bar.close()
    out: list[dict[str, float]] = [{} for _ in items]
    for (i, c), ll in zip(keys, lls):
        out[i][c] = ll
    return out


def eval_truthfulqa(model, tokenizer, items: Sequence[TruthfulQAItem], which=("mc1", "mc2"), *,
                    batch_size: int = 16, progress: bool = True) -> dict[str, dict]:
    lls = truthfulqa_lls(model, tokenizer, items, batch_size=batch_size, progress=progress)
    out = {}
    for kind in which:
        records = []
        for it, ll in zip(items, lls):
            targets = getattr(it, kind)
            choices, labels = [c for c, _ in targets], [v for _, v in targets]
            scores = [ll[c] for c in choices]
            rec = {"index": it.index, "question": it.question, "choices": choices, "labels": labels, "lls": scores}
            if kind == "mc1":
                rec.update(pred=int(np.argmax(scores)), correct=mc1_correct(scores, labels))
            else:
                rec["score"] = mc2_score(scores, labels)
            records.append(rec)
        score = _mean(r["correct"] for r in records) if kind == "mc1" else _mean(r["score"] for r in records)
        out[f"truthfulqa_{kind}"] = {"metric": kind, "score": score, "n": len(records), "records": records}
    return out


def newline_stop(tokenizer):
    """A ``generate`` stop rule: keep the generated tokens through the first newline."""

    def rule(ids):
        if "\n" not in tokenizer.decode(list(ids), skip_special_tokens=True):
            return None
        for k in range(1, len(ids) + 1):
            if "\n" in tokenizer.decode(list(ids[:k]), skip_special_tokens=True):
                return k
        return len(ids)

    return rule


def eval_triviaqa(model, tokenizer, items: Sequence[TriviaQAItem], shots: Sequence[TriviaQAItem], *,
                  max_new_tokens: int = 24, batch_size: int = 16, progress: bool = True,
                  generation: dict | None = None) -> dict:
    from cca_jax.generate import generate, stop_ids

    prompts = [list(tokenizer(triviaqa_prompt(it.question, shots))["input_ids"]) for it in items]
    bar = _bar(len(items), "triviaqa_5shot", progress)
    outs = generate(model, prompts, max_new_tokens, stop=newline_stop(tokenizer), batch_size=batch_size,
                    chunk=8, eos_token_id=stop_ids(model, tokenizer), pad_token_id=_pad_id(tokenizer),
                    on_batch=(lambda idx, _: bar.update(len(idx))) if bar is not None else None,
                    **(generation or {}))
    if bar is not None:
        bar.close()
    records = []
    for it, gen in zip(items, outs):
        pred = tokenizer.decode(gen, skip_special_tokens=True).split("\n")[0].strip()
        records.append({"index": it.index, "question": it.question, "answer": it.answer, "prediction": pred,
                        "correct": exact_match(pred, it.aliases)})
    return {"metric": "exact_match", "score": _mean(r["correct"] for r in records), "n": len(records),
            "shots": len(shots), "max_new_tokens": max_new_tokens, "records": records}


def eval_gsm8k(model, tokenizer, items: Sequence[GSM8KItem], *, max_new_tokens: int = 256, n_shots: int = 8,
               batch_size: int = 16, progress: bool = True, generation: dict | None = None) -> dict:
    from cca_jax.data.gsm_symbolic import Item
    from cca_jax.evaluate import gsm

    gitems = [Item(template=it.index, instance=0, question=it.question, answer=it.gold, answer_text=it.answer_text)
              for it in items]
    _, recs = gsm.evaluate(model, tokenizer, gitems, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           n_shots=n_shots, progress=progress, desc="gsm8k_cot_8shot", generation=generation)
    records = [{"index": r["template"], "question": r["question"], "generated_text": r["generated_text"],
                "n_generated": len(r["generated_tokens"]), "extracted": r["extracted"], "gold": r["gold"],
                "correct": r["correct"]} for r in recs]
    return {"metric": "acc", "score": _mean(r["correct"] for r in records), "n": len(records), "shots": n_shots,
            "max_new_tokens": max_new_tokens, "records": records}


def item_values(result: dict) -> np.ndarray:
    """Per-item score of a task result: MC2's probability mass, else 1/0 for correct."""
    return np.array([float(r["score"]) if "score" in r else float(r["correct"]) for r in result["records"]])


def paired_delta(before: dict, after: dict, n_boot: int = 2000, seed: int = 0) -> dict:
    """after - before on the same items, with a 95% paired-bootstrap interval (items are
    resampled together, so the interval reflects how many items changed, not the two
    scores' separate spreads) and how many items got better or worse."""
    b, a = item_values(before), item_values(after)
    if len(a) != len(b) or not len(a):
        raise CCAError(f"paired delta needs the same items before and after ({len(b)} vs {len(a)})")
    d = a - b
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    boots = d[idx].mean(axis=1)
    return {"delta": float(d.mean()), "delta_ci": [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))],
            "better": int((d > 0).sum()), "worse": int((d < 0).sum())}


def _mean(values: Iterable) -> float | None:
    """The mean, or None (JSON null) for a task with no items: NaN is not JSON."""
    v = [float(x) for x in values]
    return float(np.mean(v)) if v else None


def finite_or_null(obj):
    """``obj`` with every NaN or infinite float replaced by None, so json.dumps writes
    valid JSON (it would write the bare token NaN)."""
    if isinstance(obj, (float, np.floating)) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def run_tasks(model, tokenizer, tasks: str | Iterable[str], *, limit: int | None = None, data_dir=None,
              batch_size: int = 16, progress: bool = True, gsm8k_max_new_tokens: int = 256,
              triviaqa_max_new_tokens: int = 24, data: dict | None = None, generation: dict | None = None) -> dict:
    """Run the benchmarks; returns {task: {"metric", "score", "n", "seconds", "records", ...}}.

    limit: at most N items per task (MMLU: round-robin over subjects). data: what
    ``prepare`` returned for the same tasks/limit/data_dir (read again if None).
    generation: more ``generate`` options for TriviaQA and GSM8K (speculative decoding).
    """
    if tokenizer is None:
        raise CCAError("the side-effect benchmarks need a tokenizer")
    if batch_size < 1:
        raise CCAError(f"batch size must be >= 1, got {batch_size}")
    if data is None:
        data = prepare(tasks, limit=limit, data_dir=data_dir)
    names = data["tasks"]
    out: dict[str, dict] = {}
    for name in names:
        if name in out:
            continue
        t0 = time.perf_counter()
        if name == "mmlu_5shot":
            res = {name: eval_mmlu(model, tokenizer, *data["mmlu"], batch_size=batch_size, progress=progress)}
        elif name.startswith("truthfulqa_"):
            which = [n.split("_", 1)[1] for n in names if n.startswith("truthfulqa_")]
            res = eval_truthfulqa(model, tokenizer, data["truthfulqa"], which, batch_size=batch_size,
                                  progress=progress)
        elif name == "triviaqa_5shot":
            items, shots = data["triviaqa"]
            res = {name: eval_triviaqa(model, tokenizer, items, shots, max_new_tokens=triviaqa_max_new_tokens,
                                       batch_size=batch_size, progress=progress, generation=generation)}
        else:
            res = {name: eval_gsm8k(model, tokenizer, data["gsm8k"], max_new_tokens=gsm8k_max_new_tokens,
                                    batch_size=batch_size, progress=progress, generation=generation)}
        seconds = round(time.perf_counter() - t0, 2)
        for k, v in res.items():
            out[k] = {**v, "seconds": seconds}
    return {k: out[k] for k in names}
