"""The Python API: `attncc.compile(spec)` returns a `Kernel`, a callable taking keyword arguments."""
from __future__ import annotations

import inspect
from pathlib import Path

import networkx as nx
import torch

from . import ir
from .binding import bind, describe_input
from .errors import ArgumentError, BackendError, SpecError
from .frontend import lower
from .reference import Reference
from .syntax import parse
from attncc.autotune.cache import TuningCache, tuning_key
from attncc.passes.infer import infer_extents
from attncc.codegen.tile_expr import Unsupported
from attncc.passes.row_stream import NotRowStreamable, plan_row_stream

BACKENDS = ("auto", "triton", "reference")


def load(spec: str | Path) -> ir.Program:
    """Parse and check a spec given as a path or as source text."""
    text, filename = read_spec(spec)
    return infer_extents(lower(parse(text, filename)))


def read_spec(spec: str | Path) -> tuple[str, str]:
    """(text, filename) of a spec that is a path (`*.attn` or an existing file) or source text."""
    if isinstance(spec, Path) or ("\n" not in spec and (spec.endswith(".attn") or Path(spec).is_file())):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"no spec file at {path}")
        return path.read_text(), str(path)
    return spec, "<string>"


def lse_output(program: ir.Program) -> ir.Output:
    """The log-sum-exp side output of the softmax that feeds the first output."""
    first = program.outputs[0]
    ancestors = nx.ancestors(program.graph, first.node) | {first.node}
    softmaxes = [n for n in ancestors if isinstance(n, ir.Normalize) and n.op == "softmax"
                 and n.axis not in first.node.indices]
    if len(softmaxes) != 1:
        raise SpecError(f"return_lse needs exactly one softmax over the summed axis feeding "
                        f"'{first.name}', found {len(softmaxes)}", program.source, first.loc)
    sm = softmaxes[0]
    indices = tuple(ix for ix in sm.arg.indices if ix != sm.axis)
    node = ir.Reduce(op="logsumexp", arg=sm.arg, axes=(sm.axis,), indices=indices, loc=sm.loc)
    return ir.Output("lse", node, indices, tuple(program.extent[ix] for ix in indices), sm.loc)


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
        self.__signature__ = self.signature

    # ------------------------------------------------------------------ introspection
    @property
    def inputs(self) -> dict[str, str]:
        return {n: describe_input(node) for n, node in self.program.inputs.items()}

    @property
    def params(self) -> dict[str, object]:
        """Each param's default value, or the text of its default expression when it
        depends on dims (`-log(M)`), or `inspect.Parameter.empty` when it has none."""
        out = {}
        for name, node in self.program.params.items():
            if node.default is None:
                out[name] = inspect.Parameter.empty
            elif isinstance(node.default, ir.Const):
                out[name] = node.default.value
            else:
                out[name] = None  # computed from dims at call time; pass None for the default
        return out

    @property
    def outputs(self) -> list[str]:
        return [o.name for o in self.program.outputs]

    @property
    def signature(self) -> inspect.Signature:
        params = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=torch.Tensor)
                  for n in self.program.inputs]
        for name, default in self.params.items():
            ann = {"int": int, "float": float, "bool": bool}[self.program.params[name].dtype]
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=ann))
        params.append(inspect.Parameter("return_lse", inspect.Parameter.KEYWORD_ONLY, default=False,
                                        annotation=bool))
        return inspect.Signature(params)

    def __repr__(self):
        return f"<attncc.Kernel {self.name}{self.signature} backend={self.backend!r}>"

    # ------------------------------------------------------------------ calling
    def __call__(self, *args, return_lse: bool = False, **kwargs):
        if args:
            raise ArgumentError(f"{self.name}() takes keyword arguments only "
                                f"({', '.join(self.program.inputs)}, ...)")
        call = bind(self.program, kwargs)
        extra = [self.lse()] if return_lse else []  # the same error on every backend when there is none
        results, reason = None, None
        if self.backend == "triton":
            try:
                results = self.generated.launcher(call, bool(return_lse), config=self.tuned_config(call))
                self.last_run = {"backend": "triton", "interpreted": call.device.type == "cpu",
                                 "source": str(self.generated.path)}
            except BackendError as why:
                if not self.chosen_automatically:  # triton was asked for: say why it cannot run
                    raise
                reason = str(why)
        if results is None:  # the reference, and why when "auto" chose triton but this call cannot take it
            results = Reference(self.program, call.tensors, call.scalars, self.reference_block).run(extra)
            self.last_run = {"backend": "reference", **({"reason": reason} if reason else {})}
        results = [self._cast(r, call) for r in results]
        return results[0] if len(results) == 1 else tuple(results)

    def tuned_config(self, call) -> dict | None:
        """The tuned config for a bound call's key, or None (the launcher's heuristic)."""
        key = tuning_key(self.program, call)
        if key not in self._configs:
            self.tuning_cache = self.tuning_cache or TuningCache()
            entry = self.tuning_cache.get(key)
            self._configs[key] = entry and entry["config"]
        return self._configs[key]

    def tune(self, *, trials: int = 30, timeout_s: float | None = None, cache=None, objective=None,
             progress=None, **example_inputs):
        """Search tile sizes, warps, stages (and key splits for few queries) for calls
        shaped like `example_inputs`; store the best config in the tuning cache, where
        every later call in the same bucket (same spec, dims rounded up to powers of two
        above 16, int params, dtype, GPU, Triton version) finds it. See docs/autotune.md.

        trials / timeout_s: the budget, whichever ends first. cache: a path or a
        `TuningCache` (default: the user cache, `$ATTNCC_CACHE_DIR/tuning.json`);
        a cache given here becomes `self.tuning_cache`, the one later calls read.
        objective: `objective(config) -> seconds` instead of timing launches with CUDA
        events (tests inject a deterministic cost; without one the inputs must be on a
        GPU). progress: `progress(trial, result_so_far)` after each trial.
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
        result = tuner.tune(objective, configs, trials=trials, timeout_s=timeout_s, progress=progress)
        if result.best is None:
            reasons = "; ".join(sorted({t.reason for t in result.trials if t.reason}))
            raise BackendError(f"no config of '{self.name}' ran: {reasons}")
        store = cache if isinstance(cache, TuningCache) else TuningCache(cache)
        if cache is not None:  # the cache a kernel tunes into is the one its calls read
            self.tuning_cache, self._configs = store, {}
        key = tuning_key(self.program, call)
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


def compile(spec: str | Path, backend: str = "auto", *, reference_block: int = 256) -> Kernel:
    """Compile a spec (a path to a `.attn` file or its source text) into a callable `Kernel`.

    backend: "triton" generates a fused Triton kernel (CUDA tensors run compiled; CPU
    tensors run the same kernel in Triton's interpreter, slowly: that is for tests);
    "reference" runs the PyTorch reference executor; "auto" picks "triton" when a GPU
    is present and the spec can be generated, else "reference". Asking for a backend
    that cannot run raises `BackendError` instead of substituting another.
    reference_block: how many entries of the streamed index the reference executor
    processes at once (its memory is proportional to it).
    """
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend '{backend}'; available: {', '.join(BACKENDS)}")
    program = load(spec)
    if backend == "reference" or (backend == "auto" and not torch.cuda.is_available()):
        return Kernel(program, "reference", reference_block)
    try:
        generated = generate(program)
    except (NotRowStreamable, Unsupported) as why:
        if backend == "auto":
            return Kernel(program, "reference", reference_block)
        raise BackendError(f"{program.source.filename}: the triton backend cannot generate '{program.name}' "
                           f"yet: {why}; backend='reference' runs it") from None
    kernel = Kernel(program, "triton", reference_block, generated)
    kernel.chosen_automatically = backend == "auto"
    return kernel


class Generated:
    """A generated kernel: its plan, its source (saved under the cache dir) and its launcher."""

    def __init__(self, program: ir.Program):
        from attncc.codegen.row_stream import generate_module
        from .runtime import RowStreamLauncher, source_path

        if len(program.outputs) > 1:
            raise NotRowStreamable("several outputs are not generated yet")
        self.plan = plan_row_stream(program)
        self.source = generate_module(self.plan, program.name)
        self.path = source_path(self.source)
        self.launcher = RowStreamLauncher(self.plan, self.source)


def generate(program: ir.Program) -> Generated:
    """Plan and generate the Triton kernel of a program (raises `NotRowStreamable`)."""
    return Generated(program)
