"""Linear-time generated backward of linear attention, in Triton's interpreter.

Normalised linear attention (`linear_elu`: `o = num / den` with `den` the row sums of the
pointwise weights, feature maps `elu(x) + 1` on q and k) takes the backward of its forward's
path: the reassociated kernels without an active mask (`codegen/reassociate.py`,
`ReassociatedBackwardCodegen`), the chunked scans when exactly causal on a square score
(`codegen/chunked.py`, `ChunkedBackwardCodegen` with `ROW_SUM`). Gradients are checked against
the float64 reference's autograd on odd shapes (partial chunks, N != M without a mask, D != E),
with the path taken, and that no launch argument holds B*H*N*M values.
"""
import pytest
import torch

import attncc
from attncc import row_backward
from attncc.passes.kinds import LaunchPath


def close(got, want, what):
    scale = want.abs().max().clamp(min=1e-3)
    torch.testing.assert_close(got.double() / scale, want / scale, rtol=1e-4, atol=2e-5, msg=what)


def run(spec, base, params, wanted, monkeypatch=None):
    """(kernel, gradients of `wanted` on the triton backend in fp32, the float64 reference's,
    the launches of the backward)."""
    launched = []
    if monkeypatch is not None:
        real = row_backward.launch
        monkeypatch.setattr(row_backward, "launch", lambda kl: launched.append(kl) or real(kl))
    kernel = attncc.compile(spec, backend="triton")
    reference = attncc.compile(spec, backend="reference")
    g = None

    def grads(k, dtype):
        nonlocal g
        args = {n: t.to(dtype).requires_grad_(n in wanted) for n, t in base.items()}
        o = k(**args, **params)
        if g is None:
            g = torch.randn(o.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        return dict(zip(wanted, torch.autograd.grad(o, [args[n] for n in wanted], g.to(dtype))))

    got = grads(kernel, torch.float32)
    launched = list(launched)
    want = grads(reference, torch.float64)
    return kernel, got, want, launched


def qkv(B=1, H=2, G=None, N=37, M=37, D=5, E=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = G or H
    return dict(q=torch.randn(B, H, N, D, generator=g, dtype=torch.float64),
                k=torch.randn(B, G, M, D, generator=g, dtype=torch.float64),
                v=torch.randn(B, G, M, E, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("causal,shape,path", [
    (True, dict(N=37, M=37), LaunchPath.CHUNKED),        # three chunks of 16, the last partial
    (False, dict(N=21, M=29), LaunchPath.REASSOCIATED),  # N != M, tiles that divide neither
])
def test_linear_elu_backward_is_linear_time(causal, shape, path, monkeypatch):
    base = qkv(**shape)
    kernel, got, want, launched = run("examples/linear_elu.attn", base, {"causal": causal}, ("q", "k", "v"),
                                      monkeypatch)
    check_linear_time(kernel, path, base, got, want, launched)


def check_linear_time(kernel, path, base, got, want, launched):
    """The generated backward took `path`, launched nothing score-sized, and matches the reference."""
    assert kernel.last_run["backward"] == "triton"
    assert kernel.backward_launcher().last_path == path
    B, H, N, _ = base["q"].shape
    M = base["k"].shape[2]
    assert launched and all(a.numel() < B * H * N * M for kl in launched for a in kl.args if torch.is_tensor(a))
    for n in got:
        close(got[n], want[n], f"d{n}")


def test_linear_elu_backward_says_why_where_no_linear_path_applies():
    """Causal with N != M: the forward streams rows, and no row-streaming backward divides by
    row sums: the reference backward, and why."""
    base = {n: t.float().requires_grad_() for n, t in qkv(N=9, M=13).items()}
    kernel = attncc.compile("examples/linear_elu.attn", backend="triton")
    o = kernel(**base, causal=True)
    assert kernel.last_run["backward"] == "reference"
    assert "linear-time paths only" in kernel.last_run["backward_reason"]
    assert o.grad_fn is not None


def kernel_inputs(B=1, H=4, G=2, N=37, M=37, D=5, E=7, seed=1):
    """linear_kernel's inputs: featurised (positive) q and k, so that row sums stay away from 0."""
    g = torch.Generator().manual_seed(seed)
    return dict(q=torch.rand(B, H, N, D, generator=g, dtype=torch.float64),
                k=torch.rand(B, G, M, D, generator=g, dtype=torch.float64),
                v=torch.randn(B, G, M, E, generator=g, dtype=torch.float64),
                lam=torch.rand(H, generator=g, dtype=torch.float64) * 0.5 + 0.5,
                kw=torch.rand(B, G, M, generator=g, dtype=torch.float64) + 0.5)


@pytest.mark.parametrize("causal,normalize,shape,path", [
    (True, True, dict(N=37, M=37), LaunchPath.CHUNKED),          # decay lam[h] ** (i - j), partial chunk
    (True, False, dict(N=16, M=16, H=6, G=2), LaunchPath.CHUNKED),  # one full chunk, groups of 3
    (False, True, dict(N=21, M=29), LaunchPath.REASSOCIATED),    # N != M: no decay, lam gets 0
    (False, False, dict(N=21, M=29, H=2, G=1), LaunchPath.REASSOCIATED),  # MQA
])
def test_linear_kernel_takes_the_linear_plan(causal, normalize, shape, path, monkeypatch):
    """linear_kernel: the key weights kw fold into the keys' feature map, the decay is switched
    by `causal`, the normaliser by `normalize`; q, k, v, lam and kw gradients, GQA."""
    base = kernel_inputs(**shape)
    kernel, got, want, launched = run("examples/linear_kernel.attn", base,
                                      {"causal": causal, "normalize": normalize}, tuple(base), monkeypatch)
    assert kernel.generated.launcher.last_path == path
    check_linear_time(kernel, path, base, got, want, launched)


def test_linear_kernel_off_the_linear_paths():
    """Causal with N != M (the bottom-right mask `j <= i + (M - N)`): the forward streams rows
    (the normaliser switched in the kernel), the backward is the reference's, and says why."""
    base = {n: t.float() for n, t in kernel_inputs(N=9, M=13).items()}
    kernel = attncc.compile("examples/linear_kernel.attn", backend="triton")
    reference = attncc.compile("examples/linear_kernel.attn", backend="reference")
    for normalize in (True, False):
        o = kernel(**{n: t.requires_grad_() for n, t in base.items()}, causal=True, normalize=normalize)
        assert kernel.generated.launcher.last_path == LaunchPath.ROW_STREAMING
        assert kernel.last_run["backward"] == "reference"
        assert "linear-time paths only" in kernel.last_run["backward_reason"]
        want = reference(**{n: t.detach().double() for n, t in base.items()}, causal=True, normalize=normalize)
        close(o.detach(), want, f"o normalize={normalize}")


def test_the_reverse_scan_split_into_its_dk_and_dv_runs(monkeypatch):
    """On a GPU the chunked reverse scan runs once for dK and once for dV (fewer registers):
    the same gradients, run here in the interpreter (normaliser, decay, lam and kw)."""
    monkeypatch.setitem(row_backward.CHUNKED_REVERSE_RUNS, True, row_backward.CHUNKED_REVERSE_RUNS[False])
    base = kernel_inputs(N=21, M=21)
    kernel, got, want, launched = run("examples/linear_kernel.attn", base, {"causal": True, "normalize": True},
                                      tuple(base), monkeypatch)
    assert [kl.constexprs.get("DK") for kl in launched] == [None, True, False]
    for n in got:
        close(got[n], want[n], f"d{n}")
