"""Students: the dataset's teacher architecture, plus level adaptors dropped at export."""

from __future__ import annotations

import torch
import torch.nn as nn

from .backbone import LevelBackbone
from .joint import resize_map


class LevelAdaptor(nn.Module):
    """Maps a student embedding into the joint teacher's space at one level."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]):
        super().__init__()
        self.size = tuple(teacher_shape[1:]) if len(teacher_shape) == 3 else None
        if len(student_shape) == 1 and len(teacher_shape) == 1:
            same = student_shape[0] == teacher_shape[0]
            self.proj = nn.Identity() if same else nn.Linear(student_shape[0], teacher_shape[0])
        elif len(student_shape) == 3 and len(teacher_shape) == 3:
            same = student_shape[0] == teacher_shape[0]
            self.proj = nn.Identity() if same else nn.Conv2d(student_shape[0], teacher_shape[0], 1)
        else:
            raise ValueError(f"cannot adapt {student_shape} to {teacher_shape}")

    def forward(self, x):
        x = self.proj(x)
        return resize_map(x, self.size) if self.size is not None else x


class Student(nn.Module):
    def __init__(self, backbone: LevelBackbone, student_shapes, teacher_shapes):
        super().__init__()
        self.backbone = backbone
        self.adaptors = nn.ModuleList(
            LevelAdaptor(s, t) for s, t in zip(student_shapes, teacher_shapes))

    @property
    def levels(self) -> int:
        return len(self.adaptors)

    def forward(self, x: torch.Tensor):
        logits, embeds = self.backbone(x, self.levels)
        return logits, [a(e) for a, e in zip(self.adaptors, embeds)]
