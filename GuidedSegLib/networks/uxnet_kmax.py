"""The Dual-KMax UX-Net network (methods.md 2.1): 3D UX-Net encoder, UNETR-style CNN decoder and
a kMaX decoder over its 1/8, 1/4 and 1/2 maps, with the class and cluster-assignment heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .kmax import KMaXDecoder
from .uxnet import UNETRDecoder, UXNetEncoder

DIVISOR = 16  # stem stride 2, then three stride-2 downsamplings
# At least 2 voxels per axis at 1/16: instance norm refuses a single voxel in training.
SMALLEST = 2 * DIVISOR


def pad_to_multiple(x: torch.Tensor, divisor: int, smallest: int = 0) -> torch.Tensor:
    """``(B, C, Z, Y, X)`` padded at the far end of each axis (replicating the edge) to multiples of
    ``divisor`` of at least ``smallest``; unchanged when they already are."""
    pad = [max(smallest, n + (-n) % divisor) - n for n in x.shape[2:]]
    if not any(pad):
        return x
    return F.pad(x, [p for size in reversed(pad) for p in (0, size)], mode="replicate")


class UXNetKMaX(nn.Module):
    """3D UX-Net + kMaX, returning logits and features like :class:`~.unet.UNet3D`.

    Input ``(B, in_channels, Z, Y, X)`` of any size: it is padded to multiples of 16 (at least 32)
    and the outputs are cropped back. ``forward`` -> (logits ``(B, out_channels, Z, Y, X)``,
    features ``(B, widths[0], Z, Y, X)``: the last CNN decoder block, which the GuidedNet objective's
    mixture models); :meth:`forward_with_assignment` also returns the cluster assignment
    ``(B, 3, Z, Y, X)`` (probabilities over background / organ / further classes).

    ``deep_supervision`` d > 0 adds a 1x1x1 head to each of the d CNN decoder maps below full
    resolution (1/2, then 1/4, then 1/8), as :class:`~.unet.UNet3D` does: in training mode each call
    leaves their logits in ``deep_logits``, ``[(B, out_channels, ceil(Z/2), ...), ...]``, cropped
    like the outputs; in eval mode, and with d = 0, it is empty.
    Paper scale: depths [2, 2, 2, 2], widths [48, 96, 192, 384], 128 queries of dimension 256.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2, depths: Sequence[int] = (2, 2, 2, 2),
                 widths: Sequence[int] = (48, 96, 192, 384), queries: int = 128, query_dim: int = 256,
                 layers_per_scale: int = 2, heads: int = 8, layer_scale: float = 1e-6, deep_supervision: int = 0):
        super().__init__()
        if not 0 <= deep_supervision <= 3:
            raise ValueError(f"deep_supervision {deep_supervision} must be in 0..3 (the decoder maps at 1/2, 1/4, 1/8)")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.depths, self.widths = [int(d) for d in depths], [int(w) for w in widths]
        self.queries, self.query_dim, self.layers_per_scale, self.heads = queries, query_dim, layers_per_scale, heads
        self.layer_scale = float(layer_scale)
        self.encoder = UXNetEncoder(in_channels, self.depths, self.widths, self.layer_scale)
        self.decoder = UNETRDecoder(in_channels, self.widths)
        # the decoder maps at 1/8, 1/4 and 1/2 carry widths[3], widths[2], widths[1] channels
        self.kmax = KMaXDecoder(self.widths[3:0:-1], self.widths[0], out_channels, queries, query_dim,
                                layers_per_scale, heads)
        self.deep_supervision = int(deep_supervision)
        self.deep_heads = nn.ModuleList([nn.Conv3d(self.widths[s], out_channels, 1)
                                         for s in range(1, self.deep_supervision + 1)])
        self.deep_logits: list[torch.Tensor] = []

    @property
    def divisor(self) -> int:
        """Input sizes that need no padding are multiples of this (others are padded and cropped)."""
        return DIVISOR

    @property
    def feature_channels(self) -> int:
        return self.widths[0]

    def forward_with_assignment(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, features, cluster assignment), each on the input's own grid."""
        z, y, w = x.shape[2:]
        padded = pad_to_multiple(x, DIVISOR, SMALLEST)
        maps = self.decoder(padded, self.encoder(padded))
        features = maps[-1]
        logits, assignment = self.kmax(maps[:-1], features)
        deep = []
        if self.training:
            for s, head in enumerate(self.deep_heads, start=1):  # maps[-1 - s] is at 1/2**s
                size = [-(-n // 2 ** s) for n in (z, y, w)]
                deep.append(head(maps[-1 - s])[:, :, :size[0], :size[1], :size[2]])
        self.deep_logits = deep
        return tuple(t[:, :, :z, :y, :w] for t in (logits, features, assignment))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features, _ = self.forward_with_assignment(x)
        return logits, features

    def config(self) -> dict:
        """The description :func:`GuidedSegLib.networks.build_network` rebuilds this network from."""
        return {"architecture": "uxnet-kmax", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "depths": list(self.depths), "widths": list(self.widths), "queries": self.queries,
                "query_dim": self.query_dim, "layers_per_scale": self.layers_per_scale, "heads": self.heads,
                "layer_scale": self.layer_scale, "deep_supervision": self.deep_supervision}
