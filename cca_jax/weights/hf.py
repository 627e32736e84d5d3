"""Hugging Face checkpoints: local directories (single or sharded safetensors), the hub,
and the writer that exports our parameters back to a directory transformers loads."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import jax
import numpy as np

from cca_jax import atomic
from cca_jax import config as config_lib
from cca_jax.config import ModelConfig
from cca_jax.errors import CCAError
from cca_jax.weights import mapping

INDEX = "model.safetensors.index.json"


def _read_json_dict(path: Path) -> dict:
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CCAError(f"{path}: not UTF-8 text (byte {err.start}): not a JSON file") from None
    except ValueError as err:
        raise CCAError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise CCAError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw


def _allowed_roots(directory: Path) -> list[Path]:
    """Where a checkpoint's files may really live: inside the directory, and for a hub
    cache snapshot (whose files are links into the repository's blob store) that store."""
    root = directory.resolve()
    if root.parent.name == "snapshots":
        return [root, root.parent.parent / "blobs"]
    return [root]


def _weight_file(directory: Path, name: str) -> Path:
    """A weight file of ``directory``, confined to it: no absolute path, no "..", no
    symbolic link out of it, only regular files (never a device or a pipe)."""
    if not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise CCAError(f"{directory}: shard {name!r} listed in {INDEX} points outside the model "
                       f"directory: the index is damaged or malicious; nothing was read")
    path = directory / name
    if not path.exists():
        raise CCAError(f"{directory}: shard {name} listed in {INDEX} is missing (or a broken link): "
                       f"download it again")
    real = path.resolve()
    if not any(real.is_relative_to(r) for r in _allowed_roots(directory)):
        raise CCAError(f"{path}: a symbolic link to {real}, outside the model directory: copy the "
                       f"file into the directory; nothing was read")
    if not real.is_file():
        raise CCAError(f"{path}: not a regular file: pass a directory of .safetensors files")
    return path


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in index order."""
    index = directory / INDEX
    if index.exists():
        weight_map = _read_json_dict(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CCAError(f"{index}: not a valid safetensors index (no weight_map of tensor -> file name)")
        return [_weight_file(directory, f) for f in dict.fromkeys(weight_map.values())]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return [_weight_file(directory, f.name) for f in files]
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")) or any(directory.glob("*.pth")):
        raise CCAError(
            f"{directory}: only pickle weights (*.bin/*.pt) found; cca_jax reads safetensors only "
            f"(no pickle): convert with transformers' save_pretrained(..., safe_serialization=True)"
        )
    raise CCAError(f"{directory}: no model weights (*.safetensors) in this directory")


def read_config(directory: Path) -> tuple[ModelConfig, object]:
    path = directory / "config.json"
    if not path.exists():
        raise CCAError(f"{directory}: no config.json: not a Hugging Face model directory")
    import transformers

    raw = _read_json_dict(path)
    config_lib.family_of(raw.get("model_type", "<missing model_type>"))  # clear error first
    config_lib.check_hf_sizes(raw, str(path))  # before transformers builds per-layer lists
    try:
        hf_cfg = transformers.AutoConfig.from_pretrained(str(directory))
    except Exception as err:  # transformers' own validation, its lines joined into one
        why = " ".join(str(err).split())[:400]
        raise CCAError(f"{path}: transformers rejects this config ({type(err).__name__}: {why})") from None
    return config_lib.from_hf(hf_cfg), hf_cfg


@contextmanager
def _opened(f: Path):
    """A safetensors file open for reading; a damaged one (truncated download, wrong
    header) is one line naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        st = safe_open(str(f), framework="numpy")
    except (SafetensorError, OSError) as err:
        raise CCAError(f"{f}: not a readable safetensors file ({err}): it is truncated or damaged; "
                       f"download or copy it again") from None
    with st:
        yield st


def tensor_shapes(files: list[Path]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, from the files' headers only (nothing is read)."""
    for f in files:
        with _opened(f) as st:
            for name in st.keys():
                yield name, tuple(st.get_slice(name).get_shape())


# safetensors dtype names -> ours; float64 checkpoints are loaded as float32
_FLOAT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float32"}


def stored_dtype(files: list[Path]) -> str:
    """The floating-point dtype most of a checkpoint's parameters are stored in, read from
    the files' headers ("auto"). Not config.json's torch_dtype: gemma-2's says float32
    while its weights are bfloat16, and loading them as float32 doubles the memory."""
    counts: dict[str, int] = {}
    for f in files:
        with _opened(f) as st:
            for name in st.keys():
                sl = st.get_slice(name)
                ours = _FLOAT_DTYPES.get(sl.get_dtype())
                if ours is not None:
                    counts[ours] = counts.get(ours, 0) + int(np.prod(sl.get_shape(), dtype=np.int64))
    return max(counts, key=counts.get) if counts else "float32"


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """Stream tensors shard by shard (memory-mapped, one tensor materialised at a time)."""
    from safetensors import SafetensorError

    for f in files:
        with _opened(f) as st:
            for name in st.keys():
                try:
                    x = st.get_tensor(name)
                except (SafetensorError, OSError) as err:
                    raise CCAError(f"{f}: cannot read tensor {name!r} ({err}): the file is damaged; "
                                   f"download or copy it again") from None
                yield name, x


def load_tokenizer(directory: Path):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError):
        return None  # weights without tokenizer files: the model is still usable


def download(repo_id: str, revision: str | None = None) -> Path:
    """Fetch config, tokenizer and safetensors of a hub model (token from HF_TOKEN or login)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a dependency
        raise CCAError("huggingface_hub is not installed: pip install huggingface_hub") from None
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
        )
    except Exception as err:  # network, auth, missing repo: one line, never the token
        kind = type(err).__name__
        raise CCAError(
            f"cannot download {repo_id!r} from the Hugging Face hub ({kind}): check the id, your "
            f"network and access (gated models: accept the licence on the model page, then `hf auth login` "
            f"or set HF_TOKEN), or pass a local directory or .gguf file"
        ) from None
    return Path(path)


def _shard(items: list[tuple[str, np.ndarray]], max_bytes: int) -> list[list[tuple[str, np.ndarray]]]:
    shards, cur, size = [], [], 0
    for name, x in items:
        if cur and size + x.nbytes > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, x))
        size += x.nbytes
    if cur:
        shards.append(cur)
    return shards


def hf_state_dict(cfg: ModelConfig, params: dict, dtype) -> list[tuple[str, np.ndarray]]:
    """Our parameters as (HF name, numpy array) in ``dtype``."""
    ndt = np.dtype(jax.numpy.dtype(dtype))
    host = {}
    out = []
    for e in mapping.entries(cfg):
        if e.path not in host:
            node = params
            for p in e.path:
                node = node[p]
            host[e.path] = np.asarray(jax.device_get(node)).astype(ndt)
        x = host[e.path] if e.layer is None else host[e.path][e.layer]
        out.append((e.hf_name, mapping.to_hf(x, e)))
    return out


GENERATION_CONFIG = "generation_config.json"


def read_generation_config(directory: str | os.PathLike | None) -> dict | None:
    """A model directory's ``generation_config.json`` (e.g. gemma-2's EOS ids 1 and 107),
    or None when there is none."""
    if directory is None:
        return None
    path = Path(directory) / GENERATION_CONFIG
    if not path.is_file():
        return None
    return _read_json_dict(path)


def source_generation_config(source: str) -> dict | None:
    """The generation_config.json of a model source: a Hugging Face directory, or a hub
    id already downloaded into the hub cache (GGUF files and model YAMLs have none)."""
    p = Path(os.path.expanduser(source))
    if p.is_dir():
        return read_generation_config(p)
    if p.exists():
        return None
    try:
        from huggingface_hub import snapshot_download

        return read_generation_config(snapshot_download(source, local_files_only=True))
    except Exception:  # not a hub id, or not cached: the config's token ids will do
        return None


def generation_config(cfg: ModelConfig, tokenizer=None, source: dict | None = None):
    """A transformers GenerationConfig: the source checkpoint's own when there is one,
    else the special token ids of the config (EOS also the tokenizer's)."""
    import transformers

    if source is not None:
        return transformers.GenerationConfig.from_dict(source)
    eos = cfg.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or ())
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None and tok_eos not in ids:
        ids.append(tok_eos)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
    kw = {"bos_token_id": cfg.bos_token_id, "pad_token_id": pad,
          "eos_token_id": ids[0] if len(ids) == 1 else (ids or None)}
    return transformers.GenerationConfig(**{k: v for k, v in kw.items() if v is not None})


def write(cfg: ModelConfig, params: dict, out_dir: str | os.PathLike, dtype, tokenizer=None,
          max_shard_bytes: int = 2 * 1024**3, generation: dict | None = None) -> Path:
    """Write an HF directory atomically: into a scratch sibling that then takes the
    target's place (``atomic.directory``: only a new path, an empty folder or an earlier
    export is replaced; killed, nothing is left behind). It holds config.json,
    generation_config.json (``generation``: the source's, else from the config), the
    weights, and the tokenizer with its chat template when ``tokenizer`` is given."""
    from safetensors.numpy import save_file

    out = Path(os.path.expanduser(out_dir))
    with atomic.directory(out) as tmp:
        hf_cfg = config_lib.to_hf(cfg)
        hf_cfg.dtype = str(np.dtype(jax.numpy.dtype(dtype)))
        hf_cfg.save_pretrained(str(tmp))
        generation_config(cfg, tokenizer, generation).save_pretrained(str(tmp))
        shards = _shard(hf_state_dict(cfg, params, dtype), max_bytes=max_shard_bytes)
        if len(shards) == 1:
            save_file(dict(shards[0]), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(dict(shard), str(tmp / fname), metadata={"format": "pt"})
                for name, x in shard:
                    weight_map[name] = fname
                    total += x.nbytes
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out
