"""Robust aggregation: the geometric median, the anomaly score and teacher reputation.

Golden values first (hand-computed), then equivalences, then the defences against the attacks of
`fedkd.faults` on small made-up teachers, then the strategy's per-client anomaly rows.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord

from fedkd.records import rows_of
from fedkd.aggregation import (
    Reputation, TeacherMeta, anomaly_scores, geometric_median, mean_logits, mean_probs, median,
    outliers, softmax, total_variation, trimmed_mean, weiszfeld,
)
from fedkd.errors import ConfigError
from fedkd.faults import Attack, attack_logits
from fedkd.simulations.results import Recorder
from fedkd.strategies.base import ANOMALY_SCORE, client_metric, split_client_metric
from fedkd.strategies.fedmd import FedMD
from fedkd.wire import WireGrid
from tests.conftest import reply
from tests.helpers import FakeGrid, bound


def _meta(k: int, pids=None) -> TeacherMeta:
    return TeacherMeta(num_examples=np.full(k, 10.0),
                       partition_ids=np.arange(k) if pids is None else np.asarray(pids))


# --- Weiszfeld: golden values -----------------------------------------------------------------
def test_weiszfeld_in_one_dimension_is_the_median():
    points = np.array([[[0.0]], [[1.0]], [[10.0]]])  # [K=3, N=1, D=1]
    np.testing.assert_allclose(weiszfeld(points, iters=500), [[1.0]], atol=1e-6)


def test_weiszfeld_of_an_equilateral_triangle_is_its_centre():
    h = np.sqrt(3) / 2
    points = np.array([[[0.0, 0.0]], [[1.0, 0.0]], [[0.5, h]]])
    np.testing.assert_allclose(weiszfeld(points, iters=500), [[0.5, h / 3]], atol=1e-6)


def test_weiszfeld_at_an_obtuse_vertex_of_120_degrees_or_more_is_that_vertex():
    points = np.array([[[0.0, 0.0]], [[1.0, 0.0]], [[-1.0, 0.1]]])  # ~174 degrees at the origin
    np.testing.assert_allclose(weiszfeld(points, iters=2000), [[0.0, 0.0]], atol=1e-5)


def test_weiszfeld_weights_and_a_majority_at_one_point():
    two = np.array([[[0.0]], [[1.0]]])
    np.testing.assert_allclose(weiszfeld(two, np.array([3.0, 1.0]), iters=500), [[0.0]], atol=1e-6)
    same, far = np.array([0.2, 0.8]), np.array([1.0, 0.0])
    points = np.array([[same]] * 3 + [[far]] * 2)  # 3 of 5 at one point
    np.testing.assert_allclose(weiszfeld(points, iters=500), [same], atol=1e-6)


def test_weiszfeld_is_vectorised_over_samples():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(5, 4, 3))
    together = weiszfeld(points)
    alone = np.concatenate([weiszfeld(points[:, i:i + 1]) for i in range(4)])
    np.testing.assert_array_equal(together, alone)  # each sample stops on its own


def test_weiszfeld_equals_the_textbook_iteration_sample_by_sample():
    rng = np.random.default_rng(3)
    points = rng.dirichlet(np.ones(10), size=(30, 50))  # [K, N, D] probabilities
    weights = rng.uniform(0.5, 2.0, size=30)
    for n in range(0, 50, 7):
        x, z = points[:, n], weights @ points[:, n] / weights.sum()
        for _ in range(100):  # z <- sum_k b_k x_k / sum_k b_k, b_k = w_k / ||x_k - z||
            b = weights / np.maximum(np.linalg.norm(x - z, axis=1), 1e-12)
            new = b @ x / b.sum()
            done, z = np.abs(new - z).max() <= 1e-9, new
            if done:
                break
        np.testing.assert_allclose(weiszfeld(points, weights)[n], z, rtol=0, atol=1e-12)


def test_weiszfeld_refuses_bad_weights():
    with pytest.raises(ValueError, match="weights"):
        weiszfeld(np.zeros((2, 1, 1)), np.array([0.0, 0.0]))
    with pytest.raises(ValueError, match="weights"):
        weiszfeld(np.zeros((2, 1, 1)), np.array([1.0, -1.0]))


def test_total_variation_golden():
    np.testing.assert_allclose(total_variation([0.5, 0.5], [1.0, 0.0]), 0.5)
    np.testing.assert_allclose(total_variation([[1.0, 0.0], [0.2, 0.8]], [0.0, 1.0]), [1.0, 0.2])


# --- geometric_median aggregator ----------------------------------------------------------------
HONEST = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # one teacher: 2 samples x 3 classes


def test_geometric_median_of_identical_teachers_is_that_teacher():
    out = geometric_median(np.stack([HONEST] * 3), _meta(3), temperature=2.0)
    np.testing.assert_allclose(out, softmax(HONEST, 2.0), atol=1e-6)
    np.testing.assert_allclose(geometric_median(HONEST[None], temperature=2.0),
                               softmax(HONEST, 2.0), atol=1e-6)


def test_geometric_median_ignores_a_minority_of_confident_liars():
    liar = attack_logits(HONEST, Attack("confident_wrong", margin=50.0), 0, 4, 1)
    logits = np.stack([HONEST] * 3 + [liar] * 2)
    np.testing.assert_allclose(geometric_median(logits, _meta(5)), softmax(HONEST), atol=1e-5)
    assert (total_variation(mean_probs(logits), softmax(HONEST)) > 0.3).all()  # the mean moves


def test_geometric_median_golden_on_two_teachers_and_an_outlier():
    # three teachers, one sample, two classes: probabilities 0.9, 0.8, 0.0 on class 0. In the
    # simplex (a line) the geometric median is the 1-D median: 0.8.
    p = np.array([0.9, 0.8, 0.0 + 1e-300])
    logits = np.log(np.stack([p, 1 - p], axis=-1))[:, None, :]
    np.testing.assert_allclose(geometric_median(logits, iters=1000), [[0.8, 0.2]], atol=1e-6)


# --- anomaly score ------------------------------------------------------------------------------
def test_anomaly_score_is_zero_for_agreement_and_the_distance_for_a_liar():
    liar = np.array([[0.0, 0.0, 40.0], [40.0, 0.0, 0.0]])
    scores = anomaly_scores(np.stack([HONEST] * 3 + [liar]), temperature=1.0)
    p, q = softmax(HONEST), softmax(liar)
    np.testing.assert_allclose(scores[:3], 0.0, atol=1e-6)
    np.testing.assert_allclose(scores[3], total_variation(q, p).mean(), atol=1e-6)
    assert scores[3] > 0.8


# --- reputation ---------------------------------------------------------------------------------
def test_outliers_golden():
    scores = np.array([0.3, 0.35, 0.4, 0.45, 0.95])  # median 0.4, MAD 0.05 -> cut at 0.622
    assert outliers(scores, 3.0, 0.05).tolist() == [False, False, False, False, True]
    assert outliers(scores, 12.0, 0.05).tolist() == [False] * 5  # cut at 0.4 + 12 * 0.0741
    close = np.array([0.10, 0.11, 0.12, 0.2])  # MAD tiny: the floor keeps 0.2 (cut at 0.265)
    assert not outliers(close, 3.0, 0.05).any()
    assert outliers(close, 3.0, 0.0).tolist() == [False, False, False, True]
    assert not outliers(np.array([0.7]), 3.0, 0.0).any()  # the lowest is never an outlier


def test_reputation_excludes_a_confident_liar_and_means_the_rest():
    rng = np.random.default_rng(1)
    honest = [HONEST + rng.normal(0, 0.3, HONEST.shape) for _ in range(4)]
    liar = attack_logits(HONEST, Attack("confident_wrong"), 0, 4, 1)
    logits = np.stack([*honest, liar])
    aggregate = Reputation()
    out = aggregate(logits, _meta(5, pids=[0, 1, 2, 3, 7]), temperature=1.0)
    np.testing.assert_allclose(out, mean_probs(np.stack(honest)), atol=1e-6)
    assert aggregate.report() == {"excluded-teachers": 1.0}
    assert max(aggregate.reputation, key=aggregate.reputation.get) == 7


def test_reputation_is_a_running_score_per_partition_id():
    aggregate = Reputation(decay=0.5, threshold=3.0, floor=0.05)
    liar = np.array([[0.0, 0.0, 40.0], [40.0, 0.0, 0.0]])
    aggregate(np.stack([HONEST] * 4), _meta(4), temperature=1.0)  # round 1: all agree
    assert aggregate.reputation == pytest.approx({0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}, abs=1e-9)
    # round 2: partition 3 lies, partition 1 is missing, the order is different
    out = aggregate(np.stack([liar, HONEST, HONEST]), _meta(3, pids=[3, 0, 2]), temperature=1.0)
    score = total_variation(softmax(liar), softmax(HONEST)).mean()
    assert aggregate.reputation[3] == pytest.approx(0.5 * score, abs=1e-6)  # 0.5*0 + 0.5*score
    assert aggregate.reputation[1] == 0.0  # kept from round 1
    np.testing.assert_allclose(out, softmax(HONEST), atol=1e-6)  # the liar is left out
    assert aggregate.report() == {"excluded-teachers": 1.0}


def test_reputation_is_deterministic_and_its_state_round_trips():
    rng = np.random.default_rng(3)
    rounds = [rng.normal(0, 3, size=(5, 6, 4)) for _ in range(3)]
    a, b = Reputation(), Reputation()
    for logits in rounds[:2]:
        np.testing.assert_array_equal(a(logits, _meta(5), temperature=2.0),
                                      b(logits, _meta(5), temperature=2.0))
    restored = Reputation()
    restored.load_state_dict(copy.deepcopy(a.state_dict()))
    np.testing.assert_array_equal(a(rounds[2], _meta(5), temperature=2.0),
                                  restored(rounds[2], _meta(5), temperature=2.0))
    assert restored.reputation == a.reputation


def test_reputation_of_identical_teachers_is_that_teacher():
    out = Reputation()(np.stack([HONEST] * 3), _meta(3), temperature=2.0)
    np.testing.assert_allclose(out, softmax(HONEST, 2.0), atol=1e-6)


@pytest.mark.parametrize(("key", "bad"), [("decay", 1.0), ("decay", -0.1), ("threshold", 0.0),
                                          ("floor", 1.5), ("iters", 0)])
def test_reputation_refuses_bad_hyperparameters(key, bad):
    with pytest.raises(ConfigError, match=key):
        Reputation(**{key: bad})


# --- every attack against the robust aggregators, on made-up teachers ---------------------------
@pytest.mark.parametrize("attack", ["random", "sign_flip", "confident_wrong", "label_flip",
                                    "fixed_class", "scaled"])
def test_robust_aggregators_keep_the_honest_argmax_with_one_attacker_in_five(attack):
    rng = np.random.default_rng(7)
    truth = rng.normal(0, 1, size=(40, 10))
    truth[np.arange(40), rng.integers(0, 10, 40)] += 4.0  # a clear class per sample
    honest = [truth + rng.normal(0, 0.5, truth.shape) for _ in range(4)]
    liar = attack_logits(truth, Attack(attack, margin=20.0, scale=100.0, target=3), 0, 4, 1)
    logits = np.stack([*honest, liar])
    want = truth.argmax(1)
    for aggregate in (geometric_median, Reputation(), median, trimmed_mean):
        got = aggregate(logits, _meta(5), temperature=3.0).argmax(1)
        assert (got == want).mean() >= 0.95, (aggregate, attack)
    if attack in ("confident_wrong", "fixed_class", "random"):  # what the issue saw
        assert (mean_logits(logits, _meta(5), temperature=3.0).argmax(1) == want).mean() < 0.5


# --- the strategy reports an anomaly score per client; the Recorder files it per client ----------
def test_client_metric_keys():
    assert client_metric(ANOMALY_SCORE, 3) == "anomaly-score/3"
    assert split_client_metric("anomaly-score/3") == ("anomaly-score", 3)
    assert split_client_metric("epsilon") is None and split_client_metric("a/b") is None


def test_fedmd_reports_each_teachers_anomaly_score_into_the_metrics(flower_ids, small_run,
                                                                     tmp_path):
    c, liar_pid = small_run.data.num_classes, 2

    def answer(msg):
        pid = msg.metadata.dst_node_id - 11
        rows = rows_of(msg.content["transfer"], "next")
        logits = np.eye(c, dtype=np.float32)[rows % c] * 5  # every honest teacher agrees
        if pid == liar_pid:
            logits = attack_logits(logits, Attack("confident_wrong"), 0, pid, 1)
        return reply(msg, logits=logits, partition_id=pid,
                     num_examples=small_run.data.client_sizes[pid], **{"test-accuracy": 0.5})

    rec = Recorder(tmp_path, list(small_run.archs), {
        "strategy": "fedmd", "dataset": "digits", "partition": "dirichlet", "num_clients": 4,
        "num_rounds": 2, "seed": 0, "num_classes": c})
    strategy = bound(FedMD(aggregator=Reputation(), min_replies=2, min_available_nodes=1,
                           wait_for_nodes_s=0, temperature=3.0), small_run.settings)
    strategy.server_metric_sinks.append(rec.on_server_metrics)
    wire = WireGrid(FakeGrid([11, 12, 13, 14], answer=answer), poll_interval=0.0)
    wire.observers.append(rec.on_replies)
    config = ConfigRecord(small_run.settings.to_config())
    strategy.start(grid=wire, initial_arrays=ArrayRecord(), num_rounds=2, timeout=60,
                   train_config=config, evaluate_config=config)
    summary = rec.finish()

    frame = rec.frame()
    rows = frame[frame.metric == ANOMALY_SCORE]
    assert sorted(rows.client.unique()) == [0, 1, 2, 3] and sorted(rows["round"].unique()) == [1, 2]
    assert set(rows.model) == set(small_run.archs)  # filed under the client, not the server
    by_client = summary["anomaly_score_by_client"]
    assert by_client[str(liar_pid)] > 0.9 and max(by_client[str(p)] for p in (0, 1, 3)) < 1e-6
    assert not any(k.startswith(ANOMALY_SCORE) for k in summary)  # rows, not summary keys
    excluded = frame[frame.metric == "excluded-teachers"]
    assert excluded.value.tolist() == [1.0, 1.0] and set(excluded.client) == {-1}


def test_the_default_cut_leaves_out_two_colluding_label_flippers_of_ten():
    """Reputations of round 5 of a 2-of-10 label_flip run (seed 1) that the first defaults
    (threshold 3, floor 0.05: cut at 0.23) let through; the defaults cut clients 4 and 8 only."""
    reputations = np.array([0.09, 0.08, 0.05, 0.08, 0.20, 0.06, 0.08, 0.05, 0.20, 0.04])
    aggregate = Reputation()

    assert np.flatnonzero(outliers(reputations, aggregate.threshold, aggregate.floor)).tolist() \
        == [4, 8]
    assert not outliers(reputations, 3.0, 0.05).any()
