"""Structure of the generated Triton source (not whole files: what a reader relies on)."""
import attncc
from attncc.runtime import source_path


def source(name):
    return attncc.compile(f"examples/{name}.attn", backend="triton").generated.source


def test_dense_kernel_has_no_mask_code_and_scales_the_scores():
    src = source("dense")
    assert src.mask_mode == "none"
    # q is used as loaded (the dot reads it from shared memory); one multiply scales the fp32 scores
    assert "s = qk * qk_scale" in src.source and "q = (q" not in src.source
    # the ragged last key tile is the only masked one, and only when BLOCK_N does not divide M
    assert "if not EVEN_N:" in src.source and "allowed = offs_n[None, :] < n_cols\n" in src.source
    assert "_classify" not in src.source


def test_causal_bounds_come_from_the_symbolic_plan():
    text = source("causal").source
    assert "key-tile ranges derived symbolically" in text
    assert "# conjunct 0:" in text
    # full tiles run without the per-element mask, partial ones with it
    assert "# full tiles: no mask" in text and "# partial tiles: per-element mask" in text
    assert "# line 6: mask j <= i + (M - N)" in text


def test_score_modifications_carry_their_spec_lines():
    text = source("alibi").source
    assert "# line 5: s += slopes[h] * (j - i - (M - N))" in text
    assert "tl.load(ptr_slopes + idx_h * st0_slopes)" in text, "slopes[h] is loaded once per program"
    assert "to base-2 units for exp2" in text


def test_tensor_masks_use_a_runtime_block_map():
    src = source("document")
    assert src.mask_mode == "block_map" and src.block_map is not None
    assert "def attn_document_classify(" in src.source
    assert "full tiles first, then partial ones" in src.source


def test_gqa_specs_also_get_a_packed_variant():
    src = source("gqa_causal")
    assert src.packed is not None
    assert "def attn_gqa_causal_packed_fwd(" in src.source
    assert "i_rows = offs_m // group" in src.source


def test_sink_window_visits_two_ranges():
    text = source("sink_window").source
    assert "# conjunct 1:" in text and "cut_lo" in text


def test_source_is_cached_by_content_hash():
    a, b = source("causal"), source("causal")
    assert source_path(a) == source_path(b)
    assert source_path(a).read_text() == a.source
    assert source_path(a) != source_path(source("dense"))
