"""Context parallelism (`attncc.distributed`, issue 13) on gloo: 2, 3 and 4 CPU ranks spawned
with torch.multiprocessing, odd sequence lengths, contiguous and zigzag layouts. Each rank's
output, log-sum-exp and input gradients must equal its slice of one device's (the same kernel
called on the whole tensors). One spawn of 4 ranks runs every case (the 2- and 3-rank ones on
process subgroups; the 2-rank group is global ranks 2 and 3, so group and global ranks
differ); the tests read the per-rank results it wrote."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attncc
from attncc import distributed as D
from attncc.passes.shard import NotShardable, Side, shard_form

TOKEN_DIM = {"q": 2, "k": 2, "v": 2, "doc": 1}
PARAMS = {"sliding_window": {"window": 5}, "linear_elu:causal": {"causal": True}}

# (name, world, layout, N, M, backend); lengths odd or not a multiple of the pieces
CASES = [
    ("causal", 2, "contiguous", 13, 13, "reference"),
    ("document", 2, "zigzag", 15, 15, "reference"),
    ("alibi", 2, "contiguous", 11, 11, "reference"),
    ("relative_bias", 2, "zigzag", 13, 13, "reference"),
    ("causal", 2, "zigzag", 9, 9, "triton"),  # the generated kernel, in Triton's interpreter
    ("gqa_causal", 3, "zigzag", 14, 14, "reference"),
    ("sliding_window", 3, "contiguous", 13, 13, "reference"),
    ("prefix_lm", 3, "zigzag", 13, 13, "reference"),
    ("alibi", 3, "contiguous", 7, 17, "reference"),  # N != M: bottom-right aligned, KV-cache style
    ("causal", 4, "zigzag", 17, 17, "reference"),
    ("causal", 4, "zigzag", 6, 6, "reference"),  # 8 chunks of 6 tokens: some pieces are empty
    ("sliding_window", 4, "zigzag", 19, 19, "reference"),
    ("document", 4, "zigzag", 17, 17, "reference"),
    ("sigmoid", 2, "contiguous", 9, 11, "reference"),  # no softmax, not linear: partial outputs add up
    # linear attention: the carried state passes across ranks (a prefix scan over the pieces when causal)
    ("lightning", 2, "contiguous", 13, 13, "reference"),
    ("lightning", 3, "contiguous", 11, 11, "reference"),
    ("linear_elu:causal", 2, "contiguous", 9, 9, "reference"),
    ("linear_elu:causal", 3, "contiguous", 13, 13, "reference"),
    ("linear_elu", 3, "contiguous", 7, 7, "reference"),
    # zigzag: chunk r's prefix is the first chunks before it, chunk 2W-1-r's every first chunk and later second ones
    ("lightning", 2, "zigzag", 11, 11, "reference"),
    ("lightning", 3, "zigzag", 13, 13, "reference"),
    ("lightning", 4, "zigzag", 6, 6, "reference"),  # 8 chunks of 6 tokens: empty pieces carry zero states
    ("linear_elu:causal", 2, "zigzag", 9, 9, "reference"),
    ("linear_elu:causal", 3, "zigzag", 17, 17, "reference"),
    ("linear_elu", 2, "zigzag", 7, 7, "reference"),
    # the pieces' causal scans on the generated chunked kernel (interpreter), started from the carried state
    ("lightning", 2, "zigzag", 21, 21, "triton"),
    ("linear_elu:causal", 3, "contiguous", 13, 13, "triton"),
    ("scaled_linear", 2, "zigzag", 19, 19, "triton"),  # a scale the dims compute: the whole sequence's
]
SPECS = {"scaled_linear": """attention scaled_linear(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> o[B,H,N,E] {
  param scale: float = M ** -0.5
  a[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * scale
  mask j <= i
  o[b,h,i,e] = a[b,h,i,j] * v[b,h,j,e]
}"""}  # cases that are not gallery examples
LINEAR = {"lightning", "linear_elu", "scaled_linear"}  # linear attention: the carried state passes across ranks
NO_LSE = LINEAR | {"sigmoid"}  # no softmax: no log-sum-exp
STATE = {"reference": "state passing (torch)", "triton": "state passing (triton)"}  # a linear-attention run's backend


def _inputs(name: str, n: int, m: int, dtype, tiny: bool):
    g = torch.Generator().manual_seed(n)
    b, h, d, e = (1, 1, 4, 3) if tiny else (2, 2, 8, 6)
    g_heads = 1 if name == "gqa_causal" else h
    a = {"q": torch.randn(b, h, n, d, generator=g, dtype=dtype),
         "k": torch.randn(b, g_heads, m, d, generator=g, dtype=dtype),
         "v": torch.randn(b, g_heads, m, e, generator=g, dtype=dtype)}
    if name == "document":  # documents of 1 to 6 tokens: some pairs are empty by data only
        lengths = torch.randint(1, 7, (b, n), generator=g)
        a["doc"] = torch.stack([torch.repeat_interleave(torch.arange(n), row)[:n] for row in lengths])
    if name == "alibi":
        a["slopes"] = torch.rand(h, generator=g, dtype=dtype)
    if name == "relative_bias":
        a["table"] = torch.randn(h, 7, generator=g, dtype=dtype)
    if name == "lightning":
        a["lam"] = 0.5 + 0.4 * torch.rand(h, generator=g, dtype=dtype)
    if name == "prefix_lm":
        a["prefix"] = torch.tensor([3, n - 4][:b])
    return a


def _run_case(case, world, rank, layout, n, m, backend, group=None):
    """One case on one rank: the errors against one device, and the call's statistics.
    `case`: a gallery name, or `name:variant` for one with other params (`PARAMS`)."""
    name = case.partition(":")[0]
    dtype = torch.float32 if backend == "triton" else torch.float64
    kernel = attncc.compile(SPECS.get(name, name), backend=backend)
    a = _inputs(name, n, m, dtype, tiny=backend == "triton")
    for t in a.values():
        if t.is_floating_point():
            t.requires_grad_()
    params, softmax = PARAMS.get(case, {}), name not in NO_LSE
    o, lse = kernel(**a, **params, return_lse=True) if softmax else (kernel(**a, **params), torch.zeros(1, 1, 1))
    g = torch.Generator().manual_seed(7)
    go, gl = torch.randn(o.shape, generator=g, dtype=dtype), torch.randn(lse.shape, generator=g, dtype=dtype)
    floats = [k for k, t in a.items() if t.requires_grad]
    whole = torch.autograd.grad((o * go).sum() + (lse * gl).sum() * softmax, [a[k] for k in floats])

    def local(key, t):
        return D.shard(t, TOKEN_DIM[key], world, rank, layout) if key in TOKEN_DIM else t

    mine = {k: local(k, t.detach()).requires_grad_(t.requires_grad) for k, t in a.items()}
    cp = D.context_parallel(kernel, group=group, layout=layout)
    if cp.state is not None:  # linear attention: pieces of several chunks in the PyTorch scan
        cp.state.chunk = 4
    if not softmax:
        o_r = cp(**mine, **params)
        grads = torch.autograd.grad((o_r * local("q", go)).sum(), [mine[k] for k in floats])
        errors = {"o": (o_r - local("q", o.detach())).abs().max().item()}
    else:
        o_r, lse_r = cp(**mine, **params, return_lse=True)
        grads = torch.autograd.grad((o_r * local("q", go)).sum() + (lse_r * D.shard(gl, 2, world, rank, layout)).sum(),
                                    [mine[k] for k in floats])
        errors = {"o": (o_r - local("q", o.detach())).abs().max().item(),
                  "lse": (lse_r - D.shard(lse.detach(), 2, world, rank, layout)).abs().max().item()}
    for k, got, want in zip(floats, grads, whole):  # relative to the largest entry (sums of many terms)
        errors["d" + k] = ((got - local(k, want)).abs().max() / want.abs().max().clamp(min=1)).item()
    return {"errors": errors, "run": cp.last_run, "backward": cp.last_backward}


MEMBERS = {4: [0, 1, 2, 3], 3: [0, 1, 2], 2: [2, 3]}  # the 2-rank group: group ranks differ from global ones


def _worker(rank, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=4)
    groups = {4: None, 3: dist.new_group(MEMBERS[3]), 2: dist.new_group(MEMBERS[2])}
    results = {}
    for case in sorted(CASES, key=lambda c: -c[1]):
        if rank in MEMBERS[case[1]]:
            local_rank = MEMBERS[case[1]].index(rank)
            results["-".join(map(str, case))] = _run_case(*case[:2], local_rank, *case[2:], group=groups[case[1]])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """world -> the results of the group's ranks, in group-rank order, for every case of that size."""
    out = tmp_path_factory.mktemp("cp")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=4)
    results = [json.load(open(out / f"rank{r}.json")) for r in range(4)]
    return lambda world: [results[r] for r in MEMBERS[world]]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_equals_one_device(ranks, case):
    tol = 2e-5 if case[5] == "triton" else 1e-10
    for rank, results in enumerate(ranks(case[1])):
        found = results["-".join(map(str, case))]
        bad = {k: v for k, v in found["errors"].items() if not v <= tol}
        assert not bad, f"rank {rank}: {bad}"
        assert found["run"]["backend"] == (STATE[case[5]] if case[0].partition(":")[0] in LINEAR else case[5])


def test_causal_skips_pairs_and_sends_nothing_unneeded(ranks):
    """Causal: the mask analysis proves the pairs above the diagonal empty. Contiguous on 2
    ranks, rank 0 needs only its own keys (it receives nothing) and rank 1's keys go nowhere."""
    results = ranks(4)
    case = "causal-4-zigzag-17-17-reference"
    total = sum(r[case]["run"]["pairs_computed"] for r in results)
    skipped = sum(r[case]["run"]["skipped_by"]["symbolic"] for r in results)
    assert total + skipped == 4 * 2 * 8 and skipped >= 4 * 2 * 8 // 2 - 8  # two pieces a rank
    case = "causal-2-contiguous-13-13-reference"
    run0, run1 = (r[case]["run"] for r in ranks(2))
    assert run0["pairs_computed"] == 1 and run0["sources"] == [0] and run0["bytes_received"] == 0
    assert run1["pairs_computed"] == 2 and run1["bytes_sent"] == 0 and run1["bytes_received"] > 0
    assert run0["bytes_sent"] == run1["bytes_received"]
    empty = [r["causal-4-zigzag-6-6-reference"]["run"]["skipped_by"]["empty"] for r in results]
    assert sum(empty) > 0  # zero-length pieces (6 tokens in 8 chunks)


def test_documents_skip_pairs_by_data(ranks):
    """Pairs the causal bound keeps but whose document ids never match are skipped by data."""
    runs = [r["document-4-zigzag-17-17-reference"]["run"] for r in ranks(4)]
    assert sum(r["skipped_by"]["data"] for r in runs) > 0


def test_pieces_and_unshard_round_trip():
    x = torch.arange(2 * 19).reshape(2, 19)
    for layout in D.Layout:
        for world in (2, 3, 4):
            parts = [D.shard(x, 1, world, r, layout) for r in range(world)]
            assert sum(p.shape[1] for p in parts) == 19
            assert torch.equal(D.unshard(parts, 1, layout), x)
    assert D.pieces(10, 2, 0, "zigzag") == [(0, 3), (8, 2)]
    assert D.pieces(10, 2, 1, "zigzag") == [(3, 3), (6, 2)]


def test_shard_form_keeps_local_token_reads():
    form = shard_form(attncc.load("document"))
    sides = {n: (s.original, s.side) for n, s in form.inputs.items()}
    assert sides["doc"] == ("doc", Side.QUERY) and sides["doc_kv"] == ("doc", Side.KEY)
    assert sides["k"] == ("k", Side.KEY) and form.global_dims == {"N": Side.QUERY, "M": Side.KEY}


@pytest.mark.parametrize("name, why", [("linear_elu", "linear attention"), ("learned_sinks", "sink"),
                                       ("query_softmax", "log-sum-exp"), ("bias_tensor", "two token dims"),
                                       ("topk_blocks", "whole sequence"), ("column_mass", "one output")])
def test_unshardable_programs_say_why(name, why):
    with pytest.raises(NotShardable, match=why):
        shard_form(attncc.load(name))


SHARDABLE = ["alibi", "causal", "dense", "document", "gqa_causal", "key_padding", "label_causal", "label_table",
             "lightning", "neighborhood_2d", "prefix_lm", "relative_bias", "sigmoid", "sink_window",
             "sliding_window", "softcap"]


@pytest.mark.parametrize("name", SHARDABLE)
def test_shard_form_over_cuts_equals_one_device(name):
    """Without processes: the shard form of a gallery example on every (query cut, key cut)
    pair of uneven cuts, merged, equals the kernel on the whole inputs (float64 reference)."""
    from attncc.api import Kernel
    from attncc.random_inputs import random_arguments
    from attncc.passes.shard import Merge

    program = attncc.load(name)
    form = shard_form(program)
    shape = {d: v for d, v in dict(N=12, M=12, B=2, H=2, D=4, E=3).items() if d in program.dims}
    params = {p: v for p, v in dict(window=5, sinks=2, height=3, width=4).items() if p in program.params}
    a = random_arguments(program, shape, params, dtype=torch.float64, seed=1)
    softmax = form.merge == Merge.LSE
    want = attncc.compile(name, backend="reference")(**a, return_lse=softmax)
    pieces = Kernel(form.program, "reference")
    cuts = {Side.QUERY: (0, 5, 7, 12), Side.KEY: (0, 3, 8, 12)}
    out_axes = form.program.outputs[0].axes
    rows = []
    for q0, q1 in zip(cuts[Side.QUERY], cuts[Side.QUERY][1:]):
        parts = []
        for k0, k1 in zip(cuts[Side.KEY], cuts[Side.KEY][1:]):
            at = {Side.QUERY: (q0, q1 - q0), Side.KEY: (k0, k1 - k0)}
            kw = {n: v for n, v in a.items() if n in program.params}
            for n, s in form.inputs.items():
                t = a[s.original]
                kw[n] = t if s.side == Side.REPLICATED else t.narrow(s.token_dim, *at[s.side])
            kw.update({g: 12 for g in form.global_dims}, **{form.q_offset: q0, form.k_offset: k0})
            found = pieces(**kw, return_lse=softmax)
            parts.append(found if softmax else (found, None))
        rows.append(D._merge(parts, out_axes, form.lse_axes) if softmax else (sum(o for o, _ in parts), None))
    o = torch.cat([r[0] for r in rows], out_axes.index(form.query_axis))
    torch.testing.assert_close(o, want[0] if softmax else want, rtol=0, atol=1e-12)
    if softmax:
        lse = torch.cat([r[1] for r in rows], form.lse_axes.index(form.query_axis))
        torch.testing.assert_close(lse, want[1], rtol=0, atol=1e-12)


def test_linear_state_passing_sends_states_not_keys(ranks):
    """Contiguous linear attention sends each rank's D x E state (and the key sum with a
    normaliser) to the other ranks, whatever the length: B H D E itemsize (W - 1) bytes."""
    b, h, d, e, world = 2, 2, 8, 6, 3
    for case, width in (("lightning-3-contiguous-11-11-reference", e), ("linear_elu:causal-3-contiguous-13-13-reference",
                                                                       e + 1)):
        runs = [r[case]["run"] for r in ranks(world)]
        assert all(r["bytes_sent"] == b * h * d * width * 8 * (world - 1) for r in runs)
        assert all(r["causal"] for r in runs)
        assert runs[0]["bytes_kv_rotation"] > runs[0]["bytes_sent"] and runs[-1]["bytes_kv_rotation"] == 0


@pytest.mark.parametrize("name, layout, why", [("linear_kernel", "contiguous", "contraction of weights with values"),
                                               ("linear_kernel", "zigzag", "nor can it rotate key/value shards")])
def test_linear_state_passing_refusals_say_why(name, layout, why):
    with pytest.raises(NotShardable, match=why):
        D.context_parallel(attncc.compile(name, backend="reference"), layout=layout)


def test_zigzag_state_passing_sends_two_states(ranks):
    """Zigzag linear attention sends both pieces' states (two D x E a rank); what K/V rotation
    would send instead: rank r's first chunk to every other rank, its second to the ranks before."""
    b, h, d, e, world = 2, 2, 8, 6, 3
    runs = [r["linear_elu:causal-3-zigzag-17-17-reference"]["run"] for r in ranks(world)]
    assert all(r["bytes_sent"] == 2 * b * h * d * (e + 1) * 8 * (world - 1) for r in runs)
    assert all(r["state_shape"][0] == 2 and r["causal"] for r in runs)
    per_token = b * h * (d + e) * 8
    first, second = zip(*([n for _, n in D.pieces(17, world, r, "zigzag")] for r in range(world)))
    assert [r["bytes_kv_rotation"] for r in runs] == [(first[r] * (world - 1) + second[r] * r) * per_token
                                                      for r in range(world)]
