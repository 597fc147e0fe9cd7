"""Autotuning without a GPU: the search against known cost landscapes, the config space,
the persistent cache (round trip, concurrent writers, corruption), and `Kernel.tune`
storing a config that later calls pass to the launcher."""
import argparse
import json
import math
import multiprocessing
import time
from collections import Counter

import pytest
import torch

import attncc
from attncc import cli_tune
from attncc.autotune.cache import TuningCache, TuningKey, bucket, tuning_key
from attncc.autotune.measure import NoDeviceError, cuda_time, launch_objective
from attncc.autotune.space import build_space
from attncc.autotune.tuner import Trial, TuneResult, tune
from attncc.binding import bind
from attncc.cli import build_parser

BEST = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3}


def bowl(config: dict) -> float:
    """Seconds with a unique minimum at BEST, growing with the distance in log2 steps."""
    return 1e-3 * (1 + sum((math.log2(config[k]) - math.log2(v)) ** 2 for k, v in BEST.items()))


def big_space(**kw):
    return build_space(1024, 1024, 64, 64, torch.bfloat16, **kw)


class Counted:
    """An objective that counts its calls per config."""

    def __init__(self, cost):
        self.cost, self.calls = cost, Counter()

    def __call__(self, config):
        self.calls[tuple(sorted(config.items()))] += 1
        return self.cost(config)

    def of(self, config):
        return self.calls[tuple(sorted(config.items()))]


# ----------------------------------------------------------------------------- the search

def test_tuner_finds_the_unique_minimum_in_a_few_trials():
    space = big_space()
    assert len(space.configs()) > 150
    objective = Counted(bowl)
    result = tune(objective, space, trials=30, seed=0)
    assert result.best_config == BEST
    assert result.best_time == pytest.approx(1e-3)
    assert len(result.trials) == 30 and len({tuple(t.config.values()) for t in result.trials}) == 30
    assert sum(objective.calls.values()) <= 30 * 3


def test_tuning_is_deterministic_for_a_seed():
    runs = [[(t.config, t.time, t.status) for t in tune(bowl, big_space(), trials=15, seed=s).trials]
            for s in (3, 3, 4)]
    assert runs[0] == runs[1] != runs[2]


def test_default_is_measured_first_and_gives_the_speedup():
    default = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    result = tune(bowl, big_space(default=default), trials=30)
    assert result.trials[0].config == default
    assert result.speedup == pytest.approx(bowl(default) / bowl(BEST))


def test_configs_that_raise_are_failures_not_crashes():
    def objective(config):
        if config["num_warps"] == 8:
            raise RuntimeError("out of resources: shared memory")
        return bowl(config)

    result = tune(objective, big_space(), trials=40)
    failed = [t for t in result.trials if t.status == "failed"]
    assert failed and all(t.config["num_warps"] == 8 and t.time is None for t in failed)
    assert all("RuntimeError: out of resources" in t.reason for t in failed)
    assert result.best_config["num_warps"] != 8


def test_nothing_runs_gives_no_best():
    result = tune(lambda c: 1 / 0, big_space(), trials=5)
    assert result.best is None and result.best_config is None and result.speedup is None
    assert [t.status for t in result.trials] == ["failed"] * 5


def test_slow_trials_are_cut_after_one_repetition():
    objective = Counted(lambda c: bowl(c) ** 2 * 1e3)  # steep: most configs are > 3x the best
    result = tune(objective, big_space(), trials=40, repeats=3)
    statuses = Counter(t.status for t in result.trials)
    assert statuses["pruned"] >= 5 and statuses["ok"] >= 5
    for t in result.trials:
        assert objective.of(t.config) == (1 if t.status == "pruned" else 3)
        if t.status == "pruned":
            assert t.time > 3 * result.best_time and "x the best time" in t.reason


def test_trial_budget():
    objective = Counted(bowl)
    result = tune(objective, big_space(), trials=7)
    assert len(result.trials) == 7 and len(objective.calls) == 7


def test_time_budget():
    def slow(config):
        time.sleep(0.01)
        return bowl(config)

    start = time.monotonic()
    result = tune(slow, big_space(), timeout_s=0.3, repeats=3)
    elapsed = time.monotonic() - start
    assert 0 < len(result.trials) < len(big_space().configs())
    assert elapsed < 0.3 + 3 * 0.01 + 0.5  # the trial under way finishes; no new one starts
    assert result.elapsed_s <= elapsed


def test_without_a_budget_every_config_is_measured_once():
    space = build_space(16, 16, 16, 16, torch.float16)  # 1 x 1 x 3 x 4 x 5 = 60 configs
    result = tune(bowl, space, seed=1)
    assert sorted(map(str, (t.config for t in result.trials))) == sorted(map(str, space.configs()))


# ----------------------------------------------------------------------------- the space

def test_space_prunes_configs_that_exceed_shared_memory():
    small, large = build_space(4096, 4096, 256, 256, torch.float32), big_space()
    assert 0 < len(small.configs()) < len(large.configs())
    assert all(small.shared_memory(c) <= small.smem_limit for c in small.configs())
    heavy = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 4}
    assert small.shared_memory(heavy) == (128 * 256 + 128 * 512 * 4) * 4
    assert not small.fits(heavy) and heavy not in small.configs()
    tighter = build_space(4096, 4096, 256, 256, torch.float32, smem_limit=64 * 1024)
    assert len(tighter.configs()) < len(small.configs())
    # what the sm_90 compile of the dense kernel uses (bf16, D = E = 128): Q + stages x (K + V)
    d128 = build_space(4096, 4096, 128, 128, torch.bfloat16)
    for (bm, bn, stages), shared in {(128, 64, 3): 131072, (128, 128, 2): 163840, (64, 64, 4): 147456}.items():
        assert d128.shared_memory({"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 8, "num_stages": stages}) == shared
    assert {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3} in d128.configs()


def test_space_plan_choices_follow_the_shape():
    decode = build_space(4, 300, 64, 64, torch.bfloat16)
    assert decode.choices["SPLIT_KV"] == (1, 2, 4, 8, 16)
    assert decode.choices["BLOCK_M"] == (16,)  # larger tiles over 4 queries only waste
    assert "SPLIT_KV" not in big_space().choices
    default = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    with_default = build_space(4, 300, 64, 64, torch.bfloat16, default=default)
    assert with_default.default == {**default, "SPLIT_KV": 1}
    assert with_default.fits(with_default.default)


# ----------------------------------------------------------------------------- the cache

def key(n: int, dtype: str = "bfloat16") -> TuningKey:
    return TuningKey("abc123", (("N", n), ("D", 64)), dtype, "NVIDIA H100", "3.6.0")


def test_cache_round_trip(tmp_path):
    path = tmp_path / "sub" / "tuning.json"
    result = tune(bowl, big_space(default=dict(BEST, BLOCK_M=128)), trials=10)
    stored = TuningCache(path).put(key(1024), result.cache_entry(n_top=3))
    again = TuningCache(path).get(key(1024))  # a new instance: what a restarted process sees
    assert again == json.loads(json.dumps(stored))
    assert again["config"] == result.best_config and again["time_s"] == result.best_time
    assert len(again["top"]) == 3 and again["top"][0]["config"] == result.best_config
    assert again["gpu"] == "NVIDIA H100" and again["shape"] == {"N": 1024, "D": 64}
    assert again["timestamp"] <= time.time() and again["default_time_s"] == result.default_time
    assert TuningCache(path).get(key(1024, "float16")) is None


def test_default_cache_location(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "a"))
    assert TuningCache().path == tmp_path / "a" / "tuning.json"
    monkeypatch.delenv("ATTNCC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert TuningCache().path == tmp_path / "xdg" / "attncc" / "tuning.json"


def _write_keys(path, first, count):
    cache = TuningCache(path)
    for n in range(first, first + count):
        cache.put(key(n), {"config": {"BLOCK_M": 16}, "time_s": n})


def test_concurrent_writers_keep_each_others_entries(tmp_path):
    path = tmp_path / "tuning.json"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_write_keys, args=(path, first, 40)) for first in (0, 1000)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    entries = TuningCache(path).entries()
    assert set(entries) == {key(n).text for n in [*range(40), *range(1000, 1040)]}
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_cache_warns_reads_empty_and_is_rewritten(tmp_path):
    path = tmp_path / "tuning.json"
    path.write_text('{"format": 1, "entries": {"x": ')
    with pytest.warns(UserWarning, match="corrupt tuning cache"):
        assert TuningCache(path).get(key(64)) is None
    with pytest.warns(UserWarning, match="corrupt tuning cache"):
        TuningCache(path).put(key(64), {"config": BEST})
    assert json.loads(path.read_text())["entries"][key(64).text]["config"] == BEST
    path.write_text("[1, 2]")
    with pytest.warns(UserWarning, match="corrupt tuning cache"):
        assert TuningCache(path).entries() == {}


def test_key_buckets_shapes_and_ignores_float_params():
    assert [bucket(n) for n in (1, 4, 16, 17, 64, 1000)] == [1, 4, 16, 32, 64, 1024]
    kernel = attncc.compile("examples/softcap.attn", backend="triton")

    def key_of(n, dtype=torch.float32, **params):
        q, k, v = torch.randn(1, 2, n, 16, dtype=dtype), torch.randn(1, 2, 40, 16, dtype=dtype), \
            torch.randn(1, 2, 40, 8, dtype=dtype)
        return tuning_key(kernel.program, bind(kernel.program, dict(q=q, k=k, v=v, **params)))

    assert key_of(20) == key_of(31) != key_of(33)
    assert key_of(5) != key_of(6)
    assert key_of(20) != key_of(20, torch.float16)
    assert key_of(20, cap=2.0) == key_of(20, cap=5.0)
    assert dict(key_of(20).shape) == {"B": 1, "H": 2, "N": 32, "M": 64, "D": 16, "E": 8}


# ----------------------------------------------------------------------------- Kernel.tune

class LauncherSpy:
    """Wraps a launcher and records the config of every launch."""

    def __init__(self, launcher):
        self.launcher, self.configs = launcher, []

    def __getattr__(self, name):
        return getattr(self.launcher, name)

    def __call__(self, call, return_lse, config=None, count_tiles=False):
        self.configs.append(config)
        return self.launcher(call, return_lse, config, count_tiles)


def split_bowl(config):
    """Prefers 32 x 32 tiles (the interpreter's default is 16 x 16) and 2 key splits."""
    return bowl({**config, "BLOCK_M": config["BLOCK_M"] * 2, "BLOCK_N": config["BLOCK_N"]}) \
        * (1 + abs(config.get("SPLIT_KV", 2) - 2))


@pytest.mark.parametrize("n", [20, 4])
def test_kernel_tune_stores_the_config_that_later_calls_use(tmp_path, monkeypatch, n):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    inputs = dict(q=torch.randn(1, 2, n, 16), k=torch.randn(1, 2, 40, 16), v=torch.randn(1, 2, 40, 8))
    kernel = attncc.compile("examples/causal.attn", backend="triton")
    result = kernel.tune(trials=25, objective=split_bowl, **inputs)
    best = result.best_config
    assert best["BLOCK_M"] == (32 if n > 16 else 16) and best["BLOCK_N"] == 32
    assert best.get("SPLIT_KV", 2) == 2 and ("SPLIT_KV" in best) == (n <= 16)
    assert result.trials[0].config["BLOCK_M"] == 16 and result.trials[0].config["BLOCK_N"] == 16
    [entry] = json.loads((tmp_path / "tuning.json").read_text())["entries"].values()
    assert entry["config"] == best and entry["gpu"] == "cpu (interpreter)"

    fresh = attncc.compile("examples/causal.attn", backend="triton")  # reads the cache from disk
    spy = fresh.generated.launcher = LauncherSpy(fresh.generated.launcher)
    out = fresh(**inputs)
    assert fresh.last_run["backend"] == "triton" and spy.configs == [best]
    if n <= 16:
        assert spy.launcher.last_splits == 2
    want = attncc.compile("examples/causal.attn", backend="reference")(**inputs)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    other = {**inputs, "q": torch.randn(1, 2, 40, 16)}  # another bucket: the heuristic
    fresh(**other)
    assert spy.configs[-1] is None


def test_kernel_tune_into_a_given_cache_and_retune_after_corruption(tmp_path):
    path = tmp_path / "mine.json"
    inputs = dict(q=torch.randn(1, 1, 20, 16), k=torch.randn(1, 1, 24, 16), v=torch.randn(1, 1, 24, 8))
    kernel = attncc.compile("examples/dense.attn", backend="triton")
    first = kernel.tune(trials=5, cache=str(path), objective=bowl, **inputs)
    assert kernel.tuning_cache.path == path
    assert TuningCache(path).get(tuning_key(kernel.program, bind(kernel.program, inputs)))["config"] \
        == first.best_config
    path.write_text("not json")
    fresh = attncc.compile("examples/dense.attn", backend="triton")
    fresh.tuning_cache = TuningCache(path)
    spy = fresh.generated.launcher = LauncherSpy(fresh.generated.launcher)
    with pytest.warns(UserWarning, match="corrupt"):
        fresh(**inputs)
    assert spy.configs == [None]
    with pytest.warns(UserWarning, match="corrupt"):
        again = fresh.tune(trials=5, cache=path, objective=bowl, **inputs)
    fresh(**inputs)
    assert spy.configs[-1] == again.best_config
    assert len(json.loads(path.read_text())["entries"]) == 1


def test_kernel_tune_refuses_interpreter_timing_and_the_reference_backend():
    inputs = dict(q=torch.randn(1, 1, 8, 16), k=torch.randn(1, 1, 8, 16), v=torch.randn(1, 1, 8, 8))
    with pytest.raises(NoDeviceError, match="timings in the interpreter mean nothing"):
        attncc.compile("examples/dense.attn", backend="triton").tune(**inputs)
    with pytest.raises(attncc.errors.BackendError, match="only the triton backend"):
        attncc.compile("examples/dense.attn", backend="reference").tune(objective=bowl, **inputs)


def test_timing_refuses_cpu():
    with pytest.raises(NoDeviceError, match="tuning needs a CUDA device"):
        cuda_time(lambda: None, torch.device("cpu"))
    kernel = attncc.compile("examples/dense.attn", backend="triton")
    call = bind(kernel.program, dict(q=torch.randn(1, 1, 8, 16), k=torch.randn(1, 1, 8, 16),
                                     v=torch.randn(1, 1, 8, 8)))
    with pytest.raises(NoDeviceError):
        launch_objective(kernel.generated.launcher, call)


# ----------------------------------------------------------------------------- the CLI

def tune_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "tune" not in sub.choices:
        cli_tune.add_parser(sub)
    return parser


def test_cli_tune_refuses_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = tune_parser().parse_args(["tune", "causal", "--shape", "B=1,H=2,N=64,M=64,D=64,E=64"])
    assert args.run(args) == 2
    assert "timings in the interpreter mean nothing; tuning needs a CUDA device" in capsys.readouterr().err


def test_cli_tune_help_teaches_with_examples(capsys):
    with pytest.raises(SystemExit):
        tune_parser().parse_args(["tune", "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "attncc tune causal --shape B=" in text and "--trials" in text


def test_result_table_lists_the_fastest_with_speedups():
    from rich.console import Console

    default = dict(BEST, BLOCK_M=128)
    result = TuneResult([Trial(default, 2e-3, "ok"), Trial(BEST, 1e-3, "ok"),
                         Trial(dict(BEST, num_warps=8), None, "failed", "boom")], default)
    console = Console(width=120, record=True)
    console.print(cli_tune.result_table(result))
    lines = [line.split() for line in console.export_text().splitlines() if line.strip()]
    header = next(line for line in lines if "BLOCK_M" in line)
    rows = [line for line in lines if line[0].isdigit()]
    assert header[-2:] == ["vs", "default"]
    assert rows == [["1", "64", "32", "4", "3", "1000.0", "us", "2.00x"],
                    ["2", "128", "32", "4", "3", "2000.0", "us", "1.00x", "(default)"]]


def test_plan_choices_join_the_space():
    """GQA packing and the full/partial tile split are tuned like tile sizes, with the
    launcher's own choices as the default."""
    from attncc.autotune.space import launcher_space
    from oracles.inputs import make_inputs

    kernel = attncc.compile("examples/gqa_causal.attn", backend="triton")
    call = bind(kernel.program, make_inputs("gqa_causal", H=4, G=2, N=4, M=40, dtype=torch.float32))
    space = launcher_space(kernel.generated.launcher, call)
    assert space.choices["GQA_PACK"] == (False, True) and space.choices["FULL_MASKED"] == (False, True)
    assert space.default["GQA_PACK"] is True and space.default["FULL_MASKED"] is False
    dense = attncc.compile("examples/dense.attn", backend="triton")
    call = bind(dense.program, make_inputs("dense", dtype=torch.float32))
    assert "GQA_PACK" not in launcher_space(dense.generated.launcher, call).choices
