"""DS-FL: its entropy-reduction aggregation (era) with the `sharpen` it is given, 0.1 by default."""

from __future__ import annotations

import hydra.utils
import numpy as np
import pytest
from flwr.app import ArrayRecord

from fedkd.aggregation import mean_probs
from fedkd.server import compose_config
from fedkd.strategies.dsfl import DSFL
from tests.conftest import reply
from tests.helpers import FakeGrid, bound

NODES = (21, 22, 23)


def _softmax(z: np.ndarray, t: float) -> np.ndarray:
    e = np.exp((z - z.max(axis=-1, keepdims=True)) / t)
    return e / e.sum(axis=-1, keepdims=True)


def _era_by_hand(logits: list[np.ndarray], temperature: float, sharpen: float) -> np.ndarray:
    """Itahara et al.: softmax(mean over clients of softmax(logits / T) / sharpen)."""
    mean_p = np.mean([_softmax(z.astype(np.float64), temperature) for z in logits], axis=0)
    return _softmax(mean_p, sharpen)


def _logits(small_run) -> list[np.ndarray]:
    n, c = small_run.data.num_public, small_run.data.num_classes
    rng = np.random.default_rng(0)
    return [rng.normal(scale=2.0, size=(n, c)).astype(np.float32) for _ in NODES]


def _soft_targets(strategy: DSFL, small_run) -> np.ndarray:
    """One round on an in-memory grid: the soft targets DS-FL's server sends back."""
    logits = _logits(small_run)
    msgs = bound(strategy, small_run.settings).configure_train(
        1, ArrayRecord(), small_run.settings.to_config(), FakeGrid(list(NODES)))
    by_node = {m.metadata.dst_node_id: m for m in msgs}
    replies = [reply(by_node[n], logits=logits[p], partition_id=p) for p, n in enumerate(NODES)]
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays["targets.probs"].numpy()


def _dsfl(**kwargs) -> DSFL:
    return DSFL(temperature=2.0, min_available_nodes=1, wait_for_nodes_s=0, **kwargs)


def test_the_logits_tell_sharpening_apart(small_run):
    """Sanity: on these logits, sharpen 0.1, 0.5 and 1 give clearly different targets."""
    logits = _logits(small_run)
    sharp, mid, flat = (_era_by_hand(logits, 2.0, s) for s in (0.1, 0.5, 1.0))
    assert np.abs(sharp - flat).max() > 0.1 and np.abs(sharp - mid).max() > 0.05


def test_default_sharpen_is_0_1(flower_ids, small_run):
    targets = _soft_targets(_dsfl(), small_run)
    np.testing.assert_allclose(targets, _era_by_hand(_logits(small_run), 2.0, 0.1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sharpen", [0.5, 0.02])
def test_a_given_sharpen_is_applied(flower_ids, small_run, sharpen):
    targets = _soft_targets(_dsfl(sharpen=sharpen), small_run)
    np.testing.assert_allclose(targets, _era_by_hand(_logits(small_run), 2.0, sharpen),
                               rtol=1e-5, atol=1e-7)


def test_a_given_aggregator_replaces_era(flower_ids, small_run):
    targets = _soft_targets(_dsfl(aggregator=mean_probs, sharpen=0.5), small_run)
    expected = np.mean([_softmax(z.astype(np.float64), 2.0) for z in _logits(small_run)], axis=0)
    np.testing.assert_allclose(targets, expected, rtol=1e-5, atol=1e-7)


def test_strategy_dsfl_config_sharpens_with_0_1(flower_ids, small_run):
    """`strategy=dsfl` as users run it: the instantiated strategy sharpens with 0.1."""
    cfg = compose_config(["strategy=dsfl"])
    strategy = hydra.utils.instantiate(cfg.strategy.flower, min_available_nodes=1)
    assert isinstance(strategy, DSFL)
    targets = _soft_targets(strategy, small_run)
    expected = _era_by_hand(_logits(small_run), float(cfg.distill.temperature), 0.1)
    np.testing.assert_allclose(targets, expected, rtol=1e-5, atol=1e-7)
