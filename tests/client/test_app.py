"""The ClientApp handlers, called directly: what they compute and what leaves the client."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedkd.client import app as client_app
from fedkd.client.data import PublicSetMismatch
from fedkd.settings import ClientSettings
from fedkd.client.state import PROGRESS
from fedkd.data import load_client
from fedkd.records import transfer_record
from tests.conftest import request

ALLOWED_METRICS = {"partition-id", "num-examples", "train-loss", "digest-loss", "test-accuracy",
                   "test-loss", "test-accuracy-own"}


def _context(pid: int) -> Context:
    return Context(run_id=1, node_id=100 + pid, node_config={"partition-id": pid},
                   state=RecordDict(), run_config={})


def _msg(settings: ClientSettings, server_round: int, transfer: ArrayRecord, pid: int):
    config = ConfigRecord({**settings.to_config(), "server-round": server_round})
    return request(RecordDict({"config": config, "transfer": transfer}), dst=100 + pid,
                   server_round=server_round)


def test_fused_rounds_reply_only_logits_and_metrics(flower_ids, small_run):
    settings, info = small_run.settings, small_run.data
    ctx = _context(1)
    rows = np.arange(info.num_public)
    out1 = client_app.distill(_msg(settings, 1, transfer_record(next_rows=rows), 1), ctx)
    assert set(out1.content.keys()) == {"logits", "metrics"}
    assert list(out1.content["logits"].keys()) == ["logits"]
    logits = out1.content["logits"]["logits"].numpy()
    assert logits.shape == (info.num_public, info.num_classes) and logits.dtype == np.float32
    metrics = out1.content["metrics"]
    assert set(metrics) <= ALLOWED_METRICS and "digest-loss" not in metrics
    assert all(isinstance(v, int | float) for v in metrics.values())
    assert metrics["num-examples"] == info.client_sizes[1]
    assert ctx.state[PROGRESS]["rounds-done"] == 1

    soft = np.full((len(rows), info.num_classes), 1.0 / info.num_classes, dtype=np.float32)
    out2 = client_app.distill(_msg(settings, 2, transfer_record(soft, rows, rows), 1), ctx)
    assert "digest-loss" in out2.content["metrics"]
    assert ctx.state[PROGRESS]["rounds-done"] == 2
    assert not np.array_equal(out2.content["logits"]["logits"].numpy(), logits)


def test_nothing_private_leaves_the_client(flower_ids, small_run):
    settings, info = small_run.settings, small_run.data
    x, y = load_client(info.cache_dir, 0)
    out = client_app.distill(
        _msg(settings, 1, transfer_record(next_rows=np.arange(info.num_public)), 0), _context(0))
    # Exactly two records: the logits on the public rows, and scalar metrics from an allowlist.
    assert set(out.content.keys()) == {"logits", "metrics"}
    logits = out.content["logits"]["logits"].numpy()
    assert logits.shape == (info.num_public, info.num_classes)
    assert set(out.content["metrics"]) <= ALLOWED_METRICS
    assert all(np.isscalar(v) for v in out.content["metrics"].values())
    # No private input row and no label vector hides in the payload.
    sent = logits.astype(np.float32).tobytes()
    assert all(row.tobytes() not in sent for row in x.astype(np.float32).reshape(len(x), -1))
    assert y.astype(np.int64).tobytes() not in sent and y.astype(np.float32).tobytes() not in sent


def test_a_different_public_set_is_refused(flower_ids, small_run):
    data = {**small_run.settings.data, "public_fingerprint": "0000000000000000"}
    settings = dataclasses.replace(small_run.settings, data=data)
    msg = _msg(settings, 1, transfer_record(next_rows=np.arange(3)), 0)
    with pytest.raises(PublicSetMismatch, match="fingerprint mismatch"):
        client_app.distill(msg, _context(0))


def test_indices_outside_the_public_set_are_refused(flower_ids, small_run):
    n = small_run.data.num_public
    msg = _msg(small_run.settings, 1, transfer_record(next_rows=np.array([0, n])), 0)
    with pytest.raises(ValueError, match="outside the public set"):
        client_app.distill(msg, _context(0))


def test_synthetic_inputs_are_answered_with_logits(flower_ids, small_run):
    info = small_run.data
    inputs = np.random.default_rng(0).random((6, *info.input_shape)).astype(np.float32)
    out = client_app.distill(_msg(small_run.settings, 1, transfer_record(next_rows=inputs), 0),
                             _context(0))
    assert out.content["logits"]["logits"].numpy().shape == (6, info.num_classes)


def test_parameter_exchange_handlers(flower_ids, small_run):
    from fedkd.server import initial_arrays

    settings = dataclasses.replace(small_run.settings, assignment=["cnn_small"] * 4)
    run = dataclasses.replace(small_run, settings=settings, cfg=copy.deepcopy(small_run.cfg))
    run.cfg.strategy.homogeneous = True
    arrays = initial_arrays(run)
    config = ConfigRecord({**settings.to_config(), "server-round": 1})
    content = RecordDict({"arrays": arrays, "config": config})
    out = client_app.train(request(content, dst=100, message_type="train"), _context(0))
    assert set(out.content["arrays"].keys()) == set(arrays.keys())
    assert out.content["metrics"]["num-examples"] == small_run.data.client_sizes[0]
    ev = client_app.evaluate_global(request(content, dst=100, message_type="evaluate"), _context(0))
    assert 0.0 <= ev.content["metrics"]["test-accuracy"] <= 1.0
    assert ev.content["metrics"]["num-examples"] == small_run.data.num_test


def test_evaluation_every_n_rounds_and_always_in_the_last(flower_ids, small_run):
    train = dataclasses.replace(small_run.settings.train, eval_every=2)
    settings = dataclasses.replace(small_run.settings, train=train, num_rounds=3)
    ctx, rows = _context(0), np.arange(small_run.data.num_public)
    evaluated = [
        "test-accuracy" in client_app.distill(
            _msg(settings, rnd, transfer_record(next_rows=rows), 0), ctx).content["metrics"]
        for rnd in (1, 2, 3)
    ]
    assert evaluated == [False, True, True]


def test_local_steps_count_mini_batches_not_epochs():
    import torch

    from fedkd.training import private_batches

    gen = torch.Generator().manual_seed(0)
    assert len(list(private_batches(100, 32, gen, epochs=2, steps=None))) == 8  # 4 per epoch
    batches = list(private_batches(100, 32, gen, epochs=2, steps=11))
    assert len(batches) == 11 and sum(len(b) for b in batches[:4]) == 100  # reshuffled passes


def test_parameter_exchange_without_weights_trains_own_model(flower_ids, small_run):
    config = ConfigRecord({**small_run.settings.to_config(), "server-round": 1})
    ctx = _context(1)
    out = client_app.train(request(RecordDict({"config": config}), dst=101, message_type="train"),
                           ctx)
    assert out.content["metrics"]["partition-id"] == 1
    assert ctx.state[PROGRESS]["rounds-done"] == 1


def test_teachers_are_never_taught(flower_ids, small_run):
    rows = np.arange(small_run.data.num_public)
    soft = np.full((len(rows), small_run.data.num_classes), 0.1, dtype=np.float32)
    for role, digests in (("teacher", False), ("student", True)):
        settings = dataclasses.replace(small_run.settings, roles=[role] * 4)
        ctx = _context(2)
        client_app.distill(_msg(settings, 1, transfer_record(next_rows=rows), 2), ctx)
        out = client_app.distill(_msg(settings, 2, transfer_record(soft, rows, rows), 2), ctx)
        assert ("digest-loss" in out.content["metrics"]) is digests
        assert "logits" in out.content  # teachers still teach


@pytest.mark.parametrize("corrupt, message", [
    (lambda p: p * np.nan, "finite"),
    (lambda p: -p, ">= 0"),
    (lambda p: p * 2, "sum to 1"),
    (lambda p: p[:, :-1], "shape"),
])
def test_bad_soft_targets_are_refused_before_any_training(flower_ids, small_run, corrupt, message):
    settings, info = small_run.settings, small_run.data
    ctx = _context(2)
    rows = np.arange(8)
    client_app.distill(_msg(settings, 1, transfer_record(next_rows=rows), 2), ctx)
    probs = np.full((len(rows), info.num_classes), 1.0 / info.num_classes, dtype=np.float32)
    with pytest.raises(ValueError, match=message):
        client_app.distill(_msg(settings, 2, transfer_record(corrupt(probs), rows, rows), 2), ctx)
    assert ctx.state[PROGRESS]["rounds-done"] == 1  # nothing was trained or saved


def test_non_finite_weights_are_refused(flower_ids, small_run):
    import torch

    settings = small_run.settings
    ctx = _context(0)
    client_app.distill(_msg(settings, 1, transfer_record(next_rows=np.arange(4)), 0), ctx)
    state = {k: v.clone() for k, v in ctx.state["fedkd.student"].to_torch_state_dict().items()}
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first][...] = float("inf")
    config = ConfigRecord({**settings.to_config(), "server-round": 2})
    msg = request(RecordDict({"config": config, "arrays": ArrayRecord(state)}), dst=100,
                  server_round=2, message_type="train")
    with pytest.raises(ValueError, match="not finite"):
        client_app.train(msg, ctx)
    assert torch.isfinite(torch.cat([v.flatten().float() for v in
                                     ctx.state["fedkd.student"].to_torch_state_dict().values()
                                     ])).all()


def test_class_counts_leave_only_when_the_run_shares_them(flower_ids, small_run):
    settings, info = small_run.settings, small_run.data
    rows = np.arange(info.num_public)
    plain = client_app.distill(_msg(settings, 1, transfer_record(next_rows=rows), 2), _context(2))
    assert list(plain.content["logits"].keys()) == ["logits"]
    shared = dataclasses.replace(
        settings, train=dataclasses.replace(settings.train, share_class_counts=True))
    out = client_app.distill(_msg(shared, 1, transfer_record(next_rows=rows), 2), _context(2))
    counts = out.content["logits"]["class_counts"].numpy()
    assert counts.tolist() == list(info.class_histograms[2])


def test_parameter_exchange_sends_class_counts_only_when_the_run_shares_them(flower_ids, small_run):
    """FedDF's class_weighted ensemble needs the counts with the weights (not in FedAvg's reply)."""
    settings, info = small_run.settings, small_run.data

    def train(run_settings):
        config = ConfigRecord({**run_settings.to_config(), "server-round": 1})
        return client_app.train(request(RecordDict({"config": config}), dst=102,
                                        message_type="train"), _context(2))

    assert "logits" not in train(settings).content
    shared = dataclasses.replace(
        settings, train=dataclasses.replace(settings.train, share_class_counts=True))
    out = train(shared)
    assert list(out.content["logits"].keys()) == ["class_counts"]
    assert out.content["logits"]["class_counts"].numpy().tolist() == list(info.class_histograms[2])


def test_profiled_rounds_report_phase_times_and_own_label_accuracy(flower_ids, small_run):
    settings, info = small_run.settings, small_run.data
    profiled = dataclasses.replace(
        settings, train=dataclasses.replace(settings.train, profile=True))
    rows = np.arange(info.num_public)
    metrics = client_app.distill(_msg(profiled, 1, transfer_record(next_rows=rows), 0),
                                 _context(0)).content["metrics"]
    phases = {k for k in metrics if k.startswith("time-")}
    assert phases == {"time-restore-s", "time-revisit-s", "time-logits-s", "time-evaluate-s",
                      "time-save-s"}
    assert all(metrics[k] >= 0 for k in phases)
    assert 0.0 <= metrics["test-accuracy-own"] <= 1.0
    plain = client_app.distill(_msg(settings, 1, transfer_record(next_rows=rows), 0),
                               _context(0)).content["metrics"]
    assert not any(k.startswith("time-") for k in plain)


def test_without_revisit_a_digesting_client_trains_on_private_rows_only_in_the_digest(
        flower_ids, small_run):
    settings, info = small_run.settings, small_run.data
    no_revisit = dataclasses.replace(
        settings, train=dataclasses.replace(settings.train, revisit=False))
    rows = np.arange(info.num_public)
    ctx = _context(1)
    first = client_app.distill(_msg(no_revisit, 1, transfer_record(next_rows=rows), 1), ctx)
    assert "train-loss" in first.content["metrics"]  # the warm-up always trains privately
    soft = np.full((len(rows), info.num_classes), 1.0 / info.num_classes, dtype=np.float32)
    second = client_app.distill(_msg(no_revisit, 2, transfer_record(soft, rows, rows), 1), ctx)
    assert "digest-loss" in second.content["metrics"]
    assert "train-loss" not in second.content["metrics"]
    third = client_app.distill(_msg(no_revisit, 3, transfer_record(next_rows=rows), 1), ctx)
    assert "train-loss" in third.content["metrics"]  # nothing to digest: the revisit runs


def test_public_rows_are_gathered_once_per_process_and_left_as_they_were(flower_ids, small_run):
    from fedkd.client.data import _gathered, client_data, transfer_inputs
    from fedkd.records import rows_from

    settings, info = small_run.settings, small_run.data
    data = client_data(_context(0), settings)
    rows = np.arange(info.num_public)[::-1].copy()
    record = transfer_record(next_rows=rows)
    first = transfer_inputs(record, "next", data)
    assert first is transfer_inputs(transfer_record(next_rows=rows), "next", data)  # gathered once
    assert torch.equal(first, rows_from(record, "next", data.public_x))
    assert transfer_inputs(transfer_record(next_rows=rows[:5]), "next", data) is not first
    other = dataclasses.replace(data, public_digest="another public set")
    assert transfer_inputs(record, "next", other) is not first  # keyed by the public set too
    assert len(_gathered) <= 4

    soft = np.full((len(rows), info.num_classes), 0.1, dtype=np.float32)
    for pid in (0, 1):  # two clients digest and answer on the shared rows
        client_app.distill(_msg(settings, 2, transfer_record(soft, rows, rows), pid),
                           _context(pid))
    assert torch.equal(transfer_inputs(record, "next", data), data.public_x[rows])


def test_synthetic_rows_are_not_kept(flower_ids, small_run):
    from fedkd.client.data import client_data, transfer_inputs

    data = client_data(_context(0), small_run.settings)
    inputs = np.zeros((3, *small_run.data.input_shape), dtype=np.float32)
    record = transfer_record(next_rows=inputs)
    assert transfer_inputs(record, "next", data) is not transfer_inputs(record, "next", data)
