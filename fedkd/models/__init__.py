"""Small model families built from config specs, and their assignment to clients.

``model=auto`` (`resolve_model`) picks the families that fit the input's rank. Every family
declares its taps (`fedkd.models.taps`: named intermediate tensors for feature, relation and
prototype losses); `model_cost` gives parameters and FLOPs per example.

A spec is a plain mapping ``{"_target_": "fedkd.models.<Family>", **hyperparams}``; every family takes
``(input_shape, num_classes, **hyperparams)``.
"""

from fedkd.models.assign import ROLES, assign_models, assign_roles
from fedkd.models.auto import input_kind, resolve_model
from fedkd.models.build import build_model, count_parameters, spec_tap
from fedkd.models.cnn import CNN1d, CNN2d
from fedkd.models.cost import model_cost
from fedkd.models.fedgen import FedGenCNN
from fedkd.models.mlp import MLP
from fedkd.models.mobilenet import MobileNet
from fedkd.models.resnet import ResNet
from fedkd.models.taps import TAP_KINDS, Tapped, check_tap
from fedkd.models.vit import ViT

__all__ = [
    "CNN1d", "CNN2d", "FedGenCNN", "MLP", "MobileNet", "ROLES", "ResNet", "TAP_KINDS", "Tapped",
    "ViT", "assign_models", "assign_roles", "build_model", "check_tap", "count_parameters",
    "input_kind", "model_cost", "resolve_model", "spec_tap",
]
