"""Small model families built from config specs, and their assignment to clients.

A spec is a plain mapping ``{"_target_": "fedkd.models.<Family>", **hyperparams}``; every family takes
``(input_shape, num_classes, **hyperparams)``.
"""

from fedkd.models.assign import ROLES, assign_models, assign_roles
from fedkd.models.build import build_model, count_parameters
from fedkd.models.cnn import CNN1d, CNN2d
from fedkd.models.mlp import MLP

__all__ = [
    "CNN1d", "CNN2d", "MLP", "ROLES", "assign_models", "assign_roles", "build_model",
    "count_parameters",
]
