"""3D U-Net (Cicek et al. 2016) as GuidedNet uses it (methods.md 1.1).

Four down levels and a bottleneck; each block is two 3x3x3 conv + InstanceNorm + ReLU; the
decoder upsamples trilinearly and concatenates the skip; a 1x1x1 head gives the logits. Dropout
sits on the bottleneck and the last decoder block, as in the authors' code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class ConvBlock(nn.Sequential):
    """(conv 3^3 -> InstanceNorm -> ReLU) x 2, optionally followed by dropout."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            layers += [nn.Conv3d(c_in, out_channels, 3, padding=1, bias=False),
                       nn.InstanceNorm3d(out_channels, affine=True), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class UNet3D(nn.Module):
    """3D U-Net returning logits and the features of one decoder block.

    Input ``(B, in_channels, Z, Y, X)`` with each spatial size divisible by 2**(len(widths)-1).
    Output ``(logits (B, out_channels, Z, Y, X), features)``. ``feature_layer`` picks the decoder
    block whose output is returned as features: 1 is the coarsest (widths[-2] channels at 1/8
    resolution for five widths), ``len(widths)-1`` the last one (widths[0] channels at full
    resolution), which the GuidedNet paper found best.

    ``deep_supervision`` d > 0 adds a 1x1x1 head to each of the d decoder blocks below full
    resolution (nnU-Net's deep supervision). In training mode each call then leaves their logits
    in ``deep_logits``: ``[(B, out_channels, Z/2, Y/2, X/2), ..., (.., Z/2**d, ..)]``; in eval
    mode, and with d = 0, it is empty, and the heads cost nothing at inference.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2, widths: Sequence[int] = (16, 32, 64, 128, 256),
                 dropout: float = 0.3, feature_layer: int = 4, deep_supervision: int = 0):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2:
            raise ValueError(f"widths {widths} need at least two levels")
        levels = len(widths) - 1
        if not 1 <= feature_layer <= levels:
            raise ValueError(f"feature_layer {feature_layer} must be in 1..{levels} for widths {widths}")
        if not 0 <= deep_supervision < levels:
            raise ValueError(f"deep_supervision {deep_supervision} must be in 0..{levels - 1} for widths {widths}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.widths, self.dropout, self.feature_layer = widths, float(dropout), int(feature_layer)
        self.encoders = nn.ModuleList([ConvBlock(in_channels, widths[0])] + [
            ConvBlock(widths[i - 1], widths[i], dropout if i == levels else 0.0) for i in range(1, levels + 1)])
        self.decoders = nn.ModuleList([
            ConvBlock(widths[i + 1] + widths[i], widths[i], dropout if i == 0 else 0.0)
            for i in reversed(range(levels))])
        self.head = nn.Conv3d(widths[0], out_channels, 1)
        self.deep_supervision = int(deep_supervision)
        self.deep_heads = nn.ModuleList([nn.Conv3d(widths[s], out_channels, 1)
                                         for s in range(1, self.deep_supervision + 1)])
        self.deep_logits: list[torch.Tensor] = []

    @property
    def divisor(self) -> int:
        """Every spatial input size must be a multiple of this."""
        return 2 ** (len(self.widths) - 1)

    @property
    def feature_channels(self) -> int:
        return self.widths[len(self.widths) - 1 - self.feature_layer]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skips = []
        for index, encoder in enumerate(self.encoders):
            if index > 0:
                x = F.max_pool3d(x, 2)
            x = encoder(x)
            skips.append(x)
        x = skips.pop()
        features = x
        deep: list[torch.Tensor] = []
        for layer, decoder in enumerate(self.decoders, start=1):
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = decoder(torch.cat([x, skip], dim=1))
            if layer == self.feature_layer:
                features = x
            scale = len(self.decoders) - layer  # this block's resolution is 1 / 2**scale
            if self.training and 1 <= scale <= self.deep_supervision:
                deep.insert(0, self.deep_heads[scale - 1](x))
        self.deep_logits = deep
        return self.head(x), features

    def config(self) -> dict:
        """The description :func:`GuidedSegLib.networks.build_network` rebuilds this network from."""
        return {"architecture": "unet3d", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "widths": list(self.widths), "dropout": self.dropout, "feature_layer": self.feature_layer,
                "deep_supervision": self.deep_supervision}


def initialise(network: nn.Module, scheme: str) -> nn.Module:
    """Re-initialise conv weights: "kaiming" (network A) or "xavier" (network B), biases to 0."""
    init = {"kaiming": nn.init.kaiming_normal_, "xavier": nn.init.xavier_normal_}.get(scheme)
    if init is None:
        raise ValueError(f"unknown initialisation {scheme!r}: use 'kaiming' or 'xavier'")
    for module in network.modules():
        if isinstance(module, nn.Conv3d):
            init(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return network
