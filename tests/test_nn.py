"""`attncc.nn.Attention`: a spec as an nn.Module whose chosen float inputs are Parameters."""
import copy

import pytest
import torch

import attncc
from attncc.errors import ArgumentError

B, H, N, D, E = 2, 4, 11, 8, 6


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g), \
        torch.randn(B, H, N, E, generator=g)


def slopes():
    return 2.0 ** -torch.arange(1, H + 1, dtype=torch.float32)


def test_learned_inputs_are_parameters_that_train():
    attn = attncc.nn.Attention("alibi", learn={"slopes": slopes()}, backend="reference")
    assert [n for n, _ in attn.named_parameters()] == ["slopes"]
    assert set(attn.state_dict()) == {"slopes"} and "alibi" in repr(attn)
    q, k, v = qkv()
    out = attn(q, k, v)  # positional in the spec's order, learned inputs left out
    want = attncc.compile("alibi", backend="reference")(q=q, k=k, v=v, slopes=slopes())
    torch.testing.assert_close(out, want)
    out.square().mean().backward()
    assert attn.slopes.grad is not None and float(attn.slopes.grad.abs().sum()) > 0
    before = attn.slopes.detach().clone()
    torch.optim.SGD(attn.parameters(), lr=0.1).step()
    assert not torch.equal(before, attn.slopes.detach())


def test_state_dict_round_trip_and_copies():
    a = attncc.nn.Attention("alibi", learn={"slopes": slopes()}, backend="reference")
    b = attncc.nn.Attention("alibi", learn={"slopes": torch.zeros(H)}, backend="reference")
    b.load_state_dict(a.state_dict())
    q, k, v = qkv(1)
    torch.testing.assert_close(a(q, k, v), b(q=q, k=k, v=v))
    c = copy.deepcopy(a)
    torch.testing.assert_close(c(q, k, v), a(q, k, v))
    assert a.to(torch.float64).slopes.dtype == torch.float64


def test_compiled_training_step_matches_eager():
    torch._dynamo.reset()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(D, D)
            self.attn = attncc.nn.Attention("alibi", learn={"slopes": slopes()}, backend="reference")

        def forward(self, x, v):
            q = self.proj(x)
            return self.attn(q, x, v).square().mean()

    torch.manual_seed(0)
    eager = Block()
    compiled_model = copy.deepcopy(eager)
    step = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x, _, v = qkv(2)
    eager(x, v).backward()
    step(x, v).backward()
    for (name, p), (_, pc) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(p.grad, pc.grad, msg=name)


def test_misuse_is_refused():
    with pytest.raises(ArgumentError, match="only float inputs can be learned"):
        attncc.nn.Attention("document", learn={"doc": torch.zeros(1, 1)}, backend="reference")
    with pytest.raises(ArgumentError, match="has 2 dims"):
        attncc.nn.Attention("alibi", learn={"slopes": torch.zeros(2, 2)}, backend="reference")
    attn = attncc.nn.Attention("alibi", learn={"slopes": slopes()}, backend="reference")
    q, k, v = qkv()
    with pytest.raises(ArgumentError, match="learned parameter of the module"):
        attn(q, k, v, slopes=slopes())
    with pytest.raises(ArgumentError, match="at most 3 positional inputs"):
        attn(q, k, v, v)
