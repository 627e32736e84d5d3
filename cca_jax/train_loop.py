"""One train-and-select loop for every method that updates weights (CCA amplification,
full and LoRA fine-tuning): init or resume, step, evaluate at the configured steps, keep
the best, checkpoint.

A method plugs in through ``Trainer``. The loop owns no model code; it calls
``evaluate(params) -> accuracy`` at eval steps and keeps the master of the best one
(step 0 is the unchanged model).

Checkpoints are crash-safe (``Checkpoints``): each eval step writes one new directory
holding the step's master and optimizer state, then atomically rewrites
``progress.json`` to point at it (and at the best step's directory), and only then
deletes directories nothing points at. A kill at any point leaves either the old
checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import jax

from cca_jax import atomic, stages
from cca_jax import mesh as mesh_lib


class Trainer(Protocol):
    """What a method gives the loop. ``master`` is the trained pytree (float32 copies of
    the updated leaves, or LoRA adapters), ``opt_state`` the optimizer's."""

    name: str  # for logs and the progress bar
    steps: int

    def init(self) -> tuple[Any, Any]:
        """(master, opt_state) before the first step (deterministic: a resume rebuilds the
        structure from it)."""

    def step(self, master, opt_state, step: int) -> tuple[Any, Any, dict]:
        """One update from step ``step`` (0-based): (master, opt_state, record); the record
        holds JSON numbers (e.g. {"loss": ...}). May donate the arrays passed in."""

    def is_eval_step(self, step: int) -> bool:
        """Evaluate (and checkpoint) after step ``step`` (1-based)?"""

    def working_params(self, master) -> Any:
        """The model's parameters with this master applied (what is evaluated/exported)."""


@dataclasses.dataclass
class LoopResult:
    best_master: Any
    best_step: int
    best_val: float | None  # None without evaluation
    history: list  # [{"step", "loss"?, "val_accuracy"?, ...}], step 0 first
    seconds: float
    # this call's wall seconds in the training steps, the val evaluations and the checkpoint
    # commits (each including the device work it waited for): where a stage's time goes
    parts: dict = dataclasses.field(default_factory=dict)


_CKPT = re.compile(r"^ckpt-\d{6}$")
PROGRESS = "progress.json"


class Checkpoints:
    """A stage directory's checkpoints: ``ckpt-NNNNNN/`` (orbax: master + optimizer
    state) and ``progress.json``, the pointer naming the current and best ones."""

    def __init__(self, directory: Path, key: str):
        self.dir = Path(directory)
        self.key = key

    def progress(self) -> dict | None:
        """The committed progress for this key, or None (no run yet, another key, or a
        record that does not point at existing checkpoints)."""
        prog = stages.read_json(self.dir / PROGRESS)
        if not isinstance(prog, dict) or prog.get("key") != self.key:
            return None
        need = [prog.get("checkpoint")] + ([prog["best"]] if prog.get("best") else [])
        if not all(isinstance(n, str) and _CKPT.match(n) and (self.dir / n).is_dir() for n in need):
            return None
        return prog

    def restore(self, name: str, master, opt_state) -> tuple[Any, Any]:
        got = stages.load_trees(self.dir / name, {"master": master, "opt": opt_state})
        return got["master"], got["opt"]

    def restore_master(self, name: str, master):
        return stages.load_trees(self.dir / name, {"master": master})["master"]

    def commit(self, step: int, master, opt_state, progress: dict) -> dict:
        """Write step ``step``'s checkpoint, then point progress.json at it, then delete
        what nothing points at. ``progress["best"]`` may be "this" (this step is the new
        best), a directory name, or None (step 0, the unchanged model)."""
        name = f"ckpt-{step:06d}"
        path = self.dir / name
        if path.exists() and mesh_lib.is_writer():  # an earlier attempt at this step that was never pointed at
            shutil.rmtree(path)
        mesh_lib.sync(f"cca_jax ckpt {step} clear")
        trees = {"master": master, "opt": opt_state}
        stages.save_trees(path, trees)  # every process writes its shards (orbax)
        best = name if progress.get("best") == "this" else progress.get("best")
        prog = {**progress, "key": self.key, "step": step, "checkpoint": name, "best": best}
        atomic.write_json(self.dir / PROGRESS, prog)  # process 0 only (atomic)
        if mesh_lib.is_writer():
            self.clean(keep={name, best})
        mesh_lib.sync(f"cca_jax ckpt {step} committed")
        return prog

    def clean(self, keep: set) -> None:
        """Delete checkpoint directories (with any temporaries of a killed save inside)
        that progress.json does not point at. Only names this class writes are touched."""
        for p in self.dir.iterdir():
            if _CKPT.match(p.name) and p.is_dir() and p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)


def _restore_targets(trainer: Trainer):
    """ShapeDtypeStructs of ``trainer.init()`` to restore checkpoints into, without
    allocating a second copy. On a mesh they carry the shardings of what ``init`` makes
    (``eval_shape`` has none), so a checkpoint written on any mesh is read back as this
    run lays it out: ``init`` runs once and its arrays are dropped before any restore."""
    shapes = jax.eval_shape(trainer.init)
    if mesh_lib.mesh_of(getattr(trainer, "params", None)) is None:
        return shapes
    made = _init(trainer)
    out = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), made)
    del made
    return out


def _init(trainer: Trainer):
    """``trainer.init()``; on a mesh with what it made on one device (step counts, LoRA
    adapters) replicated over the mesh, as every checkpointed array must be."""
    return mesh_lib.onto_mesh(trainer.init(), mesh_lib.mesh_of(getattr(trainer, "params", None)))


def _fresh(val0: float | None) -> dict:
    return {"history": [{"step": 0} if val0 is None else {"step": 0, "val_accuracy": val0}], "step": 0,
            "best_step": 0, "best_val": val0, "best": None, "seconds": 0.0}


def train_and_select(trainer: Trainer, evaluate: Callable[[Any, int], float] | None, val0: float | None,
                     ckpt: Checkpoints,
                     *, progress: bool = True, on_step: Callable[[int], None] | None = None,
                     log: Callable[[str], None] = print, _retry: bool = False) -> LoopResult:
    """Run ``trainer`` for ``trainer.steps`` steps (resuming from ``ckpt`` when it holds a
    committed step for the same key), evaluating at its eval steps and keeping the best
    master. ``val0`` is the unchanged model's accuracy (step 0); a later step must beat
    the best so far to replace it. ``evaluate(params, step)`` returns val accuracy; with
    ``evaluate=None`` nothing is evaluated and the last step is the result.
    The best master is read back from its checkpoint at the end (the steps may donate
    the arrays of earlier masters)."""
    shapes = _restore_targets(trainer)
    state = ckpt.progress()
    master = opt_state = None
    if state is not None and int(state["step"]) < trainer.steps:
        try:
            master, opt_state = ckpt.restore(state["checkpoint"], *shapes)
            log(f"resuming {trainer.name} at step {state['step']}")
        except Exception as err:  # an unreadable checkpoint: start over rather than fail
            log(f"{trainer.name}: the checkpoint in {ckpt.dir} is unreadable ({type(err).__name__}): starting over")
            state = None
    if state is None:
        master, opt_state = _init(trainer)
    state = dict(state) if state is not None else _fresh(None if evaluate is None else float(val0))
    history, step = list(state["history"]), int(state["step"])
    t_start = time.perf_counter()
    bar = None
    if progress and step < trainer.steps and mesh_lib.is_writer():
        from tqdm.auto import tqdm

        bar = tqdm(total=trainer.steps, initial=step, desc=trainer.name, unit="step")
    parts = {"steps": 0.0, "val_eval": 0.0, "checkpoints": 0.0}
    while step < trainer.steps:
        t = time.perf_counter()
        master, opt_state, rec = trainer.step(master, opt_state, step)
        parts["steps"] += time.perf_counter() - t
        step += 1
        rec = {"step": step, **rec}
        if trainer.is_eval_step(step) or step == trainer.steps:
            if evaluate is None:  # no selection: the last step is the result
                new_best = step == trainer.steps
            else:
                t = time.perf_counter()
                rec["val_accuracy"] = float(evaluate(trainer.working_params(master), step))
                parts["val_eval"] += time.perf_counter() - t
                new_best = rec["val_accuracy"] > state["best_val"]
            history.append(rec)
            if new_best:
                state["best_step"], state["best_val"] = step, rec.get("val_accuracy", state["best_val"])
            t = time.perf_counter()
            state = ckpt.commit(step, master, opt_state, {
                "history": history, "best_step": state["best_step"], "best_val": state["best_val"],
                "best": "this" if new_best else state["best"],
                "seconds": float(state["seconds"]) + time.perf_counter() - t_start})
            parts["checkpoints"] += time.perf_counter() - t
            t_start = time.perf_counter()
        else:
            history.append(rec)
        if bar is not None:
            bar.update(1)
            loss = rec.get("loss")
            best = {} if state["best_val"] is None else {"best": f"{state['best_val']:.3f}@{state['best_step']}"}
            bar.set_postfix(**({"loss": f"{loss:.3f}"} if loss is not None else {}), **best)
        if on_step is not None:
            on_step(step)
    if bar is not None:
        bar.close()
    del master, opt_state
    try:
        best = trainer.init()[0] if state["best"] is None else ckpt.restore_master(state["best"], shapes[0])
    except Exception as err:  # the best step's checkpoint is unreadable: run the steps again
        if _retry:
            raise
        log(f"{trainer.name}: the best checkpoint in {ckpt.dir} is unreadable ({type(err).__name__}): starting over")
        if mesh_lib.is_writer():
            (ckpt.dir / PROGRESS).unlink(missing_ok=True)
        mesh_lib.sync("cca_jax restart training")
        return train_and_select(trainer, evaluate, val0, ckpt, progress=progress, on_step=on_step, log=log,
                                _retry=True)
    return LoopResult(best, int(state["best_step"]), state["best_val"], history,
                      float(state["seconds"]) + time.perf_counter() - t_start,
                      {k: round(v, 3) for k, v in parts.items()})
