"""Segmentation networks. Each returns ``(logits, features)`` so the methods can read features;
one with a cluster assignment (UX-Net + kMaX) also has ``forward_with_assignment``.

:func:`build_network` makes one from the plain dict a model bundle stores.
"""

from __future__ import annotations

from .unet import UNet3D, initialise
from .uxnet_kmax import UXNetKMaX

ARCHITECTURES = {"unet3d": UNet3D, "uxnet-kmax": UXNetKMaX}


def build_network(spec: dict):
    """A network from its bundle description, e.g. ``{"architecture": "unet3d", "widths": [...]}``."""
    spec = dict(spec)
    name = spec.pop("architecture", "unet3d")
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown network architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name](**spec)


__all__ = ["ARCHITECTURES", "UNet3D", "UXNetKMaX", "build_network", "initialise"]
