"""The `attncc` command line, run in-process: gallery, stages, plans, checks, compiled
modules, errors and help."""
import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import attncc
from attncc.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = sorted(p.stem for p in EXAMPLES.glob("*.attn"))
# Every example is checked with the triton backend (in the interpreter on a CPU, at the small
# default sizes), and once more on the reference.
TRITON = NAMES
# A spec the triton backend does not generate (yet): two outputs.
TWO_OUTPUTS = """attention two_outputs(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> (o[B,H,N,E], p[B,H,N,M]) {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d]
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
}
"""


@pytest.fixture
def ungenerated(tmp_path):
    path = tmp_path / "two_outputs.attn"
    path.write_text(TWO_OUTPUTS)
    return str(path)
# Params that grid examples need (no defaults); N is then solved from their requires.
REQUIRED_PARAMS = {
    "neighborhood_2d": ["--param", "height=6,width=7"],
    "neighborhood_nd": ["--param", "shape=(2,3,5),kernel=(1,3,3)"],
    "criss_cross": ["--param", "height=5", "--param", "width=6"],
    "epipolar": ["--param", "views=2,height=4,width=5"],
    "epipolar_views": ["--param", "views=2,height=3,width=4"],
}


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def flat(text: str) -> str:
    """Text with its line wrapping undone, to find a sentence however it is wrapped."""
    return " ".join(text.split())


def test_gallery_lists_every_example(capsys):
    assert len(NAMES) == 38
    rc, out, _ = run(capsys, "list", "--dir", str(EXAMPLES))
    assert rc == 0
    for name in NAMES:
        assert name in out


def test_gallery_defaults_to_the_installed_examples(capsys):
    rc, out, _ = run(capsys, "list")
    assert rc == 0 and "38 attention specs" in out and "permuted_blocks" in out


def test_show_ir_of_causal(capsys):
    rc, out, _ = run(capsys, "show", "--stage", "ir", str(EXAMPLES / "causal.attn"))
    assert rc == 0
    assert "s = contract(%0, %1, %2) over d" in out
    assert "p = normalize softmax(%3) along j  [b,h,i,j]  float  masks: #0" in out
    assert "#0  %6  [j,i]  # line 6: mask j <= i + (M - N)" in out


def test_show_ast_by_example_name(capsys):
    rc, out, _ = run(capsys, "show", "--stage", "ast", "alibi")
    assert rc == 0
    assert "Assign   s += slopes[h] * (j - i - (M - N))" in out
    assert "Mask     j <= i + (M - N)" in out


def test_check_causal_prints_outputs_and_lse(capsys):
    rc, out, _ = run(capsys, "check", str(EXAMPLES / "causal.attn"), "--backend", "reference")
    assert rc == 0
    rows = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"o", "lse"} <= rows
    assert "backend reference" in out and "PASS" in out


def test_check_reports_syntax_errors_with_position_and_caret(capsys, tmp_path):
    bad = tmp_path / "bad.attn"
    bad.write_text("attention bad(q[B,N,D]) -> o[B,N,D] {\n  o[b,i,d] = q[b,i,d] *\n}\n")
    rc, out, err = run(capsys, "check", str(bad))
    assert rc == 2
    assert f"{bad}:3:1: error:" in err
    assert "\n  ^" in err
    assert "Traceback" not in out + err


def test_check_explains_a_requirement_it_cannot_meet(capsys):
    rc, _, err = run(capsys, "check", "agent", "--backend", "reference", "--shape", "N=37")
    assert rc == 2 and "N % agents == 0" in err and "--shape" in err


def test_check_asks_for_params_without_default(capsys):
    rc, _, err = run(capsys, "check", "criss_cross")
    assert rc == 2 and "--param height=VALUE" in err


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("name", NAMES)
def test_check_every_example(capsys, name, backend):
    argv = ["check", str(EXAMPLES / f"{name}.attn"), "--backend", backend, *REQUIRED_PARAMS.get(name, [])]
    rc, out, err = run(capsys, *argv)
    assert rc == 0, out + err
    assert f"backend {backend}" in out


def test_check_defaults_to_the_triton_kernel(capsys):
    rc, out, _ = run(capsys, "check", "causal", "--shape", "B=1,H=2")
    assert rc == 0 and "backend triton" in out and "PASS" in out


def test_check_says_when_triton_cannot_generate_a_spec(capsys, ungenerated):
    rc, out, err = run(capsys, "check", ungenerated)
    assert rc == 2 and out == ""
    assert "the triton backend cannot generate 'two_outputs'" in err
    assert "hint: --backend reference" in err and "Traceback" not in err


def test_check_in_low_precision_compares_to_an_accurate_reference(capsys):
    rc, out, _ = run(capsys, "check", "softcap", "--backend", "reference", "--dtype", "bfloat16", "--seed", "1")
    assert rc == 0 and "bfloat16" in out


# ----------------------------------------------------------------------------- show --stage plan

def test_plan_of_causal_names_roles_scale_bounds_and_work(capsys):
    rc, out, _ = run(capsys, "show", "--stage", "plan", str(EXAMPLES / "causal.attn"),
                     "--shape", "N=200,M=300", "--block-m", "32", "--block-n", "32")
    assert rc == 0
    for line in ["skeleton: row streaming",
                 "  queries  q[b, h, i, d]  rows i, features d",
                 "  outer          b, h  B, H  one program per combination: grid axis 1",
                 "weights: 1 term, each `coefficient * weight(score)` times the values, summed",
                 "  term 0: softmax along j: an online softmax (running max and sum per query row)",
                 "    Q K^T over d; the scale D ** -0.5 is folded into the queries once (times log2(e), for exp2)",
                 "    modifications: none",
                 "    line 7: p = softmax(s, j)",
                 "  log-sum-exp output (return_lse): yes",
                 "masks: mode affine",
                 "    line 6: mask j <= i + (M - N)",
                 "  conjunct 0: i - j >= -M + N",
                 "    rows        Max(0, -M + N) .. N - 1",
                 "    lo .. hi    0 .. Min(M - 1, M - N + Min(i1, N - 1))",
                 "    flo .. fhi  0 .. Min(M - 1, M - N + i0)",
                 "work: B=2 H=4 N=200 D=16 M=300 E=12",
                 "  tiles 32x32 (BLOCK_M x BLOCK_N), summed over 8 (b, h) combination(s)",
                 "  dense  minimum  full  visited  visited/minimum  visited/dense",
                 # 7 query tiles x 10 key tiles x 8 (b, h); causal keeps 55 of 70 per (b, h)
                 "    560      440   336      440             1.00           0.79"]:
        assert line in out.splitlines(), line


def test_plan_of_document_explains_its_block_map(capsys):
    rc, out, _ = run(capsys, "show", "--stage", "plan", "document", "--shape", "N=64", "--block-m", "16",
                     "--block-n", "16")
    assert rc == 0
    assert "masks: mode block_map" in out
    assert "  opaque0 = doc[b, i]\n  opaque1 = doc[b, j]" in out
    assert "    opaque      Eq(opaque0(i), opaque1(j))" in out
    assert "runtime block map is built (one per (b))" in flat(out)
    work = out.splitlines()[out.splitlines().index("  dense  minimum  full  visited  visited/minimum  "
                                                   "visited/dense") + 1].split()
    assert work[0] == "128" and work[1] == work[3] and work[4] == "1.00"  # 4x4 tiles x 8; visited = minimum


def test_plan_shows_score_modifications_and_loaded_scalars(capsys):
    rc, out, _ = run(capsys, "show", "--stage", "plan", "alibi")
    assert rc == 0 and "    modifications, computed per tile before the masks:\n" \
                       "      line 5: s += slopes[h] * (j - i - (M - N))" in out
    rc, out, _ = run(capsys, "show", "--stage", "plan", "prefix_lm")
    assert rc == 0 and "  mask_scalar0 = prefix[b]  (loaded once per program)" in out
    assert "    guards      1 - mask_scalar0 <= 0" in out


def test_plan_text_does_not_depend_on_the_hash_seed():
    """The mask analysis orders its DNF by hash; the report must still be a stable snapshot."""
    code = "from attncc.plan_report import format_plan; import attncc; " \
           "print(format_plan(attncc.compile('examples/sink_window.attn', backend='triton')))"
    texts = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=EXAMPLES.parent, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
             for seed in ("1", "2")}  # seeds that order sink_window's DNF differently
    assert len(texts) == 1


def test_plan_of_a_sum_of_softmaxes_lists_each_term(capsys):
    rc, out, _ = run(capsys, "show", "--stage", "plan", "differential")
    assert rc == 0
    assert "  queries (term 1)  q2[b, h, i, d]  rows i, features d" in out
    assert "  term 1: softmax along j" in out and "    coefficient: -1.0 * lam" in out
    assert "  log-sum-exp output (return_lse): no, it needs one plain softmax" in out


def test_plan_without_params_for_the_work_table_still_prints_the_plan(capsys):
    rc, out, _ = run(capsys, "show", "--stage", "plan", "neighborhood_2d")
    assert rc == 0 and "masks: mode block_map" in out
    assert "work: not counted with the default sizes" in out and "--param height=VALUE" in flat(out)
    rc, out, _ = run(capsys, "show", "--stage", "plan", "neighborhood_2d", "--param", "height=8,width=8")
    assert rc == 0 and "work: B=2 H=4 N=64" in out


def test_plan_of_a_spec_triton_cannot_generate_exits_2(capsys, ungenerated):
    rc, out, err = run(capsys, "show", "--stage", "plan", ungenerated)
    assert rc == 2 and out == ""
    assert "the triton backend cannot generate 'two_outputs' yet: " in err
    assert "hint: --stage ast and --stage ir show any spec" in err


@pytest.mark.parametrize("argv", [["--block-m", "32"], ["--shape", "N=64"]])
def test_plan_options_belong_to_the_plan_stage(capsys, argv):
    rc, _, err = run(capsys, "show", "--stage", "ir", "causal", *argv)
    assert rc == 2 and "only --stage plan takes" in err


def test_show_triton_prints_the_generated_source(capsys):
    rc, out, _ = run(capsys, "show", "--stage", "triton", str(EXAMPLES / "document.attn"))
    assert rc == 0
    kernel = attncc.compile(EXAMPLES / "document.attn", backend="triton")
    assert out == kernel.generated.source.source


# ----------------------------------------------------------------------------- compile

def _import(path: Path):
    spec = importlib.util.spec_from_file_location(f"exported_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compile_writes_an_importable_module_that_matches_the_reference(capsys, tmp_path):
    rc, out, _ = run(capsys, "compile", str(EXAMPLES / "softcap.attn"), "-o", str(tmp_path / "k"))
    assert rc == 0
    folder = tmp_path / "k"
    assert sorted(p.name for p in folder.iterdir()) == ["attncc_softcap.py", "softcap.attn", "softcap.triton.py"]
    assert f"wrote {folder / 'attncc_softcap.py'}" in out
    assert (folder / "softcap.attn").read_text() == (EXAMPLES / "softcap.attn").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the saved source is what attncc generates
        module = _import(folder / "attncc_softcap.py")
    assert module.__doc__.startswith("softcap: the kernel of softcap.attn")
    assert (folder / "softcap.triton.py").read_text() == module.kernel.generated.source.source
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 2, 48, 16, generator=g), \
        torch.randn(1, 2, 48, 8, generator=g)
    got = module.attention(q=q, k=k, v=v, cap=5.0)
    assert module.kernel.last_run["backend"] == "triton"
    want = attncc.compile(EXAMPLES / "softcap.attn", backend="reference")(q=q, k=k, v=v, cap=5.0)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_compiled_module_warns_when_the_saved_source_is_stale(capsys, tmp_path):
    assert run(capsys, "compile", "causal", "-o", str(tmp_path))[0] == 0
    saved = tmp_path / "causal.triton.py"
    saved.write_text(saved.read_text() + "# edited\n")
    with pytest.warns(UserWarning, match="generates a different Triton source than causal.triton.py"):
        _import(tmp_path / "attncc_causal.py")


def test_compile_of_a_spec_triton_cannot_generate_writes_nothing(capsys, tmp_path, ungenerated):
    rc, _, err = run(capsys, "compile", ungenerated, "-o", str(tmp_path / "k"))
    assert rc == 2 and "cannot generate 'two_outputs'" in err and "--backend reference" in err
    assert not (tmp_path / "k").exists()


@pytest.mark.parametrize("argv", [[], ["list"], ["show"], ["check"], ["compile"]])
def test_help_teaches_with_examples(capsys, argv):
    with pytest.raises(SystemExit) as exit:
        main([*argv, "--help"])
    assert exit.value.code == 0
    assert "example" in capsys.readouterr().out


def test_no_arguments_prints_help(capsys):
    rc, out, _ = run(capsys)
    assert rc == 0 and "usage: attncc" in out
    assert all(command in out for command in ("list", "show", "check", "compile", "tune"))


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and "attncc 0." in capsys.readouterr().out


@pytest.mark.parametrize("name", NAMES)
def test_plan_of_every_example(capsys, name):
    rc, out, err = run(capsys, "show", "--stage", "plan", name, *REQUIRED_PARAMS.get(name, []))
    assert rc == 0, out + err
    assert "skeleton" in out and "work:" in out
