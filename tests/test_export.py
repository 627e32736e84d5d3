"""Export round trip: JAX -> HF directory -> transformers logits; orbax save/restore."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open

import cca_jax
from cca_jax import atomic, cli
import tiny
from tiny import TOL, hf_logits


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_export_round_trip(tmp_path, family):
    cfg = cca_jax.config.from_hf(tiny.hf_config(family))
    model = cca_jax.Transformer(cfg, rngs=nnx.Rngs(7))
    # bigger random weights than the default init so the comparison means something
    params = jax.tree.map(lambda x: x * 4.0, model.params())
    model = model.with_params(params)
    out = cca_jax.export_hf(model, tmp_path / "exported")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = tiny.tokens(2, 11)
    ref = hf_logits(hf, ids)
    ours = np.asarray(model(jnp.asarray(ids)).logits)
    assert ref.std() > 0.1
    assert np.abs(ours - ref).max() <= TOL
    names = set()
    with safe_open(str(out / "model.safetensors"), "np") as f:
        names = set(f.keys())
    if cfg.tie_word_embeddings:
        assert "lm_head.weight" not in names
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    else:
        assert "lm_head.weight" in names
    # and back into JAX
    again, _ = cca_jax.load_model(out)
    assert again.config == cfg
    np.testing.assert_allclose(np.asarray(again(jnp.asarray(ids)).logits), ours, atol=1e-6)


def test_sharded_export_with_index_and_bf16(tmp_path, hf_dirs):
    hf, d = hf_dirs["llama"]
    model, tok = cca_jax.load_model(d)
    out = cca_jax.export_hf(model, tmp_path / "sharded", max_shard_size=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = tiny.tokens(2, 9)
    assert np.abs(hf_logits(reloaded, ids) - hf_logits(hf, ids)).max() <= TOL
    # a JAX reload of the sharded export equals the original too
    again, _ = cca_jax.load_model(out)
    np.testing.assert_allclose(np.asarray(again(jnp.asarray(ids)).logits), np.asarray(model(jnp.asarray(ids)).logits), atol=1e-6)
    # bf16 export: the tensors are bf16 and transformers reads them
    bf = cca_jax.export_hf(model, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((bf / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(bf / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16


def test_export_overwrites_atomically(tmp_path, hf_dirs):
    _, d = hf_dirs["qwen2"]
    model, _ = cca_jax.load_model(d)
    target = tmp_path / "out"
    cca_jax.export_hf(model, target)
    cca_jax.export_hf(model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary dirs left


def test_orbax_save_restore(tmp_path, hf_dirs):
    _, d = hf_dirs["gemma3"]
    model, _ = cca_jax.load_model(d)
    cca_jax.save_checkpoint(model, tmp_path / "ckpt")
    back = cca_jax.restore_checkpoint(tmp_path / "ckpt")
    assert back.config == model.config
    for a, b in zip(jax.tree.leaves(model.params()), jax.tree.leaves(back.params())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


TINY_YAML = str(Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny-llama.yaml")


def _modes(folder):
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.iterdir()]}


def test_export_and_atomic_files_honour_the_umask(tmp_path):
    model, _ = cca_jax.load_model(TINY_YAML)
    old = os.umask(0o022)
    try:
        out = cca_jax.export_hf(model, tmp_path / "out")
        written = atomic.write_text(tmp_path / "notes" / "a.txt", "x")
    finally:
        os.umask(old)
    modes = _modes(out)
    assert modes.pop("out") == 0o755
    assert set(modes) >= {"config.json", "model.safetensors", atomic.MARKER}
    assert set(modes.values()) == {0o644}, modes  # not mkstemp's / safetensors' 0600
    assert stat.S_IMODE(written.stat().st_mode) == 0o644
    assert stat.S_IMODE(written.parent.stat().st_mode) == 0o755


_SLOW_EXPORT = """
import sys, time
import safetensors.numpy
real = safetensors.numpy.save_file
def slow(*args, **kwargs):
    real(*args, **kwargs)
    print("written", flush=True)
    time.sleep(300)
safetensors.numpy.save_file = slow
from cca_jax import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_killed_export_leaves_the_old_one_and_the_next_cleans_up(tmp_path):
    """SIGKILL mid-write runs no cleanup: the target keeps the earlier export, and the next
    export to it removes the abandoned scratch folder and puts the new export in place."""
    target = tmp_path / "exports" / "out"
    assert cli.main(["export", TINY_YAML, str(target)]) == 0  # float32
    old = {p.name: p.read_bytes() for p in target.iterdir()}
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_EXPORT, "export", TINY_YAML, str(target),
                             "--out-dtype", "bfloat16"], cwd=repo, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(repo), "JAX_PLATFORMS": "cpu"})
    try:
        assert proc.stdout.readline().strip() == "written"
    finally:
        proc.kill()
        proc.wait()
    left = [p.name for p in target.parent.iterdir() if p.name != "out"]
    assert len(left) == 1 and left[0].startswith(".out.cca_jax-partial-")  # what the kill left
    assert {p.name: p.read_bytes() for p in target.iterdir()} == old
    assert cli.main(["export", TINY_YAML, str(target), "--out-dtype", "bfloat16"]) == 0
    assert [p.name for p in target.parent.iterdir()] == ["out"]
    assert json.loads((target / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("stop", ["sigterm", "ctrl-c"])
def test_a_stopped_export_removes_its_temporary(tmp_path, monkeypatch, capsys, stop):
    import safetensors.numpy

    target = tmp_path / "out"
    assert cli.main(["export", TINY_YAML, str(target)]) == 0
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def interrupted(*args, **kwargs):
        if stop == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.numpy, "save_file", interrupted)
    if stop == "sigterm":
        with pytest.raises(SystemExit) as exc:
            cli.main(["export", TINY_YAML, str(target), "--out-dtype", "bfloat16"])
        assert exc.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    else:
        assert cli.main(["export", TINY_YAML, str(target), "--out-dtype", "bfloat16"]) == 130
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_replacing_without_rename_exchange_and_a_live_scratch_is_kept(tmp_path, monkeypatch):
    """Where renameat2 cannot swap, two renames do; a scratch folder whose writer still
    holds its lock (another export running) is never removed."""
    import fcntl

    target = tmp_path / "out"
    live = tmp_path / ".out.cca_jax-partial-0123456789abcdef"
    live.mkdir()
    (live / atomic.MARKER).write_text(json.dumps({"format": "cca_jax export", "version": 1, "complete": False}))
    with open(live / atomic.MARKER) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
        for text in ("old", "new"):
            with atomic.directory(target) as scratch:
                (scratch / "x.txt").write_text(text)
        assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "out"]
    assert (target / "x.txt").read_text() == "new"
    with atomic.directory(target) as scratch:  # the lock is gone: now it is abandoned
        (scratch / "x.txt").write_text("newer")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_export_moved_aside_by_a_killed_swap_comes_back(tmp_path):
    """Killed between the two renames, the target is missing and the earlier export lies
    under a scratch name: the next export puts it back before writing (so even a failing
    next export leaves the earlier one in place)."""
    aside = tmp_path / ".out.cca_jax-partial-00000000000000aa"
    aside.mkdir()
    (aside / "x.txt").write_text("old")
    (aside / atomic.MARKER).write_text(json.dumps(
        {"format": "cca_jax export", "version": 1, "complete": True, "files": ["x.txt"]}))
    with pytest.raises(RuntimeError):
        with atomic.directory(tmp_path / "out"):
            raise RuntimeError("the new export fails")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out" / "x.txt").read_text() == "old"
