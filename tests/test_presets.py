"""Memory presets per accelerator (issue 23): chosen from what jax.devices() reports, turned
into config overrides; the GPU memory fraction set before JAX starts; importing cca_jax
does not start JAX (so the notebook can still set it)."""

import os
import subprocess
import sys

import pytest

from cca_jax import presets, runconfig
from cca_jax.errors import CCAError

GiB = 1024**3


@pytest.mark.parametrize("platform, kind, n, memory, want", [
    ("gpu", "Tesla T4", 1, 15 * GiB, presets.T4),
    ("gpu", "NVIDIA L4", 1, 22 * GiB, presets.L4),
    ("gpu", "NVIDIA A100-SXM4-40GB", 1, 40 * GiB, presets.A100_40),
    ("gpu", "NVIDIA A100-SXM4-80GB", 1, 80 * GiB, presets.A100_80),
    ("gpu", "NVIDIA A100-PCIE", 1, 80 * GiB, presets.A100_80),  # no size in the name: by memory
    ("gpu", "NVIDIA H200", 1, 141 * GiB, presets.H100),
    ("gpu", "NVIDIA L40S", 1, 46 * GiB, presets.A100_40),  # not an L4: by its memory
    ("gpu", "Some GPU", 1, 12 * GiB, presets.T4),
    ("tpu", "TPU v5 lite", 1, 16 * GiB, presets.TPU_V5E_1),
    ("cpu", "cpu", 1, None, presets.CPU),
])
def test_choose(platform, kind, n, memory, want):
    assert presets.choose(platform, kind, n, memory) == want


def test_tpu_v2_8_shards_over_its_cores():
    p = presets.choose("tpu", "TPU v2", 8, 8 * GiB)
    assert p.mesh == (2, 4) and p.mesh[0] * p.mesh[1] == 8 and p.mem_fraction is None
    with pytest.raises(CCAError, match="cannot hold"):
        presets.choose("tpu", "TPU v2", 1, 8 * GiB)


def test_presets_fit_the_memory_they_claim():
    # the memory that does not depend on the batch (see presets' docstring): 12.3 GiB; full
    # remat at batch 8 peaked at 13.8 GiB and remat dots at 23.5 GiB on gemma-2-2b
    fixed, full8, dots8 = 12.3, 13.8, 23.5
    for p, card in ((presets.T4, 15.0), (presets.L4, 22.5), (presets.A100_40, 39.5), (presets.A100_80, 79.2)):
        pool = p.mem_fraction * card
        per_row = ((full8 if p.remat is True else dots8) - fixed) / 8
        assert fixed + per_row * p.amplify_batch <= pool, p.name


def test_overrides_build_a_valid_config():
    raw = {"model": "m", "amplify": {"steps": 3}}
    cfg = runconfig.from_dict(presets.T4.apply(raw))
    assert cfg.amplify.remat is True and cfg.amplify.batch_size == 2 and cfg.amplify.steps == 3
    assert cfg.dcm.batch_size == 4 and cfg.eval.batch_size == 8
    assert runconfig.from_dict(presets.A100_40.apply(raw)).amplify.remat == "dots"
    assert presets.CPU.apply(raw) == raw and presets.CPU.overrides() == []
    assert "not yet measured" in presets.T4.describe() and "not yet measured" not in presets.H100.describe()


def test_memory_fraction_is_set_only_when_unset(monkeypatch):
    monkeypatch.delenv(presets.MEM_FRACTION_ENV, raising=False)
    assert presets.set_memory_fraction(("Tesla T4", 15 * GiB)) == 0.92
    assert os.environ[presets.MEM_FRACTION_ENV] == "0.92"
    monkeypatch.setenv(presets.MEM_FRACTION_ENV, "0.5")
    assert presets.set_memory_fraction(("NVIDIA A100-SXM4-80GB", 80 * GiB)) == 0.5  # the user's wins
    monkeypatch.delenv(presets.MEM_FRACTION_ENV)
    monkeypatch.setattr(presets, "gpu_info", lambda: None)
    assert presets.set_memory_fraction() is None and presets.MEM_FRACTION_ENV not in os.environ


def test_setup_on_the_cpu_and_a_missing_accelerator(monkeypatch):
    monkeypatch.setattr(presets, "gpu_info", lambda: None)
    monkeypatch.setattr(presets, "has_tpu", lambda: False)
    assert presets.setup() == presets.CPU  # tests run on the CPU
    # a runtime with a GPU whose jax sees only the CPU: one line naming the fix
    monkeypatch.setattr(presets, "gpu_info", lambda: ("Tesla T4", 15 * GiB))
    monkeypatch.setenv(presets.MEM_FRACTION_ENV, "0.9")
    with pytest.raises(CCAError, match=r"JAX sees only the CPU, but this runtime has a GPU \(Tesla T4\).*"
                                       r"pip install -U 'jax\[cuda12\]'"):
        presets.setup()


def test_importing_cca_jax_does_not_start_jax():
    code = ("import cca_jax, cca_jax.cli, cca_jax.pipeline, cca_jax.presets, cca_jax.runs\n"
            "from jax._src import xla_bridge\n"
            "assert not xla_bridge._backends, xla_bridge._backends\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stderr[-2000:]
