"""Aggregators: hand-computed values, equivalences, input checks, Hydra selection."""

from __future__ import annotations

import math
from pathlib import Path

import hydra.utils
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fedkd.aggregation import TeacherMeta, mean_logits, mean_probs, softmax, weighted
from fedkd.errors import ConfigError

AGGREGATORS = (mean_logits, mean_probs, weighted)
CONF = Path(__file__).resolve().parents[1] / "conf" / "aggregator"
# 2 teachers x 2 samples x 3 classes
LOGITS = np.array(
    [
        [[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]],  # teacher 0
        [[3.0, 2.0, 1.0], [2.0, 1.0, 0.0]],  # teacher 1
    ]
)
e = math.e


def make_meta(num_examples=(1, 3)) -> TeacherMeta:
    return TeacherMeta(num_examples=np.array(num_examples), partition_ids=np.arange(10, 10 + len(num_examples)))


def torch_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Independent reference: torch's softmax in float64."""
    return torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float64)) / temperature, dim=-1).numpy()


def test_mean_logits_by_hand() -> None:
    # mean over teachers: [[2, 2, 2], [1, 1, 0]]; at T = 2 divide by 2: [[1, 1, 1], [0.5, 0.5, 0]].
    z = 2 * math.exp(0.5) + 1
    expected = [[1 / 3, 1 / 3, 1 / 3], [math.exp(0.5) / z, math.exp(0.5) / z, 1 / z]]
    np.testing.assert_allclose(mean_logits(LOGITS, temperature=2.0), expected, rtol=1e-6)


def _teacher_probs_by_hand() -> tuple[list, list]:
    # Softmax at T = 1 of each teacher, written out.
    s = e + e**2 + e**3
    t0 = [[e / s, e**2 / s, e**3 / s], [1 / (2 + e), e / (2 + e), 1 / (2 + e)]]
    z = e**2 + e + 1
    t1 = [[e**3 / s, e**2 / s, e / s], [e**2 / z, e / z, 1 / z]]
    return t0, t1


def test_mean_probs_by_hand() -> None:
    t0, t1 = _teacher_probs_by_hand()
    expected = [[(a + b) / 2 for a, b in zip(r0, r1)] for r0, r1 in zip(t0, t1)]
    # e.g. sample 0 is [(e + e^3) / 2s, e^2 / s, (e^3 + e) / 2s] with s = e + e^2 + e^3
    assert expected[0][0] == pytest.approx((e + e**3) / (2 * (e + e**2 + e**3)))
    np.testing.assert_allclose(mean_probs(LOGITS), expected, rtol=1e-6)


def test_weighted_by_hand() -> None:
    # num_examples [1, 3] -> weights 1/4 and 3/4
    t0, t1 = _teacher_probs_by_hand()
    expected = [[0.25 * a + 0.75 * b for a, b in zip(r0, r1)] for r0, r1 in zip(t0, t1)]
    np.testing.assert_allclose(weighted(LOGITS, make_meta((1, 3))), expected, rtol=1e-6)


@pytest.mark.parametrize("aggregate", AGGREGATORS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_identical_teachers_give_that_teacher(aggregate, temperature: float) -> None:
    one = np.random.default_rng(0).normal(size=(5, 4)) * 3
    logits = np.stack([one, one, one])
    out = aggregate(logits, make_meta((5, 1, 2)), temperature=temperature)
    np.testing.assert_allclose(out, torch_softmax(one, temperature), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("aggregate", [mean_logits, mean_probs])
def test_one_teacher_gives_its_own_probabilities(aggregate) -> None:
    one = np.random.default_rng(1).normal(size=(1, 6, 3))
    np.testing.assert_allclose(aggregate(one, temperature=2.0), torch_softmax(one[0], 2.0), rtol=1e-6, atol=1e-7)


def test_equal_weights_equal_mean_probs() -> None:
    logits = np.random.default_rng(2).normal(size=(4, 7, 5))
    np.testing.assert_allclose(weighted(logits, make_meta((9, 9, 9, 9)), temperature=2.0),
                               mean_probs(logits, temperature=2.0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("aggregate", AGGREGATORS)
def test_float32_rows_sum_to_one_even_for_huge_logits(aggregate) -> None:
    logits = np.random.default_rng(3).normal(size=(3, 8, 10)) * 1000.0
    out = aggregate(logits, make_meta((1, 2, 3)), temperature=0.1)
    assert out.dtype == np.float32 and out.shape == (8, 10)
    assert np.isfinite(out).all() and (out >= 0).all()
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-6)


def test_softmax_is_stable_and_tempered() -> None:
    np.testing.assert_allclose(softmax(np.array([1000.0, 1000.0])), [0.5, 0.5])
    np.testing.assert_allclose(softmax(np.array([0.0, 2.0]), temperature=2.0), [1 / (1 + e), e / (1 + e)])


@pytest.mark.parametrize("aggregate", AGGREGATORS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_teacher_rejected_by_index(aggregate, bad: float) -> None:
    logits = LOGITS.copy()
    logits[1, 0, 2] = bad
    with pytest.raises(ValueError, match=r"teacher 1 \(partition 11\)"):
        aggregate(logits, make_meta())
    if aggregate is not weighted:
        with pytest.raises(ValueError, match="teacher 1 sent non-finite"):
            aggregate(logits)


@pytest.mark.parametrize("logits", [LOGITS[0], LOGITS[None], np.zeros((0, 2, 3)), np.array([["a"]] * 2, dtype=object)])
def test_bad_logits_shape_or_dtype_rejected(logits) -> None:
    with pytest.raises(ValueError, match="logits"):
        mean_probs(logits)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf"), "2"])
def test_bad_temperature_rejected(temperature) -> None:
    with pytest.raises(ConfigError, match="temperature"):
        mean_logits(LOGITS, temperature=temperature)


def test_weighted_needs_meta_of_matching_length() -> None:
    with pytest.raises(ConfigError, match="meta"):
        weighted(LOGITS)
    with pytest.raises(ValueError, match="3 teachers"):
        weighted(LOGITS, make_meta((1, 2, 3)))
    with pytest.raises(ValueError, match="weights"):
        weighted(LOGITS, make_meta((1, -1)))
    with pytest.raises(ValueError, match="sum to 0"):
        weighted(LOGITS, make_meta((0, 0)))


def test_teacher_meta_is_frozen_and_validated() -> None:
    counts = np.array([4, 5])
    meta = TeacherMeta(num_examples=counts, partition_ids=np.array([0, 1]), class_counts=np.ones((2, 3)))
    counts[0] = 100
    assert meta.num_examples[0] == 4  # a private copy
    with pytest.raises(ValueError):
        meta.num_examples[0] = 7  # read-only
    with pytest.raises(ValueError, match="class_counts"):
        TeacherMeta(num_examples=np.array([1, 2]), partition_ids=np.array([0, 1]), class_counts=np.ones((3, 3)))
    with pytest.raises(ValueError, match="partition_ids"):
        TeacherMeta(num_examples=np.array([1, 2]), partition_ids=np.array([0]))


@pytest.mark.parametrize("name", ["mean_logits", "mean_probs", "weighted"])
def test_hydra_config_selects_aggregator(name: str) -> None:
    aggregate = hydra.utils.instantiate(OmegaConf.load(CONF / f"{name}.yaml"))
    out = aggregate(LOGITS, make_meta((2, 2)), temperature=2.0)
    np.testing.assert_array_equal(out, globals()[name](LOGITS, make_meta((2, 2)), temperature=2.0))
