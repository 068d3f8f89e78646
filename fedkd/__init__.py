"""fedkd: federated and multi-teacher knowledge distillation on Flower."""

__version__ = "0.1.0"
