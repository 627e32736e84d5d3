"""What a GGUF file's first load works out, kept for the next load of the same file.

Reading a GGUF needs its whole header parsed (a 150k-token vocabulary is ~300k strings),
transformers' config classes (which import torch) and transformers' tokenizer converter:
seconds before the first weight is read. The first load keeps the results in
``$CCA_JAX_CACHE/gguf/<key>/`` (default ``~/.cache/cca_jax``): our ``ModelConfig``, every
tensor's place in the file (``gguf.records``) and the converted tokenizer as
``save_pretrained`` writes it. Later loads read those and memory-map the file.

The key is the file's real path, size and modification time, and the versions of this
format, cca_jax and transformers (a new converter may tokenize differently); the file's
first MiB is also compared. ``CCA_JAX_GGUF_CACHE=off`` turns the cache off; a directory
there puts it elsewhere. A cache that cannot be written or read only costs the time.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from cca_jax.config import ModelConfig

FORMAT = 1
_HEAD = 1 << 20


def root() -> Path | None:
    env = os.environ.get("CCA_JAX_GGUF_CACHE", "").strip()
    if env.lower() == "off":
        return None
    if env:
        return Path(os.path.expanduser(env))
    from cca_jax import models

    return models.cache_dir() / "gguf"


def _identity(path: Path) -> dict:
    from cca_jax.version import VERSION

    st = path.stat()
    try:
        tf = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        tf = None
    return {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "format": FORMAT, "cca_jax": VERSION, "transformers": tf}


def _head_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(_HEAD)).hexdigest()


def _folder(path: Path) -> tuple[Path | None, dict]:
    base, ident = root(), _identity(path)
    if base is None:
        return None, ident
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]
    return base / key, ident


def read(path: Path) -> dict | None:
    """The cached load facts for ``path`` (config, records, stored_dtype, tokenizer: a
    folder or None), or None when there are none for this exact file."""
    try:
        folder, ident = _folder(path)
        if folder is None or not (folder / "model.json").is_file():
            return None
        meta = json.loads((folder / "model.json").read_text())
        if meta.get("identity") != ident or meta.get("head_sha256") != _head_digest(path):
            return None
        size = ident["size"]
        if not all(0 <= r["offset"] and r["offset"] + r["nbytes"] <= size for r in meta["records"]):
            return None  # an entry that does not describe this file: parse the file itself
        tok = folder / "tokenizer" if meta.get("tokenizer") else None
        return {"config": ModelConfig.from_dict(meta["config"]), "arch": meta["arch"],
                "records": meta["records"], "stored_dtype": meta["stored_dtype"], "tokenizer": tok}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # an unreadable or foreign entry: load from the file itself


def write(path: Path, cfg: ModelConfig, arch: str, records: list[dict], stored_dtype: str, tokenizer: Any) -> Path | None:
    """Keep a first load's facts (best effort: a cache that cannot be written is a note on
    stderr, never a failed load). The folder appears whole (written aside, then renamed)."""
    import jax

    if jax.process_index() != 0:
        return None
    tmp = folder = None
    try:
        folder, ident = _folder(path)
        if folder is None or folder.exists():
            return None
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f".{folder.name}.{secrets.token_hex(6)}")
        tmp.mkdir()
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        meta = {"identity": ident, "head_sha256": _head_digest(path), "config": cfg.to_dict(), "arch": arch,
                "stored_dtype": stored_dtype, "tokenizer": tokenizer is not None, "records": records}
        (tmp / "model.json").write_text(json.dumps(meta))
        os.rename(tmp, folder)
        return folder
    except OSError as err:
        if folder is not None and (folder / "model.json").is_file():
            return folder  # another process wrote the same entry first
        print(f"cca_jax: note: GGUF load cache not written ({err}); later loads parse the file again",
              file=sys.stderr)
        return None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # ours: a race lost, or a failed write


def tokenizer(folder: Path):
    """The cached tokenizer, by the class transformers' converter made (its module alone:
    ``AutoTokenizer`` would import torch through the config classes)."""
    import transformers

    cls_name = json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    cls = getattr(transformers, cls_name, None) if isinstance(cls_name, str) else None
    return (cls or transformers.AutoTokenizer).from_pretrained(str(folder))
