"""Tuning trials in optuna's own storage: a journal file (`optuna.storages.JournalStorage`
over `JournalFileBackend`) next to the tuning cache, one study per tuning key and space.

Why a journal and not SQLite: it is plain JSON lines (nothing in it is unpickled: the
file backend has no snapshots, the only place `JournalStorage` uses pickle, and we
refuse one that has), it opens instantly, appends cost a write and an fsync, and
`optuna-dashboard <file>` opens it as it is. Studies resume: a study is named by a hash
of the key and the space's choices (optuna's categorical distributions cannot change
within a study, so another space is another study), and `tuner.tune` counts its
measured trials as measured.

The journal is never read on the call path: calls read the small JSON index
(`cache.TuningCache`), written from each tuning result.

What lies on disk is not trusted: a file that is not a regular file, or cannot be
read, is reported with a warning and the run tunes in memory (no resume, the index is
still written); a journal that does not replay (damaged lines, records that are not
optuna's) is reported, moved aside to `<name>.corrupt` and started afresh; an
incomplete last line (a writer killed mid-append) is cut off with a warning. Appends
are serialised by an `flock` on the journal file itself (no lock file beside it).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
import warnings
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from attncc import cachefs
from attncc.errors import CacheError

from .space import Space

KEY_ATTR = "attncc_key"

def study_name(key, space: Space) -> str:
    """One study per (tuning key, space choices); the key is also a user attr of the study."""
    choices = json.dumps({k: list(v) for k, v in space.choices.items()}, sort_keys=True)
    return "attncc-" + hashlib.sha256(f"{key.text}\n{choices}".encode()).hexdigest()[:16]


class _FileLock:
    """optuna's journal lock protocol (acquire, release) as an exclusive `flock` on the
    journal file itself: attncc processes appending to one journal take turns, and no
    lock file can be left behind, be a folder or be a symlink."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return True

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)  # releases the lock


class _Damaged(Exception):
    """The journal's content does not replay: move it aside and start afresh."""


class _Unusable(Exception):
    """The journal path cannot be used at all (not a regular file, no permission)."""


class Studies:
    """The journal of one tuning cache; opened (replayed and checked) on first use."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.persistent: bool | None = None  # after `study()`: False when it fell back to memory
        self._storage = None

    def study(self, key, space: Space, seed: int = 0, fresh: bool = False) -> optuna.Study:
        """The study of `key` over `space` (created, or loaded to resume; `fresh` deletes
        its trials first). Falls back to an in-memory study, with a warning, when the
        journal cannot be used."""
        name = study_name(key, space)
        for attempt in (1, 2):
            try:
                study = self._load(key, space, name, seed, fresh)
                self.persistent = True
                return study
            except _Damaged as err:
                if attempt == 2 or not self._move_aside(str(err)):
                    break
            except _Unusable as err:
                warnings.warn(f"cannot use the tuning studies {self.path} ({err}); tuning in memory: "
                              "earlier trials are not resumed and these are not kept", stacklevel=3)
                break
        self.persistent = False
        return _in_memory(key, space, name, seed)

    def _load(self, key, space, name, seed, fresh) -> optuna.Study:
        storage = self._open()
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            if fresh:
                try:
                    optuna.delete_study(study_name=name, storage=storage)
                except KeyError:
                    pass
            study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                                        direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
            if study.user_attrs.get(KEY_ATTR) not in (None, key.text) or \
                    study.direction != optuna.study.StudyDirection.MINIMIZE:
                raise _Damaged(f"study {name} is not the one of {key.text}")
            study.get_trials(deepcopy=False)  # every record of it replays
            if KEY_ATTR not in study.user_attrs:
                _describe(study, key, space)
            return study
        except (_Damaged, _Unusable, CacheError):
            raise
        except OSError as err:
            raise _Unusable(err.strerror or str(err)) from None
        except Exception as err:  # noqa: BLE001 - whatever a damaged record makes optuna raise
            raise _Damaged(f"{type(err).__name__}: {err}") from None
        finally:
            optuna.logging.set_verbosity(verbosity)

    def _open(self) -> JournalStorage:
        """The storage, replayed once per instance (it re-reads what others append on
        every operation)."""
        if self._storage is not None:
            return self._storage
        folder = self.path.parent
        if not folder.is_dir():
            cachefs.private_dir(folder)
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            _create(self.path)
        except OSError as err:
            raise _Unusable(err.strerror or str(err)) from None
        else:
            if not stat.S_ISREG(st.st_mode):
                raise _Unusable("not a regular file")
        try:
            _cut_incomplete_line(self.path)
            backend = JournalFileBackend(str(self.path), lock_obj=_FileLock(self.path))
            if hasattr(backend, "load_snapshot"):  # a snapshot is a pickle: never load one
                raise CacheError("this optuna's journal file backend loads pickled snapshots; "
                                 "attncc will not use it for its tuning studies")
            self._storage = JournalStorage(backend)
        except (CacheError, _Unusable):
            raise
        except OSError as err:
            raise _Unusable(err.strerror or str(err)) from None
        except Exception as err:  # noqa: BLE001 - a line that is not JSON, a record optuna cannot replay
            raise _Damaged(f"{type(err).__name__}: {err}") from None
        return self._storage

    def _move_aside(self, reason: str) -> bool:
        """Keep a damaged journal as `<name>.corrupt` (replacing an older one) and start a
        new one; False when even that is impossible (then the run tunes in memory)."""
        aside = self.path.with_name(self.path.name + ".corrupt")
        self._storage = None
        try:
            os.replace(self.path, aside)
        except OSError as err:
            warnings.warn(f"ignoring the corrupt tuning studies {self.path} ({reason}); cannot move it "
                          f"aside ({err.strerror or err}): tuning in memory", stacklevel=4)
            return False
        warnings.warn(f"ignoring the corrupt tuning studies {self.path} ({reason}); moved to {aside}, "
                      "tuning starts afresh", stacklevel=4)
        return True


def _create(path: Path) -> None:
    """A new, empty journal private to the user (optuna would create it with the umask's mode)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                         0o600))
    except FileExistsError:
        pass  # another tuner created it first
    except OSError as err:
        raise _Unusable(err.strerror or str(err)) from None


def _cut_incomplete_line(path: Path) -> None:
    """Truncate a last line without its newline (a writer killed mid-append): optuna's
    reader would skip it, then fail on the line the next append glues to it."""
    lock = _FileLock(path)
    lock.acquire()
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            end, block = size, 1 << 16
            while end > 0:  # find the last newline, reading backwards
                start = max(0, end - block)
                f.seek(start)
                at = f.read(end - start).rfind(b"\n")
                if at >= 0:
                    end = start + at + 1
                    break
                end = start
            f.truncate(end)
        warnings.warn(f"dropped an incomplete last record of the tuning studies {path} "
                      f"({size - end} bytes; a tuning run was stopped while writing)", stacklevel=5)
    finally:
        lock.release()


def _describe(study: optuna.Study, key, space: Space) -> None:
    """What the study is about, for optuna-dashboard and for rebuilding the index."""
    study.set_user_attr(KEY_ATTR, key.text)
    for name, value in key._asdict().items():
        study.set_user_attr(name, dict(value) if name == "shape" else value)
    study.set_user_attr("choices", {k: list(v) for k, v in space.choices.items()})
    if space.default is not None:
        study.set_user_attr("default", space.default)


def _in_memory(key, space: Space, name: str, seed: int) -> optuna.Study:
    study = optuna.create_study(study_name=name, direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    _describe(study, key, space)
    return study
