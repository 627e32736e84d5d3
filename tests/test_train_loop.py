"""The train-and-select loop: crash-safe checkpoint commits (a kill at every point of the
sequence resumes to the uninterrupted result, also while a save is still being written in
the background), resume, selection, the run-directory lock."""

import json
import os
import signal
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cca_jax import atomic, stages, train_loop
from cca_jax.errors import CCAError


class Killed(BaseException):
    """A kill: nothing in the loop may catch it."""


class Toy:
    """A trainer on a 3x4 matrix with Adam: each step moves the master toward a target;
    val accuracy is a fixed function of the step (best at step 4)."""

    name = "toy"

    def __init__(self, steps=6, eval_steps=(2, 4, 5, 6)):
        self.steps, self.eval_steps = steps, eval_steps
        self.opt = optax.adam(0.1)
        self.target = jnp.arange(12.0).reshape(3, 4)

    def init(self):
        master = {"w": jnp.zeros((3, 4)), "b": None}
        return master, self.opt.init(master)

    def step(self, master, opt_state, step):
        g = jax.grad(lambda m: jnp.sum((m["w"] - self.target) ** 2))(master)
        upd, opt_state = self.opt.update(g, opt_state, master)
        return optax.apply_updates(master, upd), opt_state, {"loss": float(jnp.sum(g["w"] ** 2))}

    def is_eval_step(self, step):
        return step in self.eval_steps

    def working_params(self, master):
        return master


VAL = {2: 0.3, 4: 0.7, 5: 0.5, 6: 0.7}


def evaluate(params, step):
    return VAL[step]


def run(d, asynchronous=True, **kw):
    return train_loop.train_and_select(Toy(), evaluate, 0.1, train_loop.Checkpoints(d, "k", asynchronous=asynchronous),
                                       progress=False, log=lambda s: None, **kw)


@pytest.fixture(scope="module")
def want(tmp_path_factory):
    return run(tmp_path_factory.mktemp("loop"))


def same(a, b):
    assert (a.best_step, a.best_val, a.history) == (b.best_step, b.best_val, b.history)
    np.testing.assert_array_equal(np.asarray(a.best_master["w"]), np.asarray(b.best_master["w"]))


def test_selects_the_first_best_step_and_keeps_only_what_progress_points_at(want, tmp_path):
    assert want.best_step == 4 and want.best_val == 0.7  # step 6 ties and does not replace it
    assert [h.get("val_accuracy") for h in want.history] == [0.1, None, 0.3, None, 0.7, 0.5, 0.7]
    res = run(tmp_path)
    prog = json.loads((tmp_path / "progress.json").read_text())
    assert (prog["step"], prog["checkpoint"], prog["best"]) == (6, "ckpt-000006", "ckpt-000004")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000004", "ckpt-000006", "progress.json"]
    same(res, want)


def _crash_on(monkeypatch, obj, name, n, before=True):
    """Make the n-th call (1-based) of obj.name raise Killed, before or after it runs."""
    real, calls = getattr(obj, name), []

    def wrapper(*a, **kw):
        calls.append(1)
        if len(calls) == n and before:
            raise Killed
        out = real(*a, **kw)
        if len(calls) == n:
            raise Killed
        return out

    monkeypatch.setattr(obj, name, wrapper)


def _killed_after_files(m, n):
    """The n-th save's files are written whole, then a kill comes before anything points
    at them (the pointer is written in the save's background thread: it never runs)."""
    real, calls = stages.save_trees, []

    def wrapper(path, trees, **kw):
        calls.append(1)
        if len(calls) != n:
            return real(path, trees, **kw)
        real(path, trees, wait=True)
        raise Killed

    m.setattr(stages, "save_trees", wrapper)


# every point of the commit sequence: before the save, after its files are written,
# around writing progress.json, around deleting what is no longer pointed at (those two
# in the save's background thread: the kill surfaces at the loop's next wait for it); at
# the 2nd and 3rd commit
@pytest.mark.parametrize("commit", [2, 3])
@pytest.mark.parametrize("point", ["before_save", "after_save", "before_pointer", "after_pointer", "before_clean",
                                   "after_clean"])
def test_a_kill_at_any_point_of_a_commit_resumes_to_the_same_result(want, tmp_path, monkeypatch, commit, point):
    with monkeypatch.context() as m:
        if point == "before_save":
            _crash_on(m, stages, "save_trees", commit)
        elif point == "after_save":
            _killed_after_files(m, commit)
        elif point in ("before_pointer", "after_pointer"):
            _crash_on(m, atomic, "write_json", commit, before=point == "before_pointer")
        else:
            _crash_on(m, train_loop.Checkpoints, "clean", commit, before=point == "before_clean")
        with pytest.raises(Killed):
            run(tmp_path)
    same(run(tmp_path), want)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt-000004", "ckpt-000006", "progress.json"]


def kill_at(n):
    def on_step(step):
        if step == n:
            raise Killed
    return on_step


def test_a_torn_save_is_never_used(want, tmp_path):
    """A checkpoint directory that progress.json does not point at (a save killed half way:
    master written, optimizer state not) is ignored and replaced."""
    with pytest.raises(Killed):
        run(tmp_path, on_step=kill_at(3))
    stages.save_trees(tmp_path / "ckpt-000004", {"master": {"w": jnp.full((3, 4), 99.0)}})
    logs = []
    res = train_loop.train_and_select(Toy(), evaluate, 0.1, train_loop.Checkpoints(tmp_path, "k"), progress=False,
                                      log=logs.append)
    assert logs == ["resuming toy at step 2"]
    same(res, want)


def test_another_key_starts_over_and_unreadable_checkpoints_restart(want, tmp_path):
    run(tmp_path)
    logs = []
    other = train_loop.train_and_select(Toy(), evaluate, 0.1, train_loop.Checkpoints(tmp_path, "other"),
                                        progress=False, log=logs.append)
    assert not any("resuming" in m for m in logs)
    same(other, want)
    # a truncated progress.json: start over (no traceback)
    text = (tmp_path / "progress.json").read_text()
    (tmp_path / "progress.json").write_text(text[: len(text) // 2])
    same(run(tmp_path), want)
    # a damaged checkpoint file: start over (no traceback)
    with pytest.raises(Killed):
        run(tmp_path / "b", on_step=kill_at(5))
    for f in (tmp_path / "b" / "ckpt-000004" / "master").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0" * 7)
    logs = []
    res = train_loop.train_and_select(Toy(), evaluate, 0.1, train_loop.Checkpoints(tmp_path / "b", "k"),
                                      progress=False, log=logs.append)
    assert any("unreadable" in m and "starting over" in m for m in logs)
    same(res, want)


# -- asynchronous commits: the files are written while the next steps run -------------------

def _record_saves(m):
    """The checkpoint directories whose saves the loop starts, in order, with their
    ``stages.PendingSave``s."""
    real, started = stages.save_trees, []

    def wrapper(path, trees, **kw):
        pending = real(path, trees, **kw)
        started.append((path.name, pending))
        return pending

    m.setattr(stages, "save_trees", wrapper)
    return started


def _hold_write(m, name, gate, fail=False):
    """orbax's background completion of checkpoint ``name``'s trees (finalize, rename into
    place) waits for ``gate`` first; with ``fail`` it then fails, as a process killed
    mid-write leaves it: a temporary directory, nothing renamed into place."""
    from orbax.checkpoint._src.checkpointers import async_checkpointer as oac

    real = oac._background_wait_for_commit_futures

    def held(directory, *a, **kw):
        if directory.parent.name == name:
            assert gate.wait(30)
            if fail:
                raise OSError("killed mid-write")
        return real(directory, *a, **kw)

    m.setattr(oac, "_background_wait_for_commit_futures", held)


def _listing(d):
    return sorted(p.name for p in d.iterdir())


def test_asynchronous_commits_give_the_synchronous_result(want, tmp_path, monkeypatch):
    """Same best step, history and master as synchronous commits; a step is skipped only
    while the previous save is still being written and it is neither a new best nor the
    last; nothing is left that progress.json does not point at."""
    with monkeypatch.context() as m:
        started = _record_saves(m)
        sync = run(tmp_path / "s", asynchronous=False)
    same(sync, want)
    assert [n for n, _ in started] == ["ckpt-000002", "ckpt-000004", "ckpt-000005", "ckpt-000006"]
    # step 4's save (a new best) is still being written at step 5 (no new best): step 5 is
    # not checkpointed; the last step waits for step 4's save, then saves
    gate = threading.Event()
    with monkeypatch.context() as m:
        started = _record_saves(m)
        _hold_write(m, "ckpt-000004", gate)
        res = run(tmp_path / "a", on_step=lambda step: gate.set() if step == 5 else None)
    assert [n for n, _ in started] == ["ckpt-000002", "ckpt-000004", "ckpt-000006"]
    same(res, want)
    prog = json.loads((tmp_path / "a" / "progress.json").read_text())
    assert (prog["step"], prog["checkpoint"], prog["best"]) == (6, "ckpt-000006", "ckpt-000004")
    assert prog["history"] == want.history  # with step 5's record
    # nothing left that progress.json does not point at, no temporary of orbax's
    assert _listing(tmp_path / "a") == ["ckpt-000004", "ckpt-000006", "progress.json"]
    assert not [p for p in (tmp_path / "a").rglob("*") if "tmp" in p.name]


def test_a_kill_while_a_save_is_written_resumes_from_the_last_whole_checkpoint(want, tmp_path, monkeypatch):
    """A kill (no cleanup runs) while step 4's save is being written: progress.json still
    points at step 2's whole checkpoint, never at step 4's partial one; the rerun resumes at
    step 2, deletes the partial directory and ends with the uninterrupted result."""
    seen, gate = {}, threading.Event()

    def on_step(step):
        if step == 5:
            prog = json.loads((tmp_path / "progress.json").read_text())
            seen["pointer"] = (prog["step"], prog["checkpoint"], prog["best"])
            seen["written"] = _listing(tmp_path / "ckpt-000004")
            seen["whole"] = stages.load_flat(tmp_path / prog["checkpoint"], "master")
            raise Killed

    with monkeypatch.context() as m:
        started = _record_saves(m)
        _hold_write(m, "ckpt-000004", gate, fail=True)
        m.setattr(train_loop.Checkpoints, "settle", lambda self: None)  # a kill runs no cleanup
        with pytest.raises(Killed):
            run(tmp_path, on_step=on_step)
        gate.set()  # the held write fails now, its temporary directory stays
        with pytest.raises(OSError, match="killed mid-write"):
            started[-1][1].wait()
    assert seen["pointer"] == (2, "ckpt-000002", "ckpt-000002")
    assert "master" not in seen["written"] and any("tmp" in n for n in seen["written"])  # under way at the kill
    toy = Toy()
    master, opt_state = toy.init()
    for i in range(2):
        master, opt_state, _ = toy.step(master, opt_state, i)
    np.testing.assert_array_equal(np.asarray(seen["whole"]["w"]), np.asarray(master["w"]))  # step 2's, whole
    assert _listing(tmp_path) == ["ckpt-000002", "ckpt-000004", "progress.json"]
    logs = []
    res = train_loop.train_and_select(Toy(), evaluate, 0.1, train_loop.Checkpoints(tmp_path, "k"), progress=False,
                                      log=logs.append)
    assert logs == ["resuming toy at step 2"]
    same(res, want)
    assert _listing(tmp_path) == ["ckpt-000004", "ckpt-000006", "progress.json"]
    assert not [p for p in tmp_path.rglob("*") if "tmp" in p.name]


def test_a_whole_save_is_pointed_at_before_the_next_commit(tmp_path, monkeypatch):
    """Once step 2's files are whole, progress.json points at them without waiting for
    step 4's commit: a kill at step 3 (no cleanup) resumes at step 2."""
    seen = {}

    def on_step(step):
        if step == 3:
            started[-1][1].wait()
            seen["step"] = json.loads((tmp_path / "progress.json").read_text())["step"]
            raise Killed

    with monkeypatch.context() as m:
        started = _record_saves(m)
        m.setattr(train_loop.Checkpoints, "settle", lambda self: None)  # a kill runs no cleanup
        with pytest.raises(Killed):
            run(tmp_path, on_step=on_step)
    assert seen["step"] == 2 and [n for n, _ in started] == ["ckpt-000002"]


def test_an_exception_while_a_save_is_written_points_at_it_once_whole(want, tmp_path, monkeypatch):
    """An exception in the loop (not a kill): the pending save is completed and pointed at
    before the exception leaves the loop; no thread writes there afterwards."""
    gate = threading.Event()

    def on_step(step):
        if step == 5:
            gate.set()
            raise Killed

    with monkeypatch.context() as m:
        started = _record_saves(m)
        _hold_write(m, "ckpt-000004", gate)
        with pytest.raises(Killed):
            run(tmp_path, on_step=on_step)
        assert all(p.done() for _, p in started)
    prog = json.loads((tmp_path / "progress.json").read_text())
    assert (prog["step"], prog["checkpoint"], prog["best"]) == (4, "ckpt-000004", "ckpt-000004")
    assert prog["history"] == want.history[:5]
    assert _listing(tmp_path) == ["ckpt-000004", "progress.json"]
    logs = []
    res = train_loop.train_and_select(Toy(), evaluate, 0.1, train_loop.Checkpoints(tmp_path, "k"), progress=False,
                                      log=logs.append)
    assert logs == ["resuming toy at step 4"]
    same(res, want)


def test_without_evaluation_the_last_step_is_the_result(tmp_path):
    res = train_loop.train_and_select(Toy(), None, None, train_loop.Checkpoints(tmp_path, "k"), progress=False,
                                      log=lambda s: None)
    assert res.best_step == 6 and res.best_val is None
    assert all("val_accuracy" not in h for h in res.history)
    last = Toy()
    m, s = last.init()
    for i in range(6):
        m, s, _ = last.step(m, s, i)
    np.testing.assert_array_equal(np.asarray(res.best_master["w"]), np.asarray(m["w"]))
    json.loads((tmp_path / "progress.json").read_text())  # strict JSON (no -Infinity)


_HOLD = """
import sys, time
from cca_jax.stages import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_run_dir_lock_refuses_a_second_run_and_is_released_by_a_kill(tmp_path, capsys):
    from cca_jax import cli

    d = tmp_path / "run"
    d.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(d)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli.main(["run", "configs/tiny.yaml", "--quiet", "--out", str(d)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "another cca-jax run is using this run directory" in err
        assert sorted(p.name for p in d.iterdir()) == [stages.LOCK]  # nothing written
        with pytest.raises(CCAError, match="another cca-jax run"):
            with stages.RunLock(d):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with stages.RunLock(d):  # the OS released it with the process
        pass
