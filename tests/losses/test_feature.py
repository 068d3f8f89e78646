"""Feature losses (FitNets hints, attention transfer, attention weights): golden values from numpy
formulas written here, zeros on equal inputs, and where gradients go."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedkd.errors import ConfigError
from fedkd.losses import INPUTS, AttentionTransfer, AttentionWeightsLoss, HintLoss

LOGITS = torch.zeros(2, 3, dtype=torch.float64)  # not read by feature losses
W = np.array([[1.0, -2.0], [0.5, 0.0], [0.0, 3.0]])  # projector 2 -> 3
B = np.array([0.1, -0.2, 0.3])


def t64(a) -> torch.Tensor:
    return torch.tensor(np.asarray(a), dtype=torch.float64)


def hint(student_dim: int, teacher_dim: int, kind: str, weight: np.ndarray, bias: np.ndarray) -> HintLoss:
    loss = HintLoss(student_dim, teacher_dim, kind=kind).double()
    with torch.no_grad():
        loss.projector.weight.copy_(t64(weight))
        loss.projector.bias.copy_(t64(bias))
    return loss


def test_declarations() -> None:
    for cls in (HintLoss, AttentionTransfer, AttentionWeightsLoss):
        assert set(cls.needs) <= set(INPUTS) and cls.rows == "transfer"
    assert HintLoss.needs == ("features", "teacher_features")
    assert AttentionWeightsLoss.needs == ("attention", "teacher_attention")
    assert str(HintLoss(4, 8)) == "Hint(4->8)" and str(AttentionTransfer()) == "AT(p=2.0)"
    assert str(AttentionWeightsLoss()) == "AttnKL"


def test_hint_embedding_golden_value() -> None:
    s = np.array([[1.0, 2.0], [-1.0, 0.5]])
    t = np.array([[0.0, 1.0, 2.0], [1.0, -1.0, 0.0]])
    expected = np.mean((s @ W.T + B - t) ** 2)
    loss = hint(2, 3, "embedding", W, B)(LOGITS, features=t64(s), teacher_features=t64(t))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_hint_map_golden_value_pools_the_student_to_the_teacher_size() -> None:
    # Student map [2, 2, 2, 2], teacher [2, 3, 1, 2]: project channels (1x1 conv), then average
    # the two rows of the student map into one.
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 2, 2, 2)), rng.normal(size=(2, 3, 1, 2))
    projected = np.einsum("oc,nchw->nohw", W, s) + B[None, :, None, None]
    pooled = projected.mean(axis=2, keepdims=True)
    expected = np.mean((pooled - t) ** 2)
    loss = hint(2, 3, "map", W, B)(LOGITS, features=t64(s), teacher_features=t64(t))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_hint_map_1d_same_size() -> None:
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(3, 2, 5)), rng.normal(size=(3, 3, 5))
    expected = np.mean((np.einsum("oc,ncl->nol", W, s) + B[None, :, None] - t) ** 2)
    loss = hint(2, 3, "map", W, B)(LOGITS, features=t64(s), teacher_features=t64(t))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("kind", "shape"), [("embedding", (4, 3)), ("tokens", (4, 5, 3)),
                                             ("map", (4, 3, 2, 2)), ("map", (4, 3, 6))])
def test_hint_identity_projector_equal_features_is_zero(kind: str, shape: tuple[int, ...]) -> None:
    f = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss = hint(3, 3, kind, np.eye(3), np.zeros(3))(LOGITS, features=f, teacher_features=f.clone())
    assert loss.item() == 0.0


def test_hint_gradients_reach_features_and_projector_not_the_teacher() -> None:
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(4, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    loss = hint(2, 3, "embedding", W, B)
    loss(LOGITS, features=s, teacher_features=t).backward()
    assert s.grad is not None and loss.projector.weight.grad is not None and loss.projector.bias.grad is not None
    assert t.grad is None
    assert [name for name, _ in loss.named_parameters()] == ["projector.weight", "projector.bias"]


def test_hint_refusals() -> None:
    with pytest.raises(ConfigError, match=r"^kind='conv': must be one of"):
        HintLoss(2, 3, kind="conv")
    with pytest.raises(ConfigError, match=r"^student_dim=0: must be an int >= 1"):
        HintLoss(0, 3)
    loss = HintLoss(2, 3)
    with pytest.raises(ValueError, match="features"):
        loss(LOGITS.float(), teacher_features=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="do not match"):
        loss(LOGITS.float(), features=torch.zeros(2, 2), teacher_features=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="same rows"):
        loss(LOGITS.float(), features=torch.zeros(2, 2), teacher_features=torch.zeros(3, 3))


def _at(a: np.ndarray, p: float = 2.0) -> np.ndarray:
    q = (np.abs(a) ** p).mean(axis=1).reshape(len(a), -1)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def test_attention_transfer_golden_value() -> None:
    # By hand for row 0: student a = [[1, 2], [3, 0]] (C=2, L=2) -> mean_c a^2 = [5, 2];
    # teacher [[0, 1], [2, 2]] -> [2, 2.5]. Row 1 from numpy.
    s = np.array([[[1.0, 2.0], [3.0, 0.0]], [[0.5, -1.0], [1.0, 1.0]]])
    t = np.array([[[0.0, 1.0], [2.0, 2.0]], [[1.0, 0.0], [0.0, 2.0]]])
    q_s0 = np.array([5.0, 2.0]) / math.sqrt(29.0)
    q_t0 = np.array([2.0, 2.5]) / math.sqrt(10.25)
    row0 = ((q_s0 - q_t0) ** 2).sum()
    row1 = ((_at(s[1:]) - _at(t[1:])) ** 2).sum()
    expected = (row0 + row1) / 4  # mean over 2 rows x 2 positions
    loss = AttentionTransfer()(LOGITS, features=t64(s), teacher_features=t64(t))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_attention_transfer_other_p_and_channel_counts() -> None:
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(3, 4, 2, 3)), rng.normal(size=(3, 7, 2, 3))
    expected = np.mean((_at(s, 1.5) - _at(t, 1.5)) ** 2)
    loss = AttentionTransfer(p=1.5)(LOGITS, features=t64(s), teacher_features=t64(t))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_attention_transfer_pools_the_larger_map() -> None:
    # Student 4x4, teacher 2x2: the student's attention map is averaged over 2x2 blocks.
    rng = np.random.default_rng(3)
    s, t = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 5, 2, 2))
    a_s = (s**2).mean(axis=1).reshape(2, 2, 2, 2, 2).mean(axis=(2, 4))
    q_s = a_s.reshape(2, -1) / np.linalg.norm(a_s.reshape(2, -1), axis=1, keepdims=True)
    expected = np.mean((q_s - _at(t)) ** 2)
    loss = AttentionTransfer()(LOGITS, features=t64(s), teacher_features=t64(t))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_attention_transfer_of_identical_activations_is_exactly_zero_and_teacher_gets_no_gradient() -> None:
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(3, 4, 5, 5, generator=gen, requires_grad=True)
    t = a.detach().clone().requires_grad_(True)
    loss = AttentionTransfer()(LOGITS.float(), features=a, teacher_features=t)
    assert loss.item() == 0.0
    AttentionTransfer()(LOGITS.float(), features=a, teacher_features=t * 2.0 + 1.0).backward()
    assert a.grad is not None and t.grad is None
    with pytest.raises(ValueError, match="maps"):
        AttentionTransfer()(LOGITS.float(), features=torch.zeros(3, 4), teacher_features=torch.zeros(3, 4))


def _kl_rows(t: np.ndarray, s: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(t > 0, t * np.log(t / s), 0.0).sum(-1)


def test_attention_weights_golden_value() -> None:
    # One sample, one head, two queries: rows [0.5, 0.5] vs [0.25, 0.75] and [1, 0] vs [0.6, 0.4].
    t = t64([[[[0.5, 0.5], [1.0, 0.0]]]])
    s = t64([[[[0.25, 0.75], [0.6, 0.4]]]])
    expected = (0.5 * math.log(2.0) + 0.5 * math.log(0.5 / 0.75) + math.log(1.0 / 0.6)) / 2
    loss = AttentionWeightsLoss()(LOGITS[:1], attention=s, teacher_attention=t)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_attention_weights_heads_averaged_when_counts_differ() -> None:
    rng = np.random.default_rng(5)

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    s, t = softmax(rng.normal(size=(2, 4, 3, 3))), softmax(rng.normal(size=(2, 2, 3, 3)))
    expected = _kl_rows(t.mean(1), s.mean(1)).mean()
    loss = AttentionWeightsLoss()(LOGITS, attention=t64(s), teacher_attention=t64(t))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    same_heads = AttentionWeightsLoss()(LOGITS, attention=t64(s[:, :2]), teacher_attention=t64(t))
    assert same_heads.item() == pytest.approx(_kl_rows(t, s[:, :2]).mean(), rel=1e-12)


def test_attention_weights_zero_on_equal_and_no_teacher_gradient() -> None:
    w = torch.softmax(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(6)), -1)
    assert abs(AttentionWeightsLoss()(LOGITS, attention=w, teacher_attention=w.clone()).item()) < 1e-7
    s = w.clone().requires_grad_(True)
    t = torch.softmax(torch.randn(2, 3, 4, 4), -1).requires_grad_(True)
    AttentionWeightsLoss()(LOGITS, attention=s, teacher_attention=t).backward()
    assert s.grad is not None and t.grad is None
    with pytest.raises(ValueError, match="same N and T"):
        AttentionWeightsLoss()(LOGITS, attention=w, teacher_attention=w[:, :, :3, :3])
