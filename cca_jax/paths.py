"""Output paths checked before any work: a run directory or a result file that cannot be
written is one line at the start, not a failure after hours."""

from __future__ import annotations

import os
from pathlib import Path

from cca_jax.errors import CCAError


def _nearest_existing(p: Path) -> Path:
    """``p`` or its nearest ancestor that exists (where ``mkdir -p`` would start)."""
    try:
        while not p.exists() and p != p.parent:
            p = p.parent
    except OSError as err:  # e.g. a parent that cannot be searched
        raise CCAError(f"{p}: cannot be checked ({err.strerror or err})") from None
    return p


def _check_writable(d: Path, what: str) -> None:
    base = _nearest_existing(d)
    if not base.is_dir():
        raise CCAError(f"{what} {d}: cannot be created: {base} is a file, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise CCAError(f"{what} {d}: {base} is not writable: choose another location")


def check_run_dir(path: str | os.PathLike, what: str = "run directory") -> Path:
    """Fail (CCAError) before any work when ``path`` cannot hold a run: an existing file, or
    a directory (or the nearest existing parent of a new one) this user cannot write.
    The CLI calls it before ``pipeline.run``; the pipeline can call it first thing too."""
    p = Path(path)
    if _nearest_existing(p) == p and not p.is_dir():  # it exists, as something else
        raise CCAError(f"{what} {p}: exists and is not a directory: choose another --out")
    _check_writable(p, what)
    return p


def check_output_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """Fail before any work when a result file cannot be written at ``path``: an existing
    directory there, or a parent that cannot be created or written."""
    p = Path(path)
    if p.is_dir():
        raise CCAError(f"{what} {p}: is a directory; give a file path (e.g. {p / 'results.json'})")
    _check_writable(p.parent, what)
    return p
