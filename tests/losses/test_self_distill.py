"""Self-distillation losses (an earlier snapshot, deep-to-shallow exits): golden values by hand,
zeros on equal logits, and no gradient into the teaching side."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedkd.errors import ConfigError
from fedkd.losses import INPUTS, ExitDistill, SnapshotKD

STUDENT = [[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]
SNAPSHOT = [[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]


def t64(a) -> torch.Tensor:
    return torch.tensor(np.asarray(a), dtype=torch.float64)


def softmax(row: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def kd_by_hand(student: list[list[float]], teacher: list[list[float]], t: float) -> float:
    """``T^2 * mean_i sum_j p_ij log(p_ij / q_ij)``, p = softmax(teacher / T), q = softmax(student / T)."""
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        p, q = softmax(t_row, t), softmax(s_row, t)
        total += sum(pj * math.log(pj / qj) for pj, qj in zip(p, q))
    return t**2 * total / len(student)


def test_declarations() -> None:
    assert SnapshotKD.needs == ("snapshot_logits",) and SnapshotKD.rows == "private"
    assert ExitDistill.needs == ("exit_logits",) and ExitDistill.rows == "private"
    assert set(SnapshotKD.needs + ExitDistill.needs) <= set(INPUTS)
    assert str(SnapshotKD(2.0)) == "SelfKD(T=2.0)" and str(ExitDistill(3)) == "ExitKD(T=3.0)"


def test_snapshot_kd_golden_value() -> None:
    # Row 0 by hand at T = 2: p = softmax([0, .5, 0]), q = softmax([.5, 1, 1.5]).
    e = math.exp
    zp, zq = 2 + e(0.5), e(0.5) + e(1.0) + e(1.5)
    p0 = [1 / zp, e(0.5) / zp, 1 / zp]
    q0 = [e(0.5) / zq, e(1.0) / zq, e(1.5) / zq]
    row0 = sum(p * math.log(p / q) for p, q in zip(p0, q0))
    assert 4.0 * row0 == pytest.approx(kd_by_hand(STUDENT[:1], SNAPSHOT[:1], 2.0), rel=1e-12)
    loss = SnapshotKD(2.0)(t64(STUDENT), snapshot_logits=t64(SNAPSHOT))
    assert loss.item() == pytest.approx(kd_by_hand(STUDENT, SNAPSHOT, 2.0), rel=1e-12)


def test_snapshot_kd_equal_logits_is_exactly_zero() -> None:
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    assert SnapshotKD(3.0)(logits, snapshot_logits=logits.clone()).item() == 0.0


def test_snapshot_kd_gradient_only_into_the_student() -> None:
    s = t64(STUDENT).requires_grad_(True)
    snap = t64(SNAPSHOT).requires_grad_(True)
    SnapshotKD(2.0)(s, snapshot_logits=snap).backward()
    assert snap.grad is None
    # d/ds = T * (softmax(s / T) - softmax(snap / T)) / N, as for Hinton's KD
    expected = 2.0 * (torch.softmax(s.detach() / 2, -1) - torch.softmax(snap.detach() / 2, -1)) / 2
    torch.testing.assert_close(s.grad, expected, rtol=1e-12, atol=1e-12)


def test_exit_distill_golden_value() -> None:
    exits = [[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], [[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]]]
    expected = (kd_by_hand(exits[0], STUDENT, 1.5) + kd_by_hand(exits[1], STUDENT, 1.5)) / 2
    loss = ExitDistill(1.5)(t64(STUDENT), exit_logits=tuple(t64(e) for e in exits))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_exit_distill_zero_and_gradients() -> None:
    final = t64(STUDENT).requires_grad_(True)
    assert ExitDistill(2.0)(final, exit_logits=(final.detach().clone(),)).item() == 0.0
    shallow = t64(SNAPSHOT).requires_grad_(True)
    ExitDistill(2.0)(final, exit_logits=(shallow,)).backward()
    assert shallow.grad is not None and final.grad is None  # deep teaches shallow, not back


def test_refusals() -> None:
    with pytest.raises(ValueError, match="snapshot_logits"):
        SnapshotKD(1.0)(t64(STUDENT))
    with pytest.raises(ValueError, match="at least one exit"):
        ExitDistill(1.0)(t64(STUDENT), exit_logits=())
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        ExitDistill(1.0)(t64(STUDENT), exit_logits=(t64(STUDENT)[:1],))
    with pytest.raises(ConfigError, match=r"^temperature=0: must be a number > 0"):
        SnapshotKD(0)
