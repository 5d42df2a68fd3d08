"""The joint teacher: m frozen teachers fused at level L_K, shallow trainable blocks above.

Input: each teacher's cached embedding at the fusion level (maps (C_i, H_i, W_i) for
K >= 2, vectors (D_i,) for K = 1). Maps: adaptors bring them to a common width and
spatial size, they are concatenated channel-wise, and blocks NN^k produce the joint
embeddings L_K ... L2. Vectors (dense fusion, paper 4.5): the teachers' vectors are
concatenated as they are. L1 is a heavily regularised dense layer (dropout, linear,
GELU: "GeLU is the activation function employed in all neurons"). One classification
head per dataset.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MlfdError


class MapAdaptor(nn.Module):
    """BatchNorm + pointwise conv to the common width + resize to the common size."""

    def __init__(self, in_ch: int, width: int, size: tuple[int, int]):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_ch)
        self.proj = nn.Conv2d(in_ch, width, 1)
        self.size = tuple(size)

    def forward(self, x):
        return resize_map(self.proj(self.norm(x)), self.size)


def resize_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average-pool down (keeps all evidence), bilinear up; identity when equal."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def conv_bn_gelu(cin: int, cout: int, k: int = 1, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.GELU())


class JointTeacher(nn.Module):
    def __init__(
        self,
        teacher_shapes: list[list[tuple[int, ...]]],
        num_classes: list[int],
        levels: int,
        width: int = 256,
        embed_dim: int = 256,
        dropout: float = 0.85,
    ):
        """``teacher_shapes[i]`` lists teacher i's per-sample shapes at L1..LK."""
        super().__init__()
        if len(teacher_shapes) < 2:
            raise MlfdError("a joint teacher needs at least two teachers")
        if levels < 1:
            raise MlfdError(f"levels must be >= 1, got {levels}")
        self.levels = levels
        self.num_classes = list(num_classes)
        fusion = [s[levels - 1] for s in teacher_shapes]
        if levels == 1:
            if any(len(s) != 1 for s in fusion):
                raise MlfdError(f"L1 embeddings must be vectors, got {fusion}")
            # Dense fusion (paper 4.5): the concatenated vectors, dropout, one linear layer.
            self.adaptors = nn.ModuleList(nn.Identity() for _ in fusion)
            self.fuse = nn.Identity()
            self.blocks = nn.ModuleList()
            self.sizes: list[tuple[int, int]] = []
            dense_in = sum(s[0] for s in fusion)
        else:
            if any(len(s) != 3 for s in fusion):
                raise MlfdError(f"L{levels} embeddings must be maps, got {fusion}")
            # Common size at each map level: the smallest teacher map there.
            self.sizes = [
                (min(s[k][1] for s in teacher_shapes), min(s[k][2] for s in teacher_shapes))
                for k in range(1, levels)
            ]  # sizes[j] is the size of level L(j+2)
            size_k = self.sizes[-1]
            self.adaptors = nn.ModuleList(MapAdaptor(s[0], width, size_k) for s in fusion)
            m = len(fusion)
            self.fuse = nn.Sequential(nn.BatchNorm2d(m * width), nn.GELU(),
                                      conv_bn_gelu(m * width, width, 1))
            blocks = []
            for j in range(levels - 2, 0, -1):  # from L_K down to L2
                src, dst = self.sizes[j], self.sizes[j - 1]
                stride = 2 if dst[0] * 2 <= src[0] else 1
                blocks.append(conv_bn_gelu(width, width, 3 if stride == 2 else 1, stride))
            self.blocks = nn.ModuleList(blocks)
            dense_in = width
        self.drop = nn.Dropout(dropout)
        self.dense = nn.Sequential(nn.Linear(dense_in, embed_dim), nn.GELU())
        self.heads = nn.ModuleList(nn.Linear(embed_dim, c) for c in num_classes)
        self.embed_shapes = [(embed_dim,)] + [(width, *s) for s in self.sizes]

    def forward(self, teacher_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Joint embeddings [L1, L2, ..., LK] for a batch of teacher features."""
        if len(teacher_feats) != len(self.adaptors):
            raise MlfdError(f"expected {len(self.adaptors)} teacher inputs, got {len(teacher_feats)}")
        z = torch.cat([a(f) for a, f in zip(self.adaptors, teacher_feats)], dim=1)
        if self.levels == 1:
            return [self.dense(self.drop(z))]
        z = self.fuse(z)
        maps = [z]
        for j, block in enumerate(self.blocks):
            z = resize_map(block(z), self.sizes[self.levels - 3 - j])
            maps.append(z)
        pooled = F.adaptive_avg_pool2d(z, 1).flatten(1)
        return [self.dense(self.drop(pooled))] + maps[::-1]

    def logits(self, l1: torch.Tensor, dataset: int) -> torch.Tensor:
        return self.heads[dataset](l1)
