"""Segmentation losses that understand partially annotated cases (methods.md section 3).

Shapes: logits and probabilities ``(B, K, *spatial)``; hard labels ``(B, *spatial)`` long;
``annotated`` ``(B, K)`` bool, True for the classes contoured (or checked) in that crop's case,
background always True; masks ``(B, *spatial)`` float or bool.

With every class annotated the marginal loss is the plain Dice + CE (a test holds it to MONAI's
``DiceCELoss``); with some classes unannotated their probability is merged with background, so a
network is never taught that an organ nobody contoured is background (Shi et al., MedIA 2021).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .distributed import global_mean

SMOOTH = 1e-5  # numerator and denominator smoothing of soft Dice (MONAI's default)


def marginal_log_probabilities(logits: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """log q with q_bg = p_0 + sum of unannotated p_k, q_k = p_k for annotated k, q_k = 0 otherwise.

    Returns ``(B, K, *spatial)``; unannotated classes hold -inf (q = 0).
    """
    log_p = F.log_softmax(logits.float(), dim=1)
    view = annotated.shape + (1,) * (logits.dim() - 2)
    keep = annotated.clone()
    keep[:, 0] = True
    merged = ~keep
    merged[:, 0] = True  # background and every unannotated class are merged into channel 0
    neg_inf = torch.tensor(float("-inf"), device=logits.device)
    log_bg = torch.logsumexp(torch.where(merged.view(view), log_p, neg_inf), dim=1)
    log_q = torch.where(keep.view(view), log_p, neg_inf)
    return torch.cat([log_bg.unsqueeze(1), log_q[:, 1:]], dim=1)


def soft_dice_loss(probabilities: torch.Tensor, target: torch.Tensor, classes: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 - soft Dice per (sample, class), averaged over the chosen classes of each sample, then
    over samples that have any voxel in ``mask``.

    ``target`` ``(B, K, *spatial)`` one-hot or soft; ``classes`` ``(B, K)`` bool selects the
    classes each sample averages over (default all).
    """
    spatial = tuple(range(2, probabilities.dim()))
    if mask is not None:
        m = mask.unsqueeze(1).to(probabilities.dtype)
        probabilities, target = probabilities * m, target * m
    intersection = (probabilities * target).sum(spatial)
    denominator = probabilities.sum(spatial) + target.sum(spatial)
    loss = 1.0 - (2.0 * intersection + SMOOTH) / (denominator + SMOOTH)  # (B, K)
    if classes is None:
        classes = torch.ones_like(loss, dtype=torch.bool)
    per_sample = (loss * classes).sum(1) / classes.sum(1).clamp_min(1)
    used = torch.ones_like(per_sample, dtype=torch.bool) if mask is None else mask.flatten(1).any(1)
    return global_mean((per_sample * used).sum(), used.sum())


def marginal_dice_ce(logits: torch.Tensor, label: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """1/2 (marginal soft Dice + marginal CE); equals 1/2 (Dice + CE) when all is annotated."""
    log_q = marginal_log_probabilities(logits, annotated)
    ce = -log_q.gather(1, label.unsqueeze(1)).squeeze(1)
    ce = global_mean(ce.sum(), ce.numel())
    target = F.one_hot(label, logits.shape[1]).movedim(-1, 1).to(log_q.dtype)
    classes = annotated.clone()
    classes[:, 0] = True
    dice = soft_dice_loss(log_q.exp(), target, classes)
    return 0.5 * (dice + ce)


def exclusion_loss(logits: torch.Tensor, label: torch.Tensor, annotated: torch.Tensor,
                   absent: torch.Tensor) -> torch.Tensor:
    """Penalty -log(1 - p_j) where organ j cannot be: inside another annotated organ for every
    unannotated j, and everywhere for organs checked and found absent. Mean over voxels.
    """
    p = torch.softmax(logits.float(), dim=1)
    view = annotated.shape + (1,) * (logits.dim() - 2)
    organ_voxel = (label > 0).unsqueeze(1)
    unannotated = (~annotated).clone()
    unannotated[:, 0] = False
    known_absent = absent.clone()
    known_absent[:, 0] = False
    excluded = (organ_voxel & unannotated.view(view)) | known_absent.view(view)  # (B, K, *spatial)
    penalty = -torch.log1p(-p.clamp(max=1 - 1e-6)) * excluded
    return global_mean(penalty.sum(), label.numel())


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Class-weighted CE normalised by the weight of the voxels used (as ``F.cross_entropy``).

    Never NaN: with every weight positive the denominator is positive whenever a voxel is used,
    and an empty mask gives 0.
    """
    nll = F.cross_entropy(logits.float(), target, reduction="none")
    w = torch.ones_like(nll) if weights is None else weights.to(nll)[target]
    if mask is not None:
        w = w * mask.to(w.dtype)
    return global_mean((w * nll).sum(), w.sum())


def soft_dice_ce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                 hard: bool = False) -> torch.Tensor:
    """1/2 (soft Dice + CE) against a probability target ``(B, K, *spatial)``, over the voxels in
    ``mask``. ``hard``: use the target's arg-max instead (methods.md 1.3 option).
    """
    target = target.float()
    if hard:
        target = F.one_hot(target.detach().argmax(1), target.shape[1]).movedim(-1, 1).float()
    log_p = F.log_softmax(logits.float(), dim=1)
    ce = -(target * log_p).sum(1)
    if mask is not None:
        m = mask.to(ce.dtype)
        ce_value = global_mean((ce * m).sum(), m.sum())
    else:
        ce_value = global_mean(ce.sum(), ce.numel())
    dice = soft_dice_loss(log_p.exp(), target, mask=mask)
    return 0.5 * (dice + ce_value)
