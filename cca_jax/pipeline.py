"""The CCA run: data -> base evaluation -> template selection -> pivots -> circuit ->
amplification (val-selected step) -> test evaluation -> report. ``method: sft_full |
sft_lora`` replaces pivots, circuit and amplification with fine-tuning (SPEC 5).

Every stage writes into the run directory and records a hash of its inputs (``stages``);
a rerun reuses each finished stage whose inputs and files are unchanged, and training
resumes from its last committed checkpoint (``train_loop``), so a killed run continues
where it stopped. One run at a time per run directory (an OS lock).

On a device mesh (``mesh:`` of the config, ``cca_jax.mesh``) the model is loaded sharded
and each stage computes in its own layout (``_Run.model_for``); the stage keys do not
hash the mesh, so a run resumes on another one. With several processes every process
runs every stage; process 0 alone writes the run directory (shared storage), logs and
draws progress bars, and the processes agree on which stages are done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from cca_jax import atomic, precision, stages, timing, train_loop
from cca_jax import mesh as mesh_lib
from cca_jax.cca import components
from cca_jax.data import answers, gsm_symbolic
from cca_jax.errors import CCAError
from cca_jax.evaluate import gsm
from cca_jax.runconfig import RunConfig

digest = stages.digest
SFT_EXPORT_DIR = "finetuned"
CCA_EXPORT_DIR = "amplified"


@dataclasses.dataclass
class _Run:
    """What the stages of one run share."""

    config: RunConfig
    dir: Path
    stages: stages.Stages
    model: Any
    tok: Any
    splits: dict
    model_key: dict
    data_key: str
    progress: bool
    log: Callable[[str], None]
    timings: dict
    wall: dict  # import_to_run, started (perf_counter at run()): see _write_summary
    placed: dict = dataclasses.field(default_factory=dict)  # the one cached copy of the weights in another layout

    def layout(self, kind: str, params) -> str:
        return mesh_lib.resolve(getattr(self.config.mesh, kind), kind, params)

    def model_for(self, kind: str):
        """The model laid out for a stage of ``kind`` (generate, dcm, train: ``mesh:`` of the
        config); the stored model itself on one device or when the layouts agree. One
        other layout's copy is kept at a time (the next stage of the same kind reuses it)."""
        params = self.model.params()
        layout = self.layout(kind, params)
        if mesh_lib.mesh_of(params) is None or layout == mesh_lib.layout_of(params):
            self.placed.clear()
            return self.model
        if self.placed.get("layout") != layout:
            self.placed.clear()  # the earlier copy goes before the new one is made
            self.placed.update(layout=layout, model=self.model.with_params(mesh_lib.relayout(params, layout)))
        return self.placed["model"]

    def generating(self, params):
        """A model of ``params`` (e.g. trained ones) in the generation layout."""
        return self.model.with_params(mesh_lib.relayout(params, self.layout("generate", params)))

    @property
    def pad(self) -> int:
        return self.tok.pad_token_id if self.tok.pad_token_id is not None else 0

    @contextlib.contextmanager
    def stage(self, name: str, key: str):
        """Run the block (the stage's work) unless stage ``name`` is done with ``key``:
        yields whether to run it; records the stage's time split either way."""
        todo = bool(mesh_lib.agree(not self.stages.done(name, key)))  # process 0 decides for all
        if todo:
            with timing.account() as acc:
                yield True
            self.stages.finish(name, key, acc.wall, timing=acc.to_json())
            mesh_lib.sync(f"cca_jax stage {name}")  # process 0's files are written before anyone reads them
        else:
            yield False
        self.timings[name] = self.stages.timing(name)

    def evaluate(self, model, split: str, desc: str):
        ev = self.config.eval
        max_new = ev.test_max_new_tokens if split == "test" else ev.max_new_tokens
        return gsm.evaluate(model, self.tok, self.splits[split], mode=ev.answer_mode, max_new_tokens=max_new,
                            batch_size=ev.batch_size, n_shots=ev.shots, chat_template=ev.chat_template,
                            progress=self.progress, desc=desc,
                            generation=self.config.generation.options(self.config.dtype))


@dataclasses.dataclass
class _Trained:
    """A finished training stage: the key later stages build on and the best weights."""

    key: str
    params: Any
    best_step: int
    history: list
    summary: dict  # the method's own summary fields


def run(config: RunConfig, run_dir: str | os.PathLike, *, model=None, tokenizer=None, progress: bool = True,
        on_amplify_step: Callable[[int], None] | None = None, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) CCA, or an SFT baseline (``config.method``), and return the summary
    (also written to summary.json). ``model``/``tokenizer``: an already loaded model (e.g.
    sharded over a mesh) that ``config.model`` names; loaded from ``config.model`` when
    None, sharded over ``config.mesh``. ``on_amplify_step(step)`` is called after every
    amplification or fine-tuning step."""
    from cca_jax import preflight

    started = time.perf_counter()
    if model is None and tokenizer is None and config.tokenizer != "char":
        from cca_jax.load import prefetch_tokenizer
        from cca_jax.models import names

        if config.model not in names():  # (an offline name's file may still need joining)
            prefetch_tokenizer(config.model)  # read while the setup below works
    with timing.account() as setup:
        # data, extras, output dir, model source, the mesh against the devices: before any work
        # (a model given already on a mesh brings its own: the config's mesh places nothing)
        preflight.check(config, run_dir, mesh=model is None or mesh_lib.mesh_of(model.params()) is None)
        run_dir = stages.prepare_run_dir(run_dir)
    if not mesh_lib.is_writer():  # several processes: process 0 logs and draws progress bars
        progress, log = False, (lambda s: None)
    with stages.RunLock(run_dir):
        return _run(config, run_dir, model, tokenizer, progress, on_amplify_step, log, setup, started)


def _run(config, run_dir, model, tok, progress, on_step, log, setup: timing.Account, started: float) -> dict:
    import yaml

    with timing.account() as acc:
        splits, data_key = data_splits(config)  # bad data fails before anything is written or loaded
        atomic.write_text(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        timing.enable_cache(timing.cache_dir(config.compile_cache))
    setup.add(acc)
    # the run's own time outside its stages: checks, data, the process start before ``run``
    timings: dict[str, dict] = {"setup": setup.to_json()}
    import cca_jax

    wall = {"import_to_run": round(started - cca_jax.IMPORTED_AT, 3), "started": started}
    with timing.account() as acc, precision.for_dtype(config.dtype):  # as the stages below
        model, tok, source = _load(config, model, tok)
        if mesh_lib.mesh_of(model.params()) is not None:
            m = mesh_lib.mesh_of(model.params())
            log(f"mesh fsdp={m.shape['fsdp']} x tp={m.shape['tp']} over {m.size} {jax.default_backend()} devices"
                + (f" in {jax.process_count()} processes" if mesh_lib.multi_process() else ""))
    timings["load_model"] = acc.to_json()
    r = _Run(config, run_dir, stages.Stages(run_dir, log), model, tok, splits,
             {"model": stages.model_identity(source), "dtype": config.dtype, "tokenizer": config.tokenizer},
             data_key, progress, log, timings, wall)
    with precision.for_dtype(model.dtype):  # float32 runs: full float32 matmuls on GPUs too
        return _stages(r, config, on_step)


def _stages(r: "_Run", config: RunConfig, on_step) -> dict:
    base_key, base = _base_eval(r)
    selected = _select_templates(r, base)
    if config.method == "cca":
        loc_key, examples, loc_stats = _localize(r, base_key, base, selected)
        circ_key, mask = _circuit(r, loc_key, examples)
        faith = _faithfulness(r, circ_key, examples, mask)
        trained = _amplify(r, circ_key, examples, mask, base, on_step)
        trained.summary.update(localization=loc_stats, faithfulness=faith)
        size = (stages.read_json(r.stages.root / "circuit" / "history.json") or {}).get("size_search")
        if size:
            trained.summary["dcm_size_search"] = size
    else:
        trained = _finetune(r, base_key, base, selected, on_step)
    test_key, test_after = _test(r, trained)
    export_dir = _export(r, trained.params)
    test_before = gsm.accuracy(base["test"])
    summary = {
        "model": config.model,
        "method": config.method,
        **trained.summary,
        "selected_templates": selected,
        "val_accuracy_by_step": {str(h["step"]): h["val_accuracy"] for h in trained.history if "val_accuracy" in h},
        "loss_by_step": {str(h["step"]): h["loss"] for h in trained.history if "loss" in h},
        "best_step": trained.best_step,
        "test_accuracy_before": test_before.to_json(),
        "test_accuracy_after": test_after.to_json(),
        "test_accuracy_selected_templates": {"before": _mean_over(test_before.per_template, selected),
                                             "after": _mean_over(test_after.per_template, selected)},
        # per stage: total, compile (with the number of XLA compiles), device, host
        "timings_seconds": dict(r.timings),
    }
    if export_dir is not None and config.method != "cca":
        summary["export_dir"] = export_dir
    _add_side_effects(r, summary, trained.params, test_key)
    return _write_summary(summary, r.dir, r.log, r.wall)


# -- inputs ---------------------------------------------------------------------------------------

def load(config: RunConfig):
    """(model, tokenizer) as a run of ``config`` loads them: to run several configs of one
    model (a sweep) on one load, pass them to ``run``."""
    model, tok, _ = _load(config, None, None)
    return model, tok


def _load(config: RunConfig, model, tok):
    """(model, tokenizer, the source its identity is read from)."""
    from cca_jax import load_model
    from cca_jax.models import source as model_source

    source = model_source(config.model)
    if model is None:  # on the config's mesh, sharded as it is read (mesh.build: one line if it does not fit)
        model, tok = load_model(source, dtype=config.dtype, attention=config.attention,
                                mesh=mesh_lib.build(config.mesh))
    elif mesh_lib.mesh_of(model.params()) is None and config.mesh.size > 1:
        from cca_jax.weights.sharding import shard_params

        model = model.with_params(shard_params(model.params(), mesh_lib.build(config.mesh)))
    if config.tokenizer == "char":
        from cca_jax.char_tokenizer import char_tokenizer

        tok = char_tokenizer(model.config.vocab_size)
    if tok is None:
        raise CCAError(f"{config.model}: no tokenizer; set tokenizer: char for random test models")
    return model, tok, _resolved(source)


def _resolved(source: str) -> str:
    """A hub id's downloaded snapshot (its files are what the keys hash), else the source."""
    if Path(source).exists():
        return source
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(source, local_files_only=True)
    except Exception:  # not a hub id, or not cached: keyed by name
        return source


def data_splits(config: RunConfig):
    """(train/val/test splits of the config's GSM-Symbolic items, the digest of the items)."""
    items = gsm_symbolic.load_items(config.data.templates, config.data.per_template, config.data.seed,
                                    config.data.template_ids)
    if config.data.template_ids is not None:
        items = [it for it in items if it.template in set(config.data.template_ids)]
    if not items:
        raise CCAError("no GSM-Symbolic items: check data.templates and data.template_ids")
    splits = gsm_symbolic.split(items, config.data.seed, config.data.split)
    data_key = digest([it.to_json() for it in items]
                      + ([] if config.data.split == gsm_symbolic.SPLIT_FRACTIONS else [list(config.data.split)]))
    return splits, data_key


def _records_path(stage_dir: Path, split: str) -> Path:
    return stage_dir / f"{split}.jsonl"


def _read_records(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- stages -----------------------------------------------------------------------------------------

def _base_eval(r: _Run):
    key = digest([r.model_key, r.data_key, dataclasses.asdict(r.config.eval)])
    d = r.stages.dir("base_eval")
    with r.stage("base_eval", key) as todo:
        if todo:
            # the test budget's programs compile on a background thread while train and val
            # generate (a first run's compile time, off its critical path)
            ev = r.config.eval
            gsm.warm(r.model_for("generate"), r.tok, r.splits["test"], max_new_tokens=ev.test_max_new_tokens,
                     batch_size=ev.batch_size, n_shots=ev.shots, chat_template=ev.chat_template,
                     generation=r.config.generation.options(r.config.dtype))
        for split in ("train", "val", "test") if todo else ():
            _, recs = r.evaluate(r.model_for("generate"), split, f"base {split}")
            gsm_symbolic.write_jsonl(recs, _records_path(d, split))
            if split == "train" and r.config.method == "cca" and r.config.data.select_on == "train":
                _warm_localize(r, recs)  # ... and pivot sampling's while val and test generate
    return key, {s: _read_records(_records_path(d, s)) for s in ("train", "val", "test")}


def _selection(r: _Run, base) -> tuple[list[int], dict]:
    """(the templates CCA works on: base accuracy below data.select_threshold, accuracy per template)."""
    dc = r.config.data
    pool = base["train"] if dc.select_on == "train" else base["train"] + base["val"] + base["test"]
    per_t = gsm.accuracy(pool).per_template
    return sorted(t for t, a in per_t.items() if a < dc.select_threshold), per_t


def _warm_localize(r: _Run, train_records) -> None:
    """Compile pivot sampling's programs ahead (``pivots.warm``) for the templates the train
    records select (a base evaluation that runs is followed by a localization that runs)."""
    from cca_jax.cca import pivots

    selected, _ = _selection(r, {"train": train_records})
    if selected:
        greedy, _, gen_kw, pc = _pivot_inputs(r, {"train": train_records}, selected)
        pivots.warm(r.model_for("generate"), greedy, pc, gen_kw)


def _select_templates(r: _Run, base) -> list[int]:
    dc = r.config.data
    selected, per_t = _selection(r, base)
    r.log(f"selected {len(selected)}/{len(per_t)} templates with base accuracy < {dc.select_threshold}")
    if not selected:
        raise CCAError(f"no template scores below data.select_threshold={dc.select_threshold}: "
                       f"nothing to amplify (raise the threshold or use harder templates)")
    return selected


def _localize(r: _Run, base_key, base, selected):
    from cca_jax.cca import examples as ex_lib

    # sampled traces follow the decoder's random draws: a speculative one samples the same
    # distribution with other draws (greedy stages give the same tokens either way)
    sampler = r.config.generation.sampler()
    key = digest([base_key, selected, dataclasses.asdict(r.config.pivots)] + ([sampler] if sampler else []))
    d = r.stages.dir("localize")
    with r.stage("localize", key) as todo:
        if todo:
            exs, stats = _pivotal_tokens(r, base, selected)
            ex_lib.save(exs, d / "examples.jsonl")
            atomic.write_json(d / "stats.json", stats)
    examples = ex_lib.load(d / "examples.jsonl")
    stats = stages.read_json(d / "stats.json")
    r.log(f"localization: {stats}")
    if not examples:
        raise CCAError("localization found no pivotal tokens (no sampled trace flipped correctness): "
                       "try more pivots.n_samples or other templates")
    return key, examples, stats


def _pivot_inputs(r: _Run, base, selected):
    """(greedy traces, their train records, generate options, pivot config) of SPEC 2 on
    the selected templates' train items."""
    from cca_jax.cca import pivots
    from cca_jax.generate import stop_ids

    ev = r.config.eval
    train = [rec for rec in base["train"] if rec["template"] in set(selected)]
    greedy = [pivots.Trace(tuple(rec["prompt_tokens"]), tuple(rec["generated_tokens"]), bool(rec["correct"]))
              for rec in train]
    gen_kw = dict(stop=answers.stop_rule(r.tok), batch_size=ev.batch_size, pad_token_id=r.pad,
                  eos_token_id=stop_ids(r.model, r.tok), **r.config.generation.options(r.config.dtype))
    return greedy, train, gen_kw, dataclasses.replace(r.config.pivots, max_new_tokens=ev.max_new_tokens)


def _pivotal_tokens(r: _Run, base, selected):
    """SPEC 2 on the selected templates' train items: (examples, stats)."""
    from cca_jax.cca import pivots

    ev = r.config.eval
    greedy, train, gen_kw, pc = _pivot_inputs(r, base, selected)
    golds = [rec["gold"] for rec in train]

    def judge_for(i):
        return lambda ids: answers.is_correct(
            answers.extract(r.tok.decode(list(ids), skip_special_tokens=True), ev.answer_mode), golds[i])

    items = [(rec["template"], rec["instance"]) for rec in train]
    return pivots.localize(r.model_for("generate"), greedy, items, judge_for, pc, gen_kw, progress=r.progress)


def _circuit(r: _Run, loc_key, examples):
    cfg = r.config
    method_cfg = {"dcm": cfg.dcm, "random": cfg.random}.get(cfg.localize, cfg.patching)
    like = [] if cfg.localize != "random" or cfg.random.like is None else [_like_mask(cfg.random.like)]
    # unroll changes how DCM's step compiles, not what it computes (as amplify's)
    fields = {k: v for k, v in dataclasses.asdict(method_cfg).items() if k != "unroll"}
    key = digest([loc_key, cfg.localize, fields]
                 + [{k: np.asarray(v).tolist() for k, v in m.items()} for m in like])
    d = r.stages.dir("circuit")
    with r.stage("circuit", key) as todo:
        if todo:
            if cfg.method == "cca" and mesh_lib.mesh_of(r.model.params()) is None:
                from cca_jax.cca import amplify  # its gradient compiles while the circuit is found

                amplify.warm(r.model, examples, cfg.amplify, r.pad)
            _find_circuit(r, d, examples)
    mask = components.load(d / "mask.npz")
    components.check(mask, r.model.config)
    return key, mask


def _find_circuit(r: _Run, d: Path, examples) -> None:
    """mask.npz (and the localizer's own outputs) into ``d``."""
    cfg = r.config
    if cfg.localize == "dcm":
        from cca_jax.cca import dcm, dcm_size

        size = None
        model = r.model_for("dcm")
        if cfg.dcm.target_fraction is None:
            res = dcm.train_mask(model, examples, cfg.dcm, pad_token_id=r.pad, progress=r.progress,
                                 caches_on_host=_dcm_caches_on_host(r, model, examples))
        else:
            res, size = dcm_size.train_mask_of_size(model, examples, cfg.dcm, r.pad, r.progress, r.log)
        _save_components(res.mask, d / "mask.npz")
        _save_components(res.m, d / "m.npz")
        atomic.write_json(d / "history.json", {"history": res.history, "stopped_early": res.stopped_early,
                                               **({"size_search": size} if size else {})})
    elif cfg.localize in ("patching", "attribution"):
        from cca_jax.cca import patching

        pc = cfg.patching
        eff = patching.effects_over_examples(r.model_for("dcm"), examples, cfg.localize, pc.mode, pc.batch_size,
                                             pc.chunk, r.pad, r.progress)
        _save_components(eff, d / "effects.npz")
        _save_components(patching.select(eff, pc.top_k, None if pc.top_k else pc.fraction, pc.by), d / "mask.npz")
    elif cfg.localize == "random":
        rc = cfg.random
        mask = (components.random_like(_like_mask(rc.like), rc.seed) if rc.like is not None
                else components.random_fraction(r.model.config, rc.fraction, rc.seed))
        _save_components(mask, d / "mask.npz")
    else:
        raise CCAError(f"localize must be dcm, patching, attribution or random, got {cfg.localize!r}")


def _save_components(tree: dict, path: Path) -> None:
    if mesh_lib.is_writer():  # several processes: process 0 writes
        components.save(tree, path)


def _dcm_caches_on_host(r: _Run, model, examples) -> bool:
    """mesh.dcm_cache: host, device, or auto (host when the prefix caches would take more
    than mesh.AUTO_FRACTION of a device's memory)."""
    place = r.config.mesh.dcm_cache
    if place != "auto":
        return place == "host"
    params = model.params()
    limit = mesh_lib.device_memory()
    if limit is None:
        return False
    from cca_jax.cca.dcm import cache_bytes

    total = cache_bytes(model.config, examples, r.config.dcm.batch_size, model.dtype)
    cs = mesh_lib.cache_sharding(params, r.config.dcm.batch_size, model.config.num_kv_heads,
                                 mesh_lib.whole_rows(params))
    split = 1
    if cs is not None:
        split = int(np.prod([cs.mesh.shape[a] for a in cs.data])) * (cs.mesh.shape["tp"] if cs.heads else 1)
    on_host = total / split > mesh_lib.AUTO_FRACTION * limit
    if on_host:
        r.log(f"DCM prefix caches ({total / split / 2**30:.1f} GiB per device) wait in host memory "
              f"(mesh.dcm_cache=device keeps them on the devices)")
    return on_host


def _like_mask(like: str) -> dict:
    """random.like: a run directory's circuit, or a mask.npz."""
    return components.load(components.circuit_file(like))


def _faithfulness(r: _Run, circ_key, examples, mask) -> dict:
    """The circuit's share of the logit difference at the pivots, the rest mean-ablated."""
    from cca_jax.cca.faithfulness import faithfulness

    d = r.stages.dir("faithfulness")
    with r.stage("faithfulness", digest([circ_key, "mean-ablation"])) as todo:
        if todo:
            atomic.write_json(d / "faithfulness.json",
                              faithfulness(r.model_for("dcm"), examples, mask, r.config.dcm.batch_size, r.pad))
    return stages.read_json(d / "faithfulness.json")


def _train(r: _Run, name: str, key: str, trainer, base, on_step) -> train_loop.LoopResult:
    """The train-and-select loop as a stage: val accuracy at eval steps, best step kept,
    checkpoints committed in the stage directory."""
    d = r.stages.dir(name)

    def val_accuracy(params, step):
        return r.evaluate(r.generating(params), "val", f"val step {step}")[0].overall

    ckpt = train_loop.Checkpoints(d, key)
    done = bool(mesh_lib.agree(r.stages.done(name, key)))
    with timing.account() as acc:
        res = train_loop.train_and_select(trainer, val_accuracy, gsm.accuracy(base["val"]).overall, ckpt,
                                          progress=r.progress, on_step=on_step, log=r.log)
    if not done:
        split = acc.to_json()
        if res.seconds > acc.wall + 0.5:  # resumed: earlier processes ran the first steps
            split["earlier_runs"] = round(res.seconds - acc.wall, 3)
        split["loop"] = res.parts  # this process's seconds in steps, val evaluations, checkpoints
        r.stages.finish(name, key, res.seconds, timing=split)
        mesh_lib.sync(f"cca_jax stage {name}")
    r.timings[name] = r.stages.timing(name)
    return res


def _amplify(r: _Run, circ_key, examples, mask, base, on_step) -> _Trained:
    from cca_jax.cca import amplify as amp

    acfg = r.config.amplify
    # unroll changes how the step compiles, not what it computes: runs resume across it
    fields = {k: v for k, v in dataclasses.asdict(acfg).items() if k != "unroll"}
    key = digest([circ_key, fields, digest(base["val"])])
    trainer = amp.Amplifier(r.model_for("train"), examples, mask, acfg, r.pad)
    res = _train(r, "amplify", key, trainer, base, on_step)
    params = r.model.params()
    n_sel, total = components.count(mask), components.total(r.model.config)
    return _Trained(key, trainer.working_params(res.best_master), res.best_step, res.history, {
        "components_total": total,
        "components_selected": n_sel,
        "fraction_components": n_sel / total,
        "components_per_layer": components.per_layer(mask),
        "fraction_parameters_changed": (components.fraction_parameters_changed(mask, params, acfg.targets)
                                        if acfg.update_using_mask else 1.0),
    })


def _finetune(r: _Run, base_key, base, selected, on_step) -> _Trained:
    """SPEC 5 baselines: fine-tune (full or LoRA) on the selected templates' train items,
    keep the best step by val accuracy (step 0 = the base model)."""
    from cca_jax.baselines import lora as lora_lib
    from cca_jax.baselines import sft

    method, scfg, ev = r.config.method, r.config.sft, r.config.eval
    train_items = [it for it in r.splits["train"] if it.template in set(selected)]
    examples = sft.build_examples(r.tok, train_items, ev.shots, ev.chat_template, scfg.append_eos)
    # the prompt part must be exactly what evaluation fed the model
    fed = {(rec["template"], rec["instance"]): rec["prompt_tokens"] for rec in base["train"]}
    for e in examples:
        if list(e.prompt) != fed.get((e.template, e.instance)):
            raise CCAError(f"template {e.template} instance {e.instance}: the training prompt differs from the "
                           f"evaluated one (tokenizer or eval settings changed?): delete {r.stages.root}/base_eval")
    trainer = sft.FineTuner(method, r.model_for("train"), examples, scfg, r.pad)
    r.log(f"{method}: {len(examples)} training examples (padded to {trainer.T} tokens, {trainer.P} answer tokens)")
    key = digest([base_key, selected, method, dataclasses.asdict(scfg), digest(base["val"]),
                  [[list(e.prompt), list(e.answer)] for e in examples]])
    res = _train(r, "sft", key, trainer, base, on_step)
    params = r.model.params()
    total = components.total(r.model.config)
    summary = {
        # fine-tuning may change every component
        "components_total": total,
        "components_selected": total,
        "fraction_components": 1.0,
        "components_per_layer": components.per_layer(components.full(r.model.config)),
        "fraction_parameters_changed": sft.fraction_parameters_changed(method, params, scfg),
        "trainable_parameters": sft.trainable_parameters(method, res.best_master),
        "total_parameters": sum(int(x.size) for x in jax.tree.leaves(params)),
        "train_examples": len(examples),
    }
    if method == "sft_lora":
        summary["lora"] = {"r": scfg.lora_r, "alpha": scfg.lora_alpha, "dropout": scfg.lora_dropout,
                           "targets": list(scfg.lora_targets),
                           "adapter_parameters": lora_lib.num_params(res.best_master)}
    return _Trained(key, trainer.working_params(res.best_master), res.best_step, res.history, summary)


def _test(r: _Run, trained: _Trained):
    key = digest([trained.key, trained.best_step])
    d = r.stages.dir("test")
    with r.stage("test", key) as todo:
        if todo:
            _, recs = r.evaluate(r.generating(trained.params), "test", "test (best)")
            gsm_symbolic.write_jsonl(recs, _records_path(d, "test"))
    r.timings["test_eval"] = r.timings.pop("test")
    return key, gsm.accuracy(_read_records(_records_path(d, "test")))


def _export(r: _Run, params) -> str | None:
    if not r.config.export:
        return None
    from cca_jax import export_hf

    name = CCA_EXPORT_DIR if r.config.method == "cca" else SFT_EXPORT_DIR
    with timing.account() as acc:
        if mesh_lib.multi_process():  # every process gathers tensor by tensor; process 0 writes
            host = mesh_lib.host(params)
            if mesh_lib.is_writer():
                from cca_jax.config import parse_dtype
                from cca_jax.weights import hf

                hf.write(r.model.config, host, r.dir / name, parse_dtype(r.model.dtype), r.tok)
            del host
            mesh_lib.sync("cca_jax export")
        else:  # one tensor at a time to the host (weights.hf)
            export_hf(r.model.with_params(params), r.dir / name, tokenizer=r.tok)
    r.timings["export"] = acc.to_json()
    return name


def _add_side_effects(r: _Run, summary, params_after, after_key):
    """SPEC 5 benchmarks on the base model (a stage of its own, shared by reruns) and on
    the final model; before/after/delta per task into the summary."""
    se = r.config.side_effects
    if not se.tasks:
        return
    from cca_jax.evaluate import tasks as tasks_lib

    se_cfg = dataclasses.asdict(se)
    tasks_lib.prepare(list(se.tasks), limit=se.limit, data_dir=se.data_dir)  # bad names/data fail before any work
    out = {}
    for name, m, key in (("side_effects_before", r.model_for("generate"), digest([r.model_key, se_cfg])),
                         ("side_effects_after", r.generating(params_after), digest([after_key, se_cfg]))):
        d = r.stages.dir(name)
        with r.stage(name, key) as todo:
            if todo:
                res = tasks_lib.run_tasks(m, r.tok, list(se.tasks), limit=se.limit, data_dir=se.data_dir,
                                          batch_size=se.batch_size, progress=r.progress,
                                          gsm8k_max_new_tokens=se.gsm8k_max_new_tokens,
                                          generation=r.config.generation.options(r.config.dtype))
                atomic.write_json(d / "results.json", res)
        out[name] = stages.read_json(d / "results.json")
        summary["timings_seconds"][name] = r.timings[name]
    before, after = out["side_effects_before"], out["side_effects_after"]
    summary["side_effects"] = {t: {"before": before[t]["score"], "after": after[t]["score"], "n": after[t]["n"],
                                   **tasks_lib.paired_delta(before[t], after[t])}
                               for t in before}
    r.log("side effects: " + ", ".join(f"{t} {v['before']:.3f} -> {v['after']:.3f}"
                                       for t, v in summary["side_effects"].items()))


def _write_summary(summary: dict, run_dir: Path, log, wall: dict | None = None) -> dict:
    """summary.json, then the plots and report.md; with ``wall`` (the run's), the seconds
    of the whole run: from ``import cca_jax`` to ``run`` (a CLI run's start-up, all but the
    interpreter's own), in ``run`` up to the summary, the plots and report (summary.json
    written again with them)."""
    if wall is not None:
        summary["wall_seconds"] = {"import_to_run": wall["import_to_run"],
                                   "run": round(time.perf_counter() - wall["started"], 3)}
    atomic.write_json(run_dir / "summary.json", summary)
    t = time.perf_counter()
    try:
        from cca_jax import report

        report.plots(summary, run_dir)
    except ImportError as err:  # matplotlib is in the [viz] extra
        log(f"plots skipped ({err}): pip install 'cca-jax[viz]'")
    if wall is not None:
        summary["wall_seconds"]["plots_and_report"] = round(time.perf_counter() - t, 3)
        atomic.write_json(run_dir / "summary.json", summary)
    return summary


def _mean_over(per_template: dict, templates) -> float | None:
    vals = [per_template[t] for t in templates if t in per_template]
    return float(np.mean(vals)) if vals else None


def saved_master(run_dir: str | os.PathLike, stage: str = "amplify", which: str = "best") -> dict:
    """{dotted leaf key: float32 array} of a run's trained master (``stage``: amplify, or
    sft for the fine-tuning baselines): ``which="best"`` the val-selected step ({} when
    that is step 0, the unchanged model), ``"current"`` the last committed step."""
    d = Path(run_dir) / "stages" / stage
    prog = stages.read_json(d / train_loop.PROGRESS)
    if not isinstance(prog, dict) or "checkpoint" not in prog:
        raise CCAError(f"{run_dir}: no trained weights (stages/{stage}/{train_loop.PROGRESS}): not a finished run")
    ckpt = prog.get("best") if which == "best" else prog["checkpoint"]
    return {} if ckpt is None else stages.load_flat(d / ckpt, "master")
