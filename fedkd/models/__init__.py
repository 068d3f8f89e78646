"""Small model families built from config specs, and their assignment to clients.

``model=auto`` (`resolve_model`) picks the families that fit the input's rank.

A spec is a plain mapping ``{"_target_": "fedkd.models.<Family>", **hyperparams}``; every family takes
``(input_shape, num_classes, **hyperparams)``.
"""

from fedkd.models.assign import ROLES, assign_models, assign_roles
from fedkd.models.auto import input_kind, resolve_model
from fedkd.models.build import build_model, count_parameters
from fedkd.models.cnn import CNN1d, CNN2d
from fedkd.models.fedgen import FedGenCNN
from fedkd.models.mlp import MLP

__all__ = [
    "CNN1d", "CNN2d", "FedGenCNN", "MLP", "ROLES", "assign_models", "assign_roles", "build_model",
    "count_parameters", "input_kind", "resolve_model",
]
