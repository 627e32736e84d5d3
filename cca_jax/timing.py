"""Where a stage's time goes: compilation, waiting for the device, and the host's own work.

- compilation: JAX reports every trace, lowering and XLA compile through
  ``jax.monitoring`` duration events; ``compiles`` counts XLA compilations that were not
  served from the persistent cache (``cache_hits`` counts those that were).
- device: the time the host spends blocked on device results (``wait``/``fetch`` at
  the points where the program reads them: a stage's device work that the host did not
  wait for overlapped the host's own work).
- host: the rest of the wall clock (Python, tokenization, data, dispatch, I/O). A dispatch
  that waits because the device is still busy with earlier work counts here too (an
  amplification step on a GPU: most of its "host" seconds, ``bench/amplify_probe.py``).
- memory: per-device peak bytes: the allocator's peak so far (``peak_bytes_in_use``,
  GPU and TPU: a process-lifetime peak, so a stage shows the highest of itself and the
  stages before it), or on backends without memory statistics (the CPU) the most live
  array bytes on one device, sampled whenever the host waits for the device and at the
  end (XLA's temporary buffers inside a program are not arrays: not counted there).

``enable_cache`` turns on JAX's persistent compilation cache, so a rerun or a resumed
run compiles nothing it compiled before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import Iterator

import jax

_COMPILE = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
            "/jax/core/compile/backend_compile_duration")
_BACKEND = "/jax/core/compile/backend_compile_duration"
_HIT = "/jax/compilation_cache/cache_hits"
# the compile phases by name in summary.json: Python tracing, lowering to MLIR, XLA's compile
_PHASES = dict(zip(_COMPILE, ("trace", "lower", "xla")))
DEFAULT_CACHE = Path("~/.cache/cca_jax/xla")


@dataclasses.dataclass
class Account:
    wall: float = 0.0
    compile: float = 0.0
    compiles: int = 0  # XLA compilations (cache hits excluded)
    cache_hits: int = 0
    device: float = 0.0  # host blocked on device results
    peak_bytes: int = 0  # per device (see the module's docstring)
    memory: str = ""  # how peak_bytes was measured: peak_bytes_in_use | live_arrays
    # per jitted function: [XLA compiles (cache hits excluded), seconds of tracing, lowering
    # and compiling]: which programs a stage's compile time goes to
    programs: dict = dataclasses.field(default_factory=dict)
    # compile seconds by phase (trace, lower, xla): what a faster compile would have to cut
    phases: dict = dataclasses.field(default_factory=dict)
    # compiles run ahead on a background thread (generate.warm) while the device works:
    # seconds and XLA compiles, not part of ``compile`` (they are off the critical path)
    background: float = 0.0
    background_compiles: int = 0
    # device programs run, by kind and shape (``count``): with each one's step cost from
    # a benchmark, what the stage would cost if it ran at its steps' speed
    work: dict = dataclasses.field(default_factory=dict)
    # with CCA_JAX_STEP_PROBE=1 (``step``): each program kind's seconds, one call at a time
    steps: dict = dataclasses.field(default_factory=dict)

    def add(self, other: "Account") -> None:
        """Sum ``other``'s seconds and counts into this one (the parts of a loop)."""
        self.wall += other.wall
        self.compile += other.compile
        self.compiles += other.compiles
        self.cache_hits += other.cache_hits
        self.device += other.device
        self.background += other.background
        self.background_compiles += other.background_compiles
        for mine, theirs in ((self.phases, other.phases), (self.work, other.work)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        for k, v in other.steps.items():
            self.steps.setdefault(k, []).extend(v)

    def split(self) -> dict:
        """Seconds compiling, waiting for the device, and the host's own (the rest)."""
        return {"compile": round(self.compile, 3), "device": round(self.device, 3),
                "host": round(max(self.wall - self.compile - self.device, 0.0), 3)}

    def to_json(self) -> dict:
        top = sorted(self.programs.items(), key=lambda kv: -kv[1][1])[:TOP_PROGRAMS]
        sp = self.split()
        return {"total": round(self.wall, 3), "compile": sp["compile"], "compiles": self.compiles,
                "cache_hits": self.cache_hits, "device": sp["device"], "host": sp["host"],
                "peak_bytes_per_device": self.peak_bytes, "memory": self.memory,
                "programs": {k: [n, round(t, 3)] for k, (n, t) in top if t >= 0.001},
                "compile_phases": {k: round(v, 3) for k, v in self.phases.items()},
                "compile_background": round(self.background, 3), "compiles_background": self.background_compiles,
                "work": dict(self.work), **({"step_probe": _probe_summary(self.steps)} if self.steps else {})}


def _probe_summary(steps: dict) -> dict:
    """kind -> [calls, median seconds a call, calls x median]: the median leaves out a
    first call's program load."""
    out = {}
    for k, v in steps.items():
        med = sorted(v)[len(v) // 2]
        out[k] = [len(v), round(med, 6), round(med * len(v), 4)]
    return out


TOP_PROGRAMS = 8  # the slowest programs to compile, per stage, in summary.json


_open: list[Account] = []  # accounts being filled (nested stages: every enclosing one too)
_lock = threading.Lock()
_listening = False
_hit = threading.local()  # a cache hit reported inside the backend compile that follows it
_background = threading.local()  # set on threads that compile ahead (compile_ahead)


def compile_ahead(specs) -> threading.Thread:
    """Compile ``specs`` ((jitted function, arguments: arrays or ShapeDtypeStructs), ...)
    on a started background thread, while the caller's device works: a later call with
    the same avals finds each program ready. The thread traces under the caller's matmul
    precision (thread-local, ``precision.for_dtype``; JAX keys programs on it). Its compile
    events count as ``compile_background``; a failure is dropped (the call it prepared for
    then compiles on its own, what it would have done anyway)."""
    thread = threading.Thread(target=_compile_specs, args=(specs, jax.config.jax_default_matmul_precision),
                              daemon=True, name="cca_jax-compile-ahead")
    thread.start()
    return thread


def _compile_specs(specs, matmul_precision) -> None:
    _listen()
    _background.on = True
    try:
        with jax.default_matmul_precision(matmul_precision) if matmul_precision else contextlib.nullcontext():
            for fn, args in specs:
                fn.lower(*args).compile()
    except Exception:  # noqa: BLE001 (ahead-of-time work only: never the run's failure)
        pass


def _on_duration(name: str, seconds: float, **kw) -> None:
    if name in _COMPILE and getattr(_background, "on", False):
        with _lock:
            for a in _open:
                a.background += seconds
                a.background_compiles += name == _BACKEND and not getattr(_hit, "pending", False)
        if name == _BACKEND:
            _hit.pending = False
        return
    if name in _COMPILE:
        fun = str(kw.get("fun_name", "?"))  # JAX names the function: "f" when tracing, "jit(f)" compiling
        fun = fun[4:-1] if fun.startswith("jit(") and fun.endswith(")") else fun
        compiled = name == _BACKEND and not getattr(_hit, "pending", False)
        if name == _BACKEND:
            _hit.pending = False
        with _lock:
            for a in _open:
                a.compile += seconds
                a.compiles += name == _BACKEND
                n, t = a.programs.get(fun, (0, 0.0))
                a.programs[fun] = (n + compiled, t + seconds)
                a.phases[_PHASES[name]] = a.phases.get(_PHASES[name], 0.0) + seconds


def _on_event(name: str, **_) -> None:
    if name == _HIT and getattr(_background, "on", False):
        _hit.pending = True
        return
    if name == _HIT:
        _hit.pending = True
        with _lock:
            for a in _open:
                a.cache_hits += 1
                a.compiles -= 1  # a backend-compile event follows every request, hit or not


def _listen() -> None:
    global _listening
    if not _listening:
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        jax.monitoring.register_event_listener(_on_event)
        _listening = True


@contextlib.contextmanager
def account() -> Iterator[Account]:
    """Fill an Account with what happens inside the block (nested blocks count in every
    enclosing one)."""
    _listen()
    a = Account()
    t0 = time.perf_counter()
    with _lock:
        _open.append(a)
    try:
        yield a
    finally:
        _sample_memory()
        with _lock:
            _open.remove(a)
        a.wall = time.perf_counter() - t0


_live_sampling: bool | None = None  # sample live arrays at waits (backends without memory statistics)


def _sample_memory() -> None:
    """Record the per-device peak into the open accounts."""
    global _live_sampling
    from cca_jax import mesh

    peak, how = mesh.peak_bytes()
    _live_sampling = how == "live_arrays"
    with _lock:
        for a in _open:
            a.peak_bytes, a.memory = max(a.peak_bytes, peak), how


def wait(x):
    """``jax.block_until_ready(x)``, counted as device time in the open accounts."""
    if not _open:
        return jax.block_until_ready(x)
    t0 = time.perf_counter()
    out = jax.block_until_ready(x)
    dt = time.perf_counter() - t0
    with _lock:
        for a in _open:
            a.device += dt
    if _live_sampling is not False:  # the CPU: what is alive now (GPU/TPU: the allocator's peak at the end)
        _sample_memory()
    return out


# CCA_JAX_STEP_PROBE=1: every ``step`` runs alone (the device idle before it, waited for
# after it) and is timed; the run is slower, its summary carries each program's cost
# (``step_probe``) for bench/stage_cost.py to set against a normal run's stage times.
PROBE_STEPS = os.environ.get("CCA_JAX_STEP_PROBE", "").strip() == "1"


def step(kind: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, a device program of ``kind`` (its shape in the name),
    counted (``count``); timed alone when probing (``PROBE_STEPS``)."""
    if not PROBE_STEPS:
        out = fn(*args, **kwargs)
        count(kind)
        return out
    jax.block_until_ready((args, kwargs))
    inner = _open[-1] if _open else None
    compiled = inner.compile if inner else 0.0
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    dt = time.perf_counter() - t0 - ((inner.compile - compiled) if inner else 0.0)  # the run alone
    with _lock:
        for a in _open:
            a.work[kind] = a.work.get(kind, 0) + 1
            a.steps.setdefault(kind, []).append(dt)
    return out


def count(kind: str, n: int = 1) -> None:
    """Record ``n`` runs of a device program of ``kind`` (e.g. "decode_chunk 64x1408
    greedy") in every open account."""
    with _lock:
        for a in _open:
            a.work[kind] = a.work.get(kind, 0) + n


def fetch(x):
    """``x`` on the host (numpy), the wait for it counted as device time (arrays spanning
    other processes' devices are gathered: every process must fetch alike)."""
    from cca_jax.mesh import host

    return host(wait(x))


def cache_dir(setting: str | None) -> Path | None:
    """The persistent compilation cache's directory for a config value: a path, None or
    "off", or "default": $CCA_JAX_COMPILE_CACHE if set ("off" turns it off), else
    ~/.cache/cca_jax/xla on GPU and TPU, none on the CPU (where runs are small and a
    home-directory cache would grow with every test model); a directory set explicitly
    is used on the CPU too (the warm-cache test does)."""
    if setting in (None, "off", False):
        return None
    if setting != "default":
        return Path(os.path.expanduser(str(setting)))
    env = os.environ.get("CCA_JAX_COMPILE_CACHE")
    if env is not None:
        return None if env in ("", "off") else Path(os.path.expanduser(env))
    return None if jax.default_backend() == "cpu" else Path(os.path.expanduser(str(DEFAULT_CACHE)))


def enable_cache(directory: Path | None) -> None:
    """JAX's persistent compilation cache in ``directory`` for every compilation, however
    short (a rerun then compiles nothing). None leaves JAX's settings alone."""
    if directory is None:
        return
    directory.mkdir(parents=True, exist_ok=True)
    if jax.config.jax_compilation_cache_dir == str(directory):
        return
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    from jax.experimental.compilation_cache import compilation_cache as cc

    cc.reset_cache()  # a cache opened earlier in this process with another directory
