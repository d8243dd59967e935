"""kMaX decoder (Yu et al., k-means Mask Transformer, 2022) for 3D, as DK-UXNet uses it
(methods.md 2.1).

N learnable cluster centres (queries) are refined by k-means cross-attention at several decoder
scales: every voxel is assigned to the centre it is most similar to (a hard arg-max, carrying no
gradient), each centre is updated by the sum of the features assigned to it, then the centres
attend to each other and pass through an FFN. At full resolution each voxel's query response is
the softmax over centres of its affinity; class logits are the responses weighted by each
centre's class scores, and the 3-channel cluster assignment sums the responses of three fixed
groups of queries (background / organ / further classes such as tumour).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .uxnet import ChannelLayerNorm

GROUPS = 3  # cluster-assignment channels: background, organ, any further class


def hard_assignment(centres: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """One-hot ``(B, N, V)``: each of the V voxels of ``pixels`` ``(B, D, V)`` assigned to its most
    similar centre of ``centres`` ``(B, N, D)``. Computed without gradient (k-means' E-step)."""
    with torch.no_grad():
        affinity = torch.bmm(centres, pixels)
        return torch.zeros_like(affinity).scatter_(1, affinity.argmax(1, keepdim=True), 1.0)


class KMeansCrossAttention(nn.Module):
    """Centres ``(B, N, D)`` and a decoder map ``(B, C, *spatial)`` -> updated centres ``(B, N, D)``:
    the sum of the projected voxel features hard-assigned to each centre, normalised, projected and
    added to the centre (k-means' M-step as a residual update)."""

    def __init__(self, pixel_channels: int, dim: int):
        super().__init__()
        self.pixels = nn.Sequential(nn.Conv3d(pixel_channels, dim, 1), ChannelLayerNorm(dim))
        self.norm = nn.LayerNorm(dim)
        self.project = nn.Linear(dim, dim)

    def forward(self, centres: torch.Tensor, decoder_map: torch.Tensor) -> torch.Tensor:
        values = self.pixels(decoder_map).flatten(2)  # (B, D, V)
        assignment = hard_assignment(centres, values)  # (B, N, V), no gradient
        update = torch.bmm(assignment, values.transpose(1, 2))  # (B, N, D)
        return centres + self.project(self.norm(update))


class KMaXLayer(nn.Module):
    """k-means cross-attention -> query self-attention -> FFN, each with a residual and a norm.
    ``(B, N, D)`` centres and a decoder map ``(B, C, *spatial)`` -> ``(B, N, D)``."""

    def __init__(self, pixel_channels: int, dim: int, heads: int, expansion: int = 4):
        super().__init__()
        self.cross = KMeansCrossAttention(pixel_channels, dim)
        self.cross_norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.attention_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, expansion * dim), nn.GELU(), nn.Linear(expansion * dim, dim))
        self.ffn_norm = nn.LayerNorm(dim)

    def forward(self, centres: torch.Tensor, decoder_map: torch.Tensor) -> torch.Tensor:
        c = self.cross_norm(self.cross(centres, decoder_map))
        c = self.attention_norm(c + self.attention(c, c, c, need_weights=False)[0])
        return self.ffn_norm(c + self.ffn(c))


def query_groups(queries: int, groups: int = GROUPS) -> torch.Tensor:
    """``(N,)`` long: the cluster-assignment group of each query, in contiguous near-equal blocks."""
    if queries < groups:
        raise ValueError(f"{queries} queries cannot make {groups} cluster-assignment groups")
    return torch.arange(queries) * groups // queries


class KMaXDecoder(nn.Module):
    """Cluster centres refined over the decoder scales, read out at full resolution.

    forward(decoder maps coarse to fine, ``(B, scale_channels[i], *spatial_i)`` each; full-resolution
    features ``(B, pixel_channels, Z, Y, X)``) -> (class logits ``(B, num_classes, Z, Y, X)``,
    cluster assignment ``(B, 3, Z, Y, X)``, probabilities summing to 1 over the 3 channels).
    """

    def __init__(self, scale_channels: Sequence[int], pixel_channels: int, num_classes: int, queries: int = 128,
                 dim: int = 256, layers_per_scale: int = 2, heads: int = 8):
        super().__init__()
        if dim % heads:
            raise ValueError(f"query_dim {dim} must be divisible by heads {heads}")
        self.centres = nn.Parameter(torch.randn(queries, dim) * dim ** -0.5)
        self.layers = nn.ModuleList([nn.ModuleList([KMaXLayer(c, dim, heads) for _ in range(layers_per_scale)])
                                     for c in scale_channels])
        self.pixel_embedding = nn.Sequential(nn.Conv3d(pixel_channels, dim, 1), ChannelLayerNorm(dim))
        self.query_embedding = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.class_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, num_classes))
        self.register_buffer("group", query_groups(queries), persistent=False)
        self.scale = dim ** -0.5  # unit-variance affinities: a raw dot product of D normed features saturates the softmax

    def refine(self, decoder_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """The centres ``(B, N, D)`` after every layer of every scale."""
        centres = self.centres.expand(decoder_maps[0].shape[0], -1, -1)
        for layers, decoder_map in zip(self.layers, decoder_maps):
            for layer in layers:
                centres = layer(centres, decoder_map)
        return centres

    def forward(self, decoder_maps: Sequence[torch.Tensor], features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centres = self.refine(decoder_maps)
        pixels = self.pixel_embedding(features)  # (B, D, Z, Y, X)
        affinity = torch.einsum("bnd,bdzyx->bnzyx", self.query_embedding(centres), pixels) * self.scale
        response = torch.softmax(affinity.float(), 1)  # r_n(x): (B, N, Z, Y, X)
        class_scores = self.class_head(centres).float()  # M: (B, N, K)
        logits = torch.einsum("bnk,bnzyx->bkzyx", class_scores, response)
        shape = (response.shape[0], GROUPS, *response.shape[2:])
        assignment = response.new_zeros(shape).index_add(1, self.group, response)
        return logits, assignment
