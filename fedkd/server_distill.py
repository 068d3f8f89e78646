"""Server-side maths of FedDF: per-architecture averaging, checked weights, ensemble distillation.

These functions know nothing of Flower messages; `fedkd.strategies.feddf.FedDF` calls them, and their
tests pin the numbers. State dicts are ``{name: torch.Tensor}`` (the full ``state_dict()``,
BatchNorm buffers included).

The functions that run models (`teacher_logits`, `distill`, `kd_divergence`) compute on `device`
(None: `fedkd.devices.select_device`, a GPU when one is visible) and leave every model where
they found it; shuffling stays on the CPU, and what they return is CPU numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from fedkd import reply_checks
from fedkd.devices import deterministic_from_env, on_device, rng_devices, select_device
from fedkd.losses import KDLoss
from fedkd.training import mean_loss

StateDict = dict[str, torch.Tensor]
BatchLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""One batch's loss from its inputs, soft targets and row indices."""
StepFactory = Callable[[torch.device], tuple[list[nn.Parameter], BatchLoss]]
"""What `distill` trains besides the student, and how it forms a batch's loss."""

SEPARATOR = "/"
"""Between the architecture name and the state-dict key in a multi-architecture ArrayRecord."""


def average_states(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> StateDict:
    """Weighted average of state dicts with the same keys and shapes.

    Floating-point tensors are averaged with weights ``w_k / sum(w)``; integer tensors (such as
    BatchNorm's ``num_batches_tracked``) take the maximum over the states instead of being averaged
    into floats. Weights that sum to 0 count every state equally.

    Parameters
    ----------
    states : sequence of mappings
        K state dicts of one architecture.
    weights : sequence of float
        ``[K]`` weights >= 0 (e.g. each client's number of private examples).
    """
    if not states or len(states) != len(weights):
        raise ValueError(f"need as many weights as states (>= 1), got {len(states)} and {len(weights)}")
    w = np.asarray(weights, dtype=np.float64)
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"weights must be finite and >= 0, got {w.tolist()}")
    w = w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))
    averaged: StateDict = {}
    for key, first in states[0].items():
        stacked = torch.stack([state[key] for state in states])
        if first.is_floating_point():
            coef = torch.as_tensor(w, dtype=torch.float64).reshape(-1, *([1] * first.dim()))
            averaged[key] = (stacked.double() * coef).sum(0).to(first.dtype)
        else:
            averaged[key] = stacked.max(0).values
    return averaged


def checked_state(record: ArrayRecord, reference: Mapping[str, torch.Tensor]) -> StateDict:
    """An uploaded state dict, checked against a reference model's (a reply may be malicious)
    by `fedkd.reply_checks.weights`, as the wire checks it.

    Raises
    ------
    ValueError
        Keys differ from the reference's, a shape differs, a floating-point tensor arrives as
        another kind, or a value is NaN or infinite.
    """
    arrays = {key: record[key].numpy() for key in record.keys()}
    reply_checks.weights(arrays, {k: (tuple(v.shape), v.is_floating_point())
                                  for k, v in reference.items()})
    return {key: torch.from_numpy(np.ascontiguousarray(arrays[key])).to(ref.dtype)
            for key, ref in reference.items()}


def join_models(models: Mapping[str, Mapping[str, torch.Tensor]]) -> ArrayRecord:
    """One ArrayRecord holding every architecture's state dict, keys ``"<arch>/<key>"``."""
    record = ArrayRecord()
    for arch, state in models.items():
        if SEPARATOR in arch:
            raise ValueError(f"architecture name {arch!r} must not contain {SEPARATOR!r}")
        for key, tensor in state.items():
            record[f"{arch}{SEPARATOR}{key}"] = Array(tensor.detach().cpu().numpy())
    return record


def split_models(record: ArrayRecord) -> dict[str, ArrayRecord]:
    """Inverse of `join_models`: architecture -> ArrayRecord of its state dict (prefix stripped)."""
    models: dict[str, ArrayRecord] = {}
    for key in record.keys():
        arch, sep, name = key.partition(SEPARATOR)
        if not sep or not arch or not name:
            raise ValueError(f"key {key!r} is not '<arch>{SEPARATOR}<state-dict key>'")
        models.setdefault(arch, ArrayRecord())[name] = record[key]
    return models


@torch.no_grad()
def teacher_logits(teachers: Sequence[nn.Module], x: torch.Tensor, batch_size: int = 1024,
                   device: torch.device | None = None) -> np.ndarray:
    """Logits ``[K, N, C]`` of each teacher on ``x``, in eval mode (on `device`)."""
    device = select_device() if device is None else device
    out = []
    for model in teachers:
        with on_device([model], device):
            model.eval()
            logits = [model(chunk.to(device)) for chunk in x.split(batch_size)]
            out.append(torch.cat(logits).float().cpu().numpy())
    return np.stack(out)


def distill(
    student: nn.Module,
    x: torch.Tensor,
    soft_targets: torch.Tensor,
    *,
    temperature: float,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: Sequence[int],
    device: torch.device | None = None,
    step: StepFactory | None = None,
) -> list[float]:
    """Distil soft targets into `student` on unlabelled inputs; return the mean KD loss per epoch.

    Adam over the student's parameters, ``KDLoss(temperature)`` on mini-batches of ``x`` (no
    labels), the student in train mode (its BatchNorm statistics follow ``x``). Shuffling and any
    dropout are seeded from `seed`; the global torch RNG is left as it was.

    Parameters
    ----------
    student : nn.Module
        Updated in place.
    x : torch.Tensor
        ``[N, ...]`` transfer inputs.
    soft_targets : torch.Tensor
        ``[N, C]`` teacher probabilities at `temperature`.
    temperature, epochs, lr, batch_size
        KD temperature, passes over ``x``, Adam learning rate, mini-batch size.
    seed : sequence of int
        Entropy for the seed (e.g. ``(strategy seed, round, architecture index)``).
    device : torch.device, optional
        Where to train (None: `fedkd.devices.select_device`); the student comes back where it was.
    step : callable, optional
        ``step(device) -> (extra parameters, batch_loss)``, called once after the seeding; Adam
        also trains the extra parameters and ``batch_loss(x_batch, soft_batch, idx)`` gives each
        batch's loss (`fedkd.ensemble_distill`). None: ``KDLoss(temperature)`` on the student.
    """
    device = select_device() if device is None else device
    deterministic_from_env(device)
    if step is None:
        loss_fn = KDLoss(temperature)

        def step(_device: torch.device) -> tuple[list[nn.Parameter], BatchLoss]:
            return [], lambda xb, soft, _idx: loss_fn(student(xb), soft_targets=soft)

    state = int(np.random.SeedSequence(list(seed)).generate_state(1)[0])
    gen = torch.Generator().manual_seed(state)  # the shuffles: on the CPU, whatever the device
    history = []
    with on_device([student], device), torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(state)
        extra, batch_loss = step(device)  # after the seed: a term's own weights draw from it
        optimizer = torch.optim.Adam([*student.parameters(), *extra], lr=lr)
        x, soft_targets = x.to(device), soft_targets.to(device)
        student.train()
        for _ in range(epochs):
            losses = []
            for idx in torch.randperm(len(x), generator=gen).split(batch_size):
                loss = batch_loss(x[idx], soft_targets[idx], idx)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
            history.append(mean_loss(losses))
        student.eval()
    return history


@torch.no_grad()
def kd_divergence(model: nn.Module, x: torch.Tensor, soft_targets: torch.Tensor, temperature: float,
                  device: torch.device | None = None) -> float:
    """``KDLoss(temperature)`` of `model` (eval mode) against `soft_targets` on all of ``x``
    (on `device`)."""
    device = select_device() if device is None else device
    with on_device([model], device):
        model.eval()
        return float(KDLoss(temperature)(model(x.to(device)), soft_targets=soft_targets.to(device)))
