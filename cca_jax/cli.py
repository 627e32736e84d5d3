"""The ``cca-jax`` command: thin wrappers that parse, call the API and print.

Errors caused by input (``CCAError``) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from cca_jax.config import ATTENTION
from cca_jax.evaluate.tasks import TASKS

DTYPE_HELP = "auto (the default: the dtype the checkpoint stores its weights in), float32, bfloat16 or float16"


def _source(model: str) -> str:
    from cca_jax import models

    return models.source(model)


def _summary(model) -> dict:
    import jax

    cfg = model.config
    n_params = sum(int(x.size) for x in jax.tree.leaves(model.params()))
    return {
        "family": cfg.family,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "mlp_neurons": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "parameters": n_params,
        "components": cfg.num_components,
        "components_per_layer": cfg.components_per_layer,
        "dtype": str(model.dtype),
    }


def cmd_info(args) -> int:
    from cca_jax import load_model

    model, tok = load_model(_source(args.model), dtype=args.dtype, with_tokenizer=args.prompt is not None)
    info = _summary(model)
    if args.prompt is not None:
        import jax.numpy as jnp

        if tok is None:
            from cca_jax.errors import CCAError

            raise CCAError(f"{args.model}: no tokenizer found, cannot encode --prompt")
        ids = tok(args.prompt)["input_ids"]
        logits = model(jnp.asarray([ids]), at=jnp.asarray([[len(ids) - 1]])).logits[0, 0]
        top = jnp.argsort(-logits)[:5]
        info["next_token_top5"] = [[tok.decode([int(i)]), round(float(logits[i]), 3)] for i in top]
    print(json.dumps(info, indent=2))
    return 0


def cmd_export(args) -> int:
    from cca_jax import atomic, export_hf, load_model, runs

    atomic.check_target(args.out)  # a refused target fails before the model is loaded
    if runs.is_run_dir(args.model):  # a finished run: its best trained weights
        out_dtype = args.out_dtype or (None if args.dtype == "auto" else args.dtype)
        out = runs.export(args.model, args.out, dtype=out_dtype)
        print(f"wrote {out} (the trained model of run {args.model})")
        return 0
    from cca_jax.weights import hf

    src = _source(args.model)
    model, tok = load_model(src, dtype=args.dtype)
    gen = hf.source_generation_config(src)  # the source checkpoint's own, when it has one
    out = export_hf(model, args.out, dtype=args.out_dtype or args.dtype, tokenizer=tok, generation_config=gen)
    print(f"wrote {out}")
    return 0


def _check_counts(args, minimums: dict[str, int]) -> None:
    """One-line CCAError for a numeric option below its minimum (argparse only checks
    that it is an integer); None means the option was not given."""
    from cca_jax.errors import CCAError

    for name, least in minimums.items():
        v = getattr(args, name)
        if v is not None and v < least:
            raise CCAError(f"--{name.replace('_', '-')} must be >= {least}, got {v}")


_GENERATION_OPTIONS = {"speculative": "--speculative", "k": "--spec-k", "ngram": "--spec-ngram", "draft": "--draft"}


def _add_generation_options(s) -> None:
    s.add_argument("--speculative", default=None,
                   help="exact speculative decoding: auto (off: measured slower on an H200 and the CPU; the default), off, "
                        "ngram (drafts from the prompt and output), model (drafts from --draft)")
    s.add_argument("--spec-k", type=int, default=None, help="draft tokens per verify step (default 4)")
    s.add_argument("--spec-ngram", type=int, default=None, help="longest suffix the n-gram lookup matches (default 3)")
    s.add_argument("--draft", default=None, help="--speculative model: the draft model (same tokenizer)")


def _generation(args):
    """The checked ``generation`` settings of the generation options (run configs' defaults
    for those not given): one-line errors that name the option, before any model loads."""
    from cca_jax.errors import CCAError
    from cca_jax.runconfig import GenerationSettings

    given = {f: getattr(args, o[2:].replace("-", "_")) for f, o in _GENERATION_OPTIONS.items()}
    try:
        return GenerationSettings(**{f: v for f, v in given.items() if v is not None})
    except CCAError as err:
        msg = str(err)
        for f, o in _GENERATION_OPTIONS.items():
            msg = msg.replace(f"generation.{f} ", f"{o} ").replace(f"generation.{f}:", f"{o}:")
        raise CCAError(msg) from None


def cmd_data(args) -> int:
    from cca_jax.data import gsm_symbolic
    from cca_jax.paths import check_output_file

    _check_counts(args, {"per_template": 1, "seed": 0})
    check_output_file(args.out)
    templates = gsm_symbolic.load_template_source(args.templates)
    items = gsm_symbolic.from_templates(templates, args.per_template, args.seed)
    out = gsm_symbolic.write_hub_jsonl(items, args.out, gsm_symbolic.template_records(args.templates))
    n_t = len(gsm_symbolic.by_template(items))
    print(f"wrote {len(items)} instances of {n_t} templates to {out}")
    return 0


def _ids(text: str | None, option: str = "--templates") -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        from cca_jax.errors import CCAError

        raise CCAError(f"{option} takes comma-separated integers, got {text!r}") from None


def cmd_eval(args) -> int:
    import time

    from cca_jax import load_model, precision
    from cca_jax.data import gsm_symbolic
    from cca_jax.errors import CCAError
    from cca_jax.evaluate import gsm
    from cca_jax.paths import check_run_dir

    _check_counts(args, {"limit": 1, "per_template": 1, "seed": 0, "max_new_tokens": 1, "batch_size": 1,
                         "shots": 0})
    generation = _generation(args)
    check_run_dir(args.out, "--out")
    items = gsm_symbolic.load_items(args.data, per_template=args.per_template, seed=args.seed)
    if args.split != "all":
        items = gsm_symbolic.split(items, args.seed)[args.split]
    items = gsm.select(items, _ids(args.templates), args.limit)
    if not items:
        raise CCAError("no items left after --templates/--limit/--split: nothing to evaluate")
    mesh_cfg = _mesh_config(args.set)  # before anything is loaded
    model, tok = load_model(_source(args.model), dtype=args.dtype, attention=args.attention,
                            mesh=_build_mesh(mesh_cfg))
    if tok is None:
        raise CCAError(f"{args.model}: no tokenizer found: evaluation needs one")
    model = _generation_layout(model, mesh_cfg)
    t0 = time.perf_counter()
    with precision.for_dtype(model.dtype):  # float32: full float32 matmuls on GPUs too
        acc, records = gsm.evaluate(model, tok, items, mode=args.mode, max_new_tokens=args.max_new_tokens,
                                    batch_size=args.batch_size, n_shots=args.shots,
                                    chat_template=args.chat_template, generation=generation.options(args.dtype),
                                    progress=_writer())
    meta = {"model": args.model, "data": args.data, "split": args.split, "seed": args.seed,
            "mode": args.mode, "max_new_tokens": args.max_new_tokens, "shots": args.shots,
            "chat_template": args.chat_template, "seconds": round(time.perf_counter() - t0, 2)}
    out = gsm.write_results(args.out, acc, records, meta)
    if not _writer():
        return 0
    how = ", templates resampled" if acc.interval == "templates" else ""
    print(f"accuracy {acc.overall:.3f} (95% CI {acc.low:.3f}-{acc.high:.3f}{how}) over {len(acc.per_template)} "
          f"templates, {acc.n_items} items; results in {out}")
    for t, a in acc.per_template.items():
        print(f"  template {t}: {a:.3f}")
    return 0


def cmd_run(args) -> int:
    from cca_jax import pipeline, preflight, runconfig

    cfg = runconfig.load(args.config, args.set)  # every field checked: nothing is loaded or written yet
    out = args.out or f"runs/{runconfig.resolve(args.config).stem}"
    preflight.check(cfg, out)  # data, extras, model source, output: before any download or load
    summary = pipeline.run(cfg, out, progress=not args.quiet)
    if not _writer():  # several processes: process 0 reports
        return 0
    b, a = summary["test_accuracy_before"], summary["test_accuracy_after"]
    print(f"test accuracy before {b['overall']:.3f} [{b['low']:.3f}, {b['high']:.3f}]  "
          f"after {a['overall']:.3f} [{a['low']:.3f}, {a['high']:.3f}]  (best step {summary['best_step']})")
    print(f"circuit: {summary['components_selected']} of {summary['components_total']} components "
          f"({100 * summary['fraction_components']:.2f}%), "
          f"{100 * summary['fraction_parameters_changed']:.3f}% of parameters changed; report in {out}")
    return 0


def cmd_configs(args) -> int:
    from cca_jax import runconfig

    if args.name is not None:
        print(runconfig.resolve(args.name).read_text(encoding="utf-8"), end="")
        return 0
    d = runconfig.configs_dir()
    print(f"run configs in {d} (cca-jax run NAME; cca-jax configs NAME prints one to copy and edit):")
    for name in runconfig.names():
        first = next((ln.lstrip("# ").strip() for ln in (d / f"{name}.yaml").read_text().splitlines()
                      if ln.startswith("#")), "")
        print(f"  {name:<28} {first}")
    return 0


def cmd_lm_eval(args) -> int:
    import importlib.util

    from cca_jax.errors import CCAError

    if importlib.util.find_spec("lm_eval") is None:
        raise CCAError("lm-evaluation-harness is not installed: pip install 'cca-jax[lmeval]'")
    from cca_jax import lm_eval_adapter

    return lm_eval_adapter.cli(args.args)


def cmd_sweep(args) -> int:
    from cca_jax import runconfig, sweep

    seeds = _ids(args.seeds, "--seeds")
    if not seeds or min(seeds) < 0:
        from cca_jax.errors import CCAError

        raise CCAError(f"--seeds takes comma-separated seeds >= 0, got {args.seeds!r}")
    runconfig.load(args.config, args.set)  # the base config, checked first
    if args.aggregate_only:
        agg = sweep.aggregate_only(args.config, seeds, sweep.parse_vary(args.vary), args.out, args.set)
    else:
        agg = sweep.run(args.config, seeds, sweep.parse_vary(args.vary), args.out, args.set, progress=not args.quiet)
    print(sweep.markdown(agg))
    print(f"wrote {args.out}/sweep.md, sweep.json, sweep.png")
    return 0


def cmd_compare(args) -> int:
    from cca_jax import methods_compare
    from cca_jax.paths import check_run_dir

    check_run_dir(args.out, "--out")
    _, md = methods_compare.write(args.runs, args.out)
    print(md)
    print(f"wrote {args.out}/compare.md, compare.json, compare.png")
    return 0


def cmd_circuit_compare(args) -> int:
    from pathlib import Path

    from cca_jax import atomic
    from cca_jax.cca import compare
    from cca_jax.paths import check_run_dir

    out = check_run_dir(Path(args.out), "--out")
    res = compare.compare(args.runs)
    atomic.write_json(out / "compare.json", res)
    try:
        compare.plot(res, out / "compare.png")
    except ImportError:
        pass  # matplotlib is in the [viz] extra
    for p in res["pairs"]:
        types = ", ".join(f"{t} {v:.2f}" for t, v in p["per_type"].items())
        print(f"{p['a']} vs {p['b']}: Jaccard {p['overall']:.3f} ({types})")
    for name, r in res["runs"].items():
        for k, v in r.items():
            if k.startswith("vs_top_effects_of:"):
                print(f"{name} vs top components by effect ({k.split(':', 1)[1]}): Jaccard {v:.3f}")
    print(f"wrote {out / 'compare.json'}")
    return 0


def cmd_bench_tasks(args) -> int:
    import time

    from cca_jax import atomic, load_model, precision
    from cca_jax.errors import CCAError
    from cca_jax.evaluate import tasks
    from cca_jax.paths import check_output_file

    _check_counts(args, {"batch_size": 1, "max_new_tokens": 1})
    generation = _generation(args)
    check_output_file(args.out)  # before the benchmarks run, not after
    mesh_cfg = _mesh_config(args.set)
    data = tasks.prepare(args.tasks, limit=args.limit, data_dir=args.data_dir)  # errors before loading
    model, tok = load_model(_source(args.model), dtype=args.dtype, mesh=_build_mesh(mesh_cfg))
    model = _generation_layout(model, mesh_cfg)
    if args.tokenizer == "char":
        from cca_jax.char_tokenizer import char_tokenizer

        tok = char_tokenizer(model.config.vocab_size)
    if tok is None:
        raise CCAError(f"{args.model}: no tokenizer found; pass --tokenizer char for random test models")
    t0 = time.perf_counter()
    with precision.for_dtype(model.dtype):
        res = tasks.run_tasks(model, tok, data["tasks"], batch_size=args.batch_size, data=data,
                              progress=not args.quiet and _writer(), gsm8k_max_new_tokens=args.max_new_tokens,
                              generation=generation.options(args.dtype))
    meta = {"model": args.model, "dtype": str(model.dtype), "data_dir": data["data_dir"], "limit": args.limit,
            "batch_size": args.batch_size, "seconds": round(time.perf_counter() - t0, 2)}
    out = atomic.write_json(args.out, tasks.finite_or_null({**meta, "tasks": res}))  # JSON has no NaN
    if not _writer():
        return 0
    for name, r in res.items():
        score = "n/a (no items)" if r["n"] == 0 else f"{r['score']:.4f}"
        print(f"{name}: {r['metric']} {score} (n={r['n']}, {r['seconds']:.1f}s)")
    print(f"wrote {out}")
    return 0


def cmd_demo(args) -> int:
    from cca_jax import demo
    from cca_jax.paths import check_run_dir

    check_run_dir(args.out)  # demo.run checks the rest (preflight) before any load
    demo.run(args.out, model=args.model, templates=args.templates, overrides=args.set, config=args.config,
             progress=not args.quiet, log=print if _writer() else (lambda s: None))
    return 0


# -- meshes and processes ---------------------------------------------------------------------------

def _writer() -> bool:
    from cca_jax.mesh import is_writer

    return is_writer()


def _mesh_config(sets):
    """The mesh section of ``--set mesh.KEY=VALUE`` options (eval, bench-tasks)."""
    from cca_jax import runconfig
    from cca_jax.errors import CCAError

    bad = [x for x in sets if not x.split("=", 1)[0].strip().startswith("mesh.")]
    if bad:
        raise CCAError(f"--set here takes mesh.KEY=VALUE only (mesh.fsdp, mesh.tp, mesh.generate), got {bad[0]!r}")
    raw = runconfig.apply_overrides({}, list(sets)).get("mesh") or {}
    return runconfig.section("mesh", raw)


def _build_mesh(mesh_cfg):
    from cca_jax import mesh

    return mesh.build(mesh_cfg)


def _generation_layout(model, mesh_cfg):
    from cca_jax import mesh

    params = model.params()
    return model.with_params(mesh.relayout(params, mesh.resolve(mesh_cfg.generate, "generate", params)))


def _start_processes(args) -> None:
    """``jax.distributed`` before anything touches JAX: --distributed (found automatically,
    e.g. on a TPU pod slice) or --coordinator/--num-processes/--process-id."""
    if not hasattr(args, "coordinator"):
        return
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if args.distributed or any(v is not None for v in explicit):
        from cca_jax import mesh

        mesh.initialize_distributed(*explicit)


def _add_processes(s) -> None:
    g = s.add_argument_group("several processes (one per host; jax.distributed)")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run found automatically (a TPU pod slice, SLURM)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (every process passes the same)")
    g.add_argument("--num-processes", type=int, metavar="N", help="how many processes in all")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 .. N-1")


def cmd_plan(args) -> int:

    from cca_jax import runconfig
    from cca_jax.errors import CCAError

    _check_counts(args, {"max_devices": 1, "prompt_tokens": 1, "examples": 1, "pivot_tokens": 1})
    cfg = runconfig.load(args.config, args.set)
    budget = None
    if args.device_memory is not None:
        from cca_jax.plan import parse_bytes

        budget = parse_bytes(args.device_memory)
    if args.meshes:
        try:
            meshes = [tuple(int(v) for v in m.lower().split("x")) for m in args.meshes.split(",") if m.strip()]
            assert meshes and all(len(m) == 2 and min(m) >= 1 for m in meshes)
        except (ValueError, AssertionError):
            raise CCAError(f"--meshes takes FSDPxTP,... (e.g. 1x2,2x1,2x4), got {args.meshes!r}") from None
    elif budget is not None:
        from cca_jax.plan import candidate_meshes

        meshes = candidate_meshes(args.max_devices)
    else:
        meshes = [(cfg.mesh.fsdp, cfg.mesh.tp)]
    need = max(f * t for f, t in meshes)
    _host_devices(need)
    from cca_jax import plan

    w = plan.workload(cfg, args.prompt_tokens, args.examples, args.pivot_tokens)
    res = plan.plan(cfg, budget, meshes, w, exact=args.exact, programs=not args.resident_only)
    print(plan.format_table(res))
    if args.json:
        from cca_jax import atomic

        atomic.write_json(args.json, res)
        print(f"wrote {args.json}")
    return 0


def _host_devices(n: int) -> None:
    """The planner compiles for ``n`` CPU devices (or as many as XLA_FLAGS forces): set
    that up before JAX starts. A process whose JAX already started keeps the devices it
    has (plan.make_mesh says when they are too few)."""
    import jax

    from cca_jax.mesh import env_device_count

    try:
        jax.config.update("jax_num_cpu_devices", env_device_count() or n)
    except RuntimeError:  # JAX's backends already started in this process
        return
    jax.config.update("jax_platforms", "cpu")


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors (a missing argument, ``--batch-size abc``) in the
    same one-line form as every other error; exit status 2 as argparse's."""

    def error(self, message):
        self.exit(2, f"cca-jax: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cca-jax", description="Constructive Circuit Amplification in JAX")
    sub = p.add_subparsers(dest="command", required=True)
    src_help = "a Hugging Face directory, hub id, .gguf file, or an offline model name (smollm2-135m)"

    s = sub.add_parser("info", help="load a model and print its size and circuit components")
    s.add_argument("model", help=src_help)
    s.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    s.add_argument("--prompt", help="also print the top-5 next tokens after this text")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("export", help="write a model, or a finished run's trained model, as a Hugging Face directory")
    s.add_argument("model", help=src_help + "; or a run directory (cca, sft_full, sft_lora): its best trained weights")
    s.add_argument("out", help="output directory: a new path or an earlier export, which is replaced "
                   "atomically (any other non-empty folder is refused)")
    s.add_argument("--dtype", default="auto", help=DTYPE_HELP + " (a run directory loads in the run's dtype)")
    s.add_argument("--out-dtype", default=None,
                   help="dtype of the written tensors (default: --dtype, else the model's)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("data", help="make datasets")
    dsub = s.add_subparsers(dest="dataset", required=True)
    g = dsub.add_parser("gsm-symbolic", help="instantiate GSM-Symbolic templates to JSONL")
    g.add_argument("--templates", default="builtin", help="template directory, or 'builtin' (default)")
    g.add_argument("--per-template", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", required=True, help="output .jsonl (written atomically)")
    g.set_defaults(func=cmd_data)

    s = sub.add_parser("eval", help="GSM-Symbolic accuracy of a model (greedy, 8-shot CoT)")
    s.add_argument("--model", required=True, help=src_help)
    s.add_argument("--data", default="builtin",
                   help="'builtin', 'hub:main|p1|p2', a .jsonl, or a template directory")
    s.add_argument("--templates", help="comma-separated template ids to keep")
    s.add_argument("--limit", type=int, help="at most N items (round-robin over templates)")
    s.add_argument("--split", default="all", choices=["all", "train", "val", "test"])
    s.add_argument("--per-template", type=int, default=50, help="instances per template (template dirs)")
    s.add_argument("--seed", type=int, default=0, help="instantiation and split seed")
    s.add_argument("--mode", default="fixed", choices=["fixed", "reference"], help="answer extraction")
    s.add_argument("--max-new-tokens", type=int, default=512)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--shots", type=int, default=8)
    s.add_argument("--chat-template", action="store_true", help="wrap the prompt in the chat template")
    s.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    s.add_argument("--attention", default="xla", choices=list(ATTENTION),
                   help="prefill attention: xla, or tokamax's fused kernels (pip install 'cca_jax[kernels]')")
    _add_generation_options(s)
    s.add_argument("--out", default="runs/eval", help="output directory")
    s.add_argument("--set", action="append", default=[], metavar="mesh.KEY=VALUE",
                   help="a device mesh, e.g. --set mesh.fsdp=2 --set mesh.tp=4 (as a run config's mesh: section)")
    _add_processes(s)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("circuit", help="inspect circuits of finished runs")
    csub = s.add_subparsers(dest="circuit_cmd", required=True)
    c = csub.add_parser("compare", help="Jaccard overlap between runs' circuits (per layer and type)")
    c.add_argument("runs", nargs="+", help="run directories")
    c.add_argument("--out", default="runs/compare", help="where compare.json and compare.png go")
    c.set_defaults(func=cmd_circuit_compare)

    s = sub.add_parser("compare", help="CCA vs fine-tuning runs: test accuracy, size of the change, side effects")
    s.add_argument("runs", nargs="+", help="finished run directories (cca, sft_full, sft_lora)")
    s.add_argument("--out", default="runs/compare-methods", help="where compare.md/.json/.png go")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("sweep", help="a config over several seeds and variants (e.g. DCM vs random circuits): "
                       "mean gains with intervals and paired tests")
    s.add_argument("config", help="a run config")
    s.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (pivots, DCM, random circuit, SFT)")
    s.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                   help="a config key and its values, e.g. localize=dcm,random or method=cca,sft_full (repeatable: "
                        "every combination runs)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    s.add_argument("--out", default="runs/sweep", help="sweep directory: one run directory per variant and seed")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument("--aggregate-only", action="store_true",
                   help="only write the aggregate of the finished runs (e.g. after the seeds ran as separate "
                        "processes, one per GPU, into the same --out); loads no model")
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("run", help="run CCA end to end from a YAML config (resumes if interrupted)")
    s.add_argument("config", help="a run config: a packaged one by name (tiny, gemma-2-2b-it; see cca-jax configs) "
                   "or a YAML file")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set dcm.reg=0.005 (repeatable)")
    s.add_argument("--out", help="run directory (default runs/<config name>)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_processes(s)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("plan", help="each stage's per-device peak memory on a mesh, without running the model; "
                       "with --device-memory, the smallest mesh that fits")
    s.add_argument("config", help="a run config")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    s.add_argument("--device-memory", metavar="SIZE", help="memory of one device, e.g. 16GiB (TPU v5e), 32GiB (v4), "
                   "80GiB; then meshes are tried from 1 device up")
    s.add_argument("--meshes", metavar="FxT,...", help="meshes to plan, e.g. 1x1,1x2,2x1 (default: the config's, or "
                   "with --device-memory every fsdp x tp up to --max-devices)")
    s.add_argument("--max-devices", type=int, default=64, help="largest mesh tried with --device-memory (default 64)")
    s.add_argument("--prompt-tokens", type=int, help="longest prompt (default: measured with the model's tokenizer "
                   "where it is at hand, else 1024)")
    s.add_argument("--examples", type=int, help="localization examples (default: the train items, an upper bound)")
    s.add_argument("--pivot-tokens", type=int, help="longest localization example (default: prompt + "
                   "eval.max_new_tokens)")
    s.add_argument("--exact", action="store_true", help="compile at full depth (default: at 2 and 4 layers, "
                   "extrapolated)")
    s.add_argument("--resident-only", action="store_true", help="only what stays on a device (weights, layout "
                   "copies, caches, masters, optimizer state), no stage program compiled: a lower bound, in seconds")
    s.add_argument("--json", metavar="FILE", help="also write the plan as JSON")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("bench-tasks", help="side-effect benchmarks: MMLU (5-shot), TruthfulQA MC1/MC2, "
                       "TriviaQA (5-shot), GSM8K (8-shot CoT)")
    s.add_argument("--model", required=True, help=src_help + ", or a model YAML")
    s.add_argument("--tasks", default=",".join(TASKS),
                   help=f"comma-separated: {', '.join(TASKS)} (each name says its protocol; lm-evaluation-harness's "
                        f"tasks: cca-jax lm-eval)")
    s.add_argument("--limit", type=int, help="at most N items per task (MMLU: round-robin over subjects)")
    s.add_argument("--data-dir", help="evaluation data: a directory laid out like ../shared/data/eval, or hub "
                   "(downloaded once into ~/.cache/cca_jax/eval_hub; needs pyarrow); default $CCA_JAX_EVAL_DATA, "
                   "else ../shared/data/eval")
    s.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--max-new-tokens", type=int, default=256, help="gsm8k_cot_8shot generation budget")
    s.add_argument("--tokenizer", default="auto", choices=["auto", "char"],
                   help="char: character tokenizer (random test models without one)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_generation_options(s)
    s.add_argument("--out", required=True, help="results .json (written atomically)")
    s.add_argument("--set", action="append", default=[], metavar="mesh.KEY=VALUE",
                   help="a device mesh, e.g. --set mesh.fsdp=2 --set mesh.tp=4")
    _add_processes(s)
    s.set_defaults(func=cmd_bench_tasks)

    s = sub.add_parser("demo", help="CCA end to end on a small pretrained model from PyPI, offline, on CPU (resumable)")
    s.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    s.add_argument("--model", choices=["qwen2.5-coder-0.5b", "smollm2-135m"],
                   help="offline model (default: configs/demo.yaml's, qwen2.5-coder-0.5b)")
    s.add_argument("--templates", help="a GSM-Symbolic template directory instead of the embedded templates, "
                   "e.g. ../shared/data/gsm_symbolic/templates/symbolic")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set amplify.steps=4 (repeatable)")
    s.add_argument("--config", help="a run config instead of demo (a packaged name such as tiny, or a YAML file)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_processes(s)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("configs", help="list the packaged run configs, or print one (to copy and edit)")
    s.add_argument("name", nargs="?", help="a config to print, e.g. gemma-2-2b-it")
    s.set_defaults(func=cmd_configs)

    # listed for --help only: main() hands `cca-jax lm-eval ...` to the harness unparsed
    sub.add_parser("lm-eval", help="lm-evaluation-harness with the cca_jax model (pip install 'cca-jax[lmeval]'); "
                   "the harness's arguments, e.g. --model cca_jax --model_args pretrained=M,run_dir=R --tasks gsm8k")
    return p


def main(argv: list[str] | None = None) -> int:
    from cca_jax.errors import CCAError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # the harness parses the rest, its --help too (argparse would take its options)
        args = argparse.Namespace(args=argv[1:], func=cmd_lm_eval)
    else:
        args = build_parser().parse_args(argv)
    try:
        _start_processes(args)
        return args.func(args)
    except CCAError as err:
        print(f"cca-jax: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cca-jax: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # device out of memory: one line, finished stages are kept
        if not _out_of_memory(err):
            raise
        print(f"cca-jax: error: the device ran out of memory ({_first_line(err)}); finished stages are kept: "
              f"rerun the same command with smaller batches (e.g. --set amplify.batch_size=4, "
              f"sft.micro_batch_size=4, eval.batch_size=16) or remat (--set amplify.remat=true, sft.remat=true), "
              f"or give JAX more memory (XLA_PYTHON_CLIENT_MEM_FRACTION)", file=sys.stderr)
        return 2


def _out_of_memory(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}"
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text


def _first_line(err: BaseException) -> str:
    for line in str(err).splitlines():
        if "memory" in line.lower():
            return line.strip()[:200]
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
