"""Memory settings per accelerator for a notebook-sized CCA run of gemma-2-2b-it (bf16,
8-shot prompts of about 1,000 tokens): how much of the GPU JAX may take, remat and batch
sizes, and a device mesh where one chip cannot hold the training state.

``choose`` is a pure function of what ``jax.devices()`` reports (platform, device kind,
device count, memory); ``setup`` runs in a notebook before JAX starts: it sets
XLA_PYTHON_CLIENT_MEM_FRACTION (read only when JAX creates its GPU client), then checks
that JAX sees the accelerator the runtime has and returns the preset.

What the numbers rest on (gemma-2-2b, amplification at batch 8 x 1,024 tokens, measured
on an H100, BENCHMARKS.md): the state that does not depend on the batch is about 12.3 GiB
(bf16 weights 4.9, float32 masters and gradients of the q/k/v/up leaves 3.0 each, their
bf16 working copy 1.5); full remat peaks at 13.8 GiB, remat ``dots`` at 23.5 GiB. Only the
H100/H200 rows are measured; the others are derived from those figures and are marked
``measured=False`` until a run on that accelerator confirms them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

from cca_jax.errors import CCAError

GiB = 1024**3
MEM_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    platform: str  # gpu | tpu | cpu
    mem_fraction: float | None  # XLA_PYTHON_CLIENT_MEM_FRACTION (GPUs; JAX's default is 0.75)
    mesh: tuple[int, int] | None  # (fsdp, tp) over the host's devices; None: one device
    remat: bool | str | None  # amplify.remat; None: the config's own
    amplify_batch: int | None  # amplify.batch_size (micro-batch of the full-batch gradient)
    dcm_batch: int | None
    eval_batch: int | None  # eval.batch_size: rows per generation batch (KV cache memory)
    measured: bool = False

    def overrides(self) -> list[str]:
        """The preset as ``--set`` overrides (none for the CPU preset)."""
        out = []
        if self.remat is not None:
            out.append(f"amplify.remat={str(self.remat).lower() if isinstance(self.remat, bool) else self.remat}")
        for key, v in (("amplify.batch_size", self.amplify_batch), ("dcm.batch_size", self.dcm_batch),
                       ("eval.batch_size", self.eval_batch)):
            if v is not None:
                out.append(f"{key}={v}")
        return out

    def apply(self, raw: dict) -> dict:
        """A run config mapping with the preset's settings in place."""
        from cca_jax import runconfig

        return runconfig.apply_overrides(raw, self.overrides())

    def describe(self) -> str:
        parts = [f"{self.name}: " + (", ".join(self.overrides()) or "the config's own settings")]
        if self.mem_fraction is not None:
            parts.append(f"{MEM_FRACTION_ENV}={self.mem_fraction}")
        if self.mesh is not None:
            parts.append(f"mesh fsdp={self.mesh[0]} x tp={self.mesh[1]}")
        if not self.measured and self.platform != "cpu":
            parts.append("not yet measured on this accelerator")
        return "; ".join(parts)


# 8% of a 16-24 GB card stays outside JAX's pool (CUDA context, cuBLAS/cuDNN workspaces:
# about 1.2-1.9 GB), 5% of a larger one
T4 = Preset("NVIDIA T4 16 GB", "gpu", 0.92, None, True, 2, 4, 8)  # 13.8 GiB pool: 12.3 fixed + a small batch
L4 = Preset("NVIDIA L4 24 GB", "gpu", 0.92, None, True, 8, 8, 16)  # full remat at batch 8: 13.8 GiB
A100_40 = Preset("NVIDIA A100 40 GB", "gpu", 0.95, None, "dots", 8, 8, 32)  # remat dots: 23.5 GiB
A100_80 = Preset("NVIDIA A100 80 GB", "gpu", 0.95, None, "dots", 8, 8, 64)
H100 = Preset("NVIDIA H100/H200 (stand-in for an A100 80 GB)", "gpu", 0.95, None, "dots", 8, 8, 64, measured=True)
# TPU v2-8: eight cores of 8 GiB; one core cannot hold the 12.3 GiB state, so the model
# is sharded: heads and neurons over 4 cores (tp), the model dimension over 2 (fsdp)
TPU_V2_8 = Preset("TPU v2-8 (8 cores x 8 GiB)", "tpu", None, (2, 4), "dots", 8, 8, 32)
TPU_V5E_1 = Preset("TPU v5e-1 (16 GiB)", "tpu", None, None, True, 4, 8, 16)
CPU = Preset("CPU", "cpu", None, None, None, None, None, None, measured=True)


def _gpu_by_memory(total: int | None) -> Preset:
    """An unlisted GPU: the preset of the listed card of its size."""
    if total is None or total < 20 * GiB:
        return T4
    if total < 32 * GiB:
        return L4
    if total < 64 * GiB:
        return A100_40
    return A100_80


def choose(platform: str, device_kind: str, n_devices: int = 1, memory_bytes: int | None = None) -> Preset:
    """The preset for an accelerator as JAX reports it (``platform``, ``device_kind``; the
    device count; a GPU's total memory when known)."""
    kind = device_kind.lower()
    if platform == "cpu":
        return CPU
    if platform == "gpu" or platform in ("cuda", "rocm"):
        if re.search(r"\bt4\b", kind):
            return T4
        if re.search(r"\bl4\b", kind):
            return L4
        if "a100" in kind:
            return A100_80 if ("80gb" in kind or (memory_bytes or 0) > 60 * GiB) else A100_40
        if re.search(r"\bh(100|200|800)\b|gh200", kind):
            return H100
        return _gpu_by_memory(memory_bytes)
    if platform == "tpu":
        if re.search(r"v2\b", kind):
            if n_devices < 4:
                raise CCAError(f"{device_kind}: {n_devices} TPU v2 core(s) cannot hold gemma-2-2b's training state "
                               f"(8 GiB each): use a TPU v2-8 or v5e runtime")
            return dataclasses.replace(TPU_V2_8, mesh=(n_devices // 4, 4))
        # v5e and later chips have 16 GiB or more: gemma-2-2b's state fits one of them
        return TPU_V5E_1
    raise CCAError(f"no memory preset for platform {platform!r} ({device_kind})")


# -- detection, without starting JAX --------------------------------------------------------

def gpu_info() -> tuple[str, int] | None:
    """(name, total bytes) of the first NVIDIA GPU from nvidia-smi; None without one."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    name, _, mib = line.rpartition(",")
    try:
        return name.strip(), int(float(mib)) * 1024**2
    except ValueError:
        return None


def has_tpu() -> bool:
    """Whether this machine has a TPU (Colab's TPU runtimes), without starting JAX."""
    env = ("TPU_ACCELERATOR_TYPE", "COLAB_TPU_ADDR", "TPU_NAME")
    return any(os.environ.get(k) for k in env) or Path("/dev/accel0").exists() or Path("/dev/vfio/0").exists()


def _jax_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(getattr(xla_bridge, "_backends", {}))
    except ImportError:
        return False


def set_memory_fraction(gpu: tuple[str, int] | None = None) -> float | None:
    """Set XLA_PYTHON_CLIENT_MEM_FRACTION for this machine's GPU unless it is set already;
    effective only before JAX starts. Returns the value in force (None: no GPU)."""
    gpu = gpu if gpu is not None else gpu_info()
    if gpu is None:
        return None
    if MEM_FRACTION_ENV not in os.environ:
        frac = choose("gpu", gpu[0], 1, gpu[1]).mem_fraction
        if _jax_started():
            print(f"JAX has started already: {MEM_FRACTION_ENV}={frac} applies after a restart "
                  f"(Runtime > Restart session), or set it before importing jax")
        os.environ[MEM_FRACTION_ENV] = str(frac)
    return float(os.environ[MEM_FRACTION_ENV])


def setup() -> Preset:
    """In a notebook, before JAX starts: set the GPU memory fraction, start JAX, check that
    it sees this runtime's accelerator (a clear error with the fix if not), and return the
    preset for it."""
    gpu = gpu_info()
    set_memory_fraction(gpu)
    import jax

    devices = jax.devices()
    d = devices[0]
    if d.platform == "cpu" and (gpu is not None or has_tpu()):
        what = f"a GPU ({gpu[0]})" if gpu is not None else "a TPU"
        fix = ("pip install -U 'jax[cuda12]'" if gpu is not None else "pip install -U 'jax[tpu]'")
        raise CCAError(f"JAX sees only the CPU, but this runtime has {what}: the accelerator plugin of jax is "
                       f"missing or does not match jax {jax.__version__}. Fix: {fix}, then Runtime > Restart "
                       f"session and run the notebook again (or Runtime > Disconnect and delete runtime for a "
                       f"fresh one)")
    memory = gpu[1] if gpu is not None and d.platform == "gpu" else None
    if memory is None and hasattr(d, "memory_stats"):
        try:
            memory = (d.memory_stats() or {}).get("bytes_limit")
        except Exception:  # not every backend reports it
            memory = None
    return choose(d.platform, d.device_kind, len(devices), memory)
