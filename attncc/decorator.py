"""`@attncc.attention`: an attention spec written as a Python function.

    @attncc.attention
    def causal(q: "B,H,N,D", k: "B,H,M,D", v: "B,H,M,E") -> "B,H,N,E":
        s[b, h, i, j] = q[b, h, i, d] * k[b, h, j, d] * D ** -0.5
        mask(j <= i + (M - N))
        p = softmax(s, j)
        o[b, h, i, e] = p[b, h, i, j] * v[b, h, j, e]
        return o

    o = causal(q=q, k=k, v=v)

The body is the attncc language in Python's syntax (docs/python.md); it is never executed.
Decorating reads the function's source (`inspect`, as `triton.jit` does) and translates it
into the spec's syntax tree (`attncc.pyspec`), so a construct the language lacks is a
`SpecError` at once, at the file's line and column. The result is an `attncc.Kernel`: the spec
is checked and its kernel generated on first use (the first call, or the first look at
`program`, `signature`, `backend`, ...), then kept. Decorating the same source again (a
function defined in a loop, a module reloaded, a notebook cell run again) gives the same
object back, already compiled.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
import sys
import threading
from pathlib import Path

from . import pipeline
from .api import BACKENDS, Kernel, choose_backend, too_deep
from .api import compile as compile_spec
from .errors import BackendError, SpecError
from .pyspec import FunctionSource, function_source, translate

STAGES = pipeline.NAMES  # what `AttentionFunction.show` prints: ast (the .attn text), ir, plan, triton

_LOCK = threading.RLock()
# (file, first line, sha256 of the source, backend, reference_block) -> the decorated kernel
_DECORATED: dict[tuple, "AttentionFunction"] = {}
# What `Kernel.__init__` sets: looking one of these up on a kernel not compiled yet compiles it.
_KERNEL_ATTRIBUTES = frozenset(Kernel.__init__.__code__.co_names)


def attention(fn=None, /, *, backend: str = "auto", reference_block: int = 256):
    """Decorate a function written in the attncc language: `@attncc.attention`, or
    `@attncc.attention(backend="reference")`. The result is a `Kernel` (an `AttentionFunction`)
    called with keyword tensors like the kernels of `attncc.compile`, with the same `backend`
    ("auto", "triton", "reference") and `reference_block` options."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend '{backend}'; available: {', '.join(BACKENDS)}")
    if fn is None:
        return functools.partial(attention, backend=backend, reference_block=reference_block)
    try:
        found = function_source(fn)
        key = (found.filename, found.first_line, hashlib.sha256(found.text.encode()).hexdigest(), backend,
               reference_block)
        with _LOCK:
            kernel = _DECORATED.get(key)
            if kernel is None:
                kernel = _DECORATED[key] = AttentionFunction(fn, found, backend, reference_block)
        return kernel
    except SpecError as err:  # the error points into the user's file: attncc's frames add nothing
        raise err.with_traceback(None) from None


class AttentionFunction(Kernel):
    """A function decorated with `@attncc.attention`: a `Kernel` compiled on first use.

    `spec` is its syntax tree (positions in the Python file), `show(stage)` its text at a
    compiler stage (`"ast"`: the equivalent .attn spec), `compiled` whether the spec has been
    checked and its kernel made. Everything else is `Kernel`'s: calls with keyword tensors,
    `backend`, `signature`, `program`, `generated`, `last_run`, `tune()`, `return_lse=True`.
    """

    def __init__(self, fn, found: FunctionSource, backend: str, reference_block: int):
        # Kernel.__init__ runs in `_compile`, on first use.
        self._compiled = False
        self._options = (backend, reference_block)
        self.function_source = found
        self.spec = translate(found)
        functools.update_wrapper(self, fn)

    @property
    def compiled(self) -> bool:
        return self._compiled

    def _compile(self):
        with _LOCK:
            if self._compiled:
                return
            backend, reference_block = self._options
            try:
                program = pipeline.checked_program(self.spec)
            except RecursionError:
                raise too_deep(self.spec.source.text, self.spec.source.filename) from None
            except SpecError as err:  # located in the user's file: attncc's frames add nothing
                raise err.with_traceback(None) from None
            ran, generated = choose_backend(program, backend)
            Kernel.__init__(self, program, ran, reference_block, generated)
            self.chosen_automatically = backend == "auto" and ran == "triton"
            self._compiled = True

    def __getattr__(self, name: str):
        # Only reached for attributes not set yet, i.e. before the first use.
        if name == "last_run":
            return None
        if name == "name":
            return self.spec.name
        if name in _KERNEL_ATTRIBUTES and not self.__dict__.get("_compiled", True):
            self._compile()
            return getattr(self, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self):
        if not self._compiled:
            fs = self.function_source
            return f"<attncc.attention {self.spec.name} from {fs.filename}:{fs.first_line}, not compiled yet>"
        return super().__repr__()

    def show(self, stage: str = "ast") -> str:
        """The spec at one compiler stage, as `attncc show --stage STAGE module:function` prints
        it: "ast" the equivalent .attn text, "ir" the checked IR, "plan" the Triton plan,
        "triton" the generated module (the last two need a spec the triton backend generates)."""
        from .plan_report import format_plan
        from .printer import format_attn, format_ir

        if stage not in STAGES:
            raise ValueError(f"unknown stage '{stage}'; the stages are {', '.join(STAGES)}")
        if stage == "ast":
            return format_attn(self.spec)
        if stage == "ir":
            return format_ir(self.program)
        kernel = self if self.backend == "triton" else compile_spec(self, "triton")
        return format_plan(kernel) if stage == "plan" else kernel.generated.source.source


def import_function(ref: str) -> AttentionFunction:
    """The decorated function that `module:function` names (the CLI's `attncc show
    module:function`): `package.module:name`, imported with the working directory on the
    import path, or `path/to/file.py:name`. Importing runs the module's code."""
    where, _, attr = ref.rpartition(":")
    if not where or not attr:
        raise ValueError(f"'{ref}' is not MODULE:FUNCTION")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise FileNotFoundError(f"no Python file {where}")
            name = "attncc_user_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(where)
    except ImportError as err:
        raise ValueError(f"cannot import '{where}': {err}") from None
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"'{where}' has no attribute '{attr}'") from None
    if not isinstance(obj, AttentionFunction):
        raise ValueError(f"'{ref}' is a {type(obj).__name__}, not a function decorated with @attncc.attention")
    return obj
