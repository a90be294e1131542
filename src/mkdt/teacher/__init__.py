"""Stages 1-2: the self-supervised teacher (train or import) and its targets for the source set."""

from mkdt.teacher.io import import_teacher, load_teacher, map_state_dict, save_teacher
from mkdt.teacher.targets import TargetsConfig, compute_targets
from mkdt.teacher.train import TeacherConfig, train_teacher

__all__ = [
    "TargetsConfig",
    "TeacherConfig",
    "compute_targets",
    "import_teacher",
    "load_teacher",
    "map_state_dict",
    "save_teacher",
    "train_teacher",
]
