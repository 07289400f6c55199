"""The refresh's prototype selections: one problem per (class, level), shared out over the
ranks, each solved on the model's device, the picks gathered so that every rank holds them all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from detectron2.utils import comm
from torch import Tensor


def selection_shares(sizes: list[int], world_size: int) -> list[int]:
    """The rank that solves each selection problem: longest first to the least-loaded rank
    (cost ~ N^2: the density matrices), ties by problem order, then lowest rank.

    Args:
        sizes: N of each problem.

    Returns:
        the rank of each problem.
    """
    load = [0] * world_size
    owner = [0] * len(sizes)
    for p in sorted(range(len(sizes)), key=lambda p: (-sizes[p], p)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[p] = r
        load[r] += sizes[p] ** 2
    return owner


def select_bank(
    feats_s: list[Tensor],
    feats_t: list[Tensor],
    classes: Tensor,
    num_classes: int,
    select: Callable[[Tensor, Tensor], Tensor],
    device: torch.device | str = "cpu",
) -> list[list[Tensor]]:
    """Prototype picks of every (class, level), each problem solved by one rank on ``device``
    and the picks all-gathered, so that every rank holds the same picks (every rank calls it).

    Args:
        feats_s, feats_t: per level, (N, C_S) / (N, C_T) features of the whole sample.
        classes: (N,) int64 class of each instance.
        select: (feats_s, feats_t) of one class -> (m,) int64 picks among its rows.

    Returns:
        picks[c][level]: (m,) int64 CPU sample rows of the prototypes.
    """
    num_levels = len(feats_s)
    rows_of = [torch.nonzero(classes == c).flatten() for c in range(num_classes)]
    problems = [(c, lvl) for c in range(num_classes) for lvl in range(num_levels)]
    owner = selection_shares([len(rows_of[c]) for c, _ in problems], comm.get_world_size())
    mine = {}
    for p, (c, lvl) in enumerate(problems):
        if owner[p] != comm.get_rank():
            continue
        rows = rows_of[c]
        idx = select(feats_s[lvl][rows].to(device), feats_t[lvl][rows].to(device))
        mine[p] = rows[idx.cpu()]
    solved = {}
    for part in comm.all_gather(mine):
        solved.update(part)
    return [[solved[c * num_levels + lvl] for lvl in range(num_levels)] for c in range(num_classes)]


def paired_teacher_rows(
    teacher: list[Tensor], harvested: tuple[Tensor, list[Tensor], list[Tensor]]
) -> list[Tensor]:
    """The teacher's features of the sample for selection: per level (N, C_T), the harvested
    teacher rows (same training input as the student's) in place of the test pipeline's;
    ``teacher`` itself when no teacher row was harvested."""
    rows, _, harvested_teacher = harvested
    if not harvested_teacher:
        return teacher
    out = [t.clone() for t in teacher]
    for t, h in zip(out, harvested_teacher):
        t[rows] = h.to(t)
    return out
