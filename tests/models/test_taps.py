"""Taps: every family's forward_taps agrees with forward, each tap has its kind's shape, and the
families that existed before taps compute what they computed (goldens of the original code)."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from fedkd.errors import ConfigError, show
from fedkd.models import CNN1d, CNN2d, MLP, FedGenCNN, MobileNet, ResNet, ViT, check_tap
from fedkd.models.taps import TAP_KINDS

IMAGE_FAMILIES = [
    (MLP, {}), (CNN2d, {}), (CNN2d, {"channels": [8, 16, 32], "head_pool": 2}), (FedGenCNN, {}),
    (ResNet, {"depth": 8, "exits": True}), (MobileNet, {}), (ViT, {"patch": 2}), (ViT, {"patch": 4}),
]
CASES = [(family, kwargs, shape) for family, kwargs in IMAGE_FAMILIES for shape in ((8, 8), (28, 28))]
CASES += [(CNN1d, {}, (40,)), (CNN1d, {}, (1, 40)), (MLP, {"hidden": []}, (40,))]
IDS = [f"{family.__name__}{kwargs or ''}-{shape}" for family, kwargs, shape in CASES]


def build(family: type[nn.Module], kwargs: dict, shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    return family(shape, 10, **kwargs).eval()


def final_linear(model: nn.Module) -> nn.Linear:
    """The one Linear that reads the embedding."""
    if isinstance(model, MLP):
        return model.net[-1]
    return model.head[-1] if isinstance(model.head, nn.Sequential) else model.head


def assert_kind(value: torch.Tensor, kind: str, n: int, spatial_dims: int) -> None:
    if kind == "embedding":
        assert value.dim() == 2 and value.shape[0] == n
    elif kind == "map":
        assert value.dim() == 2 + spatial_dims and value.shape[0] == n
    elif kind == "tokens":
        assert value.dim() == 3 and value.shape[0] == n
    elif kind == "attention":
        assert value.dim() == 4 and value.shape[0] == n and value.shape[-1] == value.shape[-2]
        torch.testing.assert_close(value.sum(-1), torch.ones(value.shape[:-1]))
    else:
        assert kind == "logits" and value.shape == (n, 10)


@pytest.mark.parametrize(("family", "kwargs", "shape"), CASES, ids=IDS)
def test_forward_taps_logits_equal_forward_and_taps_have_their_shapes(family, kwargs, shape) -> None:
    # Prepare
    model = build(family, kwargs, shape)
    x = torch.randn(3, *shape)
    names = list(model.tap_kinds)
    # Execute
    logits, taps = model.forward_taps(x, names)
    # Assert
    assert torch.equal(logits, model(x))
    assert list(taps) == names and "embedding" in names
    assert set(model.tap_kinds.values()) <= set(TAP_KINDS)
    for name, kind in model.tap_kinds.items():
        assert_kind(taps[name], kind, 3, 1 if family is CNN1d else 2)
    assert torch.equal(final_linear(model)(taps["embedding"]), logits)  # what the head reads


@pytest.mark.parametrize(
    ("model", "taps"),
    [
        (lambda: MLP((8, 8), 10), {"embedding": "embedding"}),
        (lambda: CNN2d((8, 8), 10, channels=(8, 16, 32)),
         {"block1": "map", "block2": "map", "block3": "map", "embedding": "embedding"}),
        (lambda: FedGenCNN((28, 28), 10), {"block1": "map", "block2": "map", "embedding": "embedding"}),
        (lambda: ResNet((8, 8), 10, depth=8, exits=True),
         {"block1": "map", "block2": "map", "block3": "map", "exit1": "logits", "exit2": "logits",
          "embedding": "embedding"}),
        (lambda: MobileNet((8, 8), 10, widths=(8, 16)), {"block1": "map", "block2": "map",
                                                          "embedding": "embedding"}),
        (lambda: ViT((8, 8), 10, depth=2), {"block1": "tokens", "block2": "tokens",
                                            "attention1": "attention", "attention2": "attention",
                                            "embedding": "embedding"}),
    ],
)
def test_declared_taps(model, taps: dict) -> None:
    assert model().tap_kinds == taps


def test_only_the_requested_taps_come_back() -> None:
    model = build(ViT, {"patch": 2}, (8, 8))

    logits, taps = model.forward_taps(torch.randn(2, 8, 8), ["attention2", "embedding"])

    assert list(taps) == ["attention2", "embedding"]
    assert taps["attention2"].shape == (2, 2, 17, 17)  # 16 patches + the class token; 2 heads
    assert model.forward_taps(torch.randn(2, 8, 8), "block1")[1]["block1"].shape == (2, 17, 32)


def test_exits_never_change_forward() -> None:
    # Prepare: the same weights with and without the exit heads
    with_exits = build(ResNet, {"depth": 8, "exits": True}, (8, 8))
    plain = ResNet((8, 8), 10, depth=8).eval()
    plain.load_state_dict({k: v for k, v in with_exits.state_dict().items()
                           if not k.startswith("exit_heads.")})
    x = torch.randn(4, 8, 8)
    # Execute
    logits, taps = with_exits.forward_taps(x, ["exit1", "exit2"])
    # Assert
    assert torch.equal(logits, plain(x)) and torch.equal(with_exits(x), plain(x))
    assert taps["exit1"].shape == taps["exit2"].shape == (4, 10)
    assert not torch.equal(taps["exit1"], logits)


@pytest.mark.parametrize("bad", ["block9", "Embedding", "", 3, None])
def test_unknown_tap_is_a_config_error_naming_model_name_and_taps(bad) -> None:
    model = ResNet((8, 8), 10, depth=8)

    with pytest.raises(ConfigError) as err:
        model.forward_taps(torch.zeros(1, 8, 8), ["embedding", bad])

    message = str(err.value)
    assert message.startswith(f"tap={show(bad)}: ResNet has no such tap")
    assert "allowed: ['block1', 'block2', 'block3', 'embedding']" in message
    with pytest.raises(ConfigError, match="ResNet has no such tap"):
        check_tap(model, bad)


def test_check_tap_returns_the_kind() -> None:
    model = ViT((8, 8), 10)

    assert [check_tap(model, n) for n in ("block1", "attention2", "embedding")] == [
        "tokens", "attention", "embedding"]
    with pytest.raises(ConfigError, match=r"Linear has no such tap; allowed: \[\]"):
        check_tap(nn.Linear(2, 2), "embedding")


# --- the families that existed before taps: same weights, same keys, same outputs ---------------
def digest(state: dict[str, torch.Tensor]) -> str:
    """A hash of a state_dict: every key, shape and value, in order."""
    h = hashlib.sha256()
    for key, value in state.items():
        h.update(key.encode())
        h.update(str(tuple(value.shape)).encode())
        h.update(value.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# Computed with the original classes (git HEAD before taps): torch.manual_seed(0), build, eval;
# torch.manual_seed(1), x = randn(4, *shape). (family, shape, kwargs, state_dict digest, number of
# keys, out[0], out.sum()). The weights' digest is exact (the CPU generator is the same
# everywhere); the outputs are compared to 1e-6 (BLAS kernels may differ between CPUs) and exactly
# to the original forward expression, evaluated on the new module.
GOLDEN = [
    (MLP, (1, 8, 8), {}, "4e8d0a71016c8428", 4,
     [0.04068781, -0.1345046, 0.05417985, 0.01986586, 0.1055043, -0.0371782, -0.09487764,
      0.107725, 0.1515886, -0.02480748], -2.617918),
    (MLP, (40,), {"hidden": (32, 16), "dropout": 0.1}, "423a2fc48e771228", 6,
     [0.1496345, 0.09148247, -0.1923489, 0.1825834, 0.2552062, -0.06853314, -0.04295341,
      -0.06130803, -0.2183946, 0.3400723], 2.064277),
    (CNN2d, (1, 8, 8), {"channels": (8, 16), "head_pool": 2}, "b890bd0dc1ed5a17", 16,
     [0.224052, -0.09402639, 0.02871533, 0.1940737, -0.03353998, -0.06546658, -0.238815,
      0.2667316, 0.03133802, 0.1527357], 2.200866),
    (CNN2d, (28, 28), {"channels": (8, 16, 32)}, "18eba7180b035c2a", 23,
     [-0.05379335, 0.1113113, -0.07891597, 0.2257371, -0.1037876, 0.06084906, -0.01401968,
      -0.2297008, -0.3277903, -0.1266666], -2.073539),
    (CNN1d, (1, 40), {}, "7be5683c078cd6b4", 16,
     [0.1271938, -0.1750979, 0.2613607, -0.007394255, -0.1159645, -0.07989403, -0.04238121,
      0.2265179, 0.2553374, -0.05894309], 1.380442),
    (FedGenCNN, (28, 28), {}, "03d24e3d4e1e18b0", 18,
     [0.09245068, -0.0136972, 0.06413043, 0.04947343, 0.2391145, 0.2117172, -0.07409766,
      0.1673374, 0.1045845, -0.05915817], 3.175397),
]


def old_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward of the original code, verbatim."""
    if isinstance(model, MLP):
        return model.net(x)
    if model.add_channel:
        x = x.unsqueeze(1)
    return model.head(model.features(x))


@pytest.mark.parametrize(("family", "shape", "kwargs", "weights", "num_keys", "row", "total"), GOLDEN,
                         ids=[f"{g[0].__name__}-{g[1]}" for g in GOLDEN])
def test_existing_families_are_unchanged(family, shape, kwargs, weights, num_keys, row, total) -> None:
    # Prepare
    model = build(family, kwargs, shape)
    torch.manual_seed(1)
    x = torch.randn(4, *shape)
    # Execute
    out = model(x)
    # Assert
    assert digest(model.state_dict()) == weights and len(model.state_dict()) == num_keys
    assert torch.equal(out, old_forward(model, x))
    torch.testing.assert_close(out[0], torch.tensor(row), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.sum(), torch.tensor(total), rtol=0, atol=1e-5)
