"""Files in attncc's caches, written and read without trusting what is on disk.

Both caches (generated kernels, the tuning cache) live in folders of the user's own
cache dir. Whatever lies there may have been truncated, edited, replaced by a symlink,
a folder or a FIFO, or left half-written by a killed process, so:

- folders attncc creates are private to the user (0o700);
- files are written to a fresh temporary file in the target folder (`mkstemp`:
  O_CREAT|O_EXCL|O_NOFOLLOW, mode 0o600, an unpredictable name) and renamed over the
  target, which replaces a planted symlink instead of writing through it; a failed
  write removes its temporary file, and temporaries of dead writers are swept;
- reads open without following a symlink and without blocking on a FIFO, take regular
  files only and read at most a bounded number of bytes.

Problems with a folder become `CacheError`, naming the folder and `ATTNCC_CACHE_DIR`.
"""
from __future__ import annotations

import os
import re
import stat
import tempfile
import time
from pathlib import Path

from .errors import CacheError

TEMP_SUFFIX = ".tmp"
STALE_AFTER_S = 24 * 3600  # a temporary file this old is stale whoever wrote it
DEAD_AFTER_S = 60  # ... and one of a gone pid this old (a writer on another host sharing the folder is spared)
_TEMP = re.compile(r"\.(\d+)\.[^.]*\.tmp$|\.tmp(\d+)$")  # ours (`.<pid>.<random>.tmp`), and the old `.tmp<pid>`
_swept: set[str] = set()


def where(path: Path) -> str:
    return f"{path} (the cache dir is $ATTNCC_CACHE_DIR, else $XDG_CACHE_HOME/attncc, else ~/.cache/attncc)"


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) with the leaf private to the user; raise
    `CacheError` when it cannot be a usable folder."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass
        if not path.is_dir():
            raise NotADirectoryError(f"not a directory: {path}")
    except OSError as err:
        raise CacheError(f"cannot use the cache folder {where(path)}: {err.strerror or err}") from None
    return path


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` by a file holding exactly `data`, atomically (readers see the old
    file or the new one), through a private temporary file in the same folder."""
    folder = path.parent
    sweep_stale(folder)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX)
    except OSError as err:
        raise CacheError(f"cannot write to the cache folder {where(folder)}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(err, OSError):
            raise CacheError(f"cannot write {path} in the cache folder {where(folder)}: "
                             f"{err.strerror or err}") from None
        raise


def read_regular(path: Path, limit: int) -> bytes | None:
    """The bytes of a regular file (at most `limit` + 1 of them, so that a longer file is
    seen to be longer), or None when there is none. Symlinks are not followed and FIFOs
    not waited on: anything but a regular file raises `OSError`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"not a regular file: {path}")
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def sweep_stale(folder: Path) -> None:
    """Remove temporary files left by writers that died (their pid is gone, or the file is
    a day old), once per folder and process."""
    key = str(folder)
    if key in _swept:
        return
    _swept.add(key)
    try:
        names = os.listdir(folder)
    except OSError:
        return
    now = time.time()
    for name in names:
        m = _TEMP.search(name)
        if not m:
            continue
        full = os.path.join(folder, name)
        try:
            st = os.lstat(full)
            pid = int(m.group(1) or m.group(2))
            age = now - st.st_mtime
            if stat.S_ISDIR(st.st_mode) or pid == os.getpid():
                continue
            if age > STALE_AFTER_S or (age > DEAD_AFTER_S and not _alive(pid)):
                os.unlink(full)
        except (OSError, ValueError):
            continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True
