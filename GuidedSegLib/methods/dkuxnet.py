"""Dual-KMax UX-Net's objective (methods.md 2.2): mutual learning of two networks, one seeing a
weak and one a strong view of the same crops, with the dual contrastive pair.

L = L_seg + lambda_qd L_qd + lambda_u ramp(t) (L_segc + L_qdc), summed over networks A and B:
- L_seg: the marginal 1/2 (Dice + CE) (and exclusion) of every method, on the labeled crops;
- L_qd: CE of the 3-channel cluster assignment against the merged ground truth (labels clamped
  to {0, 1, 2}: background, organ, any further class), partial-label aware (:func:`group_cross_entropy`);
- L_segc / L_qdc: each network's segmentation / cluster assignment taught by the other's
  confident arg-max, on the voxels where pseudo-labels teach (every unlabeled voxel, fully
  annotated labeled crops, background voxels of partially annotated ones).

The weak view is the sampler's crop; the strong one adds :func:`strong_view`'s intensity changes
and a cut-out, so both views stay voxel-aligned. A network without queries (the U-Net, with
``network.type=unet3d``) has no cluster assignment of its own: its softmax summed over the same
three groups of classes stands in (:func:`group_probabilities`), so L_qd and L_qdc become a
coarse copy of L_seg and L_segc.
"""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import global_mean
from ..losses import weighted_cross_entropy
from ..networks.kmax import GROUPS
from .base import Batch, Method, MethodOptions, ramp
from .views import confident_voxels, strong_view

LOG_FLOOR = 1e-8


def merged_groups(labels: torch.Tensor) -> torch.Tensor:
    """Class indices -> cluster-assignment groups: 0 background, 1 the first organ, 2 every further class."""
    return labels.clamp(max=GROUPS - 1)


def group_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """``(B, K, *spatial)`` logits -> ``(B, 3, *spatial)``: the softmax summed over each group's classes."""
    p = torch.softmax(logits.float(), 1)
    groups = merged_groups(torch.arange(logits.shape[1], device=logits.device))
    return p.new_zeros((p.shape[0], GROUPS, *p.shape[2:])).index_add(1, groups, p)


def predict(network: nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits ``(B, K, *spatial)``, log cluster assignment ``(B, 3, *spatial)``) of ``network``."""
    if hasattr(network, "forward_with_assignment"):
        logits, _, assignment = network.forward_with_assignment(image)
    else:
        logits, _ = network(image)
        assignment = group_probabilities(logits)
    return logits, torch.log(assignment.float().clamp_min(LOG_FLOOR))


def group_cross_entropy(log_assignment: torch.Tensor, labels: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """L_qd: CE of the cluster assignment ``(B_l, 3, *spatial)`` (log probabilities) against the
    merged ground truth of ``labels`` ``(B_l, *spatial)``, marginal over what is unknown.

    An organ voxel's group is known. A background-labeled voxel of a crop whose case leaves some
    class unannotated may be that class, so its target is background or any group holding an
    unannotated class (methods.md section 3); with every class annotated this is the plain CE.
    """
    unannotated = ~annotated.clone()
    unannotated[:, 0] = False
    class_group = merged_groups(torch.arange(annotated.shape[1], device=annotated.device))
    possible = torch.stack([unannotated[:, class_group == g].any(1) for g in range(GROUPS)], 1)  # (B_l, 3)
    possible[:, 0] = True
    view = possible.shape + (1,) * (labels.dim() - 1)
    log_background = torch.logsumexp(log_assignment.masked_fill(~possible.view(view), float("-inf")), 1)
    log_known = log_assignment.gather(1, merged_groups(labels).unsqueeze(1)).squeeze(1)
    nll = -torch.where(labels == 0, log_background, log_known)
    return global_mean(nll.sum(), nll.numel())


def confident_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                            threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CE of ``student`` logits ``(B, C, *spatial)`` against the arg-max of ``teacher``'s (detached)
    where its softmax confidence reaches ``threshold`` inside ``mask`` ``(B, *spatial)``; 0 where
    no voxel qualifies. Returns (loss, share of the mask's voxels that qualified)."""
    keep, share = confident_voxels(teacher, mask, threshold)
    return weighted_cross_entropy(student, teacher.detach().argmax(1), None, keep), share


class DualKMax(Method):
    """Two networks (Kaiming / Xavier init), A on the weak view and B on the strong one, trained by
    L_seg + lambda_qd L_qd + lambda_u ramp(t) (L_segc + L_qdc) (methods.md 2.2). The default
    network is the UX-Net + kMaX; ``network.type=unet3d`` trains the U-Net by the same objective."""

    default_network = "uxnet-kmax"

    def __init__(self, network: dict, num_classes: int, options: MethodOptions, iterations: int):
        super().__init__(network, num_classes, options, iterations)
        self.networks["A"] = self._network("kaiming")
        self.networks["B"] = self._network("xavier")

    def forward(self, batch: Batch, iteration: int) -> dict[str, torch.Tensor]:
        o, n = self.options, batch.n_labeled
        views = {"A": batch.image, "B": strong_view(batch.image)}
        out = {name: predict(self.networks[name], views[name]) for name in ("A", "B")}  # (logits, log assignment)
        seg = sum(self.supervised(out[name][0], batch, self.networks[name]) for name in ("A", "B"))
        qd = sum(group_cross_entropy(out[name][1][:n], batch.labels, batch.annotated) for name in ("A", "B"))
        mask = batch.pseudo_label_voxels(include_annotated=True)
        segc, qdc, shares = 0.0, 0.0, []
        for student, teacher in (("A", "B"), ("B", "A")):
            loss, share = confident_cross_entropy(out[student][0], out[teacher][0], mask, o.confidence)
            segc, shares = segc + loss, shares + [share]
            loss, _ = confident_cross_entropy(out[student][1], out[teacher][1], mask, o.confidence)
            qdc = qdc + loss
        weight = o.lambda_u * ramp(iteration, self.iterations, o.ramp_up)
        terms = {"seg": seg, "qd": o.lambda_qd * qd, "segc": weight * segc, "qdc": weight * qdc}
        self.terms = terms  # weighted terms with their graphs, for the trainer's gradient shares
        losses = {"seg": seg, "qd": qd, "segc": segc, "qdc": qdc, "confident": sum(shares) / 2,
                  "total": sum(terms.values())}
        return {k: (v if k == "total" else v.detach()) for k, v in losses.items()}
