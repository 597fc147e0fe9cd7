"""The search: an optuna TPE study over a `Space`, measuring each config with an objective.

`objective(config) -> seconds` is one timed repetition (`measure.launch_objective`
on a GPU, any deterministic function in tests). A config gets one repetition first;
if that is over `prune_ratio` times the best median so far the rest are skipped
(the trial is pruned), else `repeats` repetitions give its median. An objective that
raises (a config that fails to compile or launch) marks the trial failed with the
reason and the search goes on. The untuned default is measured first, so the result
is never worse than it and the speed-up over it is known.

The study only proposes; a proposal that does not fit the space or was measured
already is handed back to optuna (pruned or failed, so it teaches the sampler
without a measurement) and replaced by an unmeasured config drawn with the seed.
So every budgeted trial measures something new, and the search is deterministic
for a given seed and a deterministic objective.

A study passed in (`study=`, one per tuning key in optuna's journal storage, see
`studies.py`) resumes: its measured trials (those carrying a `status` user attr)
count as measured and join the result, so re-running a tuning measures only
configs it has not measured before.
"""
from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import optuna
from optuna.trial import TrialState

from .space import Space


@dataclass
class Trial:
    config: dict
    time: float | None   # median seconds; for a pruned trial its first repetition
    status: str          # "ok", "pruned" (slow first repetition) or "failed" (objective raised)
    reason: str | None = None
    resumed: bool = False  # measured by an earlier run of the same study


@dataclass
class TuneResult:
    trials: list[Trial] = field(default_factory=list)
    default: dict | None = None  # the untuned config of the space
    elapsed_s: float = 0.0

    def top(self, n: int | None = None) -> list[Trial]:
        """The measured trials, fastest first."""
        return sorted((t for t in self.trials if t.status == "ok"), key=lambda t: t.time)[:n]

    @property
    def measured_now(self) -> int:
        """Trials this run measured (the rest came from the study it resumed)."""
        return sum(not t.resumed for t in self.trials)

    @property
    def best(self) -> Trial | None:
        return next(iter(self.top(1)), None)

    @property
    def best_config(self) -> dict | None:
        return self.best and self.best.config

    @property
    def best_time(self) -> float | None:
        return self.best and self.best.time

    @property
    def default_time(self) -> float | None:
        return next((t.time for t in self.trials if t.config == self.default and t.status == "ok"), None)

    @property
    def speedup(self) -> float | None:
        """How many times faster the best config runs than the default."""
        return self.default_time / self.best_time if self.default_time and self.best_time else None

    def cache_entry(self, n_top: int = 5) -> dict:
        """What the tuning cache keeps of this result."""
        return {"config": self.best_config, "time_s": self.best_time, "default_time_s": self.default_time,
                "top": [{"config": t.config, "time_s": t.time} for t in self.top(n_top)],
                "trials": len(self.trials)}


def tune(objective: Callable[[dict], float], space: Space, trials: int | None = None,
         timeout_s: float | None = None, seed: int = 0,
         progress: Callable[[Trial, TuneResult], None] | None = None,
         repeats: int = 3, prune_ratio: float = 3.0, study: optuna.Study | None = None) -> TuneResult:
    """Search `space` for the config with the lowest `objective`, within `trials`
    newly measured configs and `timeout_s` seconds (whichever ends first; with neither,
    every config in the space not measured yet). No new trial starts after the timeout;
    a trial that has started finishes. `progress(trial, result_so_far)` is called after
    each new trial. `study`: an optuna study to resume and record into (default: a new
    one in memory); its sampler is the one that proposes."""
    start = time.monotonic()
    candidates = space.configs()
    result = TuneResult(default=space.default)
    measured: set[tuple] = set()
    draw = random.Random(seed)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        if study is None:
            study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
        for record in recorded_trials(study, space):
            if tuple(record.config.values()) not in measured:
                measured.add(tuple(record.config.values()))
                result.trials.append(record)
        left = [c for c in candidates if tuple(c.values()) not in measured]
        budget = min(trials if trials is not None else len(left), len(left))
        if space.default is not None and space.fits(space.default) and tuple(space.default.values()) not in measured:
            study.enqueue_trial(space.default)
        new = 0
        while new < budget and (timeout_s is None or time.monotonic() - start < timeout_s):
            trial = study.ask()
            config = {name: trial.suggest_categorical(name, options) for name, options in space.choices.items()}
            key = tuple(config.values())
            if key in measured or not space.fits(config):
                # handed back: teaches the sampler, measures nothing (no `status` attr)
                trial.set_user_attr("proposal", "measured already" if key in measured else "does not fit")
                study.tell(trial, state=TrialState.FAIL if key in measured else TrialState.PRUNED)
                study.enqueue_trial(_nearest(config, space, [c for c in candidates if tuple(c.values()) not in measured], draw))
                continue
            measured.add(key)
            record = _measure_into(study, trial, objective, config, result.best_time, repeats, prune_ratio)
            result.trials.append(record)
            new += 1
            result.elapsed_s = time.monotonic() - start
            if progress is not None:
                progress(record, result)
    finally:
        optuna.logging.set_verbosity(verbosity)
    result.elapsed_s = time.monotonic() - start
    return result


def recorded_trials(study: optuna.Study, space: Space) -> list[Trial]:
    """The trials an earlier run measured in `study`, as `Trial`s marked `resumed`:
    finished trials with a `status` user attr, whose params form a config of `space`
    and whose time is a positive finite number (anything else in the storage is left
    out, whoever wrote it)."""
    records = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        status, seconds = t.user_attrs.get("status"), t.user_attrs.get("time_s")
        if status not in ("ok", "pruned", "failed") or set(t.params) != set(space.choices):
            continue
        config = {name: t.params[name] for name in space.choices}
        if not space.fits(config):
            continue
        if status == "failed":
            seconds = None
        elif not (type(seconds) in (int, float) and math.isfinite(seconds) and seconds > 0):
            continue
        reason = t.user_attrs.get("reason")
        records.append(Trial(config, seconds, status, reason if isinstance(reason, str) else None, resumed=True))
    return records


def _measure_into(study, trial, objective, config, best, repeats, prune_ratio) -> Trial:
    """Measure `config` and tell the study; a trial interrupted (Ctrl-C) is told failed,
    so that no trial stays RUNNING in a persistent study."""
    try:
        record = _measure(objective, config, trial, best, repeats, prune_ratio)
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    trial.set_user_attr("status", record.status)
    trial.set_user_attr("time_s", record.time)
    if record.reason:
        trial.set_user_attr("reason", record.reason)
    # a failed config is PRUNED too, not FAIL: FAIL is what handed-back proposals get
    study.tell(trial, record.time if record.status == "ok" else None,
               state=TrialState.COMPLETE if record.status == "ok" else TrialState.PRUNED)
    return record


def _nearest(config: dict, space: Space, options: list[dict], draw: random.Random) -> dict:
    """The option fewest choice steps away from `config` (ties drawn at random): when
    the sampler insists on a measured or oversized config, measure its closest kin."""
    def steps(c):
        return sum(abs(opts.index(c[k]) - opts.index(config[k])) for k, opts in space.choices.items())
    least = min(map(steps, options))
    return draw.choice([c for c in options if steps(c) == least])


def _measure(objective, config: dict, trial: optuna.Trial, best: float | None, repeats: int,
             prune_ratio: float) -> Trial:
    """One repetition, then the rest unless the first is hopeless next to `best`."""
    try:
        first = objective(config)
        trial.report(first, 0)
        if best is not None and first > prune_ratio * best:
            return Trial(config, first, "pruned", f"first repetition took {first / best:.1f}x the best time")
        times = [first] + [objective(config) for _ in range(repeats - 1)]
    except Exception as err:  # noqa: BLE001 - a config that cannot run is a result, not a crash
        return Trial(config, None, "failed", f"{type(err).__name__}: {err}")
    return Trial(config, statistics.median(times), "ok")
