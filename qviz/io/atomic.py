"""Atomic file writes, shared by everything qviz writes (session files, reports).

The content goes to a temporary file in the target's folder, is flushed to disk, then renamed
over the target: a failed or killed write never damages the file that was there. Temporary
files are named ``.{name}.qviz-tmp-{pid}-{token}``, so a write that was killed (kill -9, power
loss) leaves a file the next write to the same target recognises and removes: one whose
process is gone, or one of this process that no write here is using.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import secrets
import threading

from qviz.errors import QvizError

_TMP = ".qviz-tmp-"
_LOCK = threading.Lock()
_IN_FLIGHT: set[str] = set()  # this process's temporary files being written now


def _temp_prefix(path: pathlib.Path) -> str:
    return f".{path.name}{_TMP}"


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (unknown counts as alive)."""
    if pid == os.getpid():
        return False  # ours: in use only when in _IN_FLIGHT
    if os.name == "nt":  # os.kill(pid, 0) would terminate it on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: someone else's live process
        return True
    return True


def remove_stale_temps(path) -> list[pathlib.Path]:
    """Remove the temporary files that killed writes to ``path`` left behind; return them."""
    path = pathlib.Path(path)
    prefix, removed = _temp_prefix(path), []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        with _LOCK:
            busy = os.path.abspath(entry.path) in _IN_FLIGHT
        if busy or not pid.isdigit() or _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed.append(pathlib.Path(entry.path))
    return removed


def _why(exc: OSError, folder: pathlib.Path) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"the folder {folder} is not writable ({exc.strerror}); choose another folder "
                "or change its permissions")
    return f"{exc.strerror or exc}"


def check_target(path, *, what: str = "the file", error: type[QvizError] = QvizError) -> pathlib.Path:
    """Refuse early a target that cannot be written: a directory, or in a missing folder."""
    path = pathlib.Path(path)
    try:
        if path.is_dir():
            raise error(f"cannot write {what} to {path}: it is a directory; give a file name")
        if not path.parent.is_dir():
            raise error(f"cannot write {what} to {path}: the directory {path.parent} does not exist; "
                        "create it first")
    except OSError as exc:  # e.g. a folder on the way that may not be searched
        raise error(f"cannot write {what} to {path}: {_why(exc, path.parent)}") from exc
    return path


@contextlib.contextmanager
def atomic_write(path, *, what: str = "the file", error: type[QvizError] = QvizError):
    """``with atomic_write(path) as fh: fh.write(b"...")``: the binary file ``fh`` replaces ``path``
    only once the block has finished without error. OS errors become ``error`` (a QvizError)
    naming ``what``, the path and, for permissions, the folder; nothing is left behind."""
    path = check_target(path, what=what, error=error)
    folder = path.parent
    remove_stale_temps(path)
    tmp = folder / f"{_temp_prefix(path)}{os.getpid()}-{secrets.token_hex(4)}"
    key = os.path.abspath(tmp)
    with _LOCK:  # before it exists: another thread's cleanup must never take it
        _IN_FLIGHT.add(key)
    try:
        try:  # 0o666 and O_EXCL: the umask applies as for any new file; never follows a planted link
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise error(f"cannot write {what} to {path}: {_why(exc, folder)}") from exc
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise error(f"could not write {what} to {path}: {_why(exc, folder)}; "
                        "the file that was there is unchanged") from exc
        raise
    finally:
        with _LOCK:
            _IN_FLIGHT.discard(key)
