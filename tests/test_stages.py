"""Stage keys hash what a stage depends on: a model directory's config, tokenizer and
weight contents (not just names and sizes)."""

import json
import os

import numpy as np

from cca_jax import stages


def _hf_dir(tmp_path, hf_dirs):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(hf_dirs["llama"][1], d)
    return d


def test_model_identity_follows_config_and_weight_contents(tmp_path, hf_dirs):
    d = _hf_dir(tmp_path, hf_dirs)
    base = stages.model_identity(str(d))
    assert stages.model_identity(str(d)) == base
    # other weights of the same size, the modification time kept
    w = d / "model.safetensors"
    st = w.stat()
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF  # one byte of the last tensor
    w.write_bytes(bytes(data))
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert w.stat().st_size == st.st_size
    assert stages.model_identity(str(d)) != base
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    assert stages.model_identity(str(d)) == base
    # rope_theta / rms_norm_eps edited in config.json
    cfg = json.loads((d / "config.json").read_text())
    for k, v in (("rms_norm_eps", 1e-3), ("rope_theta", 1234.0)):
        (d / "config.json").write_text(json.dumps({**cfg, k: v}))
        assert stages.model_identity(str(d)) != base, k
    (d / "config.json").write_text(json.dumps(cfg))


def test_large_files_are_keyed_by_size_mtime_and_sampled_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "FULL_HASH_BYTES", 1 << 16)
    f = tmp_path / "w.safetensors"
    rng = np.random.default_rng(0)
    f.write_bytes(rng.bytes(1 << 22))
    st = f.stat()
    base = stages.file_digest(f)
    assert base.startswith("s:")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # touched
    assert stages.file_digest(f) != base
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert stages.file_digest(f) == base
    data = bytearray(f.read_bytes())
    data[(len(data) - stages._SAMPLE_BYTES) * 3 // stages._SAMPLE_BLOCKS] ^= 1  # inside a sampled block
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert stages.file_digest(f) != base


def test_stage_record_checks_its_files(tmp_path):
    logs = []
    s = stages.Stages(tmp_path, log=logs.append)
    d = s.dir("a")
    (d / "out.jsonl").write_text("1\n2\n")
    s.finish("a", "k", 1.5)
    assert s.done("a", "k") and not s.done("a", "other") and s.seconds("a") == 1.5
    (d / "out.jsonl").write_text("1\n")
    assert not s.done("a", "k") and "running it again" in logs[-1]
    (d / "out.jsonl").unlink()
    assert not s.done("a", "k")
    (d / "done.json").write_text("{")  # truncated record: not done, no traceback
    assert not s.done("a", "k") and s.seconds("a") == 0.0
