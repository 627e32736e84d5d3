"""The device mesh of a run: its configuration, the layout of the weights in each stage,
where a batch's rows and a KV cache go, and what several processes must agree on.

A run config's ``mesh:`` section names a (fsdp, tp) mesh (``weights.sharding``: the
model dimension over ``fsdp``, heads and neurons over ``tp``); 1 x 1, the default, is
one device, as before. The model is stored in that layout (the least memory per
device). Each stage then computes in the layout that suits it (``LAYOUTS``):

- ``sharded``: the stored layout; batch rows over ``fsdp`` (fully sharded data
  parallel: XLA gathers each layer's weights over ``fsdp`` where it needs them).
- ``tp``: weights over ``tp`` only (whole over ``fsdp``), rows over ``fsdp``: no weight
  gathers, for memory-bound decoding.
- ``replicated``: a whole copy of the weights on every device, rows over every device:
  no collectives in the forward at all (DCM's one-token steps).
- ``auto``: the layout above that is expected fastest for the stage and whose extra copy
  of the weights fits in ``AUTO_FRACTION`` of a device's memory (``resolve``).

Several processes (one per host, ``jax.distributed``): every process runs the same
program on the same data; only process 0 writes files, logs and progress bars
(``is_writer``); arrays spanning other hosts are read with ``host``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cca_jax import validate
from cca_jax.errors import CCAError
from cca_jax.weights import sharding as sharding_lib

LAYOUTS = ("auto", "sharded", "tp", "replicated")
CACHE_PLACES = ("auto", "device", "host")
# ``auto`` takes a layout that copies the weights only when the copy fits in this share
# of a device's memory (the rest is for caches, masters and activations); and DCM's
# prefix caches go to host memory when they would take more than this share
AUTO_FRACTION = 0.3


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """``mesh:`` of a run config. fsdp x tp must equal the number of devices (all
    processes together); 1 x 1 runs on one device."""

    fsdp: int = 1
    tp: int = 1
    generate: str = "auto"  # layout of generation and scoring (evaluation, pivots, benchmarks)
    dcm: str = "auto"  # layout of DCM, faithfulness and patching (one-token steps on a cache)
    train: str = "sharded"  # layout of amplification and the SFT baselines (masters, optimizer state)
    dcm_cache: str = "auto"  # DCM prefix caches: device, host (streamed in per batch), auto

    def __post_init__(self):
        v = validate
        v.check_fields(self, "mesh", {"fsdp": v.COUNT, "tp": v.COUNT, "generate": v.one_of(*LAYOUTS),
                                      "dcm": v.one_of(*LAYOUTS), "train": v.one_of(*LAYOUTS),
                                      "dcm_cache": v.one_of(*CACHE_PLACES)})

    @property
    def size(self) -> int:
        return self.fsdp * self.tp


# -- processes ------------------------------------------------------------------------------

def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """``jax.distributed.initialize``: on a TPU pod slice (or SLURM, ...) every argument is
    found automatically; elsewhere give all three (``HOST:PORT`` of process 0). Call it
    before anything else touches JAX."""
    given = [a is not None for a in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise CCAError("--coordinator, --num-processes and --process-id go together (give all three, or none on "
                       "a TPU pod slice)")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise CCAError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    if jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CCAError(f"jax.distributed.initialize failed ({first[:200]}): check --coordinator HOST:PORT "
                       f"(reachable from every host), --num-processes and --process-id") from None


def multi_process() -> bool:
    return jax.distributed.is_initialized() and jax.process_count() > 1


def is_writer() -> bool:
    """Process 0 (or the only process): the one that writes files, logs and progress bars."""
    return not jax.distributed.is_initialized() or jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across processes (no-op in one process): e.g. after process 0 wrote what
    the others read next."""
    if multi_process():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(value: int) -> int:
    """Process 0's ``value`` on every process (decisions every process must take alike,
    e.g. whether a stage is done: they then run the same programs)."""
    if not multi_process():
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def host(tree):
    """Device arrays as numpy on this host. Arrays that span other processes' devices
    are gathered (every process must call this at the same point)."""
    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


# -- the mesh ------------------------------------------------------------------------------------

def build(config: MeshConfig) -> Mesh | None:
    """The run's mesh, or None for 1 x 1 in one process (everything on the default device,
    as without a mesh). A mesh that does not match the devices is a one-line error."""
    if config.size == 1 and not multi_process():
        return None
    n = jax.device_count()
    if config.size != n:
        procs = f" over {jax.process_count()} processes" if multi_process() else ""
        hint = (" (on the CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)"
                if jax.default_backend() == "cpu" else "")
        raise CCAError(f"mesh.fsdp={config.fsdp} x mesh.tp={config.tp} = {config.size} devices, but this run has "
                       f"{n} {jax.default_backend()} device(s){procs}: set fsdp x tp to {n}{hint}")
    # hosts outermost: the fsdp axis spans hosts, tp stays within one where it can
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices).reshape(config.fsdp, config.tp), ("fsdp", "tp"))


def mesh_of(params) -> Mesh | None:
    """The mesh ``params`` are spread over (None: one device)."""
    for x in jax.tree.leaves(params):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh.size > 1:
            return s.mesh
    return None


def axes_used(params) -> set:
    """Mesh axes (of more than one device) that split some leaf of ``params``."""
    used = set()
    for x in jax.tree.leaves(params):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding):
            for a in s.spec:
                used.update(n for n in (a if isinstance(a, tuple) else (a,)) if n and s.mesh.shape[n] > 1)
    return used


def layout_of(params) -> str | None:
    """The layout ``params`` are in: sharded, tp or replicated (None: one device)."""
    if mesh_of(params) is None:
        return None
    used = axes_used(params)
    return "sharded" if "fsdp" in used else "tp" if "tp" in used else "replicated"


def _spec(path, shape, mesh: Mesh, layout: str) -> P:
    if layout == "replicated":
        return P()
    spec = sharding_lib.spec_for(path, shape, mesh)
    if layout == "tp":
        spec = P(*(None if a == "fsdp" else a for a in spec))
    return spec


def shardings(params, mesh: Mesh, layout: str):
    """NamedShardings of ``params`` (arrays or ShapeDtypeStructs) in ``layout``."""
    def one(path, x):
        keys = tuple(getattr(k, "key", str(k)) for k in path)
        return NamedSharding(mesh, _spec(keys, tuple(x.shape), mesh, layout))

    return jax.tree_util.tree_map_with_path(one, params)


def canonical(layout: str, mesh: Mesh) -> str:
    """The name ``layout_of`` gives ``layout`` on ``mesh``: without fsdp devices sharded is
    tp; without tp devices tp is replicated."""
    if layout == "sharded" and mesh.shape["fsdp"] == 1:
        layout = "tp"
    if layout == "tp" and mesh.shape["tp"] == 1:
        layout = "replicated"
    return layout


def relayout(params, layout: str):
    """``params`` in ``layout`` (a new copy where it differs; the same arrays where not)."""
    mesh = mesh_of(params)
    if mesh is None or layout_of(params) == canonical(layout, mesh):
        return params
    return jax.device_put(params, shardings(params, mesh, layout))


def nbytes(params) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))


def per_device_bytes(params) -> int:
    """Bytes ``params`` take on one device (the largest shard of each leaf)."""
    total = 0
    for x in jax.tree.leaves(params):
        s = getattr(x, "sharding", None)
        shape = s.shard_shape(x.shape) if s is not None else x.shape
        total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return total


def device_memory(devices=None) -> int | None:
    """Bytes one device may use (its allocator's limit), None where unknown (the CPU)."""
    d = (devices or jax.local_devices())[0]
    try:
        stats = d.memory_stats()
    except Exception:  # backends without memory statistics
        stats = None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


# what each stage kind prefers, most copying first; ``auto`` takes the first that fits
PREFERENCE = {"generate": ("tp", "sharded"), "dcm": ("replicated", "tp", "sharded"), "train": ("sharded",)}


def resolve(layout: str, kind: str, params) -> str:
    """A concrete layout for a stage of ``kind`` (generate, dcm, train) on ``params``."""
    mesh = mesh_of(params)
    if mesh is None:
        return "replicated"
    if layout != "auto":
        return canonical(layout, mesh)
    limit = device_memory(list(mesh.devices.flat))
    full = nbytes(params)
    for cand in PREFERENCE[kind]:
        copy = {"replicated": full, "tp": full // mesh.shape["tp"], "sharded": 0}[cand]
        if limit is None or copy <= AUTO_FRACTION * limit:
            return canonical(cand, mesh)
    return canonical("sharded", mesh)


# -- batches and caches ---------------------------------------------------------------------------

def data_axes(params, rows: int, whole: bool = False) -> tuple:
    """Mesh axes a batch of ``rows`` rows is split over for ``params``' layout: fsdp (and
    tp when the weights are replicated) where the rows divide; () = every device has all
    (also with ``whole``: see ``whole_rows``)."""
    mesh = mesh_of(params)
    if mesh is None or whole:
        return ()
    cands = [("fsdp", "tp"), ("fsdp",), ("tp",)] if layout_of(params) == "replicated" else [("fsdp",)]
    for axes in cands:
        n = int(np.prod([mesh.shape[a] for a in axes]))
        if n > 1 and rows % n == 0:
            return axes
    return ()


def padded_rows(params, rows: int) -> int:
    """``rows`` rounded up to a multiple of the data split of ``params``' layout (fsdp, or
    every device when the weights are replicated): a batch that would otherwise not
    divide, and so sit whole on every device, gets a few repeated rows instead."""
    mesh = mesh_of(params)
    if mesh is None:
        return rows
    n = mesh.size if layout_of(params) == "replicated" else mesh.shape["fsdp"]
    return -(-rows // n) * n


def whole_rows(params) -> bool:
    """Whether a DCM batch goes whole to every device: when the weights are replicated.
    Every device then runs one device's program on the same inputs, so the mask, its
    Adam state and the early stop equal one device's bit for bit. Rows split over the
    devices would round differently (per-row sums of another row count, an all-reduce),
    and DCM turns 1e-7 differences into another circuit: the float32 Qwen run's circuit
    differed between one and two H200s with everything before DCM equal (BENCHMARKS.md,
    ninth session). What it costs: split rows made gemma-2-9b's DCM step 1.09x faster."""
    return mesh_of(params) is not None and layout_of(params) == "replicated"


def row_sharding(params, shape, axis: int = 0, whole: bool = False) -> NamedSharding | None:
    mesh = mesh_of(params)
    if mesh is None:
        return None
    axes = data_axes(params, shape[axis], whole)
    spec = [None] * len(shape)
    if axes:
        spec[axis] = axes if len(axes) > 1 else axes[0]
    return NamedSharding(mesh, P(*spec))


def rows(x, params, axis: int = 0, whole: bool = False):
    """A host batch on the devices, its rows (``axis``) split as ``data_axes`` says for
    ``params`` (``whole``: on every device); on one device, ``jnp.asarray``."""
    s = row_sharding(params, np.shape(x), axis, whole)
    if s is None:
        return jax.numpy.asarray(x)
    return jax.device_put(np.asarray(x), s)


@dataclasses.dataclass(frozen=True)
class CacheSharding:
    """Where a KV cache's buffers go (hashable: a static argument of the jitted cache
    constructors). k/v (B, KV, S, Dh): rows over ``data``, KV heads over ``heads``."""

    mesh: Mesh
    data: tuple
    heads: str | None

    def kv(self, stacked: bool = False) -> NamedSharding:
        """One buffer's layout; ``stacked``: of (L, B, KV, S, Dh) (``KVCache.stacked``)."""
        d = self.data if len(self.data) > 1 else (self.data[0] if self.data else None)
        return NamedSharding(self.mesh, P(*([None] if stacked else []), d, self.heads, None, None))

    def pos(self) -> NamedSharding:
        d = self.data if len(self.data) > 1 else (self.data[0] if self.data else None)
        return NamedSharding(self.mesh, P(d, None))

    def scalar(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())


def cache_sharding(params, batch: int, num_kv_heads: int, whole: bool = False) -> CacheSharding | None:
    """The cache layout matching ``params``' layout for a batch of ``batch`` rows
    (``whole``: every row on every device)."""
    mesh = mesh_of(params)
    if mesh is None:
        return None
    heads = "tp" if layout_of(params) != "replicated" and num_kv_heads % mesh.shape["tp"] == 0 else None
    data = data_axes(params, batch, whole)
    if heads is not None and "tp" in data:
        heads = None
    return CacheSharding(mesh, data, heads)


def constrain_cache(cache, sharding: CacheSharding | None):
    """``cache`` (inside a jitted function) laid out as ``sharding`` says."""
    if sharding is None:
        return cache
    wsc = jax.lax.with_sharding_constraint

    def kv(c):
        return tuple(wsc(x, sharding.kv()) for x in c) if isinstance(c, (tuple, list)) else wsc(c, sharding.kv(True))

    return cache.replace(k=kv(cache.k), v=kv(cache.v), pos=wsc(cache.pos, sharding.pos()),
                         index=wsc(cache.index, sharding.scalar()))


def onto_mesh(tree, mesh: Mesh | None):
    """``tree`` with every array that lives on one device (an optimizer's step count, LoRA
    adapters) replicated over ``mesh``: a checkpoint of several processes then holds only
    arrays of the one global mesh."""
    if mesh is None:
        return tree
    rep = NamedSharding(mesh, P())

    def one(x):
        if isinstance(x, jax.Array) and not isinstance(x.sharding, NamedSharding):
            return jax.device_put(np.asarray(x), rep)  # host first: the array is this process's own
        return x

    return jax.tree.map(one, tree)


def to_memory(tree, kind: str):
    """``tree``'s arrays moved to memory ``kind`` ("pinned_host" or "device"), each
    keeping its sharding (DCM prefix caches parked on the host)."""
    def one(x):
        s = x.sharding
        if not isinstance(s, NamedSharding):
            s = jax.sharding.SingleDeviceSharding(next(iter(s.device_set)), memory_kind=kind)
        else:
            s = s.with_memory_kind(kind)
        return jax.device_put(x, s)

    return jax.tree.map(one, tree)


# -- memory --------------------------------------------------------------------------------------

def live_bytes_per_device() -> int:
    """The largest total of live array bytes on any local device (backends without
    memory statistics: the CPU). Buffers are counted once: a sharded array's shards are
    arrays of their own once anyone has looked at them."""
    seen: dict[tuple, int] = {}
    for x in jax.live_arrays():
        try:
            if getattr(x.sharding, "memory_kind", None) not in (None, "device"):
                continue  # host memory (DCM caches parked there)
            for s in x.addressable_shards:
                seen[(s.device, s.data.unsafe_buffer_pointer())] = s.data.nbytes
        except Exception:  # deleted or donated while we looked
            continue
    per: dict[Any, int] = {}
    for (dev, _), n in seen.items():
        per[dev] = per.get(dev, 0) + n
    return max(per.values(), default=0)


def peak_bytes() -> tuple[int | None, str]:
    """(bytes, how): the allocator's peak so far on the busiest local device (GPU, TPU), or
    the live array bytes now where the backend keeps no statistics."""
    peaks = []
    for d in jax.local_devices():
        try:
            st = d.memory_stats()
        except Exception:
            st = None
        if st and "peak_bytes_in_use" in st:
            peaks.append(int(st["peak_bytes_in_use"]))
    if peaks:
        return max(peaks), "peak_bytes_in_use"
    return live_bytes_per_device(), "live_arrays"


def env_device_count() -> int | None:
    """The host device count forced by XLA_FLAGS (CPU), if any."""
    for flag in os.environ.get("XLA_FLAGS", "").split():
        if flag.startswith("--xla_force_host_platform_device_count="):
            return int(flag.split("=", 1)[1])
    return None


# -- per-layer weights ------------------------------------------------------------------------------

@jax.jit
def _slices(layers):
    from cca_jax.model.params import layer_list

    return layer_list(layers)


def per_layer(params):
    """``unstack_layers`` for the memory-bound one-token calls (decoding, DCM steps), except
    when heads are split over ``tp``: merging q/k/v (and gate/up) into one weight would put
    all query heads on one device and the keys and values on another (a contiguous split
    of the merged axis), so every step would move activations between them; there each
    layer keeps its own unmerged slices."""
    from cca_jax.model.params import unstack_layers

    if "tp" not in axes_used(params):
        return unstack_layers(params)
    return {**params, "layers": _slices(params["layers"])}
