"""Depth masks: which residual blocks run at a scaling factor.

Pure functions, unit-testable without a model (the timm ``drop_path()`` habit).
A backbone is a list of stages; stage j has ``n_j`` blocks. Block 0 of a stage may change shape
and always runs; the others are skippable. At scaling factor s stage j keeps

    k_j(s) = max(1, floor(s * n_j + 0.5))        (round half up)

blocks: the first k_j (``keep="prefix"``) or k_j evenly spaced ones that include block 0
(``keep="spread"``, LayerDrop-style). Masks are nested: a block kept at s is kept at every s' > s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from dist_coop.choices import KEEP_MODES

Mask = tuple[tuple[bool, ...], ...]  # one tuple of bools per stage


def num_kept(num_blocks: int, s: float) -> int:
    """k(s) = max(1, floor(s * n + 0.5)), with a small epsilon against float noise (0.5*3=1.5)."""
    if not 0.0 < s <= 1.0:
        raise ValueError(f"scaling factor must be in (0, 1], got {s}")
    return max(1, min(num_blocks, math.floor(s * num_blocks + 0.5 + 1e-9)))


def _spread_indices(num_blocks: int, k: int) -> list[int]:
    """k spread-out block indices of [0, n), block 0 always among them.

    Blocks are ranked once (farthest-point order: 0, then repeatedly the block farthest from all
    ranked ones, lowest index on ties) and the first k are kept, so masks are nested by
    construction: n=5 gives order 0, 4, 2, 1, 3 -> k=2 keeps {0, 4}, k=3 keeps {0, 2, 4}.
    """
    order = [0]
    while len(order) < num_blocks:
        rest = [i for i in range(num_blocks) if i not in order]
        order.append(max(rest, key=lambda i: (min(abs(i - c) for c in order), -i)))
    return sorted(order[:k])


def active_blocks(stage_sizes: Sequence[int], s: float, keep: str = "prefix") -> Mask:
    """The 0/1 depth mask of scaling factor ``s`` for stages of ``stage_sizes`` blocks."""
    if keep not in KEEP_MODES:
        raise ValueError(f"keep must be one of {list(KEEP_MODES)}, got {keep!r}")
    if not stage_sizes or any(n < 1 for n in stage_sizes):
        raise ValueError(f"every stage needs at least one block, got stage sizes {list(stage_sizes)}")
    mask = []
    for n in stage_sizes:
        k = num_kept(n, s)
        kept = set(range(k)) if keep == "prefix" else set(_spread_indices(n, k))
        mask.append(tuple(i in kept for i in range(n)))
    return tuple(mask)


def depth_masks(stage_sizes: Sequence[int], factors: Sequence[float], keep: str = "prefix") -> dict[float, Mask]:
    """Masks for every factor; two factors giving the same mask are refused (they would be one depth)."""
    if not factors:
        raise ValueError("scaling_factors must not be empty")
    if len(set(factors)) != len(factors):
        raise ValueError(f"scaling_factors has duplicates: {list(factors)}")
    masks: dict[float, Mask] = {}
    for s in sorted(factors):
        m = active_blocks(stage_sizes, s, keep)
        for prev_s, prev_m in masks.items():
            if prev_m == m:
                counts = [sum(stage) for stage in m]
                raise ValueError(
                    f"scaling factors {prev_s} and {s} give the same depth mask on stage sizes "
                    f"{list(stage_sizes)} (blocks kept per stage: {counts}); drop one of them or "
                    "use a deeper backbone"
                )
        masks[s] = m
    return masks


def mask_blocks(mask: Mask) -> int:
    """Number of blocks that run under ``mask``."""
    return sum(sum(stage) for stage in mask)


def branch_starts(masks: dict[float, Mask], depths: Sequence[float]) -> dict[float, int]:
    """Where each depth's own computation starts when what several depths compute alike is computed once.

    Blocks are numbered p = 0, 1, ... stage by stage. Depths that have run the same blocks so far
    hold the same activation (with shared BN affine, in training mode). At block p a group of such
    depths splits into those that run it and those that skip it; a depth left alone starts its own
    computation at p (running the blocks its mask keeps from p on). Every block a group of two or
    more depths runs is computed once for all of them. With ``keep: prefix`` and resnet32's 1/3/4/5
    blocks per stage, stage 1 is computed as blocks 0-3 once plus block 4 for the full depth: 5
    block runs instead of 13. One depth alone shares nothing: it starts at -1, before the stem.
    """
    flat = {s: [kept for stage in masks[s] for kept in stage] for s in depths}
    if len(depths) < 2:
        return dict.fromkeys(depths, -1)
    starts: dict[float, int] = {}
    groups = [list(depths)]
    for p in range(len(flat[depths[0]])):
        next_groups = []
        for group in groups:
            for part in ([s for s in group if flat[s][p]], [s for s in group if not flat[s][p]]):
                if len(part) == 1:
                    starts[part[0]] = p
                elif part:
                    next_groups.append(part)
        groups = next_groups
    if groups:  # depth_masks refuses two factors with one mask
        raise ValueError(f"depths {groups[0]} have the same depth mask")
    return starts
