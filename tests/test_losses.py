"""KD and CE losses, their weighted composition, and the alpha = 0 equivalence with plain CE training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedkd.errors import ConfigError
from fedkd.losses import CELoss, KDLoss, WeightedSum, distill_loss
from fedkd.models import MLP
from fedkd.training import digest

STUDENT = [[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]
TEACHER_PROBS = [[0.2, 0.3, 0.5], [0.0, 0.25, 0.75]]  # a zero: its term 0 * log 0 counts as 0


def tensor(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_kd_golden_value() -> None:
    # Hand computation, T = 2: q = softmax(s / 2) per row; KL_i = sum_j p_ij log(p_ij / q_ij); loss = 4 * mean_i KL_i.
    e = math.exp
    z0 = e(0.5) + e(1.0) + e(1.5)
    q0 = [e(0.5) / z0, e(1.0) / z0, e(1.5) / z0]
    z1 = e(0.0) + e(0.0) + e(0.5)
    q1 = [1 / z1, 1 / z1, e(0.5) / z1]
    kl0 = 0.2 * math.log(0.2 / q0[0]) + 0.3 * math.log(0.3 / q0[1]) + 0.5 * math.log(0.5 / q0[2])
    kl1 = 0.0 + 0.25 * math.log(0.25 / q1[1]) + 0.75 * math.log(0.75 / q1[2])
    expected = 2.0**2 * (kl0 + kl1) / 2
    # Execute
    loss = KDLoss(temperature=2.0)(tensor(STUDENT), soft_targets=tensor(TEACHER_PROBS))
    # Assert
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_kd_scales_with_temperature_squared() -> None:
    # Same q (student logits scaled with T), so the KL is equal and only the T^2 factor differs.
    s, p = tensor(STUDENT), tensor(TEACHER_PROBS)
    at_1 = KDLoss(1.0)(s, soft_targets=p)
    at_3 = KDLoss(3.0)(3.0 * s, soft_targets=p)
    assert at_3.item() == pytest.approx(9.0 * at_1.item(), rel=1e-12)


def test_kd_is_a_batch_mean() -> None:
    s, p = tensor(STUDENT), tensor(TEACHER_PROBS)
    kd = KDLoss(2.0)
    per_row = [kd(s[i : i + 1], soft_targets=p[i : i + 1]).item() for i in range(2)]
    assert kd(s, soft_targets=p).item() == pytest.approx(sum(per_row) / 2, rel=1e-12)
    assert kd(s.repeat(3, 1), soft_targets=p.repeat(3, 1)).item() == pytest.approx(sum(per_row) / 2, rel=1e-12)


def test_kd_zero_when_student_matches_teacher() -> None:
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss = KDLoss(3.0)(logits, soft_targets=torch.softmax(logits / 3.0, dim=-1))
    assert abs(loss.item()) < 1e-12


def test_kd_gradient_closed_form() -> None:
    # d/ds [T^2 * mean_i KL(p_i || softmax(s_i / T))] = T * (softmax(s / T) - p) / N
    t, n = 2.0, 2
    s = tensor(STUDENT).requires_grad_(True)
    p = tensor(TEACHER_PROBS)
    KDLoss(t)(s, soft_targets=p).backward()
    expected = t * (torch.softmax(s.detach() / t, dim=-1) - p) / n
    torch.testing.assert_close(s.grad, expected, rtol=1e-12, atol=1e-12)


def test_ce_golden_value() -> None:
    # CE_0 = -log(e^3 / (e + e^2 + e^3)) for label 2; CE_1 = -log(1 / (1 + 1 + e)) for label 0.
    e = math.e
    expected = (-math.log(e**3 / (e + e**2 + e**3)) - math.log(1 / (2 + e))) / 2
    loss = CELoss()(tensor(STUDENT), labels=torch.tensor([2, 0]))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_missing_inputs_raise() -> None:
    with pytest.raises(ValueError, match="soft_targets"):
        KDLoss(1.0)(tensor(STUDENT), labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        CELoss()(tensor(STUDENT), soft_targets=tensor(TEACHER_PROBS))
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        KDLoss(1.0)(tensor(STUDENT), soft_targets=tensor(TEACHER_PROBS)[:1])


def test_weighted_sum_formula_and_weights() -> None:
    assert str(distill_loss(0.5, 3.0)) == "0.5 * KD(T=3.0) + 0.5 * CE"
    assert str(distill_loss(0.3, 3)) == "0.3 * KD(T=3.0) + 0.7 * CE"
    assert distill_loss(0.25, 1.0).weights == (0.25, 0.75)


def test_active_terms_skip_zero_weights() -> None:
    assert [type(t) for _, t in distill_loss(0.0, 2.0).active_terms()] == [CELoss]
    assert [type(t) for _, t in distill_loss(1.0, 2.0).active_terms()] == [KDLoss]
    assert [w for w, _ in distill_loss(0.4, 2.0).active_terms()] == [0.4, 0.6]


def test_combine_and_forward_match_the_formula() -> None:
    s, p, y = tensor(STUDENT), tensor(TEACHER_PROBS), torch.tensor([2, 0])
    loss = distill_loss(0.4, 2.0)
    kd, ce = KDLoss(2.0)(s, soft_targets=p), CELoss()(s, labels=y)
    expected = 0.4 * kd + 0.6 * ce
    assert loss.combine([kd, ce]).item() == pytest.approx(expected.item(), rel=1e-12)
    assert loss(s, soft_targets=p, labels=y).item() == pytest.approx(expected.item(), rel=1e-12)
    with pytest.raises(ValueError, match="2 active terms"):
        loss.combine([kd])


@pytest.mark.parametrize(("alpha", "temperature"), [(-0.1, 1.0), (1.5, 1.0), (float("nan"), 1.0), (0.5, 0.0),
                                                    (0.5, -2.0), (0.5, float("inf")), (True, 1.0)])
def test_bad_alpha_or_temperature_raises(alpha: float, temperature: float) -> None:
    with pytest.raises(ConfigError, match="alpha|temperature"):
        distill_loss(alpha, temperature)


def test_weighted_sum_rejects_bad_terms() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        WeightedSum([])
    with pytest.raises(ConfigError, match="all 0"):
        WeightedSum([(0.0, CELoss())])
    with pytest.raises(ConfigError, match="finite"):
        WeightedSum([(float("nan"), CELoss())])
    with pytest.raises(ConfigError, match="nn.Module"):
        WeightedSum([(1.0, F.cross_entropy)])


def _digest(loss: WeightedSum) -> dict[str, torch.Tensor]:
    """`fedkd.training.digest` (a client's distillation step) for two epochs, on an MLP with dropout:
    KD on a 'transfer' batch, CE on a private batch, every step."""
    data = torch.Generator().manual_seed(1)
    x_priv, y_priv = torch.randn(16, 8, generator=data), torch.randint(0, 3, (16,), generator=data)
    x_pub = torch.randn(12, 8, generator=data)
    soft = torch.softmax(torch.randn(12, 3, generator=data) / 2.0, dim=-1)
    torch.manual_seed(0)  # weights and dropout masks
    model = MLP((8,), 3, hidden=(16,), dropout=0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    digest(model, optimizer, x_pub, soft, x_priv, y_priv, loss=loss, epochs=2, batch_size=4,
           gen=torch.Generator().manual_seed(2))
    return model.state_dict()


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_alpha_zero_distillation_is_plain_cross_entropy_training() -> None:
    # digest's promise: alpha = 0 is CE training bit for bit, dropout included.
    assert _equal(_digest(distill_loss(0.0, 2.0)), _digest(WeightedSum([(1.0, CELoss())])))


def test_a_zero_weight_term_that_ran_would_be_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # Why the test above can fail: were the KD term of weight 0 evaluated (active_terms not
    # skipping it), its forward pass would draw dropout masks and shift every later step, though
    # it adds 0 * KD to the loss.
    plain = _digest(WeightedSum([(1.0, CELoss())]))
    monkeypatch.setattr(WeightedSum, "active_terms", lambda self: list(zip(self.weights, self.terms)))
    assert not _equal(_digest(distill_loss(0.0, 2.0)), plain)
