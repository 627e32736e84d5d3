"""``load_model`` and ``export_hf``: the doors in and out of the package."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from cca_jax import atomic
from cca_jax import config as config_lib
from cca_jax.config import ModelConfig
from cca_jax.errors import CCAError
from cca_jax.model.transformer import Transformer
from cca_jax.weights import assemble as assemble_lib
from cca_jax.weights import gguf as gguf_lib
from cca_jax.weights import gguf_assemble, gguf_cache
from cca_jax.weights import hf as hf_lib
from cca_jax.weights import sharding as sharding_lib


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_path(source: str) -> bool:
    """Hub ids are "owner/name"; anything else that does not exist is a missing path."""
    return source.endswith(".gguf") or not _HUB_ID.match(source)


def _placer(mesh):
    if mesh is None:
        return None

    def put(path, x):
        spec = sharding_lib.spec_for(path, x.shape, mesh)
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

    return put


def _gguf_dtype(reader) -> str:
    """"auto" for a GGUF file: the float type most of its parameters are stored in;
    quantized tensors count as float32, what they dequantize to."""
    names = {"F16": "float16", "BF16": "bfloat16"}
    counts: dict[str, int] = {}
    for t in reader.tensors:
        ours = names.get(t.tensor_type.name, "float32")
        counts[ours] = counts.get(ours, 0) + int(t.n_elements)
    return max(counts, key=counts.get) if counts else "float32"


def _is_auto(dtype) -> bool:
    return isinstance(dtype, str) and dtype == "auto"


def _resolve_dtype(dtype, stored: str):
    """``dtype`` as a jnp dtype; "auto" is the checkpoint's own (``stored``)."""
    return config_lib.parse_dtype(stored if _is_auto(dtype) else dtype)


def gguf_facts(path: Path) -> tuple[ModelConfig, str]:
    """A GGUF file's config and stored dtype: from the load cache, else from its header."""
    cached = gguf_cache.read(path)
    if cached is not None:
        return cached["config"], cached["stored_dtype"]
    reader = gguf_lib.reader(path)
    return config_lib.from_hf(gguf_lib.hf_config(reader, path)[0]), _gguf_dtype(reader)


def stored_dtype(path: Path) -> str:
    """The dtype "auto" loads the local model source ``path`` in, from headers alone: a
    model YAML float32, a GGUF file its most common float type, a Hugging Face directory
    its safetensors' (no weight is read)."""
    if path.suffix in (".yaml", ".yml"):
        return "float32"
    if path.suffix == ".gguf":
        return gguf_facts(path)[1]
    return hf_lib.stored_dtype(hf_lib.weight_files(path))


def local_path(src: str) -> Path:
    """``src`` as a path: as given if it exists, else a model YAML the package carries
    (``configs/models/gemma-2-2b.yaml`` works from any folder)."""
    path = Path(os.path.expanduser(src))
    if not path.exists() and src.endswith((".yaml", ".yml")):
        from cca_jax.package_files import packaged

        found = packaged(src)
        if found is not None:
            return found
    return path


def _random_sharded(cfg, seed: int, dtype, mesh):
    """The random weights ``Transformer(cfg, rngs=nnx.Rngs(seed))`` draws, made in place
    on the mesh (each device computes its own shards: never the whole model on one)."""
    from cca_jax.model.params import init_params

    key = nnx.Rngs(seed).params()
    abstract = jax.eval_shape(lambda k: init_params(cfg, k, dtype), key)
    out = sharding_lib.param_shardings(abstract, mesh)
    return jax.jit(lambda k: init_params(cfg, k, dtype), out_shardings=out)(key)


# tokenizers being read ahead (``prefetch_tokenizer``), by their cache folder
_PREFETCHED: dict[str, concurrent.futures.Future] = {}


def _read_tokenizer(folder: Path) -> concurrent.futures.Future:
    """The cached tokenizer read on a thread (its host side is imports and JSON parsing;
    the weights' is mostly copies and XLA, off the GIL)."""
    job = _PREFETCHED.pop(str(folder), None)
    if job is None:
        job = concurrent.futures.Future()

        def work():
            try:
                job.set_result(gguf_cache.tokenizer(folder))
            except BaseException as err:  # noqa: BLE001 (handed to the caller of result())
                job.set_exception(err)

        # a daemon: a run that fails its checks meanwhile exits without waiting for it
        threading.Thread(target=work, daemon=True, name="cca_jax-tokenizer").start()
    return job


def prefetch_tokenizer(source: str) -> None:
    """Start reading a GGUF model's cached tokenizer now, for the ``load_model`` that
    follows (a run calls it before its setup: transformers' imports are seconds on some
    hosts). Nothing happens for other sources or a file not loaded before."""
    try:
        path = local_path(str(source))
        cached = gguf_cache.read(path) if path.is_file() and path.suffix == ".gguf" else None
    except OSError:
        return
    if cached is not None and cached["tokenizer"] is not None and str(cached["tokenizer"]) not in _PREFETCHED:
        _PREFETCHED[str(cached["tokenizer"])] = _read_tokenizer(cached["tokenizer"])


def _load_gguf(path: Path, dtype, put, with_tokenizer: bool):
    """Config, parameters and tokenizer of a GGUF file: from the load cache when this file
    was loaded before (``gguf_cache``), else parsed (and cached); tensors expanded on the
    device from the memory-mapped file (``gguf_assemble``)."""
    cached = gguf_cache.read(path)
    reader = None
    if cached is not None:
        cfg, records, stored = cached["config"], cached["records"], cached["stored_dtype"]
    else:
        reader = gguf_lib.reader(path)
        hf_cfg, arch = gguf_lib.hf_config(reader, path)
        cfg = config_lib.from_hf(hf_cfg)
        records, stored = gguf_lib.records(reader, cfg, arch, path), _gguf_dtype(reader)
    # every tensor known, once, of its shape, none missing: before anything is allocated
    shapes = (gguf_lib.tensor_shapes(reader, cfg, arch, path) if records is None
              else ((r["name"], tuple(r["shape"])) for r in records))
    assemble_lib.check(cfg, shapes, str(path))
    dt = _resolve_dtype(dtype, stored if _is_auto(dtype) else "float32")
    if records is None:  # a big-endian file: the host reader's path
        params = assemble_lib.assemble(cfg, gguf_lib.iter_tensors(reader, cfg, arch, path), dt, str(path), put)
        return cfg, params, (gguf_lib.load_tokenizer(path, reader) if with_tokenizer else None)
    tok_job = None
    if cached is not None and with_tokenizer and cached["tokenizer"]:
        tok_job = _read_tokenizer(cached["tokenizer"])  # beside the weights
    params = gguf_assemble.assemble(cfg, records, path, dt, str(path), put)
    if cached is not None:
        tok = None
        if tok_job is not None:
            try:
                tok = tok_job.result()
            except Exception:  # a damaged cache entry: convert from the file as a first load does
                tok = gguf_lib.load_tokenizer(path, gguf_lib.reader(path))
    elif with_tokenizer:
        tok = gguf_lib.load_tokenizer(path, reader)
        gguf_cache.write(path, cfg, arch, records, stored, tok)
    else:
        tok = None
    return cfg, params, tok


def load_model(
    source: str | os.PathLike,
    dtype: Any = "auto",
    *,
    mesh: jax.sharding.Mesh | None = None,
    revision: str | None = None,
    with_tokenizer: bool = True,
    attention: str = "xla",
) -> tuple[Transformer, Any]:
    """Load a model and its tokenizer.

    source: a local Hugging Face directory (safetensors, single or sharded), a hub id
        ("google/gemma-2-2b-it", downloaded when online), a ``.gguf`` file, or a model
        YAML of ``configs/models`` (random weights of that architecture: benchmarks).
    dtype: parameter dtype: "auto" (the default: the dtype the checkpoint stores its
        weights in, e.g. bfloat16 for gemma-2, whatever its config.json says; float32 for
        quantized GGUF tensors and random-weight YAMLs), "float32", "bfloat16", "float16".
    mesh: place each parameter sharded over this (fsdp, tp) mesh as it is read.
    attention: "xla", or "tokamax" for fused attention kernels in calls without a cache
        (``pip install 'cca_jax[kernels]'``; see ``config.ATTENTION``).
    A GGUF file's quantized tensors are expanded on the device (``weights/gguf_assemble``);
    its config, tensor index and tokenizer are cached for the next load of the same file
    (``weights/gguf_cache``: ``CCA_JAX_GGUF_CACHE=off`` turns it off).
    Returns (model, tokenizer); tokenizer is None when the source has none.
    """
    if not _is_auto(dtype):
        config_lib.parse_dtype(dtype)  # a bad dtype fails before any download or read
    config_lib.check_attention(attention)
    src = str(source)
    path = local_path(src)
    if not path.exists():
        if looks_like_path(src):
            raise CCAError(f"no such file or directory: {src}")
        path = hf_lib.download(src, revision=revision)
    put = _placer(mesh)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        from cca_jax import model_yaml

        cfg, seed = model_yaml.read(path)
        cfg = cfg.replace(attention=attention)
        dt = _resolve_dtype(dtype, "float32")
        if mesh is None:
            return Transformer(cfg, rngs=nnx.Rngs(seed), dtype=dt), None
        return Transformer(cfg, rngs=nnx.Rngs(0), params=_random_sharded(cfg, seed, dt, mesh)), None
    if path.is_file():
        if path.suffix != ".gguf":
            raise CCAError(f"{path}: not a model: pass a Hugging Face directory, a hub id or a .gguf file")
        cfg, params, tok = _load_gguf(path, dtype, put, with_tokenizer)
    else:
        cfg, _ = hf_lib.read_config(path)
        files = hf_lib.weight_files(path)
        assemble_lib.check(cfg, hf_lib.tensor_shapes(files), str(path))  # before any allocation
        dt = _resolve_dtype(dtype, hf_lib.stored_dtype(files) if _is_auto(dtype) else "float32")
        params = assemble_lib.assemble(cfg, hf_lib.iter_tensors(files), dt, str(path), put)
        tok = hf_lib.load_tokenizer(path) if with_tokenizer else None
    return Transformer(cfg.replace(attention=attention), rngs=nnx.Rngs(0), params=params), tok


def export_hf(
    model: Transformer,
    out_dir: str | os.PathLike,
    dtype: Any = None,
    tokenizer: Any = None,
    max_shard_size: int = 2 * 1024**3,
    generation_config: dict | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face directory that transformers loads: config.json,
    generation_config.json, safetensors weights and, given ``tokenizer``, its files with
    the chat template.

    dtype: of the written tensors (default: the model's). Shards above ``max_shard_size``
    bytes, with an index. Tied embeddings stay tied (no lm_head tensor is written).
    generation_config: the source checkpoint's (``weights.hf.read_generation_config``);
    default: built from the config's special token ids.
    out_dir: a new path, an empty folder or an earlier export (it carries
    ``.cca_jax_export.json``), which is replaced in one step; anything else is refused
    (``cca_jax.atomic.directory``).
    """
    dt = config_lib.parse_dtype(model.dtype if dtype is None or _is_auto(dtype) else dtype)
    return hf_lib.write(model.config, model.params(), out_dir, dt, tokenizer, max_shard_size, generation_config)


def save_checkpoint(model: Transformer, directory: str | os.PathLike) -> Path:
    """Save config (JSON) and parameters (orbax) to ``directory``."""
    import orbax.checkpoint as ocp

    d = Path(directory).absolute()
    d.mkdir(parents=True, exist_ok=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(d / "params", model.params(), force=True)
    ckpt.wait_until_finished()
    atomic.write_json(d / "model_config.json", model.config.to_dict())
    return d


def restore_checkpoint(directory: str | os.PathLike, mesh: jax.sharding.Mesh | None = None) -> Transformer:
    """Rebuild a model saved by ``save_checkpoint`` (sharded over ``mesh`` if given)."""
    import orbax.checkpoint as ocp

    d = Path(directory).absolute()
    cfg_path = d / "model_config.json"
    if not cfg_path.exists():
        raise CCAError(f"{d}: no model_config.json: not a cca_jax checkpoint")
    cfg = ModelConfig.from_dict(json.loads(cfg_path.read_text()))
    meta = ocp.StandardCheckpointer().metadata(d / "params")
    tree = getattr(meta, "item_metadata", meta)
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), dict(tree),
                            is_leaf=lambda m: hasattr(m, "shape"))
    if mesh is not None:
        shardings = sharding_lib.param_shardings(abstract, mesh)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    params = ocp.StandardCheckpointer().restore(d / "params", abstract)
    return Transformer(cfg, rngs=nnx.Rngs(0), params=params)
