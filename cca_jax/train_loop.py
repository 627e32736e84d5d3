"""One train-and-select loop for every method that updates weights (CCA amplification,
full and LoRA fine-tuning): init or resume, step, evaluate at the configured steps, keep
the best, checkpoint.

A method plugs in through ``Trainer``. The loop owns no model code; it calls
``evaluate(params) -> accuracy`` at eval steps and keeps the master of the best one
(step 0 is the unchanged model).

Checkpoints are crash-safe (``Checkpoints``): an eval step writes one new directory
holding the step's master and optimizer state; once it is whole, ``progress.json`` is
rewritten atomically to point at it (and at the best step's directory), and only then
are directories nothing points at deleted. A kill at any point leaves either the old
checkpoint or the new one, never a mix. The files are written while the next steps run
(orbax's asynchronous save; the arrays are copied to the host first), so the device
does not wait for the disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import jax

from cca_jax import atomic, stages, timing
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
    # commits (each including the device work it waited for; for checkpoints the time the
    # loop was blocked: the host copy and any wait for an earlier save): where a stage's time
    # goes; "steps_split" / "val_eval_split": their compile, device and host seconds
    parts: dict = dataclasses.field(default_factory=dict)


_CKPT = re.compile(r"^ckpt-\d{6}$")
PROGRESS = "progress.json"


class Checkpoints:
    """A stage directory's checkpoints: ``ckpt-NNNNNN/`` (orbax: master + optimizer
    state) and ``progress.json``, the pointer naming the current and best ones.

    At most one save is under way (``_pending``): its files are written in the
    background, and progress.json is pointed at it once they are whole, as soon as they
    are (the save's thread does it), never before. ``asynchronous=False`` waits for every
    save in ``commit`` (every eval step is then checkpointed)."""

    def __init__(self, directory: Path, key: str, *, asynchronous: bool = True):
        self.dir = Path(directory)
        self.key = key
        self.asynchronous = asynchronous
        self._pending: tuple[int, stages.PendingSave] | None = None  # (step, its save)

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

    def commit(self, step: int, master, opt_state, progress: dict, *, final: bool = False) -> dict:
        """Start saving step ``step``'s checkpoint and return its progress record (``"best"``
        resolved to a directory name). ``progress["best"]`` may be "this" (this step is the
        new best), a directory name, or None (step 0, the unchanged model). The arrays are
        on the host when this returns: the caller may donate them.

        While the previous save is still being written, a new best or the ``final`` step
        waits for it (and for the pointer at it) before starting; any other step is
        not checkpointed (a kill then reruns it from the previous checkpoint, and its
        history goes into the next record): the loop never waits for the disk for a step
        that is not needed for the result."""
        name = f"ckpt-{step:06d}"
        best = name if progress.get("best") == "this" else progress.get("best")
        prog = {**progress, "key": self.key, "step": step, "checkpoint": name, "best": best}
        # every process takes the same decision (process 0's view of its save): they all
        # start the same saves, which hold barriers across processes
        if self._pending is not None and best != name and not final \
                and not mesh_lib.agree(int(self._pending[1].done())):
            return prog
        self.flush()
        path = self.dir / name
        if path.exists() and mesh_lib.is_writer():  # an earlier attempt at this step that was never pointed at
            shutil.rmtree(path)
        mesh_lib.sync(f"cca_jax ckpt {step} clear")
        # the record as of this step: the loop goes on changing its state and history meanwhile
        record = json.loads(json.dumps(prog, default=float))
        # every process writes its shards (orbax); the files are written in the background,
        # and progress.json is pointed at them as soon as they are whole (orbax's barriers:
        # every process's shards written and renamed into place)
        self._pending = step, stages.save_trees(path, {"master": master, "opt": opt_state}, wait=False,
                                                then=lambda: self._point(record))
        if not self.asynchronous:
            self.flush()
        return prog

    def flush(self) -> None:
        """Wait until the pending save is whole and pointed at (progress.json, then the
        deletion of what nothing points at). Every process calls it at the same point."""
        if self._pending is None:
            return
        step, pending = self._pending
        try:
            pending.wait()  # raises a failed write's error: that save is never pointed at
        finally:
            if pending.done():
                self._pending = None
        mesh_lib.sync(f"cca_jax ckpt {step} committed")

    def settle(self) -> None:
        """After an exception in the loop: let the pending save finish (no thread writes
        here once the loop is gone; it is pointed at if it is whole). No barrier (the other
        processes may be elsewhere) and no error of its own (the loop's exception is the
        one to report)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            with contextlib.suppress(Exception):
                pending[1].wait()

    def _point(self, prog: dict) -> None:
        atomic.write_json(self.dir / PROGRESS, prog)  # process 0 only (atomic)
        if mesh_lib.is_writer():
            self.clean(keep={prog["checkpoint"], prog["best"]})

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
    parts = {"steps": timing.Account(), "val_eval": timing.Account()}  # seconds, and their compile / device / host
    blocked = 0.0  # on checkpoint commits
    try:
        while step < trainer.steps:
            with timing.account() as acc:
                master, opt_state, rec = trainer.step(master, opt_state, step)
            parts["steps"].add(acc)
            step += 1
            rec = {"step": step, **rec}
            if trainer.is_eval_step(step) or step == trainer.steps:
                if evaluate is None:  # no selection: the last step is the result
                    new_best = step == trainer.steps
                else:
                    with timing.account() as acc:
                        rec["val_accuracy"] = float(evaluate(trainer.working_params(master), step))
                    parts["val_eval"].add(acc)
                    new_best = rec["val_accuracy"] > state["best_val"]
                history.append(rec)
                if new_best:
                    state["best_step"], state["best_val"] = step, rec.get("val_accuracy", state["best_val"])
                t = time.perf_counter()
                state = ckpt.commit(step, master, opt_state, {
                    "history": history, "best_step": state["best_step"], "best_val": state["best_val"],
                    "best": "this" if new_best else state["best"],
                    "seconds": float(state["seconds"]) + time.perf_counter() - t_start},
                    final=step == trainer.steps)
                blocked += time.perf_counter() - t
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
        t = time.perf_counter()
        ckpt.flush()  # the last save whole and pointed at before the best master is read back
        blocked += time.perf_counter() - t
    except BaseException:
        ckpt.settle()  # never a thread writing here after the loop; never a pointer at a partial save
        raise
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
                      {**{k: round(a.wall, 3) for k, a in parts.items()}, "checkpoints": round(blocked, 3),
                       **{f"{k}_split": a.split() for k, a in parts.items() if a.wall > 0}})
