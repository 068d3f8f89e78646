"""MLP, CNN2d and CNN1d: output shapes, pinned parameter counts, buffers, seeding, input checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedkd.errors import ConfigError
from fedkd.models import CNN1d, CNN2d, MLP, count_parameters
from fedkd.models.fedgen import FedGenCNN

DIGITS, FLAT, SIGNAL = (1, 8, 8), (64,), (1, 40)


@pytest.mark.parametrize(
    ("family", "shape"),
    [(FedGenCNN, (28, 28)), (FedGenCNN, (1, 28, 28)), (MLP, DIGITS), (MLP, FLAT), (MLP, SIGNAL), (CNN2d, DIGITS), (CNN2d, (8, 8)), (CNN1d, SIGNAL), (CNN1d, (40,))],
)
def test_output_shape(family: type[nn.Module], shape: tuple[int, ...]) -> None:
    # Prepare
    model = family(shape, 10)
    # Execute
    out = model(torch.randn(5, *shape))
    # Assert
    assert out.shape == (5, 10)


# Parameter counts, by hand (10 classes; conv = in*out*k*k + out; BatchNorm = 2*channels; Linear = in*out + out):
#   CNN2d (8,16) on 1x8x8: conv 1*8*9+8=80, bn 16, conv 8*16*9+16=1168, bn 32, head 16*10+10=170 -> 1466
#   CNN2d (8,16,32):       80+16+1168+32 + conv 16*32*9+32=4640, bn 64, head 32*10+10=330         -> 6330
#   CNN2d (8,16) without BatchNorm: 1466 - 16 - 32                                                  -> 1418
#   CNN2d (8,16), head_pool 2 (8x8 -> 4 -> 2, 2x2x16=64 features): 80+16+1168+32 + 64*10+10=650    -> 1946
#   CNN2d (8,16,32), head_pool 2 (third block keeps 2x2; 128 features): 1296+4640+64 + 1290        -> 7290
#   MLP [64] on 64 inputs: 64*64+64=4160, 64*10+10=650                                              -> 4810
#   MLP [64] on 1x40:      40*64+64=2624, 650                                                       -> 3274
#   MLP [] on 64 inputs (logistic regression): 64*10+10                                             -> 650
#   CNN1d (16,32) k=5 on 1x40: conv 1*16*5+16=96, bn 32, conv 16*32*5+32=2592, bn 64, head 330    -> 3114
#   FedGenCNN on 28x28 (stride 2: 28 -> 14 -> 7): conv 6*9+6=60, bn 12, conv 16*6*9+16=880, bn 32,
#     Linear 784*32+32=25120, Linear 32*10+10=330 (FedGen's MNIST network)                        -> 26434
@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (lambda: CNN2d(DIGITS, 10, channels=(8, 16)), 1466),
        (lambda: CNN2d(DIGITS, 10, channels=(8, 16, 32)), 6330),
        (lambda: CNN2d(DIGITS, 10, channels=(8, 16), batchnorm=False), 1418),
        (lambda: CNN2d(DIGITS, 10, channels=(8, 16), head_pool=2), 1946),
        (lambda: CNN2d(DIGITS, 10, channels=(8, 16, 32), head_pool=2), 7290),
        (lambda: MLP(FLAT, 10, hidden=(64,)), 4810),
        (lambda: MLP(SIGNAL, 10, hidden=(64,)), 3274),
        (lambda: MLP(FLAT, 10, hidden=()), 650),
        (lambda: CNN1d(SIGNAL, 10, channels=(16, 32), kernel_size=5), 3114),
        (lambda: FedGenCNN((28, 28), 10), 26434),
        (lambda: FedGenCNN((1, 28, 28), 10), 26434),
    ],
)
def test_parameter_counts(model, expected: int) -> None:
    assert count_parameters(model()) == expected


def test_pooling_stops_at_one_pixel() -> None:
    # 8x8 pools to 4, 2, 1; a fourth block has nothing left to pool.
    model = CNN2d(DIGITS, 10, channels=(4, 4, 4, 4))
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3
    assert model(torch.randn(2, *DIGITS)).shape == (2, 10)


def test_batchnorm_buffers_in_state_dict() -> None:
    for model in (CNN2d(DIGITS, 10), CNN1d(SIGNAL, 10)):
        keys = model.state_dict().keys()
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            assert any(k.endswith(buffer) for k in keys), buffer
    assert not any("running" in k for k in CNN2d(DIGITS, 10, batchnorm=False).state_dict())


@pytest.mark.parametrize("make", [lambda: MLP(DIGITS, 10), lambda: CNN2d(DIGITS, 10), lambda: CNN1d(SIGNAL, 10)])
def test_deterministic_init(make) -> None:
    torch.manual_seed(3)
    first = make().state_dict()
    torch.manual_seed(3)
    second = make().state_dict()
    torch.manual_seed(4)
    other = make().state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize(("family", "with_channel", "without"), [(CNN2d, DIGITS, (8, 8)), (CNN1d, SIGNAL, (40,))])
def test_channel_axis_added_for_single_channel_input(family, with_channel, without) -> None:
    # Same seed -> same weights; (H, W) input then equals (1, H, W) input.
    torch.manual_seed(0)
    explicit = family(with_channel, 10).eval()
    torch.manual_seed(0)
    implicit = family(without, 10).eval()
    x = torch.randn(3, *without)
    torch.testing.assert_close(implicit(x), explicit(x.unsqueeze(1)), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("family", "shape", "needs"),
    [(CNN2d, (64,), "(C, H, W) or (H, W)"), (CNN2d, (1, 1, 8, 8), "(C, H, W)"), (CNN1d, DIGITS, "(C, L) or (L,)"),
     (MLP, (), "any rank"), (CNN2d, (1, 0, 8), "positive")],
)
def test_wrong_input_shape_raises(family, shape, needs) -> None:
    with pytest.raises(ConfigError, match=family.__name__) as info:
        family(shape, 10)
    assert str(shape) in str(info.value) and needs in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [{"channels": ()}, {"channels": (8, 0)}, {"channels": (8.5,)}, {"channels": "8"}, {"batchnorm": "yes"},
     {"head_pool": 0}, {"num_classes": 0}],
)
def test_bad_hyperparameters_raise(kwargs) -> None:
    num_classes = kwargs.pop("num_classes", 10)
    with pytest.raises(ConfigError, match="CNN2d"):
        CNN2d(DIGITS, num_classes, **kwargs)


@pytest.mark.parametrize("dropout", [-0.1, 1.0])
def test_bad_dropout_raises(dropout: float) -> None:
    with pytest.raises(ConfigError, match="dropout"):
        MLP(FLAT, 10, dropout=dropout)
