"""Generated kernels compile for a Hopper GPU (sm_90) without one.

Triton's interpreter is permissive: it runs code a real compilation rejects (types of
loop-carried values, scalar/tensor mixes, dot shapes). Triton can compile ahead of time for
a target it does not have (its wheel carries ptxas), so every kernel a gallery example
generates (the main kernel, its GQA-packed variant, its block-map classifier) is compiled
for sm_90 with bf16 inputs, down to a cubin, in a process that is not in interpreter mode.
"""
import os
import subprocess
import sys
from pathlib import Path

from oracles.inputs import EXAMPLES


def test_every_example_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    script = Path(__file__).with_name("aot_compile.py")
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900,
                         cwd=Path(__file__).parent.parent)
    compiled = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("ok ")]
    assert out.returncode == 0 and compiled == EXAMPLES, out.stdout[-2000:] + out.stderr[-4000:]


def test_general_plans_compile_for_sm90():
    """The interpreter accepted the general planner's pass kernels; so must the compiler."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    script = Path(__file__).with_name("aot_compile.py")
    out = subprocess.run([sys.executable, str(script), "--trials"], env=env, capture_output=True, text=True,
                         timeout=900, cwd=Path(__file__).parent.parent)
    sys.path.insert(0, str(script.parent))
    from aot_compile import GENERAL, TRIALS

    compiled = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("ok ")]
    assert out.returncode == 0 and compiled == [*TRIALS, *GENERAL], out.stdout[-2000:] + out.stderr[-4000:]
