"""Which device a client's student, the server's distillation and the generators compute on.

`select_device` is the one choice: ``cuda`` when a CUDA device is visible (and, inside a Ray
actor, granted), else ``cpu``; the environment variable ``FEDKD_DEVICE`` (``auto``, ``cpu``,
``cuda``) forces it. In Flower's simulation every client is a Ray actor: with
``simulation.client_resources.num_gpus > 0`` Ray makes the granted GPU the only visible one. With
``num_gpus=0`` "visible" is not "granted": the simulation sets
``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0`` (Ray's coming default), so Ray leaves every GPU visible
to an actor granted none; `ray_gpu_grant` asks Ray for the grant instead.

Data, index permutations and seeded generators stay on the CPU; batches go to the device where
they are used, and what leaves a model (logits, metrics, state) comes back as CPU tensors, so
CPU runs are bit for bit what they were before devices existed (docs/gpu.md).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fedkd.errors import ConfigError

DEVICE_ENV = "FEDKD_DEVICE"
"""Environment variable forcing the device: ``auto`` (default), ``cpu`` or ``cuda``."""
DETERMINISTIC_ENV = "FEDKD_DETERMINISTIC"
"""Environment variable: ``1`` makes GPU work repeatable (deterministic kernels, no TF32)."""
CHOICES = ("auto", "cpu", "cuda")
CPU = torch.device("cpu")


def ray_gpu_grant() -> bool | None:
    """Whether the Ray worker this runs in was granted a GPU; None outside a Ray worker (the
    driver, a deployed node, a test)."""
    ray = sys.modules.get("ray")  # never imported here: a process without Ray has no grant
    if ray is None or not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return None
    return bool(context.get_accelerator_ids().get("GPU"))


def select_device(requested: str | None = None, *, cuda_available: bool | None = None,
                  gpu_granted: bool | None = None) -> torch.device:
    """The device to compute on.

    Parameters
    ----------
    requested : str, optional
        ``auto``, ``cpu`` or ``cuda``; None reads ``FEDKD_DEVICE`` (unset or empty: ``auto``).
    cuda_available : bool, optional
        Whether a CUDA device is visible; None asks ``torch.cuda.is_available()``.
    gpu_granted : bool, optional
        Whether this process's resources include a GPU; None asks Ray (`ray_gpu_grant`), and
        outside Ray a visible GPU counts as granted.

    Raises
    ------
    ConfigError
        The request is none of the choices, or asks for ``cuda`` where none is visible or in a
        Ray actor granted none (Ray would not count it: actors would crowd one GPU).
    """
    key = "device" if requested is not None else DEVICE_ENV
    choice = requested if requested is not None else os.environ.get(DEVICE_ENV, "")
    choice = choice.strip().lower() or "auto"
    if choice not in CHOICES:
        raise ConfigError(key, choice, f"must be one of {', '.join(CHOICES)}")
    if choice == "cpu":
        return CPU
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if choice == "cuda" and not available:
        raise ConfigError(key, choice, "no CUDA device is visible here (no GPU, or a CPU-only "
                                       "torch)")
    granted = ray_gpu_grant() if gpu_granted is None else gpu_granted
    if choice == "cuda" and granted is False:
        raise ConfigError(key, choice, "this Ray actor holds no GPU: give clients one "
                                       "(simulation.client_resources.num_gpus > 0)")
    return torch.device("cuda" if available and granted is not False else "cpu")


def deterministic_from_env(device: torch.device) -> bool:
    """With ``FEDKD_DETERMINISTIC=1`` and a CUDA `device`, turn on torch's deterministic
    algorithms (cuBLAS workspace fixed, cuDNN autotuning off; an operation without a deterministic
    kernel warns) and full float32 convolutions (no TF32); return whether they are on. The CPU
    path is deterministic without it (docs/gpu.md)."""
    if os.environ.get(DETERMINISTIC_ENV, "0").strip().lower() not in ("1", "true") \
            or device.type != "cuda":
        return False
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    return True


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters (or buffers) are; the CPU for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return CPU


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether `a` and `b` name the same device (``cuda`` and ``cuda:0`` count as the same)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def place(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """The device to compute `model` on: `device` (the model is moved there, in place) or, with
    None, where the model already is."""
    if device is None:
        return model_device(model)
    device = torch.device(device)
    if not same_device(model_device(model), device):
        model.to(device)
    return device


@contextmanager
def on_device(models: Iterable[nn.Module], device: torch.device) -> Iterator[torch.device]:
    """Run the block with `models` on `device`; each goes back where it was afterwards."""
    homes = [(model, model_device(model)) for model in models]
    for model, home in homes:
        if not same_device(home, device):
            model.to(device)
    try:
        yield device
    finally:
        for model, home in homes:
            if not same_device(model_device(model), home):
                model.to(home)


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose RNG ``torch.random.fork_rng`` must save for work on `device`."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def cpu_state(value: Any) -> Any:
    """`value` (a state dict, an optimizer's, nested dicts, lists, tuples) with every tensor on the
    CPU; CPU tensors are returned as they are (no copy)."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):  # an OrderedDict stays one, with a state dict's _metadata
        out = type(value)((key, cpu_state(item)) for key, item in value.items())
        if hasattr(value, "_metadata"):
            out._metadata = value._metadata
        return out
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_state(item) for item in value)
    return value

