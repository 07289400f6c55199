"""GKD's loss terms: foreground masks, decoupled imitation, soft labels, global alignment."""

import math

import pytest
import torch

from gkd_d2.distill import (
    decoupled_imitation_losses,
    foreground_mask,
    global_alignment_loss,
    linear_attenuation,
    soft_label_kl,
)


def test_foreground_mask_by_hand():
    boxes = torch.tensor(
        [
            [8.0, 8.0, 24.0, 16.0],  # cells y [1, 2), x [1, 3)
            [
                16.0,
                0.0,
                40.0,
                12.0,
            ],  # y [0, 1), x [2, 5): overlaps nothing above... x up to 5 > W=4 -> 4
            [20.0, 20.0, 22.0, 30.0],  # x range empty (floor(22/8)=2 = xs): single cell (2, 2)
            [0.0, 0.0, 16.0, 8.0],  # image 1: y [0, 1), x [0, 2)
            [8.0, 8.0, 24.0, 16.0],  # image 0 again, larger weight on the same cells: max wins
        ]
    )
    batch_idx = torch.tensor([0, 0, 0, 1, 0])
    weights = torch.tensor([0.5, 0.25, 0.75, 1.0, 0.6])
    mask, covered = foreground_mask(boxes, batch_idx, weights, stride=8.0, shape=(2, 3, 4))
    want = torch.zeros(2, 3, 4)
    want[0, 1, 1:3] = 0.6
    want[0, 0, 2:4] = 0.25
    want[0, 2, 2] = 0.75
    want[1, 0, 0:2] = 1.0
    torch.testing.assert_close(mask, want)
    assert torch.equal(covered, want > 0)
    # order-independent (max), unlike the official overwrite
    perm = torch.tensor([4, 2, 0, 3, 1])
    mask_p, covered_p = foreground_mask(boxes[perm], batch_idx[perm], weights[perm], 8.0, (2, 3, 4))
    torch.testing.assert_close(mask_p, want)
    assert torch.equal(covered_p, covered)
    empty, empty_covered = foreground_mask(boxes[:0], batch_idx[:0], weights[:0], 8.0, (2, 3, 4))
    assert empty.abs().sum() == 0 and not empty_covered.any()
    assert empty_covered.shape == (2, 3, 4) and empty_covered.dtype == torch.bool


def test_an_instance_with_r_zero_stays_foreground():
    """r = 0 gives weight 0 in the fg term, and its cells are never background (the official
    rule, foreground = mask > 0, would imitate them as background with weight 4)."""
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [16.0, 16.0, 32.0, 24.0]])  # cells 2x2, 1x2
    mask, covered = foreground_mask(
        boxes, torch.tensor([0, 0]), torch.tensor([0.0, 0.5]), 8.0, (1, 4, 4)
    )
    want_covered = torch.zeros(1, 4, 4, dtype=torch.bool)
    want_covered[0, 0:2, 0:2] = True
    want_covered[0, 2, 2:4] = True
    assert torch.equal(covered, want_covered)
    assert mask[0, 0:2, 0:2].abs().sum() == 0 and torch.all(mask[0, 2, 2:4] == 0.5)
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(1, 2, 4, 4, generator=g), torch.randn(1, 2, 4, 4, generator=g)
    fg, bg, fg_unit = decoupled_imitation_losses(s, t, mask, covered)
    d = ((s - t) ** 2).sum(dim=1)[0]
    torch.testing.assert_close(fg, (d[2, 2:4] * 0.5).sum() / (2 * 2 * 1.0))
    # weight 1 on all 6 covered cells, the r = 0 ones included
    torch.testing.assert_close(fg_unit, d[want_covered[0]].sum() / (2 * 2 * 6))
    bg_cells = ~want_covered[0]
    torch.testing.assert_close(bg, d[bg_cells].sum() / (2 * 2 * bg_cells.sum()))
    # the official rule differs exactly there: the r = 0 cells join the background
    _, bg_official, _ = decoupled_imitation_losses(s, t, mask)
    torch.testing.assert_close(bg_official, d[mask[0] <= 0].sum() / (2 * 2 * 14))


def test_decoupled_losses_by_hand_and_zero_when_equal():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 4, 5, generator=g)
    s = torch.randn(2, 3, 4, 5, generator=g)
    mask = torch.zeros(2, 4, 5)
    mask[0, 1:3, 2:4] = 0.5
    mask[1, 0, 0] = 1.0
    fg, bg, fg_unit = decoupled_imitation_losses(s, t, mask)
    d = (s - t) ** 2
    want_fg = (d * mask[:, None]).sum() / (2 * 3 * mask.sum())
    bgm = (mask <= 0).float()
    want_bg = (d * bgm[:, None]).sum() / (2 * 3 * bgm.sum())
    torch.testing.assert_close(fg, want_fg)
    torch.testing.assert_close(bg, want_bg)
    fgm = (mask > 0).float()
    torch.testing.assert_close(fg_unit, (d * fgm[:, None]).sum() / (2 * 3 * fgm.sum()))
    fg0, bg0, _ = decoupled_imitation_losses(t.clone(), t, mask)
    assert fg0.item() == 0.0 and bg0.item() == 0.0
    # empty foreground: normaliser max(1, .) keeps it finite
    fg_empty, _, _ = decoupled_imitation_losses(s, t, torch.zeros(2, 4, 5))
    assert fg_empty.item() == 0.0


def test_soft_label_kl_by_hand_and_zero_when_equal():
    zs = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]], requires_grad=True)
    zt = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    w = torch.tensor([1.0, 0.5])
    T = 2.0
    got = soft_label_kl(zs, zt, w, T)
    total = 0.0
    for n in range(2):
        ps = torch.softmax(zs[n].detach() / T, 0).tolist()
        pt = torch.softmax(zt[n] / T, 0).tolist()
        kl = sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt)) / 3
        total += w[n].item() * T * T * kl
    assert got.item() == pytest.approx(total / 2, rel=1e-6)
    got.backward()
    assert zs.grad.abs().sum() > 0
    assert soft_label_kl(zt.clone(), zt, w).item() == pytest.approx(0.0, abs=1e-7)
    empty = torch.zeros(0, 3, requires_grad=True)
    assert soft_label_kl(empty, empty.detach(), torch.zeros(0)).item() == 0.0
    with pytest.raises(ValueError, match=r"do not align"):
        soft_label_kl(zs, zt, torch.ones(3))


def test_sigmoid_soft_labels_by_hand_and_alive_for_one_class():
    """K = 1: the softmax form is identically 0 (one logit), the sigmoid form is the binary KL
    of sigmoid(z_T / T) from sigmoid(z_S / T), times T^2, mean over classes, weighted mean."""
    T = 2.0
    zs = torch.tensor([[1.0], [-3.0], [0.5]], requires_grad=True)
    zt = torch.tensor([[-1.0], [2.0], [0.5]])
    w = torch.tensor([1.0, 0.5, 1.0])
    assert soft_label_kl(zs, zt, w, T).item() == 0.0  # what K = 1 silently gave before
    got = soft_label_kl(zs, zt, w, T, form="sigmoid")
    total = 0.0
    for n in range(3):
        p = 1 / (1 + math.exp(-zs[n, 0].item() / T))
        q = 1 / (1 + math.exp(-zt[n, 0].item() / T))
        kl = q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))
        total += w[n].item() * T * T * kl
    assert got.item() == pytest.approx(total / 3, rel=1e-6)
    assert got.item() > 0.1
    got.backward()
    assert zs.grad[0, 0] > 0 and zs.grad[1, 0] < 0  # pulled towards the teacher
    assert zs.grad[2, 0].abs() < 1e-7  # equal logits: no pull
    # several classes: the mean over the per-class binary KLs; equal logits give 0
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    per_class = [
        soft_label_kl(a[:, c : c + 1], b[:, c : c + 1], torch.ones(4), T, "sigmoid")
        for c in range(3)
    ]
    torch.testing.assert_close(soft_label_kl(a, b, torch.ones(4), T, "sigmoid"), sum(per_class) / 3)
    assert soft_label_kl(b.clone(), b, torch.ones(4), T, "sigmoid").abs().item() < 1e-6
    # stable for large logits
    big = torch.tensor([[80.0], [-80.0]])
    assert torch.isfinite(soft_label_kl(-big, big, torch.ones(2), T, "sigmoid"))
    with pytest.raises(ValueError, match="form must be one of"):
        soft_label_kl(zs, zt, w, T, form="softmx")


def test_soft_label_kl_batch_equals_per_image_combination():
    # rows of two images concatenated: the loss is the row-weighted mean of per-image losses
    g = torch.Generator().manual_seed(2)
    zs, zt = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    w = torch.rand(7, generator=g)
    a, b = soft_label_kl(zs[:3], zt[:3], w[:3]), soft_label_kl(zs[3:], zt[3:], w[3:])
    torch.testing.assert_close(soft_label_kl(zs, zt, w), (3 * a + 4 * b) / 7)


def test_global_alignment_loss():
    gs = torch.tensor([[0.5, 0.0], [1.0, -1.0]])
    gt = torch.tensor([[0.0, 0.0], [-2.0, -1.0]])
    r = torch.tensor([1.0, 0.5])
    # diffs: 0.5, 0, 1.5, 0 -> smooth L1: 0.125, 0, 1.0, 0 -> mean 0.28125
    assert global_alignment_loss(gs, gt, r).item() == pytest.approx(0.28125)
    assert global_alignment_loss(gs, gs, r).item() == 0.0
    assert global_alignment_loss(gs[:0], gt[:0], r[:0]).item() == 0.0


def test_linear_attenuation():
    got = [linear_attenuation(e, 24) for e in (0, 12, 23, 30)]
    assert got == pytest.approx([1.0, 0.5, 1 / 24, 0.0])


def _overlap_scene():
    """Four boxes on one 4 x 4 level of stride 8, in row order, with their cells:
    A (r 0.9) rows 0-1, cols 0-2; B (r 0.2) rows 1-2, cols 1-3 (overlaps A on (1, 1), (1, 2));
    C (r 0.5) degenerate (zero height) at cell (1, 1); D (r 0.7) rows 2-3, cols 0-1,
    overlapping B on (2, 1)."""
    boxes = torch.tensor(
        [
            [0.0, 0.0, 24.0, 16.0],
            [8.0, 8.0, 32.0, 24.0],
            [8.0, 8.0, 16.0, 8.0],
            [0.0, 16.0, 16.0, 32.0],
        ]
    )
    return boxes, torch.zeros(4, dtype=torch.long), torch.tensor([0.9, 0.2, 0.5, 0.7])


def test_foreground_mask_overlap_max_by_hand():
    boxes, batch_idx, r = _overlap_scene()
    mask, covered = foreground_mask(boxes, batch_idx, r, 8.0, (1, 4, 4), "max")
    want = torch.tensor(
        [
            [0.9, 0.9, 0.9, 0.0],
            [0.9, 0.9, 0.9, 0.2],
            [0.7, 0.7, 0.2, 0.2],
            [0.7, 0.7, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(mask[0], want)
    assert torch.equal(covered[0], want > 0)


def test_foreground_mask_overlap_last_is_the_official_loop_by_hand():
    boxes, batch_idx, r = _overlap_scene()
    mask, covered = foreground_mask(boxes, batch_idx, r, 8.0, (1, 4, 4), "last")
    # written in row order: B overwrites A on (1, 1) and (1, 2); C (degenerate) raises (1, 1)
    # to max(0.2, 0.5); D overwrites B on (2, 1)
    want = torch.tensor(
        [
            [0.9, 0.9, 0.9, 0.0],
            [0.9, 0.5, 0.2, 0.2],
            [0.7, 0.7, 0.2, 0.2],
            [0.7, 0.7, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(mask[0], want)
    assert torch.equal(covered[0], want > 0)
    # the official loop itself, written out, on the same boxes
    official = torch.zeros(4, 4)
    for (x1, y1, x2, y2), w in zip((boxes / 8).floor().long().tolist(), r.tolist()):
        x2, y2 = min(x2, 4), min(y2, 4)
        if x2 <= x1 or y2 <= y1:
            official[y1, x1] = max(official[y1, x1].item(), w)
        else:
            official[y1:y2, x1:x2] = w
    torch.testing.assert_close(mask[0], official)
    # order matters under "last": B last makes it win on the overlaps with A and D; a
    # degenerate box before its overwriter loses
    order = torch.tensor([2, 0, 3, 1])
    mask_b_last, _ = foreground_mask(boxes[order], batch_idx, r[order], 8.0, (1, 4, 4), "last")
    assert mask_b_last[0, 1, 1] == 0.2 and mask_b_last[0, 1, 2] == 0.2
    assert mask_b_last[0, 2, 1] == 0.2 and mask_b_last[0, 0, 0] == 0.9


def test_foreground_mask_overlap_rules_agree_without_overlap_and_per_image():
    g = torch.Generator().manual_seed(3)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 32.0, 32.0], [16.0, 16.0, 32.0, 32.0]])
    batch_idx = torch.tensor([0, 1, 0])  # the second box is alone in image 1
    r = torch.rand(3, generator=g)
    a, ca = foreground_mask(boxes, batch_idx, r, 8.0, (2, 4, 4), "max")
    b, cb = foreground_mask(boxes, batch_idx, r, 8.0, (2, 4, 4), "last")
    torch.testing.assert_close(a, b)
    assert torch.equal(ca, cb)
    # binary weights (local-only KD): the rules agree whatever overlaps
    boxes3, batch3, _ = _overlap_scene()
    ones = torch.ones(4)
    torch.testing.assert_close(
        foreground_mask(boxes3, batch3, ones, 8.0, (1, 4, 4), "max")[0],
        foreground_mask(boxes3, batch3, ones, 8.0, (1, 4, 4), "last")[0],
    )
    with pytest.raises(ValueError, match="overlap must be one of"):
        foreground_mask(boxes3, batch3, ones, 8.0, (1, 4, 4), "first")
