"""The membership-inference maths (`fedkd.audit`): golden values, and the attack on models whose
answer is known: an overfit student (AUC well above 0.5) and one that never saw the members
(AUC about 0.5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from fedkd.audit import (
    advantage, attack, audit_model, auc, calibrated_threshold, loss_scores, matched_rows,
    summarise, tpr_at_fpr,
)


# --- golden values ---------------------------------------------------------------------------
def test_auc_counts_the_pairs_a_member_wins_and_ties_as_half():
    # Prepare: 9 member/non-member pairs; the member scores higher in 8
    members, nonmembers = [0.9, 0.4, 0.6], [0.5, 0.1, 0.3]
    # Execute / Assert
    assert auc(members, nonmembers) == pytest.approx(8 / 9)
    assert auc([1.0, 1.0], [1.0, 1.0]) == pytest.approx(0.5)
    assert auc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert auc([0.0, 1.0], [2.0, 3.0]) == 0.0


def test_tpr_at_fpr_is_read_off_the_roc_curve_without_interpolation():
    # Prepare: 100 non-members 0..99, members above and below
    nonmembers = np.arange(100, dtype=float)
    members = np.array([200.0, 150.0, 98.5, 50.0])
    # Execute / Assert: above 99 (FPR 0): 2 of 4; above 98 (FPR 1/100): 3 of 4
    assert tpr_at_fpr(members, nonmembers, 0.0) == 0.5
    assert tpr_at_fpr(members, nonmembers, 0.01) == 0.75
    assert tpr_at_fpr(members, nonmembers, 0.0099) == 0.5  # 1 false positive is 1% > 0.99%
    # fewer than 100 non-members: 1% FPR means no false positive at all
    assert tpr_at_fpr([5.0, 3.0, 1.0], [2.0, 0.0], 0.01) == pytest.approx(2 / 3)


def test_advantage_and_calibrated_threshold():
    assert advantage([3.0, 2.0], [1.0, 0.0]) == 1.0
    assert advantage([1.0], [1.0]) == 0.0
    reference = np.arange(1, 101, dtype=float)  # 1..100
    assert calibrated_threshold(reference, 0.01) == 100.0  # nothing above it: FPR 0 on them
    assert calibrated_threshold(reference, 0.05) == 96.0  # 96 < x: 4 of 100


def test_attack_reports_the_calibrated_threshold_on_the_evaluated_rows():
    result = attack(np.array([5.0, 0.5]), np.array([0.0, 2.0]), reference=np.array([0.0, 1.0]),
                    fpr=0.01)
    # threshold 1.0 (the top of the reference): 5.0 is called a member, 0.5 not; 2.0 falsely
    assert result.calibrated_tpr == 0.5 and result.calibrated_fpr == 0.5
    assert result.members == result.nonmembers == 2 and result.reference_rows == 2
    assert result.auc == pytest.approx(0.75)


def test_bad_scores_are_refused():
    with pytest.raises(ValueError, match="at least one member"):
        auc([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        auc([np.nan], [1.0])


def test_matched_rows_have_equal_counts_and_the_same_labels():
    # Prepare: members mostly 3s, a pool with every class
    member_y = np.array([3] * 8 + [1] * 2 + [7])
    pool_y = np.array([3] * 5 + [1] * 6 + [0] * 9)
    # Execute
    m, n = matched_rows(member_y, pool_y, np.random.default_rng(0))
    # Assert: 5 threes and 2 ones on each side; class 7 has no pool row, class 0 no member
    assert len(m) == len(n) == 7
    assert sorted(member_y[m]) == sorted(pool_y[n]) == [1, 1, 3, 3, 3, 3, 3]
    assert len(set(m)) == len(m) and len(set(n)) == len(n)
    m2, n2 = matched_rows(member_y, pool_y, np.random.default_rng(0), limit=3)
    assert len(m2) == len(n2) == 3


def test_loss_scores_are_minus_the_cross_entropy():
    model = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    x, y = np.array([[2.0, 0.0], [0.0, 0.0]]), np.array([0, 2])
    expected = -np.array([np.log1p(2 * np.exp(-2.0)), np.log(3.0)])
    np.testing.assert_allclose(loss_scores(model, x, y, batch_size=1), expected, rtol=1e-6)


def test_summarise_means_over_clients():
    a, b = attack([2.0], [1.0]), attack([1.0], [2.0])
    assert summarise({0: a, 1: b})["auc_mean"] == 0.5
    assert summarise({})["auc_mean"] is None


# --- the attack against models whose answer is known ----------------------------------------
def _digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    return (x[order] / 16.0).astype(np.float32), y[order].astype(np.int64)


def _fit(x: np.ndarray, y: np.ndarray, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):  # full batch
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        optimizer.step()
    return model


def test_an_overfit_student_is_caught():
    # Prepare: a small MLP trained for many epochs on 50 rows
    x, y = _digits()
    members, pool = (x[:50], y[:50]), (x[1000:], y[1000:])
    model = _fit(*members, epochs=300)
    # Execute
    result = audit_model(model, members, pool, seed=0)
    # Assert
    assert result.members == result.nonmembers >= 45
    assert result.auc > 0.75, result


def test_a_student_that_memorised_noise_is_caught_at_low_false_positives():
    # Prepare: labels drawn at random for every row (members and held-out rows alike), so
    # only memorising tells a member's label
    x, _ = _digits()
    y = np.random.default_rng(1).integers(0, 10, len(x))
    members, pool = (x[:50], y[:50]), (x[1000:], y[1000:])
    model = _fit(*members, epochs=300)
    # Execute
    result = audit_model(model, members, pool, seed=0)
    # Assert
    assert result.auc > 0.95, result
    assert result.tpr_at_fpr > 0.5, result
    assert result.calibrated_tpr > 0.5 and result.calibrated_fpr < 0.1, result


def test_a_student_that_never_saw_the_members_gives_about_one_half():
    # Prepare: the same recipe on other rows; the "members" are rows it never saw
    x, y = _digits()
    model = _fit(x[:50], y[:50], epochs=300)
    unseen, pool = (x[200:600], y[200:600]), (x[1000:], y[1000:])
    # Execute
    result = audit_model(model, unseen, pool, seed=0)
    # Assert: 300+ pairs: a chance AUC's standard deviation is about 0.02
    assert result.members >= 300
    assert abs(result.auc - 0.5) < 0.07, result
