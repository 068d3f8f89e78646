"""Relation losses (RKD, similarity preserving, relation matching) and prototypes: golden values from
numpy formulas written here, zeros and invariances, and where gradients go."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedkd.errors import ConfigError
from fedkd.losses import (
    INPUTS,
    PrototypeLoss,
    RelationMatch,
    RKDAngle,
    RKDDistance,
    SimilarityPreserving,
    class_prototypes,
    fixed_projection,
    similarity_matrix,
    sp_matrix,
)

LOGITS = torch.zeros(3, 2, dtype=torch.float64)
RELATIONAL = (RKDDistance, RKDAngle, SimilarityPreserving)
PINNED_SIGNS = [[0, 1, 1, 0], [1, 0, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0]]
"""Signs (1: +) of ``fixed_projection(6, 4, seed=0)``: integer draws, the same on every machine."""


def t64(a) -> torch.Tensor:
    return torch.tensor(np.asarray(a), dtype=torch.float64)


def huber(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) < 1.0, 0.5 * x**2, np.abs(x) - 0.5)


def np_distances(f: np.ndarray) -> np.ndarray:
    f = f.reshape(len(f), -1)
    d = np.sqrt(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1))
    n = len(f)
    return d / (d.sum() / (n * (n - 1)))


def np_angles(f: np.ndarray) -> np.ndarray:
    f = f.reshape(len(f), -1)
    n = len(f)
    out = np.zeros((n, n, n))
    for i in range(n):
        for j in range(n):
            for k in range(n):
                if j != i and k != i:
                    u, v = f[j] - f[i], f[k] - f[i]
                    out[i, j, k] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
    return out


def np_sp(f: np.ndarray) -> np.ndarray:
    f = f.reshape(len(f), -1)
    g = f @ f.T
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def test_declarations() -> None:
    for cls in (*RELATIONAL, RelationMatch, PrototypeLoss):
        assert set(cls.needs) <= set(INPUTS)
    assert RelationMatch.needs == ("features", "relation") and RelationMatch.rows == "transfer"
    assert PrototypeLoss.needs == ("features", "prototypes", "labels") and PrototypeLoss.rows == "private"
    assert [str(c()) for c in (*RELATIONAL, RelationMatch, PrototypeLoss)] == [
        "RKD-D", "RKD-A", "SP", "RelMSE", "Proto"]


def test_similarity_matrix_by_hand() -> None:
    # Rows [3, 4], [1, 0], [0, 2] normalise to [.6, .8], [1, 0], [0, 1].
    s = similarity_matrix(t64([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]))
    expected = [[1.0, 0.6, 0.8], [0.6, 1.0, 0.0], [0.8, 0.0, 1.0]]
    torch.testing.assert_close(s, t64(expected), rtol=0, atol=1e-15)


def test_sp_matrix_by_hand() -> None:
    # G = [[25, 3, 8], [3, 1, 0], [8, 0, 4]], each row divided by its norm.
    s = sp_matrix(t64([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]))
    rows = [[25.0, 3.0, 8.0], [3.0, 1.0, 0.0], [8.0, 0.0, 4.0]]
    expected = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in rows]
    torch.testing.assert_close(s, t64(expected), rtol=0, atol=1e-15)


def test_rkd_distance_golden_value() -> None:
    # Three student points on a line against a 3-4-5 right triangle. Pairs (0,1), (0,2), (1,2):
    # student distances 1, 3, 2 (mean 2) -> .5, 1.5, 1; teacher 3, 4, 5 (mean 4) -> .75, 1, 1.25;
    # differences -.25, .5, -.25 (all below 1: Huber 0.5 x^2), each twice (both halves of the
    # matrix), over the 9 entries.
    s = t64([[0.0], [1.0], [3.0]])
    t = t64([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    expected = 2 * (0.5 * 0.0625 + 0.5 * 0.25 + 0.5 * 0.0625) / 9
    loss = RKDDistance()(LOGITS, features=s, teacher_features=t)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_rkd_distance_and_angle_match_numpy_across_widths() -> None:
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(4, 3)), rng.normal(size=(4, 2, 2, 2))  # different architectures
    expected_d = huber(np_distances(s) - np_distances(t)).mean()
    expected_a = huber(np_angles(s) - np_angles(t)).mean()
    assert RKDDistance()(LOGITS, features=t64(s), teacher_features=t64(t)).item() == pytest.approx(
        expected_d, rel=1e-9)
    assert RKDAngle()(LOGITS, features=t64(s), teacher_features=t64(t)).item() == pytest.approx(
        expected_a, rel=1e-9)


def test_rkd_angle_by_hand() -> None:
    # Student: a right isoceles triangle (0,0), (1,0), (0,1): cosines at its vertices 0, 1/sqrt2,
    # 1/sqrt2. Teacher: an equilateral one: cosines 1/2 everywhere. Each vertex has 2 ordered pairs
    # of distinct others (j, k) and (k, j), plus (j, j) and (k, k) with cosine 1 on both sides.
    s = t64([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    t = t64([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    r = 1 / math.sqrt(2)
    expected = 2 * (0.5 * 0.25 + 2 * 0.5 * (r - 0.5) ** 2) / 27
    loss = RKDAngle()(LOGITS, features=s, teacher_features=t)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_similarity_preserving_golden_value() -> None:
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(3, 4)), rng.normal(size=(3, 2, 3))
    expected = ((np_sp(s) - np_sp(t)) ** 2).sum() / 9
    loss = SimilarityPreserving()(LOGITS, features=t64(s), teacher_features=t64(t))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("cls", RELATIONAL)
def test_features_against_themselves_are_zero(cls: type) -> None:
    f = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    assert cls()(LOGITS, features=f, teacher_features=f.clone()).item() == 0.0


@pytest.mark.parametrize("cls", (RKDDistance, RKDAngle))
def test_rkd_is_invariant_to_scaling(cls: type) -> None:
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    t = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    loss = cls()
    assert loss(LOGITS, features=s, teacher_features=7.5 * s).item() == pytest.approx(0.0, abs=1e-12)
    assert loss(LOGITS, features=0.1 * s, teacher_features=t).item() == pytest.approx(
        loss(LOGITS, features=s, teacher_features=t).item(), rel=1e-9)


@pytest.mark.parametrize("cls", RELATIONAL)
def test_gradients_reach_the_student_never_the_teacher(cls: type) -> None:
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(4, 3, generator=gen, requires_grad=True)
    t = torch.randn(4, 6, generator=gen, requires_grad=True)
    cls()(LOGITS, features=s, teacher_features=t).backward()
    assert s.grad is not None and t.grad is None and bool(torch.isfinite(s.grad).all())


@pytest.mark.parametrize("cls", RELATIONAL)
def test_duplicate_rows_keep_gradients_finite(cls: type) -> None:
    s = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0], [3.0, 0.0]], requires_grad=True)
    loss = cls()(LOGITS, features=s, teacher_features=torch.randn(4, 3, generator=torch.Generator().manual_seed(8)))
    loss.backward()
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(s.grad).all())


@pytest.mark.parametrize("cls", (*RELATIONAL, RelationMatch))
def test_one_row_is_zero_and_backward_works(cls: type) -> None:
    s = torch.randn(1, 3, requires_grad=True)
    inputs = {"relation": torch.ones(1, 1)} if cls is RelationMatch else {"teacher_features": torch.randn(1, 2)}
    loss = cls()(LOGITS, features=s, **inputs)
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad is not None


def test_relation_match_golden_value_and_zero() -> None:
    f = [[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]  # similarities .6 (0,1), .8 (0,2), 0 (1,2)
    r = [[9.0, 0.5, 1.0], [0.5, 9.0, 0.2], [1.0, 0.2, 9.0]]  # diagonal ignored
    expected = 2 * ((0.6 - 0.5) ** 2 + (0.8 - 1.0) ** 2 + (0.0 - 0.2) ** 2) / 6
    loss = RelationMatch()(LOGITS, features=t64(f), relation=t64(r))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    x = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(5))
    assert RelationMatch()(LOGITS, features=x, relation=similarity_matrix(x)).item() == 0.0


def test_relation_match_gradients_and_shape() -> None:
    s = torch.randn(4, 3, requires_grad=True)
    r = torch.rand(4, 4, requires_grad=True)
    RelationMatch()(LOGITS, features=s, relation=r).backward()
    assert s.grad is not None and r.grad is None
    with pytest.raises(ValueError, match=r"\[N, N\]"):
        RelationMatch()(LOGITS, features=s, relation=torch.zeros(3, 3))


def test_prototype_loss_golden_value_skips_unknown_classes() -> None:
    f = [[1.0, 2.0], [5.0, 5.0], [0.0, -1.0]]
    protos = [[0.0, 2.0], [1.0, 1.0], [float("nan"), float("nan")]]
    labels = torch.tensor([0, 2, 1])  # row 1's class has no prototype
    expected = ((1.0 - 0.0) ** 2 + 0.0 + (0.0 - 1.0) ** 2 + (-1.0 - 1.0) ** 2) / 4
    loss = PrototypeLoss()(LOGITS, features=t64(f), prototypes=t64(protos), labels=labels)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_prototype_loss_zero_cases_and_gradients() -> None:
    protos = torch.randn(3, 4, generator=torch.Generator().manual_seed(6))
    labels = torch.tensor([2, 0, 0, 1])
    assert PrototypeLoss()(LOGITS, features=protos[labels], prototypes=protos, labels=labels).item() == 0.0
    s = torch.randn(4, 4, requires_grad=True)
    unknown = torch.full((3, 4), float("nan"))
    loss = PrototypeLoss()(LOGITS, features=s, prototypes=unknown, labels=labels)
    assert loss.item() == 0.0
    loss.backward()
    p = protos.clone().requires_grad_(True)
    s.grad = None
    PrototypeLoss()(LOGITS, features=s, prototypes=p, labels=labels).backward()
    assert s.grad is not None and p.grad is None
    with pytest.raises(ValueError, match="labels must be in"):
        PrototypeLoss()(LOGITS, features=s, prototypes=protos, labels=torch.tensor([0, 1, 2, 3]))


def test_class_prototypes_by_hand() -> None:
    f = t64([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]])
    means, counts = class_prototypes(f, torch.tensor([1, 1, 3]), num_classes=4)
    assert counts.tolist() == [0, 2, 0, 1] and counts.dtype == torch.int64
    assert torch.isnan(means[0]).all() and torch.isnan(means[2]).all()
    torch.testing.assert_close(means[[1, 3]], t64([[2.0, 3.0], [10.0, 0.0]]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="labels must be in"):
        class_prototypes(f, torch.tensor([0, 1, 4]), num_classes=4)


def test_fixed_projection_is_seeded_and_pinned() -> None:
    r = fixed_projection(6, 4, seed=0)
    assert r.shape == (6, 4) and r.dtype == torch.float32
    assert torch.equal(r, fixed_projection(6, 4, seed=0))
    assert bool((r.abs() == 0.5).all())  # +-1 / sqrt(4)
    assert not torch.equal(r, fixed_projection(6, 4, seed=1))
    assert not torch.equal(fixed_projection(4, 6, seed=0).T, r)  # the dims are part of the seed
    assert (r > 0).int().tolist() == PINNED_SIGNS


def test_fixed_projection_keeps_norms_roughly() -> None:
    x = torch.randn(8, 512, generator=torch.Generator().manual_seed(7))
    ratio = (x @ fixed_projection(512, 256, seed=3)).norm(dim=1) / x.norm(dim=1)
    assert ((ratio > 0.8) & (ratio < 1.2)).all()


def test_projection_refusals() -> None:
    with pytest.raises(ConfigError, match=r"^out_dim=0: must be an int >= 1"):
        fixed_projection(3, 0, seed=0)
    with pytest.raises(ConfigError, match=r"^seed=-1"):
        fixed_projection(3, 2, seed=-1)


def test_top_similarities_keeps_each_rows_largest_with_their_columns():
    from fedkd.losses.relation_kd import top_similarities

    rows = torch.tensor([[0.1, 0.9, -0.2, 0.5], [0.3, -1.0, 0.8, 0.7], [0.0, 0.2, 0.1, 0.4]])
    values, index = top_similarities(rows, 2)
    assert index.dtype == torch.int16 and values.dtype == torch.float32
    assert index.tolist() == [[1, 3], [2, 3], [3, 1]]
    np.testing.assert_allclose(values.numpy(), [[0.9, 0.5], [0.8, 0.7], [0.4, 0.2]], atol=1e-7)
    values, index = top_similarities(rows, 10)  # k beyond the row: all of it, largest first
    assert values.shape == (3, 4) and index[0].tolist() == [1, 3, 0, 2]
