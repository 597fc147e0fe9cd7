"""TMA tensor descriptors (`USE_TMA`): on Hopper the row-streaming kernels load q, k and v as
boxes of per-(batch, head) [rows, features] views, zero-filled past the last row and
feature instead of masked. Triton's interpreter runs tensor descriptors, so the same
kernel text is checked here with the TMA path forced (`USE_TMA=True`) on odd shapes; the
launcher keeps the pointer path where descriptors cannot describe an operand."""
import contextlib

import pytest
import torch
import triton.language as tl

import attncc
from attncc.binding import bind
from oracles.inputs import SQUARE, make_inputs

# Triton before 3.4 has no device-side descriptors: the launcher then always takes pointers
pytestmark = pytest.mark.skipif(not hasattr(tl, "make_tensor_descriptor"), reason="this Triton has no tl.make_tensor_descriptor")


def run(name, kwargs, config, spec=None):
    kernel = attncc.compile(spec or f"examples/{name}.attn", backend="triton")
    ref = attncc.compile(spec or f"examples/{name}.attn", backend="reference")
    launcher = kernel.generated.launcher
    lse = kernel.generated.plan.has_lse and not kernel.generated.plan.statistics_only
    out = launcher(bind(kernel.program, kwargs), lse, config, count_tiles=True)  # always row streaming
    expected = ref(**kwargs, return_lse=lse)
    return out, expected if lse else [expected], launcher


@pytest.mark.parametrize("name,shape,config", [
    ("causal", dict(N=37, M=45), {}),
    ("dense", dict(N=37, M=45), {}),
    ("sliding_window", dict(N=45), {}),
    ("document", dict(N=45), {}),                    # block map
    ("softcap", dict(N=37, M=45), {}),
    ("differential", dict(N=37, M=45), {}),          # two terms, two q and k tensors
    ("linear_elu", dict(N=37, M=45), {}),            # feature maps on q and k
    ("gqa_causal", dict(N=37, M=45, H=4, G=2), {"GQA_PACK": False}),
    ("gqa_causal", dict(N=37, M=45, H=8, G=2), {"GQA_PACK": True, "BLOCK_M": 32}),  # k, v by TMA; q packed
    ("gqa_causal", dict(N=5, M=90, H=8, G=2), {"GQA_PACK": True, "SPLIT_KV": 3}),
])
def test_tma_path_matches_reference(name, shape, config):
    s = {"B": 2, "H": 2, "D": 16, "E": 12, **shape}
    if name in SQUARE:
        s["M"] = None
    kwargs = make_inputs(name, dtype=torch.float32, **s)
    out, expected, launcher = run(name, kwargs, {"USE_TMA": True, **config})
    assert launcher.last_tma
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _uses_tma(name, kwargs, config=None):
    kernel = attncc.compile(f"examples/{name}.attn", backend="triton")
    launches = kernel.generated.launcher.launches(bind(kernel.program, kwargs), False,
                                                  {"USE_TMA": True, **(config or {})})
    return [k.constexprs["USE_TMA"] for k in launches if "USE_TMA" in k.constexprs]


def test_pointer_path_for_layouts_tma_cannot_take():
    base = make_inputs("dense", B=1, H=2, N=32, D=16, E=16, dtype=torch.float16)
    assert _uses_tma("dense", base) == [True]
    # features not contiguous: a transposed k
    k = base["k"].transpose(-1, -2).contiguous().transpose(-1, -2)
    assert _uses_tma("dense", dict(base, k=k)) == [False]
    # a row stride of 24 bytes (12 half-precision features)
    odd = make_inputs("dense", B=1, H=2, N=32, D=12, E=16, dtype=torch.float16)
    assert _uses_tma("dense", odd) == [False]
    # a base address off 16 bytes
    v = torch.empty(base["v"].numel() + 1, dtype=torch.float16)[1:].view(base["v"].shape)
    assert _uses_tma("dense", dict(base, v=v)) == [False]
    # the interpreter and pre-Hopper devices default to pointers
    assert _uses_tma("dense", base, {"USE_TMA": None}) == [False]
    assert _uses_tma("dense", base, {"USE_TMA": False}) == [False]


TEMPERATURE = """
attention tempered(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> o[B,H,N,E] {
  param temp: float = 1.0
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * temp
  mask j <= i
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
}
"""


@pytest.mark.parametrize("temp,folded", [(0.7, True), (-0.7, False), (0.0, False)])
@pytest.mark.parametrize("tma", [False, True])
def test_score_scale_folds_into_exp2_only_when_positive(temp, folded, tma):
    """`FOLD_SCALE`: a positive scale is applied inside the exp2 argument (max of the raw
    scores times the scale); a negative or zero one multiplies the scores first."""
    kwargs = dict(make_inputs("causal", B=1, H=2, N=37, M=37, D=16, E=12, dtype=torch.float32), temp=temp)
    kernel = attncc.compile(TEMPERATURE, backend="triton")
    call = bind(kernel.program, kwargs)
    (launch,) = kernel.generated.launcher.launches(call, True, {"USE_TMA": tma})
    assert launch.constexprs["FOLD_SCALE"] is folded
    out, expected, _ = run(None, kwargs, {"USE_TMA": tma}, spec=TEMPERATURE)
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_tma_form_that_does_not_build_runs_with_pointers_and_says_so(monkeypatch):
    """ptxas of Triton 3.6 crashes on the TMA form of some kernels at some tile configs:
    the call must still run the generated kernel (pointer loads), warn, and say why."""
    from attncc import runtime

    real_run = runtime.KernelLaunch.run
    failed = []

    def run(self):
        if self.constexprs.get("USE_TMA"):
            failed.append(self.kernel.__name__)
            raise RuntimeError("PTXAS error: `ptxas` failed with error code -11")
        return real_run(self)

    monkeypatch.setattr(runtime.KernelLaunch, "run", run)
    kwargs = make_inputs("causal", dtype=torch.float32, B=1, H=2, N=37, M=45, D=16, E=12)
    kernel = attncc.compile("examples/causal.attn", backend="triton")
    kernel.tuning_cache = None
    monkeypatch.setattr(kernel, "tuned_config", lambda call: {"USE_TMA": True})
    want = attncc.compile("examples/causal.attn", backend="reference")(**kwargs)
    for attempt in range(2):
        with pytest.warns(RuntimeWarning, match="did not build") if attempt == 0 else contextlib.nullcontext():
            got = kernel(**kwargs)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert kernel.last_run["backend"] == "triton"
        assert "ptxas" in kernel.last_run["tma_fallback"]
    assert len(failed) == 1  # remembered: the second call does not try the TMA form again


# ---------------------------------------------------------------------------------------------
# the generated backward (delta, dK/dV, dQ): q, k, v and dO by TMA boxes, dQ, dK, dV stored by them

SPLIT_TILES = {"dkdv": {"BLOCK_M": 16, "BLOCK_N": 32}, "dq": {"BLOCK_M": 32, "BLOCK_N": 16}}


def backward(name, shape, config):
    """(gradients of every float input from the generated backward with `config`, the float64
    reference's, the backward launcher) for loss = <o, w>, dO given as autograd gives it for
    `(o * w).sum()` (a contiguous tensor) or, for `o.sum()`, a broadcast (strides 0)."""
    s = {"B": 1, "H": 2, "D": 16, "E": 12, **shape}
    if name in SQUARE:
        s["M"] = None
    kwargs = make_inputs(name, dtype=torch.float32, **s)
    kernel = attncc.compile(f"examples/{name}.attn", backend="triton")
    call = bind(kernel.program, kwargs)
    lse = kernel.generated.plan.has_lse
    o, *rest = kernel.generated.launcher(call, lse)
    wanted = sorted(n for n, t in kwargs.items() if torch.is_tensor(t) and t.is_floating_point())
    grad_o = torch.randn_like(o) if name != "alibi" else torch.ones(()).expand(o.shape)
    launcher = kernel.backward_launcher()
    got = launcher.gradients(call, o, rest[0] if rest else None, grad_o, None, set(wanted), config)
    leaves = {n: t.detach().double().requires_grad_(n in wanted) if n in wanted else t for n, t in kwargs.items()}
    ref = attncc.compile(f"examples/{name}.attn", backend="reference")
    want = torch.autograd.grad(ref(**leaves), [leaves[n] for n in wanted], grad_o.double())
    return {n: got[n] for n in wanted}, dict(zip(wanted, want)), launcher


@pytest.mark.parametrize("name,shape,config", [
    ("causal", dict(N=37, M=45), {}),                   # symbolic query ranges for dK/dV
    ("document", dict(N=45), SPLIT_TILES),              # block map, at dK/dV's and dQ's own tiles
    ("gqa_causal", dict(N=37, M=45, H=4, G=2), {}),     # K/V heads shared by query heads
    ("alibi", dict(N=37, M=45), SPLIT_TILES),           # a row-sum read (slopes); dO a broadcast
])
@pytest.mark.parametrize("tma", [True, False])
def test_tma_backward_matches_reference(name, shape, config, tma):
    got, want, launcher = backward(name, shape, {**config, "USE_TMA": tma})
    parts = [part for part, _ in launcher.parts] if hasattr(launcher, "parts") else [launcher]
    assert all(part.last_tma is tma for part in parts) and launcher.last_tma_fallback is None
    for n in want:
        scale = want[n].abs().max().item()
        assert (got[n].double() - want[n]).abs().max().item() <= 1e-4 * scale, n


def test_backward_pointer_path_for_layouts_tma_cannot_take():
    """The backward takes TMA boxes where the forward would (and its fp32 gradients' rows are
    16-byte multiples); a layout that cannot take them runs the pointer path."""
    kernel = attncc.compile("examples/dense.attn", backend="triton")

    def uses_tma(kwargs, config=None):
        launches = kernel.backward_launcher().launches(bind(kernel.program, kwargs), False,
                                                       {"USE_TMA": True, **(config or {})})
        return {k.role.value: k.constexprs["USE_TMA"] for k in launches if "USE_TMA" in k.constexprs}

    base = make_inputs("dense", B=1, H=2, N=32, D=16, E=16, dtype=torch.float16)
    assert uses_tma(base) == {"bwd_dkdv": True, "bwd_dq": True}
    k = base["k"].transpose(-1, -2).contiguous().transpose(-1, -2)  # features not contiguous
    assert uses_tma(dict(base, k=k)) == {"bwd_dkdv": False, "bwd_dq": False}
    odd = make_inputs("dense", B=1, H=2, N=32, D=16, E=6, dtype=torch.float32)  # dV rows of 24 bytes
    assert uses_tma(odd) == {"bwd_dkdv": False, "bwd_dq": False}
    assert uses_tma(base, {"USE_TMA": None}) == {"bwd_dkdv": False, "bwd_dq": False}  # the interpreter


def test_a_backward_tma_form_that_does_not_build_runs_with_pointers_and_says_so(monkeypatch):
    from attncc import row_backward, runtime

    real_run, real_default = runtime.KernelLaunch.run, row_backward.default_backward_config
    failed = []

    def run(self):
        if self.constexprs.get("USE_TMA") and self.role == runtime.KernelRole.BWD_DKDV:
            failed.append(self.kernel.__name__)
            raise RuntimeError("PTXAS error: `ptxas` failed with error code -11")
        return real_run(self)

    monkeypatch.setattr(runtime.KernelLaunch, "run", run)
    monkeypatch.setattr(row_backward, "default_backward_config",
                        lambda *a: {**real_default(*a), "USE_TMA": True})  # as on Hopper
    kwargs = make_inputs("causal", dtype=torch.float32, B=1, H=2, N=37, M=45, D=16, E=12)
    leaves = {n: t.requires_grad_() for n, t in kwargs.items()}
    kernel = attncc.compile("examples/causal.attn", backend="triton")
    ref = attncc.compile("examples/causal.attn", backend="reference")
    want = torch.autograd.grad((ref(**leaves) ** 2).sum(), list(leaves.values()))
    for attempt in range(2):
        with pytest.warns(RuntimeWarning, match="did not build") if attempt == 0 else contextlib.nullcontext():
            got = torch.autograd.grad((kernel(**leaves) ** 2).sum(), list(leaves.values()))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert kernel.last_run["backward"] == "triton"
        assert "ptxas" in kernel.last_run["backward_tma_fallback"]
    assert len(failed) == 1  # remembered: the second backward does not try the TMA form again
