"""Server-side maths of FedDF: per-architecture averaging, checked weights, ensemble distillation.

These functions know nothing of Flower messages; `fedkd.strategies.feddf.FedDF` calls them, and their
tests pin the numbers. State dicts are ``{name: torch.Tensor}`` (the full ``state_dict()``,
BatchNorm buffers included).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from fedkd import reply_checks
from fedkd.losses import KDLoss

StateDict = dict[str, torch.Tensor]

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
def teacher_logits(teachers: Sequence[nn.Module], x: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    """Logits ``[K, N, C]`` of each teacher on ``x``, in eval mode."""
    out = []
    for model in teachers:
        model.eval()
        out.append(torch.cat([model(chunk) for chunk in x.split(batch_size)]).float().numpy())
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
    """
    loss_fn = KDLoss(temperature)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    state = int(np.random.SeedSequence(list(seed)).generate_state(1)[0])
    gen = torch.Generator().manual_seed(state)
    history = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(state)
        student.train()
        for _ in range(epochs):
            losses = []
            for idx in torch.randperm(len(x), generator=gen).split(batch_size):
                loss = loss_fn(student(x[idx]), soft_targets=soft_targets[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            history.append(float(np.mean(losses)))
    student.eval()
    return history


@torch.no_grad()
def kd_divergence(model: nn.Module, x: torch.Tensor, soft_targets: torch.Tensor, temperature: float) -> float:
    """``KDLoss(temperature)`` of `model` (eval mode) against `soft_targets` on all of ``x``."""
    model.eval()
    return float(KDLoss(temperature)(model(x), soft_targets=soft_targets))
