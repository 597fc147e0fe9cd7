"""`attncc check`: a compiled kernel against the reference executor on random inputs.

The reference runs on the same inputs upcast to float64, so a kernel is judged against an
accurate answer rather than against a computation with the same rounding as its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .api import compile as compile_spec
from .api import lse_output
from .binding import bind
from .errors import SpecError
from .random_inputs import random_arguments

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
# (absolute, relative) tolerance per dtype: an entry passes if |x - ref| <= atol + rtol * |ref|.
TOLERANCES = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-4),
              torch.float16: (2e-2, 2e-2), torch.bfloat16: (2e-2, 2e-2)}


@dataclass
class OutputCheck:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    max_abs: float
    max_rel: float  # max of |x - ref| / max(|ref|, atol): relative where ref is not tiny
    atol: float
    rtol: float
    passed: bool


@dataclass
class CheckReport:
    spec: str
    name: str
    backend: str  # what actually ran (`kernel.backend`), not what was asked for
    requested: str
    dtype: str
    seed: int
    scalars: dict[str, int | float | bool]  # every dim and param the call bound
    outputs: list[OutputCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)


def check(spec_path: str | Path, backend: str = "auto", shape: dict[str, int] | None = None,
          params: dict | None = None, dtype: str = "float32", seed: int = 0,
          reference_block: int = 256, device: str | None = None) -> CheckReport:
    """Run the spec compiled for `backend` and the reference on the same random inputs
    (with the log-sum-exp output too when the spec has one softmax over keys), and
    compare every output. device: where to run, by default a GPU when there is one."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    kernel = compile_spec(spec_path, backend, reference_block=reference_block)
    oracle = compile_spec(spec_path, "reference", reference_block=reference_block)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    args = random_arguments(kernel.program, shape, params, dtype=torch_dtype, device=device, seed=seed)
    try:
        lse_output(kernel.program)
        with_lse = True
    except SpecError:
        with_lse = False
    names = kernel.outputs + (["lse"] if with_lse else [])
    got = _as_tuple(kernel(**args, return_lse=with_lse))
    upcast = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in args.items()}
    want = _as_tuple(oracle(**upcast, return_lse=with_lse))
    report = CheckReport(str(spec_path), kernel.name, kernel.backend, backend, dtype, seed,
                         bind(kernel.program, args).scalars)
    atol, rtol = TOLERANCES[torch_dtype]
    for name, x, ref in zip(names, got, want):
        report.outputs.append(_compare(name, x, ref, atol, rtol))
    return report


def _as_tuple(result) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def _compare(name: str, x: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> OutputCheck:
    """Errors in float64. Equal entries count as equal, infinities included (a row with no
    allowed key has lse -inf on both sides, and -inf - -inf would be NaN); NaN in both places
    counts as equal (NaN propagates the same way on every backend); NaN in one place, or
    infinities of different sign, count as infinitely wrong."""
    if x.shape != ref.shape:
        return OutputCheck(name, tuple(x.shape), x.dtype, float("inf"), float("inf"), atol, rtol, False)
    a, b = x.detach().double().cpu(), ref.detach().double().cpu()
    same = (a == b) | (a.isnan() & b.isnan())
    err = torch.where(same, 0.0, (a - b).abs().nan_to_num(nan=float("inf")))
    scale = torch.where(same, 0.0, b.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0))
    ok = bool((err <= atol + rtol * scale).all())
    return OutputCheck(name, tuple(x.shape), x.dtype, _max(err), _max(err / scale.clamp_min(atol)),
                       atol, rtol, ok)


def _max(t: torch.Tensor) -> float:
    return float(t.max()) if t.numel() else 0.0
