"""benchmarks.kd_families: how runs are labelled and summarised."""

from __future__ import annotations

import pandas as pd
import pytest

from benchmarks.kd_families import family, summarise


@pytest.mark.parametrize("cfg, strategy, label", [
    ({}, "fedmd", "fedmd"),
    ({"distill": {"losses": {"kd": {}, "ce": {}, "self_kd": {}}}}, "fedmd", "fedmd + self_kd"),
    ({"strategy": {"client": {"relation_rows": 100, "losses": {"relation_kd": {"weight": 1.0}}}}},
     "relational", "relational (R=100)"),
    ({"strategy": {"flower": {"relation_temperature": 0.01, "propagation": 0.5},
                   "client": {"relation_rows": 400, "relation_topk": 16,
                              "losses": {"relation_kd": {"weight": 0.0}}}}},
     "relational", "relational (R=400, top-16, tau=0.01, propagation 0.5, no relation_kd)"),
    ({"strategy": {"flower": {"aggregator": None}}}, "fedproto", "fedproto alone"),
    ({"strategy": {"flower": {"aggregator": {"_target_": "x"}}}}, "fedproto", "fedproto + logits"),
    ({"strategy": {"flower": {"server_losses": {"kd": {}, "rkd_distance": {}}}}}, "feddf",
     "feddf + rkd_distance"),
])
def test_family_labels(cfg, strategy, label):
    assert family(cfg, strategy) == label


def test_margins_are_against_the_baseline_of_the_same_setting():
    runs = pd.DataFrame({
        "dataset": ["d"] * 4 + ["m"] * 2, "family": ["fedmd", "fedmd", "x", "x", "fedmd", "x"],
        "seed": [0, 1, 0, 1, 0, 0], "final_mean_accuracy": [0.90, 0.92, 0.95, 0.93, 0.5, 0.4],
        "final_min_accuracy": [0.0] * 6, "bytes_per_round": [1.0] * 6,
        "wall_s_per_round": [1.0] * 6})
    table = summarise(runs, ["dataset", "family"]).set_index(["dataset", "family"])
    assert table.loc[("d", "x"), "margin_pts"] == pytest.approx(3.0)
    assert table.loc[("m", "x"), "margin_pts"] == pytest.approx(-10.0)
    assert table.loc[("d", "fedmd"), "seeds"] == 2


def test_relation_purity_by_hand():
    import numpy as np
    import torch

    from benchmarks.relation_purity import neighbour_distributions, purity

    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    dist = neighbour_distributions(features, tau=0.01)
    np.testing.assert_allclose(dist.sum(1), 1.0, atol=1e-6)
    assert np.all(np.diag(dist) == 0)
    mass, entropy = purity(dist, np.array([0, 0, 1, 1]))
    assert mass > 0.99 and entropy < 0.05  # each row's nearest is its own class
    mass, _ = purity(dist, np.array([0, 1, 0, 1]))
    assert mass < 0.01
