"""GSM-Symbolic items from templates, the hub or local JSONL; splits per SPEC section 1.

An ``Item`` is one question with its gold answer, keyed by template id (the GSM8K test
index, ``original_id``) and instance number. Templates are read from a directory (the
public ones live in ../shared/data/gsm_symbolic/templates/symbolic, never in this repo)
or from the package's own embedded set (``builtin``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from cca_jax.data import answers
from cca_jax.data.templates import MAX_ID
from cca_jax.errors import CCAError

HUB_REPO = "apple/GSM-Symbolic"
HUB_CONFIGS = ("main", "p1", "p2")
SPLIT_FRACTIONS = (0.52, 0.08, 0.40)  # train / val / test: 26 / 4 / 20 of 50


@dataclasses.dataclass(frozen=True)
class Item:
    template: int
    instance: int
    question: str
    answer: float
    answer_text: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def from_templates(templates, per_template: int, seed: int, *, max_seconds: float | None = None) -> list[Item]:
    """``per_template`` instances of each template, deterministic for ``seed``; each template
    gets ``max_seconds`` (None: $CCA_JAX_TEMPLATE_SECONDS, else the templates module's default)."""
    from cca_jax.data import templates as tlib

    items = []
    for t in templates:
        for k, inst in enumerate(tlib.instances(t, per_template, seed, max_seconds=max_seconds)):
            # gold = the rendered solution's "#### N" (template 456's #answer expression is
            # wrong in the public data; its solution text is right)
            items.append(Item(t.id, k, inst.question, answers.gold(inst.answer_text), inst.answer_text))
    return items


def load_template_source(source: str | os.PathLike | None):
    """``None`` or "builtin" -> the embedded templates; else a directory of template JSON."""
    from cca_jax.data import templates as tlib

    if source is None or str(source) == "builtin":
        return tlib.load_builtin_templates()
    return tlib.load_templates(source)


def _index(v, what: str) -> int:
    """A template id or instance number: a whole number in [0, 2**63) ("473" and 473.0 too)."""
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v != int(v) or not 0 <= v < MAX_ID:
        raise ValueError(f"{what} must be a non-negative integer, got {repr(v)[:40]}")
    return int(v)


def _parse_jsonl_row(row, where: str) -> Item:
    try:
        if not isinstance(row, dict):
            raise TypeError(f"a JSON {type(row).__name__}, not an object")
        template = _index(row.get("original_id", row.get("template", row.get("id_orig", row.get("id")))),
                          "original_id")
        instance = _index(row.get("instance", 0), "instance")
        ans_text, question = row["answer"], row["question"]
        if not isinstance(question, str):
            raise TypeError(f"question is a {type(question).__name__}, not text")
        if isinstance(ans_text, bool) or not isinstance(ans_text, (int, float, str)):
            raise TypeError(f"answer is a {type(ans_text).__name__}, not text or a number")
        gold = float(ans_text) if isinstance(ans_text, (int, float)) else answers.gold(ans_text)
        if not math.isfinite(gold):
            raise ValueError(f"answer {gold} is not a finite number")
        text = ans_text if isinstance(ans_text, str) else row.get("answer_text", "")  # our earlier format
        return Item(template, instance, question, gold, text if isinstance(text, str) else "")
    except (KeyError, TypeError, ValueError, ArithmeticError) as err:
        msg = " ".join(str(err).split())[:120]  # one line, however odd the row
        raise CCAError(f"{where}: not a GSM-Symbolic record ({type(err).__name__}: {msg}); "
                       f"need question, answer (ending '#### N') and original_id") from None


def read_jsonl(path: str | os.PathLike) -> list[Item]:
    """Items from JSONL in the hub's format (id/original_id, instance, question, answer)
    or as written by ``write_jsonl``."""
    p = Path(path)
    if not p.exists():
        raise CCAError(f"no such file: {p}")
    items = []
    try:
        with open(p, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise CCAError(f"{p}:{n}: not UTF-8 text (byte {err.start} of the line): "
                                   f"JSONL is UTF-8") from None
                if line.strip():
                    items.append(_parse_jsonl_row(_json_line(line, f"{p}:{n}"), f"{p}:{n}"))
    except OSError as err:
        raise CCAError(f"{p}: cannot read ({err.strerror or type(err).__name__})") from None
    if not items:
        raise CCAError(f"{p}: no records")
    return items


def _json_line(line: str, where: str):
    try:
        return json.loads(line)
    except ValueError as err:  # JSONDecodeError, or a number of 5000 digits
        raise CCAError(f"{where}: invalid JSON ({' '.join(str(err).split(';')[0].split())[:120]})") from None
    except RecursionError:  # [[[...]]] 200k deep
        raise CCAError(f"{where}: invalid JSON (nested too deeply)") from None
    except MemoryError:
        raise CCAError(f"{where}: JSON too large to parse") from None


def from_hub(config: str = "main", revision: str | None = None) -> list[Item]:
    """The hub dataset apple/GSM-Symbolic (configs main, p1, p2; split test)."""
    if config not in HUB_CONFIGS:
        raise CCAError(f"unknown GSM-Symbolic config {config!r}: use one of {', '.join(HUB_CONFIGS)}")
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(HUB_REPO, f"{config}/test.jsonl", repo_type="dataset", revision=revision)
    except Exception as err:
        raise CCAError(f"cannot download {HUB_REPO} ({config}) from the hub ({type(err).__name__}): "
                       f"offline? use --templates DIR or a local JSONL") from None
    return read_jsonl(path)


def toy_digits(per_template: int, seed: int) -> list[Item]:
    """Three one-step problems with one-digit answers: a smoke-test task that even a tiny
    random model sometimes gets right, so every pipeline stage has work to do."""
    rng = np.random.default_rng(seed)
    forms = {1: ("Ann has {a} pens and gets {b} more. How many pens does she have?", lambda a, b: a + b),
             2: ("Bo had {a} cups and broke {b}. How many cups are left?", lambda a, b: a - b),
             3: ("A box has {a} rows of {b} eggs. How many eggs are there?", lambda a, b: a * b)}
    items = []
    for tid, (text, f) in forms.items():
        k = 0
        while k < per_template:
            a, b = (int(x) for x in rng.integers(1, 10, 2))
            if 0 <= f(a, b) <= 9:
                items.append(Item(tid, k, text.format(a=a, b=b), float(f(a, b)), f"#### {f(a, b)}"))
                k += 1
    return items


def load_items(source: str, per_template: int = 50, seed: int = 0, template_ids=None) -> list[Item]:
    """One entry point for the CLI: "builtin", "hub:main|p1|p2", "toy:digits", a .jsonl
    file, or a directory of templates (instantiated with ``per_template`` and ``seed``).
    ``template_ids``: of templates, only these are instantiated (each template's instances
    depend on (seed, its id) alone, so they are the ones a full load gives); other
    sources are returned whole (the caller selects)."""
    if source.startswith("hub:"):
        return from_hub(source[4:])
    if source == "toy:digits":
        return toy_digits(per_template, seed)
    p = Path(source)
    if source != "builtin" and p.is_file():
        return read_jsonl(p)
    if source != "builtin" and not p.exists():
        raise CCAError(f"no such file or directory: {source} (data is builtin, hub:main|p1|p2, a .jsonl or a template dir)")
    templates = load_template_source(source)
    if template_ids is not None:
        wanted = set(template_ids)
        templates = [t for t in templates if t.id in wanted]
    return from_templates(templates, per_template, seed)


def write_jsonl(items: Iterable[Item | dict], path: str | os.PathLike) -> Path:
    """Write records atomically (a temporary file in the same directory, then a rename)."""
    from cca_jax import atomic

    return atomic.write_lines(path, (json.dumps(it.to_json() if isinstance(it, Item) else it) + "\n"
                                     for it in items))


def template_records(source: str | os.PathLike | None) -> dict[int, dict]:
    """Per template id (``id_orig``), what the hub's instance records carry besides the
    instance: its GSM-Symbolic id (``id_shuffled``) and the original GSM8K question and
    answer; read from the template files of ``source`` ("builtin" or a directory)."""
    from importlib import resources

    if source is None or str(source) == "builtin":
        files = [p for p in (resources.files("cca_jax.data") / "builtin").iterdir() if p.name.endswith(".json")]
    else:
        files = sorted(Path(source).glob("*.json"))
    out = {}
    for f in files:
        try:
            raw = json.loads(f.read_bytes())
            out[int(raw["id_orig"])] = {"id": int(raw.get("id_shuffled", raw["id_orig"])),
                                        "original_question": raw.get("question"), "original_answer": raw.get("answer")}
        except (ValueError, KeyError, TypeError, OSError):
            continue  # load_templates has refused a bad file already
    return out


def to_hub_record(item: Item, template: dict | None = None) -> dict:
    """An item in the schema of the hub's ``apple/GSM-Symbolic`` JSONL: ``id`` (the
    GSM-Symbolic template id), ``instance``, ``question``, ``answer`` (the solution text
    ending in ``#### N``), ``original_id`` (the GSM8K test index), and the original GSM8K
    question and answer when the template files have them."""
    template = template or {}
    gold = int(item.answer) if float(item.answer).is_integer() else item.answer
    answer = item.answer_text or f"#### {gold}"
    rec = {"id": template.get("id", item.template), "instance": item.instance, "question": item.question,
           "answer": answer, "original_id": item.template}
    for k in ("original_question", "original_answer"):
        if template.get(k) is not None:
            rec[k] = template[k]
    return rec


def write_hub_jsonl(items: Iterable[Item], path: str | os.PathLike, templates: dict[int, dict] | None = None) -> Path:
    """Items as the hub's JSONL (``to_hub_record``), written atomically; ``read_jsonl``
    reads them back."""
    from cca_jax import atomic

    templates = templates or {}
    return atomic.write_lines(path, (json.dumps(to_hub_record(it, templates.get(it.template))) + "\n" for it in items))


def by_template(items: Sequence[Item]) -> dict[int, list[Item]]:
    out: dict[int, list[Item]] = {}
    for it in items:
        out.setdefault(it.template, []).append(it)
    return out


def split_counts(n: int, fractions: Sequence[float] = SPLIT_FRACTIONS) -> tuple[int, int, int]:
    train = int(round(fractions[0] * n))
    val = int(round(fractions[1] * n))
    return train, val, n - train - val


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    f = tuple(float(x) for x in fractions)
    if len(f) != 3 or any(x < 0 for x in f) or abs(sum(f) - 1.0) > 1e-6 or f[0] == 0 or f[2] == 0:
        raise CCAError(f"data.split must be three non-negative train/val/test fractions summing to 1 "
                       f"(train and test above 0), got {list(fractions)}")
    return f


def split(items: Sequence[Item], seed: int, fractions: Sequence[float] = SPLIT_FRACTIONS) -> dict[str, list[Item]]:
    """Per template: shuffle its instances with ``seed`` and cut by ``fractions`` (SPEC:
    0.52 / 0.08 / 0.40, i.e. 26 / 4 / 20 of 50).

    Deterministic for the seed and independent of item order in the input."""
    fractions = check_fractions(fractions)
    out = {"train": [], "val": [], "test": []}
    for tid, group in sorted(by_template(items).items()):
        group = sorted(group, key=lambda it: it.instance)
        rng = np.random.default_rng([seed, tid])
        perm = rng.permutation(len(group))
        tr, va, _ = split_counts(len(group), fractions)
        for name, idx in (("train", perm[:tr]), ("val", perm[tr:tr + va]), ("test", perm[tr + va:])):
            out[name].extend(group[i] for i in sorted(idx))
    return out
