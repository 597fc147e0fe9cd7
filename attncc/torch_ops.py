"""PyTorch operators: every compiled kernel as a `torch.library` custom op, so that
`torch.compile(model, fullgraph=True)` traces a model that calls attncc kernels with no graph
break, and trains (docs/training.md, "PyTorch operators and torch.compile").

Each kernel gets two operators in the `attncc` namespace, registered on first use
(`kernel.op`, or the first call traced by torch.compile):

- the forward, `attncc::<name>(Tensor x0, ..., <params>, bool return_lse,
  int backward, str? backward_reason) -> Tensor[]`: the input tensors in the spec's
  order (int and bool tensors included), then each param as an optional `float`, `int` or
  `bool` (None: its default, computed from the call's dims as an eager call does), then what
  the call returns besides the outputs and what its backward will be (`NO_GRAPH`,
  `GENERATED`, `REFERENCE`, chosen before the call from which inputs require grad, exactly as
  an eager call chooses). It returns the outputs, the log-sum-exp when `return_lse`, and with
  `backward == GENERATED` the fp32 log-sum-exp the generated backward reads, last;
- the backward, `attncc::<name>_bwd(Tensor[] inputs, Tensor[] saved, Tensor?[] grads,
  <params>, bool return_lse, int backward, bool[] wanted) -> Tensor[]`: the gradients of the
  inputs marked in `wanted`, from the generated backward kernels (`backward == GENERATED`) or
  the reference executor's autograd (otherwise), as an eager call's backward computes them.

`<name>` is the spec's name reduced to ASCII letters, digits and `_` (the name is user text:
it never reaches the schema as written), the backend, and a hash of the spec's text; a second
live kernel of the same spec gets a `_2` suffix. Argument names in the schemas are positional
(`x0`, `p0`): no user name appears in them either. A registration lives as long as the
process (torch.library cannot remove one); it holds its kernel weakly, and a later kernel of
the same spec and backend reuses a registration whose kernel was freed.

Both operators have fake implementations (shapes and dtypes from the spec's outputs and the
dims bound by `binding.bind`, which checks the call at trace time), and the forward an
autograd formula (`register_autograd`). Eager calls do not go through the dispatcher: its
overhead (tens of microseconds per call, over 100 with autograd) is kept off the plain call
path; `Kernel.__call__` routes a call here only while torch.compile traces it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import types
import weakref

import torch

from . import ir
from .binding import bind
from .call_params import expand
from .errors import ArgumentError, BackendError
from attncc.passes.backward import NoGeneratedBackward

NAMESPACE = "attncc"
NO_GRAPH, GENERATED, REFERENCE = 0, 1, 2  # the `backward` argument of a forward operator
_LABELS = {NO_GRAPH: None, GENERATED: "triton", REFERENCE: "reference"}
_SCHEMA_TYPES = {ir.FLOAT: "float?", ir.INT: "int?", ir.BOOL: "bool?"}
_OUT_DTYPES = {ir.INT: torch.int64, ir.BOOL: torch.bool}  # float outputs: the call's out_dtype
_OP_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,127}")
_REFERENCE_REASON = ("the forward ran on the reference executor: its operator recomputes it under "
                     "autograd in the backward")


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """What a kernel's operators take and return, from its program (plain names and counts)."""

    inputs: tuple[str, ...]
    optional: tuple[bool, ...]                       # per input: it has a default (None leaves it out)
    params: tuple[tuple[str, str], ...]              # (name, ir dtype)
    outputs: tuple[tuple[tuple[str, ...], str], ...]  # (axes, ir dtype) per output

    @classmethod
    def of(cls, program: ir.Program) -> "OpSpec":
        return cls(tuple(program.inputs),
                   tuple(getattr(node, "default", None) is not None for node in program.inputs.values()),
                   tuple((n, s.dtype) for n, s in program.params.items()),
                   tuple((tuple(o.axes), o.node.dtype) for o in program.outputs))

    def forward_schema(self) -> str:
        args = [f"Tensor{'?' if opt else ''} x{k}" for k, opt in enumerate(self.optional)]
        args += [f"{_SCHEMA_TYPES[dtype]} p{k}" for k, (_, dtype) in enumerate(self.params)]
        args += ["bool return_lse", "int backward", "str? backward_reason"]
        return f"({', '.join(args)}) -> Tensor[]"

    def backward_schema(self) -> str:
        args = ["Tensor?[] inputs", "Tensor[] saved", "Tensor?[] grads"]
        args += [f"{_SCHEMA_TYPES[dtype]} p{k}" for k, (_, dtype) in enumerate(self.params)]
        args += ["bool return_lse", "int backward", "bool[] wanted"]
        return f"({', '.join(args)}) -> Tensor[]"

    def kwargs(self, tensors, params) -> dict:
        """Keyword arguments of `bind` from an operator's positional tensors and params."""
        out = {name: t for name, t in zip(self.inputs, tensors) if t is not None}
        out.update({name: v for (name, _), v in zip(self.params, params) if v is not None})
        return out


class Registration:
    """The operators of one kernel: a weak reference to the kernel they run, the forward and
    backward `OpOverload`s, and the spec of their arguments."""

    def __init__(self, name: str, spec: OpSpec):
        self.name, self.spec = name, spec
        self.kernel_ref = None
        forward = _define(f"{NAMESPACE}::{name}", spec.forward_schema(), self._forward, self._forward_fake)
        forward.register_autograd(self._backward_formula, setup_context=self._setup_context)
        _define(f"{NAMESPACE}::{name}_bwd", spec.backward_schema(), self._backward, self._backward_fake)
        self.forward = getattr(getattr(torch.ops, NAMESPACE), name).default
        self.backward = getattr(getattr(torch.ops, NAMESPACE), f"{name}_bwd").default

    def kernel(self):
        kernel = self.kernel_ref() if self.kernel_ref is not None else None
        if kernel is None:
            raise RuntimeError(f"{NAMESPACE}::{self.name}: the attncc kernel it ran was freed")
        return kernel

    # ---------------------------------------------------------------- forward
    def split(self, args):
        n, m = len(self.spec.inputs), len(self.spec.params)
        return args[:n], args[n:n + m], args[n + m:]

    def _forward(self, *args):
        tensors, params, (return_lse, backward, reason) = self.split(args)
        kernel = self.kernel()
        call = bind(kernel.program, self.spec.kwargs(tensors, params), expanded=True)
        if return_lse:
            kernel.lse()
        with torch.no_grad():
            results = _run_forward(kernel, call, return_lse, backward, reason)
        seen = set()  # outputs must not share memory (two outputs of one node, an output and the LSE)
        results = [r.clone() if _storage(r) in seen or seen.add(_storage(r)) else r for r in results]
        return [_conform(r, d) for r, d in zip(results, self.result_dtypes(call, return_lse, backward))]

    def result_dtypes(self, call, return_lse: bool, backward: int) -> list[torch.dtype]:
        dtypes = [_OUT_DTYPES.get(dtype, call.out_dtype) for _, dtype in self.spec.outputs]
        return dtypes + [call.out_dtype] * bool(return_lse) + [torch.float32] * (backward == GENERATED)

    def _forward_fake(self, *args):
        tensors, params, (return_lse, backward, _) = self.split(args)
        kernel = self.kernel()
        call = bind(kernel.program, self.spec.kwargs(tensors, params), data=False, expanded=True)
        axes = [axes for axes, _ in self.spec.outputs] + ([tuple(kernel.lse().axes)] if return_lse else [])
        shapes = [[call.sizes[ix] for ix in ax] for ax in axes]
        if backward == GENERATED and _general(kernel):  # every accumulator, packed
            shapes.append([kernel.backward_launcher().part(bool(return_lse)).saved_numel(call.sizes)])
        elif backward == GENERATED:  # the saved statistic: the plan's log-sum-exp (that of its last stage when
            # earlier ones are precomputed), an empty one for weights without a log-sum-exp
            shapes.append([call.sizes[ix] for ix in kernel.generated.plan.lse_axes] if _saves_lse(kernel) else [0])
        dtypes = self.result_dtypes(call, return_lse, backward)
        return [torch.empty(shape, dtype=dtype, device=call.device) for shape, dtype in zip(shapes, dtypes)]

    # ---------------------------------------------------------------- autograd
    def _setup_context(self, ctx, inputs, output):
        tensors, params, (return_lse, backward, _) = self.split(inputs)
        ctx.set_materialize_grads(False)
        ctx.params, ctx.return_lse, ctx.backward = params, return_lse, backward
        ctx.n_results = len(self.spec.outputs) + bool(return_lse)
        # O and the fp32 LSE (empty for weights without one: the backward recomputes what it needs)
        saved = ([output[-1]] if _general(self.kernel()) else [output[0], output[-1]]) if backward == GENERATED else []
        ctx.save_for_backward(*tensors, *saved)

    def _backward_formula(self, ctx, grads):
        n = len(self.spec.inputs)
        saved = ctx.saved_tensors
        tensors, extra = list(saved[:n]), list(saved[n:])
        grads = list(grads[:ctx.n_results])
        wanted = [bool(w) for w in ctx.needs_input_grad[:n]]
        rest = (None,) * (len(ctx.needs_input_grad) - n)
        if not any(wanted) or all(g is None for g in grads):
            return (None,) * n + rest
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients from the reference
            kernel = self.kernel()
            call = bind(kernel.program, self.spec.kwargs(tensors, ctx.params), data=False, expanded=True)
            # the bound tensors: broadcast inputs expanded (views: their history is kept), left-out
            # optional inputs filled in, as the reference reads them
            found = _reference_gradients(kernel, call, ctx.return_lse, list(call.tensors.values()), grads, wanted)
            return (*(g if g is None else _summed_to(g, t) for g, t in zip(found, tensors)), *rest)
        found = iter(self.backward(tensors, extra, grads, *ctx.params, ctx.return_lse, ctx.backward, wanted))
        return (*(next(found) if w else None for w in wanted), *rest)

    # ---------------------------------------------------------------- backward
    def _backward(self, inputs, saved, grads, *rest):
        params, (return_lse, backward, wanted) = rest[:-3], rest[-3:]
        kernel = self.kernel()
        call = bind(kernel.program, self.spec.kwargs(inputs, params), data=False, expanded=True)
        with _autograd_enabled(), torch.no_grad():
            found = None
            if backward == GENERATED and kernel.backend == "triton":
                names = {n for n, w in zip(self.spec.inputs, wanted) if w}
                try:
                    grad_lse = grads[1] if return_lse else None
                    launcher = kernel.backward_launcher()
                    if _general(kernel):  # every output's gradient, and the packed accumulators
                        found = launcher.gradients(call, saved[0], list(grads), names, bool(return_lse))
                    else:
                        found = launcher.gradients(call, *saved, grads[0], grad_lse, names,
                                                   deterministic=kernel.deterministic)
                        kernel.note_backward_fallback(launcher)
                    found = [found.get(n) for n in self.spec.inputs]
                except NoGeneratedBackward as why:  # a call the generated kernels cannot take (sizes the
                    # trace did not know): the reference's backward, and why
                    if kernel.last_run is not None:
                        kernel.last_run.update(backward="reference", backward_reason=str(why))
                except BackendError as why:
                    if not kernel.chosen_automatically:
                        raise
                    if kernel.last_run is not None:
                        kernel.last_run.update(backward="reference", backward_reason=str(why))
            if found is None:  # the call's tensors: left-out optional inputs filled in by `bind`
                found = _reference_gradients(kernel, call, return_lse, list(call.tensors.values()),
                                             list(grads), wanted)
        return [_conform(_summed_to(g, t) if g is not None else torch.zeros_like(t), t.dtype, like=t)
                for g, t, w in zip(found, inputs, wanted) if w]

    def _backward_fake(self, inputs, saved, grads, *rest):
        wanted = rest[-1]
        return [torch.empty_like(t) for t, w in zip(inputs, wanted) if w]


def _define(qualname: str, schema: str, impl, fake):
    op = torch.library.custom_op(qualname, impl, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


def _run_forward(kernel, call, return_lse: bool, backward: int, reason: str | None) -> list:
    """The outputs of one call (what `Kernel.__call__` runs, without autograd), and the call
    recorded in `kernel.last_run` as an eager call records it."""
    results, fallback = None, None
    if kernel.backend == "triton":
        try:
            if backward == GENERATED and _general(kernel):  # the accumulators kept for the backward
                outs, packed = kernel.backward_launcher().forward(call, return_lse, kernel.tuned_config(call))
                results = [*(kernel._cast(r, call) for r in outs), packed]
            elif backward == GENERATED and not _saves_lse(kernel):  # pointwise weights, sums of terms
                results = [*kernel.run_generated(call, False), _no_lse(call)]
            elif backward == GENERATED:  # the LSE stored for the generated backward
                o, lse = kernel.generated.launcher(call, True, config=kernel.tuned_config(call))
                returned = kernel._cast(lse, call)
                returned = returned.clone() if returned is lse and return_lse else returned
                results = [kernel._cast(o, call), *([returned] if return_lse else []), lse]
            else:
                results = kernel.run_generated(call, return_lse)
            run = {"backend": "triton", "interpreted": call.device.type == "cpu",
                   "source": str(kernel.generated.path), "backward": _LABELS[backward]}
            if backward != NO_GRAPH and reason:
                run["backward_reason"] = reason
            tma = getattr(kernel.generated.launcher, "last_tma_fallback", None)
            if tma:
                run["tma_fallback"] = tma
        except BackendError as why:
            if not kernel.chosen_automatically:
                raise
            fallback = str(why)
    if results is None:
        if backward == GENERATED and _general(kernel):
            raise BackendError(f"{kernel.name}: the generated backward needs the generated forward: {fallback}")
        if backward == GENERATED and not _saves_lse(kernel):
            results = [*kernel.run_reference(call, False), _no_lse(call)]
        elif backward == GENERATED:  # a fallback (or a hand-made call): the LSE the backward op expects, from the reference
            results = kernel.run_reference(call, True)
            results = results[:-1] + ([results[-1].clone()] if return_lse else []) + [results[-1].float()]
        else:
            results = kernel.run_reference(call, return_lse)
        run = {"backend": "reference", **({"reason": fallback} if fallback else {}),
               "backward": None if backward == NO_GRAPH else "reference"}
        if backward != NO_GRAPH:
            run["backward_reason"] = fallback or _REFERENCE_REASON
    kernel.last_run = run
    return results


def _general(kernel) -> bool:
    """Whether the kernel runs a general streaming plan: its generated backward saves every
    accumulator (one packed fp32 vector) and takes every output's gradient."""
    from .stream_runtime import StreamLauncher

    return kernel.backend == "triton" and isinstance(kernel.generated.launcher, StreamLauncher)


def _saves_lse(kernel) -> bool:
    """Whether the generated backward reads a saved log-sum-exp: one softmax (with or without a
    sink); pointwise weights and sums of terms recompute what they need from the inputs."""
    return kernel.backend == "triton" and kernel.generated.plan.has_lse


def _no_lse(call) -> torch.Tensor:
    """The saved-statistic slot of a plan without one: an empty fp32 tensor."""
    return torch.zeros(0, dtype=torch.float32, device=call.device)


def _reference_gradients(kernel, call, return_lse, tensors, grads, wanted) -> list:
    """The inputs' gradients from the reference executor's autograd (`api._reference_gradients`)."""
    from .api import _reference_gradients as gradients

    ctx = types.SimpleNamespace(kernel=kernel, call=dataclasses.replace(call, tensors={}),
                                return_lse=return_lse, names=tuple(call.tensors),
                                needs_input_grad=(False,) * 4 + tuple(wanted))
    return gradients(ctx, tensors, grads)


def _summed_to(grad: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The gradient of an input passed with size-1 broadcast dims (`bias[B?,H?,N?,M?]`), summed
    over them: the gradients are found for the broadcast tensor the call binds, and an
    operator's backward, unlike autograd's engine after an eager call, does not reduce them."""
    return grad.sum_to_size(t.shape) if grad.shape != t.shape else grad


def _storage(t: torch.Tensor):
    return t.untyped_storage().data_ptr() if t.numel() else id(t)


def _conform(t: torch.Tensor, dtype: torch.dtype, like: torch.Tensor | None = None) -> torch.Tensor:
    """`t` with the dtype and layout the fake implementation gives it: contiguous, or the
    strides of `like` (an input, for its gradient, as `torch.empty_like`)."""
    t = t.to(dtype)
    if like is None:
        return t.contiguous()
    if t.stride() != torch.empty_like(like).stride():
        t = torch.empty_like(like).copy_(t)
    return t


_DISPATCH = torch._C.DispatchKey


def _autograd_enabled():
    """A custom op's implementation runs below autograd (its keys excluded from dispatch). The
    backward operator computes gradients with autograd (the reference recomputed, precomputed
    operands chained), so it runs with those keys included again."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (_DISPATCH.AutogradFunctionality, _DISPATCH.AutogradOther, _DISPATCH.AutogradNestedTensor):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


# -------------------------------------------------------------------- registry
_REGISTRATIONS: dict[str, Registration] = {}


def base_name(kernel) -> str:
    """`<spec name as ASCII identifier>_<backend>_<hash of the spec>`: a valid operator name
    whatever the spec calls itself."""
    program = kernel.program
    safe = re.sub(r"[^A-Za-z0-9]+", "_", program.name).strip("_")[:48] or "spec"
    if not safe[0].isalpha():
        safe = "spec_" + safe
    digest = hashlib.sha256("\0".join((program.name, program.source.text, repr(OpSpec.of(program))))
                            .encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{safe}_{kernel.backend}_{digest}"


def register(kernel) -> Registration:
    """The operators of `kernel`, registered on first use."""
    reg = kernel._torch_op
    if reg is not None and reg.kernel_ref is not None and reg.kernel_ref() is kernel:
        return reg  # (a copy of a kernel, `copy.copy` or `deepcopy`, gets operators of its own)
    base, spec = base_name(kernel), OpSpec.of(kernel.program)
    for serial in range(1, 1 << 20):
        name = base if serial == 1 else f"{base}_{serial}"
        if not _OP_NAME.fullmatch(name):
            raise ValueError(f"not a valid operator name: {name!r}")
        reg = _REGISTRATIONS.get(name)
        if reg is None:
            reg = _REGISTRATIONS[name] = Registration(name, spec)
        elif reg.spec != spec or (reg.kernel_ref is not None and reg.kernel_ref() is not None):
            continue  # the name belongs to another live kernel
        reg.kernel_ref = weakref.ref(kernel)
        kernel._torch_op = reg
        return reg
    raise RuntimeError("too many live kernels of one spec")


def backward_choice(kernel, requiring, grad_enabled: bool, call=None) -> tuple[int, str | None]:
    """(`NO_GRAPH`, `GENERATED` or `REFERENCE`, why not generated) for a call whose inputs
    named in `requiring` require grad: the choice `Kernel.__call__` makes. `call`: the bound
    call when its sizes are known (a plan whose backward is linear-time only checks its path)."""
    if not (grad_enabled and requiring):
        return NO_GRAPH, None
    if kernel.backend != "triton":
        return REFERENCE, _REFERENCE_REASON
    from attncc.passes.backward import call_reason

    plan = kernel.backward_plan()
    sizes = None if call is None else call.sizes or kernel.program.sizes(call.scalars)
    reason = plan if isinstance(plan, str) else \
        call_reason(plan, list(requiring), sizes, None if call is None else call.scalars)
    if reason is None and len(kernel.program.outputs) != 1 and not _general(kernel):
        reason = "the generated backward differentiates one output"
    return (REFERENCE, reason) if reason else (GENERATED, None)


def arguments(kernel, *, return_lse: bool = False, **kwargs) -> tuple:
    """The positional arguments of `kernel.op` for a call with these keyword arguments
    (checked by `bind`; the backward chosen from which tensors require grad)."""
    kwargs = expand(kernel.program, kwargs)
    call = bind(kernel.program, kwargs, expanded=True)
    spec = register(kernel).spec
    requiring = tuple(n for n, t in call.tensors.items() if t.requires_grad)
    backward, reason = backward_choice(kernel, requiring, torch.is_grad_enabled(), call)
    return (*(kwargs.get(n) for n in spec.inputs), *(kwargs.get(n) for n, _ in spec.params), return_lse,
            backward, reason)


# -------------------------------------------------------------------- traced calls
def _constant(fn):
    """Run `fn` when torch.compile traces a call to it and use its result as a constant."""
    mark = getattr(torch.compiler, "assume_constant_result", None) or torch._dynamo.assume_constant_result
    return mark(fn)


@_constant
def _signature(kernel) -> tuple:
    """(input names, param names, param dtypes, number of outputs), after registering the operators."""
    spec = register(kernel).spec
    return spec.inputs, tuple(n for n, _ in spec.params), tuple(d for _, d in spec.params), len(spec.outputs)


@_constant
def _prepare(kernel, positional: int, names: tuple, types_: tuple, return_lse, requiring: tuple,
             grad_enabled: bool) -> tuple:
    """The checks of a traced call that need no tensor data (the rest run in the fake
    implementation, by `bind`), and the backward it takes."""
    program = kernel.program
    if positional:
        raise ArgumentError(f"{program.name}() takes keyword arguments only ({', '.join(program.inputs)}, ...)")
    if not isinstance(return_lse, bool):
        raise ArgumentError(f"return_lse must be a bool, got {type(return_lse).__name__} {return_lse!r}")
    expected = list(program.inputs) + list(program.params)
    for name in names:
        if name not in program.inputs and name not in program.params:
            raise ArgumentError(f"{program.name}() got an unknown argument '{name}'; it takes: "
                                f"{', '.join(expected)}, return_lse")
    for name, node in program.inputs.items():
        if name not in names and getattr(node, "default", None) is None:
            raise ArgumentError(f"{program.name}() is missing the argument '{name}'")
    allowed = {ir.FLOAT: ("int", "float", "NoneType"), ir.INT: ("int", "NoneType"), ir.BOOL: ("bool", "NoneType")}
    for (name, node), kind in zip(program.params.items(), types_):
        if kind not in allowed[node.dtype]:
            raise ArgumentError(f"param '{name}' must be a Python {node.dtype} (or None for its default) "
                                f"in a call traced by torch.compile, got {kind}")
    if return_lse:
        kernel.lse()
    return backward_choice(kernel, requiring, grad_enabled)


def call(kernel, args: tuple, return_lse, kwargs: dict):
    """A call of `kernel` while torch.compile traces it: one call of its forward operator."""
    inputs, params, dtypes, n_outputs = _signature(kernel)
    if kernel.program.groups:  # tuple and enum params as the operator's scalars
        kwargs = expand(kernel.program, kwargs)
    requiring = tuple(n for n in inputs if isinstance(kwargs.get(n), torch.Tensor) and kwargs[n].requires_grad)
    kinds = tuple(type(kwargs.get(n)).__name__ for n in params)
    backward, reason = _prepare(kernel, len(args), tuple(kwargs), kinds, return_lse, requiring,
                                torch.is_grad_enabled())
    values = [kwargs.get(n) for n in params]
    values = [float(v) if isinstance(v, int) and not isinstance(v, bool) and kind == ir.FLOAT else v
              for v, kind in zip(values, dtypes)]
    results = kernel._torch_op.forward(*(kwargs.get(n) for n in inputs), *values, return_lse, backward, reason)
    n = n_outputs + (1 if return_lse else 0)
    return results[0] if n == 1 else tuple(results[:n])
