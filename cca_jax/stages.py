"""Run-directory bookkeeping: stage records, what a stage key hashes, pytree checkpoints
and the run-directory lock.

A stage is done when its ``done.json`` holds the hash of its inputs (the key) and the
digest of every file it wrote is unchanged; anything else (a missing, truncated or edited
record or output) makes the stage run again. Keys hash what a stage depends on: the
model's identity (``model_identity``), the data, the settings and earlier stages' keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cca_jax import atomic, paths
from cca_jax.errors import CCAError

DONE = "done.json"
LOCK = ".cca_jax.lock"
# outputs up to this size are hashed in full by ``Stages.finish``; larger ones (big
# checkpoints) by size, mtime and sampled blocks, like weight files
FULL_HASH_BYTES = 64 * 1024**2
_SAMPLE_BLOCKS, _SAMPLE_BYTES = 64, 64 * 1024


def digest(obj) -> str:
    """A short stable hash of JSON-able data (dataclass dicts, lists of records)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_json(path: Path):
    """JSON from a file, or None when it is missing or unreadable (a truncated record)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def file_digest(path: Path) -> str:
    """Content hash: whole files up to FULL_HASH_BYTES; beyond, size + mtime + a hash of
    the first and last block and 64 evenly spaced blocks (a weight file of many GB is not
    read in full: a changed tensor of the same size changes the mtime, and almost surely
    a sampled block)."""
    st = path.stat()
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if st.st_size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return h.hexdigest()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        span = st.st_size - _SAMPLE_BYTES
        for i in range(_SAMPLE_BLOCKS + 1):
            f.seek(span * i // _SAMPLE_BLOCKS)
            h.update(f.read(_SAMPLE_BYTES))
    return "s:" + h.hexdigest()


def _tree_digests(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {str(p.relative_to(root)): file_digest(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in skip}


def model_identity(source: str) -> dict:
    """What a model's stage keys hash: a model YAML's text; a GGUF file's digest; a HF
    directory's config.json, tokenizer and every weight file (``file_digest``); a hub id
    by name (it is resolved to a downloaded directory before this is asked)."""
    p = Path(source)
    if p.is_file():
        return {"path": str(p.resolve()), "digest": file_digest(p)}
    if p.is_dir():
        files = [f for f in sorted(p.iterdir()) if f.is_file() and not f.name.startswith(".")
                 and (f.suffix in (".json", ".safetensors", ".model", ".txt", ".jinja", ".gguf"))]
        return {"path": str(p.resolve()), "files": {f.name: file_digest(f) for f in files}}
    return {"hub": source}


class Stages:
    """Per-stage directories with a completion record (inputs' key, seconds, digests of
    the stage's files)."""

    def __init__(self, run_dir: Path, log=print):
        self.root = Path(run_dir) / "stages"
        self.log = log

    def dir(self, name: str) -> Path:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def done(self, name: str, key: str) -> bool:
        """True when the stage finished with these inputs and its files are as written."""
        d = self.root / name
        rec = read_json(d / DONE)
        if not isinstance(rec, dict) or rec.get("key") != key:
            return False
        want = rec.get("files")
        if not isinstance(want, dict):
            return False
        try:
            got = {f: file_digest(d / f) for f in want}
        except OSError:
            got = None
        if got != want:
            self.log(f"stage {name}: its files changed or went missing since it finished: running it again")
            return False
        return True

    def finish(self, name: str, key: str, seconds: float, **extra) -> None:
        if not _writer():  # several processes: process 0 records (its files are the stage's)
            return
        d = self.root / name
        atomic.write_json(d / DONE, {"key": key, "seconds": seconds, **extra,
                                     "files": _tree_digests(d, skip=(DONE,))})

    def record(self, name: str) -> dict:
        rec = read_json(self.root / name / DONE)
        return rec if isinstance(rec, dict) else {}

    def seconds(self, name: str) -> float:
        return float(self.record(name).get("seconds", 0.0))

    def timing(self, name: str) -> dict:
        """The stage's time split as recorded when it finished (``timing.Account``)."""
        rec = self.record(name)
        t = rec.get("timing")
        return t if isinstance(t, dict) else {"total": round(float(rec.get("seconds", 0.0)), 3)}


# -- pytrees on disk -------------------------------------------------------------------------

def leaf_key(path) -> str:
    """A pytree leaf's path as the dotted name its checkpoints are keyed by."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def flatten(tree) -> dict:
    return {leaf_key(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten(flat: dict, template):
    leaves = jax.tree_util.tree_leaves_with_path(template)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), [flat[leaf_key(p)] for p, _ in leaves])


class PendingSave:
    """``save_trees``' orbax saves once ``save`` returned: the arrays are on the host
    already (orbax copies them before ``save`` returns, so the caller may donate or
    overwrite the device arrays at once); orbax's background threads write the files and
    rename each tree's temporary directory into place; then ``then()`` runs (in this
    object's thread) if every write succeeded. ``done()`` polls, ``wait()`` blocks and
    raises a failed write's (or ``then``'s) error."""

    def __init__(self, checkpointers: list, then: Callable[[], None] | None = None):
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._finish, args=(checkpointers, then), name="cca_jax save",
                                        daemon=True)
        self._thread.start()

    def _finish(self, checkpointers, then) -> None:
        # only this thread touches the checkpointers after ``save``: close() waits for
        # the files and releases orbax's threads; the first error is kept for ``wait``
        for ckpt in checkpointers:
            try:
                ckpt.close()
            except BaseException as err:  # noqa: BLE001 - re-raised by wait()
                self._error = self._error or err
        if self._error is None and then is not None:
            try:
                then()
            except BaseException as err:  # noqa: BLE001 - re-raised by wait()
                self._error = err

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def save_trees(path: Path, trees: dict, *, wait: bool = True, then: Callable[[], None] | None = None) -> PendingSave:
    """Pytrees ({name: tree}) as orbax checkpoints ``path/name``, each flattened to dotted
    leaf keys (orbax writes a temporary directory and renames it). A tree without arrays
    (plain SGD's optimizer state) is an empty directory. ``wait=False`` returns once the
    arrays are copied to the host (``PendingSave``): the files are written meanwhile, and
    ``then()`` runs once they all are."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    started = []
    try:
        for name, tree in trees.items():
            flat = flatten(tree)
            if flat:
                # one checkpointer per tree: a checkpointer's save first waits for its
                # previous one, separate ones write their trees at the same time
                ckpt = ocp.StandardCheckpointer()
                started.append(ckpt)
                ckpt.save(path / name, flat)  # on every process of a multi-process run: each writes its shards
            elif _writer():
                (path / name).mkdir(exist_ok=True)
    except BaseException:
        with contextlib.suppress(BaseException):  # no thread left writing; the first error is the one to see
            PendingSave(started).wait()
        raise
    pending = PendingSave(started, then)
    if wait:
        pending.wait()
    return pending


def load_trees(path: Path, templates: dict) -> dict:
    """Restore ``save_trees``' pytrees shaped (and, for sharded templates, placed) like
    ``templates`` (arrays or ShapeDtypeStructs)."""
    import orbax.checkpoint as ocp

    def placed(x) -> bool:  # committed to a device or a mesh, rather than on the default device
        return getattr(x, "sharding", None) is not None and getattr(x, "committed", True)

    def abstract(x):
        if placed(x):
            return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=x.sharding)
        return np.empty(np.shape(x), x.dtype)  # read to the host (pages never touched until then)

    out = {}
    for name, t in templates.items():
        flat = flatten(t)
        if not flat:
            out[name] = t
            continue
        got = ocp.StandardCheckpointer().restore(Path(path).absolute() / name, {k: abstract(x) for k, x in flat.items()})
        # unplaced leaves come back uncommitted, like the arrays the run computes: JAX
        # compiles a program separately for committed and uncommitted arguments, so restored
        # weights (the best step's, the test evaluation's) reuse the programs compiled before
        got = {k: v if placed(flat[k]) else jnp.asarray(v) for k, v in got.items()}
        out[name] = unflatten(got, t)
    return out


def load_flat(path: Path, name: str) -> dict:
    """One tree of a ``save_trees`` checkpoint as {dotted leaf key: array}, without a
    template (inspection, export)."""
    import orbax.checkpoint as ocp

    p = Path(path).absolute() / name
    if p.is_dir() and not any(p.iterdir()):
        return {}
    return dict(ocp.StandardCheckpointer().restore(p))


# -- the run directory -------------------------------------------------------------------------

class RunLock:
    """An OS lock on the run directory for the life of a run: a second run on the same
    directory fails at once with one line; the OS releases the lock when the process
    ends, crash included (the lock file itself stays, harmless). In a multi-process run
    process 0 holds it for all."""

    def __init__(self, run_dir: Path):
        from filelock import FileLock

        self.path = Path(run_dir) / LOCK
        self._lock = FileLock(str(self.path), timeout=0)

    def __enter__(self):
        from filelock import Timeout

        if not _writer():
            return self
        try:
            self._lock.acquire()
        except Timeout:
            raise CCAError(f"{self.path.parent}: another cca-jax run is using this run directory; wait for it to "
                           f"finish, or pass another output directory") from None
        return self

    def __exit__(self, *exc):
        if self._lock.is_locked:
            self._lock.release()
        return False


def _writer() -> bool:
    from cca_jax.mesh import is_writer

    return is_writer()


def prepare_run_dir(run_dir: str | os.PathLike) -> Path:
    """Check that ``run_dir`` can hold a run (``paths.check_run_dir``: one line
    otherwise, before any work), then create it."""
    d = paths.check_run_dir(run_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CCAError(f"{d}: cannot create the run directory ({err.strerror})") from None
    return d
