"""What every generated kernel costs on a Hopper GPU, read from its sm_90 compile, without a GPU.

Each gallery example is called, on meta tensors (bf16, B = 4, H = 16, N = M = 4096, D = E =
64 and 128), through the launcher's own code path (`RowStreamLauncher.launches`); every
kernel that call launches (main kernel, GQA-packed variant, statistics passes, block-map
classifier, linear-attention kernels) goes through Triton's argument binder, as a real
launch does (strides of 1 become constants, 16-divisible arguments get divisibility hints),
and is compiled for sm_90 with Triton's ptxas. Reported per kernel, at the launcher's
default config unless overridden:

- registers per thread and spill stack (cuobjdump --dump-resource-usage), shared memory;
- CTAs per SM: registers (allocated per warp in units of 256) x threads, threads (2048) and
  shared memory (228 KiB per SM, 1 KiB reserved per CTA) against sm_90's limits;
- q from: where the first wgmma (QK^T) reads its A operand: `smem` (a shared-memory
  descriptor) or `regs` (SASS: HGMMA's second operand is a gdesc or registers);
- loads: TMA (cp.async.bulk.tensor) and cp.async instructions in the PTX;
- loop SASS: instructions in each key-tile loop body. A loop is a backward branch in the
  SASS and its body everything from its target to the branch (innermost loops holding an
  HGMMA); `full` is the shortest such body, `masked` the longest (the masked tiles' code
  is a superset of the full tiles'); a kernel left with one such loop shows it as `full`
  when its spec has no mask (whole key tiles: the ragged-tile loop is compiled out) and
  as `masked` otherwise. A static size: pipelining prologues and epilogues outside the
  loop are not counted. TMA and cp.async counts are over the whole kernel's PTX.

With `--backward`, the same for the generated backward of every example that has one
(`Kernel.backward_plan`): its delta, dK/dV and dQ kernels (per term for a sum of terms),
recorded from the backward launcher (`RowStreamBackward.launches`, every score read's
gradient wanted) at its default config (`attncc.row_backward.default_backward_config`, per
kernel; `--block-m` and the like override both dK/dV's and dQ's). Loop columns are the
query-tile loop for dK/dV and the key-tile loop for dQ.

Run without TRITON_INTERPRET (each compile takes seconds of CPU):

    .venv/bin/python benchmarks/static_resources.py [--backward] [--d 64 128] [--json out.json] [examples ...]
"""
import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: compiling for a GPU needs Triton outside interpreter mode")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # a launch's default; silences Triton 3.9's warning

import attncc  # noqa: E402
from attncc.aot import backward_launches, compile_launch, default_report_config, report_launches, resources  # noqa: E402,E501
from attncc.passes.kinds import MaskMode  # noqa: E402

EXAMPLES = sorted(p.stem for p in (Path(__file__).parent.parent / "examples").glob("*.attn"))


def rows_for(name: str, d: int, overrides: dict, backward: bool = False) -> list[dict]:
    """One row per kernel of the example's forward (or, with `backward`, its generated
    backward: none when it has none) at head dims D = E = d."""
    kernel = attncc.compile(Path(__file__).parent.parent / "examples" / f"{name}.attn", backend="triton")
    if backward:
        launches = backward_launches(kernel, d, d, overrides)
    else:
        launches = report_launches(kernel, d, d, {**default_report_config(kernel, d, d), **overrides})
    rows = []
    # a general plan's pass kernels have one loop per stream (key set), not full and masked tiles
    general = not hasattr(kernel.generated.source, "mask_mode")
    mask_free = not general and kernel.generated.source.mask_mode == MaskMode.NONE  # one loop left: the full tiles'
    for launch in launches:
        compiled = compile_launch(launch)
        r = resources(launch.kernel.__name__, compiled, launch.options.get("num_warps"))
        sizes = [lp["instructions"] for lp in r.loops]
        rows.append({"example": name, "kernel": r.kernel, "role": launch.role, "D": d,
                     "BLOCK_M": launch.constexprs.get("BLOCK_M"), "BLOCK_N": launch.constexprs.get("BLOCK_N"),
                     "num_warps": r.num_warps, "num_stages": launch.options.get("num_stages"),
                     "registers": r.registers, "spill_bytes": r.spill_bytes, "shared_bytes": r.shared_bytes,
                     "ctas_per_sm": r.ctas_per_sm, "occupancy_limit": r.limited_by,
                     "q_from": None if r.wgmma_a_shared is None else "smem" if r.wgmma_a_shared else "regs",
                     "tma_loads": r.tma_loads, "cp_async_loads": r.cp_async_loads,
                     "full_loop_sass": min(sizes) if not general and (len(sizes) > 1 or sizes and mask_free) else None,
                     "masked_loop_sass": max(sizes) if not general and (len(sizes) > 1 or sizes and not mask_free)
                     else None,
                     "loops_sass": sizes})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("examples", nargs="*", default=EXAMPLES)
    parser.add_argument("--d", type=int, nargs="+", default=[64, 128], help="head dims D = E (default 64 128)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON ('-': stdout, no table)")
    parser.add_argument("--backward", action="store_true",
                        help="the generated backward's kernels (delta, dK/dV, dQ) instead of the forward's")
    for key in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"):
        parser.add_argument(f"--{key.lower().replace('_', '-')}", dest=key, type=int,
                            help=f"override the default config's {key}")
    args = parser.parse_args()
    overrides = {k: getattr(args, k) for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
                 if getattr(args, k) is not None}
    import triton

    rows = []
    for d in args.d:
        for name in args.examples:
            rows += rows_for(name, d, overrides, args.backward)
    if args.json:
        doc = {"target": "sm_90", "triton": triton.__version__, "dtype": "bfloat16",
               "kernels": "backward" if args.backward else "forward",
               "shape": {"B": 4, "H": 16, "N": 4096, "M": 4096}, "overrides": overrides, "rows": rows}
        if args.json == "-":
            print(json.dumps(doc, indent=1))
            return
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    table = Table(title=f"{'backward, ' if args.backward else ''}sm_90, bf16, B=4 H=16 N=M=4096, "
                        f"Triton {triton.__version__}")
    cols = ("example", "kernel", "D", "tiles", "warps", "stages", "regs", "spill B", "smem KiB", "CTAs/SM",
            "q from", "TMA", "cp.async", "full loop", "masked loop")
    for col in cols:
        table.add_column(col, justify="left" if col in ("example", "kernel", "q from") else "right")
    for r in rows:
        def show(v):
            return "-" if v is None else str(v)
        table.add_row(r["example"], r["kernel"].removeprefix(f"attn_{r['example']}"), str(r["D"]),
                      f"{r['BLOCK_M']}x{r['BLOCK_N']}" if r["BLOCK_N"] else show(r["BLOCK_M"]),
                      show(r["num_warps"]), show(r["num_stages"]), str(r["registers"]), str(r["spill_bytes"]),
                      f"{r['shared_bytes'] / 1024:.0f}", str(r["ctas_per_sm"]), show(r["q_from"]),
                      str(r["tma_loads"]), str(r["cp_async_loads"]), show(r["full_loop_sass"]),
                      show(r["masked_loop_sass"]))
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
