"""A training step traced by `torch.compile(fullgraph=True)` against the same step run eagerly,
both on a kernel's generated backward."""
import torch


def compiled_and_eager_gradients(kernel, step, kwargs: dict, floats: list) -> tuple:
    """(compiled gradients, eager gradients) of `step(**kwargs)` with respect to `floats`;
    both runs must have taken the generated backward."""
    want = torch.autograd.grad(step(**kwargs), floats)
    assert kernel.last_run["backward"] == "triton"
    kernel.last_run = None
    got = torch.autograd.grad(torch.compile(step, fullgraph=True, backend="aot_eager")(**kwargs), floats)
    assert kernel.last_run["backward"] == "triton" and "backward_reason" not in kernel.last_run
    return got, want
