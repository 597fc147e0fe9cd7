"""Fuzzing the gallery: a few hundred seeded mutations of its specs (tests/fuzzing.py).

Every outcome must be a located `SpecError`, a call the spec's own contract refuses, or a
run whose generated kernel (when the Triton backend takes the spec) matches the reference;
each case runs under a hang guard. `python tests/fuzzing.py 2000 7` runs a longer campaign.
"""
import pytest

from fuzzing import cases, judge

CASES_PER_CHUNK = 60
CHUNKS = 4


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_mutated_gallery_specs_fail_cleanly_or_match(chunk):
    failures = []
    tally: dict[str, int] = {}
    for label, text in cases(CASES_PER_CHUNK, seed=chunk):
        outcome = judge(text)
        tally[outcome.kind] = tally.get(outcome.kind, 0) + 1
        if outcome.failed:
            failures.append(f"--- {label}: {outcome.kind}\n{text}\n{outcome.detail}")
    assert not failures, f"{len(failures)} of {CASES_PER_CHUNK} cases failed ({tally}):\n" + "\n".join(failures)


def test_the_judge_can_fail(monkeypatch):
    """A crash and a hang are failures, not outcomes (the fuzz test above can fail)."""
    import fuzzing

    def crash(text):
        raise RuntimeError("deep inside")

    def hang(text):
        while True:
            pass

    text = fuzzing.gallery_texts()["causal"]
    monkeypatch.setattr(fuzzing.attncc, "load", crash)
    assert fuzzing.judge(text).kind == "FAIL crash"
    monkeypatch.setattr(fuzzing.attncc, "load", hang)
    assert fuzzing.judge(text, seconds=0.5).kind == "FAIL hang"
