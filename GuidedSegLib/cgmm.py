"""3D-CGMM: a class-conditional Gaussian mixture over decoder features (methods.md 1.2-1.3).

The statistics come from one network's labeled crops (annotated voxels only) and give a
posterior G over classes for every voxel of every crop: G on labeled crops is trained against
the ground truth, G' on unlabeled crops is how the labeled data guides the unlabeled data.

Memory stays O(voxels x (K + C)): the variance is accumulated class by class and the
log-likelihood is the quadratic form expanded into matrix products; no (voxels x K x C) tensor.
Shapes: features ``(B, C, *spatial)``, labels ``(B, *spatial)`` long, probabilities
``(B, K, *spatial)``, masks ``(B, *spatial)`` bool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .distributed import all_sum, all_sum_differentiable, global_mean
from .losses import soft_dice_ce


@dataclass
class CGMMParameters:
    """mean ``(K, C)``, var ``(K, C)``, log_mixing ``(K,)``, present ``(K,)`` bool."""

    mean: torch.Tensor
    var: torch.Tensor
    log_mixing: torch.Tensor
    present: torch.Tensor


def fit(features: torch.Tensor, labels: torch.Tensor, probabilities: torch.Tensor, mask: torch.Tensor | None,
        num_classes: int, var_floor: float = 1e-4, mixing: str = "uniform") -> CGMMParameters:
    """Class means (Eq. 3), prediction-weighted diagonal variances (Eq. 4) and mixing coefficients,
    pooled over every labeled crop (of every process under DDP), from voxels where ``mask``
    (``None``: every voxel).

    Gradients flow into the features through mean and variance; ``probabilities`` are weights
    and are used detached.
    """
    f = features.float().movedim(1, -1)  # (..., C)
    y = labels
    p = probabilities.detach().float().movedim(1, -1)  # (..., K)
    if mask is None:
        f, y, p = f.reshape(-1, f.shape[-1]), y.reshape(-1), p.reshape(-1, p.shape[-1])
    else:
        f, y, p = f[mask], y[mask], p[mask]  # (N, C), (N,), (N, K)
    one_hot = F.one_hot(y, num_classes).to(f.dtype)  # (N, K)
    counts = all_sum(one_hot.sum(0))  # (K,)
    present = counts > 0
    mean = all_sum_differentiable(one_hot.T @ f) / counts.clamp_min(1).unsqueeze(1)  # (K, C)
    weight = all_sum(p.sum(0))  # (K,)
    spread = torch.stack([p[:, k] @ (f - mean[k]).square() for k in range(num_classes)])  # (K, C)
    var = all_sum_differentiable(spread) / weight.clamp_min(1e-8).unsqueeze(1) + var_floor
    if mixing == "uniform":
        log_mixing = torch.full((num_classes,), -math.log(num_classes), device=f.device)
    elif mixing == "frequency":
        log_mixing = torch.log(counts.clamp_min(1) / counts.sum().clamp_min(1))
    else:
        raise ValueError(f"unknown CGMM mixing {mixing!r}: use 'uniform' or 'frequency'")
    return CGMMParameters(mean, var, log_mixing, present)


def log_posterior(features: torch.Tensor, params: CGMMParameters) -> torch.Tensor:
    """log G ``(B, K, *spatial)``: Bayes posterior of the diagonal Gaussians (Eq. 5-7).

    Classes without a mean (absent from the labeled crops) get -inf (G = 0); the posterior
    normalises over the present classes.
    """
    shape = features.shape
    f = features.float().movedim(1, -1).reshape(-1, shape[1])  # (N, C)
    inv_var = params.var.reciprocal()  # (K, C)
    quadratic = (f.square() @ inv_var.T - 2.0 * f @ (params.mean * inv_var).T
                 + (params.mean.square() * inv_var).sum(1))  # (N, K)
    log_norm = torch.log(2.0 * math.pi * params.var).sum(1)  # (K,)
    log_joint = params.log_mixing - 0.5 * (quadratic + log_norm)
    log_joint = log_joint.masked_fill(~params.present, float("-inf"))
    log_g = log_joint - torch.logsumexp(log_joint, dim=1, keepdim=True)
    return log_g.reshape(shape[0], *shape[2:], -1).movedim(-1, 1)


# ----------------------------------------------------------------------------------------------
# Losses (Eq. 8-13)


def loss_gt(log_g: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_gt: cross-entropy of G against the ground truth on the masked labeled voxels (Eq. 8)."""
    nll = -log_g.gather(1, labels.unsqueeze(1)).squeeze(1)
    nll = torch.where(mask, nll, torch.zeros_like(nll))  # unmasked voxels may hold -inf * 0
    return global_mean(nll.sum(), mask.sum())


def loss_self(probabilities: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
              present: torch.Tensor) -> torch.Tensor:
    """L_self: binary CE of the network's P against G as a soft target, per present class,
    over the masked labeled voxels, averaged over present classes (Eq. 9)."""
    p = probabilities.float().clamp(1e-6, 1 - 1e-6)
    bce = -(target * torch.log(p) + (1 - target) * torch.log1p(-p))  # (B, K, *spatial)
    m = mask.unsqueeze(1).to(bce.dtype)
    spatial = [0] + list(range(2, bce.dim()))
    per_class = global_mean((bce * m).sum(spatial), m.sum())  # (K,)
    return (per_class * present).sum() / present.sum().clamp_min(1)


def loss_max(params: CGMMParameters) -> torch.Tensor:
    """L_max: mean over pairs of present classes of exp(-||mu_k - mu_v||^2 / C) (Eq. 10)."""
    mean = params.mean[params.present]
    k = mean.shape[0]
    if k < 2:
        return params.mean.sum() * 0.0
    distance = torch.cdist(mean, mean).square() / mean.shape[1]
    upper = torch.triu_indices(k, k, offset=1, device=mean.device)
    return torch.exp(-distance[upper[0], upper[1]]).mean()


def loss_consistency(g_a: torch.Tensor, g_b: torch.Tensor) -> torch.Tensor:
    """L_cons: mean squared difference of the two networks' G' on unlabeled crops (Eq. 11)."""
    difference = (g_a.float() - g_b.float()).square()
    return global_mean(difference.sum(), difference.numel())


def loss_rectify(logits: torch.Tensor, g: torch.Tensor, mask: torch.Tensor, hard: bool = False,
                 detach: bool = True) -> torch.Tensor:
    """L_rectify term L_s(p, G'): 1/2 (soft Dice + CE) with G' as target (Eq. 13), detached
    unless ``detach`` is False (the authors' code)."""
    return soft_dice_ce(logits, g.detach() if detach else g, mask, hard=hard)
