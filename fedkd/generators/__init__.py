"""Data-free transfer sets: conditional generators fitted by the server (`fedkd.transfer` sources)."""

from fedkd.generators.model import ConditionalGenerator, balanced_labels
from fedkd.generators.source import BlackBoxGenerator, LogitGuided, ModelGuided, WhiteBoxGenerator

__all__ = ["BlackBoxGenerator", "ConditionalGenerator", "LogitGuided", "ModelGuided",
           "WhiteBoxGenerator", "balanced_labels"]
