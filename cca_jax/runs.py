"""Finished run directories as models: the weights a CCA or fine-tuning run selected (its
best val step), on the model its ``config.yaml`` names. For exporting a run
(``cca-jax export RUN_DIR OUT``), evaluating it (``cca_jax.lm_eval_adapter``) or probing it.

The best step's trained values are ``pipeline.saved_master`` (float32, keyed by dotted leaf
paths; {} when step 0, the unchanged model, won):
- cca: the circuit's leaves (q, k, v, up, ...), cast to the model's dtype in place;
- sft_full: every parameter, cast to the model's dtype;
- sft_lora: the LoRA adapters, merged into the weights (``sft.working_params``).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from cca_jax.errors import CCAError

CONFIG = "config.yaml"


def is_run_dir(path: str | os.PathLike) -> bool:
    """A run directory holds the resolved config.yaml and a stages/ folder."""
    p = Path(path)
    return (p / CONFIG).is_file() and (p / "stages").is_dir()


def read_config(run_dir: str | os.PathLike):
    """The run's RunConfig (``config.yaml``, written by ``pipeline.run``)."""
    import yaml

    from cca_jax import runconfig
    from cca_jax.evaluate.tasks import RENAMED

    p = Path(run_dir) / CONFIG
    if not p.is_file():
        raise CCAError(f"{run_dir}: no {CONFIG}: not a finished run directory (cca-jax run CONFIG --out DIR "
                       f"makes one)")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise CCAError(f"{p}: cannot read it ({type(err).__name__}): the run directory is damaged") from None
    if not isinstance(raw, dict):
        raise CCAError(f"{p}: not a run config (a YAML {type(raw).__name__})")
    se = raw.get("side_effects")
    if isinstance(se, dict) and isinstance(se.get("tasks"), list):  # runs written before the renaming
        se["tasks"] = [RENAMED.get(t, t) for t in se["tasks"]]
    try:
        return runconfig.from_dict(raw)
    except CCAError as err:
        raise CCAError(f"{p}: {err}") from None


def stage_of(method: str) -> str:
    """The training stage whose checkpoints hold a method's weights."""
    return "amplify" if method == "cca" else "sft"


def base_model(config):
    """(model, tokenizer) the run started from, loaded as the run loaded it."""
    from cca_jax import load_model, models

    model, tok = load_model(models.source(config.model), dtype=config.dtype, attention=config.attention)
    if config.tokenizer == "char":
        from cca_jax.char_tokenizer import char_tokenizer

        tok = char_tokenizer(model.config.vocab_size)
    return model, tok


def _check_fits(saved: dict, template, run_dir) -> None:
    from cca_jax.stages import flatten

    shapes = {k: tuple(x.shape) for k, x in flatten(template).items()}
    wrong = sorted(k for k, v in saved.items() if shapes.get(k) != tuple(v.shape))
    if wrong:
        raise CCAError(f"{run_dir}: trained weights {wrong[:3]} do not fit this model (another model than the "
                       f"run's?): pass no model, or the one its config.yaml names")


def trained_params(run_dir: str | os.PathLike, model, config=None):
    """The model's parameters with the run's best trained values in place (the model's
    dtype); every other weight unchanged."""
    from cca_jax import pipeline, stages

    config = config or read_config(run_dir)
    saved = pipeline.saved_master(run_dir, stage_of(config.method), "best")
    params = model.params()
    if not saved:  # step 0 won: the unchanged model
        return params
    if config.method == "cca":
        _check_fits(saved, params, run_dir)
        key = stages.leaf_key
        return jax.tree_util.tree_map_with_path(
            lambda p, x: saved[key(p)].astype(x.dtype) if key(p) in saved else x, params)
    from cca_jax.baselines import sft

    template = jax.eval_shape(lambda p: sft.init_state(config.method, p, config.sft)[0], params)
    _check_fits(saved, template, run_dir)
    missing = sorted(set(stages.flatten(template)) - set(saved))
    if missing:
        raise CCAError(f"{run_dir}: the {config.method} checkpoint lacks {missing[:3]}: the run directory is damaged")
    master = stages.unflatten(saved, template)
    frozen = None if config.method == "sft_full" else params
    return sft.working_params(config.method, master, frozen, model.dtype, config.sft)


def trained_model(run_dir: str | os.PathLike, model=None):
    """The run's model with its best trained weights (CCA: the amplified circuit; SFT: the
    fine-tuned or LoRA-merged weights). ``model``: the run's base model if already loaded
    (e.g. sharded over a mesh); loaded from config.yaml when None."""
    config = read_config(run_dir)
    if model is None:
        model, _ = base_model(config)
    return model.with_params(trained_params(run_dir, model, config))


def load(run_dir: str | os.PathLike):
    """(trained model, tokenizer, RunConfig) of a finished run."""
    config = read_config(run_dir)
    model, tok = base_model(config)
    return model.with_params(trained_params(run_dir, model, config)), tok, config


def source_generation_config(config) -> dict | None:
    """The generation_config.json of the run's model (``weights.hf.source_generation_config``)."""
    from cca_jax import models
    from cca_jax.weights import hf

    return hf.source_generation_config(models.source(config.model))


def export(run_dir: str | os.PathLike, out: str | os.PathLike, dtype=None) -> Path:
    """Write the run's trained model as a Hugging Face directory: config.json,
    generation_config.json, the weights (``dtype``, default the run's) and the tokenizer
    with its chat template. ``out`` follows ``cca_jax.export_hf``'s rules (a new path, an
    empty folder or an earlier export)."""
    from cca_jax import atomic, export_hf

    atomic.check_target(out)  # a refused target fails before the model is loaded
    model, tok, config = load(run_dir)
    return export_hf(model, out, dtype=dtype, tokenizer=tok, generation_config=source_generation_config(config))
