"""Networks: the ConvNet student and CIFAR-stem ResNets, behind one ``build_model`` registry."""

from mkdt.models.convnet import ConvNet
from mkdt.models.registry import ModelConfig, available_models, build_model, count_parameters, register_model
from mkdt.models.resnet import CifarResNet

__all__ = ["ConvNet", "CifarResNet", "ModelConfig", "available_models", "build_model", "count_parameters",
           "register_model"]
