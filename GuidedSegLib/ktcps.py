"""KT-CPS: knowledge-transfer class weights for cross pseudo supervision (methods.md 1.4).

Each network keeps class weights from the voxels of its labeled crops it predicts correctly
(Eq. 16-17, log-ratio form), smoothed by an EMA (Eq. 18): the best learned class gets the
smallest weight, the hardest organs the largest. The network it teaches uses them in a
class-weighted cross-entropy on its pseudo-labels (Eq. 19).
"""

from __future__ import annotations

import torch
from torch import nn

from .distributed import all_sum


class ClassWeights(nn.Module):
    """EMA class weights of one network, a buffer ``weights`` ``(K,)`` saved with the model.

    ``form``: "paper" is Eq. 17 literally, K * ratio / max ratio floored at ``floor``, started at 1:
    the best-learned class (background) gets the floor against organ weights of up to K, a 1:K
    pull towards organs in the pseudo-label CE, and an organ never predicted correctly keeps 1,
    below the organs it is harder than. "balanced" starts from the labeled class histogram (the
    authors' code starts there too), and maps ratios to 1 + ratio / mean ratio, capped at ``cap``:
    the best-learned class has weight 1 and the hardest at most ``cap`` times that.

    Guards: a class with no correctly predicted voxel in the batch keeps its weight; weights
    are at least ``floor`` (> 0), so a class-weighted CE is never 0/0 even when every
    pseudo-label is background.
    """

    def __init__(self, num_classes: int, momentum: float = 0.99, floor: float = 0.1, form: str = "paper",
                 cap: float = 2.0):
        super().__init__()
        if not 0 < floor:
            raise ValueError(f"KT-CPS weight floor {floor} must be positive")
        if form not in ("paper", "balanced"):
            raise ValueError(f"KT-CPS weight form {form!r} must be 'paper' or 'balanced'")
        self.momentum, self.floor, self.form, self.cap = float(momentum), float(floor), form, float(cap)
        self.register_buffer("weights", torch.ones(num_classes))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def current(self, correct: torch.Tensor) -> torch.Tensor | None:
        """Weights from counts of correct voxels ``(K,)`` (Eq. 17), or None when they say nothing."""
        seen = correct > 0
        if int(seen.sum()) < 2:
            return None
        ratio = torch.zeros_like(correct, dtype=torch.float32)
        ratio[seen] = torch.log(correct[seen].max().float() / correct[seen].float())
        top = ratio.max()
        if top <= 0:  # every seen class equally well learned
            return torch.where(seen, torch.ones_like(ratio), self.weights)
        if self.form == "balanced":
            return (1.0 + ratio / ratio[seen].mean()).clamp(self.floor, self.cap)
        return (len(correct) * ratio / top).clamp_min(self.floor)

    @torch.no_grad()
    def update(self, prediction: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        """EMA step from one batch: ``prediction``/``labels`` ``(B, *spatial)`` long, ``mask`` bool."""
        if self.form == "balanced" and not bool(self.started):
            counts = all_sum(torch.bincount(labels[mask], minlength=len(self.weights)).float())
            start = self.current(counts)
            if start is not None:  # classes absent from the first labeled crops start at the cap
                self.weights.copy_(torch.where(counts > 0, start, torch.full_like(start, self.cap)))
                self.started.fill_(True)
        hits = (prediction == labels) & mask
        correct = all_sum(torch.bincount(labels[hits], minlength=len(self.weights)).float())
        current = self.current(correct)
        if current is None:
            return
        seen = correct > 0
        blended = self.momentum * self.weights + (1 - self.momentum) * current
        self.weights.copy_(torch.where(seen, blended, self.weights))
