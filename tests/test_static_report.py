"""The static report compiles what a launch compiles.

`attncc.aot` records the launcher's launches of a call on meta tensors and runs them through
Triton's own argument binder. These tests check, without compiling (fast), that the recorded
launch is the launcher's (same arguments and constexprs as `__call__` passes) and that the
specialisation is a real launch's: strides of 1 are constants, arguments divisible by 16 carry
`tt.divisibility`, other integers stay plain i32. Run in a fresh process (Triton must not be in
interpreter mode for `@triton.jit` functions to have a binder).
"""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r'''
import json
import attncc
from attncc.aot import report_launches, specialise, static_call
from attncc.runtime import default_config

out = {}
for name in ("causal", "document", "query_softmax", "gqa_causal"):
    k = attncc.compile(f"examples/{name}.attn", backend="triton")
    cfg = default_config(False, 64, 64)
    launches = report_launches(k, 64, 64, cfg)
    rows = []
    for l in launches:
        sig, consts, attrs, options = specialise(l)
        names = l.kernel.arg_names
        const_names = {names[p[0]]: v for p, v in consts.items()}
        div = sorted(names[p[0]] for p, a in attrs.items() if ["tt.divisibility", 16] in a)
        ints = {n: a for n, a in zip(names, l.args) if isinstance(a, int) and not isinstance(a, bool)}
        rows.append({"kernel": l.kernel.__name__, "role": l.role, "grid": list(l.grid), "options": l.options,
                     "ones": sorted(n for n, a in ints.items() if a == 1),
                     "sixteen": sorted(n for n, a in ints.items() if a % 16 == 0 and a != 0),
                     "plain": sorted(n for n, a in ints.items() if a % 16 and a != 1),
                     "consts": {n: v for n, v in const_names.items() if n in ints or n == "BLOCK_M"},
                     "div": div, "sig": {n: sig[n] for n in names if n in sig},
                     "constexprs": {n: l.constexprs[n] for n in ("BLOCK_M", "BLOCK_N", "BLOCK_D") if n in l.constexprs},
                     "num_warps": options.num_warps, "num_stages": options.num_stages})
    out[name] = rows
print(json.dumps(out))
'''


def run_script():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json
    return json.loads(proc.stdout.splitlines()[-1])


def test_specialisation_is_a_launchs():
    out = run_script()
    (main,) = out["causal"]
    assert main["role"] == "main" and main["grid"] == [4096 // 128, 4 * 16]
    assert main["options"] == {"num_warps": 8, "num_stages": 3}
    assert (main["num_warps"], main["num_stages"]) == (8, 3)
    # strides of 1 (the feature axis of q, k, v and o) are compiled as constants ...
    assert {"st3_q", "st3_k", "st3_v", "o_s3"} <= set(main["ones"])
    assert all(main["consts"][n] == 1 for n in main["ones"])
    # ... 16-divisible integers (strides of 64-wide rows, N = 4096) and every pointer carry the hint
    assert {"st2_q", "st1_q", "n_rows", "n_cols"} <= set(main["div"])
    assert set(main["sixteen"]) <= set(main["div"])
    assert {"ptr_q", "ptr_k", "ptr_v", "o_ptr"} <= set(main["div"])
    assert not set(main["plain"]) & set(main["div"])
    assert main["sig"]["ptr_q"] == "*bf16" and main["sig"]["st2_q"] == "i32"
    assert main["constexprs"] == {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64}
    # every launch of a call is recorded, in order
    assert [r["role"] for r in out["document"]] == ["classify", "main"]
    assert [r["role"] for r in out["query_softmax"]][-1] == "main" and "stats" in \
        [r["role"] for r in out["query_softmax"]]
    assert [r["role"] for r in out["gqa_causal"]] == ["main", "packed"]


def test_recorded_launch_is_what_call_runs():
    """In the interpreter: the launches recorded for a call, run by hand, give the call's output."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = r'''
import torch, attncc
from attncc.binding import bind
from attncc.random_inputs import random_arguments
k = attncc.compile("examples/causal.attn", backend="triton")
args = random_arguments(k.program, {"B": 1, "H": 2, "N": 19, "M": 23, "D": 16, "E": 16}, dtype=torch.float32)
call = bind(k.program, args)
expected = k(**args)
launches = k.generated.launcher.launches(call)
assert len(launches) == 1 and launches[0].interpret
o = launches[0].args[[i for i, a in enumerate(launches[0].args) if isinstance(a, torch.Tensor)][3]]
o.zero_()
launches[0].run()
assert torch.allclose(o, expected, atol=1e-5), (o - expected).abs().max()
print("ok")
'''
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]


BACKWARD_SCRIPT = r'''
import json
import attncc
from attncc.aot import backward_launches, compile_launch, resources, specialise
from attncc.row_backward import backward_config

out = {}
for name in ("causal", "differential", "epipolar_views"):
    k = attncc.compile(f"examples/{name}.attn", backend="triton")
    rows = []
    for l in backward_launches(k, 64, 64):
        sig, consts, attrs, options = specialise(l)
        rows.append({"kernel": l.kernel.__name__, "role": l.role.value, "grid": list(l.grid),
                     "tiles": [l.constexprs.get("BLOCK_M"), l.constexprs.get("BLOCK_N")],
                     "use_tma": l.constexprs.get("USE_TMA"), "num_warps": options.num_warps,
                     "num_stages": options.num_stages, "sig_q": sig.get("ptr_q")})
    out[name] = rows
k = attncc.compile("examples/causal.attn", backend="triton")
(dkdv,) = [l for l in backward_launches(k, 64, 64) if l.role.value == "bwd_dkdv"]
r = resources(dkdv.kernel.__name__, compile_launch(dkdv), dkdv.options["num_warps"])
out["compiled"] = {"spill": r.spill_bytes, "tma": r.tma_loads, "ctas": r.ctas_per_sm, "registers": r.registers}
out["default"] = backward_config(False, 64, 64)
print(json.dumps(out))
'''


def test_backward_report_compiles_the_backward_launchers_launches():
    """`attncc.aot.backward_launches`: the delta, dK/dV and dQ launches the backward launcher
    makes (per term for a sum of terms; none without a generated backward), each with its own
    kernel's default tiles, warps and stages, TMA on sm_90; the dK/dV kernel compiles with TMA
    loads and no spill at head dim 64."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", BACKWARD_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json
    out = json.loads(proc.stdout.splitlines()[-1])
    cfg = out["default"]
    rows = out["causal"]
    assert [r["role"] for r in rows] == ["bwd_pre", "bwd_dkdv", "bwd_dq"]
    pre, dkdv, dq = rows
    for row, tiles in ((dkdv, cfg["dkdv"]), (dq, cfg["dq"])):
        assert row["tiles"] == [tiles["BLOCK_M"], tiles["BLOCK_N"]]
        assert (row["num_warps"], row["num_stages"]) == (tiles["num_warps"], tiles["num_stages"])
        assert row["use_tma"] is True and row["sig_q"] == "*bf16"
    assert dkdv["grid"] == [4096 // cfg["dkdv"]["BLOCK_N"], 4 * 16]
    assert dq["grid"] == [4096 // cfg["dq"]["BLOCK_M"], 4 * 16] == pre["grid"]
    # a sum of terms: each term's three kernels, not the forwards that recompute its output
    assert [r["role"] for r in out["differential"]] == ["bwd_pre", "bwd_dkdv", "bwd_dq"] * 2
    assert out["epipolar_views"] == []  # a general plan: no generated backward
    compiled = out["compiled"]
    assert compiled["spill"] == 0 and compiled["tma"] > 0 and compiled["ctas"] >= 1, compiled
