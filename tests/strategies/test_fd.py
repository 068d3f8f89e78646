"""FD / FedDistill: class-mean aggregation, the client's class logits, equivalence, a full run."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedkd.client.wire_mod import wire_mod
from fedkd.client.fd import fd_round, regularized_train
from fedkd.protocol import FD_MESSAGE_TYPE
from fedkd.settings import ClientSettings
from fedkd.client.state import Student
from fedkd.training import predict_logits, revisit, round_generator
from fedkd.data import load_client
from fedkd.losses import distill_loss
from fedkd.server import PreparedRun, compose_config, prepare_run
from fedkd.wire import WireGrid
from fedkd.strategies.fd import FD, class_weighted_mean
from tests.conftest import SMALL, reply, request
from tests.helpers import FakeGrid
from tests.helpers import bound

ALLOWED_METRICS = {"partition-id", "num-examples", "train-loss", "test-accuracy", "test-loss",
                   "test-accuracy-own"}


# --- factories -------------------------------------------------------------------------------
def _context(pid: int) -> Context:
    return Context(run_id=1, node_id=100 + pid, node_config={"partition-id": pid},
                   state=RecordDict(), run_config={})


def _msg(settings: ClientSettings, server_round: int, pid: int,
         targets: tuple[np.ndarray, np.ndarray] | None = None) -> Message:
    transfer = ArrayRecord()
    if targets is not None:
        transfer["targets.class_logits"] = Array(targets[0].astype(np.float32))
        transfer["targets.class_counts"] = Array(targets[1].astype(np.int64))
    config = ConfigRecord({**settings.to_config(), "server-round": server_round})
    return request(RecordDict({"config": config, "transfer": transfer}), dst=100 + pid,
                   server_round=server_round, message_type=FD_MESSAGE_TYPE)


def _fd_reply(to: Message, class_logits, class_counts, partition_id: int) -> Message:
    out = reply(to, partition_id=partition_id)
    record = ArrayRecord()
    if class_logits is not None:
        record["class_logits"] = Array(np.asarray(class_logits))
    if class_counts is not None:
        record["class_counts"] = Array(np.asarray(class_counts))
    out.content["logits"] = record
    return out


def _configure(strategy: FD, settings: ClientSettings, server_round=1, arrays=None,
               nodes=(100, 101)):
    return list(bound(strategy, settings).configure_train(server_round, arrays or ArrayRecord(), settings.to_config(), FakeGrid(list(nodes))))


def _with_train(run: PreparedRun, **train) -> ClientSettings:
    return dataclasses.replace(run.settings, train=dataclasses.replace(run.settings.train, **train))


def drive(run: PreparedRun, settings: ClientSettings | None = None, **strategy_kwargs
          ) -> tuple[dict[int, dict[int, float]], FakeGrid]:
    """Run FD in process through Flower's round loop and the WireGrid: test accuracy per round
    and partition id, and the fake grid (every pushed message)."""
    settings = settings or run.settings
    num_clients = len(settings.assignment)
    contexts = {100 + pid: _context(pid) for pid in range(num_clients)}

    def answer(msg: Message) -> Message:
        TaskIdentity.node_id = msg.metadata.dst_node_id
        try:
            return wire_mod(msg, contexts[msg.metadata.dst_node_id], fd_round)
        finally:
            TaskIdentity.node_id = 1

    fake = FakeGrid(list(contexts), answer=answer)
    wire = WireGrid(fake, poll_interval=0.001)
    accuracy: dict[int, dict[int, float]] = {}
    wire.observers.append(lambda rnd, replies, _: accuracy.setdefault(rnd, {}).update(
        {r.content["metrics"]["partition-id"]: r.content["metrics"]["test-accuracy"]
         for r in replies if "test-accuracy" in r.content["metrics"]}))
    kwargs = {"min_available_nodes": num_clients, "wait_for_nodes_s": 0, "seed": settings.seed,
              **strategy_kwargs}
    bound(FD(**kwargs), settings).start(
        grid=wire, initial_arrays=ArrayRecord(), num_rounds=settings.num_rounds, timeout=3600,
        train_config=ConfigRecord(settings.to_config()))
    return accuracy, fake


# --- server maths ----------------------------------------------------------------------------
def test_class_weighted_mean_by_hand():
    # Class 0 at both clients (3 and 1 rows), class 1 only at A, class 2 nowhere.
    logits = np.array([
        [[1, 2, 3], [0, 4, -4], [0, 0, 0]],      # client A
        [[5, 6, 7], [9, 9, 9], [8, 8, 8]],       # client B: rows of absent classes are ignored
    ], dtype=np.float32)
    counts = np.array([[3, 1, 0], [1, 0, 0]])
    mean, total = class_weighted_mean(logits, counts)
    np.testing.assert_allclose(mean, [[2, 3, 4], [0, 4, -4], [0, 0, 0]], rtol=1e-6)
    np.testing.assert_array_equal(total, [4, 1, 0])
    assert mean.dtype == np.float32 and total.dtype == np.int64


def test_one_client_is_its_own_class_logits():
    logits = np.random.default_rng(0).normal(size=(1, 4, 4)).astype(np.float32)
    mean, total = class_weighted_mean(logits, np.array([[2, 5, 0, 1]]))
    np.testing.assert_allclose(mean, logits[0] * np.array([1, 1, 0, 1])[:, None], rtol=1e-6)
    np.testing.assert_array_equal(total, [2, 5, 0, 1])


# --- strategy hooks --------------------------------------------------------------------------
def test_aggregate_sorts_replies_and_returns_the_class_targets(flower_ids, small_run):
    c = small_run.data.num_classes
    rng = np.random.default_rng(1)
    logits = [rng.normal(size=(c, c)).astype(np.float32) for _ in range(3)]
    counts = [rng.integers(0, 5, size=c) for _ in range(3)]
    strategy = FD(min_available_nodes=1)
    msgs = _configure(strategy, small_run.settings, nodes=(100, 101, 102))
    replies = [_fd_reply(msgs[i], logits[p], counts[p], p) for i, p in enumerate([2, 0, 1])]
    arrays, metrics = strategy.aggregate_train(1, replies)
    mean, total = class_weighted_mean(np.stack(logits), np.stack(counts))
    np.testing.assert_array_equal(arrays["targets.class_logits"].numpy(), mean)
    np.testing.assert_array_equal(arrays["targets.class_counts"].numpy(), total)
    assert metrics["num-examples"] == 10


def test_configure_train_carries_the_targets_and_the_fd_message_type(flower_ids, small_run):
    strategy = FD(min_available_nodes=1)
    first = _configure(strategy, small_run.settings)
    assert [m.metadata.message_type for m in first] == [FD_MESSAGE_TYPE] * 2 == ["train.fd"] * 2
    assert len(first[0].content["transfer"]) == 0
    assert first[0].content["config"]["server-round"] == 1
    assert "fedkd.settings" in first[0].content["config"]

    c = small_run.data.num_classes
    arrays = ArrayRecord({"targets.class_logits": Array(np.ones((c, c), np.float32)),
                          "targets.class_counts": Array(np.arange(c))})
    second = _configure(strategy, small_run.settings, server_round=2, arrays=arrays)
    transfer = second[0].content["transfer"]
    assert sorted(transfer.keys()) == ["targets.class_counts", "targets.class_logits"]
    np.testing.assert_array_equal(transfer["targets.class_counts"].numpy(), np.arange(c))
    assert second[0].metadata.group_id == "2" and second[0].content["config"]["server-round"] == 2


@pytest.mark.parametrize("bad", ["nan logits", "logits shape", "counts shape", "negative count",
                                 "fractional count", "bool counts", "missing", "int logits"])
def test_malformed_replies_are_dropped(flower_ids, small_run, bad):
    c = small_run.data.num_classes
    good_logits, good_counts = np.ones((c, c), np.float32), np.full(c, 2)
    broken = {
        "nan logits": (np.full((c, c), np.nan, np.float32), good_counts),
        "logits shape": (np.ones((c, c + 1), np.float32), good_counts),
        "counts shape": (good_logits, np.full(c - 1, 2)),
        "negative count": (good_logits, np.r_[-1, np.full(c - 1, 2)]),
        "fractional count": (good_logits, np.full(c, 0.5)),
        "bool counts": (good_logits, np.ones(c, dtype=bool)),
        "missing": (None, good_counts),
        "int logits": (np.ones((c, c), np.int64), good_counts),
    }[bad]

    def attempt(min_replies):
        strategy = FD(min_available_nodes=1, min_replies=min_replies)
        msgs = _configure(strategy, small_run.settings, nodes=(100, 101, 102))
        replies = [_fd_reply(msgs[0], good_logits, good_counts, 0),
                   _fd_reply(msgs[1], broken[0], broken[1], 1),
                   _fd_reply(msgs[2], good_logits, good_counts, 2),
                   reply(msgs[0], error="boom")]
        return strategy.aggregate_train(1, replies)[0]

    arrays = attempt(2)  # the two good replies remain
    np.testing.assert_array_equal(arrays["targets.class_logits"].numpy(), good_logits)
    np.testing.assert_array_equal(arrays["targets.class_counts"].numpy(), 2 * good_counts)
    assert attempt(3) is None  # below the minimum: the previous targets stay in place


# --- client ----------------------------------------------------------------------------------
def test_client_replies_its_class_mean_logits_and_counts(flower_ids, small_run):
    info, pid = small_run.data, 1
    ctx = _context(pid)
    out = fd_round(_msg(small_run.settings, 1, pid), ctx)
    assert set(out.content.keys()) == {"logits", "metrics"}
    assert sorted(out.content["logits"].keys()) == ["class_counts", "class_logits"]
    assert set(out.content["metrics"]) <= ALLOWED_METRICS
    assert out.content["metrics"]["num-examples"] == info.client_sizes[pid]

    x, y = load_client(info.cache_dir, pid)
    student = Student.restore(ctx, small_run.settings, pid)
    logits = predict_logits(student.model, torch.from_numpy(x).float())
    expected = np.zeros((info.num_classes, info.num_classes), np.float32)
    for c in np.unique(y):
        expected[c] = logits[y == c].mean(axis=0)
    np.testing.assert_allclose(out.content["logits"]["class_logits"].numpy(), expected,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.content["logits"]["class_counts"].numpy(),
                                  np.bincount(y, minlength=info.num_classes))


@pytest.mark.parametrize("case", ["alpha 0", "teacher"])
def test_alpha_zero_or_teacher_role_is_plain_ce_training(flower_ids, small_run, case):
    pid, c = 0, small_run.data.num_classes
    settings = (_with_train(small_run, alpha=0.0) if case == "alpha 0" else dataclasses.replace(
        small_run.settings, roles=["teacher"] * len(small_run.settings.assignment)))
    ctx = _context(pid)
    fd_round(_msg(settings, 1, pid), ctx)
    before = copy.deepcopy(ctx)
    targets = (np.random.default_rng(0).normal(size=(c, c)), np.full(c, 3))
    fd_round(_msg(settings, 2, pid, targets), ctx)

    student = Student.restore(before, settings, pid)
    x, y = (torch.from_numpy(a) for a in load_client(small_run.data.cache_dir, pid))
    revisit(student.model, student.optimizer, x.float(), y.long(),
            batch_size=settings.train.batch_size, gen=round_generator(settings.seed, pid, 2),
            **settings.train.local_budget(first_round=False))
    after = Student.restore(ctx, settings, pid).model.state_dict()
    for key, value in student.model.state_dict().items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)

    kd = _context(pid)  # a student with a KD weight > 0 does move away from it
    fd_round(_msg(small_run.settings, 1, pid), kd)
    fd_round(_msg(small_run.settings, 2, pid, targets), kd)
    moved = Student.restore(kd, settings, pid).model.state_dict()
    assert any(not torch.equal(moved[k], after[k]) for k in after)


def test_kd_term_is_per_sample_and_skips_classes_nobody_holds():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    class_probs = torch.softmax(torch.randn(3, 3), dim=1)
    known = torch.tensor([True, True, False])
    alpha, t = 0.7, 2.0
    with torch.no_grad():
        out = model(x)
        ce = torch.nn.functional.cross_entropy(out, y)
        log_q = torch.log_softmax(out / t, dim=1)
        p = class_probs[y]
        kl = (p * (p.log() - log_q)).sum(1) * t**2
        expected = (1 - alpha) * ce + alpha * kl[known[y]].sum() / len(y)
    loss = regularized_train(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y,
                             loss=distill_loss(alpha, t), class_probs=class_probs, known=known,
                             epochs=1, batch_size=6, gen=torch.Generator().manual_seed(0))
    assert loss == pytest.approx(expected.item(), rel=1e-6)


# --- end to end, in process ------------------------------------------------------------------
@pytest.fixture(scope="module")
def fd_run(small_run: PreparedRun) -> PreparedRun:
    """`small_run` (same data) with conf/strategy/fd.yaml and its client settings."""
    return prepare_run(compose_config(
        [*SMALL, "strategy=fd", f"simulation.cache_dir={small_run.cfg.simulation.cache_dir}"]))


def test_fd_config_sets_its_client_training(fd_run, small_run):
    assert fd_run.data.cache_dir == small_run.data.cache_dir
    assert fd_run.settings.train.alpha == 0.1 and fd_run.settings.train.local_epochs == 4


def test_three_rounds_in_process_learn_well_above_chance(flower_ids, fd_run):
    accuracy, fake = drive(fd_run)
    n = len(fd_run.settings.assignment)
    assert sorted(accuracy) == [1, 2, 3] and len(accuracy[3]) == n
    assert np.mean(list(accuracy[3].values())) > 0.4  # 10 classes: chance is 0.1
    carried = ["targets.class_logits" in m.content["transfer"] for m in fake.pushed]
    assert carried == [False] * n + [True] * 2 * n
    assert {m.metadata.message_type for m in fake.pushed} == {"train.fd"}
