"""A status that is true: ``ok`` only when nothing went wrong, else degraded, failed or interrupted.

Golden values for `run_status`, then the cases that used to end ``ok`` (issue 11), on the
Recorder with made-up waves, through a strategy's round loop, and in real simulations (slow).
"""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedkd.records import rows_of
from fedkd.server import compose_config
from fedkd.simulations.ledger import missing_clients
from fedkd.simulations.results import Recorder
from fedkd.simulations.run import run
from fedkd.simulations.status import (
    RoundFacts, RunFacts, chance_level, run_status, span, targets_formed,
)
from fedkd.strategies.fedmd import FedMD
from fedkd.wire import WireGrid, WireStats
from tests.conftest import SMALL, reply, request
from tests.helpers import FakeGrid, bound

ERROR = "error"
INFO = {"strategy": "fedmd", "dataset": "digits", "partition": "dirichlet", "num_clients": 3,
        "num_rounds": 3, "seed": 0, "num_classes": 10}


# --- run_status: golden values ---------------------------------------------------------------
def _facts(**kw) -> RunFacts:
    """Three clients, all evaluated in round 2 at 0.8, two clean training rounds."""
    base = dict(num_clients=3, num_classes=10, last_eval={c: (2, 0.8) for c in range(3)},
                rounds={r: RoundFacts(asked=3, answered=3, valid=3) for r in (1, 2)},
                best_mean_accuracy=0.8)
    return RunFacts(**{**base, **kw})


def test_a_clean_run_is_ok():
    assert run_status("ok", _facts()) == ("ok", [])


def test_a_signal_is_interrupted_and_an_exception_failed():
    assert run_status("interrupted", _facts(), stop_signal="SIGTERM", last_round=2) == (
        "interrupted", ["stopped by SIGTERM after round 2"])
    assert run_status("failed", _facts(), error="RuntimeError: boom") == (
        "failed", ["RuntimeError: boom"])
    assert run_status("failed", _facts(first_error="x\nValueError: y")) == (
        "failed", ["x\nValueError: y"])


def test_no_accuracy_at_all_is_failed_with_the_first_error():
    facts = _facts(last_eval={}, best_mean_accuracy=None, first_error="Traceback\n  ...\nValueError: lr",
                   rounds={r: RoundFacts(asked=3, failed={0, 1, 2}) for r in (1, 2)})
    status, reasons = run_status("ok", facts)
    assert status == "failed"
    assert reasons == ["no client reported a test accuracy; first error: ValueError: lr",
                       "client 0 failed in 2 of 2 training rounds (every round): rounds 1-2",
                       "client 1 failed in 2 of 2 training rounds (every round): rounds 1-2",
                       "client 2 failed in 2 of 2 training rounds (every round): rounds 1-2"]


def test_no_valid_training_reply_is_failed():
    rounds = {r: RoundFacts(asked=3, failed={0, 1, 2}) for r in (1, 2)}
    assert run_status("ok", _facts(rounds=rounds))[1][0] == (
        "no valid reply in any of the 2 training rounds")


def test_chance_accuracy_without_soft_targets_is_failed_but_with_targets_it_is_a_result():
    never = {r: RoundFacts(asked=3, answered=3, valid=0, dropped=3, below_min=True) for r in (1, 2)}
    status, reasons = run_status("ok", _facts(rounds=never, best_mean_accuracy=0.12,
                                              last_eval={c: (2, 0.12) for c in range(3)}))
    assert status == "failed"
    assert reasons == [
        "accuracy stayed at chance (best round mean 0.120 <= 1/10 + 0.05) and no soft targets "
        "ever formed (no round had enough valid replies)",
        "6 replies dropped as malformed in rounds 1-2",
        "fewer valid replies than min_replies in rounds 1-2: the soft targets of the round "
        "before stayed"]
    formed = {r: RoundFacts(asked=3, answered=3, valid=3) for r in (1, 2)}  # e.g. poisoned targets
    assert run_status("ok", _facts(rounds=formed, best_mean_accuracy=0.12))[0] == "ok"
    local = {r: RoundFacts(asked=3, answered=3) for r in (1, 2)}  # aggregates nothing by design
    assert run_status("ok", _facts(rounds=local, best_mean_accuracy=0.12))[0] == "ok"


def test_failing_clients_drops_and_thin_rounds_are_degraded():
    rounds = {1: RoundFacts(asked=3, answered=2, failed={1}, valid=2),
              2: RoundFacts(asked=3, answered=3, valid=1, dropped=2, below_min=True),
              3: RoundFacts(asked=2, answered=1, unidentified=1, valid=1)}
    status, reasons = run_status("ok", _facts(rounds=rounds, first_error="KeyError: 'x'"))
    assert status == "degraded"
    assert reasons == [
        "client 1 failed in 1 of 3 training rounds: round 1",
        "1 reply missing from unidentified clients in round 3",
        "first error: KeyError: 'x'",
        "2 replies dropped as malformed in round 2",
        "fewer valid replies than min_replies in round 2: the soft targets of the round before "
        "stayed"]


def test_missing_or_stale_final_accuracies_are_degraded_unless_sampling_left_them_out():
    last = {0: (3, 0.8), 2: (1, 0.5)}
    status, reasons = run_status("ok", _facts(last_eval=last))
    assert status == "degraded"
    assert reasons == [
        "client 1 never reported a test accuracy (null in final_accuracy_by_client, left out of "
        "the final mean)",
        "client 2's final accuracy is stale: from round 1, not the final round 3"]
    partial = run_status("ok", _facts(last_eval=last, full_final=False))
    assert partial == ("ok", [])  # sampling: client 1 never drawn, client 2 not in round 3


def test_helpers():
    assert span([5, 1, 2, 3, 7, 8]) == "1-3, 5, 7-8" and span([4]) == "4"
    assert chance_level(10) == pytest.approx(0.15) and chance_level(None) is None
    assert targets_formed([]) is None and targets_formed([RoundFacts()]) is None
    assert targets_formed([RoundFacts(valid=0, below_min=True), RoundFacts(valid=2)]) is True
    # every client asked: who did not answer failed; else only known error nodes are named
    assert missing_clients(4, 4, [0, 2], []) == ({1, 3}, 0)
    assert missing_clients(2, 4, [0], [3]) == ({3}, 0)
    assert missing_clients(3, 4, [0], [None, 2]) == ({2}, 1)


# --- the Recorder: the cases of issue 11 that used to say ok ---------------------------------
def _wave(server_round: int, answers: dict[int, object], dropped: int = 0,
          message_type: str = "train.distill") -> tuple[list, WireStats]:
    """Node 10 + p is asked for partition p: an accuracy replies it, `ERROR` an error reply,
    None no reply (timed out)."""
    msgs = {p: request(RecordDict({"config": ConfigRecord({})}), dst=10 + p,
                       server_round=server_round, message_type=message_type) for p in answers}
    replies = [reply(msgs[p], error="Traceback ...\nValueError: boom") if a == ERROR else
               reply(msgs[p], partition_id=p, **{"test-accuracy": a})
               for p, a in answers.items() if a is not None]
    errors = sum(a == ERROR for a in answers.values())
    return replies, WireStats(server_round, message_type, sent=len(msgs), replied=len(replies),
                              errors=errors, timed_out=len(msgs) - len(replies), dropped=dropped)


def _recorded(tmp_path, waves: dict[int, dict[int, object]], per_round: int = 3,
              **finish) -> dict:
    """The summary of a run of `waves` (round -> `_wave` answers), `per_round` clients a round."""
    rec = Recorder(tmp_path, ["cnn", "mlp", "cnn"], {**INFO, "clients_per_round": per_round})
    for server_round, answers in waves.items():
        rec.on_replies(server_round, *_wave(server_round, answers))
    summary = rec.finish(**finish)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    return summary


def test_no_client_produced_anything_is_failed(flower_ids, tmp_path):
    summary = _recorded(tmp_path, {r: {0: ERROR, 1: ERROR, 2: ERROR} for r in (1, 2, 3)})
    assert summary["status"] == "failed"
    assert summary["error"] == "no client reported a test accuracy; first error: ValueError: boom"
    assert summary["final_mean_accuracy"] is None
    assert summary["final_accuracy_by_client"] == {"0": None, "1": None, "2": None}
    assert summary["failed_rounds_by_client"] == {str(c): [1, 2, 3] for c in range(3)}


def test_a_client_failing_every_round_is_named_not_silently_dropped(flower_ids, tmp_path):
    summary = _recorded(tmp_path, {r: {0: 0.7, 1: 0.9, 2: ERROR} for r in (1, 2, 3)})
    assert summary["status"] == "degraded" and summary["error"] is None
    assert summary["status_reasons"] == [
        "client 2 failed in 3 of 3 training rounds (every round): rounds 1-3",
        "first error: ValueError: boom",
        "client 2 never reported a test accuracy (null in final_accuracy_by_client, left out of "
        "the final mean)"]
    assert summary["final_accuracy_by_client"] == {"0": 0.7, "1": 0.9, "2": None}
    assert summary["final_accuracy_round_by_client"] == {"0": 3, "1": 3, "2": None}
    assert summary["final_mean_accuracy"] == pytest.approx(0.8)


def test_a_final_mean_with_a_stale_round_one_accuracy_says_so(flower_ids, tmp_path):
    waves = {1: {0: 0.5, 1: 0.5, 2: 0.9}, 2: {0: 0.7, 1: 0.7, 2: None}, 3: {0: 0.8, 1: 0.8, 2: None}}
    summary = _recorded(tmp_path, waves)
    assert summary["status"] == "degraded"
    assert summary["status_reasons"] == [
        "client 2 failed in 2 of 3 training rounds: rounds 2-3",  # timed out: no error to quote
        "client 2's final accuracy is stale: from round 1, not the final round 3"]
    assert summary["final_accuracy_round_by_client"] == {"0": 3, "1": 3, "2": 1}
    assert summary["final_mean_accuracy"] == pytest.approx((0.8 + 0.8 + 0.9) / 3)


def test_a_node_that_is_gone_is_still_a_failed_client(flower_ids, tmp_path):
    """Full participation but only two nodes connected (a deployment lost one): client 2 failed."""
    summary = _recorded(tmp_path, {r: {0: 0.7, 1: 0.9} for r in (1, 2)})
    assert summary["status"] == "degraded"
    assert summary["status_reasons"][0] == (
        "client 2 failed in 2 of 2 training rounds (every round): rounds 1-2")
    assert summary["final_accuracy_by_client"] == {"0": 0.7, "1": 0.9, "2": None}


def test_partial_participation_keeps_older_accuracies_without_degrading(flower_ids, tmp_path):
    summary = _recorded(tmp_path, {1: {1: 0.5, 2: 0.6}, 2: {0: 0.7, 1: 0.8}}, per_round=2)
    assert summary["status"] == "ok" and summary["status_reasons"] == []
    assert summary["final_accuracy_round_by_client"] == {"0": 2, "1": 2, "2": 1}


def test_under_partial_participation_known_nodes_are_named_and_others_counted(flower_ids, tmp_path):
    summary = _recorded(tmp_path, {1: {0: 0.5, 1: 0.6}, 2: {1: ERROR, 2: None}, 3: {0: 0.7, 2: 0.8}},
                        per_round=2)
    assert summary["status"] == "degraded"
    assert summary["status_reasons"][:2] == [
        "client 1 failed in 1 of 3 training rounds: round 2",  # node 11 answered as 1 in round 1
        "1 reply missing from unidentified clients in round 2"]  # node 12 had never answered


def test_replies_dropped_on_the_wire_are_degraded(flower_ids, tmp_path):
    rec = Recorder(tmp_path, ["cnn", "mlp", "cnn"], dict(INFO))
    rec.on_replies(1, *_wave(1, {0: 0.5, 1: 0.5, 2: 0.5}, dropped=2))
    summary = rec.finish()
    assert summary["status"] == "degraded" and summary["replies_dropped"] == 2
    assert "2 replies dropped as malformed in round 1" in summary["status_reasons"]


def test_an_interrupted_run_says_by_which_signal(flower_ids, tmp_path):
    summary = _recorded(tmp_path, {1: {0: 0.5, 1: 0.5, 2: 0.5}}, status="interrupted",
                        stop_signal=signal.SIGINT)
    assert summary["status"] == "interrupted" and summary["stop_signal"] == "SIGINT"
    assert summary["status_reasons"] == ["stopped by SIGINT after round 1"]


# --- through a strategy's round loop: every logit dropped --------------------------------------
def _fedmd_run(tmp_path, small_run, logits_value: float, rounds: int = 2) -> dict:
    """FedMD's round loop on an in-memory grid (as `run_strategy` wires it) whose four nodes
    answer logits filled with `logits_value` and a test accuracy of 0.1 (chance on digits)."""
    c = small_run.data.num_classes

    def answer(msg):
        rows = len(rows_of(msg.content["transfer"], "next"))
        return reply(msg, logits=np.full((rows, c), logits_value, np.float32),
                     partition_id=msg.metadata.dst_node_id - 11, **{"test-accuracy": 0.1})

    rec = Recorder(tmp_path, list(small_run.archs), {**INFO, "num_clients": 4, "num_classes": c})
    strategy = bound(FedMD(min_replies=2, min_available_nodes=1, wait_for_nodes_s=0),
                     small_run.settings)
    strategy.server_metric_sinks.append(rec.on_server_metrics)
    wire = WireGrid(FakeGrid([11, 12, 13, 14], answer=answer), poll_interval=0.0)
    wire.observers.append(rec.on_replies)
    config = ConfigRecord(small_run.settings.to_config())
    strategy.start(grid=wire, initial_arrays=ArrayRecord(), num_rounds=rounds, timeout=60,
                   train_config=config, evaluate_config=config)
    return rec.finish()


def test_every_logit_dropped_and_accuracy_at_chance_is_failed(flower_ids, small_run, tmp_path):
    """Inputs so large that normalisation gives inf: every client answers NaN logits."""
    summary = _fedmd_run(tmp_path, small_run, np.nan)
    assert summary["status"] == "failed"
    assert summary["error"].startswith("accuracy stayed at chance (best round mean 0.100")
    assert summary["status_reasons"][1:] == [
        "8 replies dropped as malformed in rounds 1-2",
        "fewer valid replies than min_replies in rounds 1-2: the soft targets of the round "
        "before stayed"]
    assert summary["rounds_below_min_replies"] == [1, 2] and summary["replies_dropped"] == 8
    assert "valid-replies" not in summary  # per-round facts are rows, not summary keys


def test_the_same_chance_accuracy_with_soft_targets_is_a_result(flower_ids, small_run, tmp_path):
    summary = _fedmd_run(tmp_path, small_run, 0.0)
    assert summary["status"] == "ok" and summary["rounds_below_min_replies"] == []


# --- run(cfg): a failed status raises, a degraded one returns ---------------------------------
def test_run_raises_on_a_failed_status_and_returns_a_degraded_one(small_run, tmp_path):
    cfg = compose_config([*SMALL, f"simulation.cache_dir={small_run.cfg.simulation.cache_dir}"])

    def at_chance(prepared, recorder):
        for client in range(4):
            recorder.record(1, client, "test-accuracy", 0.1)
        recorder.on_server_metrics(1, {"valid-replies": 0, "rejected-replies": 4,
                                       "below-min-replies": 1})

    with pytest.raises(RuntimeError, match="accuracy stayed at chance"):
        run(cfg, tmp_path / "chance", runner=at_chance)
    assert json.loads((tmp_path / "chance" / "summary.json").read_text())["status"] == "failed"

    def three_of_four(prepared, recorder):
        for client in range(3):
            recorder.record(1, client, "test-accuracy", 0.8)

    summary = run(cfg, tmp_path / "thin", runner=three_of_four)
    assert summary["status"] == "degraded"
    assert summary["status_reasons"] == [
        "client 3 never reported a test accuracy (null in final_accuracy_by_client, left out of "
        "the final mean)"]


# --- real simulations (Ray): clients that fail ----------------------------------------------
@pytest.mark.slow  # Ray simulations; the default suite keeps one (tests/test_simulation.py)
@pytest.mark.parametrize("failing", [{1}, {0, 1, 2, 3}], ids=["one", "all"])
def test_a_simulation_with_failing_clients_is_not_ok(small_run, tmp_path, monkeypatch, failing):
    import fedkd.client.app
    from tests.faulty_client import FailingClientApp

    monkeypatch.setattr(fedkd.client.app, "app", FailingClientApp(fedkd.client.app.app, failing))
    cfg = compose_config([*SMALL, "num_rounds=2",
                          f"simulation.cache_dir={small_run.cfg.simulation.cache_dir}"])
    if len(failing) == 4:
        with pytest.raises(RuntimeError, match="no client reported a test accuracy"):
            run(cfg, tmp_path)
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["status"] == "failed"
        assert "injected failure on partition" in summary["error"]
        assert summary["final_accuracy_by_client"] == {str(c): None for c in range(4)}
        return
    summary = run(cfg, tmp_path)
    assert summary["status"] == "degraded"
    first, error, never = summary["status_reasons"]
    assert first == "client 1 failed in 2 of 2 training rounds (every round): rounds 1-2"
    assert error.startswith("first error: ") and "injected failure on partition 1" in error
    assert never.startswith("client 1 never reported a test accuracy")
    assert summary["final_accuracy_by_client"]["1"] is None
    assert summary["final_accuracy_round_by_client"] == {"0": 2, "1": None, "2": 2, "3": 2}
    assert summary["final_mean_accuracy"] > 0.5
