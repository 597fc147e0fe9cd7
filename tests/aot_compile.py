"""Compile every gallery example's generated kernels for a Hopper GPU (sm_90), without one.

Run by tests/test_gpu_compile.py in a fresh process: Triton compiles only when it was not
imported in interpreter mode, which the rest of the suite uses. Prints `ok NAME` per example
and exits non-zero on the first failure.
"""
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import attncc
from attncc import ir
from attncc.runtime import load_module

sys.path.insert(0, str(Path(__file__).parent))
from oracles.inputs import EXAMPLES  # noqa: E402

POINTERS = {ir.FLOAT: "*bf16", ir.INT: "*i64", ir.BOOL: "*i1"}
SCALARS = {ir.FLOAT: "fp32", ir.INT: "i32", ir.BOOL: "i32"}


def signature(fn, source, constexprs):
    """Triton types of a generated kernel's arguments, as the launcher passes them."""
    inputs = dict(source.inputs)
    hosts = dict(source.hosts)
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("o_ptr",):
            sig[name] = "*bf16"
        elif name in ("lse_ptr",):
            sig[name] = "*fp32"
        elif name in ("count_ptr", "kv_list_ptr", "kv_full_ptr", "kv_count_ptr"):
            sig[name] = "*i32"
        elif name == "map_ptr":
            sig[name] = "*i8"
        elif name.endswith("_ptr"):
            sig[name] = POINTERS[inputs[name[:-4]].dtype]
        elif name.startswith("qk_scale"):
            sig[name] = "fp32"
        elif name in hosts:
            sig[name] = SCALARS[hosts[name]]
        else:
            sig[name] = "i32"
    return sig


class Source:
    """The inputs (real and precomputed) and scalar types a generated module's kernels take."""

    def __init__(self, kernel):
        plan = kernel.generated.plan
        self.inputs = {**kernel.program.inputs,
                       **{i.name: i for i in (plan.precomputed.inputs.values() if plan.precomputed else ())}}
        src = kernel.generated.source
        hosts = {**src.host_scalars, **(src.packed.host_scalars if src.packed else {}),
                 **(src.block_map.host_scalars if src.block_map else {})}
        self.hosts = {name: node.dtype for name, node in hosts.items()}
        self.hosts.update({n: s.dtype for n, s in kernel.program.params.items()})


def compile_for_hopper(fn, source, constexprs):
    sig = signature(fn, source, constexprs)
    consts = {(fn.arg_names.index(c),): v for c, v in constexprs.items() if c in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 128))


MAIN = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_E": 64, "STORE_LSE": True, "COUNT_TILES": False,
        "SPLIT": True, "PRECISION": "ieee", "UPCAST_DOT": False}


def compile_example(name: str):
    """The main kernel, its GQA-packed variant and its block-map classifier, to cubins."""
    kernel = attncc.compile(f"examples/{name}.attn", backend="triton")
    module = load_module(kernel.generated.source, interpret=False)
    source = Source(kernel)
    src = kernel.generated.source
    compiled = [compile_for_hopper(getattr(module, f"{src.name}_fwd"), source, MAIN)]
    if src.packed is not None:
        compiled.append(compile_for_hopper(getattr(module, f"{src.packed.name}_fwd"), source, MAIN))
    if src.block_map is not None:
        compiled.append(compile_for_hopper(getattr(module, f"{src.name}_classify"), source,
                                           {"BLOCK_M": 64, "BLOCK_N": 64}))
    if not all("cubin" in c.asm for c in compiled):
        raise RuntimeError(f"{name}: no cubin")


if __name__ == "__main__":
    for example in sys.argv[1:] or EXAMPLES:
        compile_example(example)
        print("ok", example, flush=True)
