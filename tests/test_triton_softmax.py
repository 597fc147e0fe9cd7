"""Generated Triton kernels (run in the Triton interpreter) against the reference executor.

Every softmax-family example runs through `backend="triton"` on odd shapes: N = 37 is no
multiple of the 16-wide interpreter tiles, N != M where the contract allows it, D = 24 and
E = 12 are no powers of two (padded inside the kernel), and gqa_causal has G = H / 2. Each
test checks outputs and LSE, and that the generated kernel really ran.
"""
import pytest
import torch

import attncc
from oracles.inputs import SOFTMAX_FAMILY, SQUARE, make_inputs

SHAPE = dict(B=2, H=2, N=37, M=45, D=24, E=12)


def inputs(name, dtype=torch.float32, **shape):
    s = {**SHAPE, **shape}
    if name in SQUARE:
        s["M"] = None
    if name == "gqa_causal":
        s.update(H=4, G=2)
    return make_inputs(name, dtype=dtype, **s)


def run_triton(name, kwargs, return_lse=True):
    kernel = attncc.compile(f"examples/{name}.attn", backend="triton")
    assert kernel.backend == "triton"
    out = kernel(**kwargs, return_lse=return_lse)
    assert kernel.last_run["backend"] == "triton" and kernel.last_run["interpreted"]
    return out


def reference(name, kwargs, return_lse=True):
    return attncc.compile(f"examples/{name}.attn", backend="reference")(**kwargs, return_lse=return_lse)


@pytest.mark.parametrize("name", SOFTMAX_FAMILY)
def test_generated_kernel_matches_reference(name):
    kwargs = inputs(name)
    o, lse = run_triton(name, kwargs)
    ro, rlse = reference(name, kwargs)
    torch.testing.assert_close(o, ro, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, rlse, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,shape", [
    ("dense", dict(N=5, M=70, D=64, E=64)),          # decode-like, few queries
    ("causal", dict(N=70, M=33, D=16, E=40)),        # more queries than keys: empty rows
    ("sliding_window", dict(N=50, D=8, E=8)),        # head dim below the 16-wide dot
    ("sink_window", dict(N=64, D=16, E=16)),         # tile-aligned
])
def test_generated_kernel_edge_shapes(name, shape):
    kwargs = inputs(name, **shape)
    o, lse = run_triton(name, kwargs)
    ro, rlse = reference(name, kwargs)
    torch.testing.assert_close(o, ro, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, rlse, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,dtype", [("causal", torch.float16), ("document", torch.float16),
                                        ("alibi", torch.bfloat16), ("gqa_causal", torch.bfloat16)])
def test_half_precision(name, dtype):
    kwargs = inputs(name, dtype=dtype)
    o = run_triton(name, kwargs, return_lse=False)
    assert o.dtype == dtype
    wide = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    torch.testing.assert_close(o.float(), reference(name, wide, return_lse=False), rtol=2e-2, atol=2e-2)


def test_params_change_the_generated_kernels_result():
    """The window reaches the kernel as an argument: a different window gives a different result."""
    kwargs = inputs("sliding_window")
    narrow = run_triton("sliding_window", {**kwargs, "window": 2}, return_lse=False)
    wide = run_triton("sliding_window", {**kwargs, "window": 30}, return_lse=False)
    torch.testing.assert_close(narrow, reference("sliding_window", {**kwargs, "window": 2}, return_lse=False),
                               rtol=1e-4, atol=1e-5)
    assert (narrow - wide).abs().max() > 1e-3


def test_block_map_is_cached_until_the_tensor_changes():
    kernel = attncc.compile("examples/document.attn", backend="triton")
    kwargs = inputs("document")
    kernel(**kwargs)
    launcher = kernel.generated.launcher
    first = launcher.last_block_map
    kernel(**kwargs)
    assert launcher.last_block_map is first, "an unchanged doc tensor must reuse its block map"
    kwargs["doc"].zero_()  # in place: same storage, new version
    o = kernel(**kwargs)
    assert launcher.last_block_map is not first
    torch.testing.assert_close(o, reference("document", kwargs, return_lse=False), rtol=1e-4, atol=1e-5)


def test_unsupported_spec_raises_instead_of_falling_back():
    two_outputs = """attention two_outputs(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> (o[B,H,N,E], p[B,H,N,M]) {
      s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d]
      p = softmax(s, j)
      o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
    }"""
    with pytest.raises(attncc.BackendError, match="backend='reference'"):
        attncc.compile(two_outputs, backend="triton")
    assert attncc.compile(two_outputs, backend="auto").backend == "reference" or torch.cuda.is_available()


def test_float64_is_refused_by_the_triton_backend():
    kernel = attncc.compile("examples/dense.attn", backend="triton")
    with pytest.raises(attncc.BackendError, match="float64"):
        kernel(**inputs("dense", dtype=torch.float64))


def test_clear_error_when_triton_was_imported_outside_the_interpreter():
    """Without TRITON_INTERPRET=1 at start-up, importing triton first breaks its interpreter;
    attncc says what to do instead of failing deep inside the kernel."""
    import os
    import subprocess
    import sys

    code = ("import triton, torch, attncc\n"
            "q = torch.randn(1, 1, 8, 16)\n"
            "try:\n"
            "    attncc.compile('examples/dense.attn', backend='triton')(q=q, k=q, v=q)\n"
            "except attncc.BackendError as err:\n"
            "    print('BackendError:', err)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "BackendError:" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


def test_other_layouts_and_strided_inputs():
    """Sequence-first layout (q[B,N,H,D]) and non-contiguous views: the kernel follows strides."""
    spec = """attention bnhd(q[B,N,H,D], k[B,M,H,D], v[B,M,H,E]) -> o[B,N,H,E] {
      s[b,h,i,j] = q[b,i,h,d] * k[b,j,h,d] * D ** -0.5
      mask j <= i + (M - N)
      p = softmax(s, j)
      o[b,i,h,e] = p[b,h,i,j] * v[b,j,h,e]
    }"""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 37, 16, generator=g).transpose(1, 2)  # a strided view [B, N, H, D]
    k = torch.randn(2, 45, 3, 32, generator=g)[..., ::2]         # every other feature
    v = torch.randn(2, 45, 3, 8, generator=g)
    o, lse = run_spec(spec, dict(q=q, k=k, v=v))
    ro, rlse = attncc.compile(spec, backend="reference")(q=q, k=k, v=v, return_lse=True)
    assert o.shape == (2, 37, 3, 8)
    torch.testing.assert_close(o, ro, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, rlse, rtol=1e-4, atol=1e-5)


def run_spec(spec, kwargs):
    kernel = attncc.compile(spec, backend="triton")
    out = kernel(**kwargs, return_lse=True)
    assert kernel.last_run["backend"] == "triton"
    return out


@pytest.mark.parametrize("name", ["causal", "document"])
def test_full_tiles_can_be_masked_too(name):
    """FULL_MASKED (a tuned plan choice) masks every tile; the result is the same."""
    kwargs = inputs(name)
    kernel = attncc.compile(f"examples/{name}.attn", backend="triton")
    call = attncc.binding.bind(kernel.program, kwargs)
    split = kernel.generated.launcher(call, True, {"FULL_MASKED": False})
    masked = kernel.generated.launcher(call, True, {"FULL_MASKED": True})
    for a, b in zip(split, masked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_auto_runs_calls_triton_cannot_take_on_the_reference_and_says_why():
    """A float64 call to a kernel `auto` compiled for triton runs on the reference, and
    `last_run` says so and why; asking for triton explicitly raises instead."""
    kwargs = inputs("dense", dtype=torch.float64)
    kernel = attncc.compile("examples/dense.attn", backend="triton")
    kernel.chosen_automatically = True  # what compile(backend="auto") sets on a GPU machine
    out = kernel(**kwargs)
    assert kernel.last_run["backend"] == "reference" and "float64" in kernel.last_run["reason"]
    torch.testing.assert_close(out, reference("dense", kwargs, return_lse=False))
    kernel.chosen_automatically = False
    with pytest.raises(attncc.BackendError, match="float64"):
        kernel(**kwargs)
