"""model=auto: the families follow the input's rank; a named model that cannot be built says which fits."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedkd.errors import ConfigError
from fedkd.models import assign_models, input_kind, resolve_model
from fedkd.models.auto import SAME_AS

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"


def preset(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"), resolve=True)


@pytest.mark.parametrize(
    ("shape", "kind"),
    [
        ((13,), "vector"),
        ((1,), "vector"),
        ((1, 8, 8), "image"),
        ((3, 2, 2), "image"),
        ((8, 8), "image"),
        ((4, 4), "image"),
        ((28, 28), "image"),
        ((1, 40), "signal"),
        ((3, 100), "signal"),
        ((100, 3), "signal"),
        ((2, 3, 4, 5), "vector"),
    ],
)
def test_input_kind_follows_the_rank(shape: tuple[int, ...], kind: str) -> None:
    assert input_kind(shape) == kind


@pytest.mark.parametrize(
    ("shape", "archs", "cycle"),
    [
        ((13,), ["mlp"], ["mlp"]),
        ((1, 40), ["cnn1d", "mlp"], ["cnn1d", "mlp"]),
        ((1, 8, 8), ["cnn_small", "cnn_deep"], ["cnn_small", "cnn_deep"]),
    ],
)
def test_auto_choices_by_rank(shape: tuple[int, ...], archs: list[str], cycle: list[str]) -> None:
    resolved = resolve_model(preset("auto"), shape, 3)

    assert list(resolved["archs"]) == archs and resolved["cycle"] == cycle
    assert "kinds" not in resolved


@pytest.mark.parametrize(
    ("shape", "named"),
    [((1, 8, 8), "hetero_cnn"), ((1, 40), "hetero1d"), ((13,), "mlp")],
)
def test_auto_equals_the_named_preset(shape: tuple[int, ...], named: str) -> None:
    auto, other = resolve_model(preset("auto"), shape, 10), resolve_model(preset(named), shape, 10)

    assert SAME_AS[input_kind(shape)] == named
    assert auto == other  # names, specs, cycle, clients, roles
    for homogeneous in (False, True):
        assert assign_models(auto, 10, homogeneous) == assign_models(other, 10, homogeneous)


def test_digits_auto_is_hetero_cnn_to_the_letter() -> None:
    names = [name for name, _ in assign_models(resolve_model(preset("auto"), (1, 8, 8), 10), 4)]
    specs = resolve_model(preset("auto"), (1, 8, 8), 10)["archs"]

    assert names == ["cnn_small", "cnn_deep", "cnn_small", "cnn_deep"]
    assert specs["cnn_small"] == {"_target_": "fedkd.models.CNN2d", "channels": [8, 16], "head_pool": 2}
    assert specs["cnn_deep"] == {"_target_": "fedkd.models.CNN2d", "channels": [8, 16, 32]}


def test_auto_keeps_client_map_and_roles() -> None:
    cfg = {**preset("auto"), "clients": {2: "cnn_deep", 1: "cnn_small"}, "roles": {2: "teacher"}}

    resolved = resolve_model(cfg, (1, 8, 8), 10)

    assert [name for name, _ in assign_models(resolved, 3)] == ["cnn_small", "cnn_small", "cnn_deep"]
    assert resolved["roles"] == {2: "teacher"}


def test_named_model_passes_through_unchanged() -> None:
    assert resolve_model(preset("hetero1d"), (1, 40), 10) == preset("hetero1d")


@pytest.mark.parametrize(
    ("named", "shape", "hint"),
    [
        ("hetero", (13,), "use model=mlp (or model=auto)"),
        ("cnn", (13,), "use model=mlp (or model=auto)"),
        ("hetero1d", (1, 8, 8), "use model=hetero_cnn (or model=auto)"),
    ],
)
def test_named_model_that_cannot_be_built_suggests_one(named: str, shape: tuple, hint: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_model(preset(named), shape, 3)

    message = str(err.value)
    assert message.endswith(hint) and "\n" not in message
    assert f"input {shape}" in message and "cannot be built" in message


def test_hetero_on_a_table_names_the_arch_and_its_family() -> None:
    with pytest.raises(ConfigError, match=r"^model arch 'cnn_small' \(fedkd\.models\.CNN2d\) cannot be "
                                          r"built for the vector input \(13,\): CNN2d: .*; use model=mlp"):
        resolve_model(preset("hetero"), (13,), 3)


def test_a_malformed_spec_is_not_blamed_on_the_input() -> None:
    cfg = {"archs": {"bad": {"_target_": "fedkd.models.MLP", "width": 3}}, "cycle": ["bad"]}

    with pytest.raises(ConfigError, match=r"'width' is not an argument of MLP") as err:
        resolve_model(cfg, (13,), 3)

    assert "use model=" not in str(err.value)


@pytest.mark.parametrize(
    ("kinds", "match"),
    [
        ({"image": {"cycle": ["mlp"]}}, r"no entry for \['signal', 'vector'\]"),
        ({k: {"cycle": ["vit"]} for k in SAME_AS}, r"names \['vit'\], not in model.archs"),
        ({k: {"cycle": []} for k in SAME_AS}, r"needs a non-empty list 'cycle'"),
    ],
)
def test_bad_kinds_are_config_errors(kinds: dict, match: str) -> None:
    cfg = {**preset("auto"), "kinds": kinds}

    with pytest.raises(ConfigError, match=match):
        resolve_model(cfg, (13,), 3)
