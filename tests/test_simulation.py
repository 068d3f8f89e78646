"""A real Flower simulation on Ray, end to end: results, wire contents, equivalence, determinism."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.helpers import run_plain
from fedkd.server import compose_config
from fedkd.simulations.results import Recorder
from fedkd.simulations.run import run
from tests.conftest import SMALL

SUMMARY_KEYS = {"strategy", "dataset", "num_clients", "num_rounds", "seed", "final_mean_accuracy",
                "final_min_accuracy", "final_max_accuracy", "bytes_up", "bytes_down",
                "wall_time_s", "partition_hash"}


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """Run the small config once through Flower's simulation engine, capturing every reply."""
    tmp = tmp_path_factory.mktemp("sim")
    cfg = compose_config([*SMALL, f"simulation.cache_dir={tmp / 'cache'}"])
    summary, waves = _run_spied(cfg, tmp / "out")
    return cfg, summary, waves, tmp / "out"


def test_results_files_and_summary(simulated):
    cfg, summary, _, out = simulated
    assert SUMMARY_KEYS <= set(summary)
    assert summary["status"] == "ok" and summary["num_clients"] == 4
    assert json.loads((out / "summary.json").read_text()) == summary
    frame = pd.read_parquet(out / "metrics.parquet")
    assert list(frame.columns) == ["round", "client", "model", "metric", "value"]
    acc = frame[frame.metric == "test-accuracy"]
    assert sorted(acc["round"].unique()) == [1, 2, 3] and sorted(acc.client.unique()) == [0, 1, 2, 3]
    assert set(acc.model) == {"cnn_small", "mlp"}
    assert (out / "accuracy.png").stat().st_size > 10_000
    assert "num_clients: 4" in (out / "config.yaml").read_text()


def test_students_learn_well_above_chance(simulated):
    _, summary, _, _ = simulated
    assert summary["final_mean_accuracy"] > 0.5  # 10 classes: chance is 0.1


def test_only_logits_and_metrics_cross_the_wire(simulated):
    cfg, summary, waves, _ = simulated
    from fedkd.data import load_client

    info_rows = 400
    private = [load_client(str(summary_cache(cfg)), p)[0] for p in range(4)]
    total_up = 0
    for server_round, replies, stats in waves:
        assert stats.replied == 4 and stats.errors == 0
        total_up += stats.bytes_up
        for reply in replies:
            assert set(reply.content.keys()) == {"logits", "metrics"}
            logits = reply.content["logits"]["logits"].numpy()
            assert logits.shape == (info_rows, 10) and logits.dtype == np.float32
            payload = logits.tobytes()
            pid = int(reply.content["metrics"]["partition-id"])
            assert all(r.tobytes() not in payload for r in private[pid].reshape(len(private[pid]), -1))
    assert total_up == summary["bytes_up"]


def summary_cache(cfg):
    from fedkd.server import prepare_run

    return prepare_run(cfg).data.cache_dir


def test_simulation_equals_the_plain_pytorch_loop(simulated):
    """Flower (state in Context.state, Ray actors, messages) changes no number."""
    cfg, summary, _, _ = simulated
    from fedkd.server import prepare_run

    plain = run_plain(prepare_run(cfg))
    final = {str(k): v for k, v in plain[3].items()}
    assert final == pytest.approx(summary["final_accuracy_by_client"], abs=0)


@pytest.mark.slow
def test_same_seed_same_summary(simulated, tmp_path):
    cfg, summary, _, _ = simulated
    again = run(cfg, tmp_path)
    keys = ["final_mean_accuracy", "final_min_accuracy", "final_max_accuracy",
            "final_accuracy_by_client", "bytes_up", "bytes_down"]
    assert {k: again[k] for k in keys} == {k: summary[k] for k in keys}


@pytest.mark.slow
def test_black_box_generator_run_equals_the_plain_loop_and_keeps_its_artefacts(tmp_path):
    """Query waves through Ray give the same numbers as models in memory; checkpoint and grid land."""
    from fedkd.server import prepare_run

    cfg = compose_config([*SMALL, f"simulation.cache_dir={tmp_path / 'cache'}",
                          "transfer=generator_blackbox", "transfer.size=50", "transfer.steps=2",
                          "transfer.batch_size=8", "transfer.directions=2"])
    summary = run(cfg, tmp_path / "out")
    plain = run_plain(prepare_run(cfg))
    final = {str(k): v for k, v in plain[3].items()}
    assert final == pytest.approx(summary["final_accuracy_by_client"], abs=0)
    assert (tmp_path / "out" / "generator.pt").exists()
    assert (tmp_path / "out" / "generator_samples.png").stat().st_size > 5_000
    frame = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    queries = frame[frame.metric == "gen-queries"]
    assert queries.value.max() == 2 * 2 * 8 * 3  # rounds 2, 3 x 2 waves x 8 inputs x (1 + 2)


# --- partial participation: fraction_train=0.5 samples partition ids, not random node ids ---------
HALF = [*SMALL, "strategy.flower.fraction_train=0.5"]


def _run_spied(cfg, out):
    """`run(cfg, out)`, returning the summary and every wave the Recorder saw."""
    waves = []
    original = Recorder.on_replies

    def spy(self, server_round, replies, stats):
        waves.append((server_round, list(replies), stats))
        original(self, server_round, replies, stats)

    Recorder.on_replies = spy
    try:
        return run(cfg, out), waves
    finally:
        Recorder.on_replies = original


@pytest.fixture(scope="module")
def half(tmp_path_factory, small_run):
    """The small config with two of the four partitions a round (data cache shared with small_run)."""
    tmp = tmp_path_factory.mktemp("half")
    cfg = compose_config([*HALF, f"simulation.cache_dir={small_run.cfg.simulation.cache_dir}"])
    summary, waves = _run_spied(cfg, tmp / "out")
    return cfg, summary, waves, tmp / "out"


def _accuracies(out) -> dict[int, dict[int, float]]:
    frame = pd.read_parquet(out / "metrics.parquet")
    acc = frame[frame.metric == "test-accuracy"]
    return {int(r): {int(c): float(v) for c, v in zip(g.client, g.value)}
            for r, g in acc.groupby("round")}


@pytest.mark.slow  # a second Ray simulation; the default suite keeps one
def test_partial_participation_trains_the_sampled_partitions_and_equals_the_plain_loop(half):
    """Each round trains the seeded sample of partition ids (not of Flower's random node ids), and
    every accuracy of every round equals the plain loop's, bit for bit, late warm-ups included."""
    from fedkd.sampling import sample_partitions

    cfg, summary, _, out = half
    simulated = _accuracies(out)
    assert {r: sorted(a) for r, a in simulated.items()} == {
        r: sample_partitions(4, 0.5, 2, 0, r) for r in (1, 2, 3)}  # [2, 3], [1, 3], [0, 3]
    assert simulated == run_plain(cfg)
    assert set(summary["final_accuracy_by_client"]) == {"0", "1", "2", "3"}  # each its last report


@pytest.mark.slow  # a second Ray simulation; the default suite keeps one
def test_a_simulation_samples_partitions_without_a_whoami_wave(half):
    """The engine's node -> partition map is read (`PartitionSampling.engine_partitions`), so no
    ``query.whoami`` wave goes out: only the sampled nodes get a message (the whoami protocol
    itself, for deployments: tests/test_sampling.py)."""
    _, summary, waves, _ = half
    kinds = [(r, stats.message_type, stats.sent, stats.replied) for r, _, stats in waves]
    assert kinds == [(1, "train.distill", 2, 2), (2, "train.distill", 2, 2),
                     (3, "train.distill", 2, 2)]
    assert summary["bytes_up"] == sum(stats.bytes_up for _, _, stats in waves)


@pytest.mark.slow
def test_partial_participation_same_seed_same_run(half, tmp_path):
    cfg, summary, _, out = half
    again = run(cfg, tmp_path)
    keys = ["final_accuracy_by_client", "final_mean_accuracy", "bytes_up", "bytes_down"]
    assert {k: again[k] for k in keys} == {k: summary[k] for k in keys}
    frames = [pd.read_parquet(d / "metrics.parquet") for d in (out, tmp_path)]
    frames = [f[f.metric != "elapsed_s"].reset_index(drop=True) for f in frames]
    pd.testing.assert_frame_equal(*frames)
