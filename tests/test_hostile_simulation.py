"""A real simulation with hostile clients finishes: their replies are dropped, the run is not.

Through Flower's simulation engine (Ray), partitions 1, 2, 4 and 5 of 6 send partition ids that
once crashed the wire's sort (NaN, inf), the Recorder (a list) or `Recorder.finish` (1000), claim
another node's partition, claim 1e30 examples, or send NaN or huge logits. Every one of those
replies is dropped each round, and the run ends with summary.json.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from fedkd.client import app as client_app
from fedkd.reply_checks import MAX_ABS_LOGIT
from fedkd.server import compose_config
from fedkd.simulations.run import run
from tests.conftest import SMALL
from tests.hostile import HostileApp

ROWS, CLASSES = 400, 10
PLAN = {
    1: {"partition-id": [math.nan, math.inf, -math.inf]},
    2: {"partition-id": [[1, 2], 1000, -1]},
    4: {"partition-id": [3]},  # partition 3's, held by node of partition 3 (or the reverse)
    5: {"num-examples": [1e30, None, None],  # the weighted aggregator's attack
        "logits": [None, [[math.nan] * CLASSES] * ROWS, [[10 * MAX_ABS_LOGIT] * CLASSES] * ROWS]},
}


@pytest.mark.slow  # a second Ray simulation (~2 min); the default suite keeps one
def test_hostile_clients_are_dropped_and_the_run_finishes(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(client_app, "app", HostileApp(client_app.app, PLAN))
    cfg = compose_config([*SMALL, "num_clients=6", "num_rounds=3", "distill.warmup_epochs=1",
                          f"simulation.cache_dir={tmp_path / 'cache'}"])
    summary = run(cfg, tmp_path / "out")

    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    assert summary["status"] == "degraded" and summary["last_round"] == 3  # replies were dropped
    assert any("dropped as malformed" in reason for reason in summary["status_reasons"])
    reported = {c for c, v in summary["final_accuracy_by_client"].items() if v is not None}
    assert reported == {"0", "3"}  # the honest partitions; the others null, with a reason
    frame = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    dropped = frame[frame.metric == "replies-dropped"].groupby("round").value.sum()
    assert dropped.to_dict() == {1: 4, 2: 4, 3: 4}
    assert set(frame[frame.metric == "test-accuracy"].client) == {0, 3}
    warnings = [r.getMessage() for r in caplog.records if "dropped:" in r.getMessage()]
    for field in ("metrics.partition-id=nan", "metrics.partition-id=inf",
                  "metrics.partition-id=-inf", "metrics.partition-id=[1, 2]",
                  "metrics.partition-id=1000", "metrics.partition-id=-1",
                  "metrics.partition-id=3 ", "metrics.num-examples=1e+30",
                  "logits.logits holds NaN or inf", "logits.logits holds |value| 1e+05 > 1e+04"):
        assert any(field in w for w in warnings), (field, warnings)
    assert len(warnings) == 12
