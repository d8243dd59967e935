"""3D UX-Net (Lee et al. 2023) encoder and its UNETR-style CNN decoder (methods.md 2.1).

Encoder: a 7^3 stride-2 stem and four stages of ConvNeXt-style blocks (depthwise 7^3 conv ->
LayerNorm -> pointwise expansion x4 -> GELU -> pointwise back -> layer scale -> residual), with
LayerNorm + 2^3 stride-2 conv between stages: features at 1/2, 1/4, 1/8 and 1/16 resolution.
Decoder: MONAI's UNETR residual blocks, from the 1/16 features back to full resolution, with a
full-resolution skip from the image itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import UnetrBasicBlock, UnetrUpBlock
from torch import nn


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of ``(B, C, *spatial)`` (ConvNeXt's "channels_first")."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        variance = (x - mean).square().mean(1, keepdim=True)
        x = (x - mean) * torch.rsqrt(variance + self.eps)
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.weight.view(view) + self.bias.view(view)


class UXBlock(nn.Module):
    """Depthwise 7^3 conv -> LayerNorm -> 1^3 conv to 4C -> GELU -> 1^3 conv to C -> layer scale,
    added to the input. ``(B, C, Z, Y, X)`` -> same shape."""

    def __init__(self, channels: int, layer_scale: float = 1e-6, expansion: int = 4):
        super().__init__()
        self.depthwise = nn.Conv3d(channels, channels, 7, padding=3, groups=channels)
        self.norm = ChannelLayerNorm(channels)
        self.expand = nn.Conv3d(channels, expansion * channels, 1)
        self.act = nn.GELU()
        self.project = nn.Conv3d(expansion * channels, channels, 1)
        self.scale = nn.Parameter(torch.full((channels,), float(layer_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.act(self.expand(self.norm(self.depthwise(x)))))
        return x + y * self.scale.view(1, -1, 1, 1, 1)


class UXNetEncoder(nn.Module):
    """``(B, in_channels, Z, Y, X)`` with sizes divisible by 16 -> four feature maps
    ``(B, widths[i], Z / 2^(i+1), Y / 2^(i+1), X / 2^(i+1))`` for i = 0..3, each layer-normed."""

    def __init__(self, in_channels: int = 1, depths: Sequence[int] = (2, 2, 2, 2),
                 widths: Sequence[int] = (48, 96, 192, 384), layer_scale: float = 1e-6):
        super().__init__()
        if len(depths) != len(widths):
            raise ValueError(f"depths {list(depths)} and widths {list(widths)} must have one entry per stage")
        self.downsample = nn.ModuleList([nn.Sequential(nn.Conv3d(in_channels, widths[0], 7, stride=2, padding=3),
                                                       ChannelLayerNorm(widths[0]))])
        for i in range(1, len(widths)):
            self.downsample.append(nn.Sequential(ChannelLayerNorm(widths[i - 1]),
                                                 nn.Conv3d(widths[i - 1], widths[i], 2, stride=2)))
        self.stages = nn.ModuleList([nn.Sequential(*[UXBlock(w, layer_scale) for _ in range(d)])
                                     for d, w in zip(depths, widths)])
        self.norms = nn.ModuleList([ChannelLayerNorm(w) for w in widths])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for down, stage, norm in zip(self.downsample, self.stages, self.norms):
            x = stage(down(x))
            outs.append(norm(x))
        return outs


class UNETRDecoder(nn.Module):
    """UNETR-style decoder as 3D UX-Net uses it: a residual block on the image and on each
    encoder level, then residual up blocks (transposed conv, skip concat, residual block).

    forward(image ``(B, in_channels, Z, Y, X)``, encoder outputs as :class:`UXNetEncoder`) ->
    decoder maps from coarse to fine: ``(B, widths[3], Z/8, ...)``, ``(B, widths[2], Z/4, ...)``,
    ``(B, widths[1], Z/2, ...)``, ``(B, widths[0], Z, Y, X)``; the last one is the full-resolution
    feature map the heads read.
    """

    def __init__(self, in_channels: int, widths: Sequence[int], norm: str = "instance"):
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"the UNETR decoder needs four encoder widths, not {list(widths)}")
        hidden = 2 * widths[-1]

        def basic(c_in, c_out):
            return UnetrBasicBlock(3, c_in, c_out, kernel_size=3, stride=1, norm_name=norm, res_block=True)

        def up(c_in, c_out):
            return UnetrUpBlock(3, c_in, c_out, kernel_size=3, upsample_kernel_size=2, norm_name=norm, res_block=True)

        # skip blocks: image -> widths[0]; level i (widths[i]) -> widths[i + 1]; level 3 -> hidden
        self.skips = nn.ModuleList([basic(in_channels, widths[0])] + [basic(widths[i], widths[i + 1]) for i in range(3)]
                                   + [basic(widths[3], hidden)])
        self.ups = nn.ModuleList([up(hidden, widths[3])] + [up(widths[i + 1], widths[i]) for i in (2, 1, 0)])
        self.last = basic(widths[0], widths[0])

    def forward(self, image: torch.Tensor, encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        skips = [self.skips[0](image)] + [block(x) for block, x in zip(self.skips[1:], encoded)]
        x = skips.pop()
        maps = []
        for up in self.ups:
            x = up(x, skips.pop())
            maps.append(x)
        maps[-1] = self.last(maps[-1])
        return maps
