"""Data-free generators: golden values of the objectives, the zero-order estimate, and fits that
turn noise into inputs the teachers label as requested."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedkd.errors import ConfigError
from fedkd.generators import BlackBoxGenerator, ConditionalGenerator, WhiteBoxGenerator
from fedkd.generators.model import balanced_labels
from fedkd.generators.objectives import (
    BatchNormStatistics, balance_loss, bn_statistics_loss, class_loss, disagreement,
    diversity_loss, frozen,
    zo_input_gradient,
)
from fedkd.generators.base import CHECKPOINT, SAMPLES, models_query
from fedkd.models import build_model
from fedkd.protocol import expand_query, query_directions


# --- the objectives, against hand-computed values --------------------------------------------
def test_class_loss_is_cross_entropy_of_the_ensemble():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    expected = (-math.log(math.e**2 / (math.e**2 + 1)) - math.log(0.5)) / 2
    assert float(class_loss(logits, torch.tensor([0, 1]))) == pytest.approx(expected, rel=1e-6)


def test_balance_loss_is_zero_when_even_and_log_c_when_one_class():
    assert float(balance_loss(torch.zeros(4, 5))) == pytest.approx(0.0, abs=1e-6)
    one_class = torch.tensor([[50.0, 0.0, 0.0], [50.0, 0.0, 0.0]])
    assert float(balance_loss(one_class)) == pytest.approx(math.log(3), abs=1e-6)
    # mean prediction (0.75, 0.25): log 2 + 0.75 log 0.75 + 0.25 log 0.25
    half = torch.tensor([[50.0, -50.0], [0.0, 0.0]])
    assert float(balance_loss(half)) == pytest.approx(
        math.log(2) + 0.75 * math.log(0.75) + 0.25 * math.log(0.25), abs=1e-6)


def test_disagreement_is_the_mean_kl_to_each_member():
    ens = torch.tensor([[0.0, 0.0]])  # p = (0.5, 0.5)
    members = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])  # q = p, then (0.75, 0.25)
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert float(disagreement(ens, members)) == pytest.approx(kl / 2, rel=1e-6)
    assert float(disagreement(ens, ens[None])) == pytest.approx(0.0, abs=1e-7)
    flipped = torch.tensor([[[0.0, math.log(3.0)]]])  # argmax 1 != the ensemble's 0: masked
    assert float(disagreement(ens, torch.cat([members, flipped]))) == pytest.approx(kl / 3, rel=1e-6)


def test_diversity_loss_is_minus_output_distance_per_noise_distance_of_pairs():
    x = torch.tensor([[0.0, 0.0], [1.0, 3.0]])  # pair (0, 1): mean |dx| = 2
    z = torch.tensor([[0.0, 0.0], [2.0, 2.0]])  # mean |dz| = 2
    assert float(diversity_loss(x, z)) == pytest.approx(-1.0)
    assert float(diversity_loss(x[[0, 0]], z)) == pytest.approx(0.0)  # collapsed: no credit


def test_bn_statistics_loss_hand_computed():
    features = torch.tensor([[[1.0]], [[3.0]]])  # [N=2, C=1, L=1]: mean 2, biased var 1
    loss = bn_statistics_loss(features, torch.tensor([0.0]), torch.tensor([4.0]))
    assert float(loss) == pytest.approx(2.0 + 3.0)


def test_batchnorm_statistics_hooks_only_batchnorm_layers_and_go_away():
    cnn = build_model({"_target_": "fedkd.models.CNN2d", "channels": [4, 4]}, (1, 8, 8), 10)
    mlp = build_model({"_target_": "fedkd.models.MLP", "hidden": [8]}, (1, 8, 8), 10)
    x = torch.rand(16, 1, 8, 8)
    with frozen([cnn, mlp]), BatchNormStatistics([cnn, mlp]) as bn:
        cnn(x), mlp(x)
    assert len(bn.layers) == 2 and len(bn.terms) == 2 and float(bn.loss) > 0
    assert all(not layer._forward_hooks for layer in bn.layers)
    assert cnn.training and all(p.requires_grad for p in cnn.parameters())  # restored
    with BatchNormStatistics([mlp]) as none:
        mlp(x)
    assert float(none.loss) == 0.0


def test_zo_gradient_one_direction_by_hand():
    # one teacher, one row, one class: z = 2 x1 - x2, loss gradient dL/dz = 3, u = (1, 1), mu = 0.1
    grad = zo_input_gradient(np.array([[[3.0]]]), np.array([[[0.0]]]),
                             np.array([[[[0.1 * (2 - 1)]]]]), np.array([[[1.0, 1.0]]]), mu=0.1)
    np.testing.assert_allclose(grad, [[3.0, 3.0]], rtol=1e-6)  # (3 * 1) * u


def test_zo_gradient_converges_to_the_true_gradient_of_a_linear_teacher():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 6)).astype(np.float32)  # logits = W x, 3 classes, 6 input dims
    x = rng.normal(size=(2, 6)).astype(np.float32)
    dl_dz = rng.normal(size=(1, 2, 3)).astype(np.float32)
    u = query_directions(1, 20_000, x.shape)
    base = (x @ w.T)[None]
    perturbed = ((x[None] + 0.01 * u) @ w.T)[None]
    estimate = zo_input_gradient(dl_dz, base, perturbed, u, mu=0.01)
    np.testing.assert_allclose(estimate, dl_dz[0] @ w, atol=0.1 * np.abs(dl_dz[0] @ w).max())


def test_expand_query_is_the_inputs_then_seeded_perturbations():
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    out = expand_query(x, seed=7, directions=2, mu=0.5)
    u = query_directions(7, 2, x.shape)
    assert out.shape == (9, 2)
    np.testing.assert_array_equal(out[:3], x)
    np.testing.assert_array_equal(out[3:6], x + np.float32(0.5) * u[0])
    np.testing.assert_array_equal(out[6:], x + np.float32(0.5) * u[1])
    np.testing.assert_array_equal(expand_query(x, 7, 2, 0.5), out)


# --- the generator and its sources ------------------------------------------------------------
def test_generator_shapes_range_and_balanced_labels():
    g = ConditionalGenerator((1, 8, 8), 10, z_dim=4, hidden=16, low=-1.0, high=2.0)
    out = g(torch.randn(25, 4), balanced_labels(25, 10))
    assert out.shape == (25, 1, 8, 8) and out.min() >= -1.0 and out.max() <= 2.0
    counts = np.bincount(balanced_labels(25, 10, torch.Generator().manual_seed(0)).numpy())
    assert counts.max() - counts.min() <= 1 and counts.sum() == 25


@pytest.mark.parametrize("kwargs", [{"size": 0}, {"steps": -1}, {"lr": 0}, {"low": 1, "high": 0},
                                    {"w_adv": -1}, {"w_bn": -0.1}])
def test_bad_generator_settings_are_named(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs)).split("_")[0]):
        WhiteBoxGenerator(**kwargs)


@pytest.mark.parametrize("kwargs", [{"directions": 0}, {"mu": 0}, {"query_budget": 0}])
def test_bad_black_box_settings_are_named(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        BlackBoxGenerator(**kwargs)


@pytest.fixture(scope="module")
def teachers(small_run):
    """Two locally trained digits models (a BatchNorm CNN and an MLP) on all private rows."""
    return train_teachers(small_run.data)


def train_teachers(info):
    """A CNN with BatchNorm and an MLP, trained on all private rows for 15 epochs."""
    from fedkd.data import load_client

    xs, ys = zip(*(load_client(info.cache_dir, p) for p in range(4)))
    x, y = torch.from_numpy(np.concatenate(xs)).float(), torch.from_numpy(np.concatenate(ys)).long()
    models = []
    for spec in ({"_target_": "fedkd.models.CNN2d", "channels": [8, 16]},
                 {"_target_": "fedkd.models.MLP", "hidden": [64]}):
        torch.manual_seed(0)
        model = build_model(spec, tuple(info.input_shape), info.num_classes)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(15):
            for idx in torch.randperm(len(x)).split(32):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        models.append(model.eval())
    return models


def _agreement(source, settings, models, server_round=99):
    x, y = (torch.from_numpy(a) for a in source.sample(server_round, settings))
    with torch.no_grad():
        ens = torch.stack([m(x) for m in models]).mean(0)
    return float((ens.argmax(1) == y).float().mean())


def test_white_box_fit_makes_inputs_the_teachers_label_as_requested(small_run, teachers, tmp_path):
    settings = small_run.settings
    source = WhiteBoxGenerator(size=200, steps=60, batch_size=64, seed=3)
    before = _agreement(source, settings, teachers)
    source.set_output_dir(tmp_path)
    metrics = source.fit_models(settings.num_rounds, settings, teachers, teachers[:1])
    after = _agreement(source, settings, teachers)
    assert before < 0.5 and after > 0.8, (before, after)
    assert {"gen-ce", "gen-bn", "gen-disagreement", "gen-balance", "gen-agree"} <= set(metrics)
    assert (tmp_path / CHECKPOINT).exists() and (tmp_path / SAMPLES).stat().st_size > 5_000

    again = WhiteBoxGenerator(size=200, steps=60, batch_size=64, seed=3)
    assert again.load(tmp_path / CHECKPOINT, settings) == settings.num_rounds
    np.testing.assert_array_equal(again.rows(5, settings), source.rows(5, settings))
    assert again.steps_done == 60


def test_rows_are_seeded_per_round_and_shaped_like_the_data(small_run):
    settings = small_run.settings
    a, b = WhiteBoxGenerator(size=30, seed=1), WhiteBoxGenerator(size=30, seed=1)
    assert a.rows(2, settings).shape == (30, *small_run.data.input_shape)
    np.testing.assert_array_equal(a.rows(2, settings), b.rows(2, settings))
    assert not np.array_equal(a.rows(2, settings), a.rows(3, settings))
    assert a.rows(2, settings).dtype == np.float32


def test_black_box_fit_learns_from_logits_alone_within_its_budget(small_run, teachers):
    settings = small_run.settings
    source = BlackBoxGenerator(size=200, steps=40, batch_size=32, directions=8, seed=3,
                               query_budget=32 * 9 * 30)
    calls = []
    answer = models_query(teachers)

    def query(inputs, seed, directions, mu):
        calls.append(inputs.shape)
        return answer(inputs, seed, directions, mu)

    assert source.fit_logits(1, settings, query) == {}  # round 1: the teachers are untrained
    before = _agreement(source, settings, teachers)
    metrics = source.fit_logits(2, settings, query)
    after = _agreement(source, settings, teachers)
    assert len(calls) == 30 and calls[0] == (32, 1, 8, 8)  # the budget stopped it after 30 waves
    assert metrics["gen-queries"] == 32 * 9 * 30 == source.queries
    assert before < 0.5 and after > 0.75, (before, after)


@pytest.mark.parametrize("directions, rows", [(-1, 2), (1025, 2), (1000, 70_000)])
def test_a_client_refuses_queries_beyond_its_bounds(directions, rows):
    x = np.zeros((rows, 64), dtype=np.float32)
    with pytest.raises(ValueError, match="query"):
        expand_query(x, seed=0, directions=directions, mu=0.1)
