"""attncc: a declarative attention compiler.

    kernel = attncc.compile("examples/causal.attn")
    out = kernel(q=q, k=k, v=v)

or, the same spec as a Python function (docs/python.md):

    @attncc.attention
    def causal(q: "B,H,N,D", k: "B,H,M,D", v: "B,H,M,E") -> "B,H,N,E": ...

or as a module with learnable inputs: `attncc.nn.Attention("alibi", learn={"slopes": ...})`.
"""
from . import nn
from .api import Kernel, compile, load
from .decorator import attention
from .errors import ArgumentError, BackendError, ShapeError, SpecError, SpecWarning
from .flex import create_block_mask, flex_attention

__all__ = ["compile", "load", "attention", "nn", "Kernel", "SpecError", "SpecWarning", "ArgumentError", "ShapeError",
           "BackendError", "flex_attention", "create_block_mask"]
__version__ = "0.1.0"
