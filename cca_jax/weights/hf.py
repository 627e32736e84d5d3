"""Hugging Face checkpoints: local directories (single or sharded safetensors), the hub,
and the writer that exports our parameters back to a directory transformers loads."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import jax
import numpy as np

from cca_jax import config as config_lib
from cca_jax.config import ModelConfig
from cca_jax.errors import CCAError
from cca_jax.weights import mapping

INDEX = "model.safetensors.index.json"


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in index order."""
    index = directory / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise CCAError(f"{index}: not a valid safetensors index ({err})") from None
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (directory / f).exists()]
        if missing:
            raise CCAError(f"{directory}: shard {missing[0]} listed in {INDEX} is missing: download it again")
        return [directory / f for f in files]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
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

    try:
        raw = json.loads(path.read_text())
    except ValueError as err:
        raise CCAError(f"{path}: invalid JSON ({err})") from None
    config_lib.family_of(raw.get("model_type", "<missing model_type>"))  # clear error first
    hf_cfg = transformers.AutoConfig.from_pretrained(str(directory))
    return config_lib.from_hf(hf_cfg), hf_cfg


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """Stream tensors shard by shard (memory-mapped, one tensor materialised at a time)."""
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


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
            f"network and access (gated models need `huggingface-cli login` or HF_TOKEN), or pass "
            f"a local directory or .gguf file"
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


def write(cfg: ModelConfig, params: dict, out_dir: str | os.PathLike, dtype, tokenizer=None,
          max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write an HF directory atomically (a temporary sibling, then a rename)."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf_cfg = config_lib.to_hf(cfg)
        hf_cfg.dtype = str(np.dtype(jax.numpy.dtype(dtype)))
        hf_cfg.save_pretrained(str(tmp))
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
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
