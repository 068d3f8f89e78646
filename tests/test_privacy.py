"""GNMax accounting (fedkd.privacy) and the NoisyVote aggregator that spends it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedkd.aggregation import NoisyVote, TeacherMeta, majority_vote, vote_counts
from fedkd.errors import ConfigError
from fedkd.privacy import GNMaxAccountant

SIGMAS = [1.0, 2.0, 5.0, 20.0]


def make_meta(k: int, server_round: int = 1, seed: int = 0) -> TeacherMeta:
    return TeacherMeta(num_examples=np.ones(k), partition_ids=np.arange(k), server_round=server_round, seed=seed)


RDP_ORDERS = [1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
"""The RDP orders dp_accounting (and Flower's wrapper of it) evaluates by default."""


def rdp_epsilon(sigma: float, n: int, delta: float = 1e-5) -> float:
    """Independent closed form: n Gaussian queries of noise multiplier z = sigma / sqrt(2) have RDP n a / (2 z^2) at
    order a; epsilon is the best order's conversion (Balle et al. 2020, Prop. 12), as dp_accounting converts."""
    z = sigma / math.sqrt(2)
    return max(0.0, min(n * a / (2 * z * z) + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
                        for a in RDP_ORDERS))


# ---- GNMaxAccountant ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sigma", "epsilon"), [(1, 534.86), (2, 166.04), (5, 41.645), (20, 7.0774), (100, 1.1582)])
def test_epsilon_of_400_queries_matches_reference(sigma: float, epsilon: float) -> None:
    accountant = GNMaxAccountant(sigma, delta=1e-5)
    assert accountant.spend(400) == pytest.approx(epsilon, rel=1e-3)
    assert accountant.epsilon == pytest.approx(rdp_epsilon(sigma, 400), rel=1e-9)
    assert accountant.queries == 400 and accountant.noise_multiplier == pytest.approx(sigma / math.sqrt(2))


def test_epsilon_decreases_as_sigma_grows() -> None:
    epsilons = [GNMaxAccountant(sigma).epsilon_for(100) for sigma in SIGMAS]
    assert all(a > b for a, b in zip(epsilons, epsilons[1:])), epsilons


def test_epsilon_accumulates_and_round_cost_stands_alone() -> None:
    accountant = GNMaxAccountant(2.0)
    assert (accountant.epsilon, accountant.queries) == (0.0, 0)
    first = accountant.spend(300)
    second = accountant.spend(500)
    assert accountant.queries == 800
    assert accountant.epsilon == pytest.approx(rdp_epsilon(2.0, 800), rel=1e-9)
    assert first == pytest.approx(rdp_epsilon(2.0, 300), rel=1e-9)
    assert second == pytest.approx(rdp_epsilon(2.0, 500), rel=1e-9)
    assert max(first, second) < accountant.epsilon < first + second  # RDP composes sub-additively


def test_epsilon_for_leaves_the_ledger_alone() -> None:
    accountant = GNMaxAccountant(5.0)
    accountant.epsilon_for(1000)
    assert (accountant.queries, accountant.epsilon) == (0, 0.0)
    with pytest.raises(ValueError, match="num_queries"):
        accountant.spend(0)


@pytest.mark.parametrize(
    ("key", "kwargs"),
    [("sigma", {"sigma": v}) for v in (0.0, -1.0, float("nan"), float("inf"), True, "1")]
    + [("delta", {"sigma": 1.0, "delta": v}) for v in (0.0, 1.0, -1e-5, 2.0, float("nan"))],
)
def test_bad_sigma_or_delta_raise_config_error_naming_the_key(key: str, kwargs: dict) -> None:
    with pytest.raises(ConfigError, match=key):
        GNMaxAccountant(**kwargs)
    with pytest.raises(ConfigError, match=key):
        NoisyVote(**kwargs)


# ---- NoisyVote ----------------------------------------------------------------------------------------------------


def test_tiny_noise_is_majority_vote() -> None:
    logits = np.random.default_rng(0).normal(size=(5, 300, 4))
    counts = vote_counts(logits)
    unique = (counts == counts.max(1, keepdims=True)).sum(1) == 1
    out = NoisyVote(sigma=1e-6)(logits, make_meta(5))
    np.testing.assert_array_equal(out[unique], majority_vote(logits)[unique])
    # On a tied plurality the noise picks one of the tied classes.
    assert (~unique).any() and (counts[~unique, :][out[~unique] == 1] == counts[~unique].max(1)).all()


def test_large_noise_drowns_a_unanimous_vote() -> None:
    k, n, c = 5, 2000, 4
    logits = np.zeros((k, n, c))
    logits[:, :, 0] = 1.0  # every teacher votes class 0 on every sample
    out = NoisyVote(sigma=50.0)(logits, make_meta(k))
    assert abs(out[:, 0].mean() - 1 / c) < 0.1
    np.testing.assert_array_equal(out.sum(1), 1.0)


def test_report_keys_and_accumulation_across_calls() -> None:
    aggregate = NoisyVote(sigma=2.0, delta=1e-6)
    assert aggregate.report() == {"epsilon": 0.0, "epsilon-round": 0.0, "delta": 1e-6, "queries": 0.0}
    logits = np.random.default_rng(1).normal(size=(3, 400, 5))
    aggregate(logits, make_meta(3, server_round=1))
    once = aggregate.report()
    aggregate(logits, make_meta(3, server_round=2))
    twice = aggregate.report()
    assert set(twice) == {"epsilon", "epsilon-round", "delta", "queries"}
    assert all(isinstance(v, float) for v in twice.values())
    assert twice["queries"] == 800.0 and twice["delta"] == 1e-6
    assert twice["epsilon"] == pytest.approx(rdp_epsilon(2.0, 800, delta=1e-6), rel=1e-9)
    assert once["epsilon"] == once["epsilon-round"] == pytest.approx(twice["epsilon-round"], rel=1e-9)
    assert twice["epsilon"] > once["epsilon"]


def test_noise_is_reproducible_by_seed_and_round() -> None:
    logits = np.random.default_rng(2).normal(size=(3, 200, 5))

    def run(server_round: int, seed: int = 0) -> np.ndarray:
        return NoisyVote(sigma=5.0)(logits, make_meta(3, server_round=server_round, seed=seed))

    np.testing.assert_array_equal(run(1), run(1))
    assert not np.array_equal(run(1), run(2))
    assert not np.array_equal(run(1, seed=0), run(1, seed=1))


def test_repeated_calls_never_reuse_noise() -> None:
    logits = np.random.default_rng(3).normal(size=(3, 200, 5))
    aggregate = NoisyVote(sigma=5.0)
    assert not np.array_equal(aggregate(logits, make_meta(3)), aggregate(logits, make_meta(3)))
    assert not np.array_equal(aggregate(logits), aggregate(logits))  # without meta too


def test_noisy_vote_checks_inputs_before_spending() -> None:
    aggregate = NoisyVote()
    with pytest.raises(ConfigError, match="temperature"):
        aggregate(np.zeros((2, 3, 4)), temperature=0.0)
    with pytest.raises(ValueError, match="teacher 1"):
        aggregate(np.array([np.zeros((3, 4)), np.full((3, 4), np.nan)]))
    assert aggregate.report()["queries"] == 0.0
