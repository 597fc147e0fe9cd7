"""Random arguments that satisfy any spec's contract, with meaningful integer inputs."""
from pathlib import Path

import pytest
import torch

import attncc
from attncc.binding import bind
from attncc.random_inputs import random_arguments

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = sorted(p.stem for p in EXAMPLES.glob("*.attn"))
REQUIRED_PARAMS = {
    "neighborhood_2d": {"height": 6, "width": 7},
    "neighborhood_nd": {"shape": "(2, 3, 5)", "kernel": "3"},  # text, as from the command line
    "criss_cross": {"height": "5", "width": "6"},  # text, as from the command line
    "epipolar": {"views": 2, "height": 4, "width": 5},
    "epipolar_views": {"views": 2, "height": 3, "width": 4},
}


def load(name):
    return attncc.load(EXAMPLES / f"{name}.attn")


@pytest.mark.parametrize("name", NAMES)
def test_arguments_bind_for_every_example(name):
    program = load(name)
    call = bind(program, random_arguments(program, params=REQUIRED_PARAMS.get(name)))
    assert call.scalars["B"] == 2


def test_dims_are_solved_from_requires():
    program = load("epipolar")
    scalars = bind(program, random_arguments(program, params=REQUIRED_PARAMS["epipolar"])).scalars
    assert scalars["N"] == scalars["M"] == 40 and scalars["V"] == 2
    square = bind(load("sliding_window"), random_arguments(load("sliding_window"), {"M": 20})).scalars
    assert square["N"] == 20
    agent = bind(load("agent"), random_arguments(load("agent"))).scalars
    assert agent["N"] % agent["agents"] == 0 and agent["N"] == agent["M"]


def test_permutation_detected_for_permuted_blocks():
    args = random_arguments(load("permuted_blocks"), {"N": 50})
    perm = args["perm"]
    assert perm.shape == (2, 4, 50)
    expected = torch.arange(50).expand(2, 4, 50)
    assert torch.equal(perm.sort(dim=-1).values, expected)
    assert not torch.equal(perm, expected)


def test_integer_inputs_follow_their_use():
    label = random_arguments(load("label_table"), seed=3)
    assert label["label_q"].max() < label["allow"].shape[0] and label["label_q"].min() >= 0
    doc = random_arguments(load("document"))["doc"]
    assert torch.equal(doc, doc.sort(dim=-1).values) and doc.min() >= 0
    prefix = random_arguments(load("prefix_lm"), {"N": 9})["prefix"]
    assert prefix.shape == (2,) and 0 <= prefix.min() and prefix.max() <= 9


def test_deterministic_with_seed():
    program = load("document")
    a, b, c = (random_arguments(program, seed=s) for s in (7, 7, 8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["q"], c["q"])


def test_dtype_and_given_params():
    args = random_arguments(load("sliding_window"), params={"window": "8"}, dtype=torch.float64)
    assert args["q"].dtype == torch.float64 and args["window"] == 8


@pytest.mark.parametrize("shape, params, message", [
    ({"N": 37, "M": 45}, None, "N == M"),
    ({"X": 3}, None, "no dim X"),
    (None, {"wndow": 3}, "no param wndow"),
    (None, {"window": "wide"}, "param 'window' is int"),
])
def test_clear_errors(shape, params, message):
    with pytest.raises(ValueError, match=message):
        random_arguments(load("sliding_window"), shape, params)


def test_missing_param_names_the_flag():
    with pytest.raises(ValueError, match="--param height=VALUE"):
        random_arguments(load("neighborhood_2d"))


def test_bases_of_powers_are_decays():
    """A float input raised to a distance (`lam[h] ** (i - j)`) gets values in (0.5, 1]:
    standard normal values above 1 overflow over a sequence and make `check` fail on
    rounding alone, negative ones have no real powers."""
    program = attncc.load(str(EXAMPLES / "lightning.attn"))
    lam = random_arguments(program, seed=0)["lam"]
    assert bool(((lam > 0.5) & (lam <= 1.0)).all())
    q = random_arguments(program, seed=0)["q"]
    assert bool((q < 0).any()) and bool((q.abs() > 1).any())  # other floats stay standard normal
