"""Data for the side-by-side run with the original release (bench/original/README.md).

Runs in cca_jax's environment. Two steps, with the original's own split in between:

    python bench/original/prepare_data.py instances --templates DIR --out gsm_main.jsonl
        GSM-Symbolic items made from the 100 public templates (50 per template, seed 0) by
        cca_jax's template engine, written in the hub's column layout (id, instance,
        question, answer, original_id): what the original reads in place of
        load_dataset("apple/GSM-Symbolic", "main", split="test"), which needs the hub.

    (run_original.py split: the original's load_pipeline_dataset splits them -> split.json)

    python bench/original/prepare_data.py cca-subset --instances gsm_main.jsonl \
        --split split.json --out cca_subset.jsonl
        The subset's items for cca_jax, renumbered so that cca_jax's own split (seeded
        per template) puts exactly the original's train / val / test items in its train /
        val / test. Checked with cca_jax's split function before anything is written.

Instance numbers are labels only: a renumbered item keeps its question and answer, and
``orig_instance`` keeps the original's number for matching runs item by item.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from cca_jax import atomic
from cca_jax.data import gsm_symbolic as gs
from cca_jax.errors import CCAError


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


N_TEMPLATES = 100  # the original's load_pipeline_dataset asserts 100 templates per split


def cmd_instances(a) -> dict:
    items, seen = [], []
    for source in a.templates:  # in order, until there are N_TEMPLATES templates
        for it in gs.load_items(str(source), a.per_template, a.seed):
            if it.template not in seen:
                if len(seen) == N_TEMPLATES:
                    continue
                seen.append(it.template)
            items.append(it)
    if len(seen) != N_TEMPLATES:
        raise CCAError(f"{len(seen)} templates in {', '.join(map(str, a.templates))}: the original's split "
                       f"asserts exactly {N_TEMPLATES}")
    rows = [{"id": n, "instance": it.instance, "question": it.question, "answer": it.answer_text,
             "original_id": it.template} for n, it in enumerate(items)]
    atomic.write_lines(a.out, (json.dumps(r) + "\n" for r in rows))
    return {"instances": str(a.out), "items": len(rows), "templates": len({r["original_id"] for r in rows}),
            "sha256": _sha256(Path(a.out))}


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise CCAError(f"no such file: {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cca_slots(n: int, template: int, seed: int, fractions) -> dict[str, list[int]]:
    """Which instance numbers 0..n-1 cca_jax's split puts in train / val / test for this
    template: read off cca_jax's own split function, not recomputed here."""
    probe = [gs.Item(template, k, f"probe {k}", 0.0) for k in range(n)]
    return {name: sorted(it.instance for it in part) for name, part in gs.split(probe, seed, fractions).items()}


def renumber(rows: list[dict], split: dict, seed: int, fractions) -> list[tuple[gs.Item, int]]:
    """The subset's rows as cca_jax items whose cca_jax split equals the original's:
    [(item with its new instance number, the original's instance number)]."""
    from cca_jax.data import answers

    by_key = {(int(r["original_id"]), int(r["instance"])): r for r in rows}
    pairs = []
    for tid_text, parts in sorted(split["templates"].items(), key=lambda kv: int(kv[0])):
        tid = int(tid_text)
        slots = _cca_slots(sum(len(parts[s]) for s in ("train", "val", "test")), tid, seed, fractions)
        for s in ("train", "val", "test"):
            if len(slots[s]) != len(parts[s]):
                raise CCAError(f"template {tid}: cca_jax's {s} split has {len(slots[s])} items, the original's "
                               f"{len(parts[s])}: use a per-template count for which both round alike (50, 25, 14)")
            for new, old in zip(slots[s], sorted(parts[s])):
                r = by_key.get((tid, int(old)))
                if r is None:
                    raise CCAError(f"template {tid} instance {old} is in split.json but not in the instances file")
                pairs.append((gs.Item(tid, new, r["question"], answers.gold(r["answer"]), r["answer"]), int(old)))
    _check(pairs, split, seed, fractions)
    return pairs


def _check(pairs, split, seed, fractions) -> None:
    """cca_jax's split of the renumbered items is the original's split, item for item."""
    got = gs.split([it for it, _ in pairs], seed, fractions)
    orig_of = {(it.template, it.instance): old for it, old in pairs}
    for s in ("train", "val", "test"):
        mine = sorted((it.template, orig_of[(it.template, it.instance)]) for it in got[s])
        theirs = sorted((int(t), int(i)) for t, parts in split["templates"].items() for i in parts[s])
        if mine != theirs:
            raise CCAError(f"renumbering failed: cca_jax's {s} split differs from the original's")


def cmd_cca_subset(a) -> dict:
    rows = _read_rows(a.instances)
    split = json.loads(a.split.read_text())
    if split.get("instances_sha256") not in (None, _sha256(a.instances)):
        raise CCAError(f"{a.split} was made from other instances than {a.instances}: rerun run_original.py split")
    fractions = tuple(split.get("fractions", gs.SPLIT_FRACTIONS))
    pairs = renumber(rows, split, a.seed, fractions)
    recs = [{**it.to_json(), "orig_instance": old} for it, old in pairs]
    atomic.write_lines(a.out, (json.dumps(r) + "\n" for r in recs))
    # what cca_jax reads back must be what was written
    back = gs.read_jsonl(a.out)
    if [(b.template, b.instance, b.question) for b in back] != [(it.template, it.instance, it.question) for it, _ in pairs]:
        raise CCAError(f"{a.out}: cca_jax reads the file back differently")
    return {"cca_subset": str(a.out), "items": len(recs), "templates": sorted({it.template for it, _ in pairs}),
            "split_checked": True, "sha256": _sha256(Path(a.out))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("instances", help="GSM-Symbolic items from the templates, in the hub's columns")
    p.add_argument("--templates", action="append", required=True,
                   help="template directory (../shared/data/gsm_symbolic/templates/symbolic), or builtin; "
                        "repeat to fill up to 100 templates from several (CPU tests use builtin first)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--per-template", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("cca-subset", help="the subset for cca_jax, renumbered to the original's split")
    p.add_argument("--instances", type=Path, required=True)
    p.add_argument("--split", type=Path, required=True, help="split.json from run_original.py split")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0, help="cca_jax's data.seed (the run config's)")
    a = ap.parse_args(argv)
    try:
        info = cmd_instances(a) if a.cmd == "instances" else cmd_cca_subset(a)
    except CCAError as err:
        print(f"prepare_data: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
