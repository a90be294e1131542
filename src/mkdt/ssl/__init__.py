"""Self-supervised learning: batched augmentations, SSL objectives/projectors, a generic training loop
and the kNN monitor. A core package: the teacher stage, baselines and evaluation all use it."""

from mkdt.ssl.augment import AugmentConfig, BatchAugment
from mkdt.ssl.knn import encode, knn_accuracy, knn_predict
from mkdt.ssl.objectives import ObjectiveConfig, SSLLoss, build_loss, build_projector
from mkdt.ssl.train import SSLSchedule, SSLTrainer, lr_factor

__all__ = [
    "AugmentConfig",
    "BatchAugment",
    "ObjectiveConfig",
    "SSLLoss",
    "SSLSchedule",
    "SSLTrainer",
    "build_loss",
    "build_projector",
    "encode",
    "knn_accuracy",
    "knn_predict",
    "lr_factor",
]
