"""What every method shares: the :class:`Batch`, the :class:`MethodOptions`, the ramp-up and
the :class:`Method` base with its supervised term.

Partially annotated crops (methods.md section 3): supervised terms use the marginal loss over
the crop's annotated set; pseudo-label terms (CPS, L_rectify) also cover the background voxels
of a partially annotated crop, where an unannotated organ may be; KT-CPS counts, L_gt and
L_self use annotated voxels only. The mixture's background component is fitted on every voxel
labeled background, so in a partially annotated crop it stands for background plus the
unannotated organs (the marginal loss's merged background).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from ..losses import exclusion_loss, marginal_dice_ce
from ..networks import build_network, initialise


@dataclass
class Batch:
    """One training step's crops: the first ``labels.shape[0]`` images are labeled.

    image ``(B, 1, Z, Y, X)`` float; labels ``(B_l, Z, Y, X)`` long class indices (unannotated
    organs already 0); annotated and absent ``(B_l, K)`` bool (background always annotated).
    """

    image: torch.Tensor
    labels: torch.Tensor
    annotated: torch.Tensor
    absent: torch.Tensor

    @property
    def n_labeled(self) -> int:
        return self.labels.shape[0]

    def to(self, device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in (self.image, self.labels, self.annotated, self.absent)))

    def annotated_voxels(self) -> torch.Tensor:
        """``(B_l, Z, Y, X)`` bool: voxels whose class is known (organs of the annotated set, and
        background only when the crop's case has every class annotated)."""
        full = self.annotated.all(1).view(-1, *([1] * (self.labels.dim() - 1)))
        return (self.labels > 0) | full

    def pseudo_label_voxels(self, include_annotated: bool) -> torch.Tensor:
        """``(B, Z, Y, X)`` float mask where pseudo-labels teach: every unlabeled voxel, the
        background voxels of partially annotated crops, and (``include_annotated``) all voxels
        of fully annotated crops too."""
        spatial = self.labels.shape[1:]
        full = self.annotated.all(1).view(-1, *([1] * len(spatial)))
        labeled = (self.labels == 0) & ~full
        if include_annotated:
            labeled = labeled | full.expand_as(labeled)
        unlabeled = torch.ones((self.image.shape[0] - self.n_labeled, *spatial), dtype=torch.bool,
                               device=self.image.device)
        return torch.cat([labeled, unlabeled]).float()


@dataclass
class MethodOptions:
    """Every switch of the objectives (methods.md; each **option** there is one field here)."""

    exclusion: float = 1.0  # weight of the exclusion loss for partially annotated crops
    lambda_u: float = 0.1  # pseudo-label (CPS / KT-CPS) weight after ramp-up
    ramp_up: float = 0.4  # fraction of the iterations the sigmoid ramp-up takes
    kt_cps: bool = True  # class-weighted CPS (False: plain CPS)
    kt_momentum: float = 0.99
    kt_form: str = "balanced"  # or "paper" (ktcps.ClassWeights)
    kt_floor: float = 0.1  # smallest KT-CPS class weight
    kt_cap: float = 2.0  # largest "balanced" weight, relative to the best-learned class
    cgmm: bool = True
    lambda_g: float = 0.3
    ramp_cgmm: bool = True  # every CGMM term ramped up like L_cps (False: only L_cons, as the paper)
    mixture_momentum: float = 0.9  # moving average of the mixture statistics across steps (0: per batch)
    tied_variance: bool = True  # one variance per feature channel for all classes
    loss_gt: bool = True
    gt_voxels: str = "marginal"  # L_gt on every labeled voxel, as L_sup's marginal CE; "annotated": Eq. 8
    loss_self: bool = True
    loss_max: bool = True
    loss_cons: bool = True
    loss_rectify: bool = True
    mixing: str = "frequency"  # or "uniform"
    var_floor: float = 1e-4
    detach_targets: bool = True  # L_self / L_rectify targets detached (False: as the authors' code)
    rectify_target: str = "agree"  # "agree": arg-max G' where the other network agrees; "soft"; "hard"
    self_target: str = "soft"  # L_self: "soft": G on every annotated voxel (Eq. 9); "agree": only where arg-max G is the label
    lambda_qd: float = 0.1  # DK-UXNet: weight of L_qd (the cluster assignment against the merged labels)
    confidence: float = 0.8  # softmax confidence a pseudo-label needs: DK-UXNet's L_segc / L_qdc, "weak-strong" CPS
    pseudo_views: str = "same"  # CPS / GuidedNet: "same" crop for both networks; "weak-strong": B sees a strong view, gated by confidence

    @classmethod
    def preset(cls, method: str, **settings) -> MethodOptions:
        """The options for a method name: ``settings`` with the method's own ``preset`` on top
        (``cps`` is GuidedNet with KT-CPS and the CGMM off, whatever ``settings`` say)."""
        from . import method_class  # the registry imports this module

        return replace(cls(**settings), **method_class(method).preset)


def ramp(iteration: int, total: int, fraction: float) -> float:
    """Sigmoid ramp-up exp(-5 (1 - t / T)^2), reaching 1 at T = fraction * total."""
    length = fraction * total
    if length <= 0:
        return 1.0
    t = min(iteration / length, 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


class Method(nn.Module):
    """Base: networks in ``self.networks`` (a ModuleDict: "A", and "B" for two-network methods).

    What the trainer reads from a method class: ``preset`` (option values the method fixes),
    ``uses_unlabeled`` (whether unlabeled crops are drawn for it) and ``default_network`` (the
    architecture built when the config's ``network.type`` is "auto"). After each call,
    ``self.terms`` holds the weighted loss terms with their graphs (the trainer's gradient shares).
    """

    preset: dict = {}
    uses_unlabeled = True
    default_network = "unet3d"
    terms: dict[str, torch.Tensor]

    def __init__(self, network: dict, num_classes: int, options: MethodOptions, iterations: int):
        super().__init__()
        self.num_classes, self.options, self.iterations = num_classes, options, iterations
        self.network_spec = {**network, "out_channels": num_classes}
        self.networks = nn.ModuleDict()

    def bundle_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors besides the networks' weights that the method's bundle keeps (none here)."""
        return {}

    def load_bundle_tensors(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Take up a parent bundle's extra tensors on a warm start; the names taken (none here)."""
        return []

    def _network(self, init: str) -> nn.Module:
        return initialise(build_network(self.network_spec), init)

    def supervised(self, logits: torch.Tensor, batch: Batch, network: nn.Module | None = None) -> torch.Tensor:
        """L_sup on the labeled crops: marginal 1/2 (Dice + CE) plus the exclusion term.

        With ``network`` given and its last call left coarser logits (``deep_logits``, a U-Net
        with deep supervision), L_sup is nnU-Net's weighted sum over resolutions: weights 1, 1/2,
        1/4, ... normalised to 1, each against the labels picked at that resolution (nearest).
        """
        n = batch.n_labeled
        loss = self._supervised_at(logits[:n], batch.labels, batch)
        deep = getattr(network, "deep_logits", None) or []
        if not deep:
            return loss
        weights = [0.5 ** scale for scale in range(len(deep) + 1)]
        for weight, coarse in zip(weights[1:], deep):
            labels = F.interpolate(batch.labels[:, None].float(), size=coarse.shape[2:], mode="nearest")
            loss = loss + weight * self._supervised_at(coarse[:n], labels[:, 0].long(), batch)
        return loss / sum(weights)

    def _supervised_at(self, logits: torch.Tensor, labels: torch.Tensor, batch: Batch) -> torch.Tensor:
        loss = marginal_dice_ce(logits, labels, batch.annotated)
        if self.options.exclusion > 0:
            loss = loss + self.options.exclusion * exclusion_loss(logits, labels, batch.annotated, batch.absent)
        return loss
