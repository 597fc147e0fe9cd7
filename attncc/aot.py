"""Ahead-of-time compilation of generated kernels for a GPU this machine does not have.

Triton's wheel carries ptxas, so a kernel can be compiled down to a cubin for, say, an H100
(sm_90) on a CPU-only machine. That checks what the permissive interpreter cannot (types of
loop-carried values, scalar/tensor mixes, dot shapes), and `cuobjdump` then reports the
registers and spill stack a tile configuration needs: a static view of register pressure
before any GPU time is spent. Compilation needs a process that did not import triton in
interpreter mode (`TRITON_INTERPRET` unset).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

from . import ir
from .codegen import names
from .runtime import load_module, pow2

POINTERS = {ir.FLOAT: "*bf16", ir.INT: "*i64", ir.BOOL: "*i1"}
SCALARS = {ir.FLOAT: "fp32", ir.INT: "i32", ir.BOOL: "i32"}
FIXED_POINTERS = {"o_ptr": "*bf16", "lse_ptr": "*fp32", "count_ptr": "*i32", "kv_list_ptr": "*i32",
                  "kv_full_ptr": "*i32", "kv_count_ptr": "*i32", "map_ptr": "*i8", "state_ptr": "*fp32",
                  "z_ptr": "*fp32"}


@dataclass
class Resources:
    kernel: str
    registers: int
    spill_bytes: int
    shared_bytes: int


def _argument_types(kernel) -> tuple[dict, dict]:
    """Input dtypes (real and precomputed) and scalar dtypes of a compiled attncc kernel."""
    plan, src = kernel.generated.plan, kernel.generated.source
    inputs = {**kernel.program.inputs,
              **{i.name: i for i in (plan.precomputed.inputs.values() if plan.precomputed else ())}}
    hosts = {**src.host_scalars, **(src.packed.host_scalars if src.packed else {}),
             **(src.block_map.host_scalars if src.block_map else {})}
    for _, stats in src.statistics.values():
        hosts.update(stats.host_scalars)
    for linear in (src.reassociated, src.chunked):
        if linear is not None:
            hosts.update(linear.host_scalars)
    scalars = {name: node.dtype for name, node in hosts.items()}
    scalars.update({n: s.dtype for n, s in kernel.program.params.items()})
    return inputs, scalars


def signature(fn, kernel, constexprs: dict) -> dict:
    """Triton types of a generated kernel's arguments, as the launcher passes them (bf16 data)."""
    inputs, scalars = _argument_types(kernel)
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in FIXED_POINTERS:
            sig[name] = FIXED_POINTERS[name]
        elif (names.split(name) or ("",))[0] == "ptr":  # an input's pointer, ptr_<input>
            sig[name] = POINTERS[inputs[names.split(name)[1]].dtype]
        elif name.endswith("_ptr"):  # a precomputed input's (pre0_ptr for <pre0>)
            sig[name] = POINTERS[inputs[f"<{name[:-4]}>"].dtype]
        elif name.startswith("qk_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = SCALARS.get(scalars.get(name), "i32")
    return sig


def compile_kernels(kernel, d: int, e: int, config: dict, arch: int = 90) -> dict:
    """Every kernel of a compiled spec's module (main, GQA-packed variant, statistics passes,
    block-map classifier) compiled for `sm_<arch>` with bf16 inputs and the given tile config."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src, plan = kernel.generated.source, kernel.generated.plan
    module = load_module(src, interpret=False)
    main = {"BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"], "BLOCK_D": pow2(d), "BLOCK_E": pow2(e),
            "STORE_LSE": True, "COUNT_TILES": False, "SPLIT": False, "PRECISION": "ieee", "UPCAST_DOT": False,
            "EVEN_D": pow2(d) == d, "EVEN_E": pow2(e) == e, "FULL_MASKED": bool(config.get("FULL_MASKED", False))}
    targets = {f"{src.name}_fwd": main}
    if src.packed is not None:
        targets[f"{src.packed.name}_fwd"] = main
    for _, stats in src.statistics.values():
        targets[f"{stats.name}_fwd"] = main
    if src.chunked is not None:
        targets[src.chunked.name] = {"BLOCK_C": 64, "BLOCK_D": main["BLOCK_D"], "BLOCK_E": main["BLOCK_E"],
                                     "ROW_SUM": plan.row_sum}
    if src.reassociated is not None:
        linear = {k: main[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_E")} | {"ROW_SUM": plan.row_sum}
        targets[f"{src.reassociated.name}_state"] = linear
        targets[f"{src.reassociated.name}_apply"] = linear
    if src.block_map is not None:
        targets[f"{src.name}_classify"] = {"BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"]}
    options = {k: config[k] for k in ("num_warps", "num_stages") if k in config}
    out = {}
    for name, constexprs in targets.items():
        fn = getattr(module, name)
        consts = {(fn.arg_names.index(c),): v for c, v in constexprs.items() if c in fn.arg_names}
        source = ASTSource(fn=fn, signature=signature(fn, kernel, constexprs), constexprs=consts)
        out[name] = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return out


def resources(name: str, compiled) -> Resources:
    """Registers and spill stack of a compiled kernel, read from its cubin with cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        report = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                check=True).stdout
    regs = re.search(r"REG:(\d+)", report)
    stack = re.search(r"STACK:(\d+)", report)
    return Resources(name, int(regs.group(1)) if regs else -1, int(stack.group(1)) if stack else -1,
                     int(compiled.metadata.shared))
