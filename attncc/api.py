"""The Python API: `attncc.compile(spec)` returns a `Kernel`, a callable taking keyword arguments."""
from __future__ import annotations

import codecs
import dataclasses
import inspect
import keyword
import os
import stat
from pathlib import Path

import networkx as nx
import torch

from . import ir, pipeline, torch_ops
from .binding import bind, describe_input
from .errors import ArgumentError, BackendError, Loc, Source, SpecError
from .reference import Reference
from .stream_backward import GeneralBackward, GeneralBackwardFunction
from attncc.autotune.cache import TuningCache, tuning_key
from attncc.codegen.tile_expr import Unsupported
from attncc.passes.backward import NoGeneratedBackward, call_reason, general_plan_reason, plan_backward
from attncc.passes.row_stream import NotRowStreamable, RowStreamPlan

BACKENDS = ("auto", "triton", "reference")


def load(spec: str | Path) -> ir.Program:
    """Parse and check a spec given as a path or as source text (or the program of a kernel, such
    as a function decorated with `@attncc.attention`)."""
    if isinstance(spec, Kernel):
        return spec.program
    text, filename = read_spec(spec)
    try:
        return pipeline.run(text, filename, until="ir")["ir"]
    except RecursionError:  # a pathological nesting depth: an error in the spec, not a crash
        raise too_deep(text, filename) from None


def too_deep(text: str, filename: str) -> SpecError:
    return SpecError("the spec nests expressions too deeply to compile (Python's recursion limit)",
                     Source(text, filename))


MAX_SPEC_BYTES = 16 << 20  # specs are a few hundred bytes; a bigger file is not one
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
         (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


def read_spec(spec: str | Path) -> tuple[str, str]:
    """(text, filename) of a spec that is a path, a gallery name or source text. A `Path` (any
    `os.PathLike`) is a file. A string is a file when it names an existing file, or when it is
    one line without a `{` (no spec lacks one) ending in `.attn`; a bare name that is no file
    but names an example of the gallery installed with attncc (`"causal"`) is that example, as
    on the command line; anything else is the spec's text, however long (a one-line spec is
    never handed to the file system as a name)."""
    if isinstance(spec, os.PathLike):
        path = Path(spec)
    elif not isinstance(spec, str):
        raise TypeError(f"a spec is a path or its text (a str), not {type(spec).__name__}")
    elif "\n" not in spec and "\0" not in spec and (
            os.path.isfile(spec) or ("{" not in spec and spec.rstrip().endswith(".attn"))):
        path = Path(spec)  # os.path.isfile: False, not an error, for names too long or otherwise impossible
    elif spec.isidentifier() and gallery_path(spec) is not None:
        path = gallery_path(spec)
    else:
        return spec, "<string>"
    return read_spec_file(path), str(path)


def gallery_path(name: str) -> Path | None:
    """The gallery example `name` installed with attncc (`attncc.examples`), or None."""
    from importlib import resources

    path = Path(str(resources.files("attncc.examples"))) / f"{name}.attn"
    return path if name.isidentifier() and path.is_file() else None


def read_spec_file(path: Path) -> str:
    """The text of a spec file, decoded by `decode_spec`; `FileNotFoundError` when there is
    no regular file there (a folder or a FIFO is not read)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"no spec file at {path}" + (f" ({err.strerror})" if getattr(
            err, "strerror", None) and not isinstance(err, FileNotFoundError) else "")) from None
    if not stat.S_ISREG(st.st_mode):
        raise FileNotFoundError(f"no spec file at {path} (not a regular file)")
    with open(path, "rb") as f:
        data = f.read(MAX_SPEC_BYTES + 1)
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"the file is over {MAX_SPEC_BYTES >> 20} MiB: not a spec", Source("", str(path)))
    return decode_spec(data, str(path))


def decode_spec(data: bytes, filename: str) -> str:
    """The text of a spec file's bytes: UTF-8, with or without a byte-order mark; UTF-16 or
    UTF-32 with one; UTF-16 without one when nearly every other byte is NUL (mostly ASCII text
    saved as UTF-16). Line ends are normalised to `\\n`, as Python's text files read them. Bytes that
    are none of these give a `SpecError` at the first undecodable byte's line and column."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return _newlines(data[len(bom):].decode(encoding))
            except UnicodeDecodeError as err:
                raise SpecError(f"the file starts with a {encoding} byte-order mark but is not {encoding} "
                                f"({err.reason} at byte {err.start + len(bom)})", Source("", filename)) from None
    if len(data) >= 2 and len(data) % 2 == 0:
        for encoding, high in (("utf-16-le", data[1::2]), ("utf-16-be", data[0::2])):
            if high.count(0) >= 0.9 * len(high):  # mostly ASCII, every other byte NUL: BOM-less UTF-16
                try:
                    return _newlines(data.decode(encoding))
                except UnicodeDecodeError:
                    break
    try:
        return _newlines(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        before = _newlines(data[:err.start].decode("utf-8"))
        lines = before.split("\n")
        shown = _newlines(data.decode("utf-8", errors="replace"))
        raise SpecError(f"the file is not UTF-8 text: byte 0x{data[err.start]:02x} cannot be decoded "
                        f"({err.reason}); save it as UTF-8", Source(shown, filename),
                        Loc(len(lines), len(lines[-1]) + 1)) from None


def _newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def lse_output(program: ir.Program) -> ir.Output:
    """The log-sum-exp side output of the softmax that feeds the first output: over all the key
    sets of a joint softmax, with a sink logit included (`softmax1`'s constant 0, or
    `softmax(s, j, sink)`): `log(exp(sink) + sum_j exp(s))`."""
    first = program.outputs[0]
    ancestors = nx.ancestors(program.graph, first.node) | {first.node}
    softmaxes = [n for n in ancestors if isinstance(n, ir.Normalize) and n.op in ("softmax", "softmax1")
                 and n.axis not in first.node.indices]
    groups = {frozenset((x.id, axis) for x, axis in n.key_sets()): n for n in softmaxes}
    if len(groups) != 1:
        raise SpecError(f"return_lse needs exactly one softmax over the summed axis feeding "
                        f"'{first.name}', found {len(groups)}", program.source, first.loc)
    sm = next(iter(groups.values()))
    indices = tuple(ix for ix in sm.arg.indices if ix != sm.axis)
    terms = [ir.Reduce(op="logsumexp", arg=x, axes=(axis,), indices=tuple(ix for ix in x.indices if ix != axis),
                       loc=sm.loc) for x, axis in sm.key_sets()]
    sink = ir.Const(value=0.0, dtype=ir.FLOAT, loc=sm.loc) if sm.op == "softmax1" else sm.sink
    if sink is not None:  # log(exp(sink) + sum exp(s))
        terms.append(sink)
    node = terms[0] if len(terms) == 1 else ir.logaddexp(*terms, loc=sm.loc)
    if node.indices != indices:
        node = ir.Access(array=node, args=tuple(ir.Index(name=ix, indices=(ix,), dtype=ir.INT) for ix in node.indices),
                         axes=node.indices, indices=indices, dtype=ir.FLOAT, loc=sm.loc)
    return ir.Output("lse", node, indices, tuple(program.extent[ix] for ix in indices), sm.loc, normalizer=sm)


class Kernel:
    """A compiled spec. Call it with keyword arguments; `backend` says what actually runs."""

    def __init__(self, program: ir.Program, backend: str, reference_block: int = 256, generated=None):
        self.program = program
        self.name = program.name
        self.backend = backend
        self.reference_block = reference_block
        self.generated = generated  # the Triton kernel (plan, source, launcher) when backend == "triton"
        self.chosen_automatically = False  # backend="auto": a call triton cannot take runs on the reference
        self.last_run: dict | None = None  # what the latest call actually ran
        self._lse: ir.Output | None = None
        self.tuning_cache: TuningCache | None = None  # where calls find tuned configs (None: the user cache)
        self._configs: dict = {}  # tuning key -> tuned config or None: the cache file is read once per key
        self._backward = None  # BackwardPlan, or why there is none (str); planned on first use
        self._backward_launcher = None
        self.deterministic = False  # generated backward without atomics: the same gradient bits every run
        self._torch_op = None  # its torch.library operators (`torch_ops.Registration`), made on first use
        self.__signature__ = self.signature

    # ------------------------------------------------------------------ introspection
    @property
    def inputs(self) -> dict[str, str]:
        return {n: describe_input(node) for n, node in self.program.inputs.items()}

    @property
    def params(self) -> dict[str, object]:
        """Each param's default value as a call passes it (a tuple for a tuple param, the
        chosen name for an enum param), None when it is computed from dims at call time
        (`-log(M)`: pass None for the default), or `inspect.Parameter.empty` when it has none."""
        out = {}
        for name, param in self.program.call_params().items():
            scalars = param.scalars if isinstance(param, ir.ParamGroup) else (param,)
            defaults = [s.default for s in scalars]
            if any(d is None for d in defaults):
                out[name] = inspect.Parameter.empty
            elif not all(isinstance(d, ir.Const) for d in defaults):
                out[name] = None
            elif isinstance(param, ir.ParamGroup):
                out[name] = param.choices[defaults[0].value] if param.is_enum else tuple(d.value for d in defaults)
            else:
                out[name] = defaults[0].value
        return out

    @property
    def outputs(self) -> list[str]:
        return [o.name for o in self.program.outputs]

    @property
    def signature(self) -> inspect.Signature:
        """Every input and param as a keyword-only parameter; names Python cannot spell as a
        parameter (`lambda`, `None`) are passed through `**kwargs` instead (`**{"lambda": x}`)."""
        named = [(n, torch.Tensor, inspect.Parameter.empty if node.default is None else None)  # optional: None
                 for n, node in self.program.inputs.items()]
        types = {ir.INT: int, ir.FLOAT: float, ir.BOOL: bool}
        for (name, param), default in zip(self.program.call_params().items(), self.params.values()):
            if isinstance(param, ir.ParamGroup):
                ann = str if param.is_enum else tuple
            else:
                ann = types[param.dtype]
            named.append((name, ann, default))
        params, unspellable = [], []
        for name, ann, default in named:
            if keyword.iskeyword(name):
                unspellable.append(name)
            else:
                params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                                annotation=ann))
        params.append(inspect.Parameter("return_lse", inspect.Parameter.KEYWORD_ONLY, default=False,
                                        annotation=bool))
        if unspellable:
            rest = "kwargs"
            while rest in self.program.inputs or rest in self.program.call_params():
                rest += "_"
            params.append(inspect.Parameter(rest, inspect.Parameter.VAR_KEYWORD))
        return inspect.Signature(params)

    def __repr__(self):
        return f"<attncc.Kernel {self.name}{self.signature} backend={self.backend!r}>"

    @property
    def op(self):
        """The kernel's forward operator (`torch.ops.attncc.<name>.default`), registered through
        `torch.library` on first use; `attncc.torch_ops.arguments(kernel, **kwargs)` gives its
        arguments for a call. Calls traced by torch.compile run through it (docs/training.md)."""
        return torch_ops.register(self).forward

    # ------------------------------------------------------------------ calling
    def __call__(self, *args, return_lse: bool = False, **kwargs):
        if torch.compiler.is_compiling():  # traced by torch.compile: one call of the kernel's operator
            return torch_ops.call(self, args, return_lse, kwargs)
        if args:
            raise ArgumentError(f"{self.name}() takes keyword arguments only "
                                f"({', '.join(self.program.inputs)}, ...)")
        if type(return_lse).__module__ == "numpy" and getattr(return_lse, "shape", None) == ():
            return_lse = return_lse.item()
        if not isinstance(return_lse, bool):
            raise ArgumentError(f"return_lse must be a bool, got {type(return_lse).__name__} {return_lse!r}")
        call = bind(self.program, kwargs)
        if return_lse:
            self.lse()  # the same error on every backend when there is none
        # a graph is recorded when autograd would track any input: float inputs only (ints cannot require grad)
        graph = torch.is_grad_enabled() and any(t.requires_grad for t in call.tensors.values())
        results, reason = None, None
        if self.backend == "triton":
            try:
                backward_reason = None
                if graph:
                    names = tuple(call.tensors)
                    backward_reason = self.backward_reason(call)
                    how = _ReferenceBackward if backward_reason else \
                        _GeneratedBackward if isinstance(self.generated.plan, RowStreamPlan) else GeneralBackwardFunction
                    results = list(how.apply(self, call, return_lse, names, *call.tensors.values()))
                else:
                    results = self.run_generated(call, return_lse)
                self.last_run = {"backend": "triton", "interpreted": call.device.type == "cpu",
                                 "source": str(self.generated.path),
                                 "backward": ("reference" if backward_reason else "triton") if graph else None}
                if backward_reason:
                    self.last_run["backward_reason"] = backward_reason
                fallback = getattr(self.generated.launcher, "last_tma_fallback", None)
                if fallback:  # the TMA form did not build: pointer loads ran, and why
                    self.last_run["tma_fallback"] = fallback
            except BackendError as why:
                if not self.chosen_automatically:  # triton was asked for: say why it cannot run
                    raise
                reason = str(why)
        if results is None:  # the reference, and why when "auto" chose triton but this call cannot take it
            results = self.run_reference(call, return_lse)
            self.last_run = {"backend": "reference", **({"reason": reason} if reason else {}),
                             "backward": "reference" if graph else None}
            if graph:
                self.last_run["backward_reason"] = ("the forward ran on the reference executor: autograd "
                                                    "through its torch ops")
        return results[0] if len(results) == 1 else tuple(results)

    def run_generated(self, call, return_lse: bool) -> list[torch.Tensor]:
        """The generated kernel's results, cast to the call's output dtype (no autograd graph)."""
        results = self.generated.launcher(call, return_lse, config=self.tuned_config(call))
        return [self._cast(r, call) for r in results]

    def backward_reason(self, call) -> str | None:
        """Why this call's backward cannot run on generated kernels (then the reference
        recomputes it), or None when it can: the plan has a generated backward
        (`passes.backward.plan_backward`) and every input that requires grad is one it
        differentiates (`passes.backward.call_reason`)."""
        plan = self.backward_plan()
        if isinstance(plan, str):
            return plan
        return call_reason(plan, [n for n, t in call.tensors.items() if t.requires_grad],
                           call.sizes or self.program.sizes(call.scalars), call.scalars)

    def backward_plan(self):
        """The `BackwardPlan` of the generated kernel, or the reason it has none (a str);
        planned, and its kernels generated, on the first call that records a graph."""
        if self._backward is None:
            if not isinstance(self.generated.plan, RowStreamPlan):
                try:
                    self._backward_launcher = GeneralBackward(self.generated.launcher)
                    self._backward = self._backward_launcher.part(False).bplan
                except (NoGeneratedBackward, Unsupported) as why:
                    self._backward = general_plan_reason(str(why))
            else:
                from .row_backward import make_backward

                try:
                    plan = plan_backward(self.generated.plan)
                    self._backward_launcher = make_backward(plan, self.generated.launcher)
                    self._backward = plan
                except (NoGeneratedBackward, Unsupported) as why:
                    self._backward = str(why)
                except RecursionError:
                    self._backward = "the score nests too deeply to generate its derivative"
        return self._backward

    def note_backward_fallback(self, launcher) -> None:
        """Say in `last_run["backward_tma_fallback"]` why the backward kernels just launched
        took pointer loads after their TMA form failed to build, if they did."""
        fallback = launcher.last_tma_fallback
        if fallback and self.last_run is not None:
            self.last_run["backward_tma_fallback"] = fallback

    def backward_launcher(self):
        """The launcher of the generated backward kernels (`backward_plan` made it)."""
        self.backward_plan()
        return self._backward_launcher

    def run_reference(self, call, return_lse: bool) -> list[torch.Tensor]:
        """The reference executor's results (torch ops: autograd records them when inputs require grad)."""
        extra = [self.lse()] if return_lse else []
        results = Reference(self.program, call.tensors, call.scalars, self.reference_block).run(extra)
        return [self._cast(r, call) for r in results]

    def tuned_config(self, call) -> dict | None:
        """The tuned config for a bound call's key, or None (the launcher's heuristic)."""
        key = tuning_key(self.program, call)
        if key not in self._configs:
            self.tuning_cache = self.tuning_cache or TuningCache()
            entry = self.tuning_cache.get(key)
            self._configs[key] = entry and entry["config"]
        return self._configs[key]

    def tune(self, *, trials: int = 30, timeout_s: float | None = None, cache=None, objective=None,
             progress=None, fresh: bool = False, **example_inputs):
        """Search tile sizes, warps, stages (and key splits for few queries) for calls
        shaped like `example_inputs`; store the best config in the tuning cache, where
        every later call in the same bucket (same spec, dims rounded up to powers of two
        above 16, int params, dtype, GPU, Triton version) finds it. See docs/autotune.md.

        trials / timeout_s: the budget of new measurements, whichever ends first. The
        trials are kept in an optuna study per key (in `tuning.journal` beside the
        cache); tuning a key again resumes its study, measuring only configs not
        measured yet, unless `fresh` starts it over. cache: a path or a `TuningCache`
        (default: the user cache, `$ATTNCC_CACHE_DIR/tuning.json`); a cache given here
        becomes `self.tuning_cache`, the one later calls read.
        objective: `objective(config) -> seconds` instead of timing launches with
        `triton.testing.do_bench` (tests inject a deterministic cost; without one the
        inputs must be on a GPU). progress: `progress(trial, result_so_far)` after each trial.
        Returns the `TuneResult` (best config, its time, every trial); raises
        `BackendError` when no config ran.
        """
        from attncc.autotune import measure, space, tuner

        if self.backend != "triton":
            raise BackendError(f"only the triton backend has configs to tune, not '{self.backend}'")
        call = bind(self.program, example_inputs)
        launcher = self.generated.launcher
        objective = objective or measure.launch_objective(launcher, call)
        configs = space.launcher_space(launcher, call, space.device_shared_memory(call.device))
        store = cache if isinstance(cache, TuningCache) else TuningCache(cache)
        key = tuning_key(self.program, call)
        study = store.study(key, configs, fresh=fresh)
        result = tuner.tune(objective, configs, trials=trials, timeout_s=timeout_s, progress=progress,
                            study=study)
        if result.best is None:
            reasons = "; ".join(sorted({t.reason for t in result.trials if t.reason}))
            raise BackendError(f"no config of '{self.name}' ran: {reasons}")
        if cache is not None:  # the cache a kernel tunes into is the one its calls read
            self.tuning_cache, self._configs = store, {}
        store.put(key, result.cache_entry())
        self._configs[key] = result.best_config
        return result

    def lse(self) -> ir.Output:
        if self._lse is None:
            self._lse = lse_output(self.program)
        return self._lse

    @staticmethod
    def _cast(t: torch.Tensor, call) -> torch.Tensor:
        return t.to(call.out_dtype) if t.is_floating_point() else t


class _ReferenceBackward(torch.autograd.Function):
    """The generated kernel forward, differentiated by the reference executor.

    There are no generated backward kernels yet. Rather than return outputs without a
    `grad_fn` (gradients silently missing), the backward recomputes the forward on the
    reference executor under autograd from the saved inputs and differentiates that:
    exact gradients for every floating-point input, at the reference's speed and with its
    autograd memory (the score-sized intermediates of every streamed block are kept until
    the backward ends, O(B*H*N*M) floats, several copies). See docs/training.md.
    """

    @staticmethod
    def forward(ctx, kernel, call, return_lse, names, *tensors):
        ctx.set_materialize_grads(False)
        # the call without its tensors: the backward takes them from the saved ones (version-checked)
        ctx.kernel, ctx.call = kernel, dataclasses.replace(call, tensors={})
        ctx.return_lse, ctx.names = return_lse, names
        ctx.save_for_backward(*tensors)
        results = kernel.run_generated(call, return_lse)
        ctx.mark_non_differentiable(*[r for r in results if not r.is_floating_point()])
        return tuple(results)

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, None, None, *_reference_gradients(ctx, ctx.saved_tensors, grads))


def _reference_gradients(ctx, tensors, grads) -> list:
    """The inputs' gradients from the reference executor: the forward recomputed under
    autograd from the saved inputs `tensors`, differentiated with the incoming `grads`."""
    wanted = [k for k in range(len(tensors)) if ctx.needs_input_grad[4 + k]]
    create_graph = torch.is_grad_enabled()  # backward(create_graph=True): grads get a graph too
    with torch.enable_grad():
        if create_graph:  # the saved inputs keep their history: second derivatives flow through
            leaves = list(tensors)
        else:
            leaves = [t.detach().requires_grad_(k in wanted) for k, t in enumerate(tensors)]
        call = dataclasses.replace(ctx.call, tensors=dict(zip(ctx.names, leaves)))
        outs = ctx.kernel.run_reference(call, ctx.return_lse)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        found = torch.autograd.grad([o for o, _ in pairs], [leaves[k] for k in wanted],
                                    [g for _, g in pairs], allow_unused=True,
                                    create_graph=create_graph) if pairs else ()
    result = [None] * len(tensors)
    for k, g in zip(wanted, found):
        result[k] = g
    return result


class _GeneratedBackward(torch.autograd.Function):
    """The generated kernel forward and the generated backward kernels (plans with one softmax
    or one pointwise weight over the keys, `passes/backward.py`).

    The forward runs with the log-sum-exp stored and saves the inputs (references), the
    output O and the fp32 LSE: O(N) memory beyond the inputs, never a score-sized tensor.
    The backward launches the delta, dK/dV and dQ kernels (`attncc/row_backward.py`). With
    `create_graph=True` (second derivatives) it recomputes on the reference instead, whose
    gradients are differentiable.
    """

    @staticmethod
    def forward(ctx, kernel, call, return_lse, names, *tensors):
        ctx.set_materialize_grads(False)
        ctx.kernel, ctx.call = kernel, dataclasses.replace(call, tensors={})
        ctx.return_lse, ctx.names, ctx.deterministic = return_lse, names, kernel.deterministic
        if kernel.generated.plan.has_lse:  # the LSE stored
            o, lse = kernel.generated.launcher(call, True, config=kernel.tuned_config(call))
        else:  # pointwise weights: the backward recomputes them, no statistic to save
            (o,), lse = kernel.generated.launcher(call, False, config=kernel.tuned_config(call)), torch.zeros(0)
        o = kernel._cast(o, call)
        ctx.save_for_backward(*tensors, o, lse)
        return (o, kernel._cast(lse, call)) if return_lse else (o,)

    @staticmethod
    def backward(ctx, *grads):
        *tensors, o, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients, from the reference
            return (None, None, None, None, *_reference_gradients(ctx, tensors, grads))
        wanted = {ctx.names[k] for k in range(len(tensors)) if ctx.needs_input_grad[4 + k]}
        grad_o, grad_lse = grads[0], grads[1] if ctx.return_lse else None
        if grad_o is None and grad_lse is None:
            return (None,) * (4 + len(tensors))
        call = dataclasses.replace(ctx.call, tensors=dict(zip(ctx.names, tensors)))
        launcher = ctx.kernel.backward_launcher()
        found = launcher.gradients(call, o, lse, grad_o, grad_lse, wanted, deterministic=ctx.deterministic)
        ctx.kernel.note_backward_fallback(launcher)
        return (None, None, None, None, *(found.get(n) for n in ctx.names))


def compile(spec: str | Path, backend: str = "auto", *, reference_block: int = 256,
            deterministic: bool = False) -> Kernel:
    """Compile a spec (a path to a `.attn` file, its source text, or a function decorated with
    `@attncc.attention`) into a callable `Kernel`.

    backend: "triton" generates a fused Triton kernel (CUDA tensors run compiled; CPU
    tensors run the same kernel in Triton's interpreter, slowly: that is for tests);
    "reference" runs the PyTorch reference executor; "auto" picks "triton" when a GPU
    is present and the spec can be generated, else "reference". Asking for a backend
    that cannot run raises `BackendError` instead of substituting another.
    reference_block: how many entries of the streamed index the reference executor
    processes at once (its memory is proportional to it).
    deterministic: the generated backward uses no float atomics (gradients of gathered score
    reads, such as a relative-position table, are reduced in a fixed order), so gradients are
    bitwise identical run to run; `kernel.deterministic` can be changed later (docs/training.md).
    """
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend '{backend}'; available: {', '.join(BACKENDS)}")
    program = load(spec)
    ran, generated = choose_backend(program, backend)
    kernel = Kernel(program, ran, reference_block, generated)
    kernel.chosen_automatically = backend == "auto" and ran == "triton"
    kernel.deterministic = bool(deterministic)
    return kernel


def choose_backend(program: ir.Program, backend: str) -> tuple[str, "Generated | None"]:
    """(the backend that runs `program`, its generated kernel or None) when `backend` is asked for."""
    if backend == "reference" or (backend == "auto" and not torch.cuda.is_available()):
        return "reference", None
    try:
        return "triton", generate(program)
    except RecursionError:
        raise too_deep(program.source.text, program.source.filename) from None
    except (NotRowStreamable, Unsupported) as why:
        if backend == "auto":
            return "reference", None
        raise BackendError(f"{program.source.filename}: the triton backend cannot generate '{program.name}' "
                           f"yet: {why}; backend='reference' runs it") from None


class Generated:
    """A generated kernel: its plan, its source (saved under the cache dir) and its launcher,
    made by the `plan` and `triton` stages of `attncc.pipeline`."""

    def __init__(self, program: ir.Program):
        from .runtime import source_path

        self.plan = pipeline.plan(program)
        self.source = pipeline.triton_source(self.plan)
        self.path = source_path(self.source)
        self.launcher = pipeline.launcher(self.plan, self.source)


def generate(program: ir.Program) -> Generated:
    """Plan and generate the Triton kernel of a program (raises `NotRowStreamable`)."""
    return Generated(program)
