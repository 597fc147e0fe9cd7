"""The caches do not trust what is on disk: saved kernels are verified against their hash
and never executed from disk, writes go through private unique temporary files, and a
tuning cache with bad entries or in a bad state warns instead of crashing."""
import dataclasses
import errno
import inspect
import json
import os
import stat
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import attncc
from attncc import cachefs, runtime
from attncc.autotune.cache import TuningCache, TuningKey, config_problem
from attncc.errors import CacheError

SPEC = """attention dense(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> o[B,H,N,E] {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
}
"""
GOOD = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(root))
    return root


@pytest.fixture
def src(cache):
    return attncc.compile(SPEC, backend="triton").generated.source


def variant(src, n):
    """A source no test has written yet (the cache is keyed by content)."""
    return dataclasses.replace(src, source=src.source + f"# variant {n}\n")


def no_temporaries(folder):
    return not [p for p in os.listdir(folder) if ".tmp" in p]


# ----------------------------------------------------------------------------- kernel cache

def test_cache_folders_are_private(cache, src):
    path = runtime.source_path(src)
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(cache / "kernels").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0


@pytest.mark.parametrize("damage", ["append code", "edit a constant", "truncate in a comment", "empty",
                                    "symlink", "fifo"])
def test_a_damaged_cached_kernel_is_replaced_with_a_warning(cache, src, tmp_path, damage):
    path = runtime.source_path(src)
    text = src.source
    if damage == "append code":
        path.write_text(text + "\nimport builtins; builtins.ATTNCC_APPENDED = True\n")
    elif damage == "edit a constant":
        path.write_text(text.replace("0.0", "1.0", 1))
    elif damage == "truncate in a comment":
        path.write_text(text[:text.index("# ") + 3])
    elif damage == "empty":
        path.write_text("")
    elif damage == "symlink":
        other = tmp_path / "other.py"
        other.write_text(text)  # even the right text: a link is not the cache's own file
        path.unlink()
        path.symlink_to(other)
    else:
        path.unlink()
        os.mkfifo(path)  # must not hang
    with pytest.warns(UserWarning, match="regenerating"):
        assert runtime.source_path(src) == path
    assert not path.is_symlink() and path.read_text() == text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runtime.source_path(src)  # verified: no second warning


def test_code_appended_to_a_cached_kernel_never_runs(cache, src):
    path = runtime.source_path(src)
    path.write_text(src.source + "\nimport builtins; builtins.ATTNCC_APPENDED = True\n")
    runtime._MODULES.clear()  # as in a new process
    with pytest.warns(UserWarning, match="regenerating"):
        module = runtime.load_module(src, interpret=True)
    import builtins
    assert not hasattr(builtins, "ATTNCC_APPENDED")
    assert hasattr(module, f"{src.name}_fwd")


def test_what_runs_is_the_verified_text_even_if_the_file_changes_after_the_check(cache, src, monkeypatch):
    """No window between the check and the import: the module is executed from the generated
    text, and Triton reads the function's source from that text, not from the file."""
    source_path = runtime.source_path

    def then_tampered(s):
        path = source_path(s)
        path.write_text(s.source.replace("def ", "import builtins; builtins.ATTNCC_RACED = True\ndef ", 1))
        return path

    monkeypatch.setattr(runtime, "source_path", then_tampered)
    runtime._MODULES.clear()
    module = runtime.load_module(variant(src, "toctou"), interpret=True)
    import builtins
    assert not hasattr(builtins, "ATTNCC_RACED")
    kernel_fn = getattr(module, f"{src.name}_fwd").fn
    assert "ATTNCC_RACED" not in inspect.getsource(kernel_fn)
    assert inspect.getsource(kernel_fn) in src.source


def test_a_kernel_runs_right_after_its_cached_copy_was_damaged(cache):
    kernel = attncc.compile(SPEC, backend="triton")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 8, 16, generator=g) for _ in range(3))
    want = attncc.compile(SPEC, backend="reference")(q=q, k=k, v=v)
    text = kernel.generated.source.source
    assert "tl.exp2(" in text
    kernel.generated.path.write_text(text.replace("tl.exp2(", "tl.exp("))  # an edit that changes numbers
    runtime._MODULES.clear()  # as in a new process
    with pytest.warns(UserWarning, match="regenerating"):
        fresh = attncc.compile(SPEC, backend="triton")
    got = fresh(q=q, k=k, v=v)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_symlink_at_the_old_temporary_name_is_not_written_through(cache, src, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    new = variant(src, "symlink")
    digest = runtime.hashlib.sha256(new.source.encode()).hexdigest()[:16]
    kernels = runtime.cache_dir()
    (kernels / f"{new.name}_{digest}.tmp{os.getpid()}").symlink_to(victim)  # the old predictable name
    for guess in range(0, 10):
        (kernels / f".{new.name}_{digest}.py.{os.getpid()}.{guess}.tmp").symlink_to(victim)
    path = runtime.source_path(new)
    assert victim.read_text() == "precious"
    assert path.read_text() == new.source and not path.is_symlink()


def test_threads_writing_the_same_new_kernel_all_succeed(cache, src):
    failures = []
    for round_ in range(10):
        new = variant(src, f"threads {round_}")
        barrier = threading.Barrier(8)

        def write():
            try:
                barrier.wait()
                assert runtime.source_path(new).read_text() == new.source
            except BaseException as err:  # noqa: BLE001 - collected and reported below
                failures.append(repr(err))

        threads = [threading.Thread(target=write) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert failures == []
    assert no_temporaries(runtime.cache_dir())


def test_a_failed_write_leaves_no_temporary_file(cache, src, monkeypatch):
    kernels = runtime.cache_dir()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cachefs.os, "fsync", full_disk)
    with pytest.raises(CacheError, match="No space left"):
        runtime.source_path(variant(src, "full"))
    assert no_temporaries(kernels)


def test_temporary_files_of_dead_writers_are_swept(cache, src):
    kernels = runtime.cache_dir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)
    stale = [kernels / f".dense_0123456789abcdef.py.{pid}.k3j2h1.tmp", kernels / f"dense_0123456789abcdef.tmp{pid}"]
    live = kernels / f".dense_0123456789abcdef.py.{os.getppid()}.abcdef.tmp"  # a writer still running
    for p in (*stale, live):
        p.write_text("half a kernel")
        os.utime(p, (1, 1) if p != live else None)
    cachefs._swept.discard(str(kernels))
    runtime.source_path(variant(src, "sweep"))
    assert not any(p.exists() for p in stale)
    assert live.exists()


def test_a_cache_dir_that_is_a_file_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(CacheError, match="ATTNCC_CACHE_DIR") as err:
        attncc.compile(SPEC, backend="triton")
    assert str(tmp_path / "cache") in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_kernel_folder_is_a_clear_error(cache, src):
    kernels = runtime.cache_dir()
    kernels.chmod(0o500)
    try:
        with pytest.raises(CacheError, match="ATTNCC_CACHE_DIR"):
            runtime.source_path(variant(src, "read-only"))
    finally:
        kernels.chmod(0o700)


def test_a_folder_in_place_of_a_cached_kernel_is_a_clear_error(cache, src):
    new = variant(src, "folder")
    digest = runtime.hashlib.sha256(new.source.encode()).hexdigest()[:16]
    (runtime.cache_dir() / f"{new.name}_{digest}.py").mkdir()
    with pytest.warns(UserWarning), pytest.raises(CacheError, match="ATTNCC_CACHE_DIR"):
        runtime.source_path(new)


def test_the_cli_reports_an_unusable_cache_dir_without_a_traceback(tmp_path, monkeypatch, capsys):
    from attncc.cli import main

    (tmp_path / "cache").write_text("")
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "cache"))
    spec = tmp_path / "dense.attn"
    spec.write_text(SPEC)
    assert main(["show", "--stage", "triton", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "ATTNCC_CACHE_DIR" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- tuning cache

def key(n=1024):
    return TuningKey("0123456789abcdef", (("N", n),), "float32", "cpu (interpreter)", "3.0")


def write_entry(path, config):
    entry = {"config": config, "time_s": 1.0}
    path.write_text(json.dumps({"format": 1, "entries": {key().text: entry}}))


@pytest.mark.parametrize("config", [
    {**GOOD, "BLOCK_M": -16}, {**GOOD, "BLOCK_M": 24}, {**GOOD, "BLOCK_N": 2 ** 20}, {**GOOD, "BLOCK_M": 0},
    {**GOOD, "BLOCK_M": "64"}, {**GOOD, "BLOCK_M": 64.0}, {**GOOD, "BLOCK_M": True}, {**GOOD, "num_warps": 3},
    {**GOOD, "num_stages": 0}, {**GOOD, "SPLIT_KV": -1}, {**GOOD, "GQA_PACK": 1}, {**GOOD, "EVIL": 1},
    {k: v for k, v in GOOD.items() if k != "BLOCK_N"}, "BLOCK_M=64", None, [16, 16],
])
def test_an_invalid_tuned_config_is_ignored_with_a_warning(tmp_path, config):
    path = tmp_path / "tuning.json"
    write_entry(path, config)
    assert config_problem(config) is not None
    with pytest.warns(UserWarning, match="ignoring the tuning cache entry"):
        assert TuningCache(path).get(key()) is None


@pytest.mark.parametrize("config", [GOOD, {**GOOD, "BLOCK_M": 128, "SPLIT_KV": 3, "GQA_PACK": True,
                                           "FULL_MASKED": False, "num_warps": 8, "num_stages": 4}])
def test_a_valid_tuned_config_is_used(tmp_path, config):
    path = tmp_path / "tuning.json"
    write_entry(path, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TuningCache(path).get(key())["config"] == config


def test_a_call_with_an_invalid_tuned_config_runs_the_default(cache):
    from attncc.autotune.cache import tuning_key
    from attncc.binding import bind

    kernel = attncc.compile(SPEC, backend="triton")
    g = torch.Generator().manual_seed(0)
    args = {n: torch.randn(1, 1, 8, 16, generator=g) for n in ("q", "k", "v")}
    path = cache / "tuning.json"
    tkey = tuning_key(kernel.program, bind(kernel.program, args))
    path.write_text(json.dumps({"format": 1, "entries": {tkey.text: {"config": {**GOOD, "BLOCK_M": -16}}}}))
    with pytest.warns(UserWarning, match="BLOCK_M = -16"):
        got = kernel(**args)
    want = attncc.compile(SPEC, backend="reference")(**args)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _loop(path):
    path.symlink_to(path)


def _fifo(path):
    os.mkfifo(path)


@pytest.mark.parametrize("make", [
    lambda p: p.write_bytes(b'{"format": 1, "entries": {"\xff\xfe": {}}}'),
    lambda p: p.write_text("[" * 200_000 + "]" * 200_000),
    lambda p: p.write_text('{"format": 1, "entries": ' + "[" * 200_000 + "]" * 200_000 + "}"),
    lambda p: p.mkdir(),
    _loop,
    _fifo,
    lambda p: p.write_text("[1, 2]"),
    lambda p: p.write_text("null"),
], ids=["not utf-8", "deep json", "deep entries", "a folder", "a symlink loop", "a fifo", "a list", "null"])
def test_an_unreadable_tuning_cache_warns_and_reads_empty(tmp_path, make):
    path = tmp_path / "tuning.json"
    make(path)
    with pytest.warns(UserWarning, match="ignoring the corrupt tuning cache"):
        assert TuningCache(path).get(key()) is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads unreadable files")
def test_an_unreadable_tuning_cache_file_warns(tmp_path):
    path = tmp_path / "tuning.json"
    write_entry(path, GOOD)
    path.chmod(0)
    with pytest.warns(UserWarning, match="ignoring the corrupt tuning cache"):
        assert TuningCache(path).get(key()) is None


def test_entries_that_are_not_objects_are_left_out(tmp_path):
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"format": 1, "entries": {key().text: [1], "x": "y"}}))
    assert TuningCache(path).get(key()) is None


def test_a_folder_where_the_old_lock_file_was_does_not_break_tuning(tmp_path):
    path = tmp_path / "tuning.json"
    (tmp_path / "tuning.json.lock").mkdir()
    TuningCache(path).put(key(), {"config": GOOD})
    assert TuningCache(path).get(key())["config"] == GOOD
    assert no_temporaries(tmp_path)


def test_storing_into_a_folder_in_place_of_the_tuning_cache_is_a_clear_error(tmp_path):
    path = tmp_path / "tuning.json"
    path.mkdir()
    with pytest.warns(UserWarning, match="corrupt"), pytest.raises(CacheError, match=str(path)):
        TuningCache(path).put(key(), {"config": GOOD})
    assert no_temporaries(tmp_path)


def test_a_new_tuning_cache_folder_is_private(tmp_path):
    path = tmp_path / "new" / "tuning.json"
    TuningCache(path).put(key(), {"config": GOOD})
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0
