"""Text forms of the AST and IR: structure, determinism and pointers back into the spec."""
from pathlib import Path

import attncc
from attncc.printer import format_ast, format_ir, listed_nodes
from attncc.syntax import parse

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def ir_text(name):
    return format_ir(attncc.load(EXAMPLES / f"{name}.attn"))


def section(text, title):
    lines = text.splitlines()
    start = lines.index(title) + 1
    end = next((k for k in range(start, len(lines)) if not lines[k].startswith(" ")), len(lines))
    return lines[start:end]


def test_ast_has_one_line_per_statement_with_its_line_number():
    path = EXAMPLES / "sliding_window.attn"
    text = format_ast(parse(path.read_text(), str(path)))
    assert text.splitlines()[0] == f"attention sliding_window  # {path}"
    assert text.splitlines()[-6:] == [
        "     4  Param    window: int = 256",
        "     5  Require  N == M",
        "     6  Assign   s[b, h, i, j] = q[b, h, i, d] * k[b, h, j, d] * D ** -0.5",
        "     7  Mask     j <= i and i - j < window",
        "     8  Assign   p = softmax(s, j)",
        "     9  Assign   o[b, h, i, e] = p[b, h, i, j] * v[b, h, j, e]",
    ]
    assert text.splitlines()[1:3] == ["  inputs", "     3  q[B, H, N, D]: float"]


def test_ast_prints_parentheses_only_where_needed():
    text = format_ast(parse("attention t(x[N]) -> y[N] {\n"
                            "  y[i] = (x[i] - 1) * 2 ** -(x[i] + 1) if not (i < 3 or i > 5) else -x[i]\n"
                            "}\n"))
    assert "y[i] = (x[i] - 1) * 2 ** -(x[i] + 1) if not (i < 3 or i > 5) else -x[i]" in text


def test_ir_header_lists_inputs_params_requires_and_extents():
    text = ir_text("topk_blocks")
    assert section(text, "inputs:") == ["  q[B, H, N, D]: float", "  k[B, H, M, D]: float",
                                        "  v[B, H, M, E]: float"]
    assert section(text, "params:") == ["  block: int = 64", "  topk: int = 4"]
    assert section(text, "requires:") == ["  require N == M  # line 8"]
    assert "  qb  ceiling(N/block)" in section(text, "extents:")
    assert section(text, "outputs:") == ["  o[b,h,i,e]  =  %22  [B, H, N, E]  float"]


def test_ir_numbers_nodes_in_topological_order():
    program = attncc.load(EXAMPLES / "differential.attn")
    nodes = listed_nodes(program)
    position = {node: k for k, node in enumerate(nodes)}
    for node in nodes:
        for op in node.operands():
            assert position.get(op, -1) < position[node]
    lines = section(format_ir(program), "nodes:")
    assert len(lines) == len(nodes)
    assert [line.split()[0] for line in lines] == [f"%{k}" for k in range(len(nodes))]


def test_ir_names_statement_results_and_shows_masks():
    lines = section(ir_text("moh"), "nodes:")
    select = next(line for line in lines if "select" in line)
    assert select.split()[:5] == ["%2", "w", "=", "select", "topk(%1,"]
    assert select.endswith("# line 6: w = topk(softmax(router[b,i,h], h), topk, h)")
    out = next(line for line in lines if " o =" in line)
    assert "contract(%2, %10, %11) over h,j  [b,i,e]" in out and "masks: #0" in out


def test_param_defaults_print_as_expressions():
    assert "  bias: float = -log(M)" in ir_text("sigmoid")
    assert "  views: int  (no default)" in ir_text("epipolar")


def test_ir_text_is_deterministic():
    assert ir_text("permuted_blocks") == ir_text("permuted_blocks")
