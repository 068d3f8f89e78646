"""benchmarks.robustness: the tables it builds from summaries (made up here; no simulation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import robustness


def _summary(folder: Path, *, clients: int, aggregator: str, attack: str | None, seed: int,
             honest: float, by_client: dict | None = None, crash: bool = False,
             status: str = "ok") -> None:
    faults = None
    honest_clients = list(range(1, clients))
    if attack is not None:
        faults = {"seed": seed, "byzantine": [0], "attack": attack, "claim": None}
    if crash:
        faults = {"seed": seed, "crash": [0], "crash_rounds": {"0": [2]}}
    if faults is None:
        honest_clients = None
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "num_clients": clients, "aggregator": aggregator, "seed": seed, "status": status,
        "faults": faults, "honest_clients": honest_clients,
        "final_mean_accuracy_honest": honest, "final_mean_accuracy": honest,
        "final_accuracy_by_client": by_client or {str(c): honest for c in range(clients)},
        "anomaly_score_by_client": {"0": 0.9, **{str(c): 0.1 for c in range(1, clients)}},
    }))


def test_byzantine_table_compares_each_attack_with_the_honest_run(tmp_path):
    for seed, base in ((0, 0.90), (1, 0.80)):
        for name, attacked in (("Reputation", base - 0.01), ("mean_logits", base - 0.5)):
            _summary(tmp_path / f"{name}{seed}none", clients=5, aggregator=name, attack="none",
                     seed=seed, honest=base)
            _summary(tmp_path / f"{name}{seed}fixed", clients=5, aggregator=name,
                     attack="fixed_class", seed=seed, honest=attacked)
    _summary(tmp_path / "broken", clients=5, aggregator="median", attack="fixed_class", seed=0,
             honest=0.0, status="failed")  # never averaged
    table = robustness.byzantine_table(robustness.load([tmp_path]))

    row = table[(table.aggregator == "reputation") & (table.attack == "fixed_class")].iloc[0]
    assert row.accuracy == pytest.approx(0.84) and row.delta == pytest.approx(-0.01)
    assert row.seeds == 2 and row.anomaly_gap == pytest.approx(0.8)
    assert "median" not in set(table.aggregator)
    text = robustness.markdown(table, "1of5")
    assert "| reputation | 85.0 | 84.0 (-1.0) |" in text
    assert "| mean_logits | 85.0 | 35.0 (-50.0) |" in text
    verdict = "\n".join(robustness.verdict(table))
    assert "| 1of5 | fixed_class | reputation | -1.0 | -1.0 | -1.0 | yes | 2 |" in verdict
    worst = robustness.worst_case(table)
    assert worst[2:] == ["| 1of5 | mean_logits | fixed_class | -50.0 | -50.0 | no |",
                         "| 1of5 | reputation | fixed_class | -1.0 | -1.0 | yes |"]


def test_crash_table_uses_the_same_clients_of_the_fault_free_run(tmp_path):
    _summary(tmp_path / "clean", clients=10, aggregator="entropy_weighted", attack=None, seed=0,
             honest=0.8, by_client={str(c): 0.5 if c == 0 else 0.9 for c in range(10)})
    _summary(tmp_path / "crash", clients=10, aggregator="entropy_weighted", attack=None, seed=0,
             honest=0.88, crash=True, status="degraded")
    crash = robustness.crash_table(robustness.load([tmp_path]))
    assert len(crash) == 1
    row = crash.iloc[0]
    assert row.status == "degraded" and row.fault_free_same_clients == pytest.approx(0.9)
    assert row.delta == pytest.approx(-0.02)


def test_sweep_runs_one_multirun_per_chunk_and_skips_finished_ones(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(robustness, "fedkd_sim", calls.append)
    for attack in ("none", "random"):  # 1of5, seed 0, median: done
        _summary(tmp_path / "1of5" / "seed0" / "median" / attack, clients=5, aggregator="median",
                 attack=attack, seed=0, honest=0.9)
    _summary(tmp_path / "1of5" / "seed0" / "reputation" / "none", clients=5,  # one arm of two
             aggregator="reputation", attack="none", seed=0, honest=0.9)
    robustness.sweep(tmp_path, ["1of5", "crash"], ["median", "reputation"], ["none", "random"], [0])
    assert calls == [
        ["-m", "+experiment=byzantine_1of5", "seed=0", "aggregator=reputation",
         "faults.byzantine.attack=random", f"hydra.sweep.dir={tmp_path}/1of5/seed0/reputation"],
        ["-m", "faults=none,crash", "num_clients=10", "seed=0",
         f"hydra.sweep.dir={tmp_path}/crash/seed0"],
    ]
