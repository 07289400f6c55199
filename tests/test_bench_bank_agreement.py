"""The measures of benchmarks/bench_bank_agreement.py against hand-computed values (the run
itself needs the trained quick-start checkpoints)."""

import pytest
import torch

from benchmarks.bench_bank_agreement import pick_overlap, r_agreement, rank_correlation


def test_rank_correlation_by_hand():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rank_correlation(a, a * 10) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    # ranks (0, 1, 2, 3) against (1, 0, 2, 3): centred (-1.5, -0.5, 0.5, 1.5) and
    # (-0.5, -1.5, 0.5, 1.5): sum of products 0.75 + 0.75 + 0.25 + 2.25 = 4 over 5: 0.8
    assert rank_correlation(a, torch.tensor([0.2, 0.1, 0.3, 0.4])) == pytest.approx(0.8)
    assert rank_correlation(a[:1], a[:1]) is None


def test_pick_overlap_by_hand():
    # (L 2, K 2, M 3); -1 are empty slots; a repeated pick counts once
    full = torch.tensor([[[1, 2, 3], [4, 4, -1]], [[5, 6, -1], [-1, -1, -1]]])
    bank = torch.tensor([[[3, 2, 9], [7, -1, -1]], [[6, 5, 8], [1, -1, -1]]])
    out = pick_overlap(full, bank)
    # level 0: {1,2,3} & {2,3,9} = 2 of 3, {4} & {7} = 0 of 1: 2 / 4; level 1: 2 of 2, 0 of 0
    assert out["per_level"] == [0.5, 1.0]
    assert out["overall"] == pytest.approx(4 / 6)
    assert pick_overlap(full[:, 1:2, :0], bank[:, 1:2, :0])["overall"] is None


def test_r_agreement_by_size_group():
    # areas: small < 32^2 <= medium < 96^2 <= large
    full = {"r": torch.tensor([0.5, 0.6, 0.9, 0.8]), "area": torch.tensor([100.0, 500, 2000, 1e4])}
    bank = {"r": torch.tensor([0.4, 0.8, 0.9, 0.8])}
    out = r_agreement(full, bank, "r")
    assert out["all"]["boxes"] == 4
    assert out["all"]["mean_abs_delta_r"] == pytest.approx((0.1 + 0.2) / 4)
    assert out["all"]["max_abs_delta_r"] == pytest.approx(0.2)
    assert out["small"]["boxes"] == 2 and out["small"]["mean_r_bank"] == pytest.approx(0.6)
    assert out["small"]["spearman"] == pytest.approx(1.0)  # 0.5 < 0.6 and 0.4 < 0.8
    assert out["medium"]["boxes"] == 1 and out["medium"]["spearman"] is None
    assert out["large"]["mean_abs_delta_r"] == pytest.approx(0.0)
