"""The privacy benchmarks' own logic: the sweep collector and the real-vote builder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from benchmarks import privacy_results


def _run(folder: Path, summary: dict, privacy: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.yaml").write_text(yaml.safe_dump({"privacy": privacy}))


def _dpsgd_summary(seed: int, accuracy: float) -> dict:
    return {"strategy": "fedmd", "aggregator": "entropy_weighted", "dataset": "files", "num_clients": 2,
            "num_rounds": 20, "seed": seed, "status": "ok", "final_mean_accuracy": accuracy,
            "dpsgd_epsilon_max": 7.99, "dpsgd_delta": 1e-5, "audit_auc_mean": 0.52,
            "dpsgd_by_client": {"0": {"epsilon": 7.99, "noise_multiplier": 0.9, "sample_rate": 0.04, "steps": 500},
                                "1": {"epsilon": 7.5, "noise_multiplier": 1.2, "sample_rate": 0.05, "steps": 420}}}


def test_collect_reads_dpsgd_ranges_and_server_ledgers(tmp_path):
    dp = {"name": "dpsgd", "target_epsilon": 8.0}
    _run(tmp_path / "a", _dpsgd_summary(0, 0.90), dp)
    _run(tmp_path / "b", _dpsgd_summary(1, 0.94), dp)
    _run(tmp_path / "c", {"strategy": "fedmd", "aggregator": "ConfidentVote(threshold=60)", "seed": 0,
                          "final_mean_accuracy": 0.8, "epsilon": 6.5, "epsilon-data-independent": 8.1,
                          "queries": 500.0, "answered": 90.0, "pate-threshold": 60.0}, {"name": "none"})
    table = privacy_results.collect([tmp_path]).set_index("run")
    a = table.loc[str(tmp_path / "a")]
    assert (a.privacy, a.target_epsilon, a.epsilon) == ("dpsgd", 8.0, 7.99)
    assert (a.noise_multiplier_min, a.noise_multiplier_max, a.steps_min, a.steps_max) == (0.9, 1.2, 420, 500)
    c = table.loc[str(tmp_path / "c")]
    assert (c.privacy, c.epsilon, c.epsilon_data_independent, c.answered) == ("confident_vote", 6.5, 8.1, 90)
    means = privacy_results.means(table.reset_index(), ["privacy"]).set_index("privacy")
    assert means.loc["dpsgd", "seeds"] == 2
    assert means.loc["dpsgd", "final_mean_accuracy_mean"] == pytest.approx(0.92)
    privacy_results.plot_curve(table.reset_index(), tmp_path / "curve.png", "test")
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_pate_votes_counts_one_vote_per_client_and_row(tmp_path):
    from benchmarks import pate_votes

    votes, labels, teachers = pate_votes.client_votes(
        ["num_clients=3", "distill.warmup_epochs=1", f"simulation.cache_dir={tmp_path}"], queries=25)
    assert votes.shape == (25, 10) and labels.shape == (25,)
    assert (votes.sum(axis=1) == 3).all()
    assert list(teachers.client) == [0, 1, 2] and teachers.accuracy.between(0, 1).all()
