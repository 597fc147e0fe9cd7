"""Context parallelism (`attncc.distributed`): communication and work per rank.

Spawns W gloo ranks on the CPU (reference executor: this measures *what* is sent and computed,
not speed) and runs each example once through `context_parallel`, forward and backward. Per
rank it records the bytes sent and received and the shard pairs computed, against a dense ring
(every rank receives every other rank's key/value shard and computes every pair), and the
(64 x 64) score tiles inside the computed pairs that the mask leaves non-empty, against the
tiles of a dense ring and of one device (the non-empty tiles of the whole N x M score).

    PYTHONPATH=. python benchmarks/context_parallel.py [--world 4] [--n 1024]
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
EXAMPLES = ("causal", "sliding_window", "document", "prefix_lm", "relative_bias")
PARAMS = {"sliding_window": {"window": 256}}
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
            run = cp.last_run["pairs"]  # (query start, length, key start, length) of each computed pair
            q_pieces = D.pieces(n, world, rank, layout)
            visited = sum(tiles(mask[qs:qs + qn, ks:ks + kn]) for qs, qn, ks, kn in run)
            dense_tiles = sum(tiles(torch.ones(qn, kn, dtype=torch.bool)) for qs, qn in q_pieces
                              for r in range(world) for _, kn in D.pieces(n, world, r, layout))
            kv = sum(mine[x].numel() * mine[x].element_size() for x in ("k", "v"))
            results[f"{name}/{layout.value}"] = {
                "forward": cp.last_run, "backward": cp.last_backward, "tiles_visited": visited,
                "tiles_dense_ring": dense_tiles, "kv_bytes": kv,
                "single_device_tiles": tiles(mask) if rank == 0 else None}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--out", default="benchmarks/results/context_parallel_cpu.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args.world, args.n, os.path.join(tmp, "store"), tmp), nprocs=args.world)
        ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(args.world)]
    console = Console(width=150)
    report = {"device": "cpu (gloo, reference executor): volumes and counts, not timings",
              "world": args.world, "n": args.n, "tile": TILE, "examples": {}}
    for key in ranks[0]:
        table = Table(title=f"{key}: N = M = {args.n}, {args.world} ranks")
        for col in ("rank", "pairs computed / dense", "skipped (symbolic, data)", "KV MiB sent fwd",
                    "dense ring fwd", "received fwd", "sent bwd", "tiles visited", "dense ring tiles"):
            table.add_column(col, justify="right")
        rows = []
        for r, res in enumerate(rank[key] for rank in ranks):
            fwd, bwd = res["forward"], res["backward"]
            dense_bytes = (args.world - 1) * res["kv_bytes"]
            rows.append({"rank": r, "pairs_computed": fwd["pairs_computed"], "pairs_total": fwd["pairs_total"],
                         "skipped_by": fwd["skipped_by"], "bytes_sent_forward": fwd["bytes_sent"],
                         "bytes_received_forward": fwd["bytes_received"],
                         "bytes_gathered_for_masks": fwd["bytes_gathered_for_masks"],
                         "bytes_sent_dense_ring": dense_bytes, "bytes_sent_backward": bwd["bytes_sent"],
                         "tiles_visited": res["tiles_visited"], "tiles_dense_ring": res["tiles_dense_ring"]})
            mib = 1 / 2 ** 20
            table.add_row(str(r), f"{fwd['pairs_computed']} / {fwd['pairs_total']}",
                          f"{fwd['skipped_by']['symbolic']}, {fwd['skipped_by']['data']}",
                          f"{fwd['bytes_sent'] * mib:.3f}", f"{dense_bytes * mib:.3f}",
                          f"{fwd['bytes_received'] * mib:.3f}", f"{bwd['bytes_sent'] * mib:.3f}",
                          str(res["tiles_visited"]), str(res["tiles_dense_ring"]))
        single = ranks[0][key]["single_device_tiles"]
        table.caption = (f"one device: {single} non-empty tiles; all ranks visit "
                         f"{sum(x['tiles_visited'] for x in rows)} (max per rank "
                         f"{max(x['tiles_visited'] for x in rows)})")
        console.print(table)
        report["examples"][key] = {"ranks": rows, "single_device_tiles": single}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
