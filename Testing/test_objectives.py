"""Training objectives checked against direct, naive formulas on tiny tensors.

Covers methods.md sections 1.2-1.4 and 3: the 3D-CGMM (fit, posterior, losses), the KT-CPS class
weights, the partial-label losses, every method on degenerate batches, and the 3D U-Net.
Every expectation is recomputed here from the spec with plain loops in float64, never by calling
the code under test a second time.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
import math

import pytest
import torch
from torch.nn import functional as F

from GuidedSegLib import cgmm, losses, methods
from GuidedSegLib.ktcps import ClassWeights
from GuidedSegLib.networks import UNet3D, build_network, initialise


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to a busy machine's contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# Naive reference implementations (loops over voxels and classes, float64)


def _voxels(t: torch.Tensor) -> list[tuple]:
    """Every (b, z, y, x) index of a (B, *spatial) tensor."""
    return list(itertools.product(*(range(n) for n in t.shape)))


def naive_fit(features, labels, probabilities, mask, K, var_floor=1e-4, mixing="uniform"):
    """Eq. 3-4 and the mixing coefficients, voxel by voxel from the masked (annotated) voxels."""
    f = features.double()
    p = probabilities.double()
    C = f.shape[1]
    idx = [v for v in _voxels(labels) if bool(mask[v])]
    mean = torch.zeros(K, C, dtype=torch.float64)
    var = torch.zeros(K, C, dtype=torch.float64)
    present = [False] * K
    counts = [0] * K
    for k in range(K):
        members = [v for v in idx if int(labels[v]) == k]
        counts[k] = len(members)
        if not members:
            continue
        present[k] = True
        for c in range(C):
            mean[k, c] = sum(float(f[v[0], c, v[1], v[2], v[3]]) for v in members) / len(members)
    for k in range(K):
        if not present[k]:
            continue
        for c in range(C):
            num = den = 0.0
            for v in idx:
                pk = float(p[v[0], k, v[1], v[2], v[3]])
                num += pk * (float(f[v[0], c, v[1], v[2], v[3]]) - float(mean[k, c])) ** 2
                den += pk
            var[k, c] = num / den + var_floor
    total = sum(counts)
    if mixing == "uniform":
        log_pi = [-math.log(K)] * K
    else:
        log_pi = [math.log(counts[k] / total) if counts[k] else float("-inf") for k in range(K)]
    return mean, var, log_pi, present


def naive_posterior(features, mean, var, log_pi, present):
    """Eq. 5-7 voxel by voxel: diagonal Gaussian log-likelihood, Bayes normalisation over present
    classes, absent classes G = 0. Returns (B, K, *spatial) float64."""
    f = features.double()
    B, C = f.shape[:2]
    K = mean.shape[0]
    out = torch.zeros(B, K, *f.shape[2:], dtype=torch.float64)
    for v in _voxels(f[:, 0]):
        joint = []
        for k in range(K):
            if not present[k]:
                joint.append(None)
                continue
            ll = 0.0
            for c in range(C):
                x = float(f[v[0], c, v[1], v[2], v[3]])
                s2 = float(var[k, c])
                ll += (x - float(mean[k, c])) ** 2 / s2 + math.log(2 * math.pi * s2)
            joint.append(log_pi[k] - 0.5 * ll)
        top = max(j for j in joint if j is not None)
        z = sum(math.exp(j - top) for j in joint if j is not None)
        for k in range(K):
            if joint[k] is not None:
                out[v[0], k, v[1], v[2], v[3]] = math.exp(joint[k] - top) / z
    return out


# ----------------------------------------------------------------------------------------------
# 1. CGMM fit and posterior

K_CGMM = 4
ABSENT_CLASS = 2  # never in the labels of the fixtures below


def cgmm_case(seed=0, B=2, C=3, spatial=(3, 3, 2)):
    """Features, labels in {0, 1, 3} (class 2 absent), softmax predictions and an annotated mask."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 1, 3])[torch.randint(0, 3, (B, *spatial), generator=g)]
    features = torch.randn(B, C, *spatial, generator=g) + 0.7 * labels.unsqueeze(1).float()
    probabilities = torch.softmax(torch.randn(B, K_CGMM, *spatial, generator=g), 1)
    mask = torch.rand(B, *spatial, generator=g) < 0.75
    for k in (0, 1, 3):  # each present class has at least two annotated voxels
        where = (labels == k).nonzero()
        for row in where[:2]:
            mask[tuple(row)] = True
    assert not mask.all(), "the fixture must leave some voxels outside the mask"
    return features, labels, probabilities, mask


def test_cgmm_statistics_match_naive_formulas():
    features, labels, probabilities, mask = cgmm_case()
    params = cgmm.fit(features, labels, probabilities, mask, K_CGMM, var_floor=1e-4)
    mean, var, log_pi, present = naive_fit(features, labels, probabilities, mask, K_CGMM, 1e-4)
    assert params.present.tolist() == present, f"present {params.present.tolist()} != naive {present}"
    for k in range(K_CGMM):
        if not present[k]:
            continue
        assert torch.allclose(params.mean[k].double(), mean[k], atol=1e-5), \
            f"class {k} mean {params.mean[k].tolist()} != naive Eq. 3 {mean[k].tolist()}"
        assert torch.allclose(params.var[k].double(), var[k], rtol=1e-5, atol=1e-6), \
            f"class {k} variance {params.var[k].tolist()} != naive Eq. 4 + floor {var[k].tolist()}"
    assert torch.allclose(params.log_mixing.double(), torch.tensor(log_pi, dtype=torch.float64), atol=1e-6), \
        f"uniform log mixing {params.log_mixing.tolist()} != -log K"


def test_cgmm_posterior_matches_naive_and_sums_to_one():
    features, labels, probabilities, mask = cgmm_case()
    params = cgmm.fit(features, labels, probabilities, mask, K_CGMM)
    mean, var, log_pi, present = naive_fit(features, labels, probabilities, mask, K_CGMM)
    unlabeled = torch.randn(1, features.shape[1], 2, 3, 2, generator=torch.Generator().manual_seed(5)) * 1.5
    for name, f in (("labeled G", features), ("unlabeled G'", unlabeled)):
        log_g = cgmm.log_posterior(f, params)
        assert log_g.shape == (f.shape[0], K_CGMM, *f.shape[2:]), f"{name}: log posterior shape {tuple(log_g.shape)}"
        g = log_g.exp()
        assert torch.isfinite(g).all(), f"{name}: posterior not finite"
        total = g.sum(1)
        assert torch.allclose(total, torch.ones_like(total), atol=1e-5), \
            f"{name}: posterior sums to {total.min():.6f}..{total.max():.6f} over classes, not 1"
        expected = naive_posterior(f, mean, var, log_pi, present)
        err = (g.double() - expected).abs().max().item()
        assert err < 1e-5, f"{name}: posterior differs from the naive per-voxel Bayes rule by {err:.3g}"
        assert (g[:, ABSENT_CLASS] == 0).all(), f"{name}: class absent from the labels has G != 0"


def test_cgmm_absent_class_flagged():
    features, labels, probabilities, mask = cgmm_case()
    params = cgmm.fit(features, labels, probabilities, mask, K_CGMM)
    assert not bool(params.present[ABSENT_CLASS]), "class absent from the labels is marked present"
    assert params.present[[0, 1, 3]].all(), f"labelled classes not all present: {params.present.tolist()}"
    log_g = cgmm.log_posterior(features, params)
    assert torch.isneginf(log_g[:, ABSENT_CLASS]).all(), "absent class log G should be -inf (G = 0)"


def test_cgmm_frequency_mixing_matches_formula():
    features, labels, probabilities, mask = cgmm_case(seed=3)
    params = cgmm.fit(features, labels, probabilities, mask, K_CGMM, mixing="frequency")
    mean, var, log_pi, present = naive_fit(features, labels, probabilities, mask, K_CGMM, mixing="frequency")
    for k in range(K_CGMM):
        if present[k]:
            n_k = int(((labels == k) & mask).sum())
            assert abs(float(params.log_mixing[k]) - log_pi[k]) < 1e-6, \
                f"class {k}: log pi {float(params.log_mixing[k]):.6f} != log(N_k/N) = log({n_k}/{int(mask.sum())})"
    g = cgmm.log_posterior(features, params).exp()
    expected = naive_posterior(features, mean, var, log_pi, present)
    err = (g.double() - expected).abs().max().item()
    assert err < 1e-5, f"frequency-mixing posterior differs from the naive one by {err:.3g}"
    with pytest.raises(ValueError):
        cgmm.fit(features, labels, probabilities, mask, K_CGMM, mixing="bogus")


def test_cgmm_masked_out_voxels_do_not_change_statistics():
    features, labels, probabilities, mask = cgmm_case(seed=1)
    ref = cgmm.fit(features, labels, probabilities, mask, K_CGMM, mixing="frequency")
    out = ~mask
    f2, y2, p2 = features.clone(), labels.clone(), probabilities.clone()
    f2.movedim(1, -1)[out] = 100.0
    y2[out] = ABSENT_CLASS  # would make class 2 present if the mask were ignored
    p2.movedim(1, -1)[out] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    changed = cgmm.fit(f2, y2, p2, mask, K_CGMM, mixing="frequency")
    assert torch.equal(changed.present, ref.present), "masked-out labels changed the present classes"
    for field in ("mean", "var", "log_mixing"):
        a, b = getattr(ref, field), getattr(changed, field)
        assert torch.allclose(a[ref.present], b[ref.present], atol=1e-6), f"masked-out voxels changed the CGMM {field}"


def test_cgmm_gradients_reach_features_not_probabilities():
    features, labels, probabilities, mask = cgmm_case(seed=2)
    features.requires_grad_(True)
    probabilities.requires_grad_(True)
    params = cgmm.fit(features, labels, probabilities, mask, K_CGMM)
    assert params.mean.requires_grad and params.var.requires_grad, "mean/var must carry gradient (spec 1.2)"
    (params.mean.sum() + params.var.sum()).backward()
    assert features.grad is not None and features.grad.abs().sum() > 0, "no gradient into the features"
    assert probabilities.grad is None, "probabilities must be used detached as weights"


# ----------------------------------------------------------------------------------------------
# 2. CGMM losses


def test_loss_gt_is_masked_mean_negative_log_posterior():
    features, labels, probabilities, mask = cgmm_case()
    params = cgmm.fit(features, labels, probabilities, mask, K_CGMM)
    # an absent class on a masked-out voxel gives -log G = inf there; it must not leak in
    labels_with_absent = labels.clone()
    first_out = tuple((~mask).nonzero()[0])
    labels_with_absent[first_out] = ABSENT_CLASS
    log_g = cgmm.log_posterior(features, params)
    value = cgmm.loss_gt(log_g, labels_with_absent, mask)
    g = naive_posterior(features, *naive_fit(features, labels, probabilities, mask, K_CGMM))
    terms = [-math.log(float(g[v[0], int(labels[v]), v[1], v[2], v[3]])) for v in _voxels(labels) if bool(mask[v])]
    expected = sum(terms) / len(terms)
    assert torch.isfinite(value), "L_gt not finite: a masked-out -inf leaked in"
    assert abs(float(value) - expected) < 1e-4, f"L_gt {float(value):.6f} != naive masked mean -log G[y] {expected:.6f}"


def test_marginal_loss_gt_equals_eq8_on_fully_annotated_crops():
    features, labels, probabilities, _ = cgmm_case()
    params = cgmm.fit(features, labels, probabilities, None, K_CGMM)
    log_g = cgmm.log_posterior(features, params)
    every = torch.ones_like(labels, dtype=torch.bool)
    full = torch.ones(labels.shape[0], K_CGMM, dtype=torch.bool)
    marginal, eq8 = cgmm.loss_gt_marginal(log_g, labels, full), cgmm.loss_gt(log_g, labels, every)
    assert torch.allclose(marginal, eq8, atol=1e-5), f"marginal L_gt {float(marginal):.6f} != Eq. 8 {float(eq8):.6f}"


def test_marginal_loss_gt_scores_background_of_a_partial_crop_as_background_or_unannotated_organ():
    """In a partially annotated crop Eq. 8 on annotated voxels scores organ voxels only, each
    against a prior fitted mostly on background; the marginal form also scores the background
    voxels, where putting G's mass on an organ nobody contoured costs nothing, and one contoured
    costs as in L_sup."""
    k = 3
    labels = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    labels[0, 0, 0, 0] = 1
    annotated = torch.tensor([[True, True, False]])  # organ 2 unannotated
    log_g = torch.full((1, k, 4, 4, 4), math.log(0.05))
    log_g[:, 2] = math.log(0.9)  # G sends every voxel to the unannotated organ
    value = cgmm.loss_gt_marginal(log_g, labels, annotated)
    expected = (63 * -math.log(0.95) + -math.log(0.05)) / 64  # background voxels: -log(G_0 + G_2)
    assert abs(float(value) - expected) < 1e-5, f"marginal L_gt {float(value):.5f} != {expected:.5f}"
    log_g_wrong = log_g.clone()
    log_g_wrong[:, 1], log_g_wrong[:, 2] = math.log(0.9), math.log(0.05)  # mass on the contoured organ instead
    assert cgmm.loss_gt_marginal(log_g_wrong, labels, annotated) > 2 * value, \
        "G's mass on a contoured organ at background voxels must cost more than on an unannotated one"


def test_loss_self_is_bce_averaged_over_present_classes():
    features, labels, probabilities, mask = cgmm_case()
    params = cgmm.fit(features, labels, probabilities, mask, K_CGMM)
    g = cgmm.log_posterior(features, params).exp().detach()
    value = cgmm.loss_self(probabilities, g, mask, params.present)
    per_class = []
    for k in range(K_CGMM):
        if not bool(params.present[k]):
            continue
        terms = []
        for v in _voxels(labels):
            if not bool(mask[v]):
                continue
            p = min(max(float(probabilities[v[0], k, v[1], v[2], v[3]]), 1e-6), 1 - 1e-6)
            t = float(g[v[0], k, v[1], v[2], v[3]])
            terms.append(-(t * math.log(p) + (1 - t) * math.log(1 - p)))
        per_class.append(sum(terms) / len(terms))
    expected = sum(per_class) / len(per_class)
    assert len(per_class) == 3
    assert abs(float(value) - expected) < 1e-5, \
        f"L_self {float(value):.6f} != naive BCE averaged over the {len(per_class)} present classes {expected:.6f}"


def test_loss_max_is_mean_over_present_pairs():
    torch.manual_seed(0)
    mean = torch.randn(4, 3) * 0.8
    present = torch.tensor([True, True, False, True])
    params = cgmm.CGMMParameters(mean, torch.ones(4, 3), torch.zeros(4), present)
    value = cgmm.loss_max(params)
    idx = [0, 1, 3]
    terms = []
    for a, b in itertools.combinations(idx, 2):
        d2 = sum((float(mean[a, c]) - float(mean[b, c])) ** 2 for c in range(3))
        terms.append(math.exp(-d2 / 3))
    expected = sum(terms) / len(terms)  # 2/(K'(K'-1)) sum_{k<v}
    assert abs(float(value) - expected) < 1e-5, f"L_max {float(value):.6f} != naive pair mean {expected:.6f}"


def test_loss_max_single_present_class_is_zero_and_finite():
    mean = torch.randn(3, 2, requires_grad=True)
    params = cgmm.CGMMParameters(mean, torch.ones(3, 2), torch.zeros(3), torch.tensor([False, True, False]))
    value = cgmm.loss_max(params)
    assert torch.isfinite(value) and value.item() == 0.0, f"L_max with one present class is {value.item()}, not 0"
    value.backward()
    assert mean.grad is not None and torch.isfinite(mean.grad).all(), "L_max gradient not finite with one class"


def test_loss_consistency_is_mse():
    g = torch.Generator().manual_seed(4)
    a = torch.softmax(torch.randn(2, 3, 2, 2, 2, generator=g), 1)
    b = torch.softmax(torch.randn(2, 3, 2, 2, 2, generator=g), 1)
    value = cgmm.loss_consistency(a, b)
    expected = sum((float(x) - float(y)) ** 2 for x, y in zip(a.flatten(), b.flatten())) / a.numel()
    assert abs(float(value) - expected) < 1e-6, f"L_cons {float(value):.6g} != naive MSE {expected:.6g}"
    assert torch.allclose(value, F.mse_loss(a, b)), "L_cons != F.mse_loss"


# ----------------------------------------------------------------------------------------------
# 3. KT-CPS class weights


def counts_batch(correct: list[int], wrong: int = 0, masked_out_correct: int = 0):
    """(prediction, labels, mask) of shape (1, N) with ``correct[k]`` correctly predicted voxels of
    class k, ``wrong`` voxels of each class predicted as the next class, and extra correct voxels
    outside the mask."""
    K = len(correct)
    pred, lab, msk = [], [], []
    for k, n in enumerate(correct):
        pred += [k] * n
        lab += [k] * n
        msk += [True] * n
        pred += [(k + 1) % K] * wrong
        lab += [k] * wrong
        msk += [True] * wrong
        pred += [k] * masked_out_correct
        lab += [k] * masked_out_correct
        msk += [False] * masked_out_correct
    t = lambda x, d: torch.tensor(x, dtype=d).unsqueeze(0)
    return t(pred, torch.long), t(lab, torch.long), t(msk, torch.bool)


def naive_current(correct: list[int], floor: float) -> list[float]:
    K = len(correct)
    top_n = max(correct)
    r = [math.log(top_n / n) if n > 0 else 0.0 for n in correct]
    top_r = max(r)
    return [max(K * rk / top_r, floor) for rk in r]


def test_ktcps_poorly_learned_class_gets_larger_weight():
    w = ClassWeights(3, momentum=0.5, floor=0.1)
    w.update(*counts_batch([60, 30, 3]))
    weights = w.weights.tolist()
    assert weights[2] > weights[1] > weights[0], \
        f"weights {weights}: the class with 3 correct voxels should outweigh the one with 30, then 60"


def test_ktcps_ema_matches_formula():
    m, floor = 0.9, 0.1
    w = ClassWeights(3, momentum=m, floor=floor)
    expected = [1.0, 1.0, 1.0]
    # masked-out correct voxels must not count; wrongly predicted voxels must not count
    w.update(*counts_batch([50, 20, 5], wrong=4, masked_out_correct=7))
    cur = naive_current([50, 20, 5], floor)
    expected = [m * e + (1 - m) * c for e, c in zip(expected, cur)]
    assert torch.allclose(w.weights.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6), \
        f"after one step weights {w.weights.tolist()} != m w + (1-m) w_cur = {expected}"
    # second step: class 1 has no correct voxel and keeps its weight
    w.update(*counts_batch([10, 0, 40]))
    r0 = math.log(40 / 10)
    cur = [max(3 * r0 / r0, floor), None, max(0.0, floor)]
    expected = [m * expected[0] + (1 - m) * cur[0], expected[1], m * expected[2] + (1 - m) * cur[2]]
    assert torch.allclose(w.weights.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6), \
        f"after two steps weights {w.weights.tolist()} != expected {expected}"


def test_ktcps_class_with_zero_correct_keeps_weight():
    w = ClassWeights(4, momentum=0.8, floor=0.1)
    w.update(*counts_batch([40, 10, 5, 2]))
    before = w.weights.clone()
    # class 3 present in the labels but never predicted correctly
    pred, lab, msk = counts_batch([30, 10, 5, 0], wrong=6)
    w.update(pred, lab, msk)
    assert float(w.weights[3]) == float(before[3]), \
        f"class 3 (0 correct voxels) weight changed {float(before[3])} -> {float(w.weights[3])}"
    assert not torch.equal(w.weights[:3], before[:3]), "seen classes were not updated"


def test_ktcps_all_background_batch_keeps_weights_finite():
    w = ClassWeights(3, momentum=0.5, floor=0.1)
    w.update(*counts_batch([30, 10, 2]))
    before = w.weights.clone()
    zeros = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    w.update(zeros, zeros, torch.ones(2, 4, 4, 4, dtype=torch.bool))
    assert torch.isfinite(w.weights).all(), f"weights not finite after an all-background batch: {w.weights}"
    assert torch.equal(w.weights, before), f"all-background batch changed weights {before.tolist()} -> {w.weights.tolist()}"
    # every pseudo-label background: the class-weighted CE must stay finite (ref code gave NaN)
    logits = torch.randn(2, 3, 4, 4, 4)
    loss = losses.weighted_cross_entropy(logits, zeros, w.weights)
    assert torch.isfinite(loss) and float(loss) > 0, f"weighted CE on all-background pseudo-labels is {float(loss)}"


def test_ktcps_floor_must_be_positive():
    with pytest.raises(ValueError):
        ClassWeights(3, floor=0.0)


# ----------------------------------------------------------------------------------------------
# 4-5. Partial-label losses and the weighted CE


def loss_case(seed=0, B=2, K=4, spatial=(4, 4, 3)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, *spatial, generator=g) * 2
    labels = torch.randint(0, K, (B, *spatial), generator=g)
    return logits, labels


def test_marginal_dice_ce_all_annotated_equals_monai():
    from monai.losses import DiceCELoss

    logits, labels = loss_case()
    annotated = torch.ones(2, 4, dtype=torch.bool)
    value = losses.marginal_dice_ce(logits, labels, annotated)
    reference = DiceCELoss(to_onehot_y=True, softmax=True)(logits, labels.unsqueeze(1))
    assert torch.allclose(value, 0.5 * reference, atol=1e-6), \
        f"marginal Dice+CE with every class annotated {float(value):.6f} != 0.5 * MONAI DiceCELoss {0.5 * float(reference):.6f}"


def naive_marginal(logits, labels, annotated):
    """Shi et al.: q_bg = p0 + sum unannotated p_k, q_k = p_k for k in A; CE of q, soft Dice over
    {bg} + A on q per sample, mean over samples. Returns (loss, ce) in float64."""
    p = torch.softmax(logits.double(), 1)
    B, K = p.shape[:2]
    ce_terms = []
    dice_per_sample = []
    for b in range(B):
        keep = [k for k in range(K) if k == 0 or bool(annotated[b, k])]
        merged = [k for k in range(K) if k == 0 or not bool(annotated[b, k])]
        q = torch.zeros_like(p[b])
        q[0] = p[b, merged].sum(0)
        for k in keep[1:]:
            q[k] = p[b, k]
        for v in _voxels(labels[b]):
            ce_terms.append(-math.log(float(q[(int(labels[b][v]),) + v])))
        dice = []
        for k in keep:
            t = (labels[b] == k).double()
            inter = float((q[k] * t).sum())
            den = float(q[k].sum() + t.sum())
            dice.append(1 - (2 * inter + 1e-5) / (den + 1e-5))
        dice_per_sample.append(sum(dice) / len(dice))
    ce = sum(ce_terms) / len(ce_terms)
    dice = sum(dice_per_sample) / len(dice_per_sample)
    return 0.5 * (dice + ce), ce


def test_marginal_dice_ce_equals_hand_computed_value():
    """Two voxels, classes {bg, liver, X}, X unannotated; logits = log p, so p is exact:
    voxel 1 background, p = (0.5, 0.2, 0.3); voxel 2 liver, p = (0.1, 0.6, 0.3).
    Marginal q (X merged into background): (0.8, 0.2) and (0.4, 0.6).
      CE   = (-ln 0.8 - ln 0.6) / 2                               = 0.366985
      Dice = mean(1 - 2*0.8/(1.2 + 1), 1 - 2*0.6/(0.8 + 1))       = mean(0.272727, 0.333333) = 0.303030
      loss = (Dice + CE) / 2                                      = 0.335007
    Plain (X annotated, so the voxel at X's place is background):
      CE   = (ln 2 - ln 0.6) / 2 = 0.601986; Dice = mean(0.375, 0.333333, 1 - 0/0.6) = 0.569439
      loss = 0.585713
    Exclusion: X is not at the liver voxel: -ln(1 - 0.3) over 2 voxels = 0.178337."""
    p = torch.tensor([[0.5, 0.1], [0.2, 0.6], [0.3, 0.3]], dtype=torch.float64)  # (K, voxels)
    logits = p.log().reshape(1, 3, 1, 1, 2)
    labels = torch.tensor([0, 1]).reshape(1, 1, 1, 2)
    marginal = losses.marginal_dice_ce(logits, labels, torch.tensor([[True, True, False]]))
    plain = losses.marginal_dice_ce(logits, labels, torch.tensor([[True, True, True]]))
    exclusion = losses.exclusion_loss(logits, labels, torch.tensor([[True, True, False]]), torch.zeros(1, 3, dtype=torch.bool))
    assert abs(float(marginal) - 0.335007) < 1e-5, f"marginal Dice+CE {float(marginal):.6f} != hand-computed 0.335007"
    assert abs(float(plain) - 0.585713) < 1e-5, f"plain Dice+CE {float(plain):.6f} != hand-computed 0.585713"
    assert abs(float(exclusion) - 0.178337) < 1e-5, f"exclusion loss {float(exclusion):.6f} != hand-computed 0.178337"


def test_partial_losses_finite_when_only_background_is_annotated():
    """A case with nothing annotated but background (every organ unknown): the marginal loss
    merges everything into background (q_bg = 1, so the loss is 0), the exclusion loss has no
    organ voxel to act on; values and gradients are finite."""
    logits, _ = loss_case(seed=8)
    logits.requires_grad_(True)
    labels = torch.zeros(2, 4, 4, 3, dtype=torch.long)
    annotated = torch.tensor([[True, False, False, False]] * 2)
    absent = torch.zeros(2, 4, dtype=torch.bool)
    marginal = losses.marginal_dice_ce(logits, labels, annotated)
    exclusion = losses.exclusion_loss(logits, labels, annotated, absent)
    for name, value in (("marginal Dice+CE", marginal.detach()), ("exclusion", exclusion.detach())):
        assert torch.isfinite(value), f"{name} with only background annotated is {float(value)}"
        assert abs(float(value)) < 1e-5, f"{name} with only background annotated is {float(value)}, not 0"
    (marginal + exclusion).backward()
    assert torch.isfinite(logits.grad).all(), "gradient with only background annotated is not finite"


def test_marginal_dice_ce_matches_naive_with_unannotated_class():
    logits, labels = loss_case(seed=1)
    annotated = torch.tensor([[True, True, False, True], [True, False, True, False]])
    labels = labels.clone()
    for b in range(2):  # unannotated organs are already 0 in the labels
        for k in range(4):
            if not bool(annotated[b, k]):
                labels[b][labels[b] == k] = 0
    value = losses.marginal_dice_ce(logits, labels, annotated)
    expected, _ = naive_marginal(logits, labels, annotated)
    assert abs(float(value) - expected) < 1e-5, f"marginal Dice+CE {float(value):.6f} != naive {expected:.6f}"


def test_marginal_loss_invariant_to_mass_between_background_and_unannotated_class():
    logits, labels = loss_case(seed=2, B=1, K=3)
    j = 2
    labels = labels.clone()
    labels[labels == j] = 0
    annotated = torch.tensor([[True, True, False]])
    background = labels == 0
    assert background.any() and (labels == 1).any()
    base = losses.marginal_dice_ce(logits, labels, annotated)
    # move mass between classes 0 and j at background voxels, keeping p0 + pj and p1 fixed
    moved = logits.clone()
    s = torch.logsumexp(logits[:, [0, j]], dim=1)  # log(e^l0 + e^lj)
    for share in (0.02, 0.5, 0.97):
        moved[:, 0] = torch.where(background, s + math.log(share), logits[:, 0])
        moved[:, j] = torch.where(background, s + math.log(1 - share), logits[:, j])
        p_before, p_after = torch.softmax(logits, 1), torch.softmax(moved, 1)
        assert torch.allclose(p_before[:, 0] + p_before[:, j], p_after[:, 0] + p_after[:, j], atol=1e-6)
        value = losses.marginal_dice_ce(moved, labels, annotated)
        assert torch.allclose(value, base, atol=1e-5), \
            f"marginal loss changed {float(base):.6f} -> {float(value):.6f} when p0/p{j} split became {share}"
    # and the plain (all annotated) loss does change: the move is not a no-op
    full = torch.ones_like(annotated)
    assert not torch.allclose(losses.marginal_dice_ce(moved, labels, full), losses.marginal_dice_ce(logits, labels, full),
                              atol=1e-4), "test move did not change the plain loss, so it proves nothing"


def test_marginal_ce_at_background_is_minus_log_p0_plus_pj():
    logits, labels = loss_case(seed=3, B=1, K=3)
    labels = labels.clone()
    labels[labels == 2] = 0
    annotated = torch.tensor([[True, True, False]])
    log_q = losses.marginal_log_probabilities(logits, annotated)
    p = torch.softmax(logits.double(), 1)
    for v in _voxels(labels):
        b, z, y, x = v
        if int(labels[v]) != 0:
            continue
        expected = -math.log(float(p[b, 0, z, y, x] + p[b, 2, z, y, x]))
        got = -float(log_q[b, 0, z, y, x])
        assert abs(got - expected) < 1e-5, f"marginal CE at background voxel {v}: {got:.6f} != -log(p0+p2) {expected:.6f}"
    assert torch.isneginf(log_q[:, 2]).all(), "unannotated class should have q = 0 (log -inf) after merging"
    # the CE part of the loss: marginal Dice+CE minus the naive Dice equals the naive mean CE
    _, ce = naive_marginal(logits, labels, annotated)
    bg_terms = [-math.log(float(p[(v[0], 0) + v[1:]] + p[(v[0], 2) + v[1:]])) for v in _voxels(labels) if int(labels[v]) == 0]
    organ_terms = [-math.log(float(p[(v[0], 1) + v[1:]])) for v in _voxels(labels) if int(labels[v]) == 1]
    assert abs(ce - (sum(bg_terms) + sum(organ_terms)) / labels.numel()) < 1e-9


def test_exclusion_loss_zero_when_all_annotated_nothing_absent():
    logits, labels = loss_case(seed=4)
    annotated = torch.ones(2, 4, dtype=torch.bool)
    absent = torch.zeros(2, 4, dtype=torch.bool)
    value = losses.exclusion_loss(logits, labels, annotated, absent)
    assert float(value) == 0.0, f"exclusion loss {float(value)} with every class annotated and none absent"


def test_exclusion_loss_positive_for_absent_organ_and_matches_naive():
    logits, labels = loss_case(seed=5, B=2, K=4)
    annotated = torch.tensor([[True, True, False, True], [True, True, True, True]])
    absent = torch.tensor([[False, False, False, True], [False, False, False, False]])
    labels = labels.clone()
    labels[0][labels[0] == 2] = 0
    labels[0][labels[0] == 3] = 0  # absent organ has no voxel
    value = losses.exclusion_loss(logits, labels, annotated, absent)
    assert float(value) > 0, "an absent organ with probability must be penalised"
    p = torch.softmax(logits.double(), 1)
    total = 0.0
    for v in _voxels(labels):
        b, z, y, x = v
        for j in range(1, 4):
            excluded = (int(labels[v]) > 0 and not bool(annotated[b, j])) or bool(absent[b, j])
            if excluded:
                total += -math.log(1 - float(p[b, j, z, y, x]))
    expected = total / labels.numel()
    assert abs(float(value) - expected) < 1e-5, f"exclusion loss {float(value):.6f} != naive {expected:.6f}"
    # only an absent organ (no unannotated one): still positive
    only_absent = losses.exclusion_loss(logits[1:], labels[1:], annotated[1:], torch.tensor([[False, False, True, False]]))
    assert float(only_absent) > 0, "absent organ alone gave no exclusion penalty"


def test_weighted_cross_entropy_equals_torch():
    logits, labels = loss_case(seed=6)
    w = torch.tensor([0.1, 2.0, 0.7, 3.0])
    value = losses.weighted_cross_entropy(logits, labels, w)
    reference = F.cross_entropy(logits, labels, weight=w)
    assert torch.allclose(value, reference, atol=1e-6), f"weighted CE {float(value):.6f} != F.cross_entropy {float(reference):.6f}"
    assert torch.allclose(losses.weighted_cross_entropy(logits, labels), F.cross_entropy(logits, labels), atol=1e-6), \
        "unweighted CE != F.cross_entropy"
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :2] = True
    masked = losses.weighted_cross_entropy(logits, labels, w, mask)
    ref_masked = F.cross_entropy(logits[:, :, :2], labels[:, :2], weight=w)
    assert torch.allclose(masked, ref_masked, atol=1e-6), f"masked weighted CE {float(masked):.6f} != {float(ref_masked):.6f}"


def test_weighted_cross_entropy_empty_mask_is_zero():
    logits, labels = loss_case(seed=7)
    logits.requires_grad_(True)
    w = torch.tensor([0.1, 2.0, 0.7, 3.0])
    value = losses.weighted_cross_entropy(logits, labels, w, torch.zeros_like(labels, dtype=torch.float32))
    assert not torch.isnan(value), "weighted CE with an empty mask is NaN"
    assert value.item() == 0.0, f"weighted CE with an empty mask is {value.item()}, not 0"
    value.backward()
    assert torch.isfinite(logits.grad).all(), "gradient of the empty-mask weighted CE is not finite"


# ----------------------------------------------------------------------------------------------
# 6. Every method on degenerate batches

K_M = 4
NET = {"widths": [2, 4, 8], "dropout": 0.0, "feature_layer": 2}


def make_batch(case: str) -> methods.Batch:
    g = torch.Generator().manual_seed(11)
    B_l, B = 2, 3
    labels = torch.zeros(B_l, 8, 8, 8, dtype=torch.long)
    annotated = torch.ones(B_l, K_M, dtype=torch.bool)
    absent = torch.zeros(B_l, K_M, dtype=torch.bool)
    if case == "all_background":
        pass
    elif case == "single_organ_everywhere":
        labels[:] = 2
    elif case == "one_organ_and_background":
        labels[:, 2:6, 3:6, 1:5] = 1
    elif case == "partial_annotation":
        labels[0, 2:6, 3:6, 1:5] = 1
        labels[1, 1:4, 1:4, 1:4] = 3
        annotated[0, 2:] = False  # case 0: only organ 1 contoured
        absent[1, 2] = True  # case 1: organ 2 checked and absent
    elif case == "partial_annotation_all_background":
        annotated[:, 2:] = False  # the crops miss the only contoured organ
    elif case == "only_background_annotated":
        annotated[:, 1:] = False  # nothing annotated but background: every organ unknown
    elif case == "only_background_annotated_beside_full":
        labels[1, 2:6, 3:6, 1:5] = 1
        annotated[0, 1:] = False  # one crop of such a case in a batch with a fully annotated one
    elif case == "no_unlabeled":
        labels[:, 2:6, 3:6, 1:5] = 1
        labels[:, 0:2, 0:2, 0:2] = 3
        B = B_l
    else:
        raise AssertionError(case)
    image = torch.randn(B, 1, 8, 8, 8, generator=g)
    return methods.Batch(image, labels, annotated, absent)


CASES = ("all_background", "single_organ_everywhere", "one_organ_and_background", "partial_annotation",
         "partial_annotation_all_background", "only_background_annotated", "only_background_annotated_beside_full",
         "no_unlabeled")


def run_method(name: str, batch: methods.Batch, network: dict = NET, iteration: int = 60, **options):
    torch.manual_seed(0)
    method = methods.build_method(name, network, K_M, methods.MethodOptions.preset(name, **options), 100)
    out = method(batch, iteration)
    return method, out


def check_finite(method, out, what: str):
    assert "total" in out, f"{what}: no 'total' loss"
    bad = {k: v.item() for k, v in out.items() if not torch.isfinite(v.detach()).all()}
    assert not bad, f"{what}: non-finite losses {bad}"
    out["total"].backward()
    grads = [(n, p.grad) for n, p in method.named_parameters() if p.grad is not None]
    assert grads, f"{what}: total.backward() produced no gradient"
    bad_grads = [n for n, g in grads if not torch.isfinite(g).all()]
    assert not bad_grads, f"{what}: non-finite gradients in {len(bad_grads)} parameters, e.g. {bad_grads[:3]}"
    for buffer_name, buf in method.named_buffers():
        assert torch.isfinite(buf).all(), f"{what}: buffer {buffer_name} not finite"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", methods.METHODS)
def test_method_degenerate_batch_is_finite(name, case):
    method, out = run_method(name, make_batch(case))
    check_finite(method, out, f"{name} on {case}")
    if name == "guidednet":
        for key in ("sup", "cps", "gt", "self", "max", "cons", "rectify", "cgmm"):
            assert key in out, f"guidednet returned no {key!r} loss"


@pytest.mark.parametrize("case", CASES)
def test_eq8_loss_gt_is_finite_on_degenerate_batches(case):
    # The default (marginal) L_gt is covered by test_method_degenerate_batch_is_finite; there a crop
    # of one organ and no background, which leaves background without a mixture component, gave NaN.
    method, out = run_method("guidednet", make_batch(case), gt_voxels="annotated")
    check_finite(method, out, f"guidednet, gt_voxels=annotated, on {case}")


def test_guidednet_coarse_feature_layer():
    network = {**NET, "feature_layer": 1}
    for case in ("one_organ_and_background", "partial_annotation", "no_unlabeled"):
        method, out = run_method("guidednet", make_batch(case), network)
        assert method.networks["A"].feature_layer == 1
        check_finite(method, out, f"guidednet feature_layer=1 on {case}")
        assert float(out["gt"]) > 0, f"feature_layer=1 on {case}: L_gt is {float(out['gt'])}"


def test_guidednet_mixture_keeps_background_when_no_crop_is_fully_annotated():
    """Partial data often has no fully annotated case (OpenKBP at 10%: neither training case
    annotates every organ). The mixture must still have a background component, or G' sends
    every unlabeled voxel to an organ. So marking an organ that no crop holds as unannotated
    must not change the mixture the unlabeled crops see: their L_cons is the same."""
    full = make_batch("one_organ_and_background")  # organ 1 in the labeled crops, organs 2-3 in none
    partial = methods.Batch(full.image, full.labels, full.annotated.clone(), full.absent)
    partial.annotated[:, 3] = False
    _, out_full = run_method("guidednet", full)
    _, out_partial = run_method("guidednet", partial)
    assert float(out_full["cons"]) > 0, "L_cons is 0 on the fully annotated batch: the test cannot tell"
    assert torch.allclose(out_partial["cons"], out_full["cons"], rtol=1e-5), (
        f"L_cons {float(out_partial['cons']):.6g} with organ 3 unannotated (and in no crop) != "
        f"{float(out_full['cons']):.6g} with every organ annotated: the partial crops' mixture lost a component")


@pytest.mark.parametrize("name", ("cps", "guidednet"))
def test_weak_strong_views_feed_b_a_strong_view_and_gate_pseudo_labels(name):
    """``pseudo_views=weak-strong``: A sees the crop, B a voxel-aligned strong view of it, and a
    pseudo-label teaches only where its network is confident enough."""
    batch = make_batch("one_organ_and_background")
    seen = {}
    torch.manual_seed(0)
    method = methods.build_method(name, NET, K_M, methods.MethodOptions.preset(name, pseudo_views="weak-strong"), 100)
    for key in ("A", "B"):
        method.networks[key].register_forward_pre_hook(lambda _, args, key=key: seen.__setitem__(key, args[0]))
    out = method(batch, 60)
    check_finite(method, out, f"{name} with weak-strong views")
    assert torch.equal(seen["A"], batch.image) and not torch.equal(seen["B"], batch.image)
    assert seen["B"].shape == batch.image.shape
    _, everything = run_method(name, batch, pseudo_views="weak-strong", confidence=0.0)
    assert float(everything["confident"]) == 1.0 and float(everything["cps"]) > 0
    _, nothing = run_method(name, batch, pseudo_views="weak-strong", confidence=0.999)
    assert float(nothing["confident"]) == 0.0 and float(nothing["cps"]) == 0.0
    for case in CASES:
        method, out = run_method(name, make_batch(case), pseudo_views="weak-strong")
        check_finite(method, out, f"{name} weak-strong on {case}")


def test_guidednet_ktcps_weights_updated_and_finite():
    method, out = run_method("guidednet", make_batch("one_organ_and_background"))
    for name in ("A", "B"):
        w = method.kt[name].weights
        assert torch.isfinite(w).all() and (w > 0).all(), f"KT-CPS weights of {name} not finite/positive: {w.tolist()}"


# ----------------------------------------------------------------------------------------------
# 7. UNet3D


@pytest.mark.parametrize("layer,channels,size", [(1, 8, 4), (2, 4, 8)])
def test_unet_output_shapes(layer, channels, size):
    torch.manual_seed(0)
    net = UNet3D(in_channels=1, out_channels=3, widths=[4, 8, 16], dropout=0.0, feature_layer=layer)
    assert net.feature_channels == channels, f"feature_channels {net.feature_channels} != {channels} for layer {layer}"
    logits, features = net(torch.randn(2, 1, 8, 8, 8))
    assert logits.shape == (2, 3, 8, 8, 8), f"logits shape {tuple(logits.shape)}"
    assert features.shape == (2, channels, size, size, size), \
        f"layer {layer} features shape {tuple(features.shape)} != (2, {channels}, {size}, {size}, {size})"
    with pytest.raises(ValueError):
        UNet3D(widths=[4, 8, 16], feature_layer=3)


def test_unet_kaiming_and_xavier_differ():
    def make(scheme):
        torch.manual_seed(123)
        net = UNet3D(out_channels=3, widths=[4, 8, 16], dropout=0.0, feature_layer=2)
        torch.manual_seed(7)
        return initialise(net, scheme)

    a, b = make("kaiming"), make("xavier")
    convs = [(n, m) for n, m in a.named_modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs
    b_modules = dict(b.named_modules())
    for name, conv_a in convs:
        conv_b = b_modules[name]
        assert not torch.allclose(conv_a.weight, conv_b.weight), f"{name}: kaiming and xavier weights are equal"
        # same random draws scaled by std_kaiming / std_xavier = sqrt((fan_in + fan_out) / fan_in)
        fan_in = conv_a.weight.shape[1] * conv_a.weight[0, 0].numel()
        fan_out = conv_a.weight.shape[0] * conv_a.weight[0, 0].numel()
        ratio = math.sqrt((fan_in + fan_out) / fan_in)
        assert torch.allclose(conv_a.weight, conv_b.weight * ratio, rtol=1e-4, atol=1e-7), \
            f"{name}: weights are not Kaiming-normal vs Xavier-normal draws (expected ratio {ratio:.4f})"
        if conv_a.bias is not None:
            assert (conv_a.bias == 0).all() and (conv_b.bias == 0).all(), f"{name}: biases not zeroed"
    with pytest.raises(ValueError):
        initialise(a, "orthogonal")


def test_unet_config_round_trip():
    torch.manual_seed(0)
    net = UNet3D(in_channels=1, out_channels=3, widths=[4, 8, 16], dropout=0.25, feature_layer=1)
    config = net.config()
    rebuilt = build_network(config)
    assert isinstance(rebuilt, UNet3D), f"build_network gave {type(rebuilt).__name__}"
    assert rebuilt.config() == config, f"config changed on round trip: {rebuilt.config()} != {config}"
    rebuilt.load_state_dict(net.state_dict())  # same parameter layout
    net.eval(), rebuilt.eval()
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        (la, fa), (lb, fb) = net(x), rebuilt(x)
    assert torch.allclose(la, lb) and torch.allclose(fa, fb), "rebuilt network computes something else"
    with pytest.raises(ValueError):
        build_network({**config, "architecture": "nope"})


@pytest.mark.parametrize("name", ["supervised", "cps", "guidednet"])
def test_deep_supervision_teaches_the_coarse_heads_the_labels_at_their_resolution(name):
    # Each coarse head is scored against the labels picked at its resolution: a head that already
    # predicts exactly those labels adds (almost) nothing, and one that predicts the wrong organ adds.
    batch = make_batch("partial_annotation")
    net = {**NET, "deep_supervision": 1}
    method, out = run_method(name, batch, network=net)
    check_finite(method, out, f"{name} with deep supervision")
    for network in method.networks.values():
        head = network.deep_heads[0]
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0, "the coarse head is not trained"
    full, _ = method.networks["A"](batch.image)
    coarse_labels = batch.labels[:, ::2, ::2, ::2]
    right = 20.0 * F.one_hot(coarse_labels, K_M).movedim(-1, 1).float()
    wrong = 20.0 * F.one_hot((coarse_labels + 1) % K_M, K_M).movedim(-1, 1).float()
    scores = {}
    for what, coarse in (("right", right), ("wrong", wrong)):
        method.networks["A"].deep_logits = [coarse]  # the labeled crops' rows: L_sup reads no other
        scores[what] = method.supervised(full, batch, method.networks["A"]).item()
    plain = method.supervised(full, batch).item()
    assert scores["right"] < plain < scores["wrong"], scores | {"without": plain}
    assert scores["right"] == pytest.approx(plain / 1.5, rel=0.05), "the full-resolution term's weight is not 1 / 1.5"


def test_deep_supervision_heads_are_in_the_bundle_and_unused_at_inference():
    torch.manual_seed(0)
    net = UNet3D(in_channels=1, out_channels=3, widths=[4, 8, 16, 32], dropout=0.0, feature_layer=3,
                 deep_supervision=2)
    x = torch.randn(2, 1, 16, 16, 8)
    logits, _ = net(x)
    assert [tuple(d.shape) for d in net.deep_logits] == [(2, 3, 8, 8, 4), (2, 3, 4, 4, 2)]
    rebuilt = build_network(net.config())
    rebuilt.load_state_dict(net.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        eval_logits, _ = rebuilt(x)
    assert rebuilt.deep_logits == [] and eval_logits.shape == logits.shape
    with pytest.raises(ValueError, match="deep_supervision 2 must be in 0..1"):
        UNet3D(widths=[4, 8, 16], feature_layer=2, deep_supervision=2)


# ----------------------------------------------------------------------------------------------
# issue 18: the default GuidedNet's mixture and class weights


def test_mixture_memory_keeps_the_component_of_a_class_absent_from_the_batch():
    """Class 2 is in the first step's labeled crops and missing from the second: the posterior of
    the second step still has its component (G' > 0 where features look like class 2), where
    the per-batch mixture of the paper gives it G' = 0 everywhere."""
    torch.manual_seed(0)
    K, C = 3, 2
    centres = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])

    def crop(classes):
        labels = torch.tensor(classes).repeat_interleave(8).view(1, 2, 2, -1)  # (1, 2, 2, 2 * len)
        features = centres[labels].movedim(-1, 1) + 0.1 * torch.randn(1, C, *labels.shape[1:])
        probabilities = F.one_hot(labels, K).movedim(-1, 1).float()
        return features, labels, probabilities

    memory = cgmm.MixtureMemory(K, C, momentum=0.9)
    first = cgmm.fit(*crop([0, 1, 2]), None, K, tied=True)
    memory.blend(first)
    features, labels, probabilities = crop([0, 1])  # class 2 missing this step
    per_batch = cgmm.fit(features, labels, probabilities, None, K, tied=True)
    assert not bool(per_batch.present[2])
    remembered = memory.blend(per_batch)
    assert bool(remembered.present[2])
    assert torch.allclose(remembered.mean[2], first.mean[2])
    probe = centres[2].view(1, C, 1, 1, 1)  # a voxel that looks like class 2
    assert cgmm.log_posterior(probe, remembered).exp()[0, 2].item() > 0.9
    assert cgmm.log_posterior(probe, per_batch).exp()[0, 2].item() == 0.0
    # the step's own statistics still carry the gradient into the features
    features.requires_grad_(True)
    blended = memory.blend(cgmm.fit(features, labels, probabilities, None, K, tied=True), update=False)
    blended.mean[1].sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_balanced_ktcps_weights_start_from_the_labeled_histogram_and_stay_bounded():
    """The paper's form starts every class at 1 and floors the best-learned class at 0.1 against
    organs at up to K; the balanced form starts from the label histogram, keeps the best-learned
    class at 1 and caps every other class at kt_cap."""
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10).view(1, 10, 10, 10)
    mask = torch.ones_like(labels, dtype=torch.bool)
    paper = ClassWeights(3, momentum=0.99, floor=0.1, form="paper")
    balanced = ClassWeights(3, momentum=0.99, floor=0.1, form="balanced", cap=2.0)
    for weights in (paper, balanced):
        weights.update(labels, labels, mask)  # a perfect prediction: correct counts = histogram
    ratio = torch.log(torch.tensor([1.0, 10.0, 90.0]))
    assert torch.allclose(paper.weights, 0.99 + 0.01 * (3 * ratio / ratio.max()).clamp_min(0.1), atol=1e-5)
    start = (1 + ratio / ratio.mean()).clamp(0.1, 2.0)
    assert torch.allclose(balanced.weights, start, atol=1e-4)  # the EMA step from the start changes nothing
    assert balanced.weights[0] == 1.0 and balanced.weights.max() <= 2.0


def test_guidednet_paper_preset_is_the_literal_objective():
    paper = methods.MethodOptions.preset("guidednet-paper", mixing="frequency", tied_variance=True)
    assert (paper.mixture_momentum, paper.tied_variance, paper.mixing, paper.rectify_target, paper.ramp_cgmm,
            paper.kt_form, paper.kt_floor, paper.gt_voxels) == (0.0, False, "uniform", "soft", False, "paper", 0.1,
                                                                "annotated")
    default = methods.MethodOptions.preset("guidednet")
    assert default.mixture_momentum > 0 and default.rectify_target == "agree" and default.kt_form == "balanced"
    assert default.gt_voxels == "marginal"


def test_rectification_target_is_no_worse_than_the_head_on_a_phantom(tiny_bundle):
    """With the network of a trained bundle, G' fitted on a training phantom is used on an unseen
    one, as L_rectify uses it. The paper's target (soft G' on every voxel, per-class variances,
    uniform mixing) is a worse classifier than the head it would teach; the default target
    (tied variance, frequency mixing, only where G' agrees with a second prediction) is at least
    as accurate as the head where it teaches."""
    import numpy as np
    import SimpleITK as sitk
    from conftest import three_organ_phantom

    from GuidedSegLib.bundle import load_networks
    from GuidedSegLib.preprocessing import PreprocessingPlan, preprocess

    metadata, networks = load_networks(tiny_bundle)
    net = networks["A"]
    plan = PreprocessingPlan.from_dict(metadata["preprocessing"])
    K = len(metadata["labels"])

    def prepared(seed):
        image, label = three_organ_phantom(seed)
        out = preprocess(image, plan, label)
        x = torch.from_numpy(sitk.GetArrayFromImage(out.image))[None, None]
        y = torch.from_numpy(sitk.GetArrayFromImage(out.label).astype(np.int64))[None]
        return x, y

    (x_l, y_l), (x, truth) = prepared(700), prepared(790)  # a training case; an unseen phantom
    assert all(n % net.divisor == 0 for n in x.shape[2:])
    with torch.no_grad():
        logits_l, features_l = net(x_l)
        logits, features = net(x)
        generator = torch.Generator().manual_seed(0)
        second, _ = net(x + 0.05 * torch.randn(x.shape, generator=generator))  # another view's prediction
    probabilities_l = torch.softmax(logits_l, 1)
    head = logits.argmax(1)
    head_accuracy = (head == truth).float().mean().item()

    paper = cgmm.fit(features_l, y_l, probabilities_l, None, K, mixing="uniform", tied=False)
    paper_target = cgmm.log_posterior(features, paper).argmax(1)
    paper_accuracy = (paper_target == truth).float().mean().item()

    default = cgmm.fit(features_l, y_l, probabilities_l, None, K, mixing="frequency", tied=True)
    default = cgmm.MixtureMemory(K, features.shape[1]).blend(default)
    target = cgmm.log_posterior(features, default).argmax(1)
    taught = (target == second.argmax(1)) & default.present[target]
    target_accuracy = (target == truth)[taught].float().mean().item()
    print(f"head {head_accuracy:.3f}, paper target {paper_accuracy:.3f}, default target {target_accuracy:.3f} "
          f"on {taught.float().mean().item():.0%} of voxels")
    assert taught.float().mean() > 0.5  # the gate keeps most voxels: the term still teaches
    assert target_accuracy >= head_accuracy


# ----------------------------------------------------------------------------------------------
# The authors' code's form of the CGMM terms


def test_authors_prototypes_and_similarity_match_naive_formulas():
    torch.manual_seed(3)
    features = torch.randn(2, 3, 2, 3, 2, dtype=torch.float64)
    labels = torch.tensor([[[[0, 1], [1, 1], [0, 0]], [[0, 0], [1, 0], [0, 1]]],
                           [[[0, 0], [0, 0], [0, 0]], [[0, 2], [0, 0], [0, 0]]]])
    mask = torch.ones_like(labels, dtype=torch.bool)
    mask[0, 0, 0, 1] = False  # one class-1 voxel of crop 0 is not annotated
    prototypes, present = cgmm.class_prototypes(features, labels, mask, 3)
    for b in range(2):
        for k in range(3):
            voxels = [v for v in _voxels(labels[b]) if labels[b][v] == k and mask[b][v]]
            assert bool(present[b, k]) == bool(voxels)
            expected = [sum(float(features[b, c][v]) for v in voxels) / max(len(voxels), 1) for c in range(3)]
            assert prototypes[b, k].tolist() == pytest.approx(expected, abs=1e-6)
    similarity = cgmm.prototype_similarity(features, prototypes)
    for b, k in [(0, 1), (1, 2)]:
        for v in _voxels(labels[b]):
            distance = sum(abs(float(features[b, c][v] - prototypes[b, k, c])) for c in range(3)) / 3
            assert float(similarity[b, k][v]) == pytest.approx(math.exp(-distance ** 2), abs=1e-6)
    pooled, anywhere = cgmm.pooled_prototypes(prototypes, present)
    assert anywhere.tolist() == [True, True, True]
    assert pooled[1].tolist() == pytest.approx(prototypes[0, 1].tolist())  # only crop 0 holds class 1
    assert pooled[0].tolist() == pytest.approx(((prototypes[0, 0] + prototypes[1, 0]) / 2).tolist())


def test_authors_halved_bce_averages_over_the_crops_classes_and_keeps_the_target_gradient():
    prediction = torch.tensor([[[[0.9]], [[0.2]], [[0.5]]]], dtype=torch.float64)  # (1, 3, 1, 1)
    target = torch.tensor([[[[1.0]], [[0.0]], [[0.3]]]], dtype=torch.float64, requires_grad=True)
    classes = torch.tensor([[True, True, False]])
    loss = cgmm.halved_bce(prediction, target, classes)
    expected = (-math.log(0.9) - math.log(0.8)) / 2 / 2  # class 2 is not in the crop
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert target.grad[0, 0].abs().sum() > 0 and target.grad[0, 2].abs().sum() == 0


def test_authors_prototype_separation_is_mean_over_present_pairs():
    pooled = torch.tensor([[0.0, 0.0], [1.0, 3.0], [2.0, 2.0]])
    present = torch.tensor([True, True, False])
    assert float(cgmm.prototype_separation(pooled, present)) == pytest.approx(math.exp(-4.0))
    assert float(cgmm.prototype_separation(pooled, torch.tensor([True, False, False]))) == 0.0


def test_guidednet_authors_variant_teaches_through_an_undetached_similarity():
    options = methods.MethodOptions.preset("guidednet-authors")
    assert (options.detach_targets, options.lambda_g, options.mixture_momentum) == (False, 1.0, 0.0)
    batch = make_batch("one_organ_and_background")
    gradients = {}
    for detach in (False, True):
        torch.manual_seed(0)
        method = methods.build_method("guidednet-authors", NET, K_M, replace(options, detach_targets=detach), 100)
        out = method(batch, 60)
        assert 0 < out["acc_g"].item() <= 1 and out["gt"].item() > 0
        method.terms["self"].backward()
        gradients[detach] = torch.cat([p.grad.flatten() for p in method.networks["A"].parameters() if p.grad is not None])
    assert not torch.allclose(gradients[False], gradients[True]), \
        "L_self's gradient is the same with the target detached: the authors' form must teach the features too"


def test_self_target_agree_stops_l_self_teaching_the_head_to_miss_an_organ_the_mixture_misses():
    """A one-voxel organ has a frequency prior that G does not overcome. With the soft target
    (Eq. 9), L_self pushes the head's logit of that organ down on the very voxel annotated as
    it, against L_sup; with ``self_target: agree`` it leaves that voxel alone."""
    batch = make_batch("one_organ_and_background")
    batch.labels[0, 0, 0, 0] = 3
    network = {**NET, "feature_layer": 1}  # features at stride 2: the organ is 1 of 128 labeled feature voxels
    pushed = {}
    for target in ("soft", "agree"):
        torch.manual_seed(0)
        options = replace(methods.MethodOptions.preset("guidednet"), self_target=target)
        method = methods.build_method("guidednet", network, K_M, options, 100)
        kept = []

        def keep_logits(module, inputs, output):
            output[0].retain_grad()
            kept.append(output[0])

        method.networks["A"].register_forward_hook(keep_logits)
        method(batch, 60)
        assert method.terms["self"].item() > 0, f"{target}: L_self is 0, the test cannot tell"
        method.terms["self"].backward()
        pushed[target] = kept[0].grad[0, :, 0, 0, 0]
    assert pushed["soft"][3] > 0, \
        f"soft L_self's gradient on the organ's logit at its own voxel is {pushed['soft'][3].item():.3g}: G did not miss it"
    assert torch.count_nonzero(pushed["agree"]) == 0, \
        f"with self_target=agree L_self still acts on the voxel G misses: {pushed['agree'].tolist()}"
