"""Property test: user names and descriptions are data, whatever they spell.

Random names for every kind of user name (the spec, tensors, dims, params, lets, index
variables, intermediates), drawn from the identifiers of a generated module, Python
keywords and builtins, and random identifiers, and random descriptions (quotes,
backslashes, format braces, docstring terminators) go through `attncc.compile`,
`attncc check` and `attncc compile -o`: the generated modules must parse, run, and
match the reference executor.
"""
import ast
import builtins
import importlib.util
import keyword
import random
import re
import string
import sys
from pathlib import Path

import pytest
import torch

import attncc
from attncc.check import _compare, check
from attncc.cli import main as cli_main
from attncc.frontend import CALL_OPTIONS, CONSTANTS, FUNCTION_HELP
from attncc.random_inputs import random_arguments
from namespace_check import identifiers

LANGUAGE_WORDS = {"attention", "param", "let", "require", "mask", "repeat", "if", "else", "and", "or", "not", "in",
                  "by", "as",
                  *CONSTANTS, *CALL_OPTIONS, *re.findall(r"[a-z_0-9]+", FUNCTION_HELP)}

TEMPLATE = """{description}
attention {name}({q}[{B},{H},{N},{D}], {k}[{B},{H},{M},{D}], {v}[{B},{H},{M},{E}], {sl}[{H}]) -> {o}[{B},{H},{N},{E}] {{
  param {w}: int = 6
  param {c}: float = 3.0
  let {r} = {w} - 1
  {s}[{b},{h},{i},{j}] = {q}[{b},{h},{i},{d}] * {k}[{b},{h},{j},{d}] * {D} ** -0.5
  {s} += {sl}[{h}] * ({j} - {i})
  {s} = {c} * tanh({s} / {c})
  mask {j} <= {i} + ({M} - {N}) and {i} + ({M} - {N}) - {j} <= {r}
  {p} = softmax({s}, {j})
  {o}[{b},{h},{i},{e}] = {p}[{b},{h},{i},{j}] * {v}[{b},{h},{j},{e}]
}}
"""
SLOTS = ["name", "q", "k", "v", "sl", "o", "B", "H", "N", "M", "D", "E", "w", "c", "r", "s", "p",
         "b", "h", "i", "j", "d", "e"]
DIM_SLOTS = ["B", "H", "N", "M", "D", "E"]
INDEX_SLOTS = ["b", "h", "i", "j", "d", "e"]
SIZES = [1, 2, 7, 9, 5, 6]  # B, H, N, M, D, E: N != M, D != E, N not a multiple of a tile

DESCRIPTIONS = ['"""', "'''", '\\', 'a """ if __import__("os").system("exit 3") else """',
                "{name} {{}} %s %(x)s", "\\N{BULLET} \\x00 \\u2028", "tab\there", "é ü ∑ 漢字",
                "ends with a backslash \\", 'r"raw" b\'bytes\'', "# not a comment", "`backticks`",
                "a NUL \x00 byte", "a line separator \u2028 inside", "a lone \r return"]


def generated_identifiers() -> set[str]:
    """Every identifier the generated module of a gallery example uses."""
    gallery = Path(attncc.__file__).resolve().parent.parent / "examples"
    return identifiers(attncc.compile(gallery / "causal.attn", backend="triton").generated.source.source)


def name_pool() -> list[str]:
    pool = generated_identifiers() | set(keyword.kwlist) | set(keyword.softkwlist) \
        | {"tl", "triton", "torch", "attncc", "math", "float", "range", "int", "print", "self", "kernel",
           "warnings", "Path", "_HERE", "__name__", "__file__", "_", "__builtins__"} \
        | {n for n in dir(builtins) if n.isidentifier()}
    pool = {n for n in pool if re.fullmatch(r"[A-Za-z_][A-Za-z_0-9]*", n)} - LANGUAGE_WORDS
    return sorted(pool)


def random_spec(rng: random.Random, pool: list[str]) -> tuple[str, dict[str, str]]:
    names: dict[str, str] = {}
    taken: set[str] = set()
    for slot in SLOTS:
        while True:
            if rng.random() < 0.85:
                cand = rng.choice(pool)
            else:
                cand = rng.choice(string.ascii_letters + "_") + "".join(
                    rng.choice(string.ascii_letters + string.digits + "_") for _ in range(rng.randrange(4)))
            index_slot = slot in INDEX_SLOTS  # index variables are the names not starting upper-case
            if cand not in taken and cand not in LANGUAGE_WORDS and not (index_slot and cand[0].isupper()):
                break
        taken.add(cand)
        names[slot] = cand
    lines = [rng.choice(DESCRIPTIONS) for _ in range(rng.randrange(1, 3))]
    description = "\n".join("# " + line for line in lines)
    return TEMPLATE.format(description=description, **names), names


def call_arguments(program, names, seed):
    shape = {names[slot]: size for slot, size in zip(DIM_SLOTS, SIZES)}
    return random_arguments(program, shape, seed=seed)


@pytest.mark.parametrize("seed", range(6))
def test_random_names_generate_and_match_the_reference(seed):
    rng = random.Random(seed)
    text, names = random_spec(rng, name_pool())
    kernel = attncc.compile(text, backend="triton")
    reference = attncc.compile(text, backend="reference")
    args = call_arguments(kernel.program, names, seed)
    ast.parse(kernel.generated.source.source)
    got = kernel(**args)
    want = reference(**{n: t.double() if torch.is_tensor(t) and t.is_floating_point() else t
                        for n, t in args.items()})
    assert kernel.last_run["backend"] == "triton"
    assert _compare("o", got, want, 1e-4, 1e-4).passed, text


@pytest.mark.parametrize("seed", range(6, 9))
def test_random_names_through_check_and_compile_to_a_folder(seed, tmp_path, monkeypatch, capsys):
    rng = random.Random(seed)
    text, names = random_spec(rng, name_pool())
    spec = tmp_path / "hostile.attn"
    spec.write_text(text)
    shape = {names[slot]: size for slot, size in zip(DIM_SLOTS, SIZES)}
    report = check(spec, backend="triton", shape=shape)
    assert report.backend == "triton" and report.passed, text

    out = tmp_path / "out"
    assert cli_main(["compile", str(spec), "-o", str(out)]) == 0
    modules = [p for p in out.glob("*.py") if not p.stem.endswith(("_triton", ".triton"))]
    assert len(modules) == 1
    for written in out.glob("*.py"):
        ast.parse(written.read_text())  # every written module parses
    monkeypatch.syspath_prepend(str(out))
    loaded = importlib.util.spec_from_file_location(f"hostile_module_{seed}", modules[0])
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    kernels = [x for x in vars(module).values() if isinstance(x, attncc.Kernel)]
    assert len(kernels) == 1
    kernel = kernels[0]
    args = call_arguments(kernel.program, names, seed)
    want = attncc.compile(text, backend="reference")(**args)
    assert _compare("o", kernel(**args), want, 1e-4, 1e-4).passed
    sys.modules.pop(f"hostile_module_{seed}", None)


def test_python_keywords_as_input_names_are_passed_by_dict():
    kernel = attncc.compile("""attention kw(lambda[N,D], k[M,D], v[M,E]) -> o[N,E] {
  param None: float = 1.0
  s[i,j] = lambda[i,d] * k[j,d] * None
  p = softmax(s, j)
  o[i,e] = p[i,j] * v[j,e]
}""", backend="reference")
    sig = kernel.signature
    assert "k" in sig.parameters and "lambda" not in sig.parameters
    assert any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    gen = torch.Generator().manual_seed(0)
    args = {"lambda": torch.randn(5, 4, generator=gen), "k": torch.randn(6, 4, generator=gen),
            "v": torch.randn(6, 3, generator=gen), "None": 0.5}
    want = torch.softmax(args["lambda"] @ args["k"].T * 0.5, -1) @ args["v"]
    torch.testing.assert_close(kernel(**args), want)


@pytest.mark.parametrize("decl", ["return_lse[N,D]", "q[N,D]) -> o[N,D] {\n  param return_lse: bool = false\n}"])
def test_the_call_option_return_lse_is_no_user_name(decl):
    text = f"attention bad({decl}" if decl.startswith("q") else f"attention bad({decl}) -> o[N,D] {{\n}}"
    with pytest.raises(attncc.SpecError, match="return_lse.*keyword argument of every kernel call"):
        attncc.load(text)
