"""Registers and spills of every generated kernel at its default GPU tile config, without a GPU.

Compiles each gallery example for sm_90 (Triton + ptxas from the Triton wheel) with bf16
inputs and reports the registers per thread and the spill stack ptxas needed. Spills cost
local-memory traffic in the inner loop; the default configs (attncc.runtime.default_config)
were chosen so that the main kernels do not spill with Triton 3.6. Run without
TRITON_INTERPRET:

    .venv/bin/python benchmarks/static_resources.py [--d 128] [examples ...]
"""
import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: compiling for a GPU needs Triton outside interpreter mode")

import attncc  # noqa: E402
from attncc.aot import compile_kernels, resources  # noqa: E402
from attncc.runtime import default_config  # noqa: E402

EXAMPLES = sorted(p.stem for p in (Path(__file__).parent.parent / "examples").glob("*.attn"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("examples", nargs="*", default=EXAMPLES)
    parser.add_argument("--d", type=int, default=128, help="head dim D = E (default 128)")
    args = parser.parse_args()
    import triton

    table = Table(title=f"sm_90, bf16, D = E = {args.d}, Triton {triton.__version__}")
    for col in ("example", "kernel", "tiles", "warps", "stages", "registers", "spill bytes", "shared KiB"):
        table.add_column(col, justify="left" if col in ("example", "kernel") else "right")
    for name in args.examples:
        kernel = attncc.compile(f"examples/{name}.attn", backend="triton")
        config = default_config(False, args.d, args.d, len(kernel.generated.plan.terms))
        for kname, compiled in compile_kernels(kernel, args.d, args.d, config).items():
            r = resources(kname, compiled)
            table.add_row(name, kname, f"{config['BLOCK_M']}x{config['BLOCK_N']}", str(config["num_warps"]),
                          str(config["num_stages"]), str(r.registers), str(r.spill_bytes),
                          f"{r.shared_bytes / 1024:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
