"""Tuning trials in optuna's journal storage and the one timer: studies resume (nothing is
measured twice), are plain optuna studies, stay private and JSON-only, survive damage with
a warning; calls never touch them; tuning and benchmarks both time with
`triton.testing.do_bench`."""
import contextlib
import json
import math
import os
import pickle
import stat
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import optuna
import pytest
import torch
import triton.testing

import attncc
from attncc import bench_timing
from attncc.autotune import measure
from attncc.autotune.cache import TuningCache, TuningKey, journal_path, tuning_key
from attncc.autotune.space import build_space
from attncc.autotune.studies import KEY_ATTR, study_name
from attncc.autotune.tuner import tune
from attncc.binding import bind
from attncc.errors import CacheError

ROOT = Path(__file__).resolve().parent.parent
BEST = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3}
KEY = TuningKey("0123456789abcdef", (("N", 1024), ("D", 64)), "bfloat16", "NVIDIA H100", "3.9.0")


def bowl(config: dict) -> float:
    return 1e-3 * (1 + sum((math.log2(config[k]) - math.log2(v)) ** 2 for k, v in BEST.items()))


class Counted:
    def __init__(self, cost=bowl):
        self.cost, self.calls = cost, Counter()

    def __call__(self, config):
        self.calls[tuple(sorted(config.items()))] += 1
        return self.cost(config)


def space(**kw):
    return build_space(1024, 1024, 64, 64, torch.bfloat16, **kw)


def journal_study(path: Path, name: str) -> optuna.Study:
    """The study as any optuna client (optuna-dashboard included) opens it."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    return optuna.load_study(study_name=name, storage=storage)


# ----------------------------------------------------------------------------- resuming

def test_a_resumed_study_measures_only_new_configs(tmp_path):
    cache, s = TuningCache(tmp_path / "tuning.json"), space(default=dict(BEST, BLOCK_M=128))
    objective = Counted()
    first = tune(objective, s, trials=8, study=cache.study(KEY, s))
    assert first.measured_now == 8 and not any(t.resumed for t in first.trials)
    again = TuningCache(tmp_path / "tuning.json")  # what a restarted process sees
    second = tune(objective, s, trials=8, study=again.study(KEY, s))
    assert again.studies_kept and second.measured_now == 8 and len(second.trials) == 16
    assert [t.resumed for t in second.trials] == [True] * 8 + [False] * 8
    assert [(t.config, t.time) for t in second.trials[:8]] == [(t.config, t.time) for t in first.trials]
    assert len(objective.calls) == 16 and set(objective.calls.values()) <= {1, 3}  # never measured twice
    assert second.default_time == first.default_time  # the default was measured once, in the first run
    assert second.best_time == min(t.time for t in second.trials if t.status == "ok")


def test_without_a_budget_a_resumed_study_covers_the_rest_of_the_space(tmp_path):
    small = build_space(16, 16, 16, 16, torch.float16)  # 60 configs
    cache, objective = TuningCache(tmp_path / "t.json"), Counted()
    tune(objective, small, trials=25, study=cache.study(KEY, small))
    rest = tune(objective, small, study=TuningCache(tmp_path / "t.json").study(KEY, small))
    assert rest.measured_now == 35 and len(rest.trials) == 60 == len(objective.calls)
    assert tune(objective, small, study=TuningCache(tmp_path / "t.json").study(KEY, small)).measured_now == 0


def test_fresh_starts_the_study_over(tmp_path):
    cache, s, objective = TuningCache(tmp_path / "t.json"), space(), Counted()
    tune(objective, s, trials=5, seed=0, study=cache.study(KEY, s))
    again = tune(objective, s, trials=5, seed=0, study=TuningCache(tmp_path / "t.json").study(KEY, s, fresh=True))
    assert again.measured_now == 5 == len(again.trials) and max(objective.calls.values()) == 6


def test_keys_and_spaces_have_their_own_studies(tmp_path):
    cache = TuningCache(tmp_path / "t.json")
    other_key = KEY._replace(dtype="float16")
    tune(bowl, space(), trials=4, study=cache.study(KEY, space()))
    assert tune(bowl, space(), trials=4, study=cache.study(other_key, space())).measured_now == 4
    narrower = build_space(1024, 1024, 64, 64, torch.bfloat16, default=dict(BEST, num_stages=5))
    assert study_name(KEY, narrower) != study_name(KEY, space())  # the choices differ: another study
    assert len(tune(bowl, narrower, trials=3, study=cache.study(KEY, narrower)).trials) == 3


def test_studies_are_plain_optuna_studies_with_the_key_as_user_attr(tmp_path):
    cache, s = TuningCache(tmp_path / "t.json"), space()
    result = tune(bowl, s, trials=6, study=cache.study(KEY, s))
    assert cache.journal == tmp_path / "t.journal" == journal_path(tmp_path / "t.json")
    study = journal_study(cache.journal, study_name(KEY, s))
    assert study.user_attrs[KEY_ATTR] == KEY.text and study.user_attrs["gpu"] == "NVIDIA H100"
    assert study.user_attrs["shape"] == {"N": 1024, "D": 64}
    measured = [t for t in study.trials if "status" in t.user_attrs]
    assert sorted(map(str, (t.params for t in measured))) == sorted(map(str, (t.config for t in result.trials)))
    assert study.best_trial.params == result.best_config and study.best_value == result.best_time


def test_an_interrupted_trial_is_failed_and_measured_again(tmp_path):
    cache, s = TuningCache(tmp_path / "t.json"), build_space(16, 16, 16, 16, torch.float16)
    seen = []

    def stop_on_third(config):
        seen.append(config)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return bowl(config)

    with pytest.raises(KeyboardInterrupt):
        tune(stop_on_third, s, trials=10, repeats=1, study=cache.study(KEY, s))
    study = journal_study(cache.journal, study_name(KEY, s))
    assert all(t.state.is_finished() for t in study.trials)  # nothing left RUNNING
    again = tune(Counted(), s, study=TuningCache(tmp_path / "t.json").study(KEY, s))
    assert sum(t.resumed for t in again.trials) == 2 and seen[2] in [t.config for t in again.trials if not t.resumed]


def test_records_that_are_not_measurements_are_not_resumed(tmp_path):
    cache, s = TuningCache(tmp_path / "t.json"), space()
    study = cache.study(KEY, s)
    for attrs in ({"status": "ok", "time_s": -1.0}, {"status": "ok", "time_s": float("nan")},
                  {"status": "bogus", "time_s": 1e-9}, {"time_s": 1e-9}):
        trial = study.ask()
        for name, options in s.choices.items():
            trial.suggest_categorical(name, options)
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        study.tell(trial, 1e-9)
    assert tune(bowl, s, trials=3, study=TuningCache(tmp_path / "t.json").study(KEY, s)).trials[0].resumed is False


# ----------------------------------------------------------------------------- Kernel.tune

def test_kernel_tune_resumes_and_calls_read_only_the_index(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    inputs = dict(q=torch.randn(1, 1, 20, 16), k=torch.randn(1, 1, 24, 16), v=torch.randn(1, 1, 24, 8))
    objective = Counted()
    first = attncc.compile("examples/dense.attn", backend="triton").tune(trials=4, objective=objective, **inputs)
    kernel = attncc.compile("examples/dense.attn", backend="triton")
    second = kernel.tune(trials=4, objective=objective, **inputs)
    assert second.measured_now == 4 and len(second.trials) == 8 and len(objective.calls) == 8
    assert second.best_time <= first.best_time
    entry = TuningCache().get(tuning_key(kernel.program, bind(kernel.program, inputs)))
    assert entry["config"] == second.best_config and entry["trials"] == 8

    from attncc.autotune import studies

    def no_journal(*a, **k):
        pytest.fail("a call opened the tuning studies")  # not an Exception: nothing swallows it

    monkeypatch.setattr(studies.Studies, "_open", no_journal)
    fresh = attncc.compile("examples/dense.attn", backend="triton")
    fresh(**inputs)
    assert fresh.tuned_config(bind(fresh.program, inputs)) == second.best_config


def test_calls_do_not_import_optuna(tmp_path):
    """The index is the call path's only file: reading it imports neither optuna nor the journal."""
    code = f"""
import sys, torch, attncc
from attncc.autotune.cache import TuningCache, tuning_key
from attncc.binding import bind
k = attncc.compile({str(ROOT / 'examples/dense.attn')!r}, backend='triton')
inputs = dict(q=torch.randn(1, 1, 8, 16), k=torch.randn(1, 1, 8, 16), v=torch.randn(1, 1, 8, 8))
TuningCache().put(tuning_key(k.program, bind(k.program, inputs)),
                  {{'config': {{'BLOCK_M': 16, 'BLOCK_N': 16, 'num_warps': 4, 'num_stages': 1}}}})
k(**inputs)
assert k.last_run['backend'] == 'triton' and k.tuned_config(bind(k.program, inputs))['BLOCK_M'] == 16
print('optuna' in sys.modules, 'attncc.autotune.studies' in sys.modules)
"""
    env = {**os.environ, "ATTNCC_CACHE_DIR": str(tmp_path), "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


# ----------------------------------------------------------------------------- safety

def test_the_journal_is_private_and_json_only(tmp_path, monkeypatch):
    cache, s = TuningCache(tmp_path / "new" / "t.json"), space()

    def no_unpickling(*a, **k):
        raise AssertionError("something unpickled")

    monkeypatch.setattr(pickle, "loads", no_unpickling)
    tune(bowl, s, trials=3, study=cache.study(KEY, s))
    tune(bowl, s, trials=3, study=TuningCache(tmp_path / "new" / "t.json").study(KEY, s))
    assert stat.S_IMODE(os.stat(cache.journal).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cache.journal.parent).st_mode) == 0o700
    lines = cache.journal.read_text().splitlines()
    assert lines and all(isinstance(json.loads(line), dict) for line in lines)
    assert not [p for p in os.listdir(cache.journal.parent) if p.endswith(".lock")]


def test_a_journal_backend_with_pickled_snapshots_is_refused(tmp_path, monkeypatch):
    from optuna.storages.journal import JournalFileBackend

    monkeypatch.setattr(JournalFileBackend, "load_snapshot", lambda self: None, raising=False)
    with pytest.raises(CacheError, match="pickled snapshots"):
        TuningCache(tmp_path / "t.json").study(KEY, space())


@pytest.mark.parametrize("damage", ["garbage lines", "not utf-8", "records optuna cannot replay"])
def test_a_corrupt_journal_is_moved_aside_with_a_warning_and_tuning_starts_afresh(tmp_path, damage):
    cache, s = TuningCache(tmp_path / "t.json"), space()
    tune(bowl, s, trials=3, study=cache.study(KEY, s))
    if damage == "garbage lines":
        cache.journal.write_text("{not json\n" + cache.journal.read_text())
    elif damage == "not utf-8":
        cache.journal.write_bytes(b"\xff\xfe\n" + cache.journal.read_bytes())
    else:
        cache.journal.write_text(json.dumps({"op_code": 99, "worker_id": "x"}) + "\n"
                                 + cache.journal.read_text())
    damaged = cache.journal.read_bytes()
    again = TuningCache(tmp_path / "t.json")
    with pytest.warns(UserWarning, match="corrupt tuning studies"):
        study = again.study(KEY, s)
    result = tune(bowl, s, trials=3, study=study)
    assert again.studies_kept and result.measured_now == 3 == len(result.trials)
    assert (tmp_path / "t.journal.corrupt").read_bytes() == damaged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tune(bowl, s, trials=2, study=TuningCache(tmp_path / "t.json").study(KEY, s)).trials[0].resumed


def test_an_incomplete_last_record_is_cut_off_and_the_rest_resumed(tmp_path):
    cache, s = TuningCache(tmp_path / "t.json"), space()
    tune(bowl, s, trials=3, study=cache.study(KEY, s))
    with open(cache.journal, "ab") as f:
        f.write(b'{"op_code":5,"worker_id":"killed mid-wri')
    with pytest.warns(UserWarning, match="incomplete last record"):
        study = TuningCache(tmp_path / "t.json").study(KEY, s)
    assert sum(t.resumed for t in tune(bowl, s, trials=2, study=study).trials) == 3
    assert cache.journal.read_bytes().endswith(b"\n")


def _fifo(p):
    os.mkfifo(p)


def _loop(p):
    p.symlink_to(p)


@pytest.mark.parametrize("make", [lambda p: p.mkdir(), _fifo, _loop], ids=["a folder", "a fifo", "a symlink loop"])
def test_an_unusable_journal_warns_and_tunes_in_memory(tmp_path, monkeypatch, make):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    make(tmp_path / "tuning.journal")
    inputs = dict(q=torch.randn(1, 1, 20, 16), k=torch.randn(1, 1, 24, 16), v=torch.randn(1, 1, 24, 8))
    kernel = attncc.compile("examples/dense.attn", backend="triton")
    with pytest.warns(UserWarning, match="cannot use the tuning studies"):
        result = kernel.tune(trials=3, objective=bowl, **inputs)
    assert result.measured_now == 3
    assert TuningCache().get(tuning_key(kernel.program, bind(kernel.program, inputs)))["config"] == result.best_config
    assert os.path.lexists(tmp_path / "tuning.journal")  # left as it was


# ----------------------------------------------------------------------------- one timer

class FakeBench:
    """Stands in for triton.testing.do_bench: records its calls, runs fn, returns per-run ms."""

    def __init__(self, times_ms=(3.0, 1.0, 2.0, 9.0, 2.5)):
        self.times_ms, self.calls = list(times_ms), []

    def __call__(self, fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        self.calls.append({"fn": fn, "warmup": warmup, "rep": rep, "quantiles": quantiles,
                           "return_mode": return_mode})
        fn()
        return list(self.times_ms) if return_mode == "all" else 2.5


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device as far as the timing code can tell, with do_bench replaced."""
    bench = FakeBench()
    monkeypatch.setattr(triton.testing, "do_bench", bench)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 0)
    return bench


def test_tuning_and_benchmarks_time_with_do_bench(fake_gpu):
    launches = []

    class Call:
        device = torch.device("cuda")

    objective = measure.launch_objective(lambda call, lse, config: launches.append(config), Call())
    assert objective(BEST) == pytest.approx(2.5e-3)  # the median of the per-run times
    assert launches == [BEST] and fake_gpu.calls[-1]["return_mode"] == "all"

    ran = []
    _, timing = bench_timing.measure(lambda: ran.append(1), torch.device("cuda"), warmup=2, reps=5)
    assert timing["ms"] == pytest.approx(2.5) and timing["reps"] == 5
    assert len(fake_gpu.calls) == 2 and fake_gpu.calls[-1]["return_mode"] == "all"
    assert fake_gpu.calls[-1]["warmup"] == 0 and fake_gpu.calls[-1]["rep"] > 0


def test_the_timer_adapts_to_do_bench_signatures(fake_gpu, monkeypatch):
    seen = []

    def quantiles_only(fn, warmup=25, rep=100, quantiles=None):
        seen.append(quantiles)
        return [4.0]

    def plain(fn, warmup=25, rep=100):
        seen.append("plain")
        return 6.0

    for fake, want in ((quantiles_only, 4e-3), (plain, 6e-3)):
        monkeypatch.setattr(triton.testing, "do_bench", fake)
        assert measure.cuda_time(lambda: None, torch.device("cuda")) == pytest.approx(want)
    assert seen == [[0.5], "plain"]


def test_the_timer_refuses_the_interpreter(monkeypatch):
    bench = FakeBench()
    monkeypatch.setattr(triton.testing, "do_bench", bench)
    with pytest.raises(measure.NoDeviceError):
        measure.bench_times(lambda: None, torch.device("cpu"))
    assert bench.calls == []


def _tune_key(path, dtype):
    s = space()
    tune(bowl, s, trials=5, study=TuningCache(path).study(KEY._replace(dtype=dtype), s))


def test_concurrent_tuners_share_one_journal(tmp_path):
    import multiprocessing

    path = tmp_path / "t.json"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_tune_key, args=(path, dtype)) for dtype in ("bfloat16", "float16")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    for dtype in ("bfloat16", "float16"):
        study = journal_study(journal_path(path), study_name(KEY._replace(dtype=dtype), space()))
        assert len([t for t in study.trials if "status" in t.user_attrs]) == 5


def test_cli_tune_help_tells_the_timer_the_journal_and_fresh(capsys):
    from test_autotune import tune_parser

    with pytest.raises(SystemExit):
        tune_parser().parse_args(["tune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "triton.testing.do_bench" in text and "tuning.journal" in text and "optuna-dashboard" in text
    assert "--fresh" in text and "resumes its study" in text
