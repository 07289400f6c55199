"""GKDDistiller: the prototype bank and the combined losses."""

import pytest
import torch
from conftest import identity_adapters

from gkd_d2.distill import box_crop_mean, soft_label_kl
from gkd_d2.modeling import GKDDistiller


def make_distiller(**kw):
    args = dict(
        strides=[8, 16],
        student_channels=4,
        teacher_channels=4,
        num_classes=3,
        num_prototypes=2,
        global_weight=5.0,
    )
    args.update(kw)
    return GKDDistiller(**args)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 4, 4, generator=g)]
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [30.0, 8.0, 60.0, 40.0], [8.0, 8.0, 16.0, 30.0]])
    return feats, boxes, torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1]), torch.tensor([0, 1, 0])


def test_bank_round_trip_and_blocks():
    d = make_distiller()
    d.set_bank(0, 0, torch.ones(2, 4), 2 * torch.ones(2, 4))
    d.set_bank(0, 2, 3 * torch.ones(1, 4), 4 * torch.ones(1, 4))
    ps, pt, starts = d.bank(0)
    assert starts.tolist() == [0, 2, 2, 3]
    assert ps[:, 0].tolist() == [1.0, 1.0, 3.0] and pt[:, 0].tolist() == [2.0, 2.0, 4.0]
    assert d.bank(1)[0].shape == (0, 4)
    d.set_bank(0, 0, 5 * torch.ones(1, 4), 6 * torch.ones(1, 4))  # fewer than before: no stale row
    assert d.bank(0)[2].tolist() == [0, 1, 1, 2] and d.protos_s[0, 0, 1].abs().sum() == 0
    state = d.state_dict()
    other = make_distiller()
    other.load_state_dict(state)
    assert torch.equal(other.bank(0)[0], d.bank(0)[0])


def test_all_losses_zero_when_student_equals_teacher():
    d = make_distiller()
    identity_adapters(d)
    feats, boxes, bidx, classes, levels = batch()
    for lvl in range(2):  # equal models have equal prototypes
        for c in range(3):
            protos = torch.randn(2, 4)
            d.set_bank(lvl, c, protos, protos.clone())
    logits = torch.randn(3, 3)
    losses, stats = d(feats, feats, boxes, bidx, classes, levels, logits, logits.clone())
    assert set(losses) == {"loss_gkd_fg", "loss_gkd_bg", "loss_gkd_soft", "loss_gkd_global"}
    for k, v in losses.items():
        assert abs(v.item()) < 1e-6, k
    assert stats["gkd/r_min"] == stats["gkd/r_mean"] == 1.0  # nothing to distrust


def test_losses_positive_and_soft_term_uses_r_weights():
    d = make_distiller(global_weight=0.0)
    feats, boxes, bidx, classes, levels = batch()
    teacher = [f + 0.5 for f in feats]
    for lvl in range(2):
        for c in range(3):
            d.set_bank(lvl, c, torch.randn(2, 4), torch.randn(2, 4))
    zs, zt = torch.randn(3, 3), torch.randn(3, 3)
    losses, _ = d(feats, teacher, boxes, bidx, classes, levels, zs, zt, attenuation=0.5)
    assert "loss_gkd_global" not in losses
    assert losses["loss_gkd_fg"] > 0 and losses["loss_gkd_bg"] > 0
    # r at each instance's own level, as the distiller computes it, weights the KL
    from gkd_d2.distill import box_crop_mean, robustness_weights

    r_levels = []
    for lvl, stride in enumerate([8, 16]):
        ps, pt, starts = d.bank(lvl)
        s_feat = box_crop_mean(feats[lvl], boxes, bidx, stride)
        t_feat = box_crop_mean(teacher[lvl], boxes, bidx, stride)
        r_levels.append(robustness_weights(s_feat, t_feat, ps, pt, classes, starts))
    r = torch.stack(r_levels)[levels, torch.arange(3)]
    assert (r < 1).any()  # a real weighting, not all ones
    torch.testing.assert_close(losses["loss_gkd_soft"], soft_label_kl(zs, zt, r, 2.0))
    # the local-only baseline: unweighted soft labels
    base = make_distiller(global_weight=0.0, robust=False)
    base.load_state_dict(d.state_dict())
    losses_b, _ = base(feats, teacher, boxes, bidx, classes, levels, zs, zt)
    torch.testing.assert_close(losses_b["loss_gkd_soft"], soft_label_kl(zs, zt, torch.ones(3), 2.0))


def test_soft_label_r_from_roi_descriptors_by_hand():
    """Faster R-CNN's soft-label r: from given (RoI-pooled) descriptors at given levels, against
    the prototypes of the instance's class at that level; the KL weighted by it, by hand."""
    import torch.nn.functional as F

    d = make_distiller(global_weight=0.0)
    g = torch.Generator().manual_seed(3)
    for lvl in range(2):
        for c in range(2):  # class 2 has no prototypes: r = 1
            d.set_bank(lvl, c, torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g))
    feats, boxes, bidx, _, levels = batch()
    classes = torch.tensor([0, 1, 2])
    s_desc, t_desc = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    soft_levels = torch.tensor([1, 0, 1])
    zs, zt = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    teacher = [f + 0.5 for f in feats]
    losses, stats = d(
        feats,
        teacher,
        boxes,
        bidx,
        classes,
        levels,
        zs,
        zt,
        soft_descriptors=(s_desc, t_desc, soft_levels),
    )
    r = []
    for n in range(3):
        lvl, c = int(soft_levels[n]), int(classes[n])
        if c == 2:
            r.append(1.0)
            continue
        cs = max(float(F.cosine_similarity(s_desc[n], p, dim=0)) for p in d.protos_s[lvl, c])
        ct = max(float(F.cosine_similarity(t_desc[n], p, dim=0)) for p in d.protos_t[lvl, c])
        r.append(min(max(1.0 - abs(cs - ct), 0.0), 1.0))
    assert min(r) < 0.99  # a real weighting
    kl = []
    for n in range(3):
        p_t = torch.softmax(zt[n] / 2, dim=0)
        log_p_s = torch.log_softmax(zs[n] / 2, dim=0)
        kl.append(float((p_t * (p_t.log() - log_p_s)).sum()) / 5 * 4)  # mean over 5 classes, T^2
    expected = sum(rn * kn for rn, kn in zip(r, kl)) / 3
    assert abs(losses["loss_gkd_soft"].item() - expected) < 1e-5
    assert abs(stats["gkd/r_soft_mean"] - sum(r) / 3) < 1e-6
    # the fg mask still uses the box-crop r at the instance's own level
    crop_r = d.robustness_at(
        torch.stack(
            [
                box_crop_mean(feats[int(lv)], boxes[i : i + 1], bidx[i : i + 1], [8, 16][int(lv)])[
                    0
                ]
                for i, lv in enumerate(levels)
            ]
        ),
        torch.stack(
            [
                box_crop_mean(
                    teacher[int(lv)], boxes[i : i + 1], bidx[i : i + 1], [8, 16][int(lv)]
                )[0]
                for i, lv in enumerate(levels)
            ]
        ),
        classes,
        levels,
    )
    assert abs(stats["gkd/r_mean"] - float(crop_r.mean())) < 1e-6


def test_zero_weight_terms_are_not_computed_and_extra_weights_must_match():
    d = make_distiller(global_weight=0.0, bg_weight=0.0, soft_weight=0.0)
    feats, boxes, bidx, classes, levels = batch()
    losses, _ = d(feats, feats, boxes, bidx, classes, levels, torch.zeros(3, 3), torch.zeros(3, 3))
    assert set(losses) == {"loss_gkd_fg"}
    import pytest

    with pytest.raises(ValueError, match="1 extra terms, 2 weights"):
        make_distiller(extra_terms=torch.nn.ModuleList([torch.nn.Identity()]), extra_weights=[1, 2])


def test_adapter_kernel_option():
    import pytest

    d = make_distiller(adapter_kernel=1)
    assert d.adapters[0].weight.shape == (4, 4, 1, 1)
    feats, boxes, bidx, classes, levels = batch()
    losses, _ = d(feats, feats, boxes, bidx, classes, levels, torch.zeros(3, 3), torch.zeros(3, 3))
    assert losses["loss_gkd_bg"] > 0  # maps of the right size reach the losses
    assert make_distiller().adapters[0].weight.shape == (4, 4, 3, 3)  # official default
    with pytest.raises(ValueError, match="ADAPTER_KERNEL must be 1 or 3, not 5"):
        make_distiller(adapter_kernel=5)


def test_losses_are_fp32_under_autocast_and_half_inputs():
    """AMP: bf16 maps and logits under CPU autocast still give fp32 losses equal (to bf16
    rounding of the inputs) to the fp32 computation on the same rounded inputs."""
    d = make_distiller()
    for lvl in range(2):
        for c in range(3):
            d.set_bank(lvl, c, torch.rand(2, 4), torch.rand(2, 4))
    feats, boxes, bidx, classes, levels = batch()
    half = [f.bfloat16() for f in feats]
    teacher = [(f + 0.5).bfloat16() for f in feats]
    zs, zt = torch.randn(3, 3).bfloat16(), torch.randn(3, 3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, _ = d(half, teacher, boxes, bidx, classes, levels, zs, zt)
    reference, _ = d(
        [f.float() for f in half],
        [f.float() for f in teacher],
        boxes,
        bidx,
        classes,
        levels,
        zs.float(),
        zt.float(),
    )
    for k, v in losses.items():
        assert v.dtype == torch.float32, k
        torch.testing.assert_close(v, reference[k])


def test_shuffled_r_control_permutes_the_weights_and_resumes(monkeypatch):
    """SHUFFLE_R: the fg mask and the soft labels get r's own values in a seeded random order
    (same distribution, no per-instance information); r's statistics are r's; the draw
    advances with a counter in the state dict, so a resumed distiller draws the same."""
    import gkd_d2.modeling.distiller as distiller_module

    seen = []
    mask = distiller_module.foreground_mask

    def spy(boxes, batch_idx, weights, *args):
        seen.append(weights.clone())
        return mask(boxes, batch_idx, weights, *args)

    monkeypatch.setattr(distiller_module, "foreground_mask", spy)
    torch.manual_seed(0)
    feats, boxes, bidx, classes, levels = batch()
    # 7 instances, all on level 0, so the mask sees every weight in instance order
    boxes = torch.cat([boxes, boxes + 2.0, boxes[:1] + 4.0])
    bidx, classes = torch.cat([bidx, bidx, bidx[:1]]), torch.cat([classes, classes, classes[:1]])
    levels = torch.zeros(7, dtype=torch.long)
    teacher = [f + 0.3 * torch.randn_like(f) for f in feats]
    plain = make_distiller(global_weight=0.0)
    shuffled = make_distiller(global_weight=0.0, shuffle_r=True, shuffle_seed=5)
    for d in (plain, shuffled):
        for c in range(3):
            d.set_bank(0, c, torch.randn(2, 4), torch.randn(2, 4))
    # the same adapters and bank
    shuffled.load_state_dict({**plain.state_dict(), "shuffle_calls": torch.tensor(0)})
    zs, zt = torch.randn(7, 3), torch.randn(7, 3)
    _, stats = plain(feats, teacher, boxes, bidx, classes, levels, zs, zt)
    r = seen[0]  # level 0's mask weights = r (unshuffled)
    assert len(set(r.tolist())) > 3  # distinct values, so a permutation shows
    losses_a, stats_a = shuffled(feats, teacher, boxes, bidx, classes, levels, zs, zt)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(5 + 0))
    assert torch.equal(seen[2], r[perm]) and not torch.equal(seen[2], r)
    # r's statistics describe r itself; the effects describe the weights that were applied
    effects = {"gkd/r_effect_fg", "gkd/r_effect_soft"}
    assert effects <= set(stats) and effects <= set(stats_a)
    assert {k: v for k, v in stats_a.items() if k not in effects} == {
        k: v for k, v in stats.items() if k not in effects
    }
    assert stats_a["gkd/r_effect_soft"] != stats["gkd/r_effect_soft"]
    # soft labels weighted by the same permuted r
    want = soft_label_kl(zs, zt, r[perm], shuffled.temperature, shuffled.soft_label)
    assert torch.allclose(losses_a["loss_gkd_soft"], want)
    # the next call draws the next permutation; a copy from the state dict draws it too
    resumed = make_distiller(global_weight=0.0, shuffle_r=True, shuffle_seed=5)
    resumed.load_state_dict(shuffled.state_dict())
    assert int(resumed.shuffle_calls) == 1
    b1, _ = shuffled(feats, teacher, boxes, bidx, classes, levels, zs, zt)
    b2, _ = resumed(feats, teacher, boxes, bidx, classes, levels, zs, zt)
    assert all(torch.equal(b1[k], b2[k]) for k in b1)
    perm1 = torch.randperm(7, generator=torch.Generator().manual_seed(5 + 1))
    assert torch.equal(seen[4], r[perm1])


def test_shuffled_r_needs_robust_weights_without_global_loss():
    import pytest

    for kw in ({"robust": False, "global_weight": 0.0}, {"global_weight": 5.0}):
        with pytest.raises(ValueError, match="SHUFFLE_R is the control of GKD's r weights"):
            make_distiller(shuffle_r=True, **kw)
    # the state dict of the default distiller is unchanged (no counter)
    assert "shuffle_calls" not in make_distiller().state_dict()


def test_shuffled_r_from_the_config():
    from gkd_d2 import load_config

    cfg = load_config(opts=["MODEL.GKD.SHUFFLE_R", "True", "MODEL.GKD.SAMPLE_SEED", "7"])
    d = GKDDistiller.from_config(cfg, [8, 16], 4, 4, 3, "sum", "softmax", 1.0)
    assert d.shuffle_r and d.shuffle_seed == 7 and int(d.shuffle_calls) == 0


def test_logged_effects_sizes_and_instance_record_by_hand():
    """What the distiller logs of r, checked by hand: r by COCO size group of the matched
    ground truth, the fg and soft terms with r divided by the same terms with weight 1; and
    the record of what each instance got (the tool's 'r that trained')."""
    from gkd_d2.distill import decoupled_imitation_losses, foreground_mask

    d = make_distiller(global_weight=0.0)
    identity_adapters(d)
    feats, boxes, bidx, classes, levels = batch()
    teacher = [f + 0.3 * torch.randn_like(f) for f in feats]
    torch.manual_seed(0)
    for lvl in range(2):
        for c in range(3):
            d.set_bank(lvl, c, torch.randn(2, 4), torch.randn(2, 4))
    zs, zt = torch.randn(3, 3), torch.randn(3, 3)
    # three instances matched to ground truths 2, 0, 2 of areas small, large, small
    instance_gt = torch.tensor([2, 0, 2])
    gt_areas = torch.tensor([100.0**2, 50.0**2, 20.0**2])
    records = []
    with d.recording_instances(records.append):
        losses, stats = d(
            feats, teacher, boxes, bidx, classes, levels, zs, zt,
            instance_gt=instance_gt, gt_areas=gt_areas,
        )  # fmt: skip
    d(feats, teacher, boxes, bidx, classes, levels, zs, zt)  # outside: not recorded
    assert len(records) == 1
    rec = records[0]
    r = rec.r
    assert torch.equal(rec.weights, r) and rec.soft_r is None
    assert torch.equal(rec.instance_gt, instance_gt) and torch.equal(rec.boxes, boxes)
    assert rec.map_shapes == [(2, 8, 8), (2, 4, 4)]
    assert stats["gkd/r_mean"] == pytest.approx(float(r.mean()))
    assert stats["gkd/r_mean_small"] == pytest.approx(float((r[0] + r[2]) / 2))
    assert stats["gkd/r_mean_large"] == pytest.approx(float(r[1]))
    assert "gkd/r_mean_medium" not in stats  # no medium instance in this batch
    # fg with r / fg with weight 1, over both levels (LEVEL_REDUCTION sum)
    fg_r = fg_1 = 0.0
    for lvl, stride in enumerate([8, 16]):
        sel = levels == lvl
        shape = (2, *feats[lvl].shape[2:])
        mask, covered = foreground_mask(boxes[sel], bidx[sel], r[sel], stride, shape)
        fg_r += decoupled_imitation_losses(feats[lvl], teacher[lvl], mask, covered)[0]
        ones = covered.float()
        fg_1 += decoupled_imitation_losses(feats[lvl], teacher[lvl], ones, covered)[0]
    assert stats["gkd/r_effect_fg"] == pytest.approx(float(fg_r / fg_1), rel=1e-5)
    soft_1 = soft_label_kl(zs, zt, torch.ones(3), 2.0)
    assert stats["gkd/r_effect_soft"] == pytest.approx(float(losses["loss_gkd_soft"] / soft_1))
    assert stats["gkd/r_effect_soft"] < 1  # r < 1 shrinks the soft term; fg is normalised
    # the local-only baseline logs no r and no effect
    base = make_distiller(global_weight=0.0, robust=False)
    _, base_stats = base(feats, teacher, boxes, bidx, classes, levels, zs, zt)
    assert set(base_stats) == {"gkd/num_instances"}


def test_r_by_size_leaves_out_instances_without_ground_truth():
    """An instance whose ground truth was not found (row -1) is in no size group: it neither
    takes the last ground truth's area nor counts towards any mean."""
    from gkd_d2.modeling.distiller import _r_by_size

    r = torch.tensor([0.2, 0.9, 0.4, 0.6])
    instance_gt = torch.tensor([0, -1, 1, -1])
    gt_areas = torch.tensor([10.0**2, 200.0**2])  # small, large: a -1 read as row -1 is large
    stats = _r_by_size("gkd/r_mean", r, instance_gt, gt_areas)
    assert stats == pytest.approx({"gkd/r_mean_small": 0.2, "gkd/r_mean_large": 0.4})
    assert _r_by_size("gkd/r_mean", r, torch.full((4,), -1), gt_areas) == {}
    assert _r_by_size("gkd/r_mean", r[:0], instance_gt[:0], gt_areas) == {}


def test_fg_overlap_option_reaches_the_mask():
    """MODEL.GKD.FG_OVERLAP: the distiller's fg loss is the one of the mask built by the rule."""
    from gkd_d2.distill import decoupled_imitation_losses, foreground_mask

    with pytest.raises(ValueError, match="MODEL.GKD.FG_OVERLAP must be one of"):
        make_distiller(fg_overlap="min")
    feats, _, _, _, _ = batch()
    teacher = [
        f + torch.linspace(0, 2, 8 * 8).view(8, 8)[: f.shape[2], : f.shape[3]] for f in feats
    ]
    # two overlapping boxes on level 0 of image 0 (cells 0-3 and 2-5); their r differ
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [16.0, 16.0, 48.0, 48.0]])
    classes = torch.tensor([0, 1])
    bidx, levels = torch.tensor([0, 0]), torch.tensor([0, 0])
    logits = torch.zeros(2, 3)
    torch.manual_seed(1)
    bank = [(torch.randn(2, 4), torch.randn(2, 4)) for _ in range(3)]
    fg = {}
    for order in ([0, 1], [1, 0]):
        for rule in ("max", "last"):
            d = make_distiller(global_weight=0.0, fg_overlap=rule, soft_weight=0.0)
            identity_adapters(d)
            for c, (ps, pt) in enumerate(bank):
                d.set_bank(0, c, ps, pt)
            records = []
            with d.recording_instances(records.append):
                losses, _ = d(
                    feats, teacher, boxes[order], bidx, classes[order], levels, logits, logits
                )
            r = records[0].weights
            mask, covered = foreground_mask(boxes[order], bidx, r, 8, (2, 8, 8), rule)
            want = decoupled_imitation_losses(feats[0], teacher[0], mask, covered)[0]
            fg[rule, order[0]] = losses["loss_gkd_fg"]
            torch.testing.assert_close(fg[rule, order[0]], want)
    assert abs(float(r[0] - r[1])) > 0.01
    torch.testing.assert_close(fg["max", 0], fg["max", 1])  # max: order-independent
    # last: the box written last wins the overlap, so exactly one order differs from max
    differs = [not torch.allclose(fg["last", o], fg["max", o]) for o in (0, 1)]
    assert sorted(differs) == [False, True]
