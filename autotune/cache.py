"""The persistent tuning cache: best configs per (spec, shape bucket, dtype, GPU, Triton).

One JSON file, `tuning.json` in the user cache dir (`$ATTNCC_CACHE_DIR`, else
`$XDG_CACHE_HOME/attncc`, else `~/.cache/attncc`). Writers take an exclusive
`flock` on a sidecar lock file, merge their entry into what is on disk at that
moment and replace the file atomically, so concurrent tuners never lose each
other's entries and readers never see half a file. A corrupt file is reported with
a warning and read as empty; the next write replaces it.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import torch

from attncc import ir

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


def default_path() -> Path:
    from attncc.runtime import cache_dir  # the generated kernels' folder; tuning sits beside it

    return cache_dir().parent / "tuning.json"


class TuningCache:
    """Entries by key text; each holds `config`, `time_s`, `top` (a few runners-up as
    {config, time_s}), `default_time_s`, `trials`, `timestamp` and the key's fields."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_path()

    def get(self, key: TuningKey) -> dict | None:
        return self.entries().get(key.text)

    def entries(self) -> dict[str, dict]:
        """What is on disk now (atomic replaces make a lock unnecessary for reading)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
                raise ValueError(f"not a format-{FORMAT} tuning cache")
        except (ValueError, AttributeError) as err:
            warnings.warn(f"ignoring the corrupt tuning cache {self.path} ({err}); "
                          "it will be rewritten by the next tuning run", stacklevel=2)
            return {}
        return data["entries"]

    def put(self, key: TuningKey, entry: dict) -> dict:
        """Store an entry (stamped with its key and the time) under the lock, keeping
        every other entry on disk; a key tuned twice keeps the newer entry."""
        entry = {**entry, **key._asdict(), "shape": dict(key.shape), "timestamp": time.time()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = {**self.entries(), key.text: entry}
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"format": FORMAT, "entries": entries}, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        return entry
