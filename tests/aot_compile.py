"""Compile every gallery example's generated kernels for a Hopper GPU (sm_90), without one
(`--trials`: the general streaming plans of some trial variants and gallery examples instead).

Run by tests/test_gpu_compile.py in a fresh process: Triton compiles only when it was not
imported in interpreter mode, which the rest of the suite uses. Prints `ok NAME` per example
and exits non-zero on the first failure. The row-streaming kernels of bf16 inputs with
contiguous features take the TMA path on sm_90 (`USE_TMA`): the examples in `TMA` must show
TMA loads (cp.async.bulk.tensor) and no cp.async in their PTX; those in `POINTERS` are also
compiled with the pointer path (pre-Hopper GPUs, layouts descriptors cannot take).
"""
import sys
from pathlib import Path

import attncc
from attncc.aot import compile_kernels

sys.path.insert(0, str(Path(__file__).parent))
from oracles.inputs import EXAMPLES  # noqa: E402

CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
# trial variants whose general streaming plans cover each kind of pass: a column pass, a top-k
# threshold pass, blocked reductions, a chain of four passes, three value sums, a hoisted
# gather, a grid over two batches, feature maps, inner sums over heads
TRIALS = ("column_importance", "kca_topk", "landmark", "sinkhorn", "var_redistribute", "content_relative",
          "filip", "cosformer", "talking_heads")
# gallery examples whose kernels are general plans (one pass per key set of a joint softmax)
GENERAL = ("window_summary", "epipolar_views")
TMA = ("causal", "dense", "gqa_causal", "differential", "document")
POINTERS = ("causal", "gqa_causal")

def compile_trials():
    """The general plans' pass kernels at their default configs, down to a cubin."""
    for trial in (*TRIALS, *GENERAL):
        path = f"examples/{trial}.attn" if trial in GENERAL else f"tests/trials/{trial}.attn"
        kernel = attncc.compile(path, backend="triton")
        compiled = compile_kernels(kernel, 64, 64)
        if not compiled or not all("cubin" in c.asm for c in compiled.values()):
            raise SystemExit(f"{trial}: no cubin")
        print("ok", trial, flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--trials"]:
        compile_trials()
        raise SystemExit(0)
    for example in sys.argv[1:] or EXAMPLES:
        kernel = attncc.compile(f"examples/{example}.attn", backend="triton")
        compiled = compile_kernels(kernel, 64, 64, CONFIG)
        if not all("cubin" in c.asm for c in compiled.values()):
            raise SystemExit(f"{example}: no cubin")
        if example in TMA:
            ptx = {name: c.asm["ptx"] for name, c in compiled.items() if name.endswith("_fwd")}
            if not ptx or any("cp.async.bulk.tensor" not in p or "cp.async.ca" in p or "cp.async.cg" in p
                              for p in ptx.values()):
                raise SystemExit(f"{example}: a row-streaming kernel without the TMA path")
        if example in POINTERS:
            compiled = compile_kernels(kernel, 64, 64, {**CONFIG, "USE_TMA": False})
            if any("cp.async.bulk.tensor" in c.asm["ptx"] for name, c in compiled.items() if name.endswith("_fwd")):
                raise SystemExit(f"{example}: USE_TMA=False still loads through TMA")
        print("ok", example, flush=True)
