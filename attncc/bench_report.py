"""Benchmark results as a document: the environment they were measured in, merging the
documents of several runs, a rich table, a progress bar, and the TFLOP/s-against-N plot.

A results document (what `attncc.bench.run_benchmark` returns and writes as JSON):

    {"schema": "attncc-bench/1", "timings_meaningful": bool, "note": str,
     "metadata": {date, gpu, driver, cuda, torch, triton, python, platform, attncc,
                  attncc_commit, attncc_dirty, device, dtype, warmup, reps, ...},
     "variants": {key: {"spec", "mode", "date", "shapes", "params",
                        "compile": {"dsl_to_triton_ms", "first_call_ms", "call_overhead_ms"},
                        "results": [{"shape": {dim: size}, "params": {name: value}, "date",
                                     "flops": {"fa", "fa_causal_halved", "timed", "effective"},
                                     "tile_work": {"block_m", "block_n", "visited", "dense", ...},
                                     "competitors": {name: {"status": "ok", "ms", "reps",
                                         "first_call_ms", "wall_ms", "peak_mem_bytes", "tflops",
                                         "max_abs_err", ...} or {"status": "skipped"|"error",
                                         "reason"}},
                                     "speedup": {competitor: its ms / attncc's ms}}]}}}

A variant's key is its name for the forward (mode "fwd") and `name/fwd_bwd` or `name/bwd`
for the training modes (`attncc.bench_train.Mode`), whose competitors also have "fwd_ms"
(recording the graph), "fwd_bwd_ms", "bwd_ms" (their difference), "fwd_first_call_ms" and
"grad_max_abs_err" ({input: error}, None where the reference was not differentiated), `ms`
being the mode's own timing; attncc's also "backward" ('triton' or 'reference') and
"backward_reason". Their results also have "speedup_by_phase" ({"fwd"|"bwd"|"fwd_bwd":
{competitor: ratio}}) and "grad_reference" ({"status": "ok", "max_abs": {input: the
reference gradient's largest magnitude}} or {"status": "skipped", "reason"}).
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import subprocess
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__

SCHEMA = "attncc-bench/1"
SMOKE_NOTE = ("SMOKE RUN without a GPU: kernels ran in Triton's CPU interpreter and PyTorch on the CPU; "
              "the timings, TFLOP/s and speed-ups mean NOTHING. Only the errors and the file's structure do.")


# ----------------------------------------------------------------------------- environment

def environment(device: torch.device) -> dict:
    """Versions and hardware, so that runs can be compared."""
    commit, dirty = _commit()
    meta = {"date": utc_now(),
            "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "triton": _version("triton"), "cuda": torch.version.cuda,
            "attncc": __version__, "attncc_commit": commit, "attncc_dirty": dirty,
            "device": str(device), "gpu": None, "driver": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    gpu_memory_bytes=props.total_memory, driver=_nvidia_smi("driver_version"))
    else:
        meta["cpu"] = platform.processor() or platform.machine()
    return meta


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _version(package: str) -> str | None:
    """Without importing it (importing triton first would upset the CPU interpreter)."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _nvidia_smi(field: str) -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def _commit() -> tuple[str | None, bool | None]:
    """attncc's git commit and whether tracked files differ from it; `ATTNCC_COMMIT` names
    the commit where the tree was copied without its .git (as onto a GPU machine)."""
    if os.environ.get("ATTNCC_COMMIT"):
        return os.environ["ATTNCC_COMMIT"], None
    root = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return head, bool(status.strip())


# ----------------------------------------------------------------------------- documents

def document(variants: dict, metadata: dict, meaningful: bool) -> dict:
    return {"schema": SCHEMA, "timings_meaningful": meaningful,
            "note": ("timings measured in one run on one device" if meaningful else SMOKE_NOTE),
            "metadata": metadata, "variants": variants}


def load(source: str | Path | dict) -> dict:
    return source if isinstance(source, dict) else json.loads(Path(source).read_text())


def merge(sources: list) -> dict:
    """One document from several runs' (e.g. one per variant or per shape, to fit a time
    limit): the first run's metadata, every variant, the results of a variant measured in
    several runs one after the other (each result keeps its `date`, each variant the compile
    times of its first run). Runs on different GPUs are not merged."""
    docs = [load(s) for s in sources]
    gpus = {d["metadata"].get("gpu") for d in docs}
    if len(gpus) > 1:
        raise ValueError(f"results from different devices cannot be merged: {sorted(map(str, gpus))}")
    variants = {}
    for d in docs:
        for key, variant in d["variants"].items():
            if key in variants:
                first = variants[key]
                variants[key] = {**first, "shapes": first["shapes"] + variant["shapes"],
                                 "results": first["results"] + variant["results"]}
            else:
                variants[key] = variant
    return document(variants, docs[0]["metadata"], all(d["timings_meaningful"] for d in docs))


def write_json(doc: dict, path: str | Path) -> Path:
    """Write atomically (a run cut short leaves the previous complete file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def results_stem(doc: dict) -> str:
    """`<gpu>_<date>`, e.g. `nvidia-h100-80gb-hbm3_20260601-1412`."""
    meta = doc["metadata"]
    device = meta.get("gpu") or ("cpu-smoke" if not doc["timings_meaningful"] else meta["device"])
    date = re.sub(r"[^0-9T]", "", meta["date"])[:13].replace("T", "-")
    return f"{re.sub(r'[^a-z0-9]+', '-', device.lower()).strip('-')}_{date}"


def finite(x: float) -> float | str:
    """A number JSON can hold: nan and inf become strings rather than invalid JSON."""
    return x if math.isfinite(x) else str(x)


# ----------------------------------------------------------------------------- terminal

def progress_bar(console: Console | None = None) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


def progress_callback(bar: Progress, title: str):
    """A `run_benchmark(progress=...)` callback driving one task of the bar."""
    task = bar.add_task(title, total=None)

    def update(label: str, done: int, total: int):
        bar.update(task, description=f"{title} {label}", completed=done, total=total)
    return update


def shape_label(shape: dict) -> str:
    """`B=16 H=16 N=1024 D=64`: M and E left out where they equal N and D."""
    same = {"M": "N", "E": "D"}
    return " ".join(f"{k}={v}" for k, v in shape.items() if not (k in same and shape.get(same[k]) == v))


def _number(x, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else ("-" if x is None else str(x))


def _training(variant: dict) -> bool:
    return variant.get("mode", "fwd") != "fwd"


def _table(doc: dict, title: str, columns: tuple[str, ...]) -> Table:
    smoke = "" if doc["timings_meaningful"] else "  [bold red](smoke: timings mean nothing)[/]"
    table = Table(title=title + smoke, title_justify="left", box=box.SIMPLE_HEAD)
    for column in columns:
        table.add_column(column, justify="left" if column in ("variant", "shape", "competitor", "backward")
                         else "right", no_wrap=True)
    return table


def results_table(doc: dict) -> Table:
    """One row per forward variant, shape and competitor that ran; `attncc x` is how many
    times faster attncc is than that competitor."""
    table = _table(doc, "attncc benchmark: forward", ("variant", "shape", "competitor", "ms", "TFLOP/s",
                                                      "eff TFLOP/s", "mem MiB", "max err", "attncc x"))
    for name, variant in doc["variants"].items():
        if _training(variant):
            continue
        for result in variant["results"]:
            for comp, r in result["competitors"].items():
                if r["status"] != "ok":
                    continue
                mem = r["peak_mem_bytes"] / 2 ** 20 if r["peak_mem_bytes"] is not None else None
                speedup = result["speedup"].get(comp)
                table.add_row(name, shape_label(result["shape"]), comp, _number(r["ms"], ".3f"),
                              _number(r.get("tflops"), ".1f"), _number(r.get("effective_tflops"), ".1f"),
                              _number(mem, ".0f"), _number(r["max_abs_err"], ".1e"),
                              _number(speedup, ".2f"))
        table.add_section()
    return table


def training_table(doc: dict) -> Table:
    """One row per training variant, shape and competitor that ran: forward (recording the
    graph), backward and both; `grad err`: the largest gradient error over the inputs, each
    relative to the reference gradient's largest magnitude; `x bwd` and `x f+b`: how many
    times faster attncc is; `backward`: what ran attncc's backward."""
    table = _table(doc, "attncc benchmark: forward + backward",
                   ("variant", "shape", "competitor", "fwd ms", "bwd ms", "f+b ms", "bwd TFLOP/s", "mem MiB",
                    "max err", "grad err", "x bwd", "x f+b", "backward"))
    for name, variant in doc["variants"].items():
        if not _training(variant):
            continue
        for result in variant["results"]:
            phases = result.get("speedup_by_phase", {})
            scale = result.get("grad_reference", {}).get("max_abs")
            for comp, r in result["competitors"].items():
                if r["status"] != "ok":
                    continue
                mem = r["peak_mem_bytes"] / 2 ** 20 if r["peak_mem_bytes"] is not None else None
                fa = (result["flops"] or {}).get("fa")
                bwd_tflops = fa * 2.5 / r["bwd_ms"] / 1e9 if fa and r["bwd_ms"] > 0 else None
                table.add_row(name, shape_label(result["shape"]), comp, _number(r["fwd_ms"], ".3f"),
                              _number(r["bwd_ms"], ".3f"), _number(r["fwd_bwd_ms"], ".3f"),
                              _number(bwd_tflops, ".1f"), _number(mem, ".0f"), _number(r["max_abs_err"], ".1e"),
                              _number(_relative_grad_error(r.get("grad_max_abs_err"), scale), ".1e"),
                              _number(phases.get("bwd", {}).get(comp), ".2f"),
                              _number(phases.get("fwd_bwd", {}).get(comp), ".2f"),
                              _backward(r) if comp == "attncc" else "")
        table.add_section()
    return table


def _relative_grad_error(errors: dict | None, scale: dict | None) -> float | None:
    if not errors or not scale:
        return None
    ratios = [e / max(scale[n], 1e-30) for n, e in errors.items()
              if isinstance(e, float) and isinstance(scale.get(n), float)]
    return max(ratios) if ratios else None


def _backward(r: dict) -> str:
    """attncc's backward: `triton`, or `reference` with the start of the reason."""
    if r.get("backward") != "reference" or not r.get("backward_reason"):
        return str(r.get("backward"))
    reason = r["backward_reason"]
    return f"reference ({reason[:60]}{'...' if len(reason) > 60 else ''})"


def not_run(doc: dict) -> list[str]:
    """`competitors skipped for variants: reason`, one line per distinct reason."""
    groups: dict[tuple[str, str], tuple[dict, dict]] = {}
    for name, variant in doc["variants"].items():
        for result in variant["results"]:
            for comp, r in result["competitors"].items():
                if r["status"] != "ok":
                    comps, variants = groups.setdefault((r["status"], r["reason"]), ({}, {}))
                    comps[comp] = variants[name] = None
    return [f"{', '.join(comps)} {status} for {', '.join(variants)}: {reason}"
            for (status, reason), (comps, variants) in groups.items()]


def compile_table(doc: dict) -> Table:
    table = Table(title="compile times (ms)", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("variant", "spec -> Triton source", "first call (JIT included)", "per-call overhead"):
        table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=True)
    for name, variant in doc["variants"].items():
        c = variant["compile"]
        keys = ("dsl_to_triton_ms", "first_call_ms", "call_overhead_ms")
        table.add_row(name, *(_number(c[k], ".2f") for k in keys))
    return table


def print_summary(doc: dict, console: Console):
    """The results tables (forward, forward + backward), the compile times, what did not run
    and why, and (smoke runs) the warning that the timings mean nothing."""
    modes = {_training(v) for v in doc["variants"].values()}
    if False in modes:
        console.print(results_table(doc))
    if True in modes:
        console.print(training_table(doc))
    console.print(compile_table(doc))
    for line in not_run(doc):
        console.print(f"[dim]{escape(line)}[/]", soft_wrap=True)
    if not doc["timings_meaningful"]:
        console.print(f"\n[bold red]{SMOKE_NOTE}[/]")


# ----------------------------------------------------------------------------- plot

def plot_results(result: str | Path | dict, png_path: str | Path) -> Path:
    """TFLOP/s (FlashAttention's count) against N: one panel per variant and head dim,
    one line per competitor."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    doc = load(result)
    panels = []
    for name, variant in doc["variants"].items():
        for d in sorted({r["shape"].get("D") for r in variant["results"]}, key=str):
            panels.append((name, d, [r for r in variant["results"] if r["shape"].get("D") == d]))
    everyone = dict.fromkeys(c for v in doc["variants"].values() for r in v["results"] for c in r["competitors"])
    colour = {c: f"C{k % 10}" for k, c in enumerate(everyone)}  # one colour per competitor in every panel
    cols = min(3, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    fig = Figure(figsize=(5.2 * cols, 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, d, results) in zip(axes, panels):
        competitors = dict.fromkeys(c for r in results for c in r["competitors"])
        for comp in competitors:
            points = sorted((r["shape"]["N"], r["competitors"][comp]["tflops"]) for r in results
                            if r["competitors"].get(comp, {}).get("tflops") is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=comp, color=colour[comp],
                        linewidth=2.5 if comp == "attncc" else 1.2)
        ns = sorted({r["shape"]["N"] for r in results})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_title(name if d is None else f"{name}, D={d}")
        ax.set_xlabel("N (sequence length)")
        ax.set_ylabel("TFLOP/s")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    meta = doc["metadata"]
    fig.suptitle(f"{meta.get('gpu') or meta['device']}, {meta.get('dtype', '')}, torch {meta['torch']}"
                 + ("" if doc["timings_meaningful"] else "  --  SMOKE RUN: timings mean nothing"))
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    return png_path
