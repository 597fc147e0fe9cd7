"""Ahead-of-time compilation of generated kernels for a GPU this machine does not have.

Triton's wheel carries ptxas, so a kernel can be compiled down to a cubin for, say, an H100
(sm_90) on a CPU-only machine. That checks what the permissive interpreter cannot (types of
loop-carried values, scalar/tensor mixes, dot shapes), and the cubin, its PTX and its SASS
then tell the registers, spill stack, shared memory and instruction mix of a tile config:
a static view of a kernel before any GPU time is spent. Compilation needs a process that
did not import triton in interpreter mode (`TRITON_INTERPRET` unset).

What is compiled is exactly what a launch compiles. The launcher records the launches of a
call whose tensors are meta tensors (shapes, strides and dtypes, no data:
`RowStreamLauncher.launches`), and each recorded launch goes through Triton's own argument
binder (`create_function_from_signature` and `JITFunction._pack_args`, as
`JITFunction.run` does): integer arguments equal to 1 become constants, arguments and
pointers divisible by 16 carry `tt.divisibility`, constexprs are the launcher's. Compiling
with every stride a plain i32 and no hints, as this module once did, gives other (worse)
register counts than the ones that run.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field

import torch

from . import ir
from .binding import bind
from .errors import BackendError
from .random_inputs import random_arguments
from .runtime import KernelLaunch, default_config
from attncc.passes.kinds import KernelRole

# sm_90 (H100/H200) limits used by the occupancy estimate
SM90 = {"regs_per_sm": 65536, "smem_per_sm": 228 * 1024, "smem_per_cta": 227 * 1024, "threads_per_sm": 2048,
        "ctas_per_sm": 32, "reg_granularity": 256, "smem_granularity": 128, "reserved_smem_per_cta": 1024}
# the benchmark shape of the static report: B = 4, H = 16, N = M = 4096 (bf16)
REPORT_SHAPE = {"B": 4, "H": 16, "N": 4096, "M": 4096}
_OTHER_DIMS = {"G": 4, "W": 257}  # K/V heads of GQA specs (16 // 4), relative-position buckets


def report_shape(program: ir.Program, plan, d: int, e: int, n: int = 4096) -> dict:
    """The dims of the report's call: head dims d and e, n queries and keys, batch 4 and 16
    heads, named by their role in the plan (a spec may call its dims anything)."""
    shape = {}
    if hasattr(plan, "passes"):  # a general plan: the first tile dot's operands, the first values
        dot = next(t for p in plan.passes for t in (*p.dots, *p.lazy_dots))
        q, k = (dot.sides[ix] for ix in dot.sides)
        values = [a.value for p in plan.passes for a in p.accumulators if a.value is not None]
        v = values[0] if values else None
    else:
        q, k, v = plan.terms[0].q, plan.terms[0].k, plan.v
    roles = [(q.input.dims[q.feature], d), (q.input.dims[q.row], n), (k.input.dims[k.row], n)]
    if v is not None:
        roles.append((v.input.dims[v.feature], e))
    for dim, value in roles:
        name = getattr(dim, "name", None) if getattr(dim, "is_Symbol", False) else None
        if name in program.dims:
            shape.setdefault(name, value)
    for name, value in {**REPORT_SHAPE, "N": n, "M": n, **_OTHER_DIMS}.items():
        if name in program.dims and name not in shape:
            shape[name] = value
    return shape


def size_params(program: ir.Program, shape: dict) -> dict:
    """Values for the int params without a default that a spec's `require`s tie to the
    sequence length (`N == height * width`, `N == views * height * width`, a tuple `shape`):
    a grid as square as powers of two allow, 4 views; other such params get 8 (floats 1.0)."""
    n = shape.get("N", 4096)
    out = {}
    params = program.call_params()
    missing = [name for name, p in params.items()
               if any(s.default is None for s in (p.scalars if isinstance(p, ir.ParamGroup) else (p,)))]
    if "views" in missing:
        out["views"] = 4
        n //= 4
    height = 2 ** (int(math.log2(max(n, 1))) // 2)
    for name in missing:
        node = params[name]
        if name in out:
            continue
        if isinstance(node, ir.ParamGroup):  # an enum: its first name; a tuple: a grid (1, ..., height, width)
            k = len(node.scalars)
            out[name] = node.choices[0] if node.is_enum else ((1,) * k + (height, max(1, n // height)))[-k:]
        elif name == "height":
            out[name] = height
        elif name == "width":
            out[name] = max(1, n // height)
        else:
            out[name] = 8 if node.dtype == ir.INT else True if node.dtype == ir.BOOL else 1.0
    return out


def static_call(kernel, d: int, e: int, n: int = 4096, shape: dict | None = None, params: dict | None = None,
                dtype=torch.bfloat16):
    """A bound call of `kernel` on meta tensors (no data) at the report's shape."""
    program, plan = kernel.program, kernel.generated.plan
    dims = {**report_shape(program, plan, d, e, n), **(shape or {})}
    given = {**size_params(program, dims), **(params or {})}
    args = random_arguments(program, dims, given, dtype=dtype, device="meta")
    return bind(program, args, data=False)


# ---------------------------------------------------------------------------------------------
# Triton's binder, as a launch runs it


def specialise(launch: KernelLaunch, arch: int = 90):
    """(signature, constexprs, attrs, options) of a launch, computed by Triton's own argument
    binder for `GPUTarget("cuda", arch, 32)`: what `JITFunction.run` passes to the compiler."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime import jit

    fn = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = {**launch.constexprs, **launch.options}
    kwargs["debug"] = kwargs.get("debug", getattr(fn, "debug", None)) or knobs.runtime.debug
    binder = jit.create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    if hasattr(fn, "_pack_args"):  # Triton 3.5 and later
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    else:  # the same steps, inline in JITFunction.run in earlier versions
        from triton._utils import find_paths_if, get_iterable_path

        options = backend.parse_options(kwargs)
        sigvals = [x[0] for x in specialization]
        signature = {p.name: v for p, v in zip(fn.params, sigvals)}
        paths = find_paths_if(sigvals, lambda _, val: val == "constexpr")
        constexprs = {path: get_iterable_path(list(bound.values()), path) for path in paths}
        attrvals = ["" if x[0] == "constexpr" else x[1] for x in specialization]
        paths = find_paths_if(attrvals, lambda _, x: isinstance(x, str))
        attrs = {k: backend.parse_attr(get_iterable_path(attrvals, k)) for k in paths}
    return signature, constexprs, attrs, options


def compile_launch(launch: KernelLaunch, arch: int = 90):
    """The compiled kernel (cubin, PTX, metadata) a launch would run on an `sm_<arch>` GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = specialise(launch, arch)
    source = ASTSource(launch.kernel, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options.__dict__)


def report_launches(kernel, d: int, e: int, config: dict | None = None, n: int = 4096, shape=None,
                    params=None) -> list[KernelLaunch]:
    """Every distinct kernel launch of a compiled spec at the report's shape: the launches of
    a plain call (with its statistics passes, block-map classifier or linear-attention
    kernels), of a GQA-packed call when query heads share K/V heads, and of the row-streaming
    kernel when plain calls take a linear-attention path. One launch per kernel function."""
    launcher = kernel.generated.launcher
    src = kernel.generated.source
    call = static_call(kernel, d, e, n, shape, params)
    config = dict(config or {})
    runs = [(config, False)]
    if getattr(src, "packed", None) is not None:
        runs.append(({**config, "GQA_PACK": True}, False))
    if getattr(src, "reassociated", None) is not None or getattr(src, "chunked", None) is not None:
        runs.append((config, True))  # counting tiles always streams rows
    out, seen = [], set()
    for cfg, count in runs:
        try:
            recorded = launcher.launches(call, False, cfg, count_tiles=count)
        except BackendError:
            if "GQA_PACK" in cfg:  # a group that cannot pack (not a power of two, ...)
                continue
            raise
        for k in recorded:
            if k.kernel.__name__ not in seen:
                seen.add(k.kernel.__name__)
                out.append(k)
    return out


BACKWARD_ROLES = (KernelRole.BWD_PRE, KernelRole.BWD_DKDV, KernelRole.BWD_DQ)


def backward_launches(kernel, d: int, e: int, config: dict | None = None, n: int = 4096, shape=None,
                      params=None) -> list[KernelLaunch]:
    """The generated backward's kernel launches (delta, dK/dV, dQ; per term for a sum of
    terms) of a compiled spec at the report's shape, recorded from the backward launcher's
    own code (`RowStreamBackward.launches`: every score read's gradient wanted, deterministic
    as the kernel is) with `config` (`attncc.row_backward.backward_config`); one launch per
    kernel function, none when the spec has no generated backward (`Kernel.backward_plan`
    says why) and, for now, none for the general plan's backward (its kernels launch from data
    the recorded forward does not have: the saved accumulators)."""
    if isinstance(kernel.backward_plan(), str) or not hasattr(kernel.backward_launcher(), "launches"):
        return []
    call = static_call(kernel, d, e, n, shape, params)
    out, seen = [], set()
    for k in kernel.backward_launcher().launches(call, False, config, kernel.deterministic):
        if k.role in BACKWARD_ROLES and k.kernel.__name__ not in seen:  # not the terms' forwards
            seen.add(k.kernel.__name__)
            out.append(k)
    return out


def compile_kernels(kernel, d: int, e: int, config: dict | None = None, arch: int = 90, n: int = 4096,
                    shape=None, params=None) -> dict:
    """Every kernel of a compiled spec's module that a call can launch (main, GQA-packed
    variant, statistics passes, block-map classifier, linear-attention kernels), compiled for
    `sm_<arch>` as a launch on bf16 inputs at the report's shape (B = 4, H = 16, N = M = n,
    head dims d and e) with `config` (the launcher's default where not given) would."""
    return {k.kernel.__name__: compile_launch(k, arch)
            for k in report_launches(kernel, d, e, config, n, shape, params)}


# ---------------------------------------------------------------------------------------------
# what the compiled kernel is made of


@dataclass
class Resources:
    kernel: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    num_warps: int = 0
    ctas_per_sm: int = 0
    limited_by: str = ""
    wgmma: int = 0                  # wgmma.mma_async instructions (PTX)
    wgmma_a_shared: bool | None = None  # the QK^T wgmma's A (q) read from shared memory
    tma_loads: int = 0              # cp.async.bulk.tensor (PTX)
    cp_async_loads: int = 0         # cp.async (non-bulk, PTX)
    loops: list = field(default_factory=list)  # SASS instructions per loop body, in code order

    def as_dict(self) -> dict:
        return asdict(self)


def tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _cuobjdump(cubin: bytes, *flags) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool("cuobjdump"), *flags, f.name], capture_output=True, text=True,
                              check=True).stdout


def occupancy(registers: int, num_warps: int, shared_bytes: int, limits: dict = SM90) -> tuple[int, str]:
    """CTAs per SM on sm_90 from registers per thread (allocated per warp in units of 256),
    threads and shared memory (plus the 1 KiB the driver reserves per CTA); and the limit."""
    g = limits["reg_granularity"]
    regs_per_warp = -(-max(registers, 1) * 32 // g) * g
    by_regs = limits["regs_per_sm"] // (regs_per_warp * num_warps)
    by_threads = limits["threads_per_sm"] // (32 * num_warps)
    sg = limits["smem_granularity"]
    smem = -(-(shared_bytes + limits["reserved_smem_per_cta"]) // sg) * sg
    by_smem = limits["smem_per_sm"] // smem if shared_bytes <= limits["smem_per_cta"] else 0
    bounds = {"registers": by_regs, "threads": by_threads, "shared memory": by_smem,
              "CTA slots": limits["ctas_per_sm"]}
    ctas = min(bounds.values())
    return ctas, min(bounds, key=lambda k: (bounds[k], k != "registers"))


_WGMMA = re.compile(r"wgmma\.mma_async[^\s]*\s+(\{[^}]*\}|[^,]+),\s*(\{[^}]*\}|[^,]+),")


def ptx_facts(ptx: str) -> dict:
    """wgmma count, whether the first wgmma of the kernel (QK^T: the first dot in the key
    loop) reads its A operand from shared memory (a 64-bit descriptor `%rd` rather than a
    brace list of registers), and the kinds of asynchronous loads."""
    wgmmas = _WGMMA.findall(ptx)
    a_shared = None
    if wgmmas:
        a = wgmmas[0][1].strip()
        a_shared = not a.startswith("{")
    tma = len(re.findall(r"cp\.async\.bulk\.tensor", ptx))
    cp = len(re.findall(r"\bcp\.async\.(?:ca|cg)\.shared", ptx))
    return {"wgmma": len(wgmmas), "wgmma_a_shared": a_shared, "tma_loads": tma, "cp_async_loads": cp}


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_TARGET = re.compile(r"`?\(\.L_x_(\d+)\)|0x([0-9a-f]+)")


def sass_loops(sass: str) -> list[dict]:
    """The loops of a kernel's SASS: each backward branch (a BRA whose target lies before
    it) closes a loop whose body is the instructions from the target to the branch. Returns
    {start, end, instructions, wgmma} per innermost loop, in code order. Key-tile loops are
    the ones holding HGMMA instructions; their count is a static size, not a dynamic one
    (instructions in a loop's body, each counted once)."""
    labels, instrs = {}, []
    for line in sass.splitlines():
        m = re.match(r"\s*\.L_x_(\d+):", line)
        if m:
            labels[m.group(1)] = None  # bound to the next instruction's address
            continue
        m = _SASS_LINE.search(line)
        if not m:
            continue
        addr, text = int(m.group(1), 16), m.group(2).strip()
        for k, v in labels.items():
            if v is None:
                labels[k] = addr
        instrs.append((addr, text))
    loops = []
    for addr, text in instrs:
        op = text.split()[0] if not text.startswith("@") else text.split()[1]
        if not op.startswith("BRA"):
            continue
        m = re.search(r"\.L_x_(\d+)", text)
        target = labels.get(m.group(1)) if m else None
        if target is None:
            m = re.search(r"0x([0-9a-f]+)", text)
            target = int(m.group(1), 16) if m else None
        if target is None or target >= addr:
            continue
        body = [t for a, t in instrs if target <= a <= addr]
        loops.append({"start": target, "end": addr, "instructions": len(body),
                      "wgmma": sum("HGMMA" in t for t in body)})
    inner = [lp for lp in loops if not any(o is not lp and lp["start"] < o["start"] and o["end"] <= lp["end"]
                                           for o in loops)]
    return sorted(inner, key=lambda lp: lp["start"])


def resources(name: str, compiled, num_warps: int | None = None) -> Resources:
    """Registers and spill stack (cuobjdump's resource usage), shared memory (Triton's
    metadata), CTAs per SM, the wgmma A operand source and load kinds (PTX), and the key-tile
    loops' SASS instruction counts of a compiled kernel."""
    cubin = compiled.asm["cubin"]
    report = _cuobjdump(cubin, "--dump-resource-usage")
    regs = re.search(r"REG:(\d+)", report)
    stack = re.search(r"STACK:(\d+)", report)
    warps = num_warps or int(getattr(compiled.metadata, "num_warps", 4))
    shared = int(compiled.metadata.shared)
    r = Resources(name, int(regs.group(1)) if regs else -1, int(stack.group(1)) if stack else -1, shared, warps)
    r.ctas_per_sm, r.limited_by = occupancy(r.registers, warps, shared)
    for k, v in ptx_facts(compiled.asm.get("ptx", "")).items():
        setattr(r, k, v)
    try:
        sass = _cuobjdump(cubin, "-sass")
    except (OSError, subprocess.CalledProcessError):
        sass = ""
    r.loops = [lp for lp in sass_loops(sass) if lp["wgmma"]]
    first = re.search(r"HGMMA\.\S+\s+\S+,\s*(\S+?),", sass)
    if first:  # the SASS says it plainly: `gdesc[...]` (shared memory) or a register
        r.wgmma_a_shared = first.group(1).startswith("gdesc")
    return r


def default_report_config(kernel, d: int, e: int) -> dict:
    """The launcher's GPU default config for a spec at head dims d, e (for a general plan:
    the config of its first pass)."""
    plan = kernel.generated.plan
    if not hasattr(plan, "terms"):
        from .stream_runtime import stream_config

        first = plan.passes[0]
        return stream_config(False, max(d, e), sum(a.value is not None for a in first.all_accumulators()))
    return default_config(False, d, e, len(plan.terms))
