"""The kernels of the naming, literal and operand regression specs compile for sm_90 too.

The interpreter accepts code a real compilation rejects (`.to` on a scalar argument, NaN
propagation flags, float literals in integer contexts): every spec of
test_codegen_names.py, test_codegen_literals.py and test_codegen_operands.py that generates
is compiled for a Hopper GPU with Triton's ptxas, in a process not in interpreter mode.
"""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r'''
import sys
sys.path.insert(0, "tests")
import attncc
from attncc.aot import compile_kernels
import test_codegen_literals as lit, test_codegen_names as nm, test_codegen_operands as op

specs = [nm.AFFINE.format(**nm.names_of(a)) for a in nm.ASSIGNMENTS]
specs += [lit.SPEC.format(mod=m) for m in lit.MASKS + lit.OPERATORS + lit.NANS]
specs += [op.GQA_TWO_GROUPS, op.HEAD.format(ins=op.QKV, out="p[b,h,i,j] * (v[b,h,j,e] * (i + 1))")]
for spec in specs:
    kernel = attncc.compile(spec, backend="triton")
    compiled = compile_kernels(kernel, 64, 32, {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2})
    assert all("cubin" in c.asm for c in compiled.values())
    print("ok", flush=True)
'''


def test_regression_specs_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0 and out.stdout.count("ok") == 3 + 6 + 10 + 5 + 2, out.stdout[-2000:] + out.stderr[-4000:]
