"""Side-effect benchmark data from the Hugging Face hub, for machines without
``../shared/data/eval`` (Colab, a cloud VM): ``--data-dir hub``.

Each task's public dataset is downloaded once and written into a cache directory laid out
like ``../shared/data/eval`` (MMLU csv per subject, TruthfulQA ``mc_task.json``, TriviaQA
and GSM8K jsonl), so the same loaders read it. Writing is atomic per file and a finished
task is marked done, so an interrupted download resumes; nothing is fetched twice.

Sources: ``cais/mmlu`` (all: test, dev), ``truthfulqa/truthful_qa`` (multiple_choice:
validation), ``mandarjoshi/trivia_qa`` (rc.nocontext: validation), ``openai/gsm8k``
(main: test). Reading their parquet files needs ``pyarrow`` (``pip install pyarrow``).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Callable, Iterable

from cca_jax import atomic
from cca_jax.errors import CCAError
from cca_jax.evaluate.task_data import DATA_OF_TASK, LETTERS

ENV_CACHE = "CCA_JAX_HUB_EVAL_CACHE"
# task folder -> (dataset repo, parquet file prefixes to read, by split)
SOURCES = {
    "mmlu": ("cais/mmlu", {"test": "all/test-", "dev": "all/dev-"}),
    "truthfulqa": ("truthfulqa/truthful_qa", {"validation": "multiple_choice/validation-"}),
    "triviaqa": ("mandarjoshi/trivia_qa", {"validation": "rc.nocontext/validation-"}),
    "gsm8k": ("openai/gsm8k", {"test": "main/test-"}),
}
FOLDER_OF_TASK = DATA_OF_TASK

Rows = list[dict]
Fetch = Callable[[str, str], Rows]  # (repo, file prefix) -> rows of the matching parquet files


def cache_dir() -> Path:
    """$CCA_JAX_HUB_EVAL_CACHE, else ~/.cache/cca_jax/eval_hub (or under $XDG_CACHE_HOME)."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cca_jax" / "eval_hub"


def fetch_rows(repo: str, prefix: str, revision: str | None = None) -> Rows:
    """All rows of the dataset repo's parquet files whose path starts with ``prefix``."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CCAError("reading the hub's benchmark data needs pyarrow: pip install pyarrow") from None
    from huggingface_hub import HfApi, hf_hub_download

    try:
        files = sorted(f for f in HfApi().list_repo_files(repo, repo_type="dataset", revision=revision)
                       if f.startswith(prefix) and f.endswith(".parquet"))
        if not files:
            raise CCAError(f"{repo}: no parquet files under {prefix}* (has the dataset moved?)")
        paths = [hf_hub_download(repo, f, repo_type="dataset", revision=revision) for f in files]
    except CCAError:
        raise
    except Exception as err:
        raise CCAError(f"cannot download {repo} from the hub ({type(err).__name__}): offline? pass --data-dir "
                       f"DIR laid out like ../shared/data/eval") from None
    return [r for p in paths for r in pq.read_table(p).to_pylist()]


def _csv_text(rows: Iterable[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _write_mmlu(root: Path, fetch: Fetch) -> None:
    repo, parts = SOURCES["mmlu"]
    for split, prefix in parts.items():
        by_subject: dict[str, list[list[str]]] = {}
        for r in fetch(repo, prefix):
            choices = list(r["choices"])
            if len(choices) != 4 or not 0 <= int(r["answer"]) < 4:
                raise CCAError(f"{repo}: a row of {r.get('subject')} does not have 4 choices and an answer 0-3")
            by_subject.setdefault(r["subject"], []).append([r["question"], *choices, LETTERS[int(r["answer"])]])
        for subject, rows in by_subject.items():
            atomic.write_text(root / "mmlu" / split / f"{subject}_{split}.csv", _csv_text(rows))


def _targets(t: dict) -> dict[str, int]:
    return {c: int(v) for c, v in zip(t["choices"], t["labels"])}


def _write_truthfulqa(root: Path, fetch: Fetch) -> None:
    repo, parts = SOURCES["truthfulqa"]
    rows = [{"question": r["question"], "mc1_targets": _targets(r["mc1_targets"]),
             "mc2_targets": _targets(r["mc2_targets"])} for r in fetch(repo, parts["validation"])]
    atomic.write_json(root / "truthfulqa" / "mc_task.json", rows)


def _write_triviaqa(root: Path, fetch: Fetch) -> None:
    repo, parts = SOURCES["triviaqa"]
    lines = (json.dumps({"question": r["question"], "answer": r["answer"]["value"],
                         "aliases": list(r["answer"].get("aliases") or [])}) + "\n"
             for r in fetch(repo, parts["validation"]))
    atomic.write_lines(root / "triviaqa" / "triviaqa_sm_sub.jsonl", lines)


def _write_gsm8k(root: Path, fetch: Fetch) -> None:
    repo, parts = SOURCES["gsm8k"]
    lines = (json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in fetch(repo, parts["test"]))
    atomic.write_lines(root / "gsm8k" / "test.jsonl", lines)


WRITERS = {"mmlu": _write_mmlu, "truthfulqa": _write_truthfulqa, "triviaqa": _write_triviaqa, "gsm8k": _write_gsm8k}


def materialize(tasks: Iterable[str], root: str | os.PathLike | None = None, fetch: Fetch | None = None,
                log: Callable[[str], None] = print) -> Path:
    """A directory laid out like ../shared/data/eval holding what ``tasks`` need, downloaded
    from the hub into ``root`` (default: the cache) on first use."""
    root = Path(root) if root is not None else cache_dir()
    fetch = fetch or fetch_rows
    for folder in dict.fromkeys(FOLDER_OF_TASK[t] for t in tasks):
        done = root / folder / ".done"
        if done.exists():
            continue
        log(f"downloading {SOURCES[folder][0]} from the hub into {root / folder}")
        WRITERS[folder](root, fetch)
        atomic.write_text(done, SOURCES[folder][0] + "\n")
    return root
