"""Checks before anything heavy: what a run needs and can be checked in a moment (the
output directory, the data paths, the optional packages the config asks for, the model
source, the device mesh) is checked before any model is downloaded or loaded and before
anything is written. A problem is one line (CCAError) naming the setting and the fix.

Each check is a function of (config, run directory) in ``CHECKS``; a new section of the
run config adds its check there.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable

from cca_jax.errors import CCAError


def _output(config, run_dir) -> None:
    if run_dir is not None:
        from cca_jax import paths

        paths.check_run_dir(run_dir)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _extras(config, run_dir) -> None:
    """Optional packages the config needs."""
    if config.attention.startswith("tokamax") and not _installed("tokamax"):
        raise CCAError(f"attention: {config.attention} needs the fused attention kernels: "
                       f"pip install 'cca-jax[kernels]' (or --set attention=xla)")
    se = config.side_effects
    if se.tasks and (se.data_dir == "hub" or (se.data_dir is None and os.environ.get("CCA_JAX_EVAL_DATA") == "hub")) \
            and not _installed("pyarrow"):
        raise CCAError("side_effects.data_dir: hub reads the hub's parquet files, which needs pyarrow: "
                       "pip install 'cca-jax[hub]'")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _data(config, run_dir) -> None:
    """The GSM-Symbolic source exists (a relative path is relative to the current folder)."""
    src = config.data.templates
    if src in ("builtin", "toy:digits"):
        return
    if src.startswith("hub:"):
        from cca_jax.data.gsm_symbolic import HUB_CONFIGS, HUB_REPO

        name = src[4:]
        if name not in HUB_CONFIGS:
            raise CCAError(f"data.templates {src}: the hub's configs are {', '.join('hub:' + c for c in HUB_CONFIGS)}")
        if _hub_offline():
            try:
                from huggingface_hub import hf_hub_download

                hf_hub_download(HUB_REPO, f"{name}/test.jsonl", repo_type="dataset", local_files_only=True)
            except Exception:
                raise CCAError(f"data.templates {src}: HF_HUB_OFFLINE is set and {HUB_REPO} is not in the hub "
                               f"cache: go online once, or use a template directory or .jsonl") from None
        return
    if not Path(src).exists():
        raise CCAError(f"data.templates {src}: no such file or directory (relative paths are relative to the "
                       f"current folder, {Path.cwd()}): pass --set data.templates=hub:main (the hub's instances), "
                       f"builtin, a GSM-Symbolic template directory or a .jsonl")


def _random_like(config, run_dir) -> None:
    """``localize: random`` with ``random.like``: the run (or mask.npz) whose circuit sizes
    it copies exists and holds a circuit."""
    like = config.random.like
    if config.localize == "random" and like is not None:
        from cca_jax.cca.components import circuit_file

        try:
            circuit_file(like)
        except CCAError as err:
            raise CCAError(f"random.like: {err}") from None


def _side_effects(config, run_dir) -> None:
    """Side-effect task names and their data, read now rather than after training."""
    se = config.side_effects
    if se.tasks:
        from cca_jax.evaluate import tasks

        tasks.prepare(list(se.tasks), limit=se.limit, data_dir=se.data_dir)


def _source(setting: str, m: str, yaml_ok: bool) -> None:
    """A model source: an installed offline model (checksum verified), an existing path,
    or a hub id (in the cache when HF_HUB_OFFLINE is set). ``yaml_ok``: a model YAML
    (random weights, no tokenizer) is allowed."""
    from cca_jax import models

    if m in models.names():
        models.resolve(m)
        return
    from cca_jax.load import local_path, looks_like_path

    if local_path(m).exists():
        if m.endswith((".yaml", ".yml")) and not yaml_ok:
            raise CCAError(f"{setting} {m}: a model YAML has random weights and no tokenizer: set tokenizer: char")
        return
    if looks_like_path(m):
        raise CCAError(f"{setting} {m}: no such file or directory (give a Hugging Face directory, a hub id such as "
                       f"google/gemma-2-2b-it, a .gguf file, a model YAML or one of {', '.join(models.names())})")
    if _hub_offline():
        try:
            from huggingface_hub import snapshot_download

            snapshot_download(m, local_files_only=True)
        except Exception:
            raise CCAError(f"{setting} {m}: HF_HUB_OFFLINE is set and it is not in the hub cache: go online once "
                           f"(gated models: `hf auth login`), or pass a local directory") from None


def _model(config, run_dir) -> None:
    """The model source."""
    _source("model", config.model, yaml_ok=config.tokenizer == "char")


def _draft(config, run_dir) -> None:
    """``generation.speculative: model``: the draft model's source (no tokenizer of its
    own needed: drafts are token ids of the model's vocabulary)."""
    g = config.generation
    if g.speculative == "model":
        _source("generation.draft", g.draft, yaml_ok=True)


def _mesh(config, run_dir) -> None:
    """``mesh:`` asks for as many devices as the run has (all processes together)."""
    from cca_jax import mesh

    mesh.build(config.mesh)


CHECKS: tuple[Callable, ...] = (_output, _extras, _data, _random_like, _side_effects, _model, _draft, _mesh)


def check(config, run_dir: str | os.PathLike | None = None, *, mesh: bool = True) -> None:
    """Run every check of ``CHECKS`` on a RunConfig (and the run directory it will
    write); the first problem raises CCAError. Nothing is loaded, downloaded or written.
    ``mesh=False``: not the mesh (a model already placed on one brings its own)."""
    for c in CHECKS:
        if mesh or c is not _mesh:
            c(config, run_dir)
