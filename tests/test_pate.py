"""PATE's data-dependent analysis (fedkd.pate) and the Confident GNMax aggregator.

Golden values: computed with the paper's reference code (tensorflow/privacy, research/pate_2018/core.py:
compute_logq_gaussian, rdp_gaussian, compute_logpr_answered, compute_rdp_threshold) at orders 2, 5, 10, 20, 50.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedkd.records import rows_of
from fedkd import pate
from fedkd.aggregation import ConfidentVote, TeacherMeta, answered_rows, vote_counts
from fedkd.errors import ConfigError
from fedkd.privacy import GNMaxAccountant

ORDERS = np.array([2.0, 5.0, 10.0, 20.0, 50.0])

GNMAX_GOLDEN = [  # counts, sigma, log q, RDP at ORDERS
    ((100, 0, 0, 0, 0, 0, 0, 0, 0, 0), 10.0, -25.69681214876116,
     [2.430221387514879e-11, 1.1411493723901452e-10, 7.731028686601242e-09, 0.0001021311684005641,
      0.4994157260273838]),
    ((50, 20, 20, 10), 10.0, -3.31776507398843, [0.02, 0.043459608346291576, 0.08589553394192725, 0.2, 0.5]),
    ((30, 28, 2), 5.0, -0.9449829138598924, [0.08, 0.2, 0.4, 0.8, 2.0]),
    ((80, 10, 5, 5), 20.0, -4.2216707859698275,
     [0.005, 0.007962155582663943, 0.011687776337717809, 0.03132570219876773, 0.125]),
]
THRESHOLD_GOLDEN = [  # threshold, sigma1, max count, log Pr[answered], RDP at ORDERS
    (70.0, 10.0, 95, -0.00622902548586,
     [0.004657783908186755, 0.006337765449210862, 0.013491102911748138, 0.07237067522558827, 0.24999999999999997]),
    (60.0, 30.0, 90, -0.1727537790234499,
     [0.001111111111111111, 0.0027777777777777775, 0.005555555555555555, 0.01111111111111111,
      0.027777777777777773]),
    (250.0, 50.0, 400, -0.0013508099647481925,
     [0.00020359330184967607, 0.0002157131918462761, 0.00024039751623969522, 0.0003135147680593575,
      0.0010286516424213518]),
]


def make_meta(k: int, server_round: int = 1) -> TeacherMeta:
    return TeacherMeta(num_examples=np.ones(k), partition_ids=np.arange(k), server_round=server_round)


def votes_to_logits(votes: np.ndarray, num_classes: int) -> np.ndarray:
    """``[K, N, C]`` logits whose argmax votes are ``votes`` ``[K, N]``."""
    return np.eye(num_classes)[votes] * 5.0


@pytest.mark.parametrize(("counts", "sigma", "log_q", "rdp"), GNMAX_GOLDEN)
def test_gnmax_matches_reference(counts: tuple, sigma: float, log_q: float, rdp: list[float]) -> None:
    # Execute
    got_q = pate.log_q_gnmax(np.array(counts, dtype=float), sigma)
    got = pate.rdp_gnmax(got_q, sigma, ORDERS)
    # Assert
    assert got_q == pytest.approx(log_q, rel=1e-12)
    np.testing.assert_allclose(got, rdp, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize(("threshold", "sigma1", "top", "log_pr", "rdp"), THRESHOLD_GOLDEN)
def test_threshold_matches_reference(threshold: float, sigma1: float, top: int, log_pr: float,
                                     rdp: list[float]) -> None:
    got_pr = pate.log_pr_answered(threshold, sigma1, np.array([top, 0]))
    np.testing.assert_allclose(got_pr, log_pr, rtol=1e-12)
    np.testing.assert_allclose(pate.rdp_threshold(got_pr, sigma1, ORDERS), rdp, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("sigma", [1.0, 5.0, 40.0])
def test_data_independent_equals_dp_accounting_gaussian(sigma: float) -> None:
    """GNMax without the data is a Gaussian mechanism of noise multiplier sigma / sqrt(2): the same RDP, and the
    same epsilon as the existing accountant (dp_accounting's RdpAccountant) for 300 queries."""
    orders = pate.rdp_orders()
    rdp = 300 * pate.rdp_gnmax_data_independent(sigma, orders)
    accountant = GNMaxAccountant(sigma, delta=1e-5)
    accountant.spend(300)
    np.testing.assert_allclose(rdp, accountant._accountant._rdp, rtol=1e-12)
    assert pate.epsilon_from_rdp(orders, rdp, 1e-5) == pytest.approx(accountant.epsilon, rel=1e-12)


def test_data_dependent_never_above_independent_and_far_below_when_unanimous() -> None:
    orders = pate.rdp_orders()
    for counts in ([100, 0, 0], [40, 35, 25], [60, 30, 10]):
        log_q = pate.log_q_gnmax(np.array(counts, dtype=float), 10.0)
        assert (pate.rdp_gnmax(log_q, 10.0, orders) <= pate.rdp_gnmax_data_independent(10.0, orders)).all()
    unanimous = 1000 * pate.rdp_gnmax(pate.log_q_gnmax(np.array([100.0, 0, 0]), 10.0), 10.0, orders)
    split = 1000 * pate.rdp_gnmax(pate.log_q_gnmax(np.array([40.0, 35, 25]), 10.0), 10.0, orders)
    assert pate.epsilon_from_rdp(orders, unanimous, 1e-5) < 0.2 * pate.epsilon_from_rdp(orders, split, 1e-5)


def test_confident_rdp_charges_the_check_for_every_row_and_the_answer_for_answered_rows() -> None:
    counts = np.array([[9.0, 1, 0], [4, 3, 3], [10, 0, 0]])
    answered = np.array([True, False, True])
    dep, ind = pate.confident_gnmax_rdp(counts, answered, 7.0, 2.0, 1.0, ORDERS)
    expected_ind = 3 * ORDERS / (2 * 2.0**2) + 2 * ORDERS / 1.0**2
    np.testing.assert_allclose(ind, expected_ind)
    expected_dep = sum(pate.rdp_threshold(pate.log_pr_answered(7.0, 2.0, row), 2.0, ORDERS) for row in counts)
    expected_dep = expected_dep + sum(pate.rdp_gnmax(pate.log_q_gnmax(row, 1.0), 1.0, ORDERS)
                                      for row in counts[answered])
    np.testing.assert_allclose(dep, expected_dep)
    assert (dep <= ind + 1e-12).all()


def test_confident_vote_answers_unanimous_rows_and_skips_split_ones() -> None:
    # Prepare: 100 teachers; rows 0-1 unanimous, rows 2-3 split 34/33/33
    k = 100
    votes = np.zeros((k, 4), dtype=int)
    votes[:, 1] = 2
    votes[:, 2] = np.arange(k) % 3
    votes[:, 3] = np.arange(k) % 3
    vote = ConfidentVote(threshold=70.0, sigma_threshold=5.0, sigma=5.0, delta=1e-5)
    # Execute
    soft = vote(votes_to_logits(votes, 3), make_meta(k))
    # Assert
    np.testing.assert_array_equal(answered_rows(soft), [True, True, False, False])
    np.testing.assert_array_equal(soft[:2], np.eye(3, dtype=np.float32)[[0, 2]])
    report = vote.report()
    assert report["queries"] == 4 and report["answered"] == 2 and report["answered-round"] == 2
    assert 0 < report["epsilon"] < report["epsilon-data-independent"]
    dep, ind = pate.confident_gnmax_rdp(vote_counts(votes_to_logits(votes, 3)), np.array([1, 1, 0, 0], bool),
                                        70.0, 5.0, 5.0, pate.rdp_orders())
    assert report["epsilon"] == pytest.approx(pate.epsilon_from_rdp(pate.rdp_orders(), dep, 1e-5), rel=1e-12)
    assert report["epsilon-data-independent"] == pytest.approx(
        pate.epsilon_from_rdp(pate.rdp_orders(), ind, 1e-5), rel=1e-12)


def test_confident_vote_with_zero_check_noise_limit_is_plain_threshold() -> None:
    """Tiny sigma1: the check is (almost) exact, max count >= T."""
    votes = np.array([[0, 1], [0, 1], [0, 2], [1, 0]])  # 4 teachers; row 0: 3 of 4 agree, row 1: 2/1/1
    vote = ConfidentVote(threshold=2.5, sigma_threshold=1e-6, sigma=1e-6)
    soft = vote(votes_to_logits(votes, 3), make_meta(4))
    np.testing.assert_array_equal(answered_rows(soft), [True, False])
    np.testing.assert_array_equal(soft[0], [1, 0, 0])


def test_confident_vote_state_round_trip_and_seeded_noise() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(20, 30, 4))
    one, two = ConfidentVote(12.0, 3.0, 2.0), ConfidentVote(12.0, 3.0, 2.0)
    first = one(logits, make_meta(20, 1))
    np.testing.assert_array_equal(first, two(logits, make_meta(20, 1)))
    restored = ConfidentVote(12.0, 3.0, 2.0)
    restored.load_state_dict(one.state_dict())
    assert restored.report() == one.report()
    np.testing.assert_array_equal(restored(logits, make_meta(20, 2)), one(logits, make_meta(20, 2)))


@pytest.mark.parametrize(("key", "value"), [("threshold", 0), ("sigma_threshold", 0), ("sigma", -1),
                                            ("delta", 1), ("delta", math.nan)])
def test_confident_vote_refuses_bad_options(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=key):
        ConfidentVote(**{key: value})


def test_strategy_drops_unanswered_rows_from_the_transfer_set() -> None:
    from fedkd.protocol import TARGETS
    from fedkd.strategies.base import answered_record

    soft = np.array([[1, 0], [np.nan, np.nan], [0, 1]], dtype=np.float32)
    record = answered_record(1, soft, np.array([5, 6, 7]))
    np.testing.assert_array_equal(record[f"{TARGETS}.probs"].numpy(), [[1, 0], [0, 1]])
    np.testing.assert_array_equal(rows_of(record, TARGETS), [5, 7])
    assert f"{TARGETS}.probs" not in answered_record(1, soft[1:2], np.array([6]))
    full = answered_record(1, soft[[0, 2]], np.array([5, 7]))
    np.testing.assert_array_equal(rows_of(full, TARGETS), [5, 7])


def test_tradeoff_benchmark_votes_round_trip_and_more_teachers_cost_less() -> None:
    from benchmarks import pate_tradeoff

    counts, labels = pate_tradeoff.synthetic_votes(10, 50, seed=3)
    np.testing.assert_array_equal(vote_counts(pate_tradeoff.counts_to_logits(counts)), counts)
    assert (counts.sum(axis=1) == 10).all() and labels.shape == (50,)
    frame = pate_tradeoff.table(queries=60, teachers=(10, 100))
    paper = frame[frame.setting == "paper"].set_index("teachers")
    assert paper.loc[100, "epsilon"] < paper.loc[10, "epsilon"]
    assert (frame.epsilon <= frame.epsilon_data_independent + 1e-9).all()
