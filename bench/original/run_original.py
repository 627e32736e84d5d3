"""Run the original PyTorch release of CCA, unmodified, on a GSM-Symbolic subset, and time
its stages from outside.

The release (github.com/apple/ml-constructive-circuit-amplification) is read from $SBS_ORIG,
a checkout of it that is never copied into this repository, and runs in its own environment
(transformers 4.53.0, nnsight 0.4.6, datasets 4.4.1: CARRY.md). None of its files is edited.
What it needs in order to run here is done from this file before its code runs; README.md
("Adaptations") lists each one:

  A1  utils.report_metrics, which pipeline_utils imports but the release does not ship,
      is supplied as a no-op (the release's W&B logging hook).
  A2  load_dataset("apple/GSM-Symbolic", ...) in gsm_utils reads $SBS_DATA (the same items
      in the hub's columns) instead of the hub.
  A3  load_pipeline_dataset's val and test splits are cut to the subset's templates
      ($SBS_SUBSET); the release always evaluates all 100 templates. Its split is unchanged.
  A4  generate_dataset.py's instances are cut to the train split ($SBS_SPLIT); the release
      generates pivots for all 50 instances of a template and later keeps the train ones.
  A5  base evaluation and template selection: the release's eval_model and
      find_low_performing_templates, called from here (its eval_gsm_symbolic.py needs
      lm-eval and a model key in its own JSON).
Timers wrap the release's functions (each records wall seconds, after a CUDA sync) into
$SBS_TIMELINE, one JSON line per call: they measure and change nothing.

Subcommands:
  split       the release's split (load_pipeline_dataset, seed, fractions) -> split.json
  base-eval   load the model as fixing_pipeline.py does; eval_model on the subset's train,
              val and test; find_low_performing_templates on train -> selected.json
  pivot-config  the YAML (generate_data.yaml's layout) for generate_dataset.py
  fix-config  the experiment JSON (exps_configs' format) for run_fixing_pipeline.py
  exec SCRIPT [ARGS...]  run one of the release's scripts as __main__ with the above in
              place (generate_dataset.py, run_fixing_pipeline.py, fixing_pipeline.py)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import runpy
import sys
import time
from pathlib import Path

SPLIT_FRACTIONS = {"train": 0.52, "val": 0.08, "test": 0.4}  # every exps_configs file's
_LABEL = os.environ.get("SBS_LABEL", "")


def _fail(msg: str) -> None:
    print(f"run_original: error: {msg}", file=sys.stderr)
    sys.exit(2)


def _env_path(name: str) -> Path:
    v = os.environ.get(name)
    if not v:
        _fail(f"${name} is not set (side_by_side.sh sets it)")
    return Path(v)


# -- timeline ---------------------------------------------------------------------------------

def _record(event: str, t0: float, seconds: float, **extra) -> None:
    path = os.environ.get("SBS_TIMELINE")
    if not path:
        return
    rec = {"label": _LABEL, "event": event, "t0": round(t0, 3), "seconds": round(seconds, 3), "pid": os.getpid(),
           **extra}
    with open(path, "a") as f:  # one short line per write: appends from several processes stay whole
        f.write(json.dumps(rec) + "\n")


def _sync() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(owner, attr: str, event: str) -> None:
    """Replace owner.attr by a wrapper that records each call's wall time as ``event``."""
    fn = getattr(owner, attr)
    if getattr(fn, "_sbs_event", None):
        return

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0, p0, ok = time.time(), time.perf_counter(), False
        try:
            out = fn(*args, **kwargs)
            ok = True
            return out
        finally:
            _sync()
            _record(event, t0, time.perf_counter() - p0, **({} if ok else {"error": True}))

    wrapper._sbs_event = event
    setattr(owner, attr, wrapper)


class _Stage:
    """``with _Stage("name"):`` records the block's wall time."""

    def __init__(self, event: str):
        self.event = event

    def __enter__(self):
        self.t0, self.p0 = time.time(), time.perf_counter()
        return self

    def __exit__(self, exc_type, *_):
        _sync()
        _record(self.event, self.t0, time.perf_counter() - self.p0, **({"error": True} if exc_type else {}))


# -- the adaptations ------------------------------------------------------------------------------

def _local_gsm_symbolic(path, name=None, split=None, *args, **kwargs):
    """A2: the hub dataset apple/GSM-Symbolic (config main, split test) from $SBS_DATA."""
    if path != "apple/GSM-Symbolic" or (name or "main") != "main" or (split or "test") != "test" or args:
        raise RuntimeError(f"side-by-side: only apple/GSM-Symbolic main/test is provided offline, not {path} {name} {split}")
    from datasets import Dataset

    data = _env_path("SBS_DATA")
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    return Dataset.from_list(rows)


def _subset() -> set[int] | None:
    text = os.environ.get("SBS_SUBSET", "").replace(",", " ").split()
    return {int(t) for t in text} or None


def _train_keys() -> set[tuple[int, int]] | None:
    p = os.environ.get("SBS_SPLIT")
    if not p:
        return None
    split = json.loads(Path(p).read_text())
    return {(int(t), int(i)) for t, parts in split["templates"].items() for i in parts["train"]}


def _setup(orig: Path, with_pipeline: bool = True) -> None:
    """Put the release on sys.path as its scripts expect, apply A1-A4 and the timers."""
    mr = orig / "math_reasoning"
    if not (mr / "gsm_utils.py").is_file():
        _fail(f"{orig} is not a checkout of the original release (no math_reasoning/gsm_utils.py)")
    for p in (str(orig), str(mr)):  # its scripts import siblings by bare name; one module uses the package
        if p not in sys.path:
            sys.path.insert(0, p)
    import utils  # the release's math_reasoning/utils.py

    if not hasattr(utils, "report_metrics"):  # A1
        utils.report_metrics = lambda *_a, **_k: None
    import gsm_utils
    import nnsight

    gsm_utils.load_dataset = _local_gsm_symbolic  # A2
    subset = _subset()
    if subset is not None and not getattr(gsm_utils.load_pipeline_dataset, "_sbs_cut", False):  # A3
        inner = gsm_utils.load_pipeline_dataset

        @functools.wraps(inner)
        def cut(*args, **kwargs):
            out = inner(*args, **kwargs)
            return {k: (v if k == "train" else v.filter(lambda x: int(x["template_id"]) in subset))
                    for k, v in out.items()}

        cut._sbs_cut = True
        gsm_utils.load_pipeline_dataset = cut
    train = _train_keys()
    if train is not None and not getattr(gsm_utils.filter_by_template_idx, "_sbs_cut", False):  # A4
        inner_f = gsm_utils.filter_by_template_idx

        @functools.wraps(inner_f)
        def cut_train(*args, **kwargs):
            ds = inner_f(*args, **kwargs)
            return ds.filter(lambda x: (int(x["template_id"]), int(x["instance_id"])) in train)

        cut_train._sbs_cut = True
        gsm_utils.filter_by_template_idx = cut_train
    _time_model_load(nnsight)
    _timed(gsm_utils, "load_pipeline_dataset", "data_split")
    if with_pipeline:
        import pipeline_utils  # binds gsm_utils' untimed eval_model: timed separately below

        for attr, event in (("learn_binary_mask", "dcm"), ("train_and_evaluate_n_steps", "amplify"),
                            ("eval_model", "amplify.val_eval"), ("compute_gradients", "amplify.gradients"),
                            ("update_model", "amplify.update"), ("save_model", "amplify.save"),
                            ("generate_localization_dataset_via_prefix", "pivots"),
                            ("generate_localization_dataset_via_branching", "pivots"),
                            ("generate_greedy_reasoning_traces", "pivots.greedy"),
                            ("generate_non_greedy_reasoning_traces", "pivots.sampling")):
            _timed(pipeline_utils, attr, event)
        _timed(gsm_utils, "eval_model", "eval_model")  # fixing_pipeline's test evaluation
        import torch

        _timed(torch, "load", "load_best")  # fixing_pipeline reloads best_model.pth


def _time_model_load(nnsight) -> None:
    base = nnsight.LanguageModel
    if getattr(base, "_sbs_timed", False):
        return

    class LanguageModel(base):  # same name; only __init__ (which loads and dispatches) is timed
        _sbs_timed = True

        def __init__(self, *args, **kwargs):
            if os.environ.get("SBS_TEST_FLOAT32") == "1" and "torch_dtype" in kwargs:
                # CPU tests only: float16 matmuls on a CPU are ~10x slower than float32
                import torch

                kwargs["torch_dtype"] = torch.float32
            with _Stage("load_model"):
                super().__init__(*args, **kwargs)

    LanguageModel.__module__ = base.__module__
    LanguageModel.__qualname__ = base.__qualname__
    nnsight.LanguageModel = LanguageModel


def _determinism(seed: int) -> None:
    """The seeds and switches the release's eval and fixing scripts set before a model loads."""
    import random

    import numpy as np
    import torch
    from transformers import set_seed

    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    set_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.use_deterministic_algorithms(mode=True, warn_only=False)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"


# -- subcommands ----------------------------------------------------------------------------------

def _templates(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        _fail(f"--templates takes template ids (GSM8K test indices), got {text!r}")
    if not ids:
        _fail("--templates is empty")
    return ids


def _pipeline_splits(templates: list[int], seed: int, work: Path) -> dict:
    import gsm_utils

    work.mkdir(parents=True, exist_ok=True)
    return gsm_utils.load_pipeline_dataset(train_template_ids=templates, split_percentages=dict(SPLIT_FRACTIONS),
                                           output_dir=str(work), seed=seed)


def cmd_split(a) -> dict:
    import hashlib

    templates = _templates(a.templates)
    os.environ["SBS_SUBSET"] = " ".join(map(str, templates))  # A3 for this subset
    _setup(a.orig, with_pipeline=False)
    parts = _pipeline_splits(templates, a.seed, a.work)
    out = {"seed": a.seed, "fractions": [SPLIT_FRACTIONS[s] for s in ("train", "val", "test")],
           "instances_sha256": hashlib.sha256(_env_path("SBS_DATA").read_bytes()).hexdigest(),
           "made_by": "the original's gsm_utils.load_pipeline_dataset", "templates": {}}
    for s in ("train", "val", "test"):
        for row in parts[s]:
            t = out["templates"].setdefault(str(int(row["template_id"])), {"train": [], "val": [], "test": []})
            t[s].append(int(row["instance_id"]))
    missing = sorted(set(templates) - {int(t) for t in out["templates"]})
    if missing:
        _fail(f"templates {missing} are not in $SBS_DATA")
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    return {"split": str(a.out), "templates": templates,
            "counts": {t: {s: len(v) for s, v in p.items()} for t, p in out["templates"].items()}}


def cmd_base_eval(a) -> dict:
    import torch

    templates = _templates(a.templates)
    os.environ["SBS_SUBSET"] = " ".join(map(str, templates))  # A3 for this subset
    _determinism(a.seed)
    _setup(a.orig, with_pipeline=False)
    import gsm_utils
    from nnsight import LanguageModel

    model = LanguageModel(str(a.model), device_map="auto", torch_dtype=torch.float16, dispatch=True)
    model.tokenizer.pad_token = model.tokenizer.eos_token
    model.eval()
    parts = _pipeline_splits(templates, a.seed, a.work / "split")
    accs = {}
    with _Stage("base_eval"):
        for s in ("train", "val", "test"):
            with _Stage(f"base_eval.{s}"):
                accs[s] = gsm_utils.eval_model(model, model.tokenizer, parts[s], max_new_tokens=a.max_new_tokens,
                                               batch_size=a.batch_size,
                                               model_output_path=str(a.work / f"base_outputs_{s}.json"))
            # the per-template file eval_gsm_symbolic.py writes, which the selection script reads
            (a.work / f"base_{s}.json").write_text(json.dumps(accs[s], indent=2) + "\n")
        from list_low_performing_gsm_templates import find_low_performing_templates

        selected = sorted(int(k) for k in find_low_performing_templates(str(a.work / "base_train.json"), a.threshold))
    overall = {s: sum(v["accuracy"] for v in accs[s].values()) / max(len(accs[s]), 1) for s in accs}
    info = {"selected": selected, "threshold": a.threshold, "base_accuracy": overall,
            "per_template_train": {str(k): v["accuracy"] for k, v in accs["train"].items()}}
    a.out.write_text(json.dumps(info, indent=1) + "\n")
    return info


def cmd_fix_config(a) -> dict:
    """The fields run_fixing_pipeline.py reads, with SPEC's values (as exps_configs/28.json)."""
    cfg = {"model_name": str(a.model), "train_template_idx": _templates(a.templates),
           "train_size": SPLIT_FRACTIONS["train"], "test_size": SPLIT_FRACTIONS["test"],
           "val_size": SPLIT_FRACTIONS["val"], "train_batch_size": 8, "test_batch_size": a.batch_size,
           "mask_learning_rate": 5e-3, "scheduler_gamma": 0.9, "reg_coeff": 0.01, "n_epochs": a.n_epochs,
           "n_steps": a.n_steps,
           "update_coeff": -0.0001, "update_using_mask": True, "max_new_tokens": a.max_new_tokens,
           "force_dataset_generation": False, "force_mask_generation": True, "force_gradients_generation": True,
           "dataset_path": str(a.dataset), "seed": a.seed, "eval_interval": 5, "save_interval": 10}
    a.out.write_text(json.dumps(cfg, indent=4) + "\n")
    return cfg


def cmd_pivot_config(a) -> dict:
    """generate_dataset.py's YAML (exps_configs/generate_data.yaml's layout): one config key
    with the selected templates, the release's seed for it and the run's token budget."""
    import yaml

    cfg = {"reasoning_clauses": {a.key: {"seed": a.seed, "train_template_idx": _templates(a.templates),
                                         "max_new_tokens": a.max_new_tokens,
                                         "output_file_suffix": f"{a.key}.json"}}}
    a.out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


def cmd_exec(script: Path, args: list[str]) -> None:
    """Run one of the release's scripts as ``python SCRIPT ARGS`` would, adaptations in place."""
    global _LABEL
    script = script.resolve()
    if not script.is_file():
        _fail(f"no such script: {script}")
    _LABEL = _LABEL or script.stem
    orig = _env_path("SBS_ORIG").resolve()
    t0, p0 = time.time(), time.perf_counter()
    # run_fixing_pipeline.py only builds a command line: it needs none of the pipeline's timers
    _setup(orig, with_pipeline=script.name != "run_fixing_pipeline.py")
    sys.path.insert(0, str(script.parent))  # what `python SCRIPT` puts first
    sys.argv = [str(script), *args]
    code = 0
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:  # click ends every command with sys.exit
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        code = 1
        raise
    finally:
        _record("script", t0, time.perf_counter() - p0, script=script.name, exit=code)
    sys.exit(code)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["exec"]:
        if len(argv) < 2:
            _fail("exec needs the release's script to run")
        cmd_exec(Path(argv[1]), argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--templates", required=True, help="template ids, e.g. '269 103'")
    common.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("split", parents=[common])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("base-eval", parents=[common])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threshold", type=float, default=0.8)
    p = sub.add_parser("pivot-config", parents=[common])
    p.add_argument("--key", default="side_by_side")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-new-tokens", type=int, required=True)
    p = sub.add_parser("fix-config", parents=[common])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--dataset", type=Path, required=True, help="the localization dataset generate_dataset.py wrote")
    p.add_argument("--n-steps", type=int, default=50, help="amplification steps (SPEC 50; fewer only for tests)")
    p.add_argument("--n-epochs", type=int, default=50, help="DCM epochs (SPEC 50; fewer only for tests)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=64)
    a = ap.parse_args(argv)
    if a.cmd in ("split", "base-eval"):
        a.orig = _env_path("SBS_ORIG").resolve()
    info = {"split": cmd_split, "base-eval": cmd_base_eval, "pivot-config": cmd_pivot_config,
            "fix-config": cmd_fix_config}[a.cmd](a)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
