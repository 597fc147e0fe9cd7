"""Random keyword arguments for the 27 example contracts of VARIANTS.md, section 1.

`make_inputs(name)` returns a dict that can be splatted into an oracle or a compiled kernel:
q, k, v, then the example's extra inputs, then the parameters that the contract requires
(grid sizes) or that must shrink to make small test shapes meaningful (a 256-token window on
37 tokens would just be causal attention). Shapes are odd on purpose: N = 37 is not a power
of two, D != E, and gqa_causal uses G = H // 2.
"""

import math

import torch

EXAMPLES = [
    # softmax family
    "dense", "causal", "gqa_causal", "sliding_window", "sink_window", "alibi", "softcap",
    "relative_bias", "document", "prefix_lm", "key_padding", "label_table", "neighborhood_2d",
    "criss_cross", "epipolar",
    # beyond softmax over keys
    "softmax_one", "sigmoid", "query_softmax", "reversed", "linear_elu", "lightning", "channel",
    # cascades and routing
    "differential", "moh", "topk_blocks", "permuted_blocks", "agent",
]

SOFTMAX_FAMILY = EXAMPLES[:15]

# Examples whose contract requires N == M.
SQUARE = {
    "sliding_window", "sink_window", "document", "prefix_lm", "neighborhood_2d", "criss_cross",
    "epipolar", "reversed", "channel", "topk_blocks", "permuted_blocks", "agent",
}

# Parameter overrides that keep the example non-trivial at a few dozen tokens.
SMALL_PARAMS = {
    "sliding_window": {"window": 8},
    "sink_window": {"window": 8, "sinks": 3},
    "softcap": {"cap": 1.5},
    "neighborhood_2d": {"kernel": 3, "dilation": 1},
    "topk_blocks": {"block": 8, "topk": 2},
    "permuted_blocks": {"block": 8},
    "agent": {"agents": 4},
}

# Examples for which `empty_rows=True` can force a query row without any allowed key.
EMPTY_ROW_EXAMPLES = {"key_padding", "label_table"}


def _grid(n, views=1):
    """A non-square height x width grid with views * height * width >= n (close to n)."""
    per_view = max(1, math.ceil(n / views))
    height = max(1, math.isqrt(per_view))
    width = math.ceil(per_view / height)
    return height, width


def _rotation(axis_angle):
    """Rotation matrix exp([w]_x) for an axis-angle vector w (float64, [3])."""
    wx, wy, wz = axis_angle.tolist()
    skew = torch.tensor([[0.0, -wz, wy], [wz, 0.0, -wx], [-wy, wx, 0.0]], dtype=torch.float64)
    return torch.linalg.matrix_exp(skew)


def _fundamental_matrices(B, views, height, width, stride, gen):
    """F[b, a, c] mapping a pixel of view a to its epipolar line in view c (zero for a == c).

    Cameras share pinhole intrinsics matched to the image and have small random rotations
    and unit-scale translations, so most lines cross the other image: a useful fraction of
    the cross-view pairs is allowed (roughly a quarter at tau = 4, stride = 8).
    """
    w_px, h_px = width * stride, height * stride
    f = max(w_px, h_px)
    K = torch.tensor([[f, 0.0, w_px / 2], [0.0, f, h_px / 2], [0.0, 0.0, 1.0]], dtype=torch.float64)
    K_inv = torch.linalg.inv(K)
    F = torch.zeros(B, views, views, 3, 3, dtype=torch.float64)
    for b in range(B):
        rots = [_rotation(0.2 * torch.randn(3, generator=gen, dtype=torch.float64))
                for _ in range(views)]
        trans = [torch.randn(3, generator=gen, dtype=torch.float64) for _ in range(views)]
        for a in range(views):
            for c in range(views):
                if a == c:
                    continue
                R = rots[c] @ rots[a].T  # camera a -> camera c
                t = trans[c] - R @ trans[a]
                t_x = torch.tensor([[0.0, -t[2], t[1]], [t[2], 0.0, -t[0]], [-t[1], t[0], 0.0]],
                                   dtype=torch.float64)
                Fac = K_inv.T @ t_x @ R @ K_inv
                F[b, a, c] = Fac / Fac.norm()
    return F


def make_inputs(name, *, B=2, H=4, G=None, N=37, M=None, D=16, E=12, dtype=torch.float64,
                seed=0, empty_rows=False, small_params=True):
    """Random inputs for example `name`, as keyword arguments.

    N is adjusted where the contract constrains it (grid examples: a height x width grid
    close to N; agent: a multiple of `agents`); M defaults to N and is forced to N where the
    contract needs N == M (passing a different M there raises). `empty_rows=True` (only for
    key_padding and label_table) makes batch 0 have query rows with no allowed key.
    `small_params=False` leaves every defaulted parameter at its contract default.
    """
    if name not in EXAMPLES:
        raise KeyError(f"unknown example {name!r}")
    if empty_rows and name not in EMPTY_ROW_EXAMPLES:
        raise ValueError(f"empty_rows is only supported for {sorted(EMPTY_ROW_EXAMPLES)}")
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=dtype)

    def randint(high, *shape):
        return torch.randint(high, shape, generator=gen)

    params = dict(SMALL_PARAMS.get(name, {})) if small_params else {}
    extra = {}

    # --- shapes fixed by the contract
    if name in ("neighborhood_2d", "criss_cross"):
        height, width = _grid(N)
        N = height * width
        params = {"height": height, "width": width, **params}
    elif name == "epipolar":
        views = 2
        height, width = _grid(N, views)
        N = views * height * width
        params = {"views": views, "height": height, "width": width, **params}
    elif name == "agent":
        agents = params.get("agents", 16)
        N = math.ceil(N / agents) * agents
    if name in SQUARE:
        if M is not None and M != N:
            raise ValueError(f"{name} needs N == M (got N={N}, M={M})")
        M = N
    M = N if M is None else M
    if G is None:
        G = H // 2 if name == "gqa_causal" else H
    if name == "channel":
        E = D  # the contract needs D == E

    q, k, v = randn(B, H, N, D), randn(B, G, M, D), randn(B, G, M, E)

    # --- extra inputs
    if name == "alibi":
        extra["slopes"] = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=dtype)
    elif name == "relative_bias":
        R = 5
        extra["table"] = randn(H, 2 * R + 1)
    elif name == "document":
        starts = torch.rand(B, N, generator=gen) < 0.15
        starts[:, 0] = True
        extra["doc"] = torch.cumsum(starts.long(), dim=1) - 1  # sorted segment ids from 0
    elif name == "prefix_lm":
        extra["prefix"] = randint(N + 1, B)
    elif name == "key_padding":
        valid = torch.rand(B, M, generator=gen) < 0.7
        valid[torch.arange(B), randint(M, B)] = True  # at least one valid key per batch
        if empty_rows:
            valid[0, :] = False
        extra["valid"] = valid
    elif name == "label_table":
        L = 3
        label_q, label_k = randint(L, B, N), randint(L, B, M)
        allow = torch.rand(L, L, generator=gen) < 0.5
        allow.fill_diagonal_(True)
        label_k[:, :L] = torch.arange(L)[: min(L, M)]  # every label has a key, so no empty row
        if empty_rows:
            allow[0, :] = False
            label_q[0, 0] = 0
        extra.update(label_q=label_q, label_k=label_k, allow=allow)
    elif name == "epipolar":
        extra["F"] = _fundamental_matrices(B, params["views"], params["height"], params["width"],
                                           params.get("stride", 8.0), gen).to(dtype)
    elif name == "reversed":
        extra["gate"] = rand(B, H, N)
    elif name == "lightning":
        extra["lam"] = 1.0 - 0.5 * rand(H)  # in (0.5, 1]
    elif name == "differential":
        extra.update(q2=randn(B, H, N, D), k2=randn(B, H, M, D))
    elif name == "moh":
        extra["router"] = randn(B, N, H)
    elif name == "permuted_blocks":
        extra["perm"] = torch.argsort(torch.rand(B, H, M, generator=gen), dim=-1)

    return {"q": q, "k": k, "v": v, **extra, **params}
