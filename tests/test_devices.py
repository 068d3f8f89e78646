"""The device choice (fedkd.devices), and training that gives the same numbers wherever it runs.

Runs on the CPU; the "cuda chosen" branch is exercised by injecting availability (or patching
``torch.cuda.is_available``) and by spying on ``nn.Module.to``. Tests that need a real GPU are
skipped without one.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from torch import nn

from fedkd.client.fd import regularized_train
from fedkd.client.state import OPTIMIZER, STUDENT, Student, optimizer_state
from benchmarks import gpu_step
from fedkd.devices import (
    DETERMINISTIC_ENV, DEVICE_ENV, cpu_state, deterministic_from_env, model_device, on_device,
    place, ray_gpu_grant, same_device, select_device,
)
from fedkd.errors import ConfigError
from fedkd.losses import distill_loss
from fedkd.models import build_model
from fedkd.optim import build_optimizer
from fedkd.server_distill import distill, kd_divergence, teacher_logits
from fedkd.training import digest, evaluate, own_accuracy, predict_logits, revisit, round_generator

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SPEC = {"_target_": "fedkd.models.FedGenCNN", "channels": [6, 16], "hidden": 32}
SGD = {"_target_": "torch.optim.SGD", "lr": 0.01, "momentum": 0.9}


@pytest.fixture(autouse=True)
def no_device_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEVICE_ENV, raising=False)


def fake_ray(mode: str = "worker", gpus: tuple[str, ...] = ()) -> SimpleNamespace:
    """A stand-in for the ``ray`` module as a Ray worker (or the driver) sees it."""
    context = SimpleNamespace(worker=SimpleNamespace(mode=1 if mode == "worker" else 0),
                              get_accelerator_ids=lambda: {"GPU": list(gpus)})
    return SimpleNamespace(WORKER_MODE=1, is_initialized=lambda: True,
                           get_runtime_context=lambda: context)


def student_and_data(seed: int = 1) -> tuple[nn.Module, torch.optim.Optimizer, dict]:
    torch.manual_seed(seed)
    model = build_model(SPEC, (1, 28, 28), 10)
    gen = torch.Generator().manual_seed(0)
    data = {"x": torch.rand(96, 1, 28, 28, generator=gen),
            "y": torch.randint(10, (96,), generator=gen),
            "tx": torch.rand(64, 1, 28, 28, generator=gen),
            "soft": torch.softmax(torch.randn(64, 10, generator=gen), 1)}
    return model, build_optimizer(SGD, model.parameters()), data


def client_round(model: nn.Module, opt: torch.optim.Optimizer, data: dict,
                 device: torch.device | None) -> tuple[list[float], np.ndarray]:
    """Digest, revisit, logits, evaluate: one client's round of work on `device`."""
    gen = round_generator(0, 1, 1)
    losses = [digest(model, opt, data["tx"], data["soft"], data["x"], data["y"],
                     loss=distill_loss(0.5, 2.0), epochs=1, batch_size=32, gen=gen, device=device),
              revisit(model, opt, data["x"], data["y"], epochs=1, batch_size=32, gen=gen,
                      device=device),
              revisit(model, opt, data["x"], data["y"], epochs=1, batch_size=32, gen=gen, steps=2,
                      device=device),
              *evaluate(model, data["x"], data["y"], device=device),
              own_accuracy(model, data["x"], data["y"], torch.arange(10), device=device)]
    return losses, predict_logits(model, data["tx"], device=device)


# --- select_device ------------------------------------------------------------------------------
@pytest.mark.parametrize(("requested", "available", "granted", "expected"), [
    (None, False, None, CPU), (None, True, None, CUDA), (None, True, False, CPU),
    ("auto", True, True, CUDA), ("cpu", True, True, CPU), ("cuda", True, None, CUDA),
    (" CUDA ", True, None, CUDA), ("", False, None, CPU),
])
def test_select_device_with_injected_availability(requested, available, granted, expected):
    assert select_device(requested, cuda_available=available, gpu_granted=granted) == expected


@pytest.mark.parametrize(("value", "available", "expected"), [
    ("cpu", True, CPU), ("auto", True, CUDA), ("auto", False, CPU), ("", True, CUDA),
    ("Cuda", True, CUDA),
])
def test_select_device_reads_the_environment(monkeypatch, value, available, expected):
    monkeypatch.setenv(DEVICE_ENV, value)
    assert select_device(cuda_available=available, gpu_granted=None) == expected


@pytest.mark.parametrize("value", ["gpu", "cuda:0", "tpu", "1"])
def test_a_bad_device_value_is_refused_by_name(monkeypatch, value):
    monkeypatch.setenv(DEVICE_ENV, value)
    refusal = f"{DEVICE_ENV}='{value.lower()}': must be one of auto, cpu, cuda"
    with pytest.raises(ConfigError, match=refusal):
        select_device(cuda_available=True)
    with pytest.raises(ConfigError, match=f"device='{value.lower()}'"):
        select_device(value, cuda_available=True)


def test_a_bad_device_value_stops_the_run_at_its_check(monkeypatch):
    from fedkd.checks import check_run
    from fedkd.server import compose_config

    cfg = compose_config([])
    monkeypatch.setenv(DEVICE_ENV, "gpu")
    with pytest.raises(ConfigError, match=f"{DEVICE_ENV}='gpu'"):
        check_run(cfg)


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    with pytest.raises(ConfigError, match="FEDKD_DEVICE='cuda': no CUDA device is visible"):
        select_device(cuda_available=False)


def test_patched_cuda_availability_chooses_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device() == CUDA
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert select_device() == CPU


@pytest.mark.parametrize(("ray", "expected"), [
    (fake_ray("worker", ("0",)), True), (fake_ray("worker"), False), (fake_ray("driver"), None),
])
def test_a_ray_actor_uses_a_gpu_only_when_granted_one(monkeypatch, ray, expected):
    monkeypatch.setitem(sys.modules, "ray", ray)
    assert ray_gpu_grant() is expected
    # A GPU visible to an actor without a grant (Ray no longer hiding it) stays unused:
    assert select_device(cuda_available=True) == (CPU if expected is False else CUDA)


def test_cuda_forced_in_a_ray_actor_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", fake_ray("worker"))
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    with pytest.raises(ConfigError, match="holds no GPU: give clients one"):
        select_device(cuda_available=True)
    monkeypatch.setitem(sys.modules, "ray", fake_ray("worker", ("0",)))
    assert select_device(cuda_available=True) == CUDA


def test_no_ray_no_grant_to_ask(monkeypatch):
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert ray_gpu_grant() is None


def test_deterministic_mode_only_on_request_and_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in (DETERMINISTIC_ENV, "CUBLAS_WORKSPACE_CONFIG")})
    monkeypatch.setattr(torch, "use_deterministic_algorithms",
                        lambda on, warn_only=False: calls.append((on, warn_only)))
    for flag in ("allow_tf32", "benchmark"):  # restored after the test
        monkeypatch.setattr(torch.backends.cudnn, flag, getattr(torch.backends.cudnn, flag))
    assert not deterministic_from_env(CUDA)  # not asked for
    monkeypatch.setenv(DETERMINISTIC_ENV, "1")
    assert not deterministic_from_env(CPU)  # the CPU needs nothing
    assert deterministic_from_env(CUDA)
    assert calls == [(True, True)] and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cudnn.benchmark


# --- models and state on a device ---------------------------------------------------------------
def test_place_moves_only_when_asked_and_needed(monkeypatch):
    model = nn.Linear(3, 2)
    moved = []
    monkeypatch.setattr(nn.Module, "to", lambda self, device: moved.append(device) or self)
    assert place(model, None) == CPU and place(model, CPU) == CPU
    assert place(model, "cuda") == CUDA
    assert moved == [CUDA]
    assert same_device(torch.device("cuda"), torch.device("cuda:0"))
    assert not same_device(torch.device("cuda:1"), torch.device("cuda:0"))
    assert model_device(nn.ReLU()) == CPU


def test_on_device_brings_the_models_back():
    model = nn.Linear(3, 2)
    with on_device([model], torch.device("meta")):
        assert model_device(model).type == "meta"
        model.to_empty(device="cpu")  # meta holds no values: bring back empty CPU tensors
    assert model_device(model) == CPU


def test_cpu_state_keeps_cpu_tensors_and_the_state_dict_metadata():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    state = model.state_dict()
    out = cpu_state({"model": state, "list": [torch.ones(1)], "n": 3})
    assert type(out["model"]) is type(state) and out["model"]._metadata == state._metadata
    assert all(out["model"][k] is v for k, v in state.items())  # on the CPU: no copy
    assert out["n"] == 3 and torch.equal(out["list"][0], torch.ones(1))


def test_restore_chooses_cuda_and_moves_the_student(monkeypatch, small_run):
    moved = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(nn.Module, "to", lambda self, *a, **k: moved.append(a[0]) or self)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    Student.restore(context, small_run.settings, 0)
    assert moved == [CUDA]  # the fresh student: initialised on the CPU, then moved


def test_state_saved_from_the_device_round_trips_as_cpu_tensors(small_run):
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    student = Student.restore(context, small_run.settings, 0, device=CPU)
    loss = student.model(torch.randn(8, *small_run.data.input_shape)).logsumexp(1).mean()
    student.optimizer.zero_grad()
    loss.backward()
    student.optimizer.step()
    student.save(context)
    saved = context.state[STUDENT].to_torch_state_dict()
    assert all(t.device == CPU for t in saved.values())
    assert all(t.device == CPU for t in context.state[OPTIMIZER].to_torch_state_dict().values())
    back = Student.restore(context, small_run.settings, 0, device=CPU)
    assert model_device(back.model) == CPU
    for a, b in zip(student.model.state_dict().values(), back.model.state_dict().values()):
        assert torch.equal(a, b)


def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[int, ...]]]:
    """Make ``.to(cuda)`` a recorded no-op for tensors and modules (other moves run as usual):
    the work then runs on the CPU, and the list says what was sent to the device."""
    sent: list[tuple[str, tuple[int, ...]]] = []
    tensor_to, module_to = torch.Tensor.to, nn.Module.to

    def is_cuda(args: tuple) -> bool:
        return bool(args) and isinstance(args[0], (torch.device, str)) and "cuda" in str(args[0])

    def to_tensor(self, *args, **kwargs):
        if is_cuda(args):
            sent.append(("tensor", tuple(self.shape)))
            return self
        return tensor_to(self, *args, **kwargs)

    def to_module(self, *args, **kwargs):
        if is_cuda(args):
            sent.append(("module", ()))
            return self
        return module_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to_tensor)
    monkeypatch.setattr(nn.Module, "to", to_module)
    return sent


def test_training_sends_the_model_and_its_inputs_to_the_device(monkeypatch):
    model, opt, data = student_and_data()
    twin = copy.deepcopy(model)
    twin_opt = build_optimizer(SGD, twin.parameters())
    expected = client_round(twin, twin_opt, data, CPU)
    sent = fake_cuda(monkeypatch)
    assert client_round(model, opt, data, CUDA)[0] == expected[0]
    assert ("module", ()) in sent
    shapes = {shape for kind, shape in sent if kind == "tensor"}
    assert {tuple(data[k].shape) for k in ("x", "y", "tx", "soft")} <= shapes


# --- the same numbers with an explicit device ---------------------------------------------------
def test_client_training_on_an_explicit_cpu_equals_the_default():
    model, opt, data = student_and_data()
    twin = copy.deepcopy(model)
    twin_opt = build_optimizer(SGD, twin.parameters())
    assert client_round(model, opt, data, None)[0] == client_round(twin, twin_opt, data, CPU)[0]
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)


def test_fd_training_on_an_explicit_cpu_equals_the_default():
    model, opt, data = student_and_data()
    twin = copy.deepcopy(model)
    twin_opt = build_optimizer(SGD, twin.parameters())
    probs = torch.softmax(torch.randn(10, 10, generator=torch.Generator().manual_seed(2)), 1)
    known = torch.arange(10) != 3
    losses = [regularized_train(m, o, data["x"], data["y"], loss=distill_loss(0.5, 2.0),
                                class_probs=probs, known=known, epochs=1, batch_size=32,
                                gen=round_generator(0, 1, 1), device=d)
              for m, o, d in ((model, opt, None), (twin, twin_opt, CPU))]
    assert losses[0] == losses[1]
    assert np.array_equal(predict_logits(model, data["x"]), predict_logits(twin, data["x"]))


def test_server_distillation_on_an_explicit_cpu_equals_the_default(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the default: the CPU
    model, _, data = student_and_data()
    twin = copy.deepcopy(model)
    kwargs = {"temperature": 2.0, "epochs": 1, "lr": 1e-3, "batch_size": 32, "seed": (0, 1, 0)}
    assert (distill(model, data["tx"], data["soft"], **kwargs)
            == distill(twin, data["tx"], data["soft"], device=CPU, **kwargs))
    assert np.array_equal(teacher_logits([model], data["tx"]),
                          teacher_logits([twin], data["tx"], device=CPU))
    assert (kd_divergence(model, data["tx"], data["soft"], 2.0)
            == kd_divergence(twin, data["tx"], data["soft"], 2.0, device=CPU))


def test_gpu_step_benchmark_runs_the_cpu_arm_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu_step.json"
    result = gpu_step.main(["--rounds", "1", "--rows", "40", "--transfer", "32",
                            "--data", str(tmp_path), "--json", str(out)])
    assert result["data"] == "random" and result["speedup"] is None
    assert [arm["device"] for arm in json.loads(out.read_text())["arms"]] == ["cpu"]


# --- on a GPU (skipped without one) -------------------------------------------------------------
@needs_gpu
def test_a_client_round_on_cuda_is_finite_and_close_to_the_cpu():
    model, opt, data = student_and_data()
    twin = copy.deepcopy(model)
    twin_opt = build_optimizer(SGD, twin.parameters())
    cpu_losses, cpu_logits = client_round(model, opt, data, CPU)
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False):
        gpu_losses, gpu_logits = client_round(twin, twin_opt, data, CUDA)  # fp32 convolutions
    assert model_device(twin).type == "cuda" and isinstance(gpu_logits, np.ndarray)
    assert np.isfinite(gpu_losses).all()
    np.testing.assert_allclose(gpu_losses, cpu_losses, atol=1e-4)
    np.testing.assert_allclose(gpu_logits, cpu_logits, atol=1e-4)


@needs_gpu
def test_a_student_saved_on_cuda_restores_on_the_cpu(small_run):
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    student = Student.restore(context, small_run.settings, 0, device=CUDA)
    x = torch.randn(8, *small_run.data.input_shape, device=CUDA)
    loss = student.model(x).logsumexp(1).mean()
    loss.backward()
    student.optimizer.step()
    student.save(context)
    back = Student.restore(context, small_run.settings, 0, device=CPU)
    for a, b in zip(student.model.state_dict().values(), back.model.state_dict().values()):
        assert torch.equal(a.cpu(), b)
    for a, b in zip(optimizer_state(student.optimizer)[0].to_torch_state_dict().values(),
                    optimizer_state(back.optimizer)[0].to_torch_state_dict().values()):
        assert torch.equal(a, b)
