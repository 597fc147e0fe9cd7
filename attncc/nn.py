"""Compiled specs as `torch.nn.Module`s, with learnable inputs.

    attn = attncc.nn.Attention("alibi", learn={"slopes": 2.0 ** -torch.arange(1, 9.0)})
    o = attn(q, k, v)                   # slopes is attn.slopes, an nn.Parameter

The float inputs named in `learn` become `nn.Parameter`s of the module (in `state_dict`,
moved by `.to(device)`, trained by any optimizer, synchronised by DDP); the other inputs and
the params are passed at each call, positionally in the spec's order or by keyword. Calls go
through the kernel, so `torch.compile(model, fullgraph=True)` traces them as the kernel's
`torch.library` operator (docs/training.md).
"""
from __future__ import annotations

import torch

from . import ir
from .api import Kernel, compile as compile_spec
from .errors import ArgumentError


class Attention(torch.nn.Module):
    """A spec (a path, a gallery name, its text, or a compiled / decorated `Kernel`) as a module.

    learn: float input name -> initial value (a tensor, or anything `torch.as_tensor` takes);
    each becomes a float32 `nn.Parameter` registered under the input's name.
    backend, deterministic: as for `attncc.compile` (ignored when `spec` is a `Kernel`).
    """

    def __init__(self, spec, *, learn: dict | None = None, backend: str = "auto", deterministic: bool = False):
        super().__init__()
        self.kernel = spec if isinstance(spec, Kernel) else \
            compile_spec(spec, backend=backend, deterministic=deterministic)
        inputs = self.kernel.program.inputs
        self.learned: tuple[str, ...] = tuple(learn or {})
        for name, value in (learn or {}).items():
            node = inputs.get(name)
            if node is None or node.dtype != ir.FLOAT:
                floats = [n for n, i in inputs.items() if i.dtype == ir.FLOAT]
                raise ArgumentError(f"{self.kernel.name}: only float inputs can be learned; '{name}' is "
                                    f"{'not an input' if node is None else f'a {node.dtype} input'} "
                                    f"(float inputs: {', '.join(floats)})")
            if not name.isidentifier() or hasattr(torch.nn.Module, name) or name in ("kernel", "learned"):
                raise ArgumentError(f"{self.kernel.name}: the input '{name}' cannot be a module attribute")
            initial = torch.as_tensor(value, dtype=torch.float32).detach().clone()
            if initial.dim() != len(node.dims):
                raise ArgumentError(f"{self.kernel.name}: the initial value of '{name}' has {initial.dim()} dims, "
                                    f"the input has {len(node.dims)} [{', '.join(str(d) for d in node.dims)}]")
            self.register_parameter(name, torch.nn.Parameter(initial))
        self.passed = tuple(n for n in inputs if n not in self.learned)  # the inputs a call gives

    def forward(self, *args, **kwargs):
        if len(args) > len(self.passed):
            raise ArgumentError(f"{self.kernel.name} takes at most {len(self.passed)} positional inputs "
                                f"({', '.join(self.passed)}), got {len(args)}")
        for name, value in zip(self.passed, args):
            if name in kwargs:
                raise ArgumentError(f"{self.kernel.name}: '{name}' given both by position and by keyword")
            kwargs[name] = value
        for name in self.learned:
            if name in kwargs:
                raise ArgumentError(f"{self.kernel.name}: '{name}' is a learned parameter of the module "
                                    f"(`module.{name}`), not an argument")
            kwargs[name] = getattr(self, name)
        return self.kernel(**kwargs)

    def extra_repr(self) -> str:
        learned = f", learn={list(self.learned)}" if self.learned else ""
        return f"{self.kernel.name}, backend={self.kernel.backend!r}{learned}"
