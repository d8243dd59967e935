"""The two views of mutual learning and the confidence gate on pseudo-labels: network A sees
the sampler's crop (weak view), network B the same crop with :func:`strong_view`'s intensity
changes and a cut-out, and each is taught only where the other is confident enough
(:func:`confident_voxels`). DK-UXNet always trains this way (methods.md 2.2); CPS and GuidedNet
do with ``objective.pseudo_views=weak-strong``."""

from __future__ import annotations

import torch


def strong_view(image: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``(B, 1, Z, Y, X)`` -> the same crops with random contrast (x 0.75-1.25), brightness
    (+- 0.25 SD), Gaussian noise (0.1 SD) and one cut-out box (a quarter of each side, filled
    with the crop's mean) per crop. Voxel-aligned with the input (no geometric change)."""
    b = image.shape[0]
    std = image.flatten(1).std(1).view(b, 1, 1, 1, 1).clamp_min(1e-6)
    mean = image.flatten(1).mean(1).view(b, 1, 1, 1, 1)
    uniform = torch.rand((b, 2, 1, 1, 1), device=image.device, dtype=image.dtype) * 2 - 1
    contrast, brightness = 1 + 0.25 * strength * uniform[:, :1], 0.25 * strength * uniform[:, 1:] * std
    out = (image - mean) * contrast + mean + brightness
    out = out + 0.1 * strength * std * torch.randn_like(image)
    sides = [max(1, n // 4) for n in image.shape[2:]]
    corners = torch.rand((b, 3)) * torch.tensor([n - s + 1 for n, s in zip(image.shape[2:], sides)])
    for i, (z, y, x) in enumerate(corners.long().tolist()):
        out[i, :, z:z + sides[0], y:y + sides[1], x:x + sides[2]] = mean[i]
    return out


@torch.no_grad()
def confident_voxels(teacher: torch.Tensor, mask: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(``mask`` ``(B, *spatial)`` kept only where ``teacher``'s logits ``(B, C, *spatial)`` have a
    softmax confidence of at least ``threshold``, the share of the mask's voxels kept)."""
    keep = mask * (torch.softmax(teacher.float(), 1).amax(1) >= threshold)
    return keep, keep.sum() / mask.sum().clamp_min(1)
