"""Randomly composed specs for the general streaming planner, against the reference executor.

Each case draws a score (`q.k` scaled, plus up to two score modifications of
test_random_specs.MODS), a mask (none, causal, key padding, a sliding window) and one to
three outputs, each a construct the general planner (passes/streams.py) handles:

- `attn`: softmax @ v (alone, this is the fused FlashAttention skeleton's case)
- `linear`: guarded linear attention, `num / (den + eps)` or `num / max(den, eps)`, with
  elu+1, relu or exp features
- `stat`: a row statistic of the scores, `amax`, `logsumexp` or `mean` over keys
- `colsum`: column sums of P over the queries
- `column`: one chosen column of P, `p[b,h,i,0]`
- `reweight`: post-softmax weights `p * table[h, clamp(j - i, -R, R) + R]` in the
  numerator only, then @ v, renormalised by their row sum or not
- `chain`: a two-step normalisation, softmax over keys then divided by the sum over queries
- `entropy`: `sum_j p s`, alone or as the entropy `logsumexp(s, j) - sum_j p s`

The spec is written as text, compiled with the triton backend (the plan must exist: the
fused `RowStreamPlan` or a general `StreamPlan`), run in Triton's interpreter on small odd
random inputs, and every output is compared with the reference run on float64 copies,
within 1e-4 of the output's scale (max(1, max |ref|)); infinities and nans must agree.

Bugs the generator found are kept as regression cases (REGRESSIONS, with the seeds that drew
them in SEEDS). Explore more seeds with
`python tests/test_random_streams.py COUNT SEED`: it prints each spec, its plan and whether
it passed.
"""
from __future__ import annotations

import os
import random
import sys
import traceback
import warnings
from dataclasses import dataclass, field

if __name__ == "__main__":  # before triton is imported: run the kernels on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import attncc
from attncc.passes.row_stream import RowStreamPlan
from attncc.passes.streams import StreamPlan
from attncc.random_inputs import random_arguments
from test_random_specs import MODS

# The interpreter's numpy warns about the 0 / 0 and x / 0 of fully masked rows, which are
# then discarded or compared with the reference's.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]

SCORE_MODS = [m.strip() for m in MODS if m.strip()]
# The usual scale, and sharp scores (spread over tens: the running maxima of online sums move
# by more than a rounding error between key tiles, and an exp without its shift overflows).
SCALES = ["D ** -0.5", "D ** -0.5 * 6.0"]
MASKS = {
    "none": None,
    "causal": "j <= i + (M - N)",
    "padding": "valid[b, j]",
    "window": "abs(i - j) <= window",
    "causal window": "j <= i + (M - N) and i + (M - N) - j < window",
}
FEATURES = {"elu": "elu({x}) + 1", "relu": "relu({x})", "exp": "exp({x})"}
STATS = ["amax", "logsumexp", "mean"]
OUTPUT_KINDS = ["attn", "linear", "stat", "colsum", "column", "reweight", "chain", "entropy"]
# An output passes when max |x - ref64| <= RTOL * max(1, max |ref64|) (float32 inputs).
RTOL = 1e-4
# Inputs a spec may read besides q, k and v, with their declarations.
EXTRA_INPUTS = {"slopes": "slopes[H]", "table": "table[H,W]", "bias": "bias[B,M]", "valid": "valid[B,M]: bool"}


@dataclass
class Case:
    text: str
    shape: dict
    params: dict
    outputs: list = field(default_factory=list)  # the output kinds, in order
    mask: str = "none"


# What each output kind reads: the scores s, the softmax p (which reads s), or neither.
READS = {"attn": "p", "linear": "", "stat": "s", "colsum": "p", "column": "p", "reweight": "p", "chain": "p",
         "entropy": "p"}


def _output(kind: str, k: int, rng: random.Random) -> tuple[str, list[str]]:
    """The declaration of output `o{k}` of this kind and the statements computing it."""
    o = f"o{k}"
    if kind == "attn":
        return f"{o}[B,H,N,E]", [f"{o}[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]"]
    if kind == "linear":
        feature = FEATURES[rng.choice(list(FEATURES))]
        guard = rng.choice([f"(den{k}[b,h,i] + eps)", f"max(den{k}[b,h,i], eps)"])
        return f"{o}[B,H,N,E]", [
            f"fq{k} = {feature.format(x='q[b,h,i,d]')}",
            f"fk{k} = {feature.format(x='k[b,h,j,d]')}",
            f"a{k}[b,h,i,j] = fq{k}[b,h,i,d] * fk{k}[b,h,j,d]",
            f"num{k}[b,h,i,e] = a{k}[b,h,i,j] * v[b,h,j,e]",
            f"den{k}[b,h,i] = sum(a{k}, j)",
            f"{o}[b,h,i,e] = num{k}[b,h,i,e] / {guard}"]
    if kind == "stat":
        return f"{o}[B,H,N]", [f"{o} = {rng.choice(STATS)}(s, j)"]
    if kind == "colsum":
        return f"{o}[B,H,M]", [f"{o}[b,h,j] = p[b,h,i,j]"]
    if kind == "column":
        return f"{o}[B,H,N]", [f"{o}[b,h,i] = p[b,h,i,0]"]
    if kind == "reweight":
        renormalised = rng.random() < 0.5
        # renormalised weights are kept positive so that their row sums stay away from 0
        factor = "exp(table[h, clamp(j - i, -R, R) + R])" if renormalised else "table[h, clamp(j - i, -R, R) + R]"
        lines = [f"w{k} = p[b,h,i,j] * {factor}"]
        if not renormalised:
            return f"{o}[B,H,N,E]", lines + [f"{o}[b,h,i,e] = w{k}[b,h,i,j] * v[b,h,j,e]"]
        return f"{o}[B,H,N,E]", lines + [f"wnum{k}[b,h,i,e] = w{k}[b,h,i,j] * v[b,h,j,e]",
                                         f"wden{k}[b,h,i] = sum(w{k}, j)",
                                         f"{o}[b,h,i,e] = wnum{k}[b,h,i,e] / wden{k}[b,h,i]"]
    if kind == "chain":
        return f"{o}[B,H,N,E]", [f"c{k} = p / sum(p, i)", f"{o}[b,h,i,e] = c{k}[b,h,i,j] * v[b,h,j,e]"]
    if kind == "entropy":
        if rng.random() < 0.5:
            return f"{o}[B,H,N]", [f"{o}[b,h,i] = p[b,h,i,j] * s[b,h,i,j]"]
        return f"{o}[B,H,N]", [f"ps{k}[b,h,i] = p[b,h,i,j] * s[b,h,i,j]", f"{o} = logsumexp(s, j) - ps{k}"]
    raise ValueError(kind)


def spec_text(scale: str, mods: list[str], mask: str | None, outputs: list[tuple[str, list[str]]],
              reads: set[str]) -> str:
    """A whole spec from its score's scale and modifications, its mask and its outputs
    (declaration, statements); the score and the softmax are written only when `reads` has
    them (an unused statement or input is an error)."""
    body = [line for _, lines in outputs for line in lines]
    uses_p = "p" in reads
    uses_s = uses_p or "s" in reads
    score = [f"s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * {scale}", *mods] if uses_s else []
    statements = [*score, *([f"mask {mask}"] if mask else []), *(["p = softmax(s, j)"] if uses_p else []), *body]
    used = [decl for name, decl in EXTRA_INPUTS.items() if any(f"{name}[" in line for line in statements)]
    decls = [d for d, _ in outputs]
    results = decls[0] if len(decls) == 1 else "(" + ", ".join(decls) + ")"
    values = ", v[B,H,M,E]" if any("v[" in line for line in statements) else ""
    head = [f"attention random_stream(q[B,H,N,D], k[B,H,M,D]{values}"
            + "".join(", " + d for d in used) + f") -> {results} {{",
            "param window: int = 3", "param cap: float = 3.0", "param eps: float = 1e-6"]
    if any("table[" in line for line in statements):
        head.append("let R = (W - 1) // 2")
    return head[0] + "\n" + "\n".join("  " + line for line in [*head[1:], *statements]) + "\n}\n"


def odd_size(rng: random.Random, lo: int, hi: int) -> int:
    return rng.choice([n for n in range(lo, hi + 1) if n % 16])


def generate(seed: int) -> Case:
    """The case of a seed: score, mask, outputs and sizes."""
    rng = random.Random(7919 * seed + 17)
    scale = rng.choice(SCALES)
    mods = rng.sample(SCORE_MODS, rng.choice([0, 0, 1, 1, 2]))
    mask = rng.choice(list(MASKS))
    kinds = [rng.choice(OUTPUT_KINDS) for _ in range(rng.choice([1, 2, 2, 3, 3]))]
    outputs = [_output(kind, k, rng) for k, kind in enumerate(kinds)]
    shape = dict(B=rng.randint(1, 2), H=rng.randint(1, 3), N=odd_size(rng, 5, 29), M=odd_size(rng, 5, 29),
                 D=rng.randint(3, 20), E=rng.randint(3, 20), W=2 * rng.randint(1, 3) + 1)
    params = {"window": rng.randint(1, 6)}
    reads = {READS[kind] for kind in kinds}
    return Case(spec_text(scale, mods, MASKS[mask], outputs, reads), shape, params, kinds, mask)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _double(kwargs: dict) -> dict:
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}


def compare(name: str, got: torch.Tensor, want: torch.Tensor) -> str | None:
    """Why an output does not match the float64 reference, or None when it does: nans and
    infinities must be where the reference has them, the rest within RTOL of the scale."""
    if got.shape != want.shape:
        return f"output '{name}' has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    got = got.double()
    finite = torch.isfinite(want)
    same_odd = torch.isnan(got) == torch.isnan(want)
    same_odd &= torch.where(torch.isinf(want), got == want, ~torch.isinf(got))
    if not bool(same_odd.all()):
        where = tuple(int(x) for x in torch.nonzero(~same_odd)[0])
        return (f"output '{name}': {int((~same_odd).sum())} entries differ in nan/inf, e.g. at {where}: "
                f"kernel {float(got[where]):.6g}, reference {float(want[where]):.6g}")
    if not bool(finite.any()):
        return None
    scale = max(1.0, float(want[finite].abs().max()))
    diff = torch.where(finite, got - want, 0).abs()
    err = float(diff.max())
    if err > RTOL * scale:
        where = tuple(int(x) for x in torch.nonzero(diff == err)[0])
        return (f"output '{name}' is off by {err:.3g} (tolerance {RTOL * scale:.3g}) at {where}: "
                f"kernel {float(got[where]):.6g}, reference {float(want[where]):.6g}")
    return None


def plan_of(kernel) -> str:
    plan = kernel.generated.plan
    return plan.describe() if isinstance(plan, StreamPlan) else type(plan).__name__


def run_case(case: Case, seed: int = 0):
    """Compile the case's spec for both backends and run them on the same inputs: the kernel
    and the mismatches of its outputs (an empty list when every output matches)."""
    reference = attncc.compile(case.text, backend="reference")
    kernel = attncc.compile(case.text, backend="triton")
    plan = kernel.generated.plan
    assert isinstance(plan, (RowStreamPlan, StreamPlan)), f"no plan: {plan!r}"
    kwargs = random_arguments(kernel.program, {k: v for k, v in case.shape.items() if k in kernel.program.dims},
                              {k: v for k, v in case.params.items() if k in kernel.program.params}, seed=seed)
    want = _as_tuple(reference(**_double(kwargs)))
    with torch.no_grad():
        got = _as_tuple(kernel(**kwargs))
    assert kernel.last_run["backend"] == "triton", kernel.last_run
    assert len(got) == len(want) == len(kernel.outputs)
    return kernel, [why for name, x, ref in zip(kernel.outputs, got, want) if (why := compare(name, x, ref))]


# Bugs the generator found, each kept as a minimal spec that must now pass: a mean over a
# row with every key masked was nan (0 / 0 in the torch epilogue; the reference gives 0), and
# the reference crashed reading the softmax at a constant key (`p[b,h,i,0]`) when it streamed
# the key index (D >= N, or column sums as the first output). name -> case.
_CHOSEN = ("  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5\n"
           "  p = softmax(s, j)\n")
REGRESSIONS = {
    "mean-of-fully-masked-row": Case(
        "attention mean_rows(q[B,H,N,D], k[B,H,M,D]) -> o[B,H,N] {\n"
        "  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d]\n"
        "  mask j <= i + (M - N)\n"
        "  o = mean(s, j)\n"
        "}\n", dict(B=1, H=1, N=7, M=5, D=3), {}),
    "chosen-column-wide-keys": Case(
        "attention chosen_column(q[B,H,N,D], k[B,H,M,D]) -> p0[B,H,N] {\n" + _CHOSEN
        + "  p0[b,h,i] = p[b,h,i,0]\n}\n", dict(B=1, H=1, N=5, M=7, D=6), {}),
    "colsum-before-chosen-column": Case(
        "attention colsum_first(q[B,H,N,D], k[B,H,M,D]) -> (cs[B,H,M], p0[B,H,N]) {\n" + _CHOSEN
        + "  cs[b,h,j] = p[b,h,i,j]\n  p0[b,h,i] = p[b,h,i,0]\n}\n", dict(B=1, H=1, N=5, M=7, D=3), {}),
}
SEEDS = list(range(36)) + [125, 179]  # 125 and 179 drew the fully masked mean


@pytest.fixture
def interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("generated kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported")


@pytest.mark.parametrize("seed", SEEDS)
def test_random_stream_spec(seed, interpreter):
    case = generate(seed)
    try:
        kernel, failures = run_case(case, seed)
    except attncc.BackendError as why:
        pytest.fail(f"rejected: {why}\n{case.text}")
    assert not failures, "\n".join(failures) + f"\n{case.text}{plan_of(kernel)}"


@pytest.mark.parametrize("name", REGRESSIONS)
def test_regression(name, interpreter):
    case = REGRESSIONS[name]
    kernel, failures = run_case(case)
    assert not failures, "\n".join(failures) + f"\n{case.text}{plan_of(kernel)}"


def test_generator_covers_every_construct():
    """The seeds of the test draw every output kind, mask, scale and score modification, one to
    three outputs, and a lone softmax @ v (the fused skeleton's plan)."""
    cases = [generate(s) for s in SEEDS]
    assert {k for c in cases for k in c.outputs} == set(OUTPUT_KINDS)
    assert {c.mask for c in cases} == set(MASKS)
    assert {len(c.outputs) for c in cases} == {1, 2, 3}
    assert all(any(f"* {scale}\n" in c.text for c in cases) for scale in SCALES)
    assert all(any(mod in c.text for c in cases) for mod in SCORE_MODS)
    assert any(c.outputs == ["attn"] for c in cases)


def main(argv: list[str]) -> int:
    """`python tests/test_random_streams.py COUNT SEED`: the cases of seeds SEED .. SEED+COUNT-1,
    each with its spec, its plan and whether it passed."""
    warnings.filterwarnings("ignore", "invalid value encountered|divide by zero encountered", RuntimeWarning)
    count = int(argv[0]) if argv else 10
    first = int(argv[1]) if len(argv) > 1 else 0
    failed = 0
    for seed in range(first, first + count):
        case = generate(seed)
        print(f"=== seed {seed}: {', '.join(case.outputs)}, mask {case.mask}; {case.shape} {case.params}")
        print(case.text, end="")
        try:
            print(plan_of(attncc.compile(case.text, backend="triton")))
            failures = run_case(case, seed)[1]
        except Exception as why:  # noqa: BLE001 - exploring: report and go on
            failures = [f"{type(why).__name__}: {why}"]
            if not isinstance(why, (attncc.BackendError, AssertionError)):
                failures.append(traceback.format_exc())
        failed += bool(failures)
        print("FAIL\n  " + "\n  ".join(failures) if failures else "pass")
    print(f"{count - failed} of {count} passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
