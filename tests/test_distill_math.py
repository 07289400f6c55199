"""GKD's pure math: box-crop pooling, level rule, PGM selection, robustness weights."""

import math

import pytest
import torch
import torch.nn.functional as F

from gkd_d2.distill import (
    assign_levels,
    box_crop_mean,
    dense_candidates,
    density_scores,
    global_representation,
    joint_coefficients,
    joint_matching_pursuit,
    pool_at_levels,
    robustness_weights,
    select_prototypes,
)

# ---------------------------------------------------------------- pooling


def naive_crop_mean(features, boxes, batch_idx, stride):
    _, _, H, W = features.shape
    out = []
    for (x1, y1, x2, y2), b in zip(boxes.tolist(), batch_idx.tolist()):
        xs, ys = math.floor(abs(x1) / stride), math.floor(abs(y1) / stride)
        xe, ye = math.floor(abs(x2) / stride) + 1, math.floor(abs(y2) / stride) + 1
        xs, ys = min(xs, W - 1), min(ys, H - 1)
        xe, ye = max(min(xe, W), xs + 1), max(min(ye, H), ys + 1)
        out.append(features[b, :, ys:ye, xs:xe].mean(dim=(1, 2)))
    return torch.stack(out)


def test_box_crop_mean_equals_naive_loop_including_borders_and_tiny_boxes():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(3, 5, 10, 13, generator=g, dtype=torch.float64)
    stride = 8.0
    random_boxes = torch.rand(40, 4, generator=g, dtype=torch.float64) * torch.tensor(
        [104, 80, 104, 80]
    )
    random_boxes = torch.cat(
        [
            random_boxes[:, :2].minimum(random_boxes[:, 2:]),
            random_boxes[:, :2].maximum(random_boxes[:, 2:]),
        ],
        dim=1,
    )
    special = torch.tensor(
        [
            [0.0, 0.0, 103.9, 79.9],  # whole image
            [100.0, 76.0, 104.0, 80.0],  # bottom-right corner, end on the border
            [98.0, 70.0, 140.0, 120.0],  # past the border
            [3.0, 3.0, 4.0, 5.0],  # smaller than one cell
            [17.0, 33.0, 17.5, 33.2],  # smaller than one cell, inside a cell
            [200.0, 200.0, 210.0, 220.0],  # entirely outside: clamped onto the last cell
            [-3.0, -2.0, 9.0, 9.0],  # negative coordinates (abs, as official)
        ],
        dtype=torch.float64,
    )
    boxes = torch.cat([random_boxes, special])
    batch_idx = torch.randint(0, 3, (len(boxes),), generator=g)
    got = box_crop_mean(features, boxes, batch_idx, stride)
    want = naive_crop_mean(features, boxes, batch_idx, stride)
    assert got.shape == (len(boxes), 5)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # fp32 path, and the whole-image box is the global mean
    got32 = box_crop_mean(features.float(), boxes, batch_idx, stride)
    torch.testing.assert_close(got32, want.float(), rtol=1e-4, atol=1e-5)
    b = batch_idx[40]
    torch.testing.assert_close(got[40], features[b].mean(dim=(1, 2)))


def test_box_crop_mean_gradient_and_empty_input():
    features = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[0.0, 0.0, 9.0, 5.0], [4.0, 4.0, 15.0, 15.0]], dtype=torch.float64)
    idx = torch.zeros(2, dtype=torch.long)
    assert torch.autograd.gradcheck(lambda f: box_crop_mean(f, boxes, idx, 4.0), (features,))
    assert box_crop_mean(features, boxes[:0], idx[:0], 4.0).shape == (0, 2)


def test_assign_levels_hand_values():
    def box(side):
        return [0.0, 0.0, side, side]

    # sqrt((w+1)(h+1)) / 56: 101/56 -> 0; 112/56 = 2 -> 1; 224/56 = 4 -> 2; 448 -> 3; huge: clamp
    boxes = torch.tensor([box(100), box(110), box(111), box(223), box(447), box(5000), box(0)])
    assert assign_levels(boxes, 5).tolist() == [0, 0, 1, 2, 3, 4, 0]
    assert assign_levels(boxes, 3).tolist() == [0, 0, 1, 2, 2, 2, 0]


# ---------------------------------------------------------------- PGM


def test_density_scores_and_candidates_by_hand():
    angles = torch.tensor([0.0, 0.1, 0.2, math.pi / 2], dtype=torch.float64)
    x = torch.stack([angles.cos(), angles.sin()], dim=1)
    rho = density_scores(x, kernel=0.1)
    want = [
        sum(math.exp(-(((1 - math.cos(a - b)) / 0.1) ** 2)) for b in angles.tolist())
        for a in angles.tolist()
    ]
    torch.testing.assert_close(rho, torch.tensor(want, dtype=torch.float64))
    # sorted densities: index floor(0.4 * 4) = 1 is the bound; strictly above it in both spaces
    keep = dense_candidates(x, x, kernel=0.1, quantile=0.4)
    bound = sorted(want)[1]
    assert keep.tolist() == [w > bound for w in want]
    # a space where instance 1 is isolated removes it from the candidates
    y = x.clone()
    y[1] = torch.tensor([0.0, -1.0], dtype=torch.float64)
    assert not dense_candidates(x, y, 0.1, 0.4)[1]


def test_joint_coefficients_equal_least_squares():
    g = torch.Generator().manual_seed(1)
    C, N, alpha = 6, 9, 10.0
    gs = F.normalize(torch.randn(C, generator=g, dtype=torch.float64), dim=0)
    gt = F.normalize(torch.randn(C, generator=g, dtype=torch.float64), dim=0)
    rs = torch.randn(C, N, generator=g, dtype=torch.float64)
    rt = torch.randn(C, N, generator=g, dtype=torch.float64)
    ws, wt = joint_coefficients(gs @ rs, gt @ rt, alpha)
    a = math.sqrt(alpha)
    A = torch.zeros(2 * C + 1, 2, dtype=torch.float64)
    A[:C, 0], A[C : 2 * C, 1], A[-1] = gs, gt, torch.tensor([a, -a], dtype=torch.float64)
    for n in range(N):
        b = torch.cat([rs[:, n], rt[:, n], torch.zeros(1, dtype=torch.float64)])
        sol = torch.linalg.lstsq(A, b.unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(torch.stack([ws[n], wt[n]]), sol)


def brute_force_pursuit(xs, xt, candidates, num_atoms, alpha):
    """Reference: explicit residuals, each candidate's objective minimised by least squares."""
    rs, rt = xs.T.clone(), xt.T.clone()
    a = math.sqrt(alpha)
    C_s, C_t = xs.shape[1], xt.shape[1]
    picks = []
    for _ in range(num_atoms):
        best, best_j, best_w = None, None, None
        for k in candidates.tolist():
            A = torch.zeros(C_s + C_t + 1, 2, dtype=xs.dtype)
            A[:C_s, 0], A[C_s : C_s + C_t, 1] = xs[k], xt[k]
            A[-1] = torch.tensor([a, -a], dtype=xs.dtype)
            B = torch.cat([rs, rt, torch.zeros(1, rs.shape[1], dtype=xs.dtype)])
            w = torch.linalg.lstsq(A, B).solution  # (2, N)
            j = ((A @ w - B) ** 2).sum()
            if best is None or j < best:
                best, best_j, best_w = j, k, w
        picks.append(best_j)
        rs = rs - torch.outer(xs[best_j], best_w[0])
        rt = rt - torch.outer(xt[best_j], best_w[1])
    return picks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matching_pursuit_picks_equal_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    N, C_s, C_t = 25, 6, 8
    xs = F.normalize(torch.randn(N, C_s, generator=g, dtype=torch.float64), dim=1)
    xt = F.normalize(torch.randn(N, C_t, generator=g, dtype=torch.float64), dim=1)
    candidates = torch.randperm(N, generator=g)[:15].sort().values
    got = joint_matching_pursuit(xs, xt, candidates, num_atoms=6, alpha=10.0)
    assert got.tolist() == brute_force_pursuit(xs, xt, candidates, 6, 10.0)
    assert set(got.tolist()) <= set(candidates.tolist())
    # fp32 gives the same picks on this data
    assert (
        joint_matching_pursuit(xs.float(), xt.float(), candidates, 6, 10.0).tolist() == got.tolist()
    )


def test_exclude_picked_gives_distinct_atoms():
    g = torch.Generator().manual_seed(3)
    xs = F.normalize(torch.randn(12, 4, generator=g), dim=1)
    xt = F.normalize(torch.randn(12, 4, generator=g), dim=1)
    cand = torch.arange(5)
    picks = joint_matching_pursuit(xs, xt, cand, num_atoms=8, alpha=10.0, exclude_picked=True)
    assert sorted(picks.tolist()) == list(range(5))


def test_select_prototypes_fallbacks_and_errors():
    g = torch.Generator().manual_seed(4)
    few_s, few_t = torch.randn(7, 4, generator=g), torch.randn(7, 3, generator=g)
    assert select_prototypes(few_s, few_t, num_prototypes=10).tolist() == list(range(7))
    assert select_prototypes(few_s[:0], few_t[:0]).numel() == 0
    with pytest.raises(ValueError, match="different instances: 7 vs 6 rows"):
        select_prototypes(few_s, few_t[:6])
    many_s, many_t = torch.randn(60, 4, generator=g), torch.randn(60, 3, generator=g)
    picks = select_prototypes(many_s, many_t, num_prototypes=10)
    assert picks.shape == (10,) and picks.dtype == torch.long
    # candidates come from the density filter on the normalised features
    keep = dense_candidates(F.normalize(many_s, dim=1), F.normalize(many_t, dim=1))
    assert keep[picks].all()


# ---------------------------------------------------------------- RDM


def unit(deg):
    r = math.radians(deg)
    return [math.cos(r), math.sin(r)]


def test_global_representation_and_robustness_by_hand():
    # 2 classes; class 0 has 2 prototypes, class 1 has 1 (rows: c0, c0, c1)
    protos_s = torch.tensor([unit(0), unit(90), unit(180)]) * torch.tensor([[2.0], [0.5], [3.0]])
    protos_t = torch.tensor([unit(45), unit(135), unit(270)])
    starts = torch.tensor([0, 2, 3])
    feats_s = torch.tensor([unit(30), unit(200)]) * 4.0
    feats_t = torch.tensor([unit(45), unit(300)])
    classes = torch.tensor([0, 1])
    G = global_representation(feats_s, protos_s)
    want_G = [
        [math.cos(math.radians(30 - p)) for p in (0, 90, 180)],
        [math.cos(math.radians(200 - p)) for p in (0, 90, 180)],
    ]
    torch.testing.assert_close(G, torch.tensor(want_G))
    r = robustness_weights(feats_s, feats_t, protos_s, protos_t, classes, starts)
    # instance 0 (class 0): student best cos(30) vs teacher best cos(0) = 1
    # instance 1 (class 1): student cos(20) vs teacher cos(30)
    want = [
        1 - abs(math.cos(math.radians(30)) - 1.0),
        1 - abs(math.cos(math.radians(20)) - math.cos(math.radians(30))),
    ]
    torch.testing.assert_close(r, torch.tensor(want))
    assert not r.requires_grad


def test_robustness_clamp_and_class_without_prototypes():
    protos = torch.tensor([unit(0), unit(0)])
    starts = torch.tensor([0, 1, 1, 2])  # class 1 has no prototype
    feats_s = torch.tensor([unit(180), unit(10), unit(0)], requires_grad=True)
    feats_t = torch.tensor([unit(0), unit(50), unit(180)])
    classes = torch.tensor([0, 1, 2])
    r = robustness_weights(feats_s, feats_t, protos, protos, classes, starts)
    # |(-1) - 1| = 2 -> 1 - 2 = -1 -> clamped to 0; class 1 -> 1; class 2: |1 - (-1)| -> 0
    assert r.tolist() == [0.0, 1.0, 0.0]
    raw = robustness_weights(feats_s, feats_t, protos, protos, classes, starts, clamp=False)
    assert raw.tolist() == [-1.0, 1.0, -1.0]


def test_pool_at_levels_pools_each_instance_on_its_own_level():
    """Hand-made maps: level 0 (stride 4) holds 1 everywhere, level 1 (stride 8) holds the cell
    index; each box takes its own level's crop mean, and gradients reach only that level."""
    f0 = torch.ones(1, 1, 8, 8, requires_grad=True)
    f1 = torch.arange(16.0).reshape(1, 1, 4, 4).requires_grad_()
    boxes = torch.tensor([[0.0, 0.0, 7.0, 7.0], [0.0, 0.0, 15.0, 7.0], [8.0, 8.0, 15.0, 15.0]])
    idx = torch.zeros(3, dtype=torch.long)
    got = pool_at_levels([f0, f1], boxes, idx, [4, 8], torch.tensor([0, 1, 1]))
    # box 1 at stride 8: cells x 0..1, y 0 -> (0 + 1) / 2; box 2: cell (1, 1) -> 5
    assert got.flatten().tolist() == [1.0, 0.5, 5.0]
    got.sum().backward()
    assert f0.grad.sum().item() == pytest.approx(1.0)
    assert f1.grad.sum().item() == pytest.approx(2.0)
    assert pool_at_levels([f0, f1], boxes[:0], idx[:0], [4, 8], idx[:0]).shape == (0, 1)
