"""The supervised-only baseline: one network trained on the labeled crops alone."""

from __future__ import annotations

import torch

from .base import Batch, Method, MethodOptions


class Supervised(Method):
    """One network trained on labeled crops only (the supervised-only baseline)."""

    uses_unlabeled = False

    def __init__(self, network: dict, num_classes: int, options: MethodOptions, iterations: int):
        super().__init__(network, num_classes, options, iterations)
        self.networks["A"] = self._network("kaiming")

    def forward(self, batch: Batch, iteration: int) -> dict[str, torch.Tensor]:
        logits, _ = self.networks["A"](batch.image[: batch.n_labeled])
        sup = self.supervised(logits, batch, self.networks["A"])
        self.terms = {"sup": sup}
        return {"total": sup, "sup": sup.detach()}
