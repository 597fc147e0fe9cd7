"""The `attncc` command line, run in-process: gallery, stages, checks, errors and help."""
from pathlib import Path

import pytest

from attncc.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = sorted(p.stem for p in EXAMPLES.glob("*.attn"))
# Params that grid examples need (no defaults); N is then solved from their requires.
REQUIRED_PARAMS = {
    "neighborhood_2d": ["--param", "height=6,width=7"],
    "criss_cross": ["--param", "height=5", "--param", "width=6"],
    "epipolar": ["--param", "views=2,height=4,width=5"],
}


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_gallery_lists_every_example(capsys):
    assert len(NAMES) == 27
    rc, out, _ = run(capsys, "list", "--dir", str(EXAMPLES))
    assert rc == 0
    for name in NAMES:
        assert name in out


def test_gallery_defaults_to_the_installed_examples(capsys):
    rc, out, _ = run(capsys, "list")
    assert rc == 0 and "27 attention specs" in out and "permuted_blocks" in out


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
    rc, _, err = run(capsys, "check", "agent", "--shape", "N=37")
    assert rc == 2 and "N % agents == 0" in err and "--shape" in err


def test_check_asks_for_params_without_default(capsys):
    rc, _, err = run(capsys, "check", "criss_cross")
    assert rc == 2 and "--param height=VALUE" in err


@pytest.mark.parametrize("name", NAMES)
def test_check_every_example_with_the_reference(capsys, name):
    argv = ["check", str(EXAMPLES / f"{name}.attn"), "--backend", "reference",
            *REQUIRED_PARAMS.get(name, [])]
    rc, out, err = run(capsys, *argv)
    assert rc == 0, out + err


def test_check_in_low_precision_compares_to_an_accurate_reference(capsys):
    rc, out, _ = run(capsys, "check", "softcap", "--backend", "reference", "--dtype", "bfloat16", "--seed", "1")
    assert rc == 0 and "bfloat16" in out


@pytest.mark.parametrize("argv", [[], ["list"], ["show"], ["check"]])
def test_help_teaches_with_examples(capsys, argv):
    with pytest.raises(SystemExit) as exit:
        main([*argv, "--help"])
    assert exit.value.code == 0
    assert "example" in capsys.readouterr().out


def test_no_arguments_prints_help(capsys):
    rc, out, _ = run(capsys)
    assert rc == 0 and "usage: attncc" in out and "check" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and "attncc 0." in capsys.readouterr().out
