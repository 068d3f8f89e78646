"""Recorder: tidy rows from replies, progress, files written as the run goes and after a failure."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from flwr.app import ConfigRecord, RecordDict

from fedkd.wire import WireStats
from fedkd.simulations.results import Recorder
from fedkd.simulations.run import run
from tests.conftest import SMALL, reply, request

INFO = {"strategy": "fedmd", "dataset": "digits", "partition": "dirichlet", "num_clients": 3,
        "num_rounds": 2, "seed": 0}


def _wave(server_round, accuracies, errors=0):
    msgs = [request(RecordDict({"config": ConfigRecord({})}), dst=10 + p, server_round=server_round)
            for p in range(len(accuracies) + errors)]
    replies = [reply(m, partition_id=p, **{"test-accuracy": a})
               for p, (m, a) in enumerate(zip(msgs, accuracies))]
    replies += [reply(m, error="ValueError: boom") for m in msgs[len(accuracies):]]
    stats = WireStats(server_round, "train.distill", sent=len(msgs), replied=len(msgs),
                      errors=errors, bytes_up=100, bytes_down=200)
    return replies, stats


def test_rows_progress_and_final_accuracy_per_client(flower_ids, tmp_path, caplog):
    rec = Recorder(tmp_path, ["cnn", "mlp", "cnn"], dict(INFO))
    caplog.set_level("INFO", logger="fedkd.progress")
    rec.on_replies(1, *_wave(1, [0.5, 0.6, 0.7]))
    assert "round 1/2 | replies 3/3 | accuracy mean 0.600 min 0.500 max 0.700" in caplog.text
    assert len(pd.read_parquet(tmp_path / "metrics.parquet")) > 0  # flushed after the round
    rec.on_replies(2, *_wave(2, [0.8, 0.9], errors=1))  # client 2 fails in round 2
    assert "replies 2/3 (1 errors)" in caplog.text
    summary = rec.finish()
    # client 2 keeps its last reported accuracy (round 1)
    assert summary["final_accuracy_by_client"] == pytest.approx({"0": 0.8, "1": 0.9, "2": 0.7})
    assert summary["final_mean_accuracy"] == pytest.approx(0.8)
    assert summary["final_accuracy_by_arch"] == pytest.approx({"cnn": 0.75, "mlp": 0.9})
    assert summary["bytes_up"] == 200 and summary["bytes_down"] == 400
    frame = pd.read_parquet(tmp_path / "metrics.parquet")
    acc = frame[frame.metric == "test-accuracy"]
    assert acc[(acc["round"] == 2)].client.tolist() == [0, 1]
    assert set(frame[frame.client == -1].metric) == {"bytes_up", "bytes_down", "replies-dropped",
                                                   "elapsed_s"}
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["status"] == "degraded"  # client 2's accuracy is from round 1, and it failed
    assert written["final_accuracy_round_by_client"] == {"0": 2, "1": 2, "2": 1}
    assert written["status_reasons"] == [
        "client 2 failed in 1 of 2 training rounds: round 2",
        "first error: ValueError: boom",
        "client 2's final accuracy is stale: from round 1, not the final round 2"]


def test_dropped_replies_are_a_wire_row_and_in_the_progress_line(flower_ids, tmp_path, caplog):
    rec = Recorder(tmp_path, ["cnn", "mlp", "cnn"], dict(INFO))
    caplog.set_level("INFO", logger="fedkd.progress")
    replies, stats = _wave(1, [0.5, 0.6], errors=1)
    stats.replied += 1  # a fourth node answered, and its reply failed the wire's checks
    stats.sent += 1
    stats.dropped = 1
    rec.on_replies(1, replies, stats)
    assert "round 1/2 | replies 2/4 (1 errors, 1 dropped)" in caplog.text
    frame = rec.frame()
    assert frame[frame.metric == "replies-dropped"][["round", "client", "value"]].values.tolist() \
        == [[1, -1, 1.0]]


def test_a_failure_late_in_a_run_keeps_what_was_computed(tmp_path):
    from fedkd.server import compose_config

    cfg = compose_config([*SMALL, f"simulation.cache_dir={tmp_path / 'cache'}"])

    def runner(prepared, recorder):
        recorder.record(1, 0, "test-accuracy", 0.42)
        recorder.end_round(1)
        raise RuntimeError("node exploded in round 2")

    with pytest.raises(RuntimeError, match="exploded"):
        run(cfg, tmp_path / "out", runner=runner)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "failed" and "exploded" in summary["error"]
    assert summary["final_mean_accuracy"] == pytest.approx(0.42)
    assert len(pd.read_parquet(tmp_path / "out" / "metrics.parquet")) >= 1


def test_server_metrics_become_rows_and_summary_keys(tmp_path):
    rec = Recorder(tmp_path, ["cnn"], {**INFO, "roles": ["teacher"]})
    rec.record(1, 0, "test-accuracy", 0.5)
    rec.on_server_metrics(1, {"epsilon": 3.0, "epsilon-round": 3.0})
    rec.on_server_metrics(2, {"epsilon": 5.5, "epsilon-round": 2.5})
    summary = rec.finish()
    assert summary["epsilon"] == 5.5 and summary["final_accuracy_by_role"] == {"teacher": 0.5}
    frame = pd.read_parquet(tmp_path / "metrics.parquet")
    eps = frame[frame.metric == "epsilon"]
    assert eps["value"].tolist() == [3.0, 5.5] and set(eps.model) == {"server"}


def test_own_label_accuracy_is_size_weighted_and_top5_is_the_mean_of_the_best_rounds(tmp_path):
    from fedkd.simulations.summary_maths import own_accuracy_rounds, top_k_mean

    rows = [(r, c, "m", "test-accuracy-own", v)
            for r, accs in {1: [0.5, 0.8], 2: [0.6, 0.9], 3: [0.7, 1.0]}.items()
            for c, v in enumerate(accs)]
    frame = pd.DataFrame(rows, columns=["round", "client", "model", "metric", "value"])
    own = own_accuracy_rounds(frame, sizes=[100, 300])
    assert own == pytest.approx({1: 0.725, 2: 0.825, 3: 0.925})  # (1 * a0 + 3 * a1) / 4
    assert own_accuracy_rounds(frame, None)[1] == pytest.approx(0.65)
    assert top_k_mean([0.1, 0.9, 0.5, 0.7, 0.3, 0.8], 5) == pytest.approx(0.64)
    assert top_k_mean([0.4, 0.6], 5) == pytest.approx(0.5)
    rec = Recorder(tmp_path, ["cnn", "cnn"], {**INFO, "own_test_sizes": [100, 300]})
    rec.rows = [tuple(r) for r in rows]
    summary = rec.finish()
    assert summary["final_own_accuracy"] == pytest.approx(0.925)
    assert summary["top5_own_accuracy"] == pytest.approx((0.725 + 0.825 + 0.925) / 3)
