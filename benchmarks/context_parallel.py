"""Context parallelism (`attncc.distributed`): communication and work per rank.

Spawns W gloo ranks on the CPU, for each W asked (1 to 4 by default; reference executor:
this measures *what* is sent and computed, not speed), and runs each example once through
`context_parallel`, forward and backward, in both layouts. Per rank it records:

- softmax attention (K/V rotation): the bytes sent and received and the shard pairs computed,
  against a dense ring (every rank receives every other rank's key/value shard and computes
  every pair), and the (64 x 64) score tiles inside the computed pairs that the mask leaves
  non-empty, against the tiles of a dense ring and of one device (the non-empty tiles of the
  whole N x M score);
- linear attention (`lightning`, causal `linear_elu`: state passing): the bytes of the states
  sent, against what K/V rotation would send (its key/value pieces to the ranks whose queries
  they reach) and a dense ring; the 64-token chunks its pieces' causal scans visit, against
  one device's chunked scan (N / 64 chunks) and the tiles a dense ring would visit.

    PYTHONPATH=. python benchmarks/context_parallel.py [--worlds 1 2 3 4] [--n 1024]
        [--out benchmarks/results/context_parallel_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from rich.table import Table

import attncc
from attncc import distributed as D
from attncc.reference import Reference, align

TILE = 64
EXAMPLES = ("causal", "sliding_window", "document", "prefix_lm", "relative_bias", "lightning", "linear_elu")
LINEAR = ("lightning", "linear_elu")  # state passing
PARAMS = {"sliding_window": {"window": 256}, "linear_elu": {"causal": True}}
TOKEN_DIM = {"q": 2, "k": 2, "v": 2, "doc": 1}


def inputs(name: str, n: int) -> dict:
    g = torch.Generator().manual_seed(0)
    b, h, d = 1, 2, 16
    a = {x: torch.randn(b, h, n, d, generator=g) for x in ("q", "k", "v")}
    if name == "document":  # 8 documents of random lengths
        cuts = torch.sort(torch.randperm(n - 1, generator=g)[:7] + 1).values
        a["doc"] = torch.bucketize(torch.arange(n), cuts, right=True)[None]
    if name == "prefix_lm":
        a["prefix"] = torch.tensor([n // 8])
    if name == "relative_bias":
        a["table"] = torch.randn(h, 65, generator=g)
    if name == "lightning":
        a["lam"] = torch.tensor([0.9, 0.99])
    return a


def allowed(kernel, a: dict) -> torch.Tensor:
    """The whole N x M mask (true where some batch and head keeps the entry)."""
    program = kernel.program
    from attncc.binding import bind

    call = bind(program, {**a, **PARAMS.get(kernel.name, {})})
    n, m = a["q"].shape[2], a["k"].shape[2]
    if not program.masks:
        return torch.ones(n, m, dtype=torch.bool)
    ref = Reference(program, call.tensors, call.scalars)
    q_axis, k_axis = "i", "j"
    space = tuple(dict.fromkeys(ix for mk in program.masks for ix in mk.pred.indices))
    keep = None
    for mk in program.masks:
        value = align(ref.full(mk.pred).to(torch.bool), mk.pred.indices, space)
        keep = value if keep is None else keep & value
    dims = [k for k, ix in enumerate(space) if ix not in (q_axis, k_axis)]
    keep = keep.any(dim=dims) if dims else keep
    order = [ix for ix in space if ix in (q_axis, k_axis)]
    keep = keep if order == [q_axis, k_axis] else keep.T
    return keep.expand(n, m)


def tiles(mask: torch.Tensor) -> int:
    """Non-empty TILE x TILE tiles of a (rows, keys) boolean block."""
    r, c = mask.shape
    if r == 0 or c == 0:
        return 0
    padded = torch.zeros(math.ceil(r / TILE) * TILE, math.ceil(c / TILE) * TILE, dtype=torch.bool)
    padded[:r, :c] = mask
    return int(padded.reshape(padded.shape[0] // TILE, TILE, -1, TILE).any(dim=(1, 3)).sum())


def worker(rank, world, n, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    for name in EXAMPLES:
        kernel = attncc.compile(name, backend="reference")
        a = inputs(name, n)
        mask = allowed(kernel, a)
        for layout in D.Layout:
            cp = D.context_parallel(kernel, layout=layout)
            mine = {k: D.shard(t, TOKEN_DIM[k], world, rank, layout) if k in TOKEN_DIM else t for k, t in a.items()}
            mine["q"].requires_grad_()
            o = cp(**mine, **PARAMS.get(name, {}))
            o.sum().backward()
            run = cp.last_run["pairs"]  # (query start, length, key start, length) of each computed block
            q_pieces = D.pieces(n, world, rank, layout)
            if name in LINEAR:  # the scan visits each piece's diagonal chunks
                visited = sum(math.ceil(qn / TILE) for _, qn, _, _ in run)
                single = math.ceil(n / TILE)
            else:
                visited = sum(tiles(mask[qs:qs + qn, ks:ks + kn]) for qs, qn, ks, kn in run)
                single = tiles(mask)
            dense_tiles = sum(tiles(torch.ones(qn, kn, dtype=torch.bool)) for qs, qn in q_pieces
                              for r in range(world) for _, kn in D.pieces(n, world, r, layout))
            kv = sum(mine[x].numel() * mine[x].element_size() for x in ("k", "v"))
            results[f"{name}/{layout.value}"] = {
                "forward": cp.last_run, "backward": cp.last_backward, "tiles_visited": visited,
                "tiles_dense_ring": dense_tiles, "kv_bytes": kv, "single_device_tiles": single}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def rows_of(ranks: list[dict], key: str, world: int) -> list[dict]:
    """Per rank, the measured numbers of one example and layout."""
    rows = []
    for r, res in enumerate(rank[key] for rank in ranks):
        fwd, bwd = res["forward"], res["backward"]
        row = {"rank": r, "bytes_sent_forward": fwd["bytes_sent"], "bytes_received_forward": fwd["bytes_received"],
               "bytes_sent_dense_ring": (world - 1) * res["kv_bytes"], "tiles_visited": res["tiles_visited"],
               "tiles_dense_ring": res["tiles_dense_ring"], "backend": fwd["backend"]}
        if "bytes_kv_rotation" in fwd:  # state passing
            row.update(bytes_kv_rotation=fwd["bytes_kv_rotation"], state_shape=fwd["state_shape"])
        else:
            row.update(pairs_computed=fwd["pairs_computed"], pairs_total=fwd["pairs_total"],
                       skipped_by=fwd["skipped_by"], bytes_gathered_for_masks=fwd["bytes_gathered_for_masks"],
                       bytes_sent_backward=bwd["bytes_sent"])
        rows.append(row)
    return rows


def table_of(world: int, n: int, examples: dict) -> Table:
    """One row per example and layout, the per-rank numbers joined by slashes."""
    table = Table(title=f"N = M = {n}, {world} rank{'s' * (world > 1)} (per rank, joined by /)")
    for col in ("example", "strategy", "KiB sent fwd", "K/V rotation KiB", "dense ring KiB", "tiles (chunks) visited",
                "dense ring tiles", "one device"):
        table.add_column(col, justify="right")

    def per(rows, key, scale=1.0):
        return " / ".join(f"{x[key] * scale:.0f}" if key in x else "-" for x in rows)

    kib = 1 / 2 ** 10
    for key, found in examples.items():
        rows = found["ranks"]
        state = "bytes_kv_rotation" in rows[0]
        table.add_row(key, "state" if state else "K/V", per(rows, "bytes_sent_forward", kib),
                      per(rows, "bytes_kv_rotation" if state else "bytes_sent_forward", kib),
                      per(rows, "bytes_sent_dense_ring", kib), per(rows, "tiles_visited"),
                      per(rows, "tiles_dense_ring"), str(found["single_device_tiles"]))
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--out", default="benchmarks/results/context_parallel_cpu.json")
    args = parser.parse_args()
    console = Console(width=160)
    report = {"device": "cpu (gloo, reference executor): volumes and counts, not timings",
              "n": args.n, "tile": TILE, "worlds": {}}
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(worker, args=(world, args.n, os.path.join(tmp, "store"), tmp), nprocs=world)
            ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(world)]
        examples = {key: {"ranks": rows_of(ranks, key, world),
                          "single_device_tiles": ranks[0][key]["single_device_tiles"]} for key in ranks[0]}
        console.print(table_of(world, args.n, examples))
        report["worlds"][str(world)] = examples
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
