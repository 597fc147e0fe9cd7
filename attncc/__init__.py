"""attncc: a declarative attention compiler.

    kernel = attncc.compile("examples/causal.attn")
    out = kernel(q=q, k=k, v=v)
"""
from .api import Kernel, compile, load
from .errors import ArgumentError, BackendError, ShapeError, SpecError

__all__ = ["compile", "load", "Kernel", "SpecError", "ArgumentError", "ShapeError", "BackendError"]
__version__ = "0.1.0"
