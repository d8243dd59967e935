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
from torch import nn
from torch.nn import functional as F

from .distributed import all_sum, all_sum_differentiable, global_mean
from .losses import marginal_log_probabilities, soft_dice_ce


@dataclass
class CGMMParameters:
    """mean ``(K, C)``, var ``(K, C)``, log_mixing ``(K,)``, present ``(K,)`` bool, counts ``(K,)``
    (the labeled voxels each class was fitted on)."""

    mean: torch.Tensor
    var: torch.Tensor
    log_mixing: torch.Tensor
    present: torch.Tensor
    counts: torch.Tensor | None = None


def fit(features: torch.Tensor, labels: torch.Tensor, probabilities: torch.Tensor, mask: torch.Tensor | None,
        num_classes: int, var_floor: float = 1e-4, mixing: str = "uniform", tied: bool = False) -> CGMMParameters:
    """Class means (Eq. 3), prediction-weighted diagonal variances (Eq. 4) and mixing coefficients,
    pooled over every labeled crop (of every process under DDP), from voxels where ``mask``
    (``None``: every voxel). ``tied``: one variance per channel shared by every class (the
    classes' variances averaged with their prediction weights); per-class variances let a tight
    class claim far-away voxels with near-certainty.

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
    if tied:
        var = (all_sum_differentiable(spread).sum(0) / weight.sum().clamp_min(1e-8) + var_floor).expand(num_classes, -1)
    else:
        var = all_sum_differentiable(spread) / weight.clamp_min(1e-8).unsqueeze(1) + var_floor
    if mixing == "uniform":
        log_mixing = torch.full((num_classes,), -math.log(num_classes), device=f.device)
    elif mixing == "frequency":
        log_mixing = torch.log(counts.clamp_min(1) / counts.sum().clamp_min(1))
    else:
        raise ValueError(f"unknown CGMM mixing {mixing!r}: use 'uniform' or 'frequency'")
    return CGMMParameters(mean, var, log_mixing, present, counts)


class MixtureMemory(nn.Module):
    """Moving averages of one network's mixture statistics across steps (buffers, saved with the
    model, so ``--resume`` keeps them).

    A class missing from a step's labeled crops keeps its last component instead of dropping out
    of the posterior (G' = 0 for it on every unlabeled voxel, which the soft targets then teach).
    The step's own statistics enter with weight ``1 - momentum`` and carry the gradient; the
    memory is detached. Mixing coefficients come from the averaged class frequencies.
    """

    def __init__(self, num_classes: int, channels: int, momentum: float = 0.9):
        super().__init__()
        if not 0 <= momentum < 1:
            raise ValueError(f"mixture momentum {momentum} must be in [0, 1)")
        self.momentum = float(momentum)
        self.register_buffer("mean", torch.zeros(num_classes, channels))
        self.register_buffer("var", torch.ones(num_classes, channels))
        self.register_buffer("share", torch.zeros(num_classes))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))

    def blend(self, params: CGMMParameters, mixing: str = "frequency", update: bool = True) -> CGMMParameters:
        m = self.momentum
        now = params.present
        old = self.seen
        both = (now & old).unsqueeze(1)
        mean = torch.where(both, m * self.mean + (1 - m) * params.mean, torch.where(now.unsqueeze(1), params.mean, self.mean))
        var = torch.where(both, m * self.var + (1 - m) * params.var, torch.where(now.unsqueeze(1), params.var, self.var))
        share_now = params.counts.float() / params.counts.sum().clamp_min(1)
        share = torch.where(old, m * self.share + (1 - m) * share_now, share_now)
        share = torch.where(now | old, share, torch.zeros_like(share))
        present = now | old
        if update:
            with torch.no_grad():
                self.mean.copy_(mean.detach())
                self.var.copy_(var.detach())
                self.share.copy_(share)
                self.seen.copy_(present)
        log_mixing = frequency_log_mixing(share) if mixing == "frequency" else params.log_mixing
        return CGMMParameters(mean, var, log_mixing, present, params.counts)

    def current(self, mixing: str = "frequency") -> CGMMParameters:
        """The remembered mixture as it stands (what a bundle keeps for inference-time posteriors)."""
        k = self.mean.shape[0]
        log_mixing = frequency_log_mixing(self.share) if mixing == "frequency" else \
            torch.full((k,), -math.log(k), device=self.mean.device)
        return CGMMParameters(self.mean.clone(), self.var.clone(), log_mixing, self.seen.clone())

    def take(self, params: CGMMParameters) -> None:
        """Start from ``params`` (a parent bundle's mixture, as :meth:`current` gave it)."""
        with torch.no_grad():
            self.mean.copy_(params.mean)
            self.var.copy_(params.var)
            self.seen.copy_(params.present)
            share = params.log_mixing.exp() * params.present
            self.share.copy_(share / share.sum().clamp_min(1e-12))


def frequency_log_mixing(share: torch.Tensor) -> torch.Tensor:
    """log mixing coefficients ``(K,)`` from class shares ``(K,)`` (normalised here; floored at 1e-8)."""
    return torch.log((share / share.sum().clamp_min(1e-12)).clamp_min(1e-8))


MIXTURE_PREFIX = "cgmm"


def mixture_tensors(mixtures: dict[str, CGMMParameters]) -> dict[str, torch.Tensor]:
    """Bundle tensors ``cgmm.<network>.<field>`` for each network's mixture."""
    return {f"{MIXTURE_PREFIX}.{name}.{key}": getattr(params, key).detach().cpu()
            for name, params in mixtures.items() for key in ("mean", "var", "log_mixing", "present")}


def read_mixtures(bundle, device="cpu") -> dict[str, CGMMParameters]:
    """Each network's mixture kept in a bundle (network name -> parameters); empty when the
    bundle has none (a method without a CGMM, GuidedNet without the mixture memory, or one whose
    memory never saw a labeled voxel)."""
    from .bundle import load_extra_tensors

    return read_mixture_tensors(load_extra_tensors(bundle, f"{MIXTURE_PREFIX}.", device))


def read_mixture_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, CGMMParameters]:
    """The mixtures among a bundle's extra tensors (see :func:`mixture_tensors`), leaving out any
    with no class present (a memory that never saw a labeled voxel)."""
    tensors = {k: v for k, v in tensors.items() if k.startswith(f"{MIXTURE_PREFIX}.")}
    names = sorted({key.split(".")[1] for key in tensors})
    mixtures = {name: CGMMParameters(*(tensors[f"{MIXTURE_PREFIX}.{name}.{key}"] for key in ("mean", "var", "log_mixing")),
                                     present=tensors[f"{MIXTURE_PREFIX}.{name}.present"].bool()) for name in names}
    return {name: params for name, params in mixtures.items() if bool(params.present.any())}


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


def loss_gt_marginal(log_g: torch.Tensor, labels: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """L_gt on every voxel of the labeled crops, as L_sup's marginal CE: a background voxel of a
    partially annotated crop counts as background or any organ its case leaves unannotated.
    ``annotated`` ``(B, K)`` bool. Equals :func:`loss_gt` on fully annotated crops.

    Eq. 8 on annotated voxels only scores nothing but organ voxels in a partially annotated
    crop, each against a frequency prior fitted mostly on background (OpenKBP at 10 %: a median
    of 5 nats, up to 14, in steps whose scored voxels are such organ voxels; 0.6 in the others).
    """
    # A class absent from the labeled crops has log G = -inf; merged alone into background (the
    # crops hold no background) its log-sum-exp is -inf and its gradient NaN, even where unused.
    # A finite floor gives the same values and gradients wherever a merged class is present.
    log_g = log_g.clamp_min(-1e30)
    log_q = marginal_log_probabilities(log_g, annotated)
    nll = -log_q.gather(1, labels.unsqueeze(1)).squeeze(1)
    return global_mean(nll.sum(), nll.numel())


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
    if mean.shape[0] < 2:
        return params.mean.sum() * 0.0
    return _mean_over_pairs(torch.exp(-torch.cdist(mean, mean).square() / mean.shape[1]))


def _mean_over_pairs(similarity: torch.Tensor) -> torch.Tensor:
    """The mean of a symmetric ``(k, k)`` matrix over its k (k - 1) / 2 distinct pairs."""
    k = similarity.shape[0]
    upper = torch.triu_indices(k, k, offset=1, device=similarity.device)
    return similarity[upper[0], upper[1]].mean()


def loss_consistency(g_a: torch.Tensor, g_b: torch.Tensor) -> torch.Tensor:
    """L_cons: mean squared difference of the two networks' G' on unlabeled crops (Eq. 11)."""
    difference = (g_a.float() - g_b.float()).square()
    return global_mean(difference.sum(), difference.numel())


def loss_rectify(logits: torch.Tensor, g: torch.Tensor, mask: torch.Tensor, hard: bool = False,
                 detach: bool = True) -> torch.Tensor:
    """L_rectify term L_s(p, G'): 1/2 (soft Dice + CE) with G' as target (Eq. 13), detached
    unless ``detach`` is False (the authors' code)."""
    return soft_dice_ce(logits, g.detach() if detach else g, mask, hard=hard)


def loss_rectify_agreed(logits: torch.Tensor, g: torch.Tensor, other: torch.Tensor, mask: torch.Tensor,
                        present: torch.Tensor) -> torch.Tensor:
    """L_rectify with G' as a gate rather than a teacher: CE towards arg-max G' only on masked
    voxels where that class is the other network's pseudo-label too and a class the labeled crops
    (or the memory) hold. ``other`` ``(B, *spatial)`` long."""
    target = g.detach().argmax(1)
    agreed = mask.bool() & (target == other) & present[target]
    nll = F.cross_entropy(logits.float(), target, reduction="none")
    return global_mean((nll * agreed).sum(), agreed.sum())


# ----------------------------------------------------------------------------------------------
# The authors' code's form (kimjisoo12/GuidedNet, utils/tools.py), rewritten: no Gaussian, but an
# unnormalised similarity to per-crop class prototypes, and halved per-class binary CEs over the
# classes a crop holds. Selected by ``cgmm_form: authors`` (the ``guidednet-authors`` method).


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                     num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-crop class means of the features over the masked voxels: prototypes ``(B, K, C)``
    (zero where the crop lacks the class) and present ``(B, K)`` bool. Gradients reach the
    features."""
    f = features.float().flatten(2)  # (B, C, N)
    one_hot = F.one_hot(labels.flatten(1), num_classes).float() * mask.flatten(1).unsqueeze(-1).float()  # (B, N, K)
    counts = one_hot.sum(1)  # (B, K)
    prototypes = (f @ one_hot).transpose(1, 2) / counts.clamp_min(1).unsqueeze(-1)  # (B, K, C)
    return prototypes, counts > 0


def pooled_prototypes(prototypes: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean over crops of each class's prototype, over the crops that hold the class:
    ``(K, C)`` and present ``(K,)``."""
    weight = present.float().unsqueeze(-1)  # (B, K, 1)
    pooled = (prototypes * weight).sum(0) / weight.sum(0).clamp_min(1)
    return pooled, present.any(0)


def prototype_similarity(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``(B, K, *spatial)`` in (0, 1]: exp(-(mean_c |f_c - mu_kc|)^2) for every class, against
    ``prototypes`` ``(B, K, C)`` (a crop's own) or ``(K, C)`` (shared). Unnormalised over
    classes, one class at a time so no (B, K, C, voxels) tensor is made."""
    b, c = features.shape[:2]
    f = features.float().flatten(2)  # (B, C, N)
    mu = prototypes if prototypes.dim() == 3 else prototypes.unsqueeze(0).expand(b, -1, -1)
    columns = [torch.exp(-(f - mu[:, k].unsqueeze(-1)).abs().mean(1).square()) for k in range(mu.shape[1])]
    return torch.stack(columns, 1).reshape(b, mu.shape[1], *features.shape[2:])


def halved_bce(prediction: torch.Tensor, target: torch.Tensor, classes: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """1/2 binary CE of ``prediction`` against ``target`` (both ``(B, K, *spatial)`` in [0, 1]),
    averaged over ``classes`` (``(B, K)`` or ``(K,)`` bool) at each voxel, then over the voxels
    where ``mask`` ``(B, *spatial)`` (all when None). Neither side is detached here."""
    p = prediction.float().clamp(1e-6, 1 - 1e-6)
    t = target.float()
    bce = -(t * torch.log(p) + (1 - t) * torch.log1p(-p)) / 2  # (B, K, *spatial)
    k = classes.float() if classes.dim() == 2 else classes.float().unsqueeze(0).expand(bce.shape[0], -1)
    k = k.reshape(*k.shape, *([1] * (bce.dim() - 2)))
    per_voxel = (bce * k).sum(1) / k.sum(1).clamp_min(1e-6)  # (B, *spatial)
    if mask is None:
        return global_mean(per_voxel.sum(), per_voxel.numel())
    m = mask.to(per_voxel.dtype)
    return global_mean((per_voxel * m).sum(), m.sum())


def prototype_separation(pooled: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """The authors' L_max: mean over pairs of present classes of exp(-(mean_c |mu_i - mu_j|)^2)."""
    mean = pooled[present]
    if mean.shape[0] < 2:
        return pooled.sum() * 0.0
    return _mean_over_pairs(torch.exp(-(mean.unsqueeze(0) - mean.unsqueeze(1)).abs().mean(-1).square()))
