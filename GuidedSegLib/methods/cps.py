"""Cross pseudo supervision (CPS, Chen et al. 2021), optionally with GuidedNet's KT-CPS class
weights (methods.md 1.4): two networks, each taught by the other's arg-max pseudo-labels."""

from __future__ import annotations

import torch
from torch import nn

from ..ktcps import ClassWeights
from ..losses import weighted_cross_entropy
from .base import Batch, Method, MethodOptions, ramp
from .views import confident_voxels, strong_view


class CrossPseudo(Method):
    """Two networks (Kaiming / Xavier init) with cross pseudo supervision: plain CPS, or with
    KT-CPS class weights (``options.kt_cps``). :class:`~.guidednet.GuidedNet` adds the 3D-CGMM
    through :meth:`extra_losses`.

    ``options.pseudo_views``: "same" (both networks see the crop, every pseudo-label teaches, as
    Chen et al.) or "weak-strong" (network B sees :func:`~.views.strong_view` of it, and a
    pseudo-label teaches only where its network's softmax confidence is at least
    ``options.confidence``, as DK-UXNet's mutual learning).

    L = L_sup(A) + L_sup(B) + lambda_u(t) L_cps   (+ lambda_g L_cgmm, Eq. 2)
    """

    preset = {"kt_cps": False, "cgmm": False}

    def __init__(self, network: dict, num_classes: int, options: MethodOptions, iterations: int):
        super().__init__(network, num_classes, options, iterations)
        self.networks["A"] = self._network("kaiming")
        self.networks["B"] = self._network("xavier")
        if options.kt_cps:
            self.kt = nn.ModuleDict({name: ClassWeights(num_classes, options.kt_momentum, options.kt_floor,
                                                        options.kt_form, options.kt_cap) for name in ("A", "B")})

    def forward(self, batch: Batch, iteration: int) -> dict[str, torch.Tensor]:
        o, n = self.options, batch.n_labeled
        two_views = o.pseudo_views == "weak-strong"
        views = {"A": batch.image, "B": strong_view(batch.image) if two_views else batch.image}
        out = {name: self.networks[name](views[name]) for name in ("A", "B")}  # (logits, features)
        losses: dict[str, torch.Tensor] = {}
        sup = sum(self.supervised(out[name][0], batch, self.networks[name]) for name in ("A", "B"))
        losses["sup"] = sup

        known = batch.annotated_voxels()
        pseudo = {name: out[name][0].detach().max(1).indices for name in ("A", "B")}  # (B, Z, Y, X)
        weights = {"A": None, "B": None}
        if o.kt_cps:
            for name in ("A", "B"):
                self.kt[name].update(pseudo[name][:n], batch.labels, known)
                weights[name] = self.kt[name].weights
        cps_mask = batch.pseudo_label_voxels(include_annotated=True)
        taught = {name: cps_mask for name in ("A", "B")}  # where each network's pseudo-labels teach
        if two_views:
            gated = {name: confident_voxels(out[name][0], cps_mask, o.confidence) for name in ("A", "B")}
            taught = {name: keep for name, (keep, _) in gated.items()}
            losses["confident"] = (gated["A"][1] + gated["B"][1]) / 2
        cps = (weighted_cross_entropy(out["A"][0], pseudo["B"], weights["B"], taught["B"])
               + weighted_cross_entropy(out["B"][0], pseudo["A"], weights["A"], taught["A"]))
        losses["cps"] = cps
        ramp_u = ramp(iteration, self.iterations, o.ramp_up)
        terms = {"sup": sup, "cps": o.lambda_u * ramp_u * cps}
        parts, extra_terms = self.extra_losses(out, batch, known, iteration, pseudo, ramp_u)
        losses.update(parts)
        terms.update(extra_terms)
        losses["total"] = sum(terms.values())
        self.terms = terms  # weighted terms with their graphs, for the trainer's gradient shares
        return {k: (v if k == "total" else v.detach()) for k, v in losses.items()}

    def extra_losses(self, out: dict, batch: Batch, known: torch.Tensor, iteration: int,
                     pseudo: dict[str, torch.Tensor], ramp_u: float) -> tuple[dict, dict]:
        """(losses to log, weighted terms to add to the total) beyond L_sup and L_cps: none here."""
        return {}, {}
