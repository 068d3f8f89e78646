"""Data-free transfer sets: conditional generators fitted by the server (`fedkd.transfer` sources)."""

from fedkd.generators.base import LogitGuided, ModelGuided, models_query
from fedkd.generators.blackbox import BlackBoxGenerator
from fedkd.generators.model import ConditionalGenerator, balanced_labels
from fedkd.generators.whitebox import WhiteBoxGenerator

__all__ = ["BlackBoxGenerator", "ConditionalGenerator", "LogitGuided", "ModelGuided",
           "WhiteBoxGenerator", "balanced_labels", "models_query"]
