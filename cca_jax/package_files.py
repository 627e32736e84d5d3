"""The run configs and model YAMLs the package carries (found from any folder)."""

from __future__ import annotations

from pathlib import Path

from cca_jax.errors import CCAError


def configs_dir() -> Path:
    """The run configs the package carries: ``cca_jax/configs`` in an installed wheel, the
    checkout's top-level ``configs/`` (their source) otherwise."""
    here = Path(__file__).resolve().parent
    for d in (here / "configs", here.parent / "configs"):
        if (d / "tiny.yaml").is_file():
            return d
    raise CCAError(f"no run configs next to the package ({here / 'configs'}): reinstall cca-jax")


def packaged(ref: str | Path) -> Path | None:
    """The packaged file ``ref`` names: ``tiny``, ``tiny.yaml``, ``configs/tiny.yaml`` or
    ``configs/models/tiny-llama.yaml`` (the repository's paths work from any folder);
    None for anything else."""
    parts = Path(ref).parts
    if parts[:1] == ("configs",):
        parts = parts[1:]
    if not parts or any(p in ("..", ".") for p in parts) or Path(ref).is_absolute():
        return None
    if len(parts) == 1 and not parts[0].endswith((".yaml", ".yml")):
        parts = (parts[0] + ".yaml",)
    cand = configs_dir().joinpath(*parts)
    return cand if cand.is_file() else None
