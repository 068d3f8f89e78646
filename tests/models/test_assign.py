"""assign_models and the conf/model presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fedkd.errors import ConfigError
from fedkd.models import assign_models, build_model, count_parameters

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
CNN = {"_target_": "fedkd.models.CNN2d", "channels": [8, 16]}
MLP_SPEC = {"_target_": "fedkd.models.MLP", "hidden": [64]}


def make_cfg(cycle=("cnn", "mlp"), clients=None) -> dict:
    return {"archs": {"cnn": CNN, "mlp": MLP_SPEC}, "cycle": list(cycle), "clients": clients or {}}


def test_cycle_over_partition_ids() -> None:
    assigned = assign_models(make_cfg(), 5)
    assert [name for name, _ in assigned] == ["cnn", "mlp", "cnn", "mlp", "cnn"]
    assert assigned[1][1] == MLP_SPEC


def test_client_map_overrides_cycle_with_int_and_str_keys() -> None:
    assigned = assign_models(make_cfg(clients={0: "mlp", "3": "cnn"}), 4)
    assert [name for name, _ in assigned] == ["mlp", "mlp", "cnn", "cnn"]


def test_homogeneous_gives_everyone_the_first_arch() -> None:
    assigned = assign_models(make_cfg(cycle=("mlp", "cnn"), clients={1: "cnn"}), 3, homogeneous=True)
    assert [name for name, _ in assigned] == ["mlp", "mlp", "mlp"]


def test_specs_are_independent_copies() -> None:
    cfg = make_cfg()
    assigned = assign_models(cfg, 3)
    assigned[0][1]["channels"].append(32)
    assert cfg["archs"]["cnn"]["channels"] == [8, 16]
    assert assigned[2][1]["channels"] == [8, 16]


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (make_cfg(cycle=("cnn", "resnet")), "'resnet' is unknown"),
        (make_cfg(cycle=()), "cycle"),
        (make_cfg(clients={4: "mlp"}), "out of range"),
        (make_cfg(clients={-1: "mlp"}), "out of range"),
        (make_cfg(clients={"first": "mlp"}), "'first'"),
        (make_cfg(clients={1: "vit"}), "'vit' is unknown"),
        ({"archs": {"cnn": {"channels": [8]}}, "cycle": ["cnn"]}, "_target_"),
        ({"cycle": ["cnn"]}, "archs"),
    ],
)
def test_bad_model_config_raises(cfg: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        assign_models(cfg, 4)


def test_bad_num_clients_raises() -> None:
    with pytest.raises(ConfigError, match="num_clients"):
        assign_models(make_cfg(), 0)


@pytest.mark.parametrize(
    ("preset", "input_shape", "expected"),
    [
        ("hetero", (1, 8, 8), [("cnn_small", 1946), ("mlp", 4810), ("cnn_small", 1946)]),
        ("cnn", (1, 8, 8), [("cnn_small", 1946)] * 3),
        ("mlp", (1, 8, 8), [("mlp", 4810)] * 3),
        ("hetero1d", (1, 40), [("cnn1d", 3114), ("mlp", 3274), ("cnn1d", 3114)]),
    ],
)
def test_presets_assign_and_build(preset: str, input_shape: tuple[int, ...], expected: list) -> None:
    cfg = OmegaConf.load(CONF / f"{preset}.yaml")
    built = []
    for name, spec in assign_models(cfg, 3):
        model = build_model(spec, input_shape, 10)
        assert model(torch.randn(2, *input_shape)).shape == (2, 10)
        built.append((name, count_parameters(model)))
    assert built == expected


def test_hetero_has_teacher_outside_cycle() -> None:
    cfg = OmegaConf.load(CONF / "hetero.yaml")
    assert "cnn_teacher" not in cfg.cycle
    teacher = build_model(cfg.archs.cnn_teacher, (1, 8, 8), 10)
    assert count_parameters(teacher) == 6330  # see test_families.test_parameter_counts
