from .backbone import LevelBackbone, build_level_backbone, create_backbone, level_shapes
from .joint import JointTeacher
from .student import Student

__all__ = ["JointTeacher", "LevelBackbone", "Student", "build_level_backbone", "create_backbone",
           "level_shapes"]
