"""Baselines MKDT is compared against: real subsets (random, SAS), KRR-ST, and the trajectory-variance
analysis that motivates matching knowledge-distillation rather than SSL trajectories."""

from mkdt.baselines.krr_st import KrrStConfig, distill_krr_st
from mkdt.baselines.subsets import SubsetConfig, select_subset
from mkdt.baselines.variance import VarianceConfig, analyze_variance

__all__ = ["KrrStConfig", "SubsetConfig", "VarianceConfig", "analyze_variance", "distill_krr_st", "select_subset"]
