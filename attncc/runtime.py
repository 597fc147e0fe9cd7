"""Loading and launching generated Triton kernels.

Generated source is written to a cache directory under a name derived from its
content hash (`ATTNCC_CACHE_DIR`, default `~/.cache/attncc`), so it can be read,
diffed and reused. CUDA tensors run the compiled kernel; CPU tensors run the very
same source in Triton's interpreter (`TRITON_INTERPRET=1` semantics), which is how
the tests check generated code on machines without a GPU. It is slow: use it for
small shapes only.
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import hashlib
import io
import linecache
import math
import os
import sys
import threading
import types
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from . import cachefs, ir
from .binding import BoundCall
from .errors import BackendError
from .reference import Reference, align, evaluate_scalar
from attncc.codegen import block_map
from attncc.codegen.row_stream import LOG2E, KernelSource
from attncc.passes.kinds import KernelRole, LaunchPath, MaskMode
from attncc.passes.linear import choose_path, row_sum_on
from attncc.passes.row_stream import map_outer

_MODULES: dict[tuple[str, bool], object] = {}
_LOAD_LOCK = threading.RLock()  # one execution per module, however many threads compile the same spec


def cache_dir() -> Path:
    """The folder of generated kernels, created private to the user (0o700); `CacheError`
    when it cannot be (a file in its place, no permission), naming it."""
    root = os.environ.get("ATTNCC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "attncc")
    root = Path(root)
    cachefs.private_dir(root)
    return cachefs.private_dir(root / "kernels")


def source_path(src: KernelSource) -> Path:
    """The saved copy of a kernel's source, `<name>_<hash>.py`, checked before use: a file
    there whose bytes are not exactly the source (edited, truncated, appended to, a symlink,
    a folder, ...) is replaced, with a warning. What runs is never read back from this file
    (`load_module` executes the generated text itself); the copy is for people and tools."""
    data = src.source.encode()
    digest = hashlib.sha256(data).hexdigest()
    path = cache_dir() / f"{src.name}_{digest[:16]}.py"
    try:
        found = cachefs.read_regular(path, len(data))
    except OSError as err:
        found, why = b"", f"unreadable ({err.strerror or err})"
    else:
        why = "its content does not match the hash in its name"
    if found is not None and hashlib.sha256(found).hexdigest() == digest:
        return path
    if found is not None:
        warnings.warn(f"attncc: the cached kernel {path} is {why}; regenerating it", stacklevel=2)
    cachefs.write_atomic(path, data)
    return path


class _VerifiedSource:
    """The loader of a generated module: `get_source` answers with the text that was
    executed, so tracebacks and `inspect` never fall back to another text on disk."""

    def __init__(self, text: str):
        self.text = text

    def get_source(self, name):
        return self.text


def _pin_source(filename: str, text: str):
    """Make `linecache` (what `inspect.getsource`, and so Triton's `@jit`, read) hold `text`
    for `filename`, as an entry it never refreshes from disk (no mtime)."""
    lines = [line for line in io.StringIO(text, newline="")]  # line breaks as Python's tokenizer sees them
    linecache.cache[filename] = (len(text), None, lines, filename)


@contextmanager
def _interpreter(on: bool):
    """Triton decides at decoration time whether `@triton.jit` interprets."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def check_interpreter_ready():
    """Triton's interpreter needs Triton's own library functions (`tl.cdiv`, `tl.max`, ...)
    decorated in interpreter mode, which happens only when `TRITON_INTERPRET=1` is set
    before triton is first imported. Say so instead of failing deep inside a kernel."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    if type(tl.cdiv) is JITFunction:
        raise BackendError("running generated kernels on CPU tensors needs Triton's interpreter, and triton was "
                           "imported before it could be set up: set TRITON_INTERPRET=1 in the environment "
                           "before Python starts (or import attncc and run a kernel before anything imports "
                           "triton), or pass CUDA tensors")


def load_module(src: KernelSource, interpret: bool):
    """The module of a generated source, executed from the generated text itself (never from
    bytes read back from the cache), under the path of its verified saved copy."""
    path = source_path(src)
    key = (str(path), interpret)
    with _LOAD_LOCK:
        if key not in _MODULES:
            _MODULES[key] = _execute(src.source, path, interpret)
    return _MODULES[key]


def _execute(text: str, path: Path, interpret: bool):
    name = f"attncc._generated.{path.stem}{'_interp' if interpret else ''}"
    module = types.ModuleType(name)
    module.__file__ = str(path)
    module.__loader__ = _VerifiedSource(text)
    code = compile(text, str(path), "exec", dont_inherit=True)
    _pin_source(str(path), text)
    sys.modules[name] = module  # Triton's @jit and inspect look functions' modules up by name
    try:
        with _interpreter(interpret):
            exec(code, module.__dict__)
            if interpret:
                check_interpreter_ready()
                for obj in list(vars(module).values()):  # the interpreter reads a kernel's source lazily:
                    rewrite = getattr(obj, "rewrite", None)  # read it now, while the pinned text is there
                    if callable(rewrite) and type(obj).__name__ == "InterpretedFunction":
                        rewrite()
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def check_device(call: BoundCall):
    """Whether the call runs in Triton's interpreter (CPU tensors) rather than compiled (CUDA).
    Meta tensors are taken while launches are being recorded (`RowStreamLauncher.launches`):
    they have the shapes, strides and dtypes a compile specialises on, and no data."""
    if call.device.type == "cuda":
        return False
    if call.device.type == "cpu":
        return True
    if call.device.type == "meta" and _RECORDING.get() is not None:
        return False
    raise BackendError(f"the triton backend runs on CUDA tensors (or CPU tensors in the interpreter), "
                       f"not on {call.device}")


def pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


@dataclasses.dataclass
class KernelLaunch:
    """One kernel launch exactly as the launcher makes it: the `@triton.jit` function, grid,
    positional arguments, constexpr keyword arguments and compile options (`num_warps`,
    `num_stages`; none in the interpreter). `run` launches it; `attncc.aot` compiles the same
    object for a GPU this machine does not have, so a static report cannot drift from what
    a launch compiles."""

    kernel: object
    grid: tuple
    args: list
    constexprs: dict
    options: dict
    interpret: bool
    role: KernelRole  # what the launch does: main, packed, stats, classify, linear_state, ...

    def run(self):
        with _interpreter(self.interpret):
            self.kernel[self.grid](*self.args, **self.constexprs, **self.options)


# while set, launches are appended to this list instead of run (see RowStreamLauncher.launches)
_RECORDING: contextvars.ContextVar[list | None] = contextvars.ContextVar("attncc_recording", default=None)


def launch(k: KernelLaunch):
    """Run a kernel launch, or record it when `RowStreamLauncher.launches` is collecting them."""
    record = _RECORDING.get()
    if record is None:
        k.run()
    else:
        record.append(k)


class RowStreamLauncher:
    """Launches a row-streaming kernel for one bound call."""

    def __init__(self, plan, src: KernelSource, module_src: KernelSource | None = None):
        """`module_src`: the module holding this kernel, when it is not the kernel's own (the
        statistics passes live in the module of the attention kernel that reads them)."""
        self.plan = plan
        self.src = src
        self.module_src = module_src or src
        self.statistics: dict = {}  # precomputed node -> launcher of its statistics pass
        self.block_maps: dict = {}
        self.tma_failures: dict = {}  # kernel variant -> why its TMA form did not build (it uses pointers)
        self.last_tma_fallback = None
        self.modules: dict[bool, object] = {}  # compiled / interpreted module, loaded once
        self.last_block_map = None
        self.last_tile_counts = None
        self.last_splits = 1
        self.last_path: LaunchPath | None = None  # the kernels the last call ran
        self.last_group = 1
        self.last_tma = False  # whether the last row-streaming launch loaded through TMA descriptors

    def launches(self, call: BoundCall, return_lse: bool = False, config: dict | None = None,
                 count_tiles=False) -> list[KernelLaunch]:
        """The kernel launches a call makes (statistics passes, block-map classifier, the
        attention kernel or the linear-attention ones), in order, built by the very code
        of `__call__` but not run. The call's tensors may be meta tensors (`bind(...,
        data=False)`): what a compile specialises on is shapes, strides and dtypes. Kernels
        whose arguments depend on data an earlier kernel computes (block-map lists) get
        placeholders of the right shape and dtype."""
        token = _RECORDING.set([])
        try:
            self(call, return_lse, config, count_tiles)
            return _RECORDING.get()
        finally:
            _RECORDING.reset(token)

    def __call__(self, call: BoundCall, return_lse: bool, config: dict | None = None, count_tiles=False):
        """Run the kernel; with `count_tiles` the kernel counts the key tiles it visits
        into `self.last_tile_counts` = {"full": ..., "partial": ...} (summed over programs)."""
        call, module, interpret, sizes = self.prepare(call)
        p = self.plan
        n_rows, n_cols = sizes[p.i], sizes[p.j]
        n_feat, n_vfeat = sizes[p.d], sizes[p.e] if p.e else 1
        if max(n_feat, n_vfeat) > 256:
            raise BackendError(f"head dims up to 256 are supported, got {n_feat} and {n_vfeat}")
        cfg = dict(default_config(interpret, n_feat, n_vfeat, len(p.terms)))
        cfg.update(config or {})
        path = choose_path(p, sizes, call.scalars, return_lse, count_tiles)
        if path == LaunchPath.REASSOCIATED:
            return [self.run_reassociated(module, call, cfg, sizes, interpret)]
        if path == LaunchPath.CHUNKED:
            return [self.run_chunked(module, call, sizes, interpret)]
        self.last_path = LaunchPath.ROW_STREAMING
        group = self.pack_group(call, cfg, n_rows)
        if "BLOCK_M" not in (config or {}):  # few queries (decoding): no tile rows to waste
            cfg["BLOCK_M"] = min(cfg["BLOCK_M"], pow2(n_rows * group))
            if cfg["BLOCK_M"] < 64 and "num_warps" not in (config or {}):
                cfg["num_warps"] = 4
        variant = self.src.packed if group > 1 else self.src
        kernel = getattr(module, f"{variant.name}_fwd")
        device = call.device
        outer_sizes = [sizes[ix] // group if group > 1 and ix == p.group[0] else sizes[ix] for ix in p.outer]
        combos = math.prod(outer_sizes)
        n_qt = triton_cdiv(n_rows * group, cfg["BLOCK_M"])
        if return_lse and not p.has_lse:
            raise BackendError("return_lse needs a single softmax over the keys")
        splits = cfg.get("SPLIT_KV") or choose_splits(n_rows, n_cols, combos * n_qt, cfg, device)
        if not p.has_lse or p.statistics_only:  # partial results merge by LSE, with values
            splits = 1
        split_len = triton_cdiv(triton_cdiv(n_cols, splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
        splits = triton_cdiv(n_cols, split_len) if n_cols else 1
        lse_axes = p.lse_axes
        out_shape = [sizes[ax] for ax in p.output.axes]
        lse_shape = [sizes[ax] for ax in lse_axes]
        if splits > 1:  # partial results per split, in fp32, merged below
            o_all = torch.empty([splits, *out_shape], dtype=torch.float32, device=device)
            lse_all = torch.empty([splits, *lse_shape], dtype=torch.float32, device=device)
            o, lse = o_all[0], lse_all[0]
        else:  # a statistics pass writes no output: a placeholder keeps the signature
            o = torch.empty([1] * len(out_shape) if p.statistics_only else out_shape, dtype=call.out_dtype,
                            device=device)
            lse = torch.empty(lse_shape if return_lse else [1] * len(lse_axes), dtype=torch.float32,
                              device=device)
        args = []
        for name in variant.tensor_inputs:
            args.append(call.tensors[name])
        counts = torch.zeros(2, dtype=torch.int32, device=device)
        args += [o, lse, counts]
        for name in variant.tensor_inputs:
            args += list(call.tensors[name].stride())
        for name in variant.tensor_inputs:
            args += list(call.tensors[name].shape)
        args += list(o.stride()) + list(lse.stride())
        args += outer_sizes + [sizes[ix] for ix in p.summed_outer]
        args += [n_rows, n_cols, n_feat, n_vfeat, split_len if splits > 1 else max(n_cols, 1) + cfg["BLOCK_N"],
                 o_all.stride(0) if splits > 1 else 0, lse_all.stride(0) if splits > 1 else 0]
        if group > 1:
            args.append(group)
        if self.src.mask_mode == MaskMode.BLOCK_MAP:
            args += self.block_map_lists(call, cfg["BLOCK_M"] // group, cfg["BLOCK_N"], sizes, module, interpret)
        args += self.scalar_values(call, variant.scalar_args, variant.host_scalars)
        grid = (n_qt * splits, combos)
        constexprs = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=pow2(n_feat),
                          BLOCK_E=pow2(n_vfeat), STORE_LSE=return_lse or splits > 1, COUNT_TILES=count_tiles,
                          SPLIT=splits > 1, PRECISION="ieee",
                          UPCAST_DOT=interpret and call.tensors[p.q.input.name].dtype == torch.bfloat16,
                          EVEN_D=pow2(n_feat) == n_feat, EVEN_E=pow2(n_vfeat) == n_vfeat,
                          FULL_MASKED=bool(cfg.get("FULL_MASKED", False)),
                          # whole key / query tiles: no key-bound masks, no row masks on q
                          EVEN_N=n_cols % cfg["BLOCK_N"] == 0, EVEN_M=(n_rows * group) % cfg["BLOCK_M"] == 0,
                          USE_TMA=self.use_tma(call, cfg, interpret),
                          # plain softmax scores scaled inside exp2 (one FFMA) when every such scale is > 0
                          FOLD_SCALE=all(self.term_scale(t, call) > 0 for t, term in enumerate(p.terms)
                                         if term.folds_log2e))
        options = {} if interpret else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
        role = KernelRole.PACKED if group > 1 else KernelRole.STATS if p.statistics_only else KernelRole.MAIN
        variant_key = (role, interpret, *sorted(options.items()), *sorted((k, v) for k, v in constexprs.items()
                                                                          if k != "COUNT_TILES"))
        self.last_tma_fallback = launch_tma_or_pointers(
            KernelLaunch(kernel, grid, args, constexprs, options, interpret, role), variant_key, self.tma_failures)
        if count_tiles and _RECORDING.get() is None:
            self.last_tile_counts = {"full": int(counts[0]), "partial": int(counts[1])}
        self.last_splits, self.last_group = splits, group
        self.last_tma = constexprs["USE_TMA"]
        if splits > 1:
            o, lse = merge_splits(o_all, lse_all, p.output.axes, lse_axes)
            o = o.to(call.out_dtype)
        return [o, lse] if return_lse else [o]

    def term_scale(self, t: int, call: BoundCall) -> float:
        """Term t's score scale `qk_scale{t}`: its scalar factors, times log2(e) for plain
        softmax scores."""
        term = self.plan.terms[t]
        scale = math.prod(evaluate_scalar(f, call.scalars) for f in term.scale)
        return float(scale) * (LOG2E if term.folds_log2e else 1.0)

    def use_tma(self, call: BoundCall, cfg: dict, interpret: bool) -> bool:
        """Whether the kernel loads q, k and v through TMA tensor descriptors (`USE_TMA`)
        rather than pointer tiles. `cfg["USE_TMA"]`: None (default) for Hopper and later
        GPUs (and the static report, which compiles for sm_90), False never, True wherever
        the operands allow it, the interpreter included (tests). Operands allow it when
        `tma_layout_ok` says so for every q, k and v; the Triton in use must have
        `tl.make_tensor_descriptor` (3.4 and later)."""
        want = cfg.get("USE_TMA")
        if want is False or not hasattr(tl_module(), "make_tensor_descriptor"):
            return False
        if want is None:
            device = call.device
            if interpret:
                return False
            if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
                return False
        p = self.plan
        ops = [op for t in p.terms for op in (t.q, t.k)] + ([p.v] if p.v else [])
        return all(tma_layout_ok(call.tensors[op.input.name], op.feature) for op in ops)

    def with_precomputed(self, call: BoundCall) -> BoundCall:
        """The call with the plan's precomputed intermediates added as tensors, computed by
        the reference executor (torch ops) on the call's device, in the inputs' float type."""
        pre = self.plan.precomputed
        if pre is None or not pre.inputs:
            return call
        ref = Reference(self.plan.program, call.tensors, call.scalars)
        tensors = dict(call.tensors)
        for node, synthetic in pre.inputs.items():
            if node in self.src.statistics:  # a generated statistics pass (log-sum-exp)
                value = self.statistics_launcher(node)(call, True)[-1]
            elif _RECORDING.get() is not None and call.device.type == "meta":  # no data: only its layout
                sizes = self.plan.program.sizes(call.scalars)
                dtype = {ir.INT: torch.int64, ir.BOOL: torch.bool}.get(synthetic.dtype, call.out_dtype)
                tensors[synthetic.name] = torch.empty([sizes[ix] if ix in node.indices else 1
                                                       for ix in pre.axes[node]], dtype=dtype, device=call.device)
                continue
            else:
                value = ref.full(node)
            t = align(value, node.indices, pre.axes[node]).contiguous()
            tensors[synthetic.name] = t.to(call.out_dtype) if t.is_floating_point() else t
        return dataclasses.replace(call, tensors=tensors)

    def prepare(self, call: BoundCall):
        """(the call with precomputed inputs and promoted operands, the module, whether Triton
        interprets, the sizes): what every launch path starts from."""
        interpret = check_device(call)
        call = self.with_precomputed(call)
        p = self.plan
        operands = {op.input.name for t in p.terms for op in (t.q, t.k)} | ({p.v.input.name} if p.v else set())
        call = promote_operands(call, operands)
        if any(call.tensors[n].dtype not in (torch.float16, torch.bfloat16, torch.float32) for n in operands):
            raise BackendError("the triton backend takes float16, bfloat16 or float32 q/k/v; "
                               "use backend='reference' for float64")
        module = self.modules.get(interpret) or self.modules.setdefault(interpret,
                                                                        load_module(self.module_src, interpret))
        return call, module, interpret, call.sizes or self.plan.program.sizes(call.scalars)

    def chunked_from(self, call: BoundCall, state: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """The chunked causal scan of `call` started from a carried state instead of zeros
        (context parallelism): `state` `[outer..., D, E]` (and `z` `[outer..., D]`, the key sum
        of a normalised plan), the keys before the sequence decayed to the position before it.
        BackendError when the plan has no chunked scan or the call is not exactly causal."""
        call, module, interpret, sizes = self.prepare(call)
        if choose_path(self.plan, sizes, call.scalars) != LaunchPath.CHUNKED:
            raise BackendError("starting from a carried state needs the chunked causal scan: a linear-attention "
                               "plan and a call whose mask is exactly `j <= i` on a square score")
        return self.run_chunked(module, call, sizes, interpret, (state, z))

    def run_chunked(self, module, call: BoundCall, sizes: dict, interpret: bool, initial=None):
        """The chunked causal scan: one program per (batch, head), chunks in order; from the
        state `initial` = (S, z or None) when given (`chunked_from`), from zeros otherwise."""
        p, src = self.plan, self.src.chunked
        o = torch.empty([sizes[ax] for ax in p.output.axes], dtype=call.out_dtype, device=call.device)
        tensors = [call.tensors[n] for n in src.tensor_inputs]
        combos, block_d, block_e = math.prod(sizes[ix] for ix in p.outer), pow2(sizes[p.d]), pow2(sizes[p.e])
        state = z = o  # placeholders, never read without INIT_STATE
        if initial is not None:  # padded to the blocks, one [BLOCK_D, BLOCK_E] tile per program
            state = torch.zeros((combos, block_d, block_e), dtype=torch.float32, device=call.device)
            state[:, :sizes[p.d], :sizes[p.e]] = initial[0].reshape(combos, sizes[p.d], sizes[p.e])
            z = torch.zeros((combos, block_d), dtype=torch.float32, device=call.device)
            if initial[1] is not None:
                z[:, :sizes[p.d]] = initial[1].reshape(combos, sizes[p.d])
        args = [*tensors, o, state, z, *(x for t in tensors for x in t.stride()),
                *(x for t in tensors for x in t.shape), *o.stride(), *(sizes[ix] for ix in p.outer),
                sizes[p.i], sizes[p.j], sizes[p.d], sizes[p.e],
                *self.scalar_values(call, src.scalar_args, src.host_scalars)]
        launch(KernelLaunch(getattr(module, src.name), (combos,), args,
                            dict(BLOCK_C=16 if interpret else 64, BLOCK_D=block_d, BLOCK_E=block_e,
                                 ROW_SUM=row_sum_on(p, call.scalars), INIT_STATE=initial is not None), {}, interpret,
                            KernelRole.CHUNKED))
        self.last_path = LaunchPath.CHUNKED
        return o

    def run_reassociated(self, module, call: BoundCall, cfg: dict, sizes: dict, interpret: bool):
        """o = f(Q) (f(K)^T V): a state kernel per (batch, head), then an apply kernel per query tile."""
        p, src = self.plan, self.src.reassociated
        n_rows, n_cols, n_feat, n_vfeat = sizes[p.i], sizes[p.j], sizes[p.d], sizes[p.e]
        block_d, block_e = pow2(n_feat), pow2(n_vfeat)
        combos = math.prod(sizes[ix] for ix in p.outer)
        device = call.device
        state = torch.empty((combos, block_d, block_e), dtype=torch.float32, device=device)
        z = torch.empty((combos, block_d), dtype=torch.float32, device=device)
        o = torch.empty([sizes[ax] for ax in p.output.axes], dtype=call.out_dtype, device=device)
        tensors = [call.tensors[n] for n in src.tensor_inputs]
        common = [*tensors, state, z, *(x for t in tensors for x in t.stride()),
                  *(x for t in tensors for x in t.shape), *(sizes[ix] for ix in p.outer),
                  n_rows, n_cols, n_feat, n_vfeat]
        scalars = self.scalar_values(call, src.scalar_args, src.host_scalars)
        meta = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d, BLOCK_E=block_e,
                    ROW_SUM=row_sum_on(p, call.scalars))
        launch(KernelLaunch(getattr(module, f"{src.name}_state"), (1, combos), [*common, *scalars], meta, {},
                            interpret, KernelRole.LINEAR_STATE))
        launch(KernelLaunch(getattr(module, f"{src.name}_apply"), (triton_cdiv(n_rows, cfg["BLOCK_M"]), combos),
                            [*common, o, *o.stride(), *scalars], meta, {}, interpret, KernelRole.LINEAR_APPLY))
        self.last_path = LaunchPath.REASSOCIATED
        return o

    def statistics_launcher(self, node) -> "RowStreamLauncher":
        if node not in self.statistics:
            plan, src = self.src.statistics[node]
            self.statistics[node] = RowStreamLauncher(plan, src, self.module_src)
        return self.statistics[node]

    def pack_group(self, call: BoundCall, cfg: dict, n_rows: int) -> int:
        """Heads per K/V head packed into one tile (1: no packing). By default packing is
        used for few queries (decoding), where one head's rows would leave tiles empty."""
        if self.plan.group is None:
            if cfg.get("GQA_PACK"):
                raise BackendError("GQA_PACK needs a spec whose query heads share K/V heads")
            return 1
        group = int(evaluate_scalar(self.plan.group[1], call.scalars))
        usable = group > 1 and group & (group - 1) == 0 and group <= cfg["BLOCK_M"]
        wanted = cfg.get("GQA_PACK", n_rows * group <= cfg["BLOCK_M"])
        if wanted and not usable and cfg.get("GQA_PACK"):
            raise BackendError(f"GQA packing needs a power-of-two group no larger than BLOCK_M, got {group}")
        return group if wanted and usable else 1

    def block_map_lists(self, call: BoundCall, block_m, block_n, sizes, module, interpret) -> list:
        """Per-query-tile lists of key tiles from the runtime block map, cached while
        the tensors the mask reads, the scalars and the tile sizes stay the same."""
        bm = self.src.block_map
        p = self.plan
        outer = map_outer(p)
        n_q = triton_cdiv(sizes[p.i], block_m)
        n_k = triton_cdiv(sizes[p.j], block_n)
        scalars = self.scalar_values(call, bm.scalar_args, bm.host_scalars)
        tensors = [call.tensors[n] for n in bm.tensor_inputs]
        key = (block_m, block_n, tuple(sorted(sizes.items())), tuple(scalars), str(call.device),
               tuple((t.data_ptr(), t._version, tuple(t.shape), tuple(t.stride())) for t in tensors))
        recording = _RECORDING.get() is not None
        cached = None if recording else self.block_maps.get(key)  # a recording lists the classifier too
        if cached is None:
            lists = math.prod(sizes[ix] for ix in outer)
            state = torch.empty((lists, n_q, n_k), dtype=torch.int8, device=call.device)
            args = [*tensors, state]
            for t in tensors:
                args += list(t.stride())
            for t in tensors:
                args += list(t.shape)
            args += [sizes[ix] for ix in outer] + [sizes[p.i], sizes[p.j], n_q, n_k] + scalars
            launch(KernelLaunch(getattr(module, f"{self.src.name}_classify"), (n_q, n_k, lists), args,
                                dict(BLOCK_M=block_m, BLOCK_N=block_n), {}, interpret, KernelRole.CLASSIFY))
            cached = (*block_map.tile_lists(state), state)
            if recording:
                return [*cached[:3], n_q, n_k]
            if len(self.block_maps) >= 8:
                self.block_maps.pop(next(iter(self.block_maps)))
            self.block_maps[key] = cached
        kv_list, kv_full, kv_count, _ = cached
        self.last_block_map = cached
        return [kv_list, kv_full, kv_count, n_q, n_k]

    def scalar_values(self, call: BoundCall, names, host_scalars) -> list:
        """Values of a kernel's scalar arguments: each is a node of `host_scalars` (dims and
        params included, under their generated argument names), or a term's score scale
        (its scalar factors, times log2(e) for plain softmax scores)."""
        values = []
        for name in names:
            node = host_scalars.get(name)
            if node is None:  # qk_scale{t}
                values.append(self.term_scale(int(name[len("qk_scale"):] or 0), call))
            else:
                v = evaluate_scalar(node, call.scalars)
                values.append(int(v) if isinstance(v, bool) else v)
        return values


def launch_tma_or_pointers(k: KernelLaunch, variant_key: tuple, failures: dict) -> str | None:
    """Launch `k` (its `USE_TMA` as given, unless this variant's TMA form failed to build
    before: `failures`, variant -> why); when its TMA form fails to compile (ptxas of some
    Triton releases crashes on some tile configs), launch the pointer form instead, warn, and
    remember it, so the call still runs the generated kernel and says so. Returns why this
    launch took pointers after such a failure (`kernel.last_run["tma_fallback"]`), else None."""
    if k.constexprs["USE_TMA"] and variant_key in failures:
        k.constexprs["USE_TMA"] = False
    if k.constexprs["USE_TMA"] and not k.interpret and _RECORDING.get() is None:
        ensure_allocator()
    try:
        launch(k)
    except Exception as err:
        if not k.constexprs["USE_TMA"] or _RECORDING.get() is not None:
            raise
        why = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
        failures[variant_key] = why
        warnings.warn(f"attncc: the TMA form of {getattr(k.kernel, '__name__', 'a kernel')} did not build "
                      f"({why}); it runs with pointer loads instead", RuntimeWarning, stacklevel=3)
        k.constexprs["USE_TMA"] = False
        launch(k)
    return failures.get(variant_key) if not k.constexprs["USE_TMA"] else None


def tl_module():
    import triton.language as tl

    return tl


def tma_layout_ok(t: torch.Tensor, feature: int) -> bool:
    """Whether an operand's per-(batch, head) [rows, features] views can be TMA tensor
    descriptors: features contiguous (stride 1), and the base address and every other stride
    (the row stride and those of the outer axes the base is offset by) multiples of 16 bytes.
    Axes of size 1 never move the base, whatever their stride. Meta tensors (the static
    report) have no address; their strides still count."""
    size = t.element_size()
    if t.shape[feature] > 1 and t.stride(feature) != 1:
        return False
    if t.device.type != "meta" and t.data_ptr() % 16:
        return False
    return all((st * size) % 16 == 0 for ax, (n, st) in enumerate(zip(t.shape, t.stride()))
               if ax != feature and n > 1)


def _scratch(size: int, alignment: int, stream):
    """Global scratch memory for kernels that build TMA descriptors on the device."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator():
    """Device-side tensor descriptors need a global scratch allocator (`triton.set_allocator`);
    set ours unless one is set already (Triton keeps it per context, so each thread checks)."""
    import triton

    try:
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # another layout of Triton's internals: set ours
        pass
    triton.set_allocator(_scratch)


def promote_operands(call: BoundCall, names) -> BoundCall:
    """The call with its matrix-product operands (q, k, v and gathered stand-ins) cast to
    one promoted float type: `tl.dot` takes operands of one type, and the reference computes
    mixed inputs (float16 q, float32 k) as if promoted, so both backends agree. A cast
    operand is a copy; the output keeps the dtype of the first float input."""
    dtypes = {call.tensors[n].dtype for n in names if call.tensors[n].is_floating_point()}
    if len(dtypes) < 2:
        return call
    common = functools.reduce(torch.promote_types, dtypes)
    tensors = {n: t.to(common) if n in names and t.is_floating_point() else t for n, t in call.tensors.items()}
    return dataclasses.replace(call, tensors=tensors)


def merge_splits(o_parts: torch.Tensor, lse_parts: torch.Tensor, o_axes=None, lse_axes=None):
    """Merge split-KV partial results (dim 0 = split): each split's normalised output
    weighs in by exp(lse_split - lse), lse being the log-sum-exp over splits. Splits that
    saw no allowed key (lse = -inf) weigh 0; rows with no key at all stay 0, lse -inf.
    `o_axes`/`lse_axes` name the axes when the output layout is not lse's plus one."""
    lse = torch.logsumexp(lse_parts, dim=0)
    weight = torch.exp(lse_parts - torch.where(torch.isfinite(lse), lse, 0.0))
    weight = torch.where(torch.isfinite(lse_parts), weight, 0.0)
    if o_axes is None:
        weight = weight.unsqueeze(-1)
    else:
        weight = align(weight, ("split", *lse_axes), ("split", *o_axes))
    return (weight * o_parts).sum(dim=0), lse


def choose_splits(n_rows: int, n_cols: int, programs: int, cfg: dict, device) -> int:
    """The split-KV decision for a launch (1 off a GPU)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return split_count(n_rows, n_cols, programs, cfg["BLOCK_N"], sms)


def split_count(n_rows: int, n_cols: int, programs: int, block_n: int, sms: int) -> int:
    """Split the keys (flash-decoding) when few queries (at most 16) leave the GPU idle:
    enough splits to give every SM a couple of programs, never below 4 key tiles per split."""
    if n_rows > 16:
        return 1
    tiles = triton_cdiv(n_cols, block_n)
    return max(1, min(triton_cdiv(2 * sms, max(programs, 1)), tiles // 4))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def default_config(interpret: bool, d: int, e: int, accumulators: int = 1) -> dict:
    """Tile sizes before any tuning: small tiles in the interpreter (speed, and more
    tile boundaries exercised), FlashAttention-like ones on a GPU. Chosen from the static
    report (benchmarks/static_resources.py: sm_90, compiled as a launch compiles, Triton 3.9):
    128x64 tiles, 8 warps and 3 stages have no spill up to head dim 128 (causal with TMA loads
    114 registers and 2 CTAs/SM at D = 64, 153 at D = 128); two accumulators (differential attention) spill
    48 B at 128x64 and D = 128, so above head dim 64 they take 64x32 tiles and 2 stages, as
    head dims above 128 do (128x64 with 2 stages compiles without spill there too, at
    250-254 registers: to be timed)."""
    if interpret:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    wide = max(d, e) > 128 or (accumulators > 1 and max(d, e) > 64)
    return {"BLOCK_M": 128 if not wide else 64, "BLOCK_N": 64 if not wide else 32,
            "num_warps": 8, "num_stages": 2 if wide else 3}
