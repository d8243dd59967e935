"""Training objectives: supervised-only, CPS and GuidedNet (with its ablations), one interface.

A method owns its networks and turns a :class:`Batch` into named losses; the trainer only
steps the optimiser. Calling the method (``method(batch, iteration)``) returns the losses, so a
DDP wrapper around it synchronises the gradients of every network it holds.

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

from . import cgmm
from .ktcps import ClassWeights
from .losses import exclusion_loss, marginal_dice_ce, weighted_cross_entropy
from .networks import build_network, initialise

METHODS = ("supervised", "cps", "guidednet", "guidednet-paper")

# The paper's literal objective (methods.md 1.2-1.4): per-batch mixture with per-class variances
# and uniform mixing, L_rectify's soft G' target on every pseudo-label voxel, only L_cons ramped,
# KT-CPS weights K * ratio / max from 1 with a 0.1 floor. ``guidednet`` departs from each of these
# (Testing/BENCHMARKS.md says why, with the measurements).
PAPER_OBJECTIVE = {"mixture_momentum": 0.0, "tied_variance": False, "mixing": "uniform", "rectify_target": "soft",
                   "ramp_cgmm": False, "kt_form": "paper", "kt_floor": 0.1}


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
    loss_self: bool = True
    loss_max: bool = True
    loss_cons: bool = True
    loss_rectify: bool = True
    mixing: str = "frequency"  # or "uniform"
    var_floor: float = 1e-4
    detach_targets: bool = True  # L_self / L_rectify targets detached (False: as the authors' code)
    rectify_target: str = "agree"  # "agree": arg-max G' where the other network agrees; "soft"; "hard"

    @classmethod
    def preset(cls, method: str, **settings) -> MethodOptions:
        """The options for a method name: ``cps`` is GuidedNet with KT-CPS and the CGMM off,
        whatever ``settings`` say about those two."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        options = cls(**settings)
        if method == "cps":
            return replace(options, kt_cps=False, cgmm=False)
        if method == "guidednet-paper":
            return replace(options, **PAPER_OBJECTIVE)
        return options


def ramp(iteration: int, total: int, fraction: float) -> float:
    """Sigmoid ramp-up exp(-5 (1 - t / T)^2), reaching 1 at T = fraction * total."""
    length = fraction * total
    if length <= 0:
        return 1.0
    t = min(iteration / length, 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


class Method(nn.Module):
    """Base: networks in ``self.networks`` (a ModuleDict: "A", and "B" for two-network methods)."""

    def __init__(self, network: dict, num_classes: int, options: MethodOptions, iterations: int):
        super().__init__()
        self.num_classes, self.options, self.iterations = num_classes, options, iterations
        self.network_spec = {**network, "out_channels": num_classes}
        self.networks = nn.ModuleDict()

    def _network(self, init: str) -> nn.Module:
        return initialise(build_network(self.network_spec), init)

    def supervised(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """L_sup on the labeled crops: marginal 1/2 (Dice + CE) plus the exclusion term."""
        n = batch.n_labeled
        loss = marginal_dice_ce(logits[:n], batch.labels, batch.annotated)
        if self.options.exclusion > 0:
            loss = loss + self.options.exclusion * exclusion_loss(logits[:n], batch.labels, batch.annotated, batch.absent)
        return loss


class Supervised(Method):
    """One U-Net trained on labeled crops only (the supervised-only baseline)."""

    def __init__(self, network: dict, num_classes: int, options: MethodOptions, iterations: int):
        super().__init__(network, num_classes, options, iterations)
        self.networks["A"] = self._network("kaiming")

    def forward(self, batch: Batch, iteration: int) -> dict[str, torch.Tensor]:
        logits, _ = self.networks["A"](batch.image[: batch.n_labeled])
        sup = self.supervised(logits, batch)
        self.terms = {"sup": sup}
        return {"total": sup, "sup": sup.detach()}


class CrossPseudo(Method):
    """Two U-Nets (Kaiming / Xavier init) with cross pseudo supervision: plain CPS, or GuidedNet
    (KT-CPS class weights and the 3D-CGMM), or any ablation between them.

    L = L_sup(A) + L_sup(B) + lambda_u(t) L_cps + lambda_g L_cgmm   (Eq. 2)
    """

    def __init__(self, network: dict, num_classes: int, options: MethodOptions, iterations: int):
        super().__init__(network, num_classes, options, iterations)
        self.networks["A"] = self._network("kaiming")
        self.networks["B"] = self._network("xavier")
        if options.kt_cps:
            self.kt = nn.ModuleDict({name: ClassWeights(num_classes, options.kt_momentum, options.kt_floor,
                                                        options.kt_form, options.kt_cap) for name in ("A", "B")})
        if options.cgmm and options.mixture_momentum > 0:
            channels = self.networks["A"].feature_channels
            self.memory = nn.ModuleDict({name: cgmm.MixtureMemory(num_classes, channels, options.mixture_momentum)
                                         for name in ("A", "B")})

    def forward(self, batch: Batch, iteration: int) -> dict[str, torch.Tensor]:
        o, n = self.options, batch.n_labeled
        out = {name: self.networks[name](batch.image) for name in ("A", "B")}  # (logits, features)
        losses: dict[str, torch.Tensor] = {}
        sup = sum(self.supervised(out[name][0], batch) for name in ("A", "B"))
        losses["sup"] = sup

        known = batch.annotated_voxels()
        pseudo = {name: out[name][0].detach().max(1).indices for name in ("A", "B")}  # (B, Z, Y, X)
        weights = {"A": None, "B": None}
        if o.kt_cps:
            for name in ("A", "B"):
                self.kt[name].update(pseudo[name][:n], batch.labels, known)
                weights[name] = self.kt[name].weights
        cps_mask = batch.pseudo_label_voxels(include_annotated=True)
        cps = (weighted_cross_entropy(out["A"][0], pseudo["B"], weights["B"], cps_mask)
               + weighted_cross_entropy(out["B"][0], pseudo["A"], weights["A"], cps_mask))
        losses["cps"] = cps
        ramp_u = ramp(iteration, self.iterations, o.ramp_up)
        terms = {"sup": sup, "cps": o.lambda_u * ramp_u * cps}
        if o.cgmm:
            parts = self.cgmm_losses(out, batch, known, iteration, pseudo)
            losses.update(parts)
            weight = o.lambda_g * (ramp_u if o.ramp_cgmm else 1.0)
            lambda_c = 1.0 if o.ramp_cgmm else ramp_u  # L_cons is ramped once either way
            for key in ("gt", "self", "max", "rectify"):
                terms[key] = weight * parts[key]
            terms["cons"] = weight * lambda_c * parts["cons"]
        losses["total"] = sum(terms.values())
        self.terms = terms  # weighted terms with their graphs, for the trainer's gradient shares
        return {k: (v if k == "total" else v.detach()) for k, v in losses.items()}

    def cgmm_losses(self, out: dict, batch: Batch, known: torch.Tensor, iteration: int,
                    pseudo: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """L_cgmm = sum over networks of (L_self + L_gt + L_max + L_rectify) + lambda_c(t) L_cons,
        plus (detached) the voxel accuracy of G and of the head on the labeled crops' annotated
        voxels: a G worse than the head teaches the head to be worse."""
        o, n = self.options, batch.n_labeled
        zero = out["A"][1].sum() * 0.0
        parts = {k: zero for k in ("gt", "self", "max", "cons", "rectify")}
        posteriors = {}
        stride = out["A"][0].shape[-1] // out["A"][1].shape[-1]  # > 1 for a coarser feature layer

        def coarse(t: torch.Tensor) -> torch.Tensor:  # a label-like map onto the feature grid
            return t[:, ::stride, ::stride, ::stride] if stride > 1 else t

        labels, known_here = coarse(batch.labels), coarse(known)
        rectify_mask = coarse(batch.pseudo_label_voxels(include_annotated=False)) if o.loss_rectify else None
        accuracy = {"acc_g": zero.detach(), "acc_head": zero.detach()}
        for name in ("A", "B"):
            logits, features = out[name]
            probabilities = torch.softmax(logits.float(), 1)
            if stride > 1:
                probabilities = F.avg_pool3d(probabilities, stride)
            # Fitted on every labeled voxel: organ components see annotated organs only (an
            # unannotated organ is 0 in the labels), the background one all background-labeled
            # voxels. Background from fully annotated crops only would leave partial data (OpenKBP
            # at 10%: no case annotates every organ) with no background, and G would send every
            # voxel to some organ.
            params = cgmm.fit(features[:n], labels, probabilities[:n], None, self.num_classes,
                              o.var_floor, o.mixing, o.tied_variance)
            if hasattr(self, "memory"):
                params = self.memory[name].blend(params, o.mixing, update=self.training)
            log_g = cgmm.log_posterior(features, params)  # (B, K, ...): G on labeled, G' on unlabeled
            with torch.no_grad():
                counted = known_here.sum().clamp_min(1)
                accuracy["acc_g"] = accuracy["acc_g"] + ((log_g[:n].argmax(1) == labels) & known_here).sum() / counted / 2
                accuracy["acc_head"] = accuracy["acc_head"] + ((probabilities[:n].argmax(1) == labels) & known_here).sum() / counted / 2
            g = log_g.exp()
            posteriors[name] = g
            target = g.detach() if o.detach_targets else g
            if o.loss_gt:
                parts["gt"] = parts["gt"] + cgmm.loss_gt(log_g[:n], labels, known_here)
            if o.loss_self:
                parts["self"] = parts["self"] + cgmm.loss_self(probabilities[:n], target[:n], known_here, params.present)
            if o.loss_max:
                parts["max"] = parts["max"] + cgmm.loss_max(params)
            if o.loss_rectify:
                log_p = torch.log(probabilities.clamp_min(1e-8)) if stride > 1 else logits
                if o.rectify_target == "agree":
                    other = coarse(pseudo["B" if name == "A" else "A"])
                    parts["rectify"] = parts["rectify"] + cgmm.loss_rectify_agreed(log_p, g, other, rectify_mask,
                                                                                   params.present)
                else:
                    parts["rectify"] = parts["rectify"] + cgmm.loss_rectify(
                        log_p, g, rectify_mask, hard=o.rectify_target == "hard", detach=o.detach_targets)
        if o.loss_cons and batch.image.shape[0] > n:
            parts["cons"] = cgmm.loss_consistency(posteriors["A"][n:], posteriors["B"][n:])
        lambda_c = ramp(iteration, self.iterations, o.ramp_up)
        parts["cgmm"] = parts["gt"] + parts["self"] + parts["max"] + parts["rectify"] + lambda_c * parts["cons"]
        return {**parts, **accuracy}


def build_method(name: str, network: dict, num_classes: int, options: MethodOptions, iterations: int) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {METHODS}")
    cls = Supervised if name == "supervised" else CrossPseudo
    return cls(network, num_classes, options, iterations)
