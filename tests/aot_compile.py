"""Compile every gallery example's generated kernels for a Hopper GPU (sm_90), without one.

Run by tests/test_gpu_compile.py in a fresh process: Triton compiles only when it was not
imported in interpreter mode, which the rest of the suite uses. Prints `ok NAME` per example
and exits non-zero on the first failure.
"""
import sys
from pathlib import Path

import attncc
from attncc.aot import compile_kernels

sys.path.insert(0, str(Path(__file__).parent))
from oracles.inputs import EXAMPLES  # noqa: E402

CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}

if __name__ == "__main__":
    for example in sys.argv[1:] or EXAMPLES:
        kernel = attncc.compile(f"examples/{example}.attn", backend="triton")
        compiled = compile_kernels(kernel, 64, 64, CONFIG)
        if not all("cubin" in c.asm for c in compiled.values()):
            raise SystemExit(f"{example}: no cubin")
        print("ok", example, flush=True)
