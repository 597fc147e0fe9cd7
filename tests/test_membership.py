"""Membership tests `x in t[b, :]` (true iff some entry along the `:` axis equals x): in masks
and in expressions, on both backends against float64 oracles on odd shapes, and the located
errors of their misuses."""
import math
import os

import pytest
import torch

import attncc
from attncc import ir
from attncc.errors import SpecError

BACKENDS = ["reference"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])

KEEP_LABELS = """attention keep_labels(q[B,N,D], k[B,M,D], v[B,M,E], lab[B,M]: int, keep[B,T]: int) -> o[B,N,E] {
  s[b,i,j] = q[b,i,d] * k[b,j,d] * D ** -0.5
  mask lab[b, j] in keep[b, :]
  p = softmax(s, j)
  o[b,i,e] = p[b,i,j] * v[b,j,e]
}"""

BOOST = """attention boost(q[B,N,D], k[B,M,D], v[B,M,E], lab[B,M]: int, hot[B,T]: int) -> o[B,N,E] {
  param bonus: float = 1.5
  s[b,i,j] = q[b,i,d] * k[b,j,d] * D ** -0.5
  s += where(lab[b, j] + 1 in hot[b, :], bonus, 0.0)
  p = softmax(s, j)
  o[b,i,e] = p[b,i,j] * v[b,j,e]
}"""

BLOCKS = """attention blocks(q[N,D], k[M,D], v[M,E], kidx[QB,K]: int) -> o[N,E] {
  param qb: int = 4
  param kb: int = 3
  s[i,j] = q[i,d] * k[j,d] * D ** -0.5
  mask j // kb in kidx[i // qb, :] or j == 0
  p = softmax(s, j)
  o[i,e] = p[i,j] * v[j,e]
}"""


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def attend(q, k, v, allowed, bias=0.0):
    s = torch.einsum("...id,...jd->...ij", q.double(), k.double()) * q.shape[-1] ** -0.5 + bias
    s = s.masked_fill(~allowed, -math.inf)
    return torch.einsum("...ij,...je->...ie", torch.softmax(s, -1).nan_to_num(0.0), v.double())


def close(got, want):
    err = float((got.double() - want).abs().max())
    assert err <= 1e-4 * max(1.0, float(want.abs().max())), f"off by {err:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_membership_in_a_mask(backend):
    B, N, M, D, E = 2, 7, 13, 6, 5
    q, k, v = rand(B, N, D, seed=1), rand(B, M, D, seed=2), rand(B, M, E, seed=3)
    lab = torch.randint(0, 6, (B, M), generator=torch.Generator().manual_seed(4))
    keep = torch.tensor([[1, 3, 3], [0, 5, -1]])  # a duplicate, a value no label has
    kernel = attncc.compile(KEEP_LABELS, backend=backend)
    allowed = (lab[:, :, None] == keep[:, None, :]).any(-1)[:, None, :]
    close(kernel(q=q, k=k, v=v, lab=lab, keep=keep), attend(q, k, v, allowed))
    assert kernel.last_run["backend"] == backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_membership_in_an_expression(backend):
    B, N, M, D, E = 1, 9, 5, 4, 3
    q, k, v = rand(B, N, D, seed=5), rand(B, M, D, seed=6), rand(B, M, E, seed=7)
    lab = torch.tensor([[0, 1, 2, 3, 4]])
    hot = torch.tensor([[2, 5]])  # lab + 1 in {2, 5}: keys 1 and 4
    kernel = attncc.compile(BOOST, backend=backend)
    bias = torch.tensor([0.0, 2.0, 0.0, 0.0, 2.0], dtype=torch.float64)
    close(kernel(q=q, k=k, v=v, lab=lab, hot=hot, bonus=2.0),
          attend(q, k, v, torch.ones(N, M, dtype=torch.bool), bias))


def block_lists(N, M, qb, kb, kidx, extra):
    """The oracle of BLOCKS: key block j // kb listed for query block i // qb, or `extra`."""
    i, j = torch.arange(N)[:, None], torch.arange(M)[None, :]
    return (kidx[i // qb] == (j // kb)[..., None]).any(-1) | extra(i, j)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,M,qb,kb,kidx", [
    (11, 10, 4, 3, [[1, -1], [0, 3], [2, 2]]),                     # duplicates, a -1 that matches nothing
    (37, 29, 5, 2, [[k % 15, (3 * k + 1) % 15, 14 - k % 15] for k in range(8)]),  # several key tiles
    (9, 13, 3, 4, [[] for _ in range(3)]),                         # empty lists: only key 0
])
def test_membership_per_pair_in_a_mask(backend, N, M, qb, kb, kidx):
    """Block lists in one mask line: key block j // kb listed for query block i // qb. The
    Triton kernel loops over each row's list inside the mask (runtime length K), comparing
    its entries with the tile's key blocks; the test is an opaque atom for the mask analysis,
    so the launcher classifies the tiles at run time (a block map: its classifier runs the
    same loop), and the skipped tiles must not change the result."""
    D, E = 5, 4
    kidx = torch.tensor(kidx, dtype=torch.long).reshape(len(kidx), -1)
    q, k, v = rand(N, D, seed=8), rand(M, D, seed=9), rand(M, E, seed=10)
    kernel = attncc.compile(BLOCKS, backend=backend)
    want = attend(q, k, v, block_lists(N, M, qb, kb, kidx, lambda i, j: j == 0))
    close(kernel(q=q, k=k, v=v, kidx=kidx, qb=qb, kb=kb), want)
    assert kernel.last_run["backend"] == backend
    if backend == "triton":
        from attncc.passes.kinds import MaskMode
        assert kernel.generated.source.mask_mode == MaskMode.BLOCK_MAP
        assert "for g0 in range(0, dim_K):" in kernel.generated.source.source


CAUSAL_QUERY_LISTS = """attention qlists(q[B,N,D], k[B,M,D], v[B,M,E], qidx[B,KB,T]: int) -> o[B,N,E] {
  param qb: int = 4
  param kb: int = 3
  s[b,i,j] = q[b,i,d] * k[b,j,d] * D ** -0.5
  mask j <= i and (i // qb in qidx[b, j // kb, :] or j == i)
  p = softmax(s, j)
  o[b,i,e] = p[b,i,j] * v[b,j,e]
}"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_membership_of_a_list_per_key_with_causal_skipping(backend):
    """The list read per key (query blocks listed for key block j // kb), and-ed with a
    causal mask whose bound skips the tiles past the diagonal: forward and gradients
    against float64 autograd of the oracle (the generated backward when Triton runs)."""
    B, N, M, D, E, qb, kb, T = 2, 37, 37, 6, 5, 4, 3, 3
    g = torch.Generator().manual_seed(12)
    q, k, v = rand(B, N, D, seed=13), rand(B, M, D, seed=14), rand(B, M, E, seed=15)
    qidx = torch.randint(-1, (N + qb - 1) // qb, (B, (M + kb - 1) // kb, T), generator=g)
    i, j = torch.arange(N)[:, None], torch.arange(M)[None, :]
    listed = (qidx[:, j // kb] == (i // qb)[None, ..., None]).any(-1)         # [B,N,M]
    allowed = (j <= i) & (listed | (j == i))
    assert listed.any() and not listed.all()
    x32 = [t.clone().requires_grad_() for t in (q, k, v)]
    x64 = [t.double().requires_grad_() for t in (q, k, v)]
    kernel = attncc.compile(CAUSAL_QUERY_LISTS, backend=backend)
    o = kernel(q=x32[0], k=x32[1], v=x32[2], qidx=qidx, qb=qb, kb=kb)
    want = attend(*x64, allowed)
    close(o.detach(), want.detach())
    w = rand(B, N, E, seed=16)
    (o * w).sum().backward()
    grads = torch.autograd.grad((want * w.double()).sum(), x64)
    for got, gw in zip(x32, grads):
        close(got.grad, gw)
    assert kernel.last_run["backend"] == backend
    if backend == "triton":
        assert kernel.last_run["backward"] == "triton", kernel.last_run


def test_membership_lowers_to_an_amax_over_a_fresh_index():
    program = attncc.load(KEEP_LABELS)
    (found,) = [n for n in program.nodes() if isinstance(n, ir.Reduce)]
    assert found.op == "amax" and found.axes == ("_in0",) and found.indices == ("b", "j")
    assert program.extent["_in0"].name == "T"


def test_the_fresh_index_avoids_every_name_of_the_spec():
    spec = KEEP_LABELS.replace("keep[B,T]", "_in0[B,T]").replace("keep[b, :]", "_in0[b, :]")
    program = attncc.load(spec)
    (found,) = [n for n in program.nodes() if isinstance(n, ir.Reduce)]
    assert found.axes == ("_in1",)


@pytest.mark.parametrize("expr,message,where", [
    ("lab[b, j] in keep[:, :]", "a membership test searches one axis of 'keep', marked `:`; found 2", "3:8"),
    ("lab[b, j] in keep[b, 0]", "a membership test searches one axis of 'keep', marked `:`; found 0", "3:8"),
    ("lab[b, j] > 0 in keep[b, :]", "unexpected token 'in'", "3:22"),
    ("(lab[b, j] > 0) in keep[b, :]", "a bool value looked up among the int entries of 'keep'", "3:8"),
    ("lab[b, j] in nope[b, :]", "unknown tensor 'nope'", "3:8"),
    ("lab[b, j] in keep[b, :, 0]", "'keep' has 2 dims but is indexed with 3", "3:8"),
])
def test_misuses_are_located(expr, message, where):
    spec = KEEP_LABELS.replace("lab[b, j] in keep[b, :]", expr)
    with pytest.raises(SpecError) as err:
        attncc.load(spec)
    text = str(err.value)
    assert message in text, text
    assert text.startswith(f"<string>:{where}: error:"), text


JOINT_LISTS = """attention jm(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], ks[B,H,C,D], vs[B,H,C,E], lists[QB,T]: int) -> o[B,H,N,E] {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  ss[b,h,i,c] = q[b,h,i,d] * ks[b,h,c,d] * 0.25
  mask j <= i + (M - N)
  mask c // 2 in lists[i // 4, :]
  p, ps = softmax(s, j, ss, c)
  o1[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
  o2[b,h,i,e] = ps[b,h,i,c] * vs[b,h,c,e]
  o = o1 + o2
}"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_membership_per_pair_in_a_general_plan(backend):
    """A per-pair list in the mask of one key set of a joint softmax (a general streaming
    plan): the membership is an inner loop of that set's tiles, not a score-sized value
    torch would compute; o and the joint lse against a float64 oracle."""
    from attncc.passes.streams import plan_streams
    plan = plan_streams(attncc.load(JOINT_LISTS))
    assert "inner amax over '_in0' (a loop inside each tile): line 5" in plan.describe()
    g = torch.Generator().manual_seed(3)
    B, H, N, M, C, D, E, T = 1, 2, 19, 23, 9, 8, 5, 3
    q, k, v = rand(B, H, N, D, seed=17), rand(B, H, M, D, seed=18), rand(B, H, M, E, seed=19)
    ks, vs = rand(B, H, C, D, seed=20), rand(B, H, C, E, seed=21)
    lists = torch.randint(-1, 5, ((N + 3) // 4, T), generator=g)
    i = torch.arange(N)[:, None]
    allowed = torch.cat([torch.arange(M)[None, :] <= i + (M - N),
                         (lists[i // 4] == (torch.arange(C) // 2)[None, :, None]).any(-1)], -1)
    logits = torch.cat([torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * D ** -0.5,
                        torch.einsum("bhid,bhcd->bhic", q.double(), ks.double()) * 0.25], -1)
    logits = logits.masked_fill(~allowed, -math.inf)
    want_lse = torch.logsumexp(logits, -1)
    want = torch.softmax(logits, -1) @ torch.cat([v, vs], -2).double()
    o, lse = attncc.compile(JOINT_LISTS, backend=backend)(q=q, k=k, v=v, ks=ks, vs=vs, lists=lists, return_lse=True)
    close(o, want)
    close(lse, want_lse)


COMPILE = """
import sys
import attncc
from attncc.aot import compile_launch, default_report_config, report_launches, static_call
sys.path.insert(0, "tests")
from test_membership import CAUSAL_QUERY_LISTS
kernel = attncc.compile(CAUSAL_QUERY_LISTS, backend="triton")
shape = {"KB": 1366, "T": 8}
launches = report_launches(kernel, 64, 64, default_report_config(kernel, 64, 64), shape=shape)
launches += [k for k in kernel.backward_launcher().launches(static_call(kernel, 64, 64, shape=shape))
             if "_bwd_" in k.kernel.__name__]
for k in launches:
    assert "cubin" in compile_launch(k).asm
    print("ok", k.kernel.__name__, flush=True)
"""


def test_membership_per_pair_compiles_for_sm90():
    """The interpreter is permissive (it took the builtin `range` passed as an argument to the
    tile function): the forward, block-map classifier and backward kernels with the list loop
    also compile for sm_90, in a process not in interpreter mode."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=900,
                         cwd=Path(__file__).parent.parent)
    names = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("ok ")]
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert {"attn_qlists_fwd", "attn_qlists_classify", "attn_qlists_bwd_dkdv", "attn_qlists_bwd_dq"} <= set(names), \
        names
