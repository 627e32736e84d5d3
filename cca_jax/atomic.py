"""Atomic writes: a temporary sibling, then a rename, so a crash never leaves a
half-written result behind.

Files (``write_text`` and friends) and whole directories (``directory``, used by the
Hugging Face export) alike. Everything is created with the modes any program of the user
gets (0666 / 0777 minus the umask), not mkstemp's 0600 / 0700.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

from cca_jax.errors import CCAError

try:  # POSIX: a lock tells a live writer's scratch folder from an abandoned one
    import fcntl
except ImportError:  # Windows: abandoned scratch folders are never recognised (never deleted)
    fcntl = None

# Every directory ``directory`` writes carries this file: it is how a later export knows
# the folder is one of its own (and may replace it) and what it holds.
MARKER = ".cca_jax_export.json"
_FORMAT = "cca_jax export"
_VERSION = 1


def _writer() -> bool:
    """False on processes other than 0 of a multi-process JAX run: every process computes
    the same results and only process 0 writes them (the file functions below then
    return the path and write nothing). JAX is not imported here for this."""
    import sys

    jax = sys.modules.get("jax")
    if jax is None or not jax.distributed.is_initialized():
        return True
    return jax.process_index() == 0


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_lines(path, [text])


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=float))


def _temp_file(p: Path, suffix: str = "") -> tuple[int, Path]:
    """A new temporary sibling of ``p``, opened for writing; os.open applies the umask to
    0666 (mkstemp would make it 0600, and the rename would keep that)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = p.with_name(f".{p.name}.{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically (same temporary-file-then-rename as text) and
    close it."""
    import matplotlib.pyplot as plt

    p = Path(path)
    if not _writer():
        plt.close(fig)
        return p
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(p, suffix=p.suffix)  # the suffix tells matplotlib the format
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return p


def write_lines(path: str | os.PathLike, chunks: Iterable[str]) -> Path:
    """Write ``chunks`` (streamed, not joined in memory) to ``path`` atomically."""
    p = Path(path)
    if not _writer():
        return p
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(p)
    try:
        with os.fdopen(fd, "w") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


# -- whole directories ----------------------------------------------------------------------


@contextlib.contextmanager
def directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty scratch directory next to ``target``; when the block ends normally
    it takes ``target``'s place in one step and the earlier contents are deleted only
    then. Raised out of (also by SIGTERM), the scratch directory is removed and
    ``target`` is untouched.

    ``target`` must be a new path, an empty folder or an earlier result of this function
    (it carries MARKER and nothing the marker does not list); the current folder, the
    home folder and any folder holding either are refused. A SIGKILL runs no cleanup: the
    scratch directory carries the marker and a lock its writer holds, so the next call
    for the same target recognises and removes it.
    """
    target = check_target(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)  # 0777 minus the umask
        _clean_abandoned(target)
        with _sigterm_raises():
            scratch = _scratch_name(target)
            scratch.mkdir()
            fd, leftover = None, scratch
            try:
                fd = _start_marker(scratch)
                yield scratch
                _finish_marker(fd, scratch)
                leftover = _swap_in(scratch, target)
            finally:
                if fd is not None:
                    os.close(fd)  # releases the lock
                if leftover is not None:
                    _remove(leftover)
    except OSError as err:  # permissions, a full disk: one line, nothing left behind
        raise CCAError(f"cannot write {err.filename or target}: {err.strerror or err}") from None


def check_target(target: str | os.PathLike) -> Path:
    """``target`` as an absolute path if ``directory`` may write it, else a CCAError
    saying why (callers check before hours of work, ``directory`` checks again)."""
    target = Path(os.path.abspath(os.path.expanduser(target)))
    try:
        _check_target(target)
    except OSError as err:
        raise CCAError(f"cannot inspect {err.filename or target}: {err.strerror or err}") from None
    return target


def _check_target(target: Path) -> None:
    """Refuse targets whose replacement could lose what this program did not write."""
    real = Path(os.path.realpath(target))
    for place, what in ((Path.cwd, "the current folder"), (Path.home, "the home folder")):
        try:
            where = place().resolve()
        except (OSError, RuntimeError):  # no home folder known: nothing to protect
            continue
        if real == where or real in where.parents:
            raise CCAError(f"refusing to export into {target}: it is {what} or holds it; "
                           f"pass a new folder, e.g. {where / 'exported'}")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise CCAError(f"refusing to export into {target}: it exists and is not a folder: pass a new path")
    if not target.exists():
        above = next(p for p in target.parents if os.path.lexists(p))
        if not above.is_dir():
            raise CCAError(f"cannot export into {target}: {above} is a file, not a folder: pass another path")
        return
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return
    listed = _marker_files(target)
    if listed is None:
        raise CCAError(f"refusing to export into {target}: the folder is not empty and is not an earlier "
                       f"export (no {MARKER}): pass a new or empty folder; nothing was changed")
    extra = [e for e in entries if e != MARKER and e not in listed]
    if extra:
        raise CCAError(f"refusing to replace the earlier export {target}: it now also holds {extra[0]!r}, "
                       f"which the export did not write: move that out first; nothing was changed")


def _read_marker(folder: Path) -> dict | None:
    """The marker's contents when ``folder`` carries one of ours (a regular file)."""
    m = folder / MARKER
    if m.is_symlink() or not m.is_file():
        return None
    try:
        data = json.loads(m.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == _FORMAT else None


def _marker_files(folder: Path) -> set[str] | None:
    data = _read_marker(folder)
    if data is None or not data.get("complete") or not isinstance(data.get("files"), list):
        return None
    return {f for f in data["files"] if isinstance(f, str)}


def _scratch_pattern(target: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(target.name)}\.cca_jax-partial-[0-9a-f]{{16}}")


def _scratch_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.cca_jax-partial-{secrets.token_hex(8)}")


def _start_marker(scratch: Path) -> int:
    """Create the scratch directory's marker and hold a lock on it while writing: a lock
    that no process holds means its writer is gone."""
    fd = os.open(scratch / MARKER, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps({"format": _FORMAT, "version": _VERSION, "complete": False}).encode())
    return fd


def _umask() -> int:
    """The process umask, read without changing it (os.umask only sets it, and setting it
    even for a moment races with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _finish_marker(fd: int, scratch: Path) -> None:
    """List what the scratch directory holds in its marker, and give it the modes of
    anything else the user creates (some writers, safetensors' among them, make 0600)."""
    mask = _umask()
    for p in scratch.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
    files = sorted(p.name for p in scratch.iterdir() if p.name != MARKER)
    data = {"format": _FORMAT, "version": _VERSION, "complete": True, "files": files}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(data, indent=1).encode(), 0)


def _abandoned(folder: Path) -> str | None:
    """"partial" or "complete" for a scratch directory whose writer is gone; None for one
    still being written or one that is not ours (no marker)."""
    marker = folder / MARKER
    if fcntl is None or marker.is_symlink() or not marker.is_file():
        return None
    try:
        fd = os.open(marker, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return None  # its writer still runs
    finally:
        os.close(fd)
    if _read_marker(folder) is None:
        return None
    return "complete" if _marker_files(folder) is not None else "partial"


def _clean_abandoned(target: Path) -> None:
    """Remove what killed earlier calls for ``target`` left next to it: only folders of
    the scratch name pattern that carry our marker (or are empty). A complete one goes
    back in place first if the target is missing (killed between two renames)."""
    pattern = _scratch_pattern(target)
    for p in sorted(target.parent.iterdir()):
        if not pattern.fullmatch(p.name) or p.is_symlink() or not p.is_dir():
            continue
        if not any(p.iterdir()):  # killed before its marker was written
            with contextlib.suppress(OSError):
                p.rmdir()
            continue
        state = _abandoned(p)
        if state == "complete" and not os.path.lexists(target):
            os.rename(p, target)
        elif state is not None:
            _remove(p)


def _remove(folder: Path) -> None:
    """Delete a scratch directory, its marker last: interrupted half way, what is left is
    still recognisably ours and the next call removes it."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for child in folder.iterdir():
        if child.name == MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                child.unlink()
    with contextlib.suppress(OSError):
        (folder / MARKER).unlink(missing_ok=True)
        folder.rmdir()


def _swap_in(scratch: Path, target: Path) -> Path | None:
    """Put ``scratch`` at ``target``; returns where the earlier contents now are (None
    when there were none)."""
    if not os.path.lexists(target):
        os.rename(scratch, target)
        return None
    if _exchange(scratch, target):
        return scratch  # the earlier export, now under the scratch name
    aside = _scratch_name(target)  # two renames: the target is missing for a moment
    os.rename(target, aside)
    try:
        os.rename(scratch, target)
    except BaseException:
        os.rename(aside, target)
        raise
    return aside


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE), so ``b`` is never
    missing. False where the C library or the file system cannot."""
    try:
        rename = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    rename.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if rename(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """A default SIGTERM ends the process without any cleanup; inside this block it raises
    SystemExit instead, so ``finally`` clauses remove temporaries. Only on the main thread
    and only where no one else installed a handler."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
