"""The whole run on a device mesh (issue 20), on CPU host devices: 8 devices in one
process and 2 processes of 4 over jax.distributed give the one-device summary; a mesh
run killed during amplification resumes on another mesh; the planner predicts what the
run keeps on a device; bad mesh settings are one line."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cca_jax import cli
from tiny import CONFIG

ROOT = Path(__file__).resolve().parent.parent

# one process, 8 host devices: the one-device run (mesh 1 x 1: device 0), a (2, 4) run
# killed after amplification step 3 and resumed on (4, 2), and the planner on both runs'
# measured workload
EIGHT = textwrap.dedent("""
    import json, sys
    root, out, config = sys.argv[1:4]
    sys.path.insert(0, root)
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 8
    from cca_jax import cli, pipeline, plan, runconfig
    from cca_jax.cca import examples as ex_lib

    assert cli.main(["run", config, "--out", out + "/one", "--quiet"]) == 0

    class Killed(Exception):
        pass

    def kill(step):
        if step == 3:
            raise Killed

    cfg = runconfig.load(config, ["mesh.fsdp=2", "mesh.tp=4"])
    try:
        pipeline.run(cfg, out + "/mesh", progress=False, on_amplify_step=kill, log=lambda s: None)
        raise AssertionError("the run was not killed")
    except Killed:
        pass
    print("KILLED AT", json.load(open(out + "/mesh/stages/amplify/progress.json"))["step"], flush=True)
    assert cli.main(["run", config, "--out", out + "/mesh", "--quiet", "--set", "mesh.fsdp=4",
                     "--set", "mesh.tp=2"]) == 0

    # the planner on the run's own workload (examples and their length are known now)
    exs = ex_lib.load(out + "/one/stages/localize/examples.jsonl")
    res = {}
    for name, mesh in (("one", (1, 1)), ("mesh", (2, 4))):
        cfg = runconfig.load(config, [f"mesh.fsdp={mesh[0]}", f"mesh.tp={mesh[1]}"])
        w = plan.workload(cfg, examples=len(exs), pivot_tokens=max(len(e.prefix) for e in exs), log=lambda s: None)
        res[name] = plan.plan(cfg, meshes=[mesh], w=w, log=lambda s: None)["meshes"][0]["stages"]
    json.dump(res, open(out + "/plan.json", "w"))
    print("OK")
""")

# one of two processes (4 host devices each) over jax.distributed on localhost
PROCESS = textwrap.dedent("""
    import os, sys
    root, coordinator, pid, out, config, kill_at = sys.argv[1:7]
    sys.path.insert(0, root)
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from cca_jax import cli, mesh, pipeline, runconfig
    if int(kill_at):  # the pipeline API, killed (no clean-up) after that amplification step
        mesh.initialize_distributed(coordinator, 2, int(pid))
        cfg = runconfig.load(config, ["mesh.fsdp=2", "mesh.tp=4"])

        def kill(step):
            if step == int(kill_at):
                os._exit(3)

        pipeline.run(cfg, out, progress=False, on_amplify_step=kill)
    else:  # the command line, resuming
        sys.exit(cli.main(["run", config, "--out", out, "--quiet", "--set", "mesh.fsdp=2", "--set", "mesh.tp=4",
                           "--coordinator", coordinator, "--num-processes", "2", "--process-id", pid]))
""")


def _env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                CCA_JAX_COMPILE_CACHE="off")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(args: list, env: dict, log: Path) -> tuple:
    """A subprocess writing its output to files (a pipe nobody reads while we wait for
    another process would fill up and stop it)."""
    out, err = open(log.with_suffix(".out"), "w+"), open(log.with_suffix(".err"), "w+")
    return subprocess.Popen(args, env=env, stdout=out, stderr=err, text=True), out, err


def _finish(started) -> list:
    res = []
    for p, out, err in started:
        rc = p.wait(timeout=1800)
        out.seek(0), err.seek(0)
        res.append((rc, out.read(), err.read()))
        out.close(), err.close()
    return res


def _two_processes(out: Path, kill_at: int) -> list:
    coordinator = f"localhost:{_free_port()}"
    return [_start([sys.executable, "-c", PROCESS, str(ROOT), coordinator, str(i), str(out), str(CONFIG),
                    str(kill_at)], _env(4), out.parent / f"two-{kill_at}-{i}") for i in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 8-device process and the two processes run side by side (the compiles of
    each are single-threaded: two cores finish both in about the time of one)."""
    out = tmp_path_factory.mktemp("mesh")
    eight = _start([sys.executable, "-c", EIGHT, str(ROOT), str(out), str(CONFIG)], _env(8), out / "eight")
    killed = _finish(_two_processes(out / "two", kill_at=3))
    resumed = _finish(_two_processes(out / "two", kill_at=0)) if [k[0] for k in killed] == [3, 3] else None
    [(rc, stdout, stderr)] = _finish([eight])
    assert rc == 0 and stdout.strip().endswith("OK"), stdout[-3000:] + stderr[-5000:]
    return out, stdout, killed, resumed


def _summary(d: Path) -> dict:
    return json.loads((d / "summary.json").read_text())


def _same_run(got: Path, want: Path) -> None:
    """Same templates, pivots, circuit, best step and accuracies; the float losses and
    faithfulness to float32 rounding (sharded matmuls sum in another order)."""
    a, b = _summary(got), _summary(want)
    for k in ("selected_templates", "localization", "components_selected", "components_per_layer", "best_step",
              "val_accuracy_by_step", "test_accuracy_before", "test_accuracy_after",
              "test_accuracy_selected_templates", "fraction_parameters_changed"):
        assert a[k] == b[k], k
    for k, v in b["loss_by_step"].items():
        assert a["loss_by_step"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    for k in ("ld_full", "ld_circuit", "fraction"):
        assert a["faithfulness"][k] == pytest.approx(b["faithfulness"][k], rel=1e-3, abs=1e-6), k
    for f in ("localize/examples.jsonl", "circuit/mask.npz"):
        assert (got / "stages" / f).read_bytes() == (want / "stages" / f).read_bytes(), f


def test_mesh_run_killed_and_resumed_on_another_mesh_equals_one_device(runs):
    out, stdout = runs[:2]
    assert "KILLED AT 2" in stdout  # the last committed checkpoint before step 3
    assert "resuming amplification at step 2" in stdout
    _same_run(out / "mesh", out / "one")
    t = _summary(out / "mesh")["timings_seconds"]
    assert t["amplify"]["peak_bytes_per_device"] > 0 and t["amplify"]["memory"] == "live_arrays"


def test_planner_predicts_what_the_run_keeps_on_a_device(runs):
    """The planner's resident bytes per device against the most live array bytes the run
    saw on one device (XLA:CPU keeps no allocator statistics, so a CPU run cannot see a
    program's temporaries: those are compared with the GPU's peak in bench/mesh_perf.py)."""
    out = runs[0]
    plans = json.loads((out / "plan.json").read_text())
    for name in ("one", "mesh"):
        run = _summary(out / name)["timings_seconds"]
        stages = {s["stage"]: sum(s["resident_bytes"].values()) for s in plans[name]}
        assert all(s["peak_bytes"] >= sum(s["resident_bytes"].values()) for s in plans[name])
        pairs = [(stages["generate"], run["base_eval"]), (stages["dcm"], run["circuit"])]
        if name == "one":  # the (2, 4) run's amplification finished on (4, 2)
            pairs.append((max(stages["amplify"], stages["amplify: val eval"]), run["amplify"]))
        for planned, measured in pairs:
            got = measured["peak_bytes_per_device"]
            assert abs(planned - got) <= 0.25 * got, (name, planned, got)


def test_two_processes_killed_and_resumed_equal_one_device(runs):
    out, _, killed, resumed = runs
    assert [rc for rc, _, _ in killed] == [3, 3], [e[-3000:] for _, _, e in killed]
    assert resumed is not None and [rc for rc, _, _ in resumed] == [0, 0], [e[-3000:] for _, _, e in resumed]
    (_, out0, _), (_, out1, _) = resumed
    assert "resuming amplification at step 2" in out0 and "test accuracy before" in out0
    # process 1 computed the same and wrote, logged and reported nothing
    assert "resuming" not in out1 and "test accuracy" not in out1
    _same_run(out / "two", out / "one")


# -- one-line errors ---------------------------------------------------------------------------------

def _one_line(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cca-jax: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_mesh_that_does_not_match_the_devices_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    err = _one_line(capsys, ["run", str(CONFIG), "--out", str(out), "--set", "mesh.fsdp=2", "--set", "mesh.tp=4"])
    assert "mesh.fsdp=2 x mesh.tp=4 = 8 devices, but this run has 1" in err
    assert not out.exists()


@pytest.mark.parametrize("argv, words", [
    (["--set", "mesh.tp=0"], "mesh.tp"),
    (["--set", "mesh.dcm=diagonal"], "mesh.dcm"),
    (["--set", "mesh.pp=2"], "unknown key(s) pp in section mesh"),
    (["--coordinator", "localhost:1234"], "go together"),
    (["--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2"], "--process-id"),
])
def test_bad_mesh_and_process_options_are_one_line(tmp_path, capsys, argv, words):
    out = tmp_path / "run"
    err = _one_line(capsys, ["run", str(CONFIG), "--out", str(out), *argv])
    assert words in err
    assert not out.exists()


def test_eval_and_bench_tasks_take_only_mesh_settings(tmp_path, capsys):
    err = _one_line(capsys, ["eval", "--model", "smollm2-135m", "--out", str(tmp_path / "e"), "--set", "dcm.reg=1"])
    assert "mesh.KEY=VALUE" in err
    err = _one_line(capsys, ["bench-tasks", "--model", "x.yaml", "--out", str(tmp_path / "b.json"), "--tasks", "mmlu",
                             "--set", "mesh.fsdp=0"])
    assert "mesh.fsdp" in err
    assert not any(tmp_path.iterdir())


def test_plan_prints_each_stage_and_the_smallest_mesh(tmp_path, capsys):
    """One device (this process): the planner on the tiny config, a budget it fits and
    one it does not."""
    assert cli.main(["plan", str(CONFIG), "--json", str(tmp_path / "plan.json")]) == 0
    text = capsys.readouterr().out
    for stage in ("generate", "dcm", "amplify", "amplify: val eval"):
        assert f"| {stage} |" in text
    res = json.loads((tmp_path / "plan.json").read_text())
    peak = res["meshes"][0]["peak_bytes"]
    assert peak > 0 and res["smallest_fit"] == {"fsdp": 1, "tp": 1, "devices": 1}
    assert cli.main(["plan", str(CONFIG), "--device-memory", "1KiB", "--max-devices", "1"]) == 0
    assert "none of those tried" in capsys.readouterr().out
    assert "--device-memory" in _one_line(capsys, ["plan", str(CONFIG), "--device-memory", "lots"])
    assert "--meshes" in _one_line(capsys, ["plan", str(CONFIG), "--meshes", "2by4"])


def test_dcm_prefix_caches_streamed_from_host_memory_give_the_same_mask():
    """mesh.dcm_cache: host parks every batch's prefix cache in host memory and copies
    each in for its step: the same mask and history as caches kept on the device."""
    import jax

    from cca_jax import load_model
    from cca_jax.cca import dcm
    from cca_jax.cca.examples import LocalizationExample

    model, _ = load_model(ROOT / "configs" / "models" / "tiny-llama.yaml")
    rng = np.random.default_rng(0)
    exs = [LocalizationExample(tuple(int(t) for t in rng.integers(3, 128, 10 + i)), 5 + i, 9 + i, 0, i)
           for i in range(6)]
    c = dcm.DCMConfig(batch_size=2, epochs=3, lr=0.05)
    dev = dcm.train_mask(model, exs, c, progress=False)
    host = dcm.train_mask(model, exs, c, progress=False, caches_on_host=True)
    assert dev.history == host.history
    assert all((dev.m[k] == host.m[k]).all() for k in dev.m)
    assert jax.default_backend() == "cpu"
