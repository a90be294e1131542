"""MKDT distillation (stage 5): learn synthetic images, targets and an inner lr by matching KD
expert trajectories; and export of the result for other evaluators."""

from mkdt.distill.config import DistillConfig, ExportConfig
from mkdt.distill.export import export_distilled
from mkdt.distill.loop import distill

__all__ = ["DistillConfig", "ExportConfig", "distill", "export_distilled"]
