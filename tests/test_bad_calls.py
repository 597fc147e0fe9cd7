"""Bad calls: a clear ArgumentError / ShapeError naming the argument, or a result equal on
both backends; never a crash inside Triton, a ZeroDivisionError, or a silently wrong number.

Every case runs on both backends (the triton one in Triton's interpreter) through
`attncc.compile`, so the checks live where both go: `attncc/binding.py`.
"""
import math

import numpy as np
import pytest
import torch

import attncc
from attncc.errors import ArgumentError, ShapeError
from oracles.inputs import make_inputs

BACKENDS = ["triton", "reference"]
_KERNELS = {}


def kernel(name, backend):
    key = (name, backend)
    if key not in _KERNELS:
        _KERNELS[key] = attncc.compile(f"examples/{name}.attn", backend=backend)
    return _KERNELS[key]


def qkv(N=5, M=6, D=8, E=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return dict(q=torch.randn(1, 2, N, D, generator=g, dtype=dtype), k=torch.randn(1, 2, M, D, generator=g, dtype=dtype),
                v=torch.randn(1, 2, M, E, generator=g, dtype=dtype))


def square(N=16):
    x = qkv(N=N, M=N, E=8)
    return x


def both(name, **kwargs):
    """The results of both backends, which must agree."""
    t = kernel(name, "triton")(**kwargs)
    r = kernel(name, "reference")(**kwargs)
    assert t.dtype == r.dtype and t.shape == r.shape
    tol = 1e-2 if t.dtype in (torch.float16, torch.bfloat16) else 1e-4
    torch.testing.assert_close(t, r, rtol=tol, atol=tol)
    return t


# ---------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("qd,kd", [(torch.float16, torch.float32), (torch.float32, torch.float16),
                                   (torch.bfloat16, torch.float16)])
def test_mixed_float_dtypes_are_promoted_on_both_backends(qd, kd):
    """float16 q with float32 k/v crashed inside Triton (`tl.dot` of two types) while the
    reference took it: both now compute as if promoted; the output has q's dtype."""
    x = qkv()
    o = both("causal", q=x["q"].to(qd), k=x["k"].to(kd), v=x["v"].to(kd))
    assert o.dtype == qd


def test_mixed_dtypes_of_bias_inputs():
    x = qkv(dtype=torch.float16)
    both("alibi", **x, slopes=torch.tensor([0.5, 0.25]))
    g = torch.rand(1, 2, 6, dtype=torch.float16)
    both("reversed", **qkv(N=6, M=6), gate=g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsupported_element_types_are_named(backend):
    x = qkv()
    with pytest.raises(ArgumentError, match="argument 'q' must be a float tensor, got torch.float8"):
        kernel("causal", backend)(**{**x, "q": x["q"].to(torch.float8_e4m3fn)})
    with pytest.raises(ArgumentError, match="argument 'k' must be a float tensor, got torch.int64"):
        kernel("causal", backend)(**{**x, "k": x["k"].long()})
    with pytest.raises(ArgumentError, match="argument 'v' must be a float tensor, got torch.complex"):
        kernel("causal", backend)(**{**x, "v": x["v"].to(torch.complex64)})


# ---------------------------------------------------------------------- params with constraints

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [0, -1, -64])
def test_topk_blocks_block_must_be_positive(backend, block):
    with pytest.raises(ShapeError, match=r"block size .* must be at least 1, got -?\d+ \(block = -?\d+\)"):
        kernel("topk_blocks", backend)(**square(), block=block)


@pytest.mark.parametrize("backend", BACKENDS)
def test_permuted_blocks_block_must_be_positive(backend):
    x = square()
    perm = torch.stack([torch.randperm(16) for _ in range(2)])[None]
    with pytest.raises(ShapeError, match="block size"):
        kernel("permuted_blocks", backend)(**x, perm=perm, block=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigmoid_default_bias_with_no_keys(backend):
    """bias = -log(M) has no value at M = 0: say so; with a bias given, M = 0 gives zeros."""
    x = qkv(M=0)
    with pytest.raises(ShapeError, match="default of param 'bias'.*M = 0.*pass 'bias'"):
        kernel("sigmoid", backend)(**x)
    assert (kernel("sigmoid", backend)(**x, bias=-1.0) == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_head_dim_is_refused_where_the_scale_is_undefined(backend):
    """D = 0 under `D ** -0.5`: a ZeroDivisionError in the triton launcher, a silent value in
    the reference; now the same ShapeError naming the expression and D."""
    x = qkv(D=0)
    with pytest.raises(ShapeError, match=r"D \*\* -0\.5.*D = 0"):
        kernel("causal", backend)(**x)


def test_empty_dims_that_are_well_defined_work_alike():
    for kw in (qkv(M=0), qkv(N=0), {n: t[:0] for n, t in qkv().items()}, qkv(E=0)):
        both("causal", **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [2 ** 70, 2 ** 63 - 1, 2 ** 31 - 1, -(2 ** 40)])
def test_int_params_out_of_range_are_refused(backend, window):
    """2**70 crashed (int64 overflow); 2**31 - 1 and 2**63 - 1 reached the kernel and wrapped
    around in its index arithmetic: a wrong result with no error."""
    with pytest.raises(ShapeError, match="param 'window' = .* out of range"):
        kernel("sliding_window", backend)(**square(), window=window)


def test_large_int_params_within_range_agree():
    both("sliding_window", **square(), window=2 ** 30)
    both("sink_window", **square(), window=2 ** 30, sinks=2 ** 30)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), np.float32("nan")])
def test_non_finite_float_params_are_refused(backend, value):
    """nan gave nan on triton and 0 on the reference; inf turned cap * tanh(s / cap) into nan."""
    with pytest.raises(ShapeError, match="param 'cap' is .*: float params must be finite"):
        kernel("softcap", backend)(**qkv(), cap=value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_spec_requires_on_params(backend):
    """softcap needs cap > 0 (cap * tanh(s / cap) is undefined at 0: the backends disagreed);
    neighborhood_2d needs kernel >= 1 and dilation >= 1 (dilation 0 divided by zero)."""
    with pytest.raises(ShapeError, match="cap > 0"):
        kernel("softcap", backend)(**qkv(), cap=0.0)
    for bad in (dict(kernel=0), dict(dilation=0)):
        with pytest.raises(ShapeError, match="kernel >= 1 and dilation >= 1"):
            kernel("neighborhood_2d", backend)(**square(), height=4, width=4, **bad)


# ---------------------------------------------------------------------- how params are passed

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [np.int64(3), np.int32(3), np.array(3), torch.tensor(3), torch.tensor(3, dtype=torch.int16)])
def test_int_param_from_numpy_and_0d_tensors(backend, value):
    x = square()
    torch.testing.assert_close(kernel("sliding_window", backend)(**x, window=value),
                               kernel("sliding_window", backend)(**x, window=3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value,kind", [(True, "bool"), (3.0, "float"), (np.float64(3.0), "float"),
                                        (torch.tensor(3.0), "float"), ("3", "str"), ([3], "list"),
                                        (torch.tensor([3]), "shape")])
def test_int_param_of_a_wrong_kind(backend, value, kind):
    with pytest.raises(ArgumentError, match="param 'window'"):
        kernel("sliding_window", backend)(**square(), window=value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bool_and_float_params(backend):
    x = square()
    for v in (np.bool_(True), torch.tensor(True)):
        torch.testing.assert_close(kernel("linear_elu", backend)(**x, causal=v),
                                   kernel("linear_elu", backend)(**x, causal=True))
    for bad in (1, 0.0, "yes"):
        with pytest.raises(ArgumentError, match="param 'causal' must be a bool"):
            kernel("linear_elu", backend)(**x, causal=bad)
    torch.testing.assert_close(kernel("softcap", backend)(**x, cap=np.float32(2.0)),
                               kernel("softcap", backend)(**x, cap=2))
    with pytest.raises(ArgumentError, match="param 'cap' must be a float"):
        kernel("softcap", backend)(**x, cap=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_tensor_requiring_grad_is_refused(backend):
    """Its value is read as a number: the gradient would be silently lost."""
    cap = torch.tensor(2.0, requires_grad=True)
    with pytest.raises(ArgumentError, match="param 'cap' is a tensor that requires grad"):
        kernel("softcap", backend)(**qkv(), cap=cap)
    with torch.no_grad():  # no gradient wanted: fine
        kernel("softcap", backend)(**qkv(), cap=cap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_lse_must_be_a_bool(backend):
    with pytest.raises(ArgumentError, match="return_lse must be a bool"):
        kernel("causal", backend)(**qkv(), return_lse="yes")


# ---------------------------------------------------------------------- names

@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_keyword_names_the_closest_valid_one(backend):
    with pytest.raises(ArgumentError, match=r"unknown argument 'windw' \(did you mean 'window'\?\)"):
        kernel("sliding_window", backend)(**square(), windw=3)
    with pytest.raises(ArgumentError, match=r"'return_lses' \(did you mean 'return_lse'\?\)"):
        kernel("causal", backend)(**qkv(), return_lses=True)
    with pytest.raises(ArgumentError, match=r"unknown argument 'zzz'; it takes: q, k, v, window"):
        kernel("sliding_window", backend)(**square(), zzz=3)


# ---------------------------------------------------------------------- tensors

@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_tensors_are_refused(backend):
    x = {n: t.to("meta") for n, t in qkv().items()}
    with pytest.raises(ShapeError, match="argument 'q' is a meta tensor"):
        kernel("causal", backend)(**x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_tensors_are_refused(backend):
    x = qkv()
    with pytest.raises(ArgumentError, match="argument 'k' must be a dense"):
        kernel("causal", backend)(**{**x, "k": x["k"].to_sparse()})


def test_non_contiguous_and_expanded_inputs_work_alike():
    x = qkv(D=8)
    q = x["q"].transpose(2, 3).contiguous().transpose(2, 3)  # strides (.., 1, N)
    k = x["k"][:, :1].expand(1, 2, 6, 8)  # stride 0 over heads
    v = torch.randn(1, 2, 12, 4)[:, :, ::2]  # every other row
    both("causal", q=q, k=k, v=v)
    both("alibi", q=q, k=k, v=v, slopes=torch.tensor(0.5).expand(2))


def test_integer_tensors_cannot_require_grad():
    """torch itself refuses, so an int input never brings a gradient to lose."""
    with pytest.raises(RuntimeError, match="floating point"):
        torch.zeros(3, dtype=torch.long).requires_grad_(True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int_index_tensors_out_of_range(backend):
    """label_table reads allow[label_q, label_k]: the reference raised an IndexError, the
    generated kernel read outside `allow` and returned a number."""
    kw = make_inputs("label_table", dtype=torch.float32, B=1, H=1, N=5, M=6, D=8, E=4)
    bad = kw["label_q"].clone()
    bad[0, 2] = 3
    with pytest.raises(ShapeError, match="index 3 is out of range for dim 0 of 'allow' .*line 7.*argument 'label_q'"):
        kernel("label_table", backend)(**{**kw, "label_q": bad})
    bad[0, 2] = -1
    with pytest.raises(IndexError, match="index -1 is out of range.*'label_q'"):
        kernel("label_table", backend)(**{**kw, "label_q": bad})
    perm = torch.arange(16).repeat(1, 2, 1)
    perm[0, 0, 3] = 16
    with pytest.raises(ShapeError, match="index 16 is out of range for dim 2 of 'k' .*argument 'perm'"):
        kernel("permuted_blocks", backend)(**square(), perm=perm, block=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_inputs_on_different_devices():
    x = qkv()
    with pytest.raises(ShapeError, match="argument 'k' is on cuda"):
        kernel("causal", "reference")(**{**x, "k": x["k"].cuda()})


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_on_different_devices_meta_and_cpu(backend):
    x = qkv()
    with pytest.raises(ShapeError, match="argument 'k' is on meta but 'q' is on cpu"):
        kernel("causal", backend)(**{**x, "k": x["k"].to("meta")})


def test_no_nan_slipped_through_the_checks():
    assert not math.isnan(float(both("softcap", **qkv(), cap=1e-3).abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_division_by_a_call_time_zero_is_named(backend):
    """`j // (N - M)` is fine for N != M and has no value for N == M: the reference raised a
    bare ZeroDivisionError and the generated kernel returned numbers."""
    kernel = attncc.compile("""attention t(q[N,D], k[M,D], v[M,E]) -> o[N,E] {
  s[i,j] = q[i,d] * k[j,d]
  mask j // (N - M) <= i
  p = softmax(s, j)
  o[i,e] = p[i,j] * v[j,e]
}""", backend=backend)
    kernel(q=torch.randn(5, 4), k=torch.randn(4, 4), v=torch.randn(4, 3))
    with pytest.raises(ShapeError, match=r"divisor of `//` \(line 3\).* is 0 for this call: M = 5, N = 5"):
        kernel(q=torch.randn(5, 4), k=torch.randn(5, 4), v=torch.randn(5, 3))


def test_a_read_out_of_range_on_the_reference_points_at_the_spec():
    """A spec expression that indexes a table outside its size (no clamp) is the reference's
    IndexError with file:line:col and a caret, not a bare index."""
    kernel = attncc.compile("""attention rb(q[N,D], k[M,D], v[M,E], table[W]) -> o[N,E] {
  s[i,j] = q[i,d] * k[j,d]
  s += table[j - i + 2]
  p = softmax(s, j)
  o[i,e] = p[i,j] * v[j,e]
}""", backend="reference")
    with pytest.raises(IndexError, match=r"<string>:3:8: error: index -1 is out of range for dim 0 of 'table' "
                                         r"\(size 5\) at j = 0, i = 3, and no mask over these indices guards"
                                         r"[\s\S]*\^\^\^[\s\S]*expected indices inside the tensor"):
        kernel(q=torch.randn(5, 4), k=torch.randn(5, 4), v=torch.randn(5, 3), table=torch.randn(5))
