"""The zoo families (ResNet, MobileNet, ViT): sizes, strides, checks, DP-SGD, specs with a tap,
model_cost, and conf/model/zoo.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fedkd.dpsgd import spec_has_batchnorm
from fedkd.errors import ConfigError
from fedkd.models import (
    MobileNet, ResNet, ViT, assign_models, build_model, count_parameters, model_cost, spec_tap,
)
from fedkd.models.build import check_spec

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
DIGITS, MNIST, CIFAR = (1, 8, 8), (28, 28), (3, 32, 32)


def zoo() -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / "zoo.yaml"), resolve=True)


# Parameter counts, 10 classes. ResNet: bias-free convs, BatchNorm 2 per channel, option-A
# shortcuts without parameters.
#   ResNet-20 on 3x32x32: stem 3*16*9 + 32 = 464; stage 1: 3 x (2*16*16*9 + 2*32) = 14,016;
#     stage 2: (16*32*9 + 32*32*9 + 128) + 2 x (2*32*32*9 + 128) = 51,072; stage 3: (32*64*9 +
#     64*64*9 + 256) + 2 x (2*64*64*9 + 256) = 203,520; head 64*10 + 10 = 650 -> 269,722 (He et
#     al.'s 0.27M). Option B (projection) adds 1x1 conv + BN twice: 512 + 64 + 2048 + 128 -> 272,474
#   ResNet-8: 464 + 4,672 + 13,952 + 55,552 + 650 -> 75,290 (option B 78,042)
#   One input channel: 2*16*9 = 288 fewer. Exits: Linear 16*10+10 and 32*10+10 = 500 more.
#   MobileNet (stem 16; 32, 64, 128) on one channel: stem 144 + 32; block (depthwise c*9 + 2c,
#     pointwise c*w + 2w): 752, 2,528, 9,152; head 1,290 -> 13,898 (any side)
#   ViT patch 2, dim 32, depth 2, 2 heads, MLP 64, 8x8: patches 1*32*4 + 32 = 160, class token 32,
#     positions 17*32 = 544, blocks 2 x (LN 64 + qkv 3,168 + proj 1,056 + LN 64 + MLP 2,112 +
#     2,080) = 17,088, LN 64, head 330 -> 18,218; on 28x28 197 positions -> 23,978
@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (lambda: ResNet(CIFAR, 10, depth=20), 269_722),
        (lambda: ResNet(CIFAR, 10, depth=20, projection=True), 272_474),
        (lambda: ResNet(CIFAR, 10, depth=8), 75_290),
        (lambda: ResNet(CIFAR, 10, depth=8, projection=True), 78_042),
        (lambda: ResNet(DIGITS, 10, depth=20), 269_434),
        (lambda: ResNet(MNIST, 10, depth=8), 75_002),
        (lambda: ResNet(DIGITS, 10, depth=8, exits=True), 75_502),
        (lambda: MobileNet(DIGITS, 10), 13_898),
        (lambda: MobileNet(MNIST, 10), 13_898),
        (lambda: ViT(DIGITS, 10, patch=2), 18_218),
        (lambda: ViT(MNIST, 10, patch=2), 23_978),
    ],
)
def test_parameter_counts(model, expected: int) -> None:
    assert count_parameters(model()) == expected


@pytest.mark.parametrize(
    ("model", "shape", "sides"),
    [
        (lambda s: ResNet(s, 10, depth=8), DIGITS, [8, 4, 2]),
        (lambda s: ResNet(s, 10, depth=8), MNIST, [28, 14, 7]),
        (lambda s: ResNet(s, 10, depth=8), CIFAR, [32, 16, 8]),
        (lambda s: ResNet(s, 10, depth=8), (4, 4), [4, 2, 2]),  # 2 -> 1 would be below 2
        (lambda s: MobileNet(s, 10), DIGITS, [8, 4, 2]),
        (lambda s: MobileNet(s, 10), MNIST, [28, 14, 7]),
        (lambda s: MobileNet(s, 10, widths=(8, 8, 8, 8)), (5, 5), [5, 3, 3, 3]),
    ],
)
def test_sides_halve_while_they_stay_at_least_two(model, shape, sides: list[int]) -> None:
    net = model(shape).eval()
    names = [f"block{i}" for i in range(1, len(sides) + 1)]

    _, taps = net.forward_taps(torch.zeros(2, *shape), names)

    assert [taps[n].shape[-1] for n in names] == sides
    assert [taps[n].shape[-2] for n in names] == sides


@pytest.mark.parametrize(
    ("family", "kwargs", "match"),
    [
        (ResNet, {"depth": 9}, r"ResNet: depth=9 must be 2 \+ 2\*n\*3 .*8, 14, 20, 26"),
        (ResNet, {"depth": 2}, "ResNet: depth=2"),
        (ResNet, {"depth": 8, "widths": [16, 32]}, r"2 \+ 2\*n\*2 .*6, 10, 14"),
        (ResNet, {"widths": [32, 16, 64]}, "must not decrease with option-A shortcuts"),
        (ResNet, {"exits": "yes"}, "ResNet: exits='yes' must be true or false"),
        (ResNet, {"widths": []}, "ResNet: widths"),
        (MobileNet, {"stem": 0}, "MobileNet: stem=0 must be a positive int"),
        (MobileNet, {"widths": [8, -1]}, "MobileNet: widths"),
        (ViT, {"patch": 3}, r"ViT: patch=3 must divide the image sides 8x8: one of \[1, 2, 4, 8\]"),
        (ViT, {"dim": 30, "heads": 4}, "ViT: dim=30 must be a multiple of heads=4"),
        (ViT, {"mlp_ratio": 0}, "ViT: mlp_ratio=0 must be a number > 0"),
        (ViT, {"depth": 0}, "ViT: depth=0 must be a positive int"),
    ],
)
def test_bad_hyperparameters_are_one_line_config_errors(family, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        family(DIGITS, 10, **kwargs)
    assert "\n" not in str(err.value)


def test_resnet_projection_and_decreasing_widths() -> None:
    model = ResNet(DIGITS, 10, depth=8, widths=(32, 16, 16), projection=True)
    assert model(torch.zeros(2, *DIGITS)).shape == (2, 10)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the input needs no grad
@pytest.mark.parametrize("name", ["resnet8", "resnet20", "mobilenet", "vit"])
def test_dp_compatible_build_passes_opacus(name: str) -> None:
    from opacus import GradSampleModule

    # Prepare
    spec = {**zoo()["archs"][name], "dp_compatible": True}
    # Execute
    model = build_model(spec, DIGITS, 10)
    wrapped = GradSampleModule(model, loss_reduction="sum")
    wrapped(torch.randn(3, *DIGITS)).sum().backward()
    # Assert
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert all(p.grad_sample.shape == (3, *p.shape) for p in model.parameters())
    assert spec_has_batchnorm(spec) == (name != "vit")  # privacy.batchnorm=refuse reads it


def test_spec_tap_is_checked_after_building() -> None:
    spec = {"_target_": "fedkd.models.ResNet", "depth": 8, "tap": "block9"}

    with pytest.raises(ConfigError) as err:
        build_model(spec, DIGITS, 10)

    assert str(err.value) == (f"model spec {spec!r}: tap='block9': ResNet has no such tap; allowed: "
                              "['block1', 'block2', 'block3', 'embedding']")


@pytest.mark.parametrize(
    ("spec", "tap"),
    [
        ({"_target_": "fedkd.models.MLP"}, "embedding"),
        ({"_target_": "fedkd.models.ResNet", "depth": 8, "exits": True, "tap": "exit2"}, "exit2"),
        (OmegaConf.create({"_target_": "fedkd.models.ViT", "tap": "attention1"}), "attention1"),
    ],
)
def test_spec_tap_default_and_accepted(spec, tap: str) -> None:
    model = build_model(spec, DIGITS, 10)
    assert spec_tap(spec) == tap and tap in model.tap_kinds
    assert check_spec(spec)[1].get("tap") is None  # not a constructor argument


@pytest.mark.parametrize("tap", [3, None, ["block1"], {"_target_": "os.system"}])
def test_tap_must_be_a_plain_string(tap) -> None:
    spec = {"_target_": "fedkd.models.CNN2d", "tap": tap}
    with pytest.raises(ConfigError, match="must be a string|not allowed"):
        check_spec(spec)
    with pytest.raises(ConfigError):
        build_model(spec, DIGITS, 10)


@pytest.mark.parametrize("target", ["fedkd.models.ResNet", "fedkd.models.resnet.ResNet",
                                    "fedkd.models.MobileNet", "fedkd.models.vit.ViT"])
def test_allowlist_has_the_zoo(target: str) -> None:
    assert build_model({"_target_": target}, DIGITS, 10)(torch.zeros(1, *DIGITS)).shape == (1, 10)


@pytest.mark.parametrize("target", ["torch.nn.Linear", "fedkd.models.resnet.BasicBlock",
                                    "fedkd.models.vit.Attention", "fedkd.models.taps.Tapped"])
def test_allowlist_refuses_the_rest(target: str) -> None:
    with pytest.raises(ConfigError, match="_target_"):
        build_model({"_target_": target}, DIGITS, 10)


def test_model_cost_of_a_linear_layer() -> None:
    # Prepare: a trained-mode model with one submodule in eval mode
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Dropout(0.5)).train()
    model[2].eval()
    rng = torch.get_rng_state()
    # Execute
    params, flops = model_cost(model, (3, 4))
    # Assert
    assert (params, flops) == (12 * 5 + 5, 2 * 12 * 5)
    assert model.training and model[1].training and not model[2].training
    assert torch.equal(torch.get_rng_state(), rng)  # no randomness drawn


def test_model_cost_grows_with_depth_and_ignores_exits() -> None:
    small, big = ResNet(DIGITS, 10, depth=8), ResNet(DIGITS, 10, depth=20)
    with_exits = ResNet(DIGITS, 10, depth=8, exits=True)

    (p8, f8), (p20, f20) = model_cost(small, DIGITS), model_cost(big, DIGITS)

    assert p8 < p20 and f8 < f20
    assert model_cost(with_exits, DIGITS)[1] == f8  # forward never runs the exits
    # ResNet-20 on CIFAR: 40.6M multiply-adds (He et al.'s ~41M), 2 FLOPs each
    assert model_cost(ResNet(CIFAR, 10, depth=20), CIFAR) == (269_722, 81_102_080)


def test_zoo_builds_on_digits_and_mnist_with_distinct_taps() -> None:
    cfg = zoo()
    assigned = assign_models(cfg, 4)

    assert [name for name, _ in assigned] == ["resnet8", "resnet20", "mobilenet", "vit"]
    assert len({spec_tap(spec) for _, spec in assigned}) == 4
    for shape in (DIGITS, MNIST):
        for name, spec in assigned:
            model = build_model(spec, shape, 10).eval()
            logits, taps = model.forward_taps(torch.zeros(2, *shape), [spec_tap(spec)])
            assert logits.shape == (2, 10) and taps[spec_tap(spec)].shape[0] == 2, name
