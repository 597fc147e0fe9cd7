"""The benchmark harness on the CPU: smoke runs produce complete, valid documents marked
meaningless; every competitor definition (FlexAttention mods, eager composition, SDPA)
computes what the spec computes; the report, plot, CLI and suite work end to end.
Timings are never checked: on a CPU they mean nothing."""
import argparse
import importlib.util
import io
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from rich.console import Console

import attncc
from attncc import cli_bench
from attncc.bench import SMOKE_SHAPES, run_benchmark, token_sweep
from attncc.bench_competitors import Skip, build, expand
from attncc.bench_mods import FORMULATIONS
from attncc.bench_report import merge, not_run, plot_results, print_summary, results_table
from attncc.bench_train import REFERENCE_GRAD_PAIRS, gradients, learnable, leaves, reference_gradient_note
from attncc.binding import bind
from attncc.random_inputs import random_arguments

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SOFTMAX_FAMILY = sorted(FORMULATIONS)
# Small shapes where every mask is partial: windows shorter than N, grids, a small cap.
SMALL = {"sliding_window": {"window": 8}, "sink_window": {"window": 8, "sinks": 3}, "softcap": {"cap": 1.5},
         "neighborhood_2d": {"height": 4, "width": 8, "kernel": 3}, "criss_cross": {"height": 4, "width": 8},
         "epipolar": {"views": 2, "height": 4, "width": 4}}
CROSS = {"dense", "causal", "gqa_causal", "alibi", "softcap", "relative_bias", "key_padding", "label_table",
         "learned_sinks"}


def smoke(name, **kw):
    return run_benchmark(EXAMPLES / f"{name}.attn", SMOKE_SHAPES, dtype="float32", device="cpu", warmup=2,
                         reps=3, **kw)


@pytest.mark.parametrize("name", ["causal", "document"])
def test_smoke_run_document(name):
    doc = json.loads(json.dumps(smoke(name), allow_nan=False))
    assert doc["schema"] == "attncc-bench/1" and doc["timings_meaningful"] is False
    assert "NOTHING" in doc["note"]
    assert {"date", "gpu", "driver", "torch", "triton", "python", "attncc_commit", "dtype"} <= set(doc["metadata"])
    variant = doc["variants"][name]
    assert set(variant) == {"spec", "mode", "date", "shapes", "params", "compile", "results"}
    assert variant["mode"] == "fwd"
    assert variant["compile"]["dsl_to_triton_ms"] > 0 and variant["compile"]["first_call_ms"] > 0
    (result,) = variant["results"]
    assert set(result) == {"shape", "params", "date", "flops", "tile_work", "competitors", "speedup"}
    s = result["shape"]
    assert result["flops"]["fa"] == s["B"] * s["H"] * s["N"] * s["M"] * (s["D"] + s["E"])  # causal: halved
    work = result["tile_work"]
    assert 0 < work["visited"] < work["dense"]  # both masks skip tiles above the diagonal
    assert result["flops"]["effective"] == work["visited"] * 16 * 16 * 2 * (s["D"] + s["E"])
    comps = result["competitors"]
    assert list(comps) == expand(["attncc", "sdpa", "flex", "eager", "compiled"])
    for c in ("attncc", "flex", "eager"):
        assert comps[c]["status"] == "ok" and comps[c]["max_abs_err"] < 1e-5, comps[c]
        assert comps[c]["ms"] > 0 and comps[c]["tflops"] > 0
        assert comps[c]["peak_mem_bytes"] is None  # only measured on CUDA
    assert comps["attncc"]["effective_tflops"] > 0
    assert comps["compiled"] == {"status": "skipped", "reason": "torch.compile is not run in smoke mode"}
    assert set(result["speedup"]) == {c for c, r in comps.items() if r["status"] == "ok"} - {"attncc"}
    sdpa = [comps[f"sdpa:{b}"] for b in ("flash", "efficient", "cudnn", "math")]
    if name == "causal":
        assert sdpa[-1]["status"] == "ok" and sdpa[-1]["max_abs_err"] < 1e-5
    else:
        assert all(r["status"] == "skipped" and "dense and causal" in r["reason"] for r in sdpa)


def _call(name, dtype=torch.float32):
    program = attncc.load(EXAMPLES / f"{name}.attn")
    shape = {"B": 2, "H": 4, "N": 32, "D": 16, "E": 8, **({"M": 40} if name in CROSS else {})}
    if name == "relative_bias":
        shape["W"] = 11
    args = random_arguments(program, shape, SMALL.get(name), dtype=dtype, seed=1)
    return program, args, bind(program, args).scalars


@pytest.mark.parametrize("name", SOFTMAX_FAMILY)
def test_competitors_compute_the_spec(name):
    """Eager FlexAttention with the registry's mods, the eager composition and (where SDPA
    expresses the variant) SDPA's math backend, against attncc's reference."""
    program, args, scalars = _call(name)
    want = attncc.compile(EXAMPLES / f"{name}.attn", backend="reference")(**args)
    form = FORMULATIONS[name]
    mods = form.build(args, scalars)
    if mods.mask_mod is not None:  # the check means something only if the mask is partial
        grids = [torch.arange(n).view([-1 if d == a else 1 for d in range(4)])
                 for a, n in enumerate((2, 4, scalars["N"], scalars["M"]))]
        assert 0 < mods.mask_mod(*grids).float().mean() < 1
    competitors = ["flex", "eager"] + (["sdpa:math"] if form.sdpa else [])
    for competitor in competitors:
        got = build(competitor, args, scalars, form, compile=False)()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{competitor} differs")


def test_unknown_specs_and_competitors():
    with pytest.raises(Skip, match="no PyTorch formulation"):
        build("flex", {}, {}, None, compile=False)
    _, args, scalars = _call("alibi")
    with pytest.raises(Skip, match="dense and causal"):
        build("sdpa:flash", args, scalars, FORMULATIONS["alibi"], compile=False)
    with pytest.raises(ValueError, match="unknown competitor 'triton'"):
        expand(["triton"])
    assert expand(["eager", "sdpa:math", "attncc"]) == ["attncc", "eager", "sdpa:math"]


def test_token_sweep_keeps_tokens_constant():
    shapes = token_sweep()
    assert [s["N"] for s in shapes] == [1024, 2048, 4096, 8192, 16384]
    assert all(s["B"] * s["N"] == 16384 and s["M"] == s["N"] and s["H"] == 16 and s["D"] == 128 for s in shapes)


def _synthetic(variant, gpu="NVIDIA H100 80GB HBM3"):
    """A document as a GPU run writes it, with made-up numbers."""
    results = []
    for d in (64, 128):
        for n in (1024, 2048, 4096):
            comps = {"attncc": {"status": "ok", "ms": n / 1e3, "tflops": 300.0 + d, "effective_tflops": 350.0,
                                "peak_mem_bytes": 2 ** 20, "max_abs_err": 1e-3},
                     "flex": {"status": "ok", "ms": n / 8e2, "tflops": 250.0, "peak_mem_bytes": 2 ** 21,
                              "max_abs_err": 2e-3},
                     "sdpa:flash": {"status": "skipped", "reason": "expresses dense and causal masks only"}}
            results.append({"shape": {"B": 16384 // n, "H": 16, "N": n, "M": n, "D": d, "E": d}, "params": {},
                            "competitors": comps, "speedup": {"flex": 1.25}})
    meta = {"date": "2026-06-01T12:00:00+00:00", "gpu": gpu, "device": "cuda:0", "torch": "2.11.0",
            "dtype": "bfloat16"}
    variant_entry = {"compile": {"dsl_to_triton_ms": 20.0, "first_call_ms": 900.0, "call_overhead_ms": 0.04},
                     "shapes": [r["shape"] for r in results], "results": results}
    return {"schema": "attncc-bench/1", "timings_meaningful": True, "note": "", "metadata": meta,
            "variants": {variant: variant_entry}}


def test_plot_writes_a_png(tmp_path):
    doc = merge([_synthetic("causal"), _synthetic("document")])
    path = plot_results(doc, tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json_path = tmp_path / "r.json"
    json_path.write_text(json.dumps(doc))
    assert plot_results(json_path, tmp_path / "again.png").stat().st_size > 10_000


def test_merge_table_and_skip_reasons():
    doc = merge([_synthetic("causal"), _synthetic("document")])
    assert list(doc["variants"]) == ["causal", "document"] and doc["timings_meaningful"]
    console = Console(file=io.StringIO(), width=200)
    console.print(results_table(doc))
    text = console.file.getvalue()
    assert "document" in text and "1.25" in text and "sdpa:flash" not in text  # skipped: not a row
    assert not_run(doc) == ["sdpa:flash skipped for causal, document: expresses dense and causal masks only"]
    with pytest.raises(ValueError, match="different devices"):
        merge([_synthetic("causal"), _synthetic("document", gpu="NVIDIA A100")])


def test_cli_bench_smoke(tmp_path):
    parser = argparse.ArgumentParser(prog="attncc")
    cli_bench.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "bench.json"
    args = parser.parse_args(["bench", "causal", "--shape", "B=1,H=2,N=32,M=32,D=16,E=16", "--dtype", "float32",
                              "--competitors", "attncc,eager", "--warmup", "2", "--reps", "3", "--json", str(out),
                              "--plot", str(tmp_path / "bench.png")])
    console = Console(file=io.StringIO(), width=200)
    assert args.run(args, console) == 0
    text = console.file.getvalue()
    assert "timings mean nothing" in text and "compile times" in text and "eager" in text
    doc = json.loads(out.read_text())
    assert list(doc["variants"]["causal"]["results"][0]["competitors"]) == ["attncc", "eager"]
    assert (tmp_path / "bench.png").exists()
    help_text = cli_bench.add_parser(argparse.ArgumentParser().add_subparsers()).format_help()
    assert "examples:" in help_text and "--shape" in help_text and "height=" in help_text
    assert "--mode" in help_text and "fwd_bwd" in help_text


def _suite():
    spec = importlib.util.spec_from_file_location("run_suite", ROOT / "benchmarks" / "run_suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    return suite


def test_suite_smoke(tmp_path):
    suite = _suite()
    shapes = suite.shapes("neighborhood_2d", (1024, 2048), (64,), 16384, 16)
    assert [(s["height"], s["width"]) for s in shapes] == [(32, 32), (32, 64)]
    (epipolar,) = suite.shapes("epipolar", (4096,), (128,), 16384, 16)
    assert (epipolar["views"], epipolar["height"], epipolar["width"]) == (4, 32, 32)
    program = attncc.load(EXAMPLES / "document.attn")
    doc = suite.packed_documents(program, {"B": 2, "N": 64, "M": 64}, {}, torch.float32, "cpu", 0)["doc"]
    assert (doc[:, -1] == suite.DOCUMENTS - 1).all() and (doc.diff(dim=-1) >= 0).all()
    out = tmp_path / "suite.json"
    assert suite.main(["--smoke", "--variants", "document", "--competitors", "attncc,flex", "--reps", "3",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())["variants"]["document"]["results"][0]
    assert result["competitors"]["flex"]["max_abs_err"] < 0.05  # bfloat16
    assert out.with_suffix(".png").exists()


def test_specs_without_flex_formulation_get_their_own_torch_composition():
    """differential has no FlexAttention form: its eager competitor is the spec's own cascade of
    torch ops, fully materialised, and it computes the same thing as the reference."""
    from oracles.inputs import make_inputs

    kernel = attncc.compile("examples/differential.attn", backend="reference")
    args = make_inputs("differential", B=1, H=2, N=20, dtype=torch.float32)
    scalars = bind(kernel.program, args).scalars
    eager = build("eager", args, scalars, None, False, kernel.program)
    torch.testing.assert_close(eager(), kernel(**args))
    with pytest.raises(Skip):
        build("flex", args, scalars, None, False, kernel.program)


# ----------------------------------------------------------------------------- training modes

def test_fwd_bwd_smoke_run_records_gradients_and_backward(tmp_path):
    """The suite's fwd_bwd smoke run on ALiBi with learnable slopes: every field the GPU
    session's JSON is read by, errors against the float32 reference's gradients, which
    backward ran; written after the shape, and --append keeps it when a second run adds to it."""
    suite = _suite()
    out = tmp_path / "train.json"
    assert suite.main(["--smoke", "--mode", "fwd_bwd", "--variants", "alibi", "--competitors", "attncc,eager,flex,sdpa",
                       "--dtype", "float32", "--warmup", "2", "--reps", "1", "--no-plot", "--out", str(out)]) == 0
    assert not out.with_suffix(".png").exists()
    doc = json.loads(out.read_text())
    variant = doc["variants"]["alibi/fwd_bwd"]
    assert variant["mode"] == "fwd_bwd" and not doc["timings_meaningful"]
    (result,) = variant["results"]
    assert result["flops"]["timed"] == 3.5 * result["flops"]["fa"]
    assert result["grad_reference"]["status"] == "ok"
    assert set(result["grad_reference"]["max_abs"]) == {"q", "k", "v", "slopes"}
    comps = result["competitors"]
    for name in ("attncc", "eager"):
        r = comps[name]
        assert r["status"] == "ok", r
        assert r["ms"] == r["fwd_bwd_ms"] and r["bwd_ms"] == pytest.approx(r["fwd_bwd_ms"] - r["fwd_ms"])
        assert r["max_abs_err"] < 1e-5 and set(r["grad_max_abs_err"]) == {"q", "k", "v", "slopes"}
        scale = result["grad_reference"]["max_abs"]  # the slopes' gradient sums over every pair: tens
        assert all(e < 1e-4 * max(1.0, scale[n]) for n, e in r["grad_max_abs_err"].items()), r["grad_max_abs_err"]
    assert comps["attncc"]["backward"] == "triton" and comps["attncc"]["backward_reason"] is None
    assert comps["flex"] == {"status": "skipped", "reason": "FlexAttention has no backward on the CPU"}
    assert all(comps[f"sdpa:{b}"]["status"] == "skipped" for b in ("flash", "efficient", "cudnn", "math"))
    assert set(result["speedup_by_phase"]) == {"fwd", "bwd", "fwd_bwd"}
    assert set(result["speedup_by_phase"]["fwd"]) == {"eager"}
    assert suite.main(["--smoke", "--variants", "dense", "--competitors", "eager", "--dtype", "float32",
                       "--warmup", "2", "--reps", "1", "--no-plot", "--append", "--out", str(out)]) == 0
    assert list(json.loads(out.read_text())["variants"]) == ["alibi/fwd_bwd", "dense"]


def test_bwd_mode_reports_the_backward():
    doc = run_benchmark(EXAMPLES / "learned_sinks.attn", SMOKE_SHAPES, dtype="float32", device="cpu", warmup=2,
                        reps=1, competitors=["eager"], mode="bwd")
    (result,) = doc["variants"]["learned_sinks/bwd"]["results"]
    r = result["competitors"]["eager"]
    assert r["ms"] == r["bwd_ms"] and set(r["grad_max_abs_err"]) == {"q", "k", "v", "sinks"}
    assert max(r["grad_max_abs_err"].values()) < 1e-4
    assert result["flops"]["timed"] == 2.5 * result["flops"]["fa"]
    assert result["tile_work"]["block_m"] == 16  # learned_sinks: a fused plan, which counts its tiles


def test_general_plans_are_benchmarked_without_a_tile_count():
    doc = run_benchmark(EXAMPLES / "class_redistribute.attn", SMOKE_SHAPES[:1], dtype="float32", device="cpu",
                        warmup=1, reps=1, competitors=["attncc"])
    (variant,) = doc["variants"].values()
    (result,) = variant["results"]
    assert result["competitors"]["attncc"]["status"] == "ok"
    assert result["tile_work"] is None  # the general planner's kernels count no tiles


@pytest.mark.parametrize("name", SOFTMAX_FAMILY)
def test_eager_gradients_match_the_reference(name):
    """What the training mode differentiates: the eager composition's mods (which the
    FlexAttention competitor shares) give the reference's gradients of q, k, v and every
    learnable input (slopes, table, sinks)."""
    program, args, scalars = _call(name)
    args = learnable(args)
    grad_out = torch.randn(args["q"].shape[:-1] + args["v"].shape[-1:])
    reference = attncc.compile(EXAMPLES / f"{name}.attn", backend="reference")
    ref_args = learnable(args)
    want = gradients(reference(**ref_args), leaves(ref_args), grad_out)
    got = gradients(build("eager", args, scalars, FORMULATIONS[name], compile=False)(), leaves(args), grad_out)
    assert set(got) == set(want) >= {"q", "k", "v"}
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-4, rtol=1e-4, msg=f"d{n} differs")


def test_reference_gradients_have_a_size_limit():
    assert reference_gradient_note(REFERENCE_GRAD_PAIRS) is None
    assert "not differentiated" in reference_gradient_note(REFERENCE_GRAD_PAIRS + 1)


def _synthetic_training(variant):
    doc = _synthetic(variant)
    entry = doc["variants"].pop(variant)
    for result in entry["results"]:
        for name, r in result["competitors"].items():
            if r["status"] == "ok":
                r.update(fwd_ms=r["ms"] / 3, bwd_ms=2 * r["ms"] / 3, fwd_bwd_ms=r["ms"],
                         grad_max_abs_err={"q": 1e-3, "slopes": 0.5})
        result["competitors"]["attncc"].update(backward="reference", backward_reason="no generated backward yet")
        result["flops"] = {"fa": 10 ** 12}
        result["speedup_by_phase"] = {"fwd": {"flex": 1.1}, "bwd": {"flex": 1.37}, "fwd_bwd": {"flex": 1.25}}
        result["grad_reference"] = {"status": "ok", "max_abs": {"q": 1.0, "slopes": 100.0}}
    doc["variants"][f"{variant}/fwd_bwd"] = {**entry, "mode": "fwd_bwd"}
    return doc


def test_merge_concatenates_a_variant_measured_in_parts_and_prints_both_tables():
    doc = merge([_synthetic("causal"), _synthetic_training("alibi"), _synthetic_training("alibi")])
    assert list(doc["variants"]) == ["causal", "alibi/fwd_bwd"]
    assert len(doc["variants"]["alibi/fwd_bwd"]["results"]) == 12
    console = Console(file=io.StringIO(), width=250)
    print_summary(doc, console)
    text = console.file.getvalue()
    assert "forward + backward" in text and "attncc benchmark: forward" in text
    assert "1.37" in text and "5.0e-03" in text  # attncc x flex on the backward; grad err relative: 0.5 / 100
    assert "reference (no generated backward yet)" in text


def test_gpu_session_command_lines(tmp_path):
    """benchmarks/gpu_session.sh with a stand-in python that records its arguments: the
    script parses, every suite command it would run on the GPU is a valid run_suite command
    line, the issue-10 training set comes first and everything lands under $OUT."""
    script = ROOT / "benchmarks" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    log = tmp_path / "argv.txt"
    fake = tmp_path / "python"
    # one write per call (the static reports run 3 at a time in the background: separate
    # writes of one call's fields would interleave with theirs)
    fake.write_text(f'#!/bin/sh\nline=$(printf "%s\\t" "$@")\necho "$line" >> {log}\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.json").write_text("{}")  # as if a part had written it: the summary collates it
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(out), "GPU_SESSION_BUDGET_S": "100000"}
    done = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = [line.rstrip("\t").split("\t") for line in log.read_text().splitlines()]
    runs = [c[1:] for c in calls if c[0] == "benchmarks/run_suite.py" and "--merge" not in c]
    suite = _suite()
    for argv in runs:
        args = suite.parser().parse_args(argv)
        assert suite.problem(args) is None and args.append and args.no_plot, argv
        assert Path(args.out).parent == out
    first = [suite.parser().parse_args(argv) for argv in runs[:5]]  # the headline: a part per variant
    assert {(a.mode, a.head_dims, a.n) for a in first} == {("fwd_bwd", "128", "4096")}
    assert [v for a in first for v in suite.chosen_variants(a)] == suite.TRAINING
    assert suite.TRAINING == ["causal", "alibi", "relative_bias", "document", "learned_sinks"]
    shapes = {(a.mode, a.head_dims, a.n) for a in map(suite.parser().parse_args, runs)}
    assert shapes == {(m, d, n) for m in ("fwd", "fwd_bwd") for d in ("64", "128") for n in ("1024", "4096", "16384")}
    statics = [c for c in calls if c[0] == "benchmarks/static_resources.py"]
    assert len(statics) == len(list(EXAMPLES.glob("*.attn")))
    (merge_call,) = [c for c in calls if "--merge" in c]
    assert merge_call[merge_call.index("--merge") + 1] == str(out / "train.json")
