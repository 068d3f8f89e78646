"""A client's student, its optimizer and counters, kept in Flower's `Context.state`.

`Context.state` persists per node across rounds (in simulation and in deployment) and is
transactional: if a handler raises, nothing written here is kept. A SuperNode restart loses it, so
a deployed node (node config ``data-path``) also checkpoints the student to its own disk, keyed by
run and partition id (`fedkd.client.checkpoint`), and resumes from there when `Context.state` is
empty.

The student trains on the device `fedkd.devices.select_device` picks (a GPU when the node's
resources grant one); what is kept is always CPU tensors, so a state saved on a GPU restores on a
CPU and the other way round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from torch import nn

from fedkd.client import checkpoint
from fedkd.devices import cpu_state, deterministic_from_env, place, select_device
from fedkd.models import build_model
from fedkd.optim import build_optimizer, schedule_lr
from fedkd.settings import ClientSettings

log = logging.getLogger(__name__)

STUDENT, OPTIMIZER, PROGRESS = "fedkd.student", "fedkd.optimizer", "fedkd.progress"
OPTIMIZER_EXTRA = "fedkd.optimizer-extra"
PRIVACY = "fedkd.dp-accountant"
"""The DP-SGD accountant's state (plain numbers, `fedkd.dpsgd.Accountant.state_dict`)."""


@dataclass
class Student:
    """A client's model and optimizer, and how many rounds it has trained."""

    arch: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    rounds_done: int = 0
    privacy: dict[str, Any] | None = None
    """The DP-SGD accountant's state (``privacy=dpsgd``); None before the first DP round."""

    @classmethod
    def restore(cls, context: Context, settings: ClientSettings, partition_id: int,
                device: torch.device | None = None) -> Student:
        """Rebuild the student from `context.state` or a checkpoint, or create it (seeded), on
        `device` (None: `fedkd.devices.select_device`).

        A student kept in `context.state` is built without initialising its weights (on the meta
        device) and takes the kept tensors as they are: a round's restore costs no init (and on
        the CPU no copy). A new student is initialised on the CPU, so its weights do not depend
        on the device.
        """
        arch, spec = settings.arch_of(partition_id)
        shape, classes = tuple(settings.data["input_shape"]), int(settings.data["num_classes"])
        device = select_device() if device is None else device
        deterministic_from_env(device)
        state = context.state
        if STUDENT in state:
            with torch.device("meta"):
                model = build_model(spec, shape, classes)
            model.load_state_dict(state[STUDENT].to_torch_state_dict(), assign=True)
            place(model, device)  # on the CPU nothing moves
            student = cls(arch=arch, model=model, optimizer=new_optimizer(settings, model))
            load_optimizer_state(student.optimizer, state[OPTIMIZER], state[OPTIMIZER_EXTRA])
            student.rounds_done = int(state[PROGRESS]["rounds-done"])
            if PRIVACY in state:
                student.privacy = dict(state[PRIVACY])
        else:
            torch.default_generator.manual_seed(settings.seed + partition_id)  # CPU init only
            model = build_model(spec, shape, classes)
            place(model, device)
            student = cls(arch=arch, model=model, optimizer=new_optimizer(settings, model))
            if (saved := checkpoint.load(context, arch)) is not None:
                model.load_state_dict(saved.model)
                student.optimizer.load_state_dict(saved.optimizer)
                student.rounds_done = saved.rounds_done
                student.privacy = saved.privacy
                log.info("partition %d: student (%s) resumed from checkpoint %s after %d rounds",
                         partition_id, arch, saved.path, saved.rounds_done)
        student.schedule(settings)
        return student

    def schedule(self, settings: ClientSettings) -> None:
        """Set this round's learning rate (`fedkd.settings.TrainSettings.lr_decay`)."""
        schedule_lr(self.optimizer, settings.train.lr_decay, self.rounds_done)

    def reset_optimizer(self, settings: ClientSettings) -> None:
        """Start the optimizer afresh (parameter exchange: the weights were just replaced)."""
        self.optimizer = new_optimizer(settings, self.model)
        self.schedule(settings)

    def save(self, context: Context) -> None:
        """Write the model, the optimizer state, the counters and the DP accountant's state to
        `context.state` (and, on a deployed node, to its checkpoint), as CPU tensors."""
        context.state[STUDENT] = ArrayRecord(cpu_state(self.model.state_dict()))
        context.state[OPTIMIZER], context.state[OPTIMIZER_EXTRA] = optimizer_state(self.optimizer)
        context.state[PROGRESS] = MetricRecord({"rounds-done": self.rounds_done})
        if self.privacy is not None:
            context.state[PRIVACY] = ConfigRecord(self.privacy)
        checkpoint.save(context, self.arch, self.model, self.optimizer, self.rounds_done,
                        self.privacy)


def new_optimizer(settings: ClientSettings, model: nn.Module) -> torch.optim.Optimizer:
    """The configured (allowlisted, `fedkd.optim`) optimizer over the model's parameters."""
    return build_optimizer(settings.train.optimizer, model.parameters())


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[ArrayRecord, ConfigRecord]:
    """The optimizer's per-parameter state as records: tensors (``<param>.<name>``) as arrays,
    numbers and None (listed under ``none``) as config. Hyper-parameters are not kept: they come
    from the settings every round."""
    tensors, extra, nones = {}, {}, []
    for index, values in optimizer.state_dict()["state"].items():
        for name, value in values.items():
            key = f"{index}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.cpu()
            elif value is None:
                nones.append(key)
            else:
                extra[key] = value
    return ArrayRecord(tensors), ConfigRecord({**extra, "none": nones})


def load_optimizer_state(optimizer: torch.optim.Optimizer, arrays: ArrayRecord,
                         extra: ConfigRecord) -> None:
    """Inverse of `optimizer_state` for an optimizer over the same parameters (torch moves the
    CPU tensors to the parameters' device)."""
    state: dict[int, dict[str, object]] = {}

    def put(key: str, value: object) -> None:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value

    for key, value in arrays.to_torch_state_dict().items():
        put(key, value)
    for key, value in extra.items():
        if key == "none":
            for none_key in value:
                put(none_key, None)
        else:
            put(key, value)
    optimizer.load_state_dict({"state": state,
                               "param_groups": optimizer.state_dict()["param_groups"]})
