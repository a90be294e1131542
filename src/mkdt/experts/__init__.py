"""Stages 3 and 4 of MKDT: knowledge-distillation expert trajectories and the initial synthetic set.

``train_experts`` (``mkdt experts``) trains student trajectories with MSE to the teacher targets, one
by one through :func:`mkdt.training.train_regression` or K at a time on stacked parameters
(:mod:`mkdt.experts.batched`); ``select_initial_set`` (``mkdt init``) picks the high-loss and random
initial sets from the experts' epoch-1 parameters.
"""

from mkdt.experts.batched import BatchedState, StackedSGD, check_batchable, make_forward, train_students
from mkdt.experts.init import InitConfig, per_example_loss, select_initial_set
from mkdt.experts.trajectories import ExpertsConfig, prepare, train_expert_range, train_experts

__all__ = [
    "BatchedState",
    "ExpertsConfig",
    "InitConfig",
    "StackedSGD",
    "check_batchable",
    "make_forward",
    "per_example_loss",
    "prepare",
    "select_initial_set",
    "train_expert_range",
    "train_experts",
    "train_students",
]
