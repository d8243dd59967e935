"""Training objectives, one module per method, each registered here by name.

A method owns its networks and turns a :class:`Batch` into named losses; the trainer only
steps the optimiser. Calling the method (``method(batch, iteration)``) returns the losses, so a
DDP wrapper around it synchronises the gradients of every network it holds. The trainer, the
config and the bundle know a method only by its name here and the class attributes of
:class:`Method` (``preset``, ``uses_unlabeled``, ``default_network``).

Adding a method: one module with a :class:`Method` subclass, and one line in ``REGISTRY``.
"""

from __future__ import annotations

from .base import Batch, Method, MethodOptions, ramp
from .cps import CrossPseudo
from .dkuxnet import DualKMax
from .guidednet import AUTHORS_OBJECTIVE, PAPER_OBJECTIVE, GuidedNet, GuidedNetAuthors, GuidedNetPaper
from .supervised import Supervised

REGISTRY: dict[str, type[Method]] = {
    "supervised": Supervised,
    "cps": CrossPseudo,
    "guidednet": GuidedNet,
    "guidednet-paper": GuidedNetPaper,
    "guidednet-authors": GuidedNetAuthors,
    "dkuxnet": DualKMax,
}
METHODS = tuple(REGISTRY)


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``; ValueError naming the known methods otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {METHODS}")
    return REGISTRY[name]


def build_method(name: str, network: dict, num_classes: int, options: MethodOptions, iterations: int) -> Method:
    return method_class(name)(network, num_classes, options, iterations)


__all__ = ["AUTHORS_OBJECTIVE", "METHODS", "PAPER_OBJECTIVE", "REGISTRY", "Batch", "CrossPseudo", "DualKMax", "GuidedNet",
           "GuidedNetAuthors", "GuidedNetPaper", "Method",
           "MethodOptions", "Supervised", "build_method", "method_class", "ramp"]
