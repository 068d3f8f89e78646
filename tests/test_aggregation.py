"""Aggregators: hand-computed values, equivalences, input checks, Hydra selection."""

from __future__ import annotations

import math
from pathlib import Path

import hydra.utils
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fedkd.aggregation import (
    TeacherMeta,
    answered_rows,
    class_weighted,
    confidence_weighted,
    entropy_weighted,
    era,
    majority_vote,
    mean_logits,
    mean_probs,
    median,
    softmax,
    trimmed_mean,
    weighted,
)
from fedkd.errors import ConfigError

# Identical teachers give that teacher's softmax(l / T) under each of these.
SOFTMAX_FAMILY = (mean_logits, mean_probs, weighted, entropy_weighted, confidence_weighted, median, trimmed_mean)
AGGREGATORS = SOFTMAX_FAMILY + (era, majority_vote)
CONF = Path(__file__).resolve().parents[1] / "conf" / "aggregator"
# 2 teachers x 2 samples x 3 classes
LOGITS = np.array(
    [
        [[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]],  # teacher 0
        [[3.0, 2.0, 1.0], [2.0, 1.0, 0.0]],  # teacher 1
    ]
)
e = math.e


def make_meta(num_examples=(1, 3), num_classes: int | None = None) -> TeacherMeta:
    """Teacher metadata; with `num_classes`, class counts spreading each teacher's rows evenly."""
    counts = None
    if num_classes is not None:
        counts = np.array([[n // num_classes] * num_classes for n in num_examples])
    return TeacherMeta(num_examples=np.array(num_examples), class_counts=counts,
                       partition_ids=np.arange(10, 10 + len(num_examples)))


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


@pytest.mark.parametrize("aggregate", SOFTMAX_FAMILY)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_identical_teachers_give_that_teacher(aggregate, temperature: float) -> None:
    one = np.random.default_rng(0).normal(size=(5, 4)) * 3
    logits = np.stack([one, one, one])
    out = aggregate(logits, make_meta((5, 1, 2)), temperature=temperature)
    np.testing.assert_allclose(out, torch_softmax(one, temperature), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("aggregate", [mean_logits, mean_probs, entropy_weighted, confidence_weighted, median,
                                       trimmed_mean])
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


def test_teacher_meta_round_and_seed() -> None:
    assert (make_meta().server_round, make_meta().seed) == (0, 0)
    meta = TeacherMeta(num_examples=np.array([1]), partition_ids=np.array([0]), server_round=np.int64(3), seed=7)
    assert (meta.server_round, meta.seed) == (3, 7) and type(meta.server_round) is int
    for bad in ({"server_round": -1}, {"seed": 1.5}, {"seed": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TeacherMeta(num_examples=np.array([1]), partition_ids=np.array([0]), **bad)


# ---- new aggregators, by hand on LOGITS (T = 1) ------------------------------------------------------------------


def _entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p)


def _mix(weights: list[float], rows: list[list[float]]) -> list[float]:
    """sum_k w_k row_k / sum_k w_k."""
    return [sum(w * r[c] for w, r in zip(weights, rows)) / sum(weights) for c in range(len(rows[0]))]


def test_entropy_weighted_by_hand() -> None:
    t0, t1 = _teacher_probs_by_hand()
    # sample 0: the teachers are mirror images, same entropy -> equal weights.
    # sample 1: H(t0) = log(2 + e) - e / (2 + e), H(t1) = log z - (2 e^2 + e) / z with z = e^2 + e + 1.
    z = e**2 + e + 1
    h0, h1 = math.log(2 + e) - e / (2 + e), math.log(z) - (2 * e**2 + e) / z
    assert (h0, h1) == pytest.approx((_entropy(t0[1]), _entropy(t1[1])))
    w = [math.log(3) - h0, math.log(3) - h1]
    expected = [_mix([1, 1], [t0[0], t1[0]]), _mix(w, [t0[1], t1[1]])]
    np.testing.assert_allclose(entropy_weighted(LOGITS), expected, rtol=1e-6)


def test_entropy_weighted_ignores_uniform_teachers_and_falls_back_to_equal_weights() -> None:
    # sample 0: teacher 0 uniform (weight 0) -> teacher 1 alone; sample 1: both uniform -> equal weights.
    logits = np.array([[[5.0, 5.0, 5.0], [0.0, 0.0, 0.0]], [[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]]])
    s = 1 + e + e**2
    np.testing.assert_allclose(entropy_weighted(logits), [[1 / s, e / s, e**2 / s], [1 / 3] * 3], rtol=1e-6)


def test_confidence_weighted_by_hand() -> None:
    t0, t1 = _teacher_probs_by_hand()
    # weights = top probability: sample 0 both e^3 / s; sample 1 e / (2 + e) and e^2 / z.
    z = e**2 + e + 1
    expected = [_mix([1, 1], [t0[0], t1[0]]), _mix([e / (2 + e), e**2 / z], [t0[1], t1[1]])]
    np.testing.assert_allclose(confidence_weighted(LOGITS), expected, rtol=1e-6)


def test_era_is_softmax_of_mean_probs_over_sharpen_by_hand() -> None:
    t0, t1 = _teacher_probs_by_hand()
    mean = [[(a + b) / 2 for a, b in zip(r0, r1)] for r0, r1 in zip(t0, t1)]
    expected = [[math.exp(m / 0.1) / sum(math.exp(x / 0.1) for x in row) for m in row] for row in mean]
    np.testing.assert_allclose(era(LOGITS, sharpen=0.1), expected, rtol=1e-6)
    # The paper's form, not power sharpening: sharpen = 1 gives softmax(mean_p), flatter than mean_p itself.
    flat = era(LOGITS, sharpen=1.0)
    np.testing.assert_allclose(flat, softmax(mean_probs(LOGITS)), rtol=1e-6)
    assert _entropy(flat[1]) > _entropy(mean_probs(LOGITS)[1])


def test_era_sharpens_towards_the_argmax_of_mean_probs() -> None:
    logits = np.random.default_rng(4).normal(size=(4, 9, 5)) * 2
    target = mean_probs(logits, temperature=2.0)
    for sharpen in (0.1, 0.01):
        np.testing.assert_array_equal(era(logits, temperature=2.0, sharpen=sharpen).argmax(1), target.argmax(1))
    np.testing.assert_allclose(era(logits, temperature=2.0, sharpen=1e-6), np.eye(5)[target.argmax(1)], atol=1e-6)


# 3 teachers x 2 samples x 3 classes; coordinate-wise median [[1, 1, 2], [1, 2, 1]].
THREE = np.array(
    [
        [[0.0, 5.0, 1.0], [2.0, 2.0, 2.0]],
        [[1.0, 0.0, 3.0], [0.0, 4.0, 1.0]],
        [[4.0, 1.0, 2.0], [1.0, 0.0, 0.0]],
    ]
)


def test_median_by_hand() -> None:
    expected = [[1 / (2 + e), 1 / (2 + e), e / (2 + e)], [1 / (2 + e), e / (2 + e), 1 / (2 + e)]]
    np.testing.assert_allclose(median(THREE), expected, rtol=1e-6)


def test_median_of_three_ordered_teachers_is_the_middle_one() -> None:
    middle = np.random.default_rng(5).normal(size=(6, 4))
    logits = np.stack([middle + 3.0, middle, middle - 1.5])
    np.testing.assert_allclose(median(logits, temperature=2.0), torch_softmax(middle, 2.0), rtol=1e-6, atol=1e-7)


def test_trimmed_mean_by_hand() -> None:
    # 5 teachers, 1 sample, 2 classes; fraction 0.2 drops 1 at each end.
    # class 0: [0, 1, 2, 3, 10] -> mean(1, 2, 3) = 2; class 1: [-5, 0, 0, 1, 1] -> mean(0, 0, 1) = 1/3.
    logits = np.array([[[0.0, 1.0]], [[1.0, 0.0]], [[2.0, -5.0]], [[3.0, 0.0]], [[10.0, 1.0]]])
    z = e**2 + e ** (1 / 3)
    np.testing.assert_allclose(trimmed_mean(logits, fraction=0.2), [[e**2 / z, e ** (1 / 3) / z]], rtol=1e-6)
    # fraction 0.19 * 5 < 1 trims nothing; 0.4 * 5 = 2 leaves the median.
    np.testing.assert_allclose(trimmed_mean(logits, fraction=0.19), mean_logits(logits), rtol=1e-6)
    np.testing.assert_allclose(trimmed_mean(logits, fraction=0.4), median(logits), rtol=1e-6)


def test_trimmed_mean_with_fraction_zero_is_mean_logits() -> None:
    logits = np.random.default_rng(6).normal(size=(4, 7, 5))
    np.testing.assert_allclose(trimmed_mean(logits, temperature=2.0, fraction=0.0),
                               mean_logits(logits, temperature=2.0), rtol=1e-6, atol=1e-7)


def test_majority_vote_by_hand() -> None:
    # sample 0 votes 2, 0, 2 -> class 2 (mean of logits would pick class 0);
    # sample 1 votes 1, 0, 2 -> a three-way tie -> lowest class 0;
    # sample 2: teacher 0's own tie [1, 1, 0] votes 0 (not 1), then 0, 2, 1 tie -> class 0 (else 1 would win).
    logits = np.array(
        [
            [[0.0, 0.0, 5.0], [0.0, 3.0, 0.0], [1.0, 1.0, 0.0]],
            [[9.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 0.0, 2.0]],
            [[0.0, 1.0, 2.0], [0.0, 0.0, 7.0], [0.0, 3.0, 0.0]],
        ]
    )
    expected = [[0, 0, 1], [1, 0, 0], [1, 0, 0]]
    for temperature in (0.5, 1.0, 5.0):
        out = majority_vote(logits, temperature=temperature)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, expected)
    assert mean_logits(logits)[0].argmax() == 0


@pytest.mark.parametrize("temperature", [0.5, 3.0])
def test_majority_vote_of_identical_teachers_is_their_one_hot(temperature: float) -> None:
    one = np.random.default_rng(7).normal(size=(8, 5))
    out = majority_vote(np.stack([one] * 3), temperature=temperature)
    np.testing.assert_array_equal(out, np.eye(5)[one.argmax(1)])


@pytest.mark.parametrize(
    ("aggregate", "key", "bad"),
    [(era, "sharpen", v) for v in (0.0, -0.1, float("nan"), float("inf"), True, "0.1")]
    + [(trimmed_mean, "fraction", v) for v in (-0.1, 0.5, 0.7, float("nan"), None)],
)
def test_bad_hyperparameters_raise_config_error_naming_the_key(aggregate, key: str, bad) -> None:
    with pytest.raises(ConfigError, match=key):
        aggregate(LOGITS, **{key: bad})


# ---- Hydra --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mean_logits", "mean_probs", "weighted", "entropy_weighted", "confidence_weighted",
                                  "era", "median", "trimmed_mean", "majority_vote"])
def test_hydra_config_selects_aggregator(name: str) -> None:
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    hyper = {k: v for k, v in cfg.items() if not k.startswith("_")}
    aggregate = hydra.utils.instantiate(cfg)
    out = aggregate(LOGITS, make_meta((2, 2)), temperature=2.0)
    np.testing.assert_array_equal(out, globals()[name](LOGITS, make_meta((2, 2)), temperature=2.0, **hyper))


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_aggregator_yaml_maps_logits_to_probabilities(path: Path) -> None:
    cfg = OmegaConf.load(path)
    if path.read_text().startswith("# @package _global_"):  # it also sets distill keys
        cfg = cfg.aggregator
    assert "name" not in cfg  # a partial would pass it to the function
    assert path.read_text().startswith("# ")
    aggregate = hydra.utils.instantiate(cfg)
    logits = np.random.default_rng(8).normal(size=(3, 7, 10))
    out = aggregate(logits, make_meta((10, 20, 30), num_classes=10), temperature=3.0)
    assert out.dtype == np.float32 and out.shape == (7, 10)
    answered = answered_rows(out)  # an unanswered row (confident_vote) is NaN throughout
    assert np.isnan(out[~answered]).all()
    assert (out[answered] >= 0).all()
    np.testing.assert_allclose(out[answered].sum(axis=1), 1.0, atol=1e-6)


# --- class_weighted ------------------------------------------------------------------------------
def test_class_weighted_golden():
    # two teachers, two classes; teacher 0 holds only class 0, teacher 1 holds 1 of class 0, 3 of 1
    logits = np.log(np.array([[[0.9, 0.1]], [[0.2, 0.8]]]))
    meta = TeacherMeta(num_examples=np.array([4, 4]), partition_ids=np.arange(2),
                       class_counts=np.array([[4, 0], [1, 3]]))
    # column 0: (4 * 0.9 + 1 * 0.2) / 5 = 0.76; column 1: (0 * 0.1 + 3 * 0.8) / 3 = 0.8
    expected = np.array([[0.76, 0.8]]) / 1.56
    np.testing.assert_allclose(class_weighted(logits, meta), expected, rtol=1e-6)


def test_class_weighted_with_equal_counts_is_mean_probs():
    logits = np.random.default_rng(3).normal(size=(4, 6, 5))
    meta = make_meta((50, 50, 50, 50), num_classes=5)
    np.testing.assert_allclose(class_weighted(logits, meta, temperature=2.0),
                               mean_probs(logits, meta, temperature=2.0), atol=1e-6)


def test_class_weighted_unheld_class_gets_the_plain_mean_and_needs_counts():
    logits = np.random.default_rng(4).normal(size=(2, 3, 3))
    meta = TeacherMeta(num_examples=np.array([5, 5]), partition_ids=np.arange(2),
                       class_counts=np.array([[5, 0, 0], [0, 5, 0]]))
    probs = softmax(logits, 1.0)
    q = np.stack([probs[0, :, 0], probs[1, :, 1], probs[:, :, 2].mean(axis=0)], axis=1)
    np.testing.assert_allclose(class_weighted(logits, meta), q / q.sum(1, keepdims=True), rtol=1e-6)
    sizes = make_meta((2, 6))  # no class counts: weighted by data size, with a warning
    np.testing.assert_allclose(class_weighted(logits, sizes), weighted(logits, sizes), atol=1e-6)
