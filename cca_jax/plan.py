"""``cca-jax plan``: each stage's per-device peak memory on a mesh, before anything runs.

For every stage the planner lays out abstract arrays (``jax.ShapeDtypeStruct`` with
shardings: no weights are read, nothing runs) exactly as the run would: the stored
weights, the stage's own copy in its layout (``cca_jax.mesh``), per-layer decode
weights, KV caches, DCM prefix caches, float32 masters and optimizer state. It then
compiles the stage's programs (prefill, a decode chunk, a DCM prefix and mask step, an
amplification gradient and update, an SFT step) and reads XLA's memory analysis of each:

    stage peak = bytes resident on a device during the stage
                 + the largest (temporaries + new outputs) of its programs

Deep models are compiled at 2 and 4 layers and extrapolated linearly in depth (every
per-layer buffer grows with the depth; XLA reuses a scanned body's temporaries across
layers), unless ``exact``. What it cannot know before the run, it bounds: the number of
localization examples (at most one per train item of the config's templates) and their
length (prompt + max_new_tokens); pass measured values to tighten it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cca_jax import mesh as mesh_lib
from cca_jax.config import ModelConfig
from cca_jax.errors import CCAError

STAGES = ("generate", "dcm", "amplify", "sft")
GIB = 1024**3
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'16GiB', '32 GB', '80G', '1.5TiB', '1000000' -> bytes (K/M/G/T: powers of 1024)."""
    m = _SIZE.match(str(text))
    if not m:
        raise CCAError(f"--device-memory takes a size like 16GiB or 80GB, got {text!r}")
    unit = (m.group(2) or "B").upper()[0]
    return int(float(m.group(1)) * 1024 ** "BKMGT".index(unit))


@dataclasses.dataclass(frozen=True)
class Workload:
    """The shapes the stages run on (what the run config implies)."""

    prompt: int  # tokens of the longest prompt
    gen_batch: int
    gen_new: int  # the larger generation budget (test)
    val_batch: int  # rows of a val evaluation batch (amplification, fine-tuning)
    examples: int  # localization examples (an upper bound before the run)
    pivot_len: int  # tokens of the longest DCM / amplification example
    dcm_batch: int
    amp_batch: int
    sft_batch: int  # examples per micro-batch
    sft_micro: int  # micro-batches per step
    sft_len: int
    sft_answer: int
    chunk: int = 32  # decode steps per compiled call (generate.GenerationConfig)


def _bucket(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


# -- abstract arrays ------------------------------------------------------------------------------

def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def device_bytes(tree) -> int:
    """Bytes of ``tree`` (abstract or real arrays) on one device: each leaf's largest shard."""
    return mesh_lib.per_device_bytes(tree)


def _replicated(tree, mesh: Mesh):
    return _abstract(tree, jax.tree.map(lambda _: NamedSharding(mesh, P()), tree))


def _leaf_key(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _like(tree, ref, mesh: Mesh):
    """``tree`` (e.g. an optimizer state) with each leaf sharded like the ``ref`` leaf of
    the same shape whose path ends its path (mu/nu of a master); the rest replicated
    (eager optax keeps a master's sharding in the state built from it)."""
    by_key = {_leaf_key(p): x for p, x in jax.tree_util.tree_leaves_with_path(ref)}

    def one(path, x):
        k = _leaf_key(path)
        for rk, r in by_key.items():
            if k.endswith(rk) and tuple(r.shape) == tuple(x.shape):
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=r.sharding)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P()))

    return jax.tree_util.tree_map_with_path(one, tree)


def abstract_params(cfg: ModelConfig, dtype, mesh: Mesh, layout: str = "sharded"):
    from cca_jax.model.params import init_params

    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), dtype))
    return _abstract(shapes, mesh_lib.shardings(shapes, mesh, layout))


def _per_layer(params_abs):
    """The per-layer weights (``mesh.per_layer``) with the shardings XLA gives them."""
    from cca_jax.model.params import layer_list, unstack_layers

    if "tp" in mesh_lib.axes_used(params_abs):
        def fn(p):
            return {**p, "layers": layer_list(p["layers"])}
    else:
        fn = unstack_layers
    out = jax.eval_shape(fn, params_abs)
    sh = jax.jit(fn).lower(params_abs).compile().output_shardings
    return _abstract(out, sh)


def _cache(cfg: ModelConfig, batch: int, size: int, dtype, cs: mesh_lib.CacheSharding | None, mesh: Mesh,
           stacked: bool = False):
    """A cache's abstract arrays, placed as ``cs`` says; ``stacked``: ``KVCache.stacked``'s."""
    from cca_jax.model.cache import init_cache

    cs = cs or mesh_lib.CacheSharding(mesh, (), None)  # one device
    c = jax.eval_shape(lambda: init_cache(cfg, batch, size, dtype, cs))
    c = c.replace(empty=False)  # a tiled shared prefix: attention reads the whole buffer
    if stacked:
        c = jax.eval_shape(lambda x: x.stacked(), c)
        kv, v = cs.kv(True), cs.kv(True)
    else:
        kv, v = tuple(cs.kv() for _ in c.k), tuple(cs.kv() for _ in c.v)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), c,
                        c.replace(k=kv, v=v, pos=cs.pos(), index=cs.scalar()))


def _rows(shape, dtype, params_abs, axis: int = 0, whole: bool = False):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=mesh_lib.row_sharding(params_abs, shape, axis, whole))


@dataclasses.dataclass
class Program:
    name: str
    extra: int  # temporaries + outputs that are not donated inputs, per device


_compiling = [True]  # False: resident bytes only (the programs are compiled in another pass)


def _program(name: str, fn, *args, donated: int = 0) -> Program:
    """Compile ``fn`` (a jitted function) on abstract ``args``; ``donated``: bytes of its
    donated inputs, counted as reused where this backend does not alias them (the CPU)."""
    if not _compiling[0]:
        return Program(name, 0)
    ma = fn.lower(*args).compile().memory_analysis()
    out = ma.output_size_in_bytes - (ma.alias_size_in_bytes or min(donated, ma.output_size_in_bytes))
    return Program(name, int(ma.temp_size_in_bytes + max(out, 0)))


@dataclasses.dataclass
class StagePlan:
    stage: str
    layout: str
    resident: dict  # what -> bytes per device
    programs: list

    @property
    def peak(self) -> int:
        return sum(self.resident.values()) + max((p.extra for p in self.programs), default=0)

    def to_json(self) -> dict:
        return {"stage": self.stage, "layout": self.layout, "peak_bytes": self.peak,
                "resident_bytes": dict(self.resident), "programs": {p.name: p.extra for p in self.programs}}


# -- the stages -----------------------------------------------------------------------------------

def _layout_params(stored, cfg, dtype, mesh, layout):
    """(the stage's weights, bytes of its extra copy per device)."""
    if mesh.size == 1 or mesh_lib.canonical(layout, mesh) == mesh_lib.layout_of(stored):
        return stored, 0
    p = abstract_params(cfg, dtype, mesh, layout)
    return p, device_bytes(p)


def plan_generate(cfg, dtype, mesh, stored, layout, w: Workload, weights_bytes: int | None = None) -> StagePlan:
    """Evaluation, pivot sampling and benchmarks: a batch's prefill and decode chunks."""
    from cca_jax.generate import SUFFIX_BUCKET, Sampling, decode_chunk
    from cca_jax.model.prefill import prefill

    params, copy = _layout_params(stored, cfg, dtype, mesh, layout)
    layers = _per_layer(params)
    B, suffix = mesh_lib.padded_rows(params, w.gen_batch), _bucket(w.prompt, SUFFIX_BUCKET)
    size = _bucket(w.prompt + w.gen_new, 128)
    cs = mesh_lib.cache_sharding(params, B, cfg.num_kv_heads)
    # as generate runs a batch: prefill into a cache of the prompt's slots, grown to the budget's
    prompt_cache = _cache(cfg, B, suffix, dtype, cs, mesh)
    cache = _cache(cfg, B, size, dtype, cs, mesh)
    prefix = _cache(cfg, 1, suffix, dtype, mesh_lib.cache_sharding(params, 1, cfg.num_kv_heads), mesh)
    toks = _rows((B, suffix), jnp.int32, params)
    mask = _rows((B, suffix), jnp.bool_, params)
    logits = _rows((B, cfg.vocab_size), jnp.float32, params)
    done = _rows((B,), jnp.bool_, params)
    key = jax.eval_shape(lambda: jax.random.key(0))
    eos = jax.ShapeDtypeStruct((1,), jnp.int32)
    progs = [_program("prefill", prefill, cfg, params, toks, mask, prompt_cache),
             # while the cache grows, the prompt's is alive beside the grown one (resident below)
             Program("grow_cache", device_bytes(prompt_cache)),
             _program("decode_chunk", decode_chunk, cfg, layers, cache, logits, done, key, eos, 0, w.chunk,
                      Sampling(), True, donated=device_bytes(cache))]
    resident = {"weights": weights_bytes if weights_bytes is not None else device_bytes(stored),
                "layout_copy": copy, "per_layer_weights": device_bytes(layers),
                "kv_cache": device_bytes(cache) + device_bytes(prefix)}
    return StagePlan("generate", mesh_lib.layout_of(params), resident, progs)


def plan_dcm(cfg, dtype, mesh, stored, layout, w: Workload, caches_on_host: bool = False,
             unroll: bool = False) -> StagePlan:
    """DCM: every batch's prefix cache, then one-token mask steps scanned over the stacked
    weights, or (``unroll``) unrolled over per-layer ones (``DCMConfig.unroll``)."""
    from cca_jax.cca import components, dcm

    params, copy = _layout_params(stored, cfg, dtype, mesh, layout)
    layers = _per_layer(params) if unroll else params
    B, T = w.dcm_batch, w.pivot_len
    n_b = -(-w.examples // B)
    whole = mesh_lib.whole_rows(params)  # as dcm.train_mask places its batches
    cs = mesh_lib.cache_sharding(params, B, cfg.num_kv_heads, whole)
    cache = _cache(cfg, B, T, dtype, cs, mesh, stacked=not unroll)  # as dcm.prefix_caches makes them
    toks = _rows((B, T), jnp.int32, params, whole=whole)
    mask = _rows((B, T), jnp.bool_, params, whole=whole)
    vec = _rows((B,), jnp.int32, params, whole=whole)
    c = dcm.DCMConfig()
    opt = dcm.make_optimizer(c, n_b)
    m = _replicated(jax.eval_shape(lambda: components.full(cfg, 1.0)), mesh)
    state = _like(jax.eval_shape(opt.init, m), m, mesh)
    progs = [_program("prefix_cache", dcm.placed_prefix_cache, cfg, params, toks, mask, cs, not unroll),
             _program("mask_step", dcm.mask_step, cfg, opt, jnp.float32(c.reg), c.mode, layers, m, state, cache,
                      vec, vec, vec, donated=device_bytes((m, state)))]
    caches = device_bytes(cache) * (1 if caches_on_host else n_b)  # on the host: one batch's at a time (two)
    if caches_on_host:
        caches *= 2
    resident = {"weights": device_bytes(stored), "layout_copy": copy,
                "per_layer_weights": device_bytes(layers) if unroll else 0, "prefix_caches": caches,
                "mask_and_adam": device_bytes((m, state))}
    return StagePlan("dcm", mesh_lib.layout_of(params), resident, progs)


def _amplify_state(cfg, params, acfg, mesh):
    from cca_jax.cca import amplify as amp
    from cca_jax.cca import components

    mask = {k: np.ones(s, bool) for k, s in components.shapes(cfg).items()}
    opt = amp.make_optimizer(acfg, mask, params)
    train, frozen = amp.split_params(params, opt.selection)
    f32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding), train)
    state = _like(jax.eval_shape(opt.init, f32), f32, mesh)
    return opt, train, frozen, f32, state


def _val_eval(cfg, dtype, mesh, stored, gen_layout, w: Workload, name: str, working: int, masters: int,
              optimizer: int) -> StagePlan:
    """The val evaluation between training steps: the working weights' copy in the
    generation layout beside the masters and optimizer state."""
    ev = plan_generate(cfg, dtype, mesh, stored, gen_layout, dataclasses.replace(w, gen_batch=w.val_batch),
                       weights_bytes=device_bytes(stored) + working)
    ev.resident.update(masters_f32=masters, optimizer=optimizer)
    return dataclasses.replace(ev, stage=name)


def plan_amplify(cfg, dtype, mesh, stored, layout, w: Workload, acfg, gen_layout: str) -> list[StagePlan]:
    """Amplification: the full-batch gradient (micro-batches of amplify.batch_size) and the
    update of the float32 masters; and the val evaluation between steps."""
    from cca_jax.cca import amplify as amp

    params, copy = _layout_params(stored, cfg, dtype, mesh, layout)
    opt, train, frozen, master, state = _amplify_state(cfg, params, acfg, mesh)
    B, T = acfg.batch_size, w.pivot_len
    toks, mask = _rows((B, T), jnp.int32, params), _rows((B, T), jnp.bool_, params)
    vec = _rows((B,), jnp.int32, params)
    progs = [_program("grad", amp.grad_sum, train, frozen, cfg, toks, mask, vec, vec, acfg.remat, acfg.unroll),
             _program("update", amp.step_fn(opt), master, state, master,
                      donated=device_bytes((master, state)))]
    resident = {"weights": device_bytes(stored), "layout_copy": copy, "masters_f32": device_bytes(master),
                "optimizer": device_bytes(state), "gradient_f32": device_bytes(master),
                "working_copy": device_bytes(train)}
    return [StagePlan("amplify", mesh_lib.layout_of(params), resident, progs),
            _val_eval(cfg, dtype, mesh, stored, gen_layout, w, "amplify: val eval", device_bytes(train),
                      device_bytes(master), device_bytes(state))]


def plan_sft(cfg, dtype, mesh, stored, layout, w: Workload, scfg, method: str, gen_layout: str) -> list[StagePlan]:
    from cca_jax.baselines import sft

    params, copy = _layout_params(stored, cfg, dtype, mesh, layout)
    master0 = jax.eval_shape(lambda p: sft.init_state(method, p, scfg)[0], params)
    if method == "sft_full":
        master = jax.tree.map(lambda x, p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=p.sharding), master0, params)
        frozen = None
    else:
        master, frozen = _replicated(master0, mesh), params
    opt = sft.make_optimizer(scfg, master)
    state = _like(jax.eval_shape(opt.init, master), master, mesh)
    step = sft.make_step(method, scfg, cfg, opt, dtype)
    n, b = w.sft_micro, w.sft_batch
    batch = sft.Batch(*(_rows(s, d, params, axis=1) for s, d in (
        ((n, b, w.sft_len), jnp.int32), ((n, b, w.sft_len), jnp.bool_), ((n, b, w.sft_len), jnp.int32),
        ((n, b, w.sft_len), jnp.float32), ((n, b, w.sft_answer), jnp.int32), ((n, b, w.sft_answer), jnp.bool_))))
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    progs = [_program("step", step, master, state, frozen, batch, key, donated=device_bytes((master, state)))]
    resident = {"weights": device_bytes(stored), "layout_copy": copy, "masters_f32": device_bytes(master),
                "optimizer": device_bytes(state)}
    working = device_bytes(stored)  # what val evaluation runs on: cast masters (full) or merged adapters (LoRA)
    return [StagePlan(method, mesh_lib.layout_of(params), resident, progs),
            _val_eval(cfg, dtype, mesh, stored, gen_layout, w, f"{method}: val eval", working, device_bytes(master),
                      device_bytes(state))]


# -- depth extrapolation and the whole plan -----------------------------------------------------------

def _shallow(cfg: ModelConfig, n: int) -> ModelConfig:
    return cfg.replace(num_layers=n, sliding_layers=tuple(cfg.sliding_layers[:n]))


def extrapolated(plans_at: Callable[[ModelConfig], list[StagePlan]], cfg: ModelConfig,
                 exact: bool = False) -> list[StagePlan]:
    """``plans_at(cfg)`` for a deep ``cfg`` from its 2- and 4-layer versions, every byte
    count extended linearly to ``cfg.num_layers`` (or compiled at full depth: ``exact``)."""
    if exact or cfg.num_layers <= 4:
        return plans_at(cfg)
    a, b = plans_at(_shallow(cfg, 2)), plans_at(_shallow(cfg, 4))
    scale = (cfg.num_layers - 2) / 2

    def ext(x: int, y: int) -> int:
        return round(x + (y - x) * scale)

    out = []
    for pa, pb in zip(a, b):
        res = {k: ext(pa.resident[k], pb.resident[k]) for k in pa.resident}
        progs = [Program(p.name, ext(p.extra, q.extra)) for p, q in zip(pa.programs, pb.programs)]
        out.append(StagePlan(pa.stage, pa.layout, res, progs))
    return out


def stage_plans(cfg: ModelConfig, dtype, mesh: Mesh, config, w: Workload, limit: int | None = None,
                exact: bool = False) -> list[StagePlan]:
    """Every stage of ``config`` (a RunConfig) on ``mesh``; ``limit``: device memory for
    ``auto`` layouts (None: as if unlimited)."""
    return extrapolated(lambda c: _plans_at(c, dtype, mesh, config, w, limit, cfg), cfg, exact)


def _resolve(layout: str, kind: str, stored, full_cfg: ModelConfig, dtype, mesh: Mesh, limit):
    """``mesh.resolve`` against ``limit`` and the full-depth model's size."""
    if layout != "auto":
        return mesh_lib.canonical(layout, mesh)
    from cca_jax.model.params import param_shapes

    leaves = jax.tree.leaves(param_shapes(full_cfg), is_leaf=lambda x: isinstance(x, tuple))
    full = sum(math.prod(s) for s in leaves) * jnp.dtype(dtype).itemsize
    for cand in mesh_lib.PREFERENCE[kind]:
        copy = {"replicated": full, "tp": full // mesh.shape["tp"], "sharded": 0}[cand]
        if limit is None or copy <= mesh_lib.AUTO_FRACTION * limit:
            return mesh_lib.canonical(cand, mesh)
    return mesh_lib.canonical("sharded", mesh)


def _plans_at(cfg, dtype, mesh, config, w, limit, full_cfg) -> list[StagePlan]:
    """Each stage at ``cfg``'s depth. On the CPU backend the programs of a half-precision
    model are compiled in float32: XLA:CPU computes half-precision dots by converting
    whole operands (weights, KV caches) to float32, copies a GPU or TPU never makes, so
    the float32 program's temporaries are the closer bound; what stays resident is
    counted in the model's own dtype."""
    if not _compiling[0] or jax.default_backend() != "cpu" or jnp.dtype(dtype).itemsize >= 4:
        return _plans_one(cfg, dtype, mesh, config, w, limit, full_cfg)
    _compiling[0] = False
    try:
        resident = _plans_one(cfg, dtype, mesh, config, w, limit, full_cfg)
    finally:
        _compiling[0] = True
    programs = _plans_one(cfg, jnp.float32, mesh, config, w, limit, full_cfg, layout_dtype=dtype)
    return [dataclasses.replace(r, programs=p.programs) for r, p in zip(resident, programs)]


def _plans_one(cfg, dtype, mesh, config, w, limit, full_cfg, layout_dtype=None) -> list[StagePlan]:
    mc = config.mesh
    layout_dtype = layout_dtype or dtype
    stored = abstract_params(cfg, dtype, mesh, "sharded")

    def lay(kind):  # layouts chosen as for the model's own dtype
        return _resolve(getattr(mc, kind), kind, stored, full_cfg, layout_dtype, mesh, limit)

    out = [plan_generate(cfg, dtype, mesh, stored, lay("generate"), w)]
    if config.method == "cca":
        out.append(plan_dcm(cfg, dtype, mesh, stored, lay("dcm"), w,
                            caches_on_host=_caches_on_host(mc.dcm_cache, full_cfg, layout_dtype, mesh, w, limit),
                            unroll=config.dcm.unroll))
        out += plan_amplify(cfg, dtype, mesh, stored, lay("train"), w, config.amplify, lay("generate"))
    else:
        out += plan_sft(cfg, dtype, mesh, stored, lay("train"), w, config.sft, config.method, lay("generate"))
    return out


def _caches_on_host(place: str, cfg: ModelConfig, dtype, mesh: Mesh, w: Workload, limit) -> bool:
    """mesh.dcm_cache as the run resolves it (pipeline._dcm_caches_on_host): auto parks
    the prefix caches in host memory when they would take more than AUTO_FRACTION of a
    device (all batches, split over the mesh)."""
    if place != "auto":
        return place == "host"
    if limit is None:
        return False
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize + 4
    total = -(-w.examples // w.dcm_batch) * w.dcm_batch * w.pivot_len * per_token
    return total / mesh.size > mesh_lib.AUTO_FRACTION * limit


def candidate_meshes(n_max: int) -> list[tuple[int, int]]:
    """(fsdp, tp) meshes by device count, 1 .. n_max (powers of two), tp up to 8 (one host)."""
    out, n = [], 1
    while n <= n_max:
        out += [(n // t, t) for t in (1, 2, 4, 8) if t <= n and n % t == 0]
        n *= 2
    return out


def make_mesh(fsdp: int, tp: int) -> Mesh:
    devs = jax.devices()
    if fsdp * tp > len(devs):
        raise CCAError(f"planning a {fsdp} x {tp} mesh needs {fsdp * tp} devices to compile for, this process has "
                       f"{len(devs)} (cca-jax plan sets up CPU host devices itself: run it in a fresh process)")
    return Mesh(np.array(devs[:fsdp * tp]).reshape(fsdp, tp), ("fsdp", "tp"))


# -- the workload of a run config ---------------------------------------------------------------------

def model_config(source: str) -> ModelConfig:
    """A model's architecture without reading its weights (model YAML, HF dir or hub id's
    config.json, GGUF metadata, offline model names)."""
    from pathlib import Path

    from cca_jax.load import local_path
    from cca_jax.models import source as model_source

    src = model_source(source)
    p = local_path(src)
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        from cca_jax import model_yaml

        return model_yaml.read(p)[0]
    if p.is_file() and p.suffix == ".gguf":
        from cca_jax.load import gguf_facts

        return gguf_facts(p)[0]
    from cca_jax.weights import hf

    if p.is_dir():
        return hf.read_config(p)[0]
    try:
        from huggingface_hub import hf_hub_download

        return hf.read_config(Path(hf_hub_download(src, "config.json")).parent)[0]
    except Exception as err:
        raise CCAError(f"{source}: cannot read its config ({type(err).__name__}): pass a local model") from None


def run_dtype(config, log: Callable[[str], None] = print):
    """The dtype the run loads the weights in: ``dtype``, or for "auto" what the local
    weights are stored in (bfloat16 for a hub id, whose weights are not at hand)."""
    from cca_jax.config import parse_dtype

    if config.dtype != "auto":
        return parse_dtype(config.dtype)
    from cca_jax.load import local_path, stored_dtype
    from cca_jax.models import source as model_source

    p = local_path(model_source(config.model))
    if p.exists():
        return parse_dtype(stored_dtype(p))
    log(f"dtype auto: {config.model}'s weights are not here: planned in bfloat16 (--set dtype=... to choose)")
    return jnp.bfloat16


def workload(config, prompt_tokens: int | None = None, examples: int | None = None,
             pivot_tokens: int | None = None, log: Callable[[str], None] = print) -> Workload:
    """The shapes ``config`` runs on. The longest prompt is measured with the model's
    tokenizer where it is at hand (else ``prompt_tokens``, default 1024); examples default
    to the number of train items (at most one pivot each); their length to the longest
    prompt plus eval.max_new_tokens."""
    from cca_jax import pipeline
    from cca_jax.data.prompt import encode

    splits, _ = pipeline.data_splits(config)
    ev = config.eval
    if prompt_tokens is None:
        tok = _tokenizer(config)
        if tok is None:
            prompt_tokens = 1024
            log("no tokenizer at hand: prompts taken as 1024 tokens (--prompt-tokens N to change)")
        else:
            items = [it for s in splits.values() for it in s]
            prompt_tokens = max(len(encode(tok, it.question, ev.shots, ev.chat_template)) for it in items)
    n_train = len(splits["train"])
    # a split smaller than the batch runs as one batch of its own size (generate pads only to repeat a shape)
    gen_batch = min(ev.batch_size, max(len(s) for s in splits.values()))
    if config.pivots.batch_size is not None:  # pivot sampling's own rows (every train item at most)
        from cca_jax.cca.pivots import sampling_rows

        gen_batch = max(gen_batch, sampling_rows(config.pivots.batch_size, n_train))
    ex = examples if examples is not None else n_train
    piv = pivot_tokens if pivot_tokens is not None else prompt_tokens + ev.max_new_tokens
    sc = config.sft
    micro = sc.micro_batch_size or sc.batch_size
    return Workload(prompt=prompt_tokens, gen_batch=gen_batch, gen_new=max(ev.max_new_tokens, ev.test_max_new_tokens),
                    val_batch=min(ev.batch_size, len(splits["val"])), examples=max(ex, 1), pivot_len=_bucket(piv, 8),
                    dcm_batch=min(config.dcm.batch_size, max(ex, 1)), amp_batch=config.amplify.batch_size,
                    sft_batch=micro, sft_micro=sc.batch_size // micro,
                    sft_len=_bucket(prompt_tokens + ev.max_new_tokens, 8), sft_answer=_bucket(ev.max_new_tokens, 8))


def _tokenizer(config):
    try:
        if config.tokenizer == "char":
            from cca_jax.char_tokenizer import char_tokenizer

            return char_tokenizer(model_config(config.model).vocab_size)
        from pathlib import Path

        from cca_jax.models import source as model_source

        p = Path(model_source(config.model))
        if p.is_dir():
            from cca_jax.weights import hf

            return hf.load_tokenizer(p)
        if p.suffix == ".gguf":
            from cca_jax.weights import gguf

            return gguf.load_tokenizer(p)
    except Exception:  # planning goes on with the default length
        return None
    return None


def plan(config, device_memory: int | None = None, meshes: list[tuple[int, int]] | None = None,
         w: Workload | None = None, exact: bool = False, log: Callable[[str], None] = print,
         programs: bool = True) -> dict:
    """Per mesh, each stage's per-device peak; and the smallest mesh whose every stage fits
    ``device_memory`` (the first of ``meshes``, in order, that does). ``programs=False``:
    what stays resident only, no stage program compiled (a lower bound, in seconds)."""
    _compiling[0] = programs
    try:
        return _plan(config, device_memory, meshes, w, exact, log, programs)
    finally:
        _compiling[0] = True


def _plan(config, device_memory, meshes, w, exact, log, programs) -> dict:
    cfg = model_config(config.model)
    dtype = run_dtype(config, log)
    w = w or workload(config, log=log)
    meshes = meshes or [(config.mesh.fsdp, config.mesh.tp)]
    rows, fits = [], None
    for fsdp, tp in meshes:
        mesh = make_mesh(fsdp, tp)
        plans = stage_plans(cfg, dtype, mesh, config, w, device_memory, exact)
        peak = max(p.peak for p in plans)
        ok = device_memory is None or peak <= device_memory
        rows.append({"fsdp": fsdp, "tp": tp, "devices": fsdp * tp, "peak_bytes": peak, "fits": ok,
                     "stages": [p.to_json() for p in plans]})
        log(f"mesh fsdp={fsdp} x tp={tp}: peak {_size(peak)} per device"
            + ("" if device_memory is None else (" (fits)" if ok else " (does not fit)")))
        if ok and fits is None:
            fits = {"fsdp": fsdp, "tp": tp, "devices": fsdp * tp}
            if device_memory is not None:
                break
    return {"model": config.model, "dtype": jnp.dtype(dtype).name, "workload": dataclasses.asdict(w),
            "device_memory": device_memory, "programs": programs, "meshes": rows, "smallest_fit": fits}


def _size(n: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= 0.1 * scale or unit == "KiB":
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_table(result: dict) -> str:
    """The plan as a Markdown table: per mesh and stage, the peak per device, what is
    resident and the largest program's temporaries and new outputs."""
    lines = ["| mesh (fsdp x tp) | stage | layout | peak per device | resident | largest program |",
             "|---|---|---|---:|---|---|"]
    for r in result["meshes"]:
        for s in r["stages"]:
            res = ", ".join(f"{k} {_size(v)}" for k, v in s["resident_bytes"].items() if v)
            prog = max(s["programs"].items(), key=lambda kv: kv[1]) if s["programs"] else ("-", 0)
            prog_cell = f"{prog[0]} {_size(prog[1])}" if result.get("programs", True) else "-"
            lines.append(f"| {r['fsdp']} x {r['tp']} | {s['stage']} | {s['layout'] or 'one device'} | "
                         f"{_size(s['peak_bytes'])} | {res} | {prog_cell} |")
    fit = result["smallest_fit"]
    if not result.get("programs", True):
        lines.append("")
        lines.append("resident arrays only (--resident-only: no stage program compiled): peaks are lower bounds")
    if result["device_memory"] is not None:
        lines.append("")
        found = "none of those tried"
        if fit:
            found = f"fsdp={fit['fsdp']} x tp={fit['tp']} ({fit['devices']} device{'s' * (fit['devices'] > 1)})"
        lines.append(f"smallest mesh within {_size(result['device_memory'])} per device: {found}")
    return "\n".join(lines)
