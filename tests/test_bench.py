"""The benchmark harness on the CPU: smoke runs produce complete, valid documents marked
meaningless; every competitor definition (FlexAttention mods, eager composition, SDPA)
computes what the spec computes; the report, plot, CLI and suite work end to end.
Timings are never checked: on a CPU they mean nothing."""
import argparse
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

import attncc
from attncc import cli_bench
from attncc.bench import SMOKE_SHAPES, run_benchmark, token_sweep
from attncc.bench_competitors import Skip, build, expand
from attncc.bench_mods import FORMULATIONS
from attncc.bench_report import merge, not_run, plot_results, results_table
from attncc.binding import bind
from attncc.random_inputs import random_arguments

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SOFTMAX_FAMILY = sorted(FORMULATIONS)
# Small shapes where every mask is partial: windows shorter than N, grids, a small cap.
SMALL = {"sliding_window": {"window": 8}, "sink_window": {"window": 8, "sinks": 3}, "softcap": {"cap": 1.5},
         "neighborhood_2d": {"height": 4, "width": 8, "kernel": 3}, "criss_cross": {"height": 4, "width": 8},
         "epipolar": {"views": 2, "height": 4, "width": 4}}
CROSS = {"dense", "causal", "gqa_causal", "alibi", "softcap", "relative_bias", "key_padding", "label_table"}


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
    assert set(variant) == {"spec", "date", "shapes", "params", "compile", "results"}
    assert variant["compile"]["dsl_to_triton_ms"] > 0 and variant["compile"]["first_call_ms"] > 0
    (result,) = variant["results"]
    assert set(result) == {"shape", "params", "flops", "tile_work", "competitors", "speedup"}
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
                     "results": results}
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


def test_suite_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("run_suite", ROOT / "benchmarks" / "run_suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
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
