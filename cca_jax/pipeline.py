"""The CCA run: data -> base evaluation -> template selection -> pivots -> circuit ->
amplification (val-selected step) -> test evaluation -> report.

Every stage writes into the run directory and records a hash of its inputs; a rerun
reuses each finished stage whose inputs are unchanged, and amplification resumes from
its last checkpoint, so a killed run continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from cca_jax import atomic
from cca_jax.cca import amplify as amp
from cca_jax.cca import components, dcm, pivots
from cca_jax.cca import examples as ex_lib
from cca_jax.data import answers, gsm_symbolic
from cca_jax.errors import CCAError
from cca_jax.evaluate import gsm
from cca_jax.runconfig import RunConfig


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


_write_json = atomic.write_json


def _read_json(path: Path):
    return json.loads(path.read_text())


class Stages:
    """Per-stage directories with a completion record holding the inputs' hash."""

    def __init__(self, run_dir: Path):
        self.root = run_dir / "stages"

    def dir(self, name: str) -> Path:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def done(self, name: str, key: str) -> bool:
        f = self.root / name / "done.json"
        return f.exists() and _read_json(f).get("key") == key

    def finish(self, name: str, key: str, seconds: float) -> None:
        _write_json(self.root / name / "done.json", {"key": key, "seconds": seconds})

    def seconds(self, name: str) -> float:
        f = self.root / name / "done.json"
        return _read_json(f)["seconds"] if f.exists() else 0.0


def model_identity(source: str) -> dict:
    p = Path(source)
    if p.is_file():
        st = p.stat()
        ident = {"path": str(p.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns}
        if p.suffix in (".yaml", ".yml"):
            ident["content"] = hashlib.sha256(p.read_bytes()).hexdigest()
        return ident
    if p.is_dir():
        return {"path": str(p.resolve()), "files": sorted((f.name, f.stat().st_size) for f in p.glob("*.safetensors"))}
    return {"hub": source}


def _records_path(stage_dir: Path, split: str) -> Path:
    return stage_dir / f"{split}.jsonl"


def _read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def leaf_key(path) -> str:
    """A pytree leaf's path as the dotted name its checkpoints are keyed by."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _save_tree(path: Path, tree) -> None:
    """Orbax checkpoint of a pytree's leaves keyed by their paths (atomic: orbax writes a
    temporary directory and renames it)."""
    import orbax.checkpoint as ocp

    flat = {leaf_key(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    if not flat:  # e.g. plain SGD's optimizer state: nothing to save
        path.mkdir(parents=True, exist_ok=True)
        return
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path.absolute(), flat, force=True)
    ckpt.wait_until_finished()


def _load_tree(path: Path, template):
    import orbax.checkpoint as ocp

    leaves = jax.tree_util.tree_leaves_with_path(template)
    if not leaves:
        return template
    abstract = {leaf_key(p): jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for p, x in leaves}
    flat = ocp.StandardCheckpointer().restore(path.absolute(), abstract)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), [flat[leaf_key(p)] for p, _ in leaves])


def run(config: RunConfig, run_dir: str | os.PathLike, *, progress: bool = True,
        on_amplify_step: Callable[[int], None] | None = None, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) CCA, or an SFT baseline (``config.method``), and return the summary
    (also written to summary.json). ``on_amplify_step(step)`` is called after every
    amplification or fine-tuning step."""
    from cca_jax import load_model
    from cca_jax.generate import stop_ids
    from cca_jax.models import source as model_source

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stages = Stages(run_dir)
    import yaml

    atomic.write_text(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    timings: dict[str, float] = {}

    # -- model and data ----------------------------------------------------------------
    t0 = time.perf_counter()
    source = model_source(config.model)
    model, tok = load_model(source, dtype=config.dtype, attention=config.attention)
    if config.tokenizer == "char":
        from cca_jax.char_tokenizer import char_tokenizer

        tok = char_tokenizer(model.config.vocab_size)
    if tok is None:
        raise CCAError(f"{config.model}: no tokenizer; set tokenizer: char for random test models")
    timings["load_model"] = time.perf_counter() - t0
    model_key = {"model": model_identity(source), "dtype": config.dtype, "tokenizer": config.tokenizer}

    items = gsm_symbolic.load_items(config.data.templates, config.data.per_template, config.data.seed)
    if config.data.template_ids is not None:
        items = [it for it in items if it.template in set(config.data.template_ids)]
    if not items:
        raise CCAError("no GSM-Symbolic items: check data.templates and data.template_ids")
    splits = gsm_symbolic.split(items, config.data.seed, config.data.split)
    data_key = _hash([it.to_json() for it in items]
                     + ([] if config.data.split == gsm_symbolic.SPLIT_FRACTIONS else [list(config.data.split)]))
    ev = config.eval

    def evaluate(m, split_items, max_new, desc):
        return gsm.evaluate(m, tok, split_items, mode=ev.answer_mode, max_new_tokens=max_new,
                            batch_size=ev.batch_size, n_shots=ev.shots, chat_template=ev.chat_template,
                            progress=progress, desc=desc)

    # -- base evaluation -----------------------------------------------------------------
    base_key = _hash([model_key, data_key, dataclasses.asdict(ev)])
    base_dir = stages.dir("base_eval")
    if not stages.done("base_eval", base_key):
        t0 = time.perf_counter()
        for split in ("train", "val", "test"):
            mx = ev.test_max_new_tokens if split == "test" else ev.max_new_tokens
            _, recs = evaluate(model, splits[split], mx, f"base {split}")
            gsm_symbolic.write_jsonl(recs, _records_path(base_dir, split))
        stages.finish("base_eval", base_key, time.perf_counter() - t0)
    base = {s: _read_records(_records_path(base_dir, s)) for s in ("train", "val", "test")}
    timings["base_eval"] = stages.seconds("base_eval")

    # -- template selection -----------------------------------------------------------------
    pool = base["train"] if config.data.select_on == "train" else base["train"] + base["val"] + base["test"]
    per_t = gsm.accuracy(pool).per_template
    selected = sorted(t for t, a in per_t.items() if a < config.data.select_threshold)
    log(f"selected {len(selected)}/{len(per_t)} templates with base accuracy < {config.data.select_threshold}")
    if not selected:
        raise CCAError(f"no template scores below data.select_threshold={config.data.select_threshold}: "
                       f"nothing to amplify (raise the threshold or use harder templates)")
    if config.method != "cca":
        return _run_sft(config, run_dir, stages, model, tok, splits, base, base_key, selected, evaluate,
                        timings, progress, on_amplify_step, log, model_key)

    # -- localization data ----------------------------------------------------------------------
    loc_key = _hash([base_key, selected, dataclasses.asdict(config.pivots)])
    loc_dir = stages.dir("localize")
    if not stages.done("localize", loc_key):
        t0 = time.perf_counter()
        train = [r for r in base["train"] if r["template"] in set(selected)]
        greedy = [pivots.Trace(tuple(r["prompt_tokens"]), tuple(r["generated_tokens"]), bool(r["correct"]))
                  for r in train]
        golds = [r["gold"] for r in train]

        def judge_for(i):
            return lambda ids: answers.is_correct(
                answers.extract(tok.decode(list(ids), skip_special_tokens=True), ev.answer_mode), golds[i])

        gen_kw = dict(stop=answers.stop_rule(tok), batch_size=ev.batch_size, pad_token_id=_pad(tok),
                      eos_token_id=stop_ids(model, tok))
        pc = dataclasses.replace(config.pivots, max_new_tokens=ev.max_new_tokens)
        exs, stats = pivots.localize(model, greedy, [(r["template"], r["instance"]) for r in train], judge_for,
                                     pc, gen_kw, progress=progress)
        ex_lib.save(exs, loc_dir / "examples.jsonl")
        _write_json(loc_dir / "stats.json", stats)
        stages.finish("localize", loc_key, time.perf_counter() - t0)
    examples = ex_lib.load(loc_dir / "examples.jsonl")
    loc_stats = _read_json(loc_dir / "stats.json")
    timings["localize"] = stages.seconds("localize")
    log(f"localization: {loc_stats}")
    if not examples:
        raise CCAError("localization found no pivotal tokens (no sampled trace flipped correctness): "
                       "try more pivots.n_samples or other templates")

    # -- circuit -------------------------------------------------------------------------------
    method_cfg = config.dcm if config.localize == "dcm" else config.patching
    circ_key = _hash([loc_key, config.localize, dataclasses.asdict(method_cfg)])
    circ_dir = stages.dir("circuit")
    if not stages.done("circuit", circ_key):
        t0 = time.perf_counter()
        if config.localize == "dcm":
            res = dcm.train_mask(model, examples, config.dcm, pad_token_id=_pad(tok), progress=progress)
            components.save(res.mask, circ_dir / "mask.npz")
            np.savez(circ_dir / "m.npz", **res.m)
            _write_json(circ_dir / "history.json", {"history": res.history, "stopped_early": res.stopped_early})
        elif config.localize in ("patching", "attribution"):
            from cca_jax.cca import patching

            pc = config.patching
            eff = patching.effects_over_examples(model, examples, config.localize, pc.mode, pc.batch_size,
                                                 pc.chunk, _pad(tok), progress)
            np.savez(circ_dir / "effects.npz", **eff)
            components.save(patching.select(eff, pc.top_k, None if pc.top_k else pc.fraction, pc.by),
                            circ_dir / "mask.npz")
        else:
            raise CCAError(f"localize must be dcm, patching or attribution, got {config.localize!r}")
        stages.finish("circuit", circ_key, time.perf_counter() - t0)
    mask = components.load(circ_dir / "mask.npz")
    components.check(mask, model.config)
    timings["circuit"] = stages.seconds("circuit")

    # -- amplification (resumable) -----------------------------------------------------------
    acfg = config.amplify
    # unroll changes how the step compiles, not what it computes: runs resume across it
    amp_fields = {k: v for k, v in dataclasses.asdict(acfg).items() if k != "unroll"}
    amp_key = _hash([circ_key, amp_fields, _hash(base["val"])])
    amp_dir = stages.dir("amplify")
    params = model.params()
    sel, row_masks = amp.selection_and_masks(mask, params, acfg)
    opt = amp.make_optimizer(acfg, row_masks)
    state, frozen = amp.init_state(params, sel, opt)
    dtype = model.dtype
    prog_f = amp_dir / "progress.json"
    if not stages.done("amplify", amp_key):
        t_start = time.perf_counter()
        if prog_f.exists() and _read_json(prog_f).get("key") == amp_key:
            prog = _read_json(prog_f)
            state.master = _load_tree(amp_dir / "state_master", state.master)
            state.opt_state = _load_tree(amp_dir / "state_opt", state.opt_state)
            state.step, state.history = prog["step"], prog["history"]
            state.best_step, state.best_val = prog["best_step"], prog["best_val"]
            spent = prog["seconds"]
            log(f"resuming amplification at step {state.step}")
        else:
            for name in ("state_master", "state_opt", "best_master"):
                shutil.rmtree(amp_dir / name, ignore_errors=True)
            val0 = gsm.accuracy(base["val"]).overall
            state.history = [{"step": 0, "val_accuracy": val0}]
            state.best_step, state.best_val = 0, val0
            _save_tree(amp_dir / "best_master", state.master)
            spent = 0.0
        bs = ex_lib.batches(examples, acfg.batch_size, seed=0, pad=_pad(tok))
        apply = amp.step_fn(opt)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=acfg.steps, initial=state.step, desc="amplify", unit="step")
        while state.step < acfg.steps:
            # the gradient of the model as it runs (working dtype); the update lands in float32
            train_now = jax.tree.map(lambda x: x.astype(dtype), state.master)
            loss, grad = amp.full_batch_grad(model.config, train_now, frozen, bs, len(examples), acfg.remat,
                                             acfg.unroll)
            del train_now  # peak memory: the working copy is not needed for the update
            state.master, state.opt_state = apply(state.master, state.opt_state, grad)
            del grad
            state.step += 1
            rec = {"step": state.step, "loss": loss}
            if state.step in acfg.eval_steps or state.step == acfg.steps:
                m_now = model.with_params(amp.working_params(state.master, frozen, dtype))
                acc, _ = evaluate(m_now, splits["val"], ev.max_new_tokens, f"val step {state.step}")
                rec["val_accuracy"] = acc.overall
                if acc.overall > state.best_val:
                    state.best_step, state.best_val = state.step, acc.overall
                    _save_tree(amp_dir / "best_master", state.master)
                state.history.append(rec)
                _save_tree(amp_dir / "state_master", state.master)
                _save_tree(amp_dir / "state_opt", state.opt_state)
                _write_json(prog_f, {"key": amp_key, "step": state.step, "history": state.history,
                                     "best_step": state.best_step, "best_val": state.best_val,
                                     "seconds": spent + time.perf_counter() - t_start})
            else:
                state.history.append(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", best=f"{state.best_val:.3f}@{state.best_step}")
            if on_amplify_step is not None:
                on_amplify_step(state.step)
        if bar is not None:
            bar.close()
        stages.finish("amplify", amp_key, spent + time.perf_counter() - t_start)
    prog = _read_json(prog_f)
    timings["amplify"] = stages.seconds("amplify")
    best_master = _load_tree(amp_dir / "best_master", state.master)
    best_params = amp.working_params(best_master, frozen, dtype)

    # -- test ------------------------------------------------------------------------------------
    test_key = _hash([amp_key, prog["best_step"]])
    test_dir = stages.dir("test")
    if not stages.done("test", test_key):
        t0 = time.perf_counter()
        _, recs = evaluate(model.with_params(best_params), splits["test"], ev.test_max_new_tokens, "test (best)")
        gsm_symbolic.write_jsonl(recs, _records_path(test_dir, "test"))
        stages.finish("test", test_key, time.perf_counter() - t0)
    test_after = gsm.accuracy(_read_records(_records_path(test_dir, "test")))
    if config.export:
        from cca_jax import export_hf

        t0 = time.perf_counter()
        export_hf(model.with_params(best_params), run_dir / "amplified", tokenizer=tok)
        timings["export"] = time.perf_counter() - t0
    test_before = gsm.accuracy(base["test"])
    timings["test_eval"] = stages.seconds("test")

    # -- report -----------------------------------------------------------------------------------
    n_sel = components.count(mask)
    total = components.total(model.config)
    sel_test_before = _mean_over(test_before.per_template, selected)
    sel_test_after = _mean_over(test_after.per_template, selected)
    summary = {
        "model": config.model,
        "method": "cca",
        "components_total": total,
        "components_selected": n_sel,
        "fraction_components": n_sel / total,
        "components_per_layer": components.per_layer(mask),
        "fraction_parameters_changed": (components.fraction_parameters_changed(mask, params, acfg.targets)
                                        if acfg.update_using_mask else 1.0),
        "selected_templates": selected,
        "localization": loc_stats,
        "val_accuracy_by_step": {str(h["step"]): h["val_accuracy"] for h in prog["history"] if "val_accuracy" in h},
        "loss_by_step": {str(h["step"]): h["loss"] for h in prog["history"] if "loss" in h},
        "best_step": prog["best_step"],
        "test_accuracy_before": test_before.to_json(),
        "test_accuracy_after": test_after.to_json(),
        "test_accuracy_selected_templates": {"before": sel_test_before, "after": sel_test_after},
        "timings_seconds": {k: round(v, 2) for k, v in timings.items()},
    }
    _add_side_effects(summary, config, stages, model, tok, best_params, model_key, test_key, progress, log)
    return _write_summary(summary, run_dir, log)


def _add_side_effects(summary, config, stages, model, tok, params_after, model_key, after_key, progress, log):
    """SPEC 5 benchmarks on the base model (a stage of its own, shared by reruns) and on
    the final model; before/after/delta per task into the summary."""
    se = config.side_effects
    if not se.tasks:
        return
    from cca_jax.evaluate import tasks as tasks_lib

    se_cfg = dataclasses.asdict(se)
    tasks_lib.prepare(list(se.tasks), limit=se.limit, data_dir=se.data_dir)  # bad names/data fail before any work
    out = {}
    for name, m, key in (("side_effects_before", model, _hash([model_key, se_cfg])),
                         ("side_effects_after", model.with_params(params_after), _hash([after_key, se_cfg]))):
        d = stages.dir(name)
        if not stages.done(name, key):
            t0 = time.perf_counter()
            res = tasks_lib.run_tasks(m, tok, list(se.tasks), limit=se.limit, data_dir=se.data_dir,
                                      batch_size=se.batch_size, progress=progress,
                                      gsm8k_max_new_tokens=se.gsm8k_max_new_tokens)
            _write_json(d / "results.json", res)
            stages.finish(name, key, time.perf_counter() - t0)
        out[name] = _read_json(d / "results.json")
        summary["timings_seconds"][name] = round(stages.seconds(name), 2)
    before, after = out["side_effects_before"], out["side_effects_after"]
    summary["side_effects"] = {t: {"before": before[t]["score"], "after": after[t]["score"], "n": after[t]["n"],
                                   **tasks_lib.paired_delta(before[t], after[t])}
                               for t in before}
    log("side effects: " + ", ".join(f"{t} {v['before']:.3f} -> {v['after']:.3f}" for t, v in summary["side_effects"].items()))


def _write_summary(summary: dict, run_dir: Path, log) -> dict:
    _write_json(run_dir / "summary.json", summary)
    try:
        from cca_jax import report

        report.plots(summary, run_dir)
    except ImportError as err:  # matplotlib is in the [viz] extra
        log(f"plots skipped ({err}): pip install 'cca-jax[viz]'")
    return summary


def _run_sft(config: RunConfig, run_dir: Path, stages: Stages, model, tok, splits, base, base_key, selected,
             evaluate, timings, progress, on_step, log, model_key) -> dict:
    """SPEC 5 baselines: fine-tune (full or LoRA) on the selected templates' train items,
    keep the best step by val accuracy (step 0 = the base model), test it once."""
    from cca_jax.baselines import lora as lora_lib
    from cca_jax.baselines import sft

    method, scfg, ev = config.method, config.sft, config.eval
    train_items = [it for it in splits["train"] if it.template in set(selected)]
    examples = sft.build_examples(tok, train_items, ev.shots, ev.chat_template, scfg.append_eos)
    # the prompt part must be exactly what evaluation fed the model
    fed = {(r["template"], r["instance"]): r["prompt_tokens"] for r in base["train"]}
    for e in examples:
        if list(e.prompt) != fed.get((e.template, e.instance)):
            raise CCAError(f"template {e.template} instance {e.instance}: the training prompt differs from the "
                           f"evaluated one (tokenizer or eval settings changed?): delete {stages.root}/base_eval")
    T, P = sft.shapes(examples)
    log(f"{method}: {len(examples)} training examples (padded to {T} tokens, {P} answer tokens)")

    sft_key = _hash([base_key, selected, method, dataclasses.asdict(scfg), _hash(base["val"]),
                     [[list(e.prompt), list(e.answer)] for e in examples]])
    sft_dir = stages.dir("sft")
    params = model.params()
    dtype = model.dtype
    state, frozen, opt = sft.init_state(method, params, scfg)
    prog_f = sft_dir / "progress.json"
    if not stages.done("sft", sft_key):
        t_start = time.perf_counter()
        if prog_f.exists() and _read_json(prog_f).get("key") == sft_key:
            prog = _read_json(prog_f)
            state.master = _load_tree(sft_dir / "state_master", state.master)
            state.opt_state = _load_tree(sft_dir / "state_opt", state.opt_state)
            state.step, state.history = prog["step"], prog["history"]
            state.best_step, state.best_val = prog["best_step"], prog["best_val"]
            spent = prog["seconds"]
            log(f"resuming {method} at step {state.step}")
        else:
            for name in ("state_master", "state_opt", "best_master"):
                shutil.rmtree(sft_dir / name, ignore_errors=True)
            val0 = gsm.accuracy(base["val"]).overall
            state.history = [{"step": 0, "val_accuracy": val0}]
            state.best_step, state.best_val = 0, val0
            _save_tree(sft_dir / "best_master", state.master)
            spent = 0.0
        step_fn = sft.make_step(method, scfg, model.config, opt, dtype)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=scfg.steps, initial=state.step, desc=method, unit="step")
        while state.step < scfg.steps:
            batch = sft.to_device(sft.step_batch(examples, scfg, state.step, T, P, _pad(tok)))
            state.master, state.opt_state, loss, gnorm = step_fn(
                state.master, state.opt_state, frozen, batch, sft.dropout_key(scfg, state.step))
            state.step += 1
            rec = {"step": state.step, "loss": float(loss), "grad_norm": float(gnorm)}
            if scfg.is_eval_step(state.step):
                m_now = model.with_params(sft.working_params(method, state.master, frozen, dtype, scfg))
                acc, _ = evaluate(m_now, splits["val"], ev.max_new_tokens, f"val step {state.step}")
                rec["val_accuracy"] = acc.overall
                if acc.overall > state.best_val:
                    state.best_step, state.best_val = state.step, acc.overall
                    _save_tree(sft_dir / "best_master", state.master)
                state.history.append(rec)
                _save_tree(sft_dir / "state_master", state.master)
                _save_tree(sft_dir / "state_opt", state.opt_state)
                _write_json(prog_f, {"key": sft_key, "step": state.step, "history": state.history,
                                     "best_step": state.best_step, "best_val": state.best_val,
                                     "seconds": spent + time.perf_counter() - t_start})
            else:
                state.history.append(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss):.3f}", best=f"{state.best_val:.3f}@{state.best_step}")
            if on_step is not None:
                on_step(state.step)
        if bar is not None:
            bar.close()
        stages.finish("sft", sft_key, spent + time.perf_counter() - t_start)
    prog = _read_json(prog_f)
    timings["sft"] = stages.seconds("sft")
    best_master = _load_tree(sft_dir / "best_master", state.master)
    best_params = sft.working_params(method, best_master, frozen, dtype, scfg)

    test_key = _hash([sft_key, prog["best_step"]])
    test_dir = stages.dir("test")
    if not stages.done("test", test_key):
        t0 = time.perf_counter()
        _, recs = evaluate(model.with_params(best_params), splits["test"], ev.test_max_new_tokens, "test (best)")
        gsm_symbolic.write_jsonl(recs, _records_path(test_dir, "test"))
        stages.finish("test", test_key, time.perf_counter() - t0)
    test_after = gsm.accuracy(_read_records(_records_path(test_dir, "test")))
    timings["test_eval"] = stages.seconds("test")
    if config.export:
        from cca_jax import export_hf

        t0 = time.perf_counter()
        export_hf(model.with_params(best_params), run_dir / SFT_EXPORT_DIR, tokenizer=tok)
        timings["export"] = time.perf_counter() - t0
    test_before = gsm.accuracy(base["test"])

    total = components.total(model.config)
    every = components.full(model.config)
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    summary = {
        "model": config.model,
        "method": method,
        # fine-tuning may change every component
        "components_total": total,
        "components_selected": total,
        "fraction_components": 1.0,
        "components_per_layer": components.per_layer(every),
        "fraction_parameters_changed": sft.fraction_parameters_changed(method, params, scfg),
        "trainable_parameters": sft.trainable_parameters(method, state.master),
        "total_parameters": n_params,
        "train_examples": len(examples),
        "selected_templates": selected,
        "val_accuracy_by_step": {str(h["step"]): h["val_accuracy"] for h in prog["history"] if "val_accuracy" in h},
        "loss_by_step": {str(h["step"]): h["loss"] for h in prog["history"] if "loss" in h},
        "best_step": prog["best_step"],
        "test_accuracy_before": test_before.to_json(),
        "test_accuracy_after": test_after.to_json(),
        "test_accuracy_selected_templates": {"before": _mean_over(test_before.per_template, selected),
                                             "after": _mean_over(test_after.per_template, selected)},
        "timings_seconds": {k: round(v, 2) for k, v in timings.items()},
    }
    if method == "sft_lora":
        summary["lora"] = {"r": scfg.lora_r, "alpha": scfg.lora_alpha, "dropout": scfg.lora_dropout,
                           "targets": list(scfg.lora_targets),
                           "adapter_parameters": lora_lib.num_params(state.master)}
    if config.export:
        summary["export_dir"] = SFT_EXPORT_DIR
    _add_side_effects(summary, config, stages, model, tok, best_params, model_key, test_key, progress, log)
    return _write_summary(summary, run_dir, log)


SFT_EXPORT_DIR = "finetuned"


def _mean_over(per_template: dict, templates) -> float | None:
    vals = [per_template[t] for t in templates if t in per_template]
    return float(np.mean(vals)) if vals else None


def _pad(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else 0

