"""build_model and check_spec: specs to models, refusing anything but fedkd.models classes with plain
arguments (specs arrive over the wire)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from fedkd.errors import ConfigError
from fedkd.models import CNN1d, CNN2d, MLP, MobileNet, ResNet, ViT, build_model, count_parameters
from fedkd.models.build import MODEL_CLASSES, check_spec
from fedkd.models.fedgen import FedGenCNN


def test_builds_spec_and_drops_name() -> None:
    # Prepare
    spec = {"_target_": "fedkd.models.CNN2d", "channels": [8, 16], "name": "cnn_small"}
    # Execute
    model = build_model(spec, (1, 8, 8), 10)
    # Assert
    assert isinstance(model, CNN2d)
    assert count_parameters(model) == 1466  # see test_families.test_parameter_counts
    assert spec["name"] == "cnn_small"  # the caller's spec is not modified


def test_accepts_dictconfig_and_module_path() -> None:
    spec = OmegaConf.create({"_target_": "fedkd.models.mlp.MLP", "hidden": [32]})
    model = build_model(spec, (64,), 3)
    assert isinstance(model, MLP)
    assert count_parameters(model) == 64 * 32 + 32 + 32 * 3 + 3


def test_same_seed_same_weights_as_direct_construction() -> None:
    torch.manual_seed(0)
    built = build_model({"_target_": "fedkd.models.CNN2d", "channels": [8, 16]}, (1, 8, 8), 10)
    torch.manual_seed(0)
    direct = CNN2d((1, 8, 8), 10, channels=(8, 16))
    assert all(torch.equal(built.state_dict()[k], v) for k, v in direct.state_dict().items())


@pytest.mark.parametrize(
    "target",
    [
        "os.system",
        "builtins.eval",
        "subprocess.Popen",
        "fedkd.models.build.hydra.utils.instantiate",  # walking through an imported module
        "fedkd.models.build.importlib.import_module",
        "fedkd.models.build.nn.Linear",  # a torch module, not a fedkd model
        "fedkd.models.build_model",  # a function, not a model class
        "fedkd.models.build.ConfigError",  # a class, but not an nn.Module
        "fedkd.models.nothere.Model",
        "fedkd.modelsX.MLP",
        None,
    ],
)
def test_refuses_targets_outside_fedkd_models(target) -> None:
    with pytest.raises(ConfigError, match="_target_"):
        build_model({"_target_": target}, (64,), 10)


@pytest.mark.parametrize(
    "spec",
    [
        {"_target_": "fedkd.models.MLP", "hidden": {"_target_": "os.system", "_args_": ["echo hi"]}},
        {"_target_": "fedkd.models.MLP", "_args_": [[64]]},
        {"_target_": "fedkd.models.MLP", "_partial_": True},
        {"_target_": "fedkd.models.MLP", "_recursive_": True},
    ],
)
def test_refuses_hydra_control_keys(spec) -> None:
    with pytest.raises(ConfigError, match="not allowed"):
        build_model(spec, (64,), 10)


@pytest.mark.parametrize(
    "spec",
    [
        {"_target_": "fedkd.models.MLP", "width": 64},  # unknown argument
        {"_target_": "fedkd.models.MLP", "num_classes": 3},  # clashes with the positional argument
        {"_target_": "fedkd.models.CNN2d", "channels": [0]},  # the family's own check
        "fedkd.models.MLP",  # not a mapping
    ],
)
def test_constructor_errors_become_config_errors_naming_the_spec(spec) -> None:
    with pytest.raises(ConfigError, match="model spec"):
        build_model(spec, (64,), 10)


def test_wrong_rank_message_names_family_and_shape() -> None:
    with pytest.raises(ConfigError, match=r"CNN1d.*\(1, 8, 8\)"):
        build_model({"_target_": "fedkd.models.CNN1d"}, (1, 8, 8), 10)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"_target_": "fedkd.models.MLP", "hidden": "os.system"}, "flat list"),
        ({"_target_": "fedkd.models.MLP", "hidden": [[64]]}, "flat list"),
        ({"_target_": "fedkd.models.MLP", "hidden": [64], "dropout": float("nan")}, "flat list"),
        ({"_target_": "fedkd.models.MLP", "hidden": [{"_target_": "os.system"}]}, "not allowed"),
        ({"_target_": "fedkd.models.MLP", "name": {"_target_": "os.system"}}, "not allowed"),
        ({"_target_": "fedkd.models.MLP", "name": 3}, "must be a string"),
        ({"_target_": "fedkd.models.MLP", "input_shape": [64]}, "come from the data"),
    ],
)
def test_check_spec_allows_only_plain_arguments(spec, match) -> None:
    with pytest.raises(ConfigError, match=match):
        check_spec(spec, "archs.mlp")


def test_check_spec_returns_class_and_arguments_without_building() -> None:
    cls, kwargs = check_spec({"_target_": "fedkd.models.CNN1d", "channels": (4,), "name": "c"})
    assert cls is CNN1d and kwargs == {"channels": [4]}
    assert set(MODEL_CLASSES.values()) == {MLP, CNN2d, CNN1d, FedGenCNN, ResNet, MobileNet, ViT}
