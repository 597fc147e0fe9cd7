"""User names and generated names never meet in generated kernels.

Every gallery module is parsed and each identifier checked against its namespace
(`namespace_check`). Then specs whose tensors, dims, params, lets, indices, intermediates
and own name are spelled like the generator's variables (`acc`, `m_i`, `c1`, `offs_m`,
`MASKED`, `BLOCK_M`, `i0`), like Triton's and Python's names (`tl`, `triton`, `float`,
`range`) or keywords (`lambda`, `for`, `None`, where the language allows them) generate,
run in the interpreter and match the reference: the affine-mask kernel, the runtime block
map with GQA packing, the statistics pass, the chunked and reassociated linear kernels and
precomputed inputs. Before the namespaces were separated, `param c1` changed the result
(host scalars were `c0, c1, ...`), `tl` or `range` broke the module, and a tensor named
`pre0` was replaced by the planner's first precomputed input.
"""
import glob

import pytest
import torch

import attncc
from namespace_check import check_namespaces, problems, run_both

SLOTS = ["name", "q", "k", "v", "sl", "o", "B", "H", "N", "M", "D", "E", "w", "c", "r", "s", "p",
         "b", "h", "i", "j", "d", "e"]
SIZES = dict(B=1, H=2, N=37, M=45, D=16, E=12)

AFFINE = """attention {name}({q}[{B},{H},{N},{D}], {k}[{B},{H},{M},{D}], {v}[{B},{H},{M},{E}], {sl}[{H}]) -> {o}[{B},{H},{N},{E}] {{
  param {w}: int = 6
  param {c}: float = 3.0
  let {r} = {w} - 1
  {s}[{b},{h},{i},{j}] = {q}[{b},{h},{i},{d}] * {k}[{b},{h},{j},{d}] * {D} ** -0.5
  {s} += {sl}[{h}] * ({j} - {i}) / {c}
  {s} = {c} * tanh({s} / {c})
  mask {j} <= {i} + ({M} - {N}) and {i} + ({M} - {N}) - {j} <= {r}
  {p} = softmax({s}, {j})
  {o}[{b},{h},{i},{e}] = {p}[{b},{h},{i},{j}] * {v}[{b},{h},{j},{e}]
}}"""

# each required name in several kinds of slot; names in one spec are distinct
ASSIGNMENTS = [
    "tl acc m_i l_i qk lse offs_m start_n i0 hi0 MASKED pid_m c1 BLOCK_N lambda range triton count n_rows p s k v",
    "lambda o p s c1 acc BLOCK_M BLOCK_N n_rows None float for MASKED pid_m i0 tl qk q triton m_i l_i offs_m start_n",
    "None k q range float s lse count tl triton p o BLOCK_M n_rows for MASKED BLOCK_N c1 acc i0 hi0 start_n pid_m",
]


def names_of(assignment: str) -> dict:
    return dict(zip(SLOTS, assignment.split()))


def shape_of(n: dict, **sizes) -> dict:
    return {n[d]: size for d, size in {**SIZES, **sizes}.items() if d in n}


def assert_matches(out, ref):
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", sorted(glob.glob("examples/*.attn")))
def test_gallery_modules_keep_the_namespaces_apart(path):
    kernel = attncc.compile(path, backend="triton")
    check_namespaces(kernel.generated.source.source, kernel.program)


def test_the_check_catches_leaked_and_unknown_names():
    program = attncc.compile("examples/alibi.attn", backend="reference").program
    assert problems("out = N + dim_N + ptr_slopes + st0_slopes", program) == \
        ["N: neither user-derived nor one of the generator's names"]
    assert problems("out = st1_slopes + par_window + idx_zz + attn_alibi_fwd", program) == [
        "idx_zz: role 'idx' of 'zz', which the spec has no such thing as",
        "par_window: role 'par' of 'window', which the spec has no such thing as",
        "st1_slopes: role 'st' of 'slopes', which the spec has no such thing as"]


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_affine_mask_kernel_with_generator_names(assignment):
    n = names_of(assignment)
    out, ref = run_both(AFFINE.format(**n), shape_of(n), {n["w"]: 5, n["c"]: 2.5})
    assert_matches(out, ref)


def test_param_named_like_a_host_scalar_keeps_its_value():
    """The finding: host scalars were `c0, c1, ...`, so `param c1` was overwritten by one
    (a silently wrong result, 2.28 off the reference)."""
    n = names_of("x q k v sl o B H N M D E c0 c1 r s p b h i j d e")
    out, ref = run_both(AFFINE.format(**n), shape_of(n), {"c0": 4, "c1": 0.7})
    assert_matches(out, ref)


BLOCK_MAP_GQA = """attention {name}({q}[{B},{H},{N},{D}], {k}[{B},{G},{N},{D}], {v}[{B},{G},{N},{E}], {doc}[{B},{N}]: int) -> {o}[{B},{H},{N},{E}] {{
  require {H} % {G} == 0
  let {r} = {H} // {G}
  {s}[{b},{h},{i},{j}] = {q}[{b},{h},{i},{d}] * {k}[{b},{h} // {r},{j},{d}] * {D} ** -0.5
  mask {doc}[{b},{i}] == {doc}[{b},{j}] and {j} <= {i}
  {p} = softmax({s}, {j})
  {o}[{b},{h},{i},{e}] = {p}[{b},{h},{i},{j}] * {v}[{b},{h} // {r},{j},{e}]
}}"""


@pytest.mark.parametrize("n_rows", [5, 37])  # 5 queries: GQA heads packed into one tile
def test_block_map_and_packed_kernels_with_generator_names(n_rows):
    n = dict(name="triton", q="m_i", k="l_i", v="offs_m", doc="acc", o="count", B="BLOCK_M", H="MASKED",
             G="pid_m", N="n_rows", D="i0", E="lse", r="lambda", s="tl", p="float", b="c1", h="start_n",
             i="hi0", j="range", d="k", e="v")
    spec = BLOCK_MAP_GQA.format(**n)
    out, ref = run_both(spec, {"BLOCK_M": 2, "MASKED": 4, "pid_m": 2, "n_rows": n_rows, "i0": 16, "lse": 12})
    assert_matches(out, ref)


LINEAR = """attention {name}({q}[{B},{H},{N},{D}], {k}[{B},{H},{N},{D}], {v}[{B},{H},{N},{E}], {lam}[{H}]) -> {o}[{B},{H},{N},{E}] {{
  param {c}: bool = false
  {fq}[{b},{h},{i},{d}] = elu({q}[{b},{h},{i},{d}]) + 1
  {a}[{b},{h},{i},{j}] = {fq}[{b},{h},{i},{d}] * {k}[{b},{h},{j},{d}] * {lam}[{h}] ** ({i} - {j})
  mask not {c} or {j} <= {i}
  {o}[{b},{h},{i},{e}] = {a}[{b},{h},{i},{j}] * {v}[{b},{h},{j},{e}]
}}"""


@pytest.mark.parametrize("causal", [False, True])  # True: the chunked scan
def test_linear_kernels_with_generator_names(causal):
    n = dict(name="for", q="S", k="z", v="c0", lam="a", o="out", c="MASKED", fq="acc", a="qk", B="BLOCK_C",
             H="state", N="rows", D="q", E="k", b="combo", h="i1", i="c1", j="v", d="in_seq", e="lse")
    kernel = attncc.compile(LINEAR.format(**n), backend="triton")
    assert kernel.generated.source.chunked is not None
    gen = torch.Generator().manual_seed(0)
    kwargs = {"S": torch.randn(1, 2, 37, 16, generator=gen), "z": torch.randn(1, 2, 37, 16, generator=gen),
              "c0": torch.randn(1, 2, 37, 12, generator=gen), "a": torch.rand(2, generator=gen) * 0.1 + 0.9,
              "MASKED": causal}
    out = kernel(**kwargs)
    check_namespaces(kernel.generated.source.source, kernel.program)
    assert kernel.generated.launcher.last_path == ("chunked" if causal else "row streaming")
    exact = {k: v.double() if torch.is_tensor(v) else v for k, v in kwargs.items()}
    ref = attncc.compile(LINEAR.format(**n), backend="reference")(**exact)
    # unnormalised sums of 37 products: fp32 rounding is relative to the terms, not to the result
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


REASSOCIATED = """attention {name}({q}[{B},{H},{N},{D}], {k}[{B},{H},{M},{D}], {v}[{B},{H},{M},{E}]) -> {o}[{B},{H},{N},{E}] {{
  {fq}[{b},{h},{i},{d}] = elu({q}[{b},{h},{i},{d}]) + 1
  {a}[{b},{h},{i},{j}] = {fq}[{b},{h},{i},{d}] * {k}[{b},{h},{j},{d}]
  {num}[{b},{h},{i},{e}] = {a}[{b},{h},{i},{j}] * {v}[{b},{h},{j},{e}]
  {o}[{b},{h},{i},{e}] = {num}[{b},{h},{i},{e}] / sum({a}, {j})
}}"""


def test_reassociated_kernels_with_generator_names():
    n = dict(name="None", q="state", k="S", v="z", o="combo", fq="k", a="v", num="q", B="ROW_SUM",
             H="BLOCK_D", N="n_feat", M="n_cols", D="offs_d", E="BLOCK_E", b="c1", h="host0", i="t0", j="i0",
             d="ld0", e="pre0")
    out, ref = run_both(REASSOCIATED.format(**n), {"ROW_SUM": 1, "BLOCK_D": 2, "n_feat": 37, "n_cols": 45,
                                                    "offs_d": 16, "BLOCK_E": 12})
    assert attncc.compile(REASSOCIATED.format(**n), backend="triton").generated.source.reassociated is not None
    assert_matches(out, ref)


STATISTICS = """attention {name}({q}[{B},{H},{N},{D}], {k}[{B},{H},{M},{D}], {v}[{B},{H},{M},{E}]) -> {o}[{B},{H},{N},{E}] {{
  {s}[{b},{h},{i},{j}] = {q}[{b},{h},{i},{d}] * {k}[{b},{h},{j},{d}] * {D} ** -0.5
  {p} = softmax({s}, {i})
  {o}[{b},{h},{i},{e}] = {p}[{b},{h},{i},{j}] * {v}[{b},{h},{j},{e}]
}}"""


def test_statistics_pass_with_generator_names():
    n = dict(name="range", q="l_i", k="m_i", v="lse", o="pre0", s="acc", p="p", B="N", H="M", N="D", M="B",
             D="SPLIT", E="n_vfeat", b="idx_b", h="size_h", i="m_new", j="alpha", d="s", e="count")
    spec = STATISTICS.format(**n)
    assert attncc.compile(spec, backend="triton").generated.source.statistics
    out, ref = run_both(spec, {"N": 1, "M": 2, "D": 37, "B": 45, "SPLIT": 16, "n_vfeat": 12})
    assert_matches(out, ref)


PRECOMPUTED = """attention {name}({q}[{B},{H},{N},{D}], {k}[{B},{H},{N},{D}], {v}[{B},{H},{N},{E}]) -> {o}[{B},{H},{N},{E}] {{
  param {blk}: int = 16
  param {topk}: int = 2
  {qp}[{b},{h},{qb},{d}] = mean({q}[{b},{h},{i},{d}], {i} by {blk})
  {kp}[{b},{h},{kb},{d}] = mean({k}[{b},{h},{j},{d}], {j} by {blk})
  {sb}[{b},{h},{qb},{kb}] = {qp}[{b},{h},{qb},{d}] * {kp}[{b},{h},{kb},{d}]
  mask {kb} <= {qb}
  {keep}[{b},{h},{qb},{kb}] = topk_mask(where({kb} == {qb}, -inf, {sb}), {topk}, {kb}) or {kb} == {qb}
  {s}[{b},{h},{i},{j}] = {q}[{b},{h},{i},{d}] * {k}[{b},{h},{j},{d}] * {D} ** -0.5
  mask {j} <= {i} and {keep}[{b}, {h}, {i} // {blk}, {j} // {blk}]
  {p} = softmax({s}, {j})
  {o}[{b},{h},{i},{e}] = {p}[{b},{h},{i},{j}] * {v}[{b},{h},{j},{e}]
}}"""


def test_precomputed_inputs_with_generator_names():
    """The planner's precomputed inputs were called `pre0, pre1, ...` in the call's tensors."""
    n = dict(name="pre0", q="pre0", k="pre1", v="pre2", o="acc", blk="BLOCK_M", topk="c1", qp="t0", kp="ld0",
             sb="host0", keep="mask_scalar0", s="pre0_ptr", p="lse", B="pre3", H="B", N="N", D="D", E="E",
             b="b", h="h", i="i", j="j", d="d", e="e", qb="qb", kb="kb")
    spec = PRECOMPUTED.format(**n)
    kernel = attncc.compile(spec, backend="triton")
    assert kernel.generated.plan.precomputed.inputs
    out, ref = run_both(spec, {"pre3": 1, "B": 2, "N": 45, "D": 16, "E": 12}, {"BLOCK_M": 16, "c1": 2})
    assert_matches(out, ref)


def test_symbols_made_up_by_mask_analysis_are_not_user_names():
    """The mask analysis stands for loaded scalars (`prefix[b]`) and opaque atoms with sympy
    symbols; sympy identifies symbols by name, so one called like a user's int param merged
    with it and the kernel visited the wrong key tiles (error 0.55)."""
    spec = """attention plm(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], prefix[B]: int) -> o[B,H,N,E] {
  param mask_scalar0: int = 0
  param opaque0: int = 0
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  mask j < prefix[b] or j <= i + mask_scalar0 + opaque0
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
}"""
    torch.manual_seed(0)
    args = dict(q=torch.randn(2, 2, 37, 8), k=torch.randn(2, 2, 45, 8), v=torch.randn(2, 2, 45, 6),
                prefix=torch.tensor([3, 40]), mask_scalar0=-20, opaque0=2)
    want = attncc.compile(spec, backend="reference")(**args)
    torch.testing.assert_close(attncc.compile(spec, backend="triton")(**args), want, atol=1e-5, rtol=1e-5)
