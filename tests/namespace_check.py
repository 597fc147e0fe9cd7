"""Test helpers: the identifiers of a generated module, and the two namespaces they live in.

`check_namespaces(source, program)` parses a generated module with `ast` and checks every
identifier (names, function parameters, function names): a user-derived one (`ptr_q`,
`dim_N`, `idx_b`, `attn_causal_fwd`, see `attncc.codegen.names`) must belong to a tensor,
dim, param, index or the spec itself in the role its prefix says; any other must be one of
the generator's own names below, which never start with a role prefix. A user name written
into the kernel without its role (a dim passed as `N`) would be caught twice: it matches no
generated pattern, and the regression tests run it against the reference.
"""
from __future__ import annotations

import ast
import re

import torch

import attncc
from attncc.codegen import names
from attncc.random_inputs import random_arguments

GENERATED = re.compile("|".join([
    # constexprs and builtins
    r"BLOCK_[MNDEC]", r"MASKED|FULL_MASKED|KEY_MASK|COUNT_TILES|SPLIT|STORE_LSE|PRECISION|UPCAST_DOT|EVEN_[DEMN]|ROW_SUM|INIT_STATE|USE_TMA|FOLD_SCALE",
    r"tl|triton|float|range",
    # tile geometry, grid decoding, loop bounds
    r"offs_[mndec]|pid_[mnox]|pid_split|flat|pid_o_list|n_qt|n_rows|n_cols|n_feat|n_vfeat|n_full|n_full_tiles|n_tiles",
    r"n_qtiles|n_ktiles|split_lo|split_hi|split_len|o_split_stride|lse_split_stride|row_ok|i_rows|h_rows",
    r"group|start_n|t|i0|i1|lo|hi|fs|fe|cut_lo|cut_hi|(?:ok|lo|hi|end|full_ok|flo|fhi)\d+",
    r"map_row|list_base|inside|allowed|any_allowed|all_allowed|whole|state|combo|rows|in_seq|c0",
    # fixed pointers and strides
    r"o_ptr|lse_ptr|count_ptr|kv_list_ptr|kv_full_ptr|kv_count_ptr|map_ptr|state_ptr|z_ptr|o_ptrs",
    r"(?:o|lse)_s\d+|q_ptrs\d*|q_desc\d*|q_base|k_base|v_base|v_desc|k_ok|v_ok",
    # the online softmax and accumulators, per term
    r"(?:acc|m_i|l_i|l_safe|q|qk|s|p|qk_scale)\d*|k|v|m_new|m_safe|alpha|out|out_sum|lse|sink",
    r"(?:q\d*|k|v)_f32|S|z|a|q_past|k_to_end",
    # temporaries, host-evaluated scalars, loaded mask scalars, precomputed inputs
    r"(?:t|ld|host)\d+|mask_scalar\d+|pre\d+_(?:ptr|st\d+|sz\d+|kbase|kdesc|ktile)",
    # the general streaming plan's pass kernels (codegen/stream_kernel.py): feature blocks,
    # operand tiles, stored accumulators, online statistics, top-k buffers, ties, inner sums
    r"BLOCK_[DE]\d+|KP\d+|n_\d+|mask_lo|mask_hi|(?:a|b|x|l|m|m_new|m_safe|alpha|res\d+_s|acc\d+_st|acc\d+_sz)\d+",
    r"rb\d+_\d+|res\d+_ptr|acc\d+_ptr|(?:buf|kcols|xt|old|r|head_x|head_b|from_x|at_x|at_b|seen|eq|tie_rank|chosen|red|g|sl)\d+|m\d+_end\d+",
]))
KERNEL_SUFFIX = re.compile(r"(?:_packed|_stats\d+)?_(?:fwd|tile)|_classify|_linear_(?:state|apply)|_chunked|_pass\d+")


def identifiers(source: str) -> set[str]:
    """Every name a module binds or reads, function parameters and function names included."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.arg):
            found.add(node.arg)
        elif isinstance(node, ast.FunctionDef):
            found.add(node.name)
    return found


def problems(source: str, program) -> list[str]:
    """What is wrong with the identifiers of `source`, generated for `program` (empty: nothing)."""
    indices = set(program.extent)
    out = []
    for ident in sorted(identifiers(source)):
        split = names.split(ident)
        if split is None:
            if not GENERATED.fullmatch(ident):
                out.append(f"{ident}: neither user-derived nor one of the generator's names")
            continue
        role, name = split
        axis = int(re.sub(r"\D", "", role) or -1)
        role = re.sub(r"\d", "", role)
        ok = {
            "ptr": name in program.inputs, "kbase": name in program.inputs, "kdesc": name in program.inputs, "ktile": name in program.inputs,
            "st": name in program.inputs and axis < len(program.inputs[name].dims),
            "sz": name in program.inputs and axis < len(program.inputs[name].dims),
            "dim": name in program.dims, "par": name in program.params,
            "idx": name in indices, "size": name in indices, "grp": name in indices,
            "attn": name.startswith(program.name) and KERNEL_SUFFIX.fullmatch(name[len(program.name):]) is not None,
        }[role]
        if not ok:
            out.append(f"{ident}: role '{role}' of '{name}', which the spec has no such thing as")
    return out


def check_namespaces(source: str, program):
    bad = problems(source, program)
    assert not bad, "\n".join(bad)


def run_both(spec: str, shape: dict, params: dict | None = None, seed: int = 0, dtype=torch.float32):
    """The spec's Triton kernel (in the interpreter) and its reference on the same random
    inputs, after checking the generated module's namespaces: (triton output, reference output)."""
    kernel = attncc.compile(spec, backend="triton")
    check_namespaces(kernel.generated.source.source, kernel.program)
    kwargs = random_arguments(kernel.program, shape, params or {}, dtype=dtype, seed=seed)
    out = kernel(**kwargs)
    assert kernel.last_run["backend"] == "triton"
    ref = attncc.compile(spec, backend="reference")(**kwargs)
    return out, ref
