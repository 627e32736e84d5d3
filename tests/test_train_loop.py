"""The train-and-select loop: crash-safe checkpoint commits (a kill at every point of the
sequence resumes to the uninterrupted result), resume, selection, the run-directory lock."""

import json
import os
import signal
import subprocess
import sys

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


def run(d, **kw):
    return train_loop.train_and_select(Toy(), evaluate, 0.1, train_loop.Checkpoints(d, "k"), progress=False,
                                       log=lambda s: None, **kw)


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


# every point of the commit sequence: save master (the first tree written), save opt,
# write progress.json, delete what is no longer pointed at; at the 2nd and 3rd commit
@pytest.mark.parametrize("commit", [2, 3])
@pytest.mark.parametrize("point", ["before_save", "after_save", "before_pointer", "after_pointer", "before_clean",
                                   "after_clean"])
def test_a_kill_at_any_point_of_a_commit_resumes_to_the_same_result(want, tmp_path, monkeypatch, commit, point):
    with monkeypatch.context() as m:
        if point in ("before_save", "after_save"):
            _crash_on(m, stages, "save_trees", commit, before=point == "before_save")
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
