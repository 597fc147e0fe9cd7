"""The trial corpus (tests/trials/*.attn): attention variants from the seed papers, written
from the language docs alone, that the general lowering (issue 9) is measured on.

Every spec must run on the reference backend. The triton backend must generate every spec
not listed in REJECTED (with the reason it gives), and its kernels must match a float64
reference in Triton's interpreter (`benchmarks/coverage.py` prints the same as a table).
"""
import os
from pathlib import Path

import pytest
import torch

import attncc
from attncc.random_inputs import random_arguments

TRIALS = Path(__file__).resolve().parent / "trials"
SPECS = sorted(TRIALS.glob("*.attn"))
# Small odd sizes: partial tiles, N != M, D != E. Dims a spec lacks are left out.
SHAPE = {"B": 2, "H": 2, "N": 19, "M": 23, "D": 12, "E": 10}
# An output passes when max |x - ref64| <= RTOL * max |ref64| + ATOL (float32 inputs).
RTOL, ATOL = 1e-4, 1e-6
# specs the triton backend rejects today, and a piece of the reason it must give
REJECTED: dict[str, str] = {}


def _inputs(program, seed=0):
    shape = {k: v for k, v in SHAPE.items() if k in program.dims}
    return random_arguments(program, shape, seed=seed)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def test_corpus_is_there():
    assert len(SPECS) >= 24
    for path in SPECS:
        lines = path.read_text().splitlines()
        assert lines[0].startswith("# "), f"{path.name}: no comment header naming its paper"


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_reference_runs(path):
    kernel = attncc.compile(path, backend="reference")
    assert kernel.name == path.stem
    out = _as_tuple(kernel(**_inputs(kernel.program)))
    assert len(out) == len(kernel.outputs)
    for name, t in zip(kernel.outputs, out):
        assert t.dtype == torch.float32, name
        assert t.numel() > 0 and bool(t.isfinite().all()), f"{path.stem}: output '{name}' is not finite"


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_generated_matches_reference(path):
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("generated kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported")
    if path.stem in REJECTED:
        with pytest.raises(attncc.BackendError, match=REJECTED[path.stem]):
            attncc.compile(path, backend="triton")
        return
    kernel = attncc.compile(path, backend="triton")
    reference = attncc.compile(path, backend="reference")
    kwargs = _inputs(kernel.program)
    with torch.no_grad():
        got = _as_tuple(kernel(**kwargs))
    assert kernel.last_run["backend"] == "triton", kernel.last_run
    want = _as_tuple(reference(**{k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                                  for k, v in kwargs.items()}))
    assert len(got) == len(want) == len(kernel.outputs)
    for name, x, ref in zip(kernel.outputs, got, want):
        assert x.shape == ref.shape, name
        assert x.dtype == torch.float32, name
        err = float((x.double() - ref).abs().max())
        tol = RTOL * float(ref.abs().max()) + ATOL
        assert err <= tol, f"{path.stem}: output '{name}' is off by {err:.3g} (tolerance {tol:.3g})"
