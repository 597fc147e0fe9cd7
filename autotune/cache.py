"""The persistent tuning cache: best configs per (spec, shape bucket, dtype, GPU, Triton).

Two files in the user cache dir (`$ATTNCC_CACHE_DIR`, else `$XDG_CACHE_HOME/attncc`,
else `~/.cache/attncc`):

- `tuning.json`, the index: the best config per key, the only thing calls read (once
  per kernel and shape bucket: one small JSON file, no optuna, no replay). Writers take
  an exclusive `flock` on the cache's folder, merge their entry into what is on disk at
  that moment and replace the file atomically, so concurrent tuners never lose each
  other's entries and readers never see half a file. A corrupt or unreadable file is
  reported with a warning and read as empty; the next write replaces it. Entries whose
  config is not one `attncc tune` could have written are ignored with a warning.
- `tuning.journal`, every trial, in optuna's journal storage (`studies.py`): one study
  per key, resumed by the next tuning run of that key, readable by optuna-dashboard.
  The index is written from the study's result after each run.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import stat
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import torch

from attncc import cachefs, ir
from attncc.errors import CacheError

FORMAT = 1
SMALL_DIM = 16  # dims up to this stay exact: tile and split choices depend on them closely


class TuningKey(NamedTuple):
    spec: str                          # content hash of the spec text
    shape: tuple[tuple[str, int], ...]  # bucketed dims and int params
    dtype: str
    gpu: str
    triton: str

    @property
    def text(self) -> str:
        shape = ",".join(f"{n}={v}" for n, v in self.shape)
        return f"{self.spec}|{shape}|{self.dtype}|{self.gpu}|triton {self.triton}"


def bucket(value: int) -> int:
    """Small sizes exactly, larger ones rounded up to the next power of two."""
    return value if value <= SMALL_DIM else 1 << (value - 1).bit_length()


def tuning_key(program, call) -> TuningKey:
    """The key of a bound call. Int params join the shape (a window of 256 or of 4096
    wants different tiles); float params do not change the work."""
    names = [*program.dims, *(n for n, p in program.params.items() if p.dtype in (ir.INT, ir.BOOL))]
    shape = tuple((n, bucket(int(call.scalars[n]))) for n in names)
    return TuningKey(_spec_hash(program.source.text), shape, str(call.out_dtype).removeprefix("torch."),
                     _gpu_name(call.device), _triton_version())


@functools.lru_cache(maxsize=None)
def _spec_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"


@functools.lru_cache(maxsize=None)
def _triton_version() -> str:
    return metadata.version("triton")


def journal_path(index: Path) -> Path:
    """Where the trials of the tuning cache `index` live: `tuning.json` -> `tuning.journal`."""
    path = index.with_name(index.stem + ".journal")
    return path if path != index else index.with_name(index.name + ".journal")


def default_path() -> Path:
    from attncc.runtime import cache_dir  # the generated kernels' folder; tuning sits beside it

    return cache_dir().parent / "tuning.json"


# What a config may hold: key -> (type, smallest, largest, power of two?). A tuned config
# always has the first four; an entry with anything else (another key, a float, a bool for
# an int, a tile of 24 or 2**20) did not come from `attncc tune` and is ignored.
CONFIG_KEYS = {"BLOCK_M": (int, 16, 256, True), "BLOCK_N": (int, 16, 256, True),
               "num_warps": (int, 1, 32, True), "num_stages": (int, 1, 8, False),
               "SPLIT_KV": (int, 1, 4096, False), "GQA_PACK": (bool, 0, 1, False),
               "FULL_MASKED": (bool, 0, 1, False)}
REQUIRED_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
MAX_BYTES = 64 << 20  # a tuning cache is kilobytes; more than this is not one
_MISSING = object()  # no file (a file holding `null` is a corrupt one)


def config_problem(config) -> str | None:
    """Why `config` cannot be a launch config (None when it can)."""
    if not isinstance(config, dict):
        return f"the config is a {type(config).__name__}, not a mapping"
    unknown = sorted(str(k) for k in config if k not in CONFIG_KEYS)
    if unknown:
        return f"unknown config keys {', '.join(map(repr, unknown))}"
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        return f"missing config keys {', '.join(missing)}"
    for name, value in config.items():
        kind, low, high, pow2 = CONFIG_KEYS[name]
        if type(value) is not kind:  # exactly: True is not a tile size, 16.0 is not one either
            return f"{name} = {value!r} is not {'a bool' if kind is bool else 'an int'}"
        if kind is int and not (low <= value <= high and (not pow2 or value & (value - 1) == 0)):
            what = "a power of two" if pow2 else "an int"
            return f"{name} = {value!r} is not {what} in [{low}, {high}]"
    return None


class TuningCache:
    """Entries by key text; each holds `config`, `time_s`, `top` (a few runners-up as
    {config, time_s}), `default_time_s`, `trials`, `timestamp` and the key's fields.
    `path` is the index; the trials' journal (`journal`) sits beside it."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_path()
        self.journal = journal_path(self.path)
        self._studies = None  # a studies.Studies once tuning asks (it imports optuna; calls never do)

    def study(self, key: TuningKey, space, seed: int = 0, fresh: bool = False):
        """The optuna study holding the trials of `key` over `space`, to resume (or, with
        `fresh`, to start over); in memory, with a warning, if the journal is unusable."""
        from .studies import Studies

        self._studies = self._studies or Studies(self.journal)
        return self._studies.study(key, space, seed=seed, fresh=fresh)

    @property
    def studies_kept(self) -> bool:
        """Whether the latest `study()` is in the journal (False: it fell back to memory)."""
        return bool(self._studies and self._studies.persistent)

    def get(self, key: TuningKey) -> dict | None:
        """The entry of `key` when its config is valid; an invalid one is reported with a
        warning and treated as missing (the call runs the heuristic default)."""
        entry = self.entries().get(key.text)
        if entry is None:
            return None
        why = config_problem(entry.get("config"))
        if why is not None:
            warnings.warn(f"ignoring the tuning cache entry for {key.text} in {self.path}: {why}; "
                          "the next tuning run of this shape replaces it", stacklevel=2)
            return None
        return entry

    def entries(self) -> dict[str, dict]:
        """What is on disk now (atomic replaces make a lock unnecessary for reading). A file
        that cannot be read or is not a tuning cache (a folder or a FIFO in its place, a
        symlink loop, no permission, not UTF-8, not JSON, nested too deeply, another format)
        is reported with a warning and read as empty; entries that are not objects are left out."""
        try:
            data = self._read()
            if data is _MISSING:
                return {}
            if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
                raise ValueError(f"not a format-{FORMAT} tuning cache")
        except (OSError, ValueError, RecursionError) as err:
            reason = "nested too deeply" if isinstance(err, RecursionError) else \
                (err.strerror if isinstance(err, OSError) and err.strerror else str(err))
            warnings.warn(f"ignoring the corrupt tuning cache {self.path} ({reason}); "
                          "it will be rewritten by the next tuning run", stacklevel=2)
            return {}
        return {k: v for k, v in data["entries"].items() if isinstance(v, dict)}

    def _read(self):
        """The parsed file, or `_MISSING` when there is none. Reads follow a symlink the user
        put there (the path is theirs) but never block on a FIFO."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return _MISSING
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise OSError(0, "not a regular file")
            raw = f.read(MAX_BYTES + 1)
        if len(raw) > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES >> 20} MiB")
        return json.loads(raw.decode("utf-8"))  # UnicodeDecodeError is a ValueError

    def put(self, key: TuningKey, entry: dict) -> dict:
        """Store an entry (stamped with its key and the time) under the lock, keeping
        every other entry on disk; a key tuned twice keeps the newer entry. The lock is an
        exclusive `flock` on the cache's folder itself: no lock file that could be missing,
        a folder or a symlink."""
        entry = {**entry, **key._asdict(), "shape": dict(key.shape), "timestamp": time.time()}
        with locked_folder(self.path.parent):
            entries = {**self.entries(), key.text: entry}
            data = json.dumps({"format": FORMAT, "entries": entries}, indent=1, sort_keys=True)
            cachefs.write_atomic(self.path, data.encode())
        return entry


@contextlib.contextmanager
def locked_folder(folder: Path):
    """An exclusive `flock` on a cache folder (created private if missing) while the block
    runs: no lock file that could be missing, a folder or a symlink."""
    if not folder.is_dir():
        cachefs.private_dir(folder)
    try:
        lock = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise CacheError(f"cannot lock the tuning cache folder {cachefs.where(folder)}: "
                         f"{err.strerror or err}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)  # releases the lock
