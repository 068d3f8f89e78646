"""Label propagation of soft targets along aggregated relations (golden values)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedkd.aggregation.propagation import propagate
from fedkd.errors import ConfigError
from fedkd.losses.relation_kd import full_relation

P = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
A = np.array([[0.0, 0.75, 0.25], [0.5, 0.0, 0.5], [0.0, 0.0, 0.0]])  # row 2: no mass


def test_one_step_by_hand():
    out = propagate(P, A, 0.4)
    # row 0: 0.6 * [.9, .1] + 0.4 * (0.75 * [.2, .8] + 0.25 * [.6, .4]) = [.54 + .12, .06 + .28]
    np.testing.assert_allclose(out[0], [0.66, 0.34], atol=1e-6)
    # row 1: 0.6 * [.2, .8] + 0.4 * (0.5 * [.9, .1] + 0.5 * [.6, .4]) = [.12 + .3, .48 + .1]
    np.testing.assert_allclose(out[1], [0.42, 0.58], atol=1e-6)
    np.testing.assert_allclose(out[2], P[2], atol=1e-7)  # no neighbours: its own target
    np.testing.assert_allclose(out[3], P[3], atol=1e-7)  # past the relation's rows: as given
    assert out.dtype == np.float32


def test_two_steps_propagate_the_first_steps_result():
    once = propagate(P, A, 0.4).astype(np.float64)
    twice = propagate(P, A, 0.4, steps=2)
    expected0 = 0.6 * P[0] + 0.4 * (0.75 * once[1] + 0.25 * once[2])
    np.testing.assert_allclose(twice[0], expected0, atol=1e-6)


def test_weight_zero_is_the_identity_and_results_stay_on_the_simplex():
    np.testing.assert_array_equal(propagate(P, A, 0.0), P.astype(np.float32))
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(10), size=50)
    a = rng.random((40, 40))
    np.fill_diagonal(a, 0.0)
    a /= a.sum(1, keepdims=True)
    out = propagate(p, a, 1.0, steps=3)
    assert (out >= 0).all()
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize("weight", [-0.1, 1.5, float("nan"), "x"])
def test_weight_outside_unit_interval_is_refused(weight):
    with pytest.raises(ConfigError, match="propagation"):
        propagate(P, A, weight)


def test_a_relation_larger_than_the_targets_is_refused():
    with pytest.raises(ValueError, match="R <= 4"):
        propagate(P, np.zeros((5, 5)), 0.5)


def test_full_relation_inverts_the_wire_layout():
    full = full_relation(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])).numpy()
    np.testing.assert_array_equal(full, [[0, 1, 2], [3, 0, 4], [5, 6, 0]])
    with pytest.raises(ValueError, match=r"\[N, N - 1\]"):
        full_relation(torch.zeros((3, 3)))
