"""The whole run on a device mesh (issue 20), on CPU host devices: 8 devices in one
process and 2 processes of 4 over jax.distributed give the one-device summary; the two
processes, killed during amplification with their DCM prefix caches parked in host
memory, resume on another mesh; the planner predicts what the run keeps on a device;
bad mesh settings are one line."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny import CONFIG, cli_error

ROOT = Path(__file__).resolve().parent.parent

# greedy tokens of the tiny model on a mesh (None: one device), speculative decoding on or
# off (repeated prompts: the n-gram drafts find matches); the scripts below print them
SPEC = """
def spec_tokens(root, fsdp, tp, speculative):
    import json
    from cca_jax import load_model, mesh
    from cca_jax.generate import generate
    m = mesh.build(mesh.MeshConfig(fsdp, tp)) if fsdp * tp > 1 else None
    model, _ = load_model(root + "/configs/models/tiny-llama.yaml", mesh=m)
    prompts = [[5 + (i * 7 + j * 3) % 50 for j in range(6 + i)] * 2 for i in range(4)]
    return json.dumps(generate(model, prompts, 12, eos_token_id=[], batch_size=4, speculative=speculative))
"""

# one process, 8 host devices: the one-device run (mesh 1 x 1: device 0), the same run on a
# (2, 4) mesh, the LoRA baseline on both, `cca-jax plan` on the runs' measured workload
# (examples and their length), and speculative decoding on the mesh
EIGHT = SPEC + textwrap.dedent("""
    import sys
    root, out, config = sys.argv[1:4]
    sys.path.insert(0, root)
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 8
    from cca_jax import cli
    from cca_jax.cca import examples as ex_lib

    print("SPEC one off", spec_tokens(root, 1, 1, "off"), flush=True)
    print("SPEC mesh ngram", spec_tokens(root, 2, 4, "ngram"), flush=True)

    assert cli.main(["run", config, "--out", out + "/one", "--quiet"]) == 0
    mesh = ["--set", "mesh.fsdp=2", "--set", "mesh.tp=4"]
    assert cli.main(["run", config, "--out", out + "/mesh", "--quiet", *mesh]) == 0
    lora = ["--set", "method=sft_lora", "--set", "sft.steps=2", "--set", "sft.eval_steps=[2]"]
    assert cli.main(["run", config, "--out", out + "/one_lora", "--quiet", *lora]) == 0
    assert cli.main(["run", config, "--out", out + "/mesh_lora", "--quiet", *lora, *mesh]) == 0
    exs = ex_lib.load(out + "/one/stages/localize/examples.jsonl")
    known = ["--examples", str(len(exs)), "--pivot-tokens", str(max(len(e.prefix) for e in exs))]
    assert cli.main(["plan", config, "--meshes", "1x1,2x4", "--json", out + "/plan.json", *known]) == 0
    # meshes from one device up: the first that fits a budget (1 x 1 for 1 GiB), or none
    assert cli.main(["plan", config, "--device-memory", "1GiB", "--json", out + "/fit.json", *known]) == 0
    assert cli.main(["plan", config, "--device-memory", "1KiB", "--max-devices", "1", *known]) == 0
    print("OK")
""")

# one of two processes (4 host devices each) over jax.distributed on localhost
PROCESS = SPEC + textwrap.dedent("""
    import os, sys
    root, coordinator, pid, out, config, kill_at = sys.argv[1:7]
    sys.path.insert(0, root)
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from cca_jax import cli, mesh, pipeline, runconfig
    if int(kill_at):  # the pipeline API on (2, 4), killed (no clean-up) after that amplification step
        mesh.initialize_distributed(coordinator, 2, int(pid))
        print("SPEC two ngram", spec_tokens(root, 2, 4, "ngram"), flush=True)
        cfg = runconfig.load(config, ["mesh.fsdp=2", "mesh.tp=4", "mesh.dcm_cache=host"])
        to_memory, parked = mesh.to_memory, []

        def counted(tree, kind):  # how many DCM prefix caches went to host memory
            parked.append(kind)
            return to_memory(tree, kind)

        mesh.to_memory = counted

        def kill(step):
            if step == int(kill_at):
                print("PARKED", parked.count("pinned_host"), flush=True)
                os._exit(3)

        pipeline.run(cfg, out, progress=False, on_amplify_step=kill)
    else:  # the command line, resuming on (4, 2)
        sys.exit(cli.main(["run", config, "--out", out, "--quiet", "--set", "mesh.fsdp=4", "--set", "mesh.tp=2",
                           "--set", "mesh.dcm_cache=host", "--coordinator", coordinator, "--num-processes", "2",
                           "--process-id", pid]))
""")


def _env(devices: int) -> dict:
    # XLA:CPU compiles with fewer LLVM passes (every run below does: they still agree), a
    # third less compile time
    flags = (f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true")
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", CCA_JAX_COMPILE_CACHE="off")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(args: list, env: dict, log: Path) -> subprocess.Popen:
    """A subprocess writing its output to files (a pipe nobody reads while we wait for
    another process would fill up and stop it)."""
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen(args, env=env, stdout=out, stderr=err, text=True)


def _finish(procs: list, logs: list) -> list:
    """(exit status, stdout, stderr) of each process."""
    return [(p.wait(timeout=1200), log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text())
            for p, log in zip(procs, logs)]


def _two_processes(out: Path, kill_at: int) -> list:
    coordinator = f"localhost:{_free_port()}"
    logs = [out.parent / f"two-{kill_at}-{i}" for i in range(2)]
    procs = [_start([sys.executable, "-c", PROCESS, str(ROOT), coordinator, str(i), str(out), str(CONFIG),
                     str(kill_at)], _env(4), log) for i, log in enumerate(logs)]
    return _finish(procs, logs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 8-device process and the two processes run side by side (each compiles on one
    thread: two cores finish both in about the time of one)."""
    out = tmp_path_factory.mktemp("mesh")
    eight = _start([sys.executable, "-c", EIGHT, str(ROOT), str(out), str(CONFIG)], _env(8), out / "eight")
    killed = _two_processes(out / "two", kill_at=3)
    killed_at = json.loads((out / "two/stages/amplify/progress.json").read_text())["step"] if all(
        k[0] == 3 for k in killed) else None
    resumed = _two_processes(out / "two", kill_at=0) if killed_at is not None else None
    [(rc, stdout, stderr)] = _finish([eight], [out / "eight"])
    assert rc == 0 and stdout.strip().endswith("OK"), stdout[-3000:] + stderr[-5000:]
    return {"out": out, "eight": stdout, "killed": killed, "killed_at": killed_at, "resumed": resumed}


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


def test_a_run_on_a_2_by_4_mesh_equals_one_device(runs):
    out = runs["out"]
    assert "mesh fsdp=2 x tp=4 over 8 cpu devices" in runs["eight"]
    _same_run(out / "mesh", out / "one")
    t = _summary(out / "mesh")["timings_seconds"]
    assert t["amplify"]["peak_bytes_per_device"] > 0 and t["amplify"]["memory"] == "live_arrays"


def test_the_lora_baseline_on_the_mesh_equals_one_device(runs):
    a, b = _summary(runs["out"] / "mesh_lora"), _summary(runs["out"] / "one_lora")
    assert a["method"] == "sft_lora" and set(a["loss_by_step"]) == {"1", "2"}
    for k in ("selected_templates", "best_step", "val_accuracy_by_step", "test_accuracy_before",
              "test_accuracy_after", "trainable_parameters"):
        assert a[k] == b[k], k
    for k, v in b["loss_by_step"].items():
        assert a["loss_by_step"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_two_processes_killed_and_resumed_on_another_mesh_equal_one_device(runs):
    out = runs["out"]
    assert [rc for rc, _, _ in runs["killed"]] == [3, 3], [e[-3000:] for _, _, e in runs["killed"]]
    (_, k0, _), (_, k1, _) = runs["killed"]
    # both processes parked every DCM prefix cache in host memory (mesh.dcm_cache: host)
    assert all(int(o.split("PARKED")[1].split()[0]) > 0 for o in (k0, k1)), (k0, k1)
    assert runs["killed_at"] == 2  # the last checkpoint committed before step 3
    resumed = runs["resumed"]
    assert [rc for rc, _, _ in resumed] == [0, 0], [e[-3000:] for _, _, e in resumed]
    (_, out0, _), (_, out1, _) = resumed
    # the (2, 4) checkpoint restored on (4, 2)
    assert "mesh fsdp=4 x tp=2 over 8 cpu devices in 2 processes" in out0
    assert "resuming amplification at step 2" in out0 and "test accuracy before" in out0
    # process 1 computed the same and logged and reported none of it (Gloo, the CPU
    # collectives' library, prints its connections on both, lines interleaved)
    gloo = ("Gloo", "peer ranks", "connected")
    ours = [ln for ln in out0.splitlines() if ln.strip() and not any(w in ln for w in gloo)]
    assert len(ours) >= 4 and not any(ln in out1 for ln in ours), out1
    _same_run(out / "two", out / "one")


def _spec(text: str, name: str) -> list:
    line = next(ln for ln in text.splitlines() if ln.startswith(f"SPEC {name} "))
    return json.loads(line.split(" ", 3)[3])


def test_speculative_decoding_on_a_mesh_and_over_two_processes_gives_the_one_device_tokens(runs):
    one = _spec(runs["eight"], "one off")
    assert len(one) == 4 and all(len(r) == 12 for r in one)
    assert _spec(runs["eight"], "mesh ngram") == one
    for _, out, _ in runs["killed"]:
        assert _spec(out, "two ngram") == one


def test_planner_predicts_what_the_run_keeps_on_a_device(runs):
    """The planner's resident bytes per device against the most live array bytes the run
    saw on one device, stage by stage (XLA:CPU keeps no allocator statistics, so a CPU run
    cannot see a program's temporaries: those are compared with the GPU's peak in
    bench/mesh_perf.py)."""
    out = runs["out"]
    plans = json.loads((out / "plan.json").read_text())
    assert [(m["fsdp"], m["tp"]) for m in plans["meshes"]] == [(1, 1), (2, 4)]
    for name, m in zip(("one", "mesh"), plans["meshes"]):
        run = _summary(out / name)["timings_seconds"]
        stages = {s["stage"]: sum(s["resident_bytes"].values()) for s in m["stages"]}
        assert all(s["peak_bytes"] >= sum(s["resident_bytes"].values()) for s in m["stages"])
        pairs = [(stages["generate"], run["base_eval"]), (stages["dcm"], run["circuit"]),
                 (max(stages["amplify"], stages["amplify: val eval"]), run["amplify"])]
        for planned, measured in pairs:
            got = measured["peak_bytes_per_device"]
            assert abs(planned - got) <= 0.25 * got, (name, planned, got)
    # a mesh's weights and caches are split: less on each device than on one
    assert plans["meshes"][1]["peak_bytes"] < plans["meshes"][0]["peak_bytes"]


def test_plan_prints_each_stage_and_the_smallest_mesh(runs):
    text = runs["eight"]
    for stage in ("generate", "dcm", "amplify", "amplify: val eval"):
        assert f"| 1 x 1 | {stage} |" in text and f"| 2 x 4 | {stage} |" in text
    fit = json.loads((runs["out"] / "fit.json").read_text())
    assert fit["smallest_fit"] == {"fsdp": 1, "tp": 1, "devices": 1} and len(fit["meshes"]) == 1
    assert fit["meshes"][0]["peak_bytes"] <= 2**30 and fit["device_memory"] == 2**30
    assert "smallest mesh within 1.00 GiB per device: fsdp=1 x tp=1 (1 device)" in text
    assert "smallest mesh within 1.00 KiB per device: none of those tried" in text


# -- one-line errors ---------------------------------------------------------------------------------

def test_a_mesh_that_does_not_match_the_devices_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    cli_error(capsys, ["run", str(CONFIG), "--out", str(out), "--set", "mesh.fsdp=2", "--set", "mesh.tp=4"],
              "mesh.fsdp=2 x mesh.tp=4 = 8 devices, but this run has 1")
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
    cli_error(capsys, ["run", str(CONFIG), "--out", str(out), *argv], words)
    assert not out.exists()


def test_eval_and_bench_tasks_take_only_mesh_settings(tmp_path, capsys):
    cli_error(capsys, ["eval", "--model", "smollm2-135m", "--out", str(tmp_path / "e"), "--set", "dcm.reg=1"],
              "mesh.KEY=VALUE")
    cli_error(capsys, ["bench-tasks", "--model", "x.yaml", "--out", str(tmp_path / "b.json"), "--tasks",
                       "mmlu_5shot", "--set", "mesh.fsdp=0"], "mesh.fsdp")
    assert not any(tmp_path.iterdir())


def test_plan_options_are_one_line(capsys):
    cli_error(capsys, ["plan", str(CONFIG), "--device-memory", "lots"], "--device-memory")
    cli_error(capsys, ["plan", str(CONFIG), "--meshes", "2by4"], "--meshes")
