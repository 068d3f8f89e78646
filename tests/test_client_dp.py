"""Client-level DP for the aggregate (fedkd.client_dp) and the strategies that apply it."""

from __future__ import annotations

import logging
import math
from functools import partial

import numpy as np
import torch
import pytest

from fedkd.aggregation import TeacherMeta, entropy_weighted, mean_logits, mean_probs, softmax
from fedkd.checks import check_run
from fedkd.client_dp import (ClientDP, clip_to_norm, dp_fedavg, dp_mean_probs, noisy_clipped_sum,
                             private_soft_targets)
from fedkd.errors import ConfigError
from fedkd.server import compose_config

RDP_ORDERS = [1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]


def gaussian_epsilon(z: float, rounds: int, delta: float) -> float:
    """Closed form without sampling: rounds * a / (2 z^2) at order a, converted as Balle et al. 2020, Prop. 12."""
    return max(0.0, min(rounds * a / (2 * z * z) + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
                        for a in RDP_ORDERS))


def meta(k: int) -> TeacherMeta:
    return TeacherMeta(num_examples=np.ones(k), partition_ids=np.arange(k), server_round=1)


def test_clip_to_norm_scales_only_what_is_above_the_bound() -> None:
    np.testing.assert_allclose(clip_to_norm(np.array([3.0, 4.0]), 1.0), [0.6, 0.8])
    np.testing.assert_array_equal(clip_to_norm(np.array([[0.3], [0.4]]), 1.0), [[0.3], [0.4]])


def test_noisy_sum_is_the_clipped_sum_plus_noise_of_std_z_times_clip() -> None:
    contributions = np.array([[3.0, 4.0], [0.0, 0.5]])
    clipped = np.array([0.6, 1.3])
    draws = np.stack([noisy_clipped_sum(contributions, 1.0, 2.0, np.random.default_rng(i)) for i in range(4000)])
    np.testing.assert_allclose(draws.mean(axis=0), clipped, atol=0.1)
    np.testing.assert_allclose(draws.std(axis=0), 2.0, rtol=0.05)
    np.testing.assert_allclose(noisy_clipped_sum(contributions, 1.0, 1e-12, np.random.default_rng(0)), clipped)


@pytest.mark.parametrize(("z", "rounds"), [(0.5, 5), (1.0, 20), (4.0, 100)])
def test_epsilon_without_sampling_equals_the_gaussian_closed_form(z: float, rounds: int) -> None:
    dp = ClientDP(clip=1.0, noise_multiplier=z, delta=1e-5)
    for _ in range(rounds):
        dp.spend(1.0)
    assert dp.epsilon == pytest.approx(gaussian_epsilon(z, rounds, 1e-5), rel=1e-9)
    report = dp.report()
    assert report["dp-rounds"] == rounds and report["dp-sampling-rate"] == 1.0
    assert report["dp-noise-multiplier"] == z and report["delta"] == 1e-5


def test_sampling_amplifies_and_the_ledger_replays() -> None:
    full, sampled = ClientDP(noise_multiplier=1.0), ClientDP(noise_multiplier=1.0)
    for _ in range(5):  # each sampled spend costs dp-accounting ~0.25 s
        full.spend(1.0)
        sampled.spend(0.1)
    assert sampled.epsilon < 0.5 * full.epsilon
    assert sampled.epsilon == pytest.approx(2.9021, rel=1e-4)  # dp-accounting 0.6.0, q=0.1, z=1, 5 rounds
    import dp_accounting

    once = dp_accounting.rdp.RdpAccountant()  # the same rounds as one self-composed event
    once.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 5))
    assert sampled.epsilon == pytest.approx(once.get_epsilon(1e-5), rel=1e-12)
    restored = ClientDP(noise_multiplier=1.0)
    restored.load_state_dict(sampled.state_dict())
    assert restored.epsilon == sampled.epsilon


def test_one_client_without_clipping_or_noise_is_its_own_probabilities() -> None:
    logits = np.random.default_rng(1).normal(size=(1, 6, 4))
    dp = ClientDP(clip=100.0, noise_multiplier=1e-12)
    np.testing.assert_allclose(dp_mean_probs(softmax(logits, 2.0), dp, np.random.default_rng(0)),
                               softmax(logits[0], 2.0), atol=1e-9)


@pytest.mark.parametrize(("kind", "aggregator"), [("probs", mean_probs), ("logits", mean_logits)])
def test_private_targets_without_clipping_or_noise_equal_the_mean_aggregators(kind: str, aggregator) -> None:
    logits = np.random.default_rng(2).normal(size=(5, 8, 3))
    dp = ClientDP(clip=100.0, noise_multiplier=1e-12)
    got = private_soft_targets(logits, kind, dp, 2.0, np.random.default_rng(0))
    np.testing.assert_allclose(got, aggregator(logits, meta(5), temperature=2.0), atol=1e-6)


def test_one_client_dp_fedavg_without_clipping_or_noise_is_that_client() -> None:
    rng = np.random.default_rng(3)
    start = {"w": rng.normal(size=(3, 2)).astype(np.float32), "steps": np.array(7)}
    client = {"w": rng.normal(size=(3, 2)).astype(np.float32), "steps": np.array(9)}
    new = dp_fedavg(start, [client], ClientDP(clip=100.0, noise_multiplier=1e-12), np.random.default_rng(0))
    np.testing.assert_allclose(new["w"], client["w"], atol=1e-6)
    assert new["w"].dtype == np.float32 and new["steps"] == 7


def test_dp_fedavg_clips_each_update() -> None:
    start = {"w": np.zeros(2, dtype=np.float32)}
    clients = [{"w": np.array([3.0, 4.0], dtype=np.float32)}, {"w": np.array([0.0, 0.1], dtype=np.float32)}]
    new = dp_fedavg(start, clients, ClientDP(clip=1.0, noise_multiplier=1e-12), np.random.default_rng(0))
    np.testing.assert_allclose(new["w"], [0.3, 0.45], atol=1e-6)


def test_dp_fedavg_keeps_batchnorm_running_variances_non_negative() -> None:
    """Noise of std 5 on a variance of 0.1 goes negative about half the time; BatchNorm then gives NaN."""
    start = {"bn.running_var": np.full(50, 0.1, dtype=np.float32), "w": np.zeros(50, dtype=np.float32)}
    clients = [{"bn.running_var": np.full(50, 0.1, dtype=np.float32), "w": np.zeros(50, dtype=np.float32)}]
    new = dp_fedavg(start, clients, ClientDP(clip=1.0, noise_multiplier=5.0), np.random.default_rng(0))
    assert (new["bn.running_var"] >= 0).all() and (new["bn.running_var"] == 0).any()
    assert (new["w"] < 0).any()  # other arrays keep their noise, signs and all
    bn = torch.nn.BatchNorm1d(50).eval()
    bn.load_state_dict({**bn.state_dict(), "running_var": torch.from_numpy(new["bn.running_var"])})
    assert torch.isfinite(bn(torch.randn(4, 50))).all()


def test_kd_strategy_applies_client_dp_and_reports_epsilon() -> None:
    from fedkd.strategies.fedmd import FedMD

    strategy = FedMD(aggregator=partial(mean_probs), privacy=ClientDP(clip=100.0, noise_multiplier=1e-12),
                     fraction_train=0.5, temperature=2.0)
    logits = np.random.default_rng(4).normal(size=(4, 5, 3))
    seen: list[dict[str, float]] = []
    strategy.server_metric_sinks.append(lambda _, values: seen.append(values))
    soft = strategy.aggregate_logits(logits, meta(4))
    np.testing.assert_allclose(soft, mean_probs(logits, temperature=2.0), atol=1e-6)
    strategy.report_server_metrics(1)
    assert seen[-1]["dp-sampling-rate"] == 0.5 and seen[-1]["dp-rounds"] == 1 and seen[-1]["epsilon"] > 0


def test_client_dp_refuses_an_aggregator_that_is_not_a_sum() -> None:
    from fedkd.strategies.fedmd import FedMD

    with pytest.raises(ConfigError, match="aggregator=.entropy_weighted.: client-level DP"):
        FedMD(aggregator=partial(entropy_weighted), privacy=ClientDP())


def test_privacy_client_dp_composes_and_checks() -> None:
    cfg = compose_config(["privacy=client_dp"])
    assert cfg.aggregator._target_ == "fedkd.aggregation.mean_probs"
    check_run(cfg)
    check_run(compose_config(["privacy=client_dp", "strategy=fedavg"]))


@pytest.mark.parametrize(("key", "value"), [("clip", 0), ("noise_multiplier", -1), ("delta", 1)])
def test_privacy_client_dp_bad_values_are_named(key: str, value: float) -> None:
    with pytest.raises(ConfigError) as caught:
        check_run(compose_config(["privacy=client_dp", f"privacy.server.{key}={value}"]))
    assert str(caught.value).startswith(f"privacy.server.{key}={value}: ")


def test_privacy_client_dp_with_a_non_sum_aggregator_is_refused() -> None:
    with pytest.raises(ConfigError, match="aggregator"):
        check_run(compose_config(["privacy=client_dp", "aggregator=median"]))


def test_a_sampled_round_logs_no_accountant_warnings(caplog) -> None:
    """dp-accounting warns once per fractional order it leaves out; a run would log them every round."""
    ledger = ClientDP(noise_multiplier=1.0)
    with caplog.at_level(logging.WARNING):
        ledger.spend(0.1)
    assert ledger.epsilon > 0
    assert not [r for r in caplog.records if r.name == "absl"]
