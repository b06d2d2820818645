"""Tests of the fixed-matching criterion, semantic_to_targets and the Hungarian matcher."""
import math

import numpy as np
import pytest
import torch

import hvlformer.modeling.criterion as crit_mod
from hvlformer.modeling.criterion import (
    HVLSetCriterion,
    fixed_matching_indices,
    semantic_to_targets,
)
from hvlformer.modeling.matcher import HungarianMatcher

WEIGHTS = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


def make_criterion(k, e, m=0, matcher=None, num_points=64, deep_supervision=True, **kw):
    return HVLSetCriterion(num_classes=k, num_query_levels=e, num_instance_queries=m, matcher=matcher,
                           weight_dict=WEIGHTS, no_object_weight=0.1, num_points=num_points,
                           oversample_ratio=3.0, importance_sample_ratio=0.75,
                           deep_supervision=deep_supervision, **kw)


def pixel_center_sampler(h, w, calls=None):
    """Replacement of the PointRend sampler returning every pixel centre of an h x w map (exact sampling)."""
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    grid = torch.stack([xs.flatten(), ys.flatten()], -1)  # (x, y) as grid_sample expects

    def sampler(coarse_logits, uncertainty_func, num_points, oversample_ratio, importance_sample_ratio):
        if calls is not None:
            calls.append((coarse_logits.shape, num_points, oversample_ratio, importance_sample_ratio,
                          uncertainty_func(torch.tensor([[[-3.0, 0.5]]])).tolist()))
        assert num_points == h * w
        return grid[None].expand(coarse_logits.shape[0], -1, -1).to(coarse_logits.device)

    return sampler


def dense_bce(x, t):
    """Mean BCE-with-logits over pixels, written out: -(t log s(x) + (1-t) log s(-x))."""
    x, t = x.double(), t.double()
    log_s = -torch.log1p(torch.exp(-x))
    log_s_neg = -torch.log1p(torch.exp(x))
    return (-(t * log_s + (1 - t) * log_s_neg)).flatten(1).mean(1)


def dense_dice(x, t):
    s = 1.0 / (1.0 + torch.exp(-x.double()))
    t = t.double()
    return 1.0 - (2 * (s * t).flatten(1).sum(1) + 1) / (s.flatten(1).sum(1) + t.flatten(1).sum(1) + 1)


# ---------------------------------------------------------------------- semantic_to_targets / fixed matching
def test_semantic_to_targets_known_map():
    sem = torch.tensor([[0, 0, 3, 255],
                        [0, 3, 3, 255],
                        [255, 1, 1, 1]])
    t = semantic_to_targets(sem, num_classes=5, ignore_value=255)
    assert t["labels"].dtype == torch.int64 and t["labels"].tolist() == [0, 1, 3]
    assert t["masks"].shape == (3, 3, 4) and t["masks"].dtype == torch.float32
    assert t["masks"][0].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert t["masks"][1].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1]]
    assert t["masks"][2].tolist() == [[0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    ignore = sem == 255
    assert (t["masks"][:, ignore] == 0).all()
    # all-ignore map: no targets
    e = semantic_to_targets(torch.full((2, 2), 255), num_classes=5)
    assert e["labels"].numel() == 0 and e["masks"].shape == (0, 2, 2)
    with pytest.raises(ValueError):
        semantic_to_targets(sem, num_classes=3)  # label 3 >= K
    with pytest.raises(ValueError):
        semantic_to_targets(torch.tensor([[0, -1]]), num_classes=3)


def test_fixed_matching_known_map():
    # K = 4 classes, E = 2 levels; classes 0 and 2 present, 1 and 3 absent
    sem = torch.tensor([[0, 0, 2, 2],
                        [0, 255, 2, 2]])
    k, e = 4, 2
    targets = [semantic_to_targets(sem, k)]
    (q, t), = fixed_matching_indices(targets, k, e)
    assert q.tolist() == [0, 2, 4, 6]  # e*K + k for k in {0, 2}, e in {0, 1}
    assert t.tolist() == [0, 1, 0, 1]
    crit = make_criterion(k, e)
    cls = crit.target_classes([(q, t)], targets, num_queries=e * k, num_classes=k)
    assert cls.tolist() == [[0, 4, 2, 4, 0, 4, 2, 4]]  # absent classes -> no object (= K)
    masks = targets[0]["masks"][t]
    for qi, mi in zip(q.tolist(), masks):
        assert torch.equal(mi, (sem == qi % k).float())
    # the criterion's matching (no instance queries) is exactly the fixed one
    outputs = {"pred_logits": torch.randn(1, e * k, k + 1), "pred_masks": torch.randn(1, e * k, 2, 4)}
    (q2, t2), = crit.match(outputs, targets)
    assert q2.tolist() == q.tolist() and t2.tolist() == t.tolist()
    # unsorted labels are handled
    (q3, t3), = fixed_matching_indices([{"labels": torch.tensor([2, 0]), "masks": torch.zeros(2, 1, 1)}], k, e)
    assert q3.tolist() == [0, 2, 4, 6] and t3.tolist() == [1, 0, 1, 0]


# ---------------------------------------------------------------------- loss values
def _perfect_outputs(sem_list, k, e, mag=20.0):
    targets = [semantic_to_targets(s, k) for s in sem_list]
    b = len(sem_list)
    h, w = sem_list[0].shape
    logits = torch.full((b, e * k, k + 1), -mag)
    masks = torch.full((b, e * k, h, w), -mag)
    for i, s in enumerate(sem_list):
        for lvl in range(e):
            for c in range(k):
                q = lvl * k + c
                if (s == c).any():
                    logits[i, q, c] = mag
                    masks[i, q][s == c] = mag
                else:
                    logits[i, q, k] = mag
    return {"pred_logits": logits, "pred_masks": masks}, targets


def test_perfect_prediction_gives_zero_losses(monkeypatch):
    k, e, h, w = 3, 2, 8, 8
    s0 = torch.zeros(h, w, dtype=torch.long)
    s0[:, 4:] = 2
    s0[0, 0] = 255
    s1 = torch.ones(h, w, dtype=torch.long)
    s1[5:, :] = 0
    outputs, targets = _perfect_outputs([s0, s1], k, e)
    calls = []
    monkeypatch.setattr(crit_mod, "get_uncertain_point_coords_with_randomness", pixel_center_sampler(h, w, calls))
    crit = make_criterion(k, e, num_points=h * w)
    losses = crit(outputs, targets)
    assert losses["loss_ce"] < 1e-6
    assert losses["loss_mask"] < 1e-6
    assert losses["loss_dice"] < 1e-6
    # the sampler got the configured settings and the -|logit| uncertainty
    shape, npts, over, imp, unc = calls[0]
    assert shape == (2 * e * 2, 1, h, w)  # 2 present classes per image x E levels x 2 images
    assert (npts, over, imp) == (h * w, 3.0, 0.75)
    assert unc == [[[-3.0, -0.5]]]
    # a wrong mask for one pair increases the losses
    outputs["pred_masks"][0, 0] *= -1
    bad = crit(outputs, targets)
    assert bad["loss_mask"] > 1.0 and bad["loss_dice"] > 0.1


def test_perfect_class_logits_with_default_sampling():
    """Without patching: CE ~ 0 and mask losses finite and positive (boundary points are sampled)."""
    k, e = 3, 2
    s = torch.zeros(16, 16, dtype=torch.long)
    s[:, 8:] = 1
    outputs, targets = _perfect_outputs([s], k, e)
    losses = make_criterion(k, e, num_points=100)(outputs, targets)
    assert losses["loss_ce"] < 1e-6
    for key in ("loss_mask", "loss_dice"):
        assert torch.isfinite(losses[key]) and losses[key] >= 0


def test_cross_entropy_hand_case():
    k, e = 2, 2
    sem = torch.tensor([[1, 1], [255, 1]])  # only class 1 present
    targets = [semantic_to_targets(sem, k)]
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, e * k, k + 1, generator=g)
    outputs = {"pred_logits": logits, "pred_masks": torch.zeros(1, e * k, 2, 2)}
    losses = make_criterion(k, e)(outputs, targets)
    # queries: 0 (lvl0, cls0) -> no object (2); 1 -> 1; 2 -> 2; 3 -> 1. Class weights [1, 1, 0.1].
    lab = [2, 1, 2, 1]
    wts = {0: 1.0, 1: 1.0, 2: 0.1}
    x = logits[0].double().numpy()
    nll = [-(x[i, lab[i]] - np.log(np.exp(x[i]).sum())) for i in range(4)]
    expected = sum(wts[lab[i]] * nll[i] for i in range(4)) / sum(wts[l] for l in lab)
    assert math.isclose(losses["loss_ce"].item(), expected, rel_tol=1e-5)


def test_zero_mask_logits_bce_is_log2_and_dice_formula():
    k, e = 3, 2
    s = torch.zeros(32, 32, dtype=torch.long)
    s[:, 16:] = 2
    s[:4, :4] = 255
    targets = [semantic_to_targets(s, k)]
    outputs = {"pred_logits": torch.zeros(1, e * k, k + 1), "pred_masks": torch.zeros(1, e * k, 8, 8)}
    losses = make_criterion(k, e, num_points=500)(outputs, targets)
    # BCE(0, t) = log 2 for any t in [0, 1]: each of the 4 pairs contributes log 2, divided by 4 pairs
    assert math.isclose(losses["loss_mask"].item(), math.log(2.0), rel_tol=1e-6)
    # one class covering the whole image: dice = 1 - (sum t + 1) / (P/2 + sum t + 1) with t ~ 1 (zero
    # padding makes t < 1 within half a pixel of the image border)
    full = [semantic_to_targets(torch.zeros(64, 64, dtype=torch.long), k)]
    p = 2000
    losses = make_criterion(k, e, num_points=p)(outputs, full)
    expected = 1 - (p + 1) / (p / 2 + p + 1)
    assert abs(losses["loss_dice"].item() - expected) < 5e-3
    assert math.isclose(losses["loss_mask"].item(), math.log(2.0), rel_tol=1e-6)


def test_mask_losses_match_dense_computation(monkeypatch):
    """With exact pixel-centre sampling the point losses equal the dense ones on random logits."""
    k, e, h, w = 4, 2, 6, 8
    s0 = torch.randint(0, 3, (h, w))  # classes 0..2 (3 absent)
    s0[0, :3] = 255
    s1 = torch.full((h, w), 3)
    s1[:, :2] = 1
    targets = [semantic_to_targets(s, k) for s in (s0, s1)]
    g = torch.Generator().manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, e * k, k + 1, generator=g),
               "pred_masks": 3 * torch.randn(2, e * k, h, w, generator=g)}
    monkeypatch.setattr(crit_mod, "get_uncertain_point_coords_with_randomness", pixel_center_sampler(h, w))
    losses = make_criterion(k, e, num_points=h * w)(outputs, targets)
    bce, dice, n = 0.0, 0.0, 0
    for b, (s, tgt) in enumerate(zip((s0, s1), targets)):
        for lvl in range(e):
            for c in tgt["labels"].tolist():
                x = outputs["pred_masks"][b, lvl * k + c][None]
                t = (s == c).float()[None]
                bce += dense_bce(x, t).item()
                dice += dense_dice(x, t).item()
                n += 1
    assert n == 2 * (len(targets[0]["labels"]) + 2)
    assert math.isclose(losses["loss_mask"].item(), bce / n, rel_tol=1e-5)
    assert math.isclose(losses["loss_dice"].item(), dice / n, rel_tol=1e-5)


def test_new_vocabulary_and_no_pairs():
    crit = make_criterion(5, 2)
    # K inferred from the outputs: 2 classes instead of 5
    outputs = {"pred_logits": torch.randn(1, 4, 3, requires_grad=True),
               "pred_masks": torch.randn(1, 4, 4, 4, requires_grad=True)}
    losses = crit(outputs, [semantic_to_targets(torch.tensor([[1, 1], [1, 255]]), 2)])
    assert all(torch.isfinite(v) for v in losses.values())
    # no valid pixel anywhere: no matched pairs -> zero mask losses, still in the graph, CE all no-object
    outputs = {"pred_logits": torch.randn(1, 4, 3, requires_grad=True),
               "pred_masks": torch.randn(1, 4, 4, 4, requires_grad=True)}
    losses = crit(outputs, [semantic_to_targets(torch.full((4, 4), 255), 2)])
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    assert losses["loss_mask"].requires_grad
    expected_ce = torch.nn.functional.cross_entropy(outputs["pred_logits"][0], torch.full((4,), 2))
    assert torch.allclose(losses["loss_ce"], expected_ce)  # all targets have the same weight
    sum(losses.values()).backward()
    assert outputs["pred_masks"].grad is not None and outputs["pred_masks"].grad.abs().sum() == 0
    with pytest.raises(ValueError):  # query count inconsistent with E*K + M
        crit({"pred_logits": torch.randn(1, 5, 3), "pred_masks": torch.randn(1, 5, 4, 4)}, [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 4, 4)}])


# ---------------------------------------------------------------------- Hungarian matcher
def test_hungarian_matcher_recovers_permutation():
    k, n, q = 5, 4, 6
    h = w = 16
    gt = torch.zeros(n, h, w)
    for j in range(n):  # four quadrants
        gt[j, (j // 2) * 8:(j // 2 + 1) * 8, (j % 2) * 8:(j % 2 + 1) * 8] = 1
    labels = torch.tensor([3, 0, 3, 1])  # repeated label: only masks can disambiguate 0 and 2
    perm = [4, 1, 5, 0]  # prediction perm[j] predicts target j
    masks = torch.full((1, q, h, w), -10.0)
    logits = torch.zeros(1, q, k + 1)
    logits[0, :, k] = 5.0
    for j, p in enumerate(perm):
        masks[0, p][gt[j] > 0] = 10.0
        logits[0, p] = 0.0
        logits[0, p, labels[j]] = 5.0
    torch.manual_seed(0)
    (pi, ti), = HungarianMatcher(num_points=256)({"pred_logits": logits, "pred_masks": masks},
                                                [{"labels": labels, "masks": gt}])
    assert pi.dtype == torch.int64 and ti.dtype == torch.int64
    assert dict(zip(ti.tolist(), pi.tolist())) == {j: p for j, p in enumerate(perm)}
    # empty target
    (pe, te), = HungarianMatcher(num_points=16)({"pred_logits": logits, "pred_masks": masks},
                                                [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, h, w)}])
    assert pe.numel() == 0 and te.numel() == 0


def test_matcher_costs():
    from hvlformer.modeling.matcher import pairwise_dice, pairwise_sigmoid_ce

    g = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(3, 10, generator=g)
    t = (torch.rand(2, 10, generator=g) > 0.5).float()
    ce = pairwise_sigmoid_ce(x, t)
    dice = pairwise_dice(x, t)
    assert ce.shape == dice.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            assert math.isclose(ce[i, j].item(), dense_bce(x[i][None], t[j][None]).item(), rel_tol=1e-5)
            assert math.isclose(dice[i, j].item(), dense_dice(x[i][None], t[j][None]).item(), rel_tol=1e-5)
    # identical masks: only the class cost decides (higher probability of the target class wins)
    logits = torch.zeros(1, 2, 3)
    logits[0, 0, 1] = 4.0  # query 0 says class 1
    logits[0, 1, 0] = 4.0  # query 1 says class 0
    masks = torch.zeros(1, 2, 4, 4)
    (pi, ti), = HungarianMatcher(num_points=16)({"pred_logits": logits, "pred_masks": masks},
                                                [{"labels": torch.tensor([0]), "masks": torch.ones(1, 4, 4)}])
    assert pi.tolist() == [1] and ti.tolist() == [0]
    # dice decides when the BCE cost is disabled
    masks = torch.full((1, 2, 4, 4), -5.0)
    masks[0, 0, :2] = 5.0  # query 0: top half
    masks[0, 1, :, :2] = 5.0  # query 1: left half
    tgt = torch.zeros(1, 4, 4)
    tgt[0, :, :2] = 1
    (pi, _), = HungarianMatcher(cost_class=0, cost_mask=0, cost_dice=1, num_points=400)(
        {"pred_logits": torch.zeros(1, 2, 3), "pred_masks": masks}, [{"labels": torch.tensor([0]), "masks": tgt}])
    assert pi.tolist() == [1]


def test_instance_queries_hungarian_in_criterion(monkeypatch):
    k, e, m, h, w = 3, 2, 3, 4, 4
    s = torch.zeros(h, w, dtype=torch.long)
    s[:, 2:] = 2  # classes 0 and 2
    targets = [semantic_to_targets(s, k)]
    q = e * k + m
    logits = torch.zeros(1, q, k + 1)
    masks = torch.zeros(1, q, h, w)
    # instance query e*k + 1 predicts class 0's mask, e*k + 2 class 2's mask, e*k + 0 nothing
    masks[0, e * k + 1] = torch.where(s == 0, 10.0, -10.0)
    masks[0, e * k + 2] = torch.where(s == 2, 10.0, -10.0)
    masks[0, e * k + 0] = -10.0
    logits[0, e * k + 1, 0] = 5.0
    logits[0, e * k + 2, 2] = 5.0
    outputs = {"pred_logits": logits, "pred_masks": masks}
    crit = make_criterion(k, e, m=m, matcher=HungarianMatcher(num_points=64), num_points=h * w)
    (qi, ti), = crit.match(outputs, targets)
    assert qi.tolist() == [0, 2, 3, 5, 7, 8] and ti.tolist() == [0, 1, 0, 1, 0, 1]
    cls = crit.target_classes([(qi, ti)], targets, q, k)
    assert cls.tolist() == [[0, 3, 2, 0, 3, 2, 3, 0, 2]]
    # mask losses are averaged over E*n + min(M, n) = 6 pairs
    monkeypatch.setattr(crit_mod, "get_uncertain_point_coords_with_randomness", pixel_center_sampler(h, w))
    losses = crit(outputs, targets)
    exp = 0.0
    for qq, tt in zip(qi.tolist(), ti.tolist()):
        exp += dense_bce(masks[0, qq][None], targets[0]["masks"][tt][None]).item()
    assert math.isclose(losses["loss_mask"].item(), exp / 6, rel_tol=1e-5)
    # without a matcher, instance queries are all no-object
    crit2 = make_criterion(k, e, m=m, matcher=None, num_points=h * w)
    (qi2, _), = crit2.match(outputs, targets)
    assert qi2.tolist() == [0, 2, 3, 5]


# ---------------------------------------------------------------------- deep supervision / weights
def test_deep_supervision_keys_and_weights():
    k, e, n_aux = 3, 2, 4
    s = torch.zeros(8, 8, dtype=torch.long)
    s[4:] = 1
    targets = [semantic_to_targets(s, k), semantic_to_targets(torch.full((8, 8), 2), k)]

    def pred():
        return {"pred_logits": torch.randn(2, e * k, k + 1), "pred_masks": torch.randn(2, e * k, 4, 4)}

    outputs = pred()
    outputs["aux_outputs"] = [dict(pred(), attn_maps=None) for _ in range(n_aux)]
    crit = make_criterion(k, e)
    losses = crit(outputs, targets)
    expected = {"loss_ce", "loss_mask", "loss_dice"} | {
        f"{b}_{i}" for b in ("loss_ce", "loss_mask", "loss_dice") for i in range(n_aux)}
    assert set(losses) == expected
    assert set(losses) <= set(crit.weight_dict)
    assert crit.weight_dict["loss_ce_3"] == 2.0 and crit.weight_dict["loss_dice_0"] == 5.0
    # aux losses are computed on the aux predictions (a different prediction gives a different loss)
    assert not torch.isclose(losses["loss_ce"], losses["loss_ce_0"])
    aux_only = make_criterion(k, e)({k_: v for k_, v in outputs["aux_outputs"][2].items()}, targets)
    assert torch.isclose(aux_only["loss_ce"], losses["loss_ce_2"])
    # pre-expanded weight dict and deep supervision off
    crit_pre = make_criterion(k, e, num_aux_outputs=n_aux)
    assert set(crit_pre.weight_dict) == expected
    off = make_criterion(k, e, deep_supervision=False)(outputs, targets)
    assert set(off) == {"loss_ce", "loss_mask", "loss_dice"}
    for v in losses.values():
        assert v.dtype == torch.float32 and v.dim() == 0


def test_criterion_under_autocast_and_decoder_outputs():
    from hvlformer.modeling.transformer_decoder import HVLTransformerDecoder

    torch.manual_seed(0)
    k, e = 3, 2
    dec = HVLTransformerDecoder(in_channels=16, num_classes=k, hidden_dim=16, num_query_levels=e,
                                num_instance_queries=2, nheads=2, dim_feedforward=32, dec_layers=2,
                                pre_norm=False, mask_dim=16, enforce_input_project=False)
    feats = [torch.randn(1, 16, 2, 2), torch.randn(1, 16, 4, 4), torch.randn(1, 16, 8, 8)]
    mf = torch.randn(1, 16, 16, 16)
    tq = torch.randn(1, e * k, 16, requires_grad=True)
    s = torch.zeros(64, 64, dtype=torch.long)
    s[20:40, 10:50] = 1
    targets = [semantic_to_targets(s, k)]
    crit = make_criterion(k, e, m=2, matcher=HungarianMatcher(num_points=64), num_points=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dec(feats, mf, tq)
        losses = crit(out, targets)
    assert len(losses) == 3 * 3
    for key, v in losses.items():
        assert v.dtype == torch.float32 and torch.isfinite(v), key
    total = sum(crit.weight_dict[key] * v for key, v in losses.items())
    total.backward()
    assert tq.grad is not None and tq.grad.abs().sum() > 0


def test_matcher_class_cost_is_each_querys_probability_over_the_classes():
    """p(class | query) is a softmax over the K + 1 classes of one query, not over the queries: query 0 gives the
    target class 0.79 (logits [2, 0, 0]), query 1 only 0.49 though its logit is higher ([3, 3, 0]); with equal
    masks query 0 is matched."""
    logits = torch.tensor([[[2.0, 0.0, 0.0], [3.0, 3.0, 0.0]]])
    (pi, ti), = HungarianMatcher(num_points=16)({"pred_logits": logits, "pred_masks": torch.zeros(1, 2, 4, 4)},
                                                [{"labels": torch.tensor([0]), "masks": torch.ones(1, 4, 4)}])
    assert pi.tolist() == [0] and ti.tolist() == [0]


def test_matcher_needs_one_nonzero_cost():
    with pytest.raises(ValueError, match="all matching costs are 0"):
        HungarianMatcher(cost_class=0.0, cost_mask=0.0, cost_dice=0.0)
    for costs in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)):
        assert HungarianMatcher(*costs).cost_class == costs[0]


def test_matcher_samples_predictions_and_targets_of_different_sizes_at_the_same_places():
    # A 4 px prediction (column 1 on) against 48 px targets: with the align_corners=False convention of
    # inference's upsampling, column 1 covers x in [1/4, 1/2) of the image, exactly target 1. Sampled
    # with align_corners=True it would cover [1/6, 1/2), exactly target 0, listed first so that a matcher
    # blind to the masks (or to where they are) picks it.
    pred = torch.full((1, 1, 4, 4), -10.0)
    pred[0, 0, :, 1] = 10.0
    targets = torch.zeros(2, 48, 48)
    targets[0, :, 8:24] = 1
    targets[1, :, 12:24] = 1
    for seed in range(5):
        torch.manual_seed(seed)
        (pi, ti), = HungarianMatcher(num_points=1024)(
            {"pred_logits": torch.zeros(1, 1, 3), "pred_masks": pred},
            [{"labels": torch.tensor([0, 0]), "masks": targets}])
        assert pi.tolist() == [0] and ti.tolist() == [1]
