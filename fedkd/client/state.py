"""A client's student, its optimizer and counters, kept in Flower's `Context.state`.

`Context.state` persists per node across rounds (in simulation and in deployment) and is
transactional: if a handler raises, nothing written here is kept. A SuperNode restart loses it, so
a deployed node (node config ``data-path``) also checkpoints the student to its own disk, keyed by
run and partition id (`fedkd.client.checkpoint`), and resumes from there when `Context.state` is
empty.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from torch import nn

from fedkd.client import checkpoint
from fedkd.models import build_model
from fedkd.optim import base_lr, build_optimizer, scheduled_lr, set_lr
from fedkd.settings import ClientSettings

log = logging.getLogger(__name__)

STUDENT, OPTIMIZER, PROGRESS = "fedkd.student", "fedkd.optimizer", "fedkd.progress"


@dataclass
class Student:
    """A client's model and optimizer, and how many rounds it has trained."""

    arch: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    rounds_done: int = 0

    @classmethod
    def restore(cls, context: Context, settings: ClientSettings, partition_id: int) -> Student:
        """Rebuild the student from `context.state` or a checkpoint, or create it (seeded)."""
        arch, spec = settings.arch_of(partition_id)
        data = settings.data
        torch.manual_seed(settings.seed + partition_id)
        model = build_model(spec, tuple(data["input_shape"]), int(data["num_classes"]))
        student = cls(arch=arch, model=model, optimizer=new_optimizer(settings, model))
        state = context.state
        if STUDENT in state:
            model.load_state_dict(state[STUDENT].to_torch_state_dict())
            buffer = io.BytesIO(state[OPTIMIZER]["state"])
            student.optimizer.load_state_dict(torch.load(buffer, weights_only=True))
            student.rounds_done = int(state[PROGRESS]["rounds-done"])
        elif (saved := checkpoint.load(context, arch)) is not None:
            model.load_state_dict(saved.model)
            student.optimizer.load_state_dict(saved.optimizer)
            student.rounds_done = saved.rounds_done
            log.info("partition %d: student (%s) resumed from checkpoint %s after %d rounds",
                     partition_id, arch, saved.path, saved.rounds_done)
        student.schedule(settings)
        return student

    def schedule(self, settings: ClientSettings) -> None:
        """Set this round's learning rate (`fedkd.settings.TrainSettings.lr_decay`)."""
        train = settings.train
        set_lr(self.optimizer, scheduled_lr(base_lr(train.optimizer), train.lr_decay,
                                            self.rounds_done))

    def reset_optimizer(self, settings: ClientSettings) -> None:
        """Start the optimizer afresh (parameter exchange: the weights were just replaced)."""
        self.optimizer = new_optimizer(settings, self.model)
        self.schedule(settings)

    def save(self, context: Context) -> None:
        """Write the model, the optimizer state and the counters to `context.state` (and, on a
        deployed node, to its checkpoint)."""
        buffer = io.BytesIO()
        torch.save(self.optimizer.state_dict(), buffer)
        context.state[STUDENT] = ArrayRecord(self.model.state_dict())
        context.state[OPTIMIZER] = ConfigRecord({"state": buffer.getvalue()})
        context.state[PROGRESS] = MetricRecord({"rounds-done": self.rounds_done})
        checkpoint.save(context, self.arch, self.model, self.optimizer, self.rounds_done)


def new_optimizer(settings: ClientSettings, model: nn.Module) -> torch.optim.Optimizer:
    """The configured (allowlisted, `fedkd.optim`) optimizer over the model's parameters."""
    return build_optimizer(settings.train.optimizer, model.parameters())
