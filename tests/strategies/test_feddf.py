"""FedDF: the server maths (averaging, prefixes, distillation) and the strategy's hooks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy
from omegaconf import OmegaConf
from torch import nn

from fedkd.aggregation import mean_logits, mean_probs
from fedkd.errors import ConfigError
from fedkd.models import build_model
from fedkd.server import compose_config
from fedkd.server_distill import (
    average_states, checked_state, distill, join_models, kd_divergence, split_models,
    teacher_logits,
)
from fedkd.wire import message_bytes
from fedkd.simulations.results import Recorder
from fedkd.simulations.run import run
from fedkd.strategies.feddf import FedDF
from fedkd.strategies.fedmd import FedMD
from tests.conftest import SMALL, reply
from tests.helpers import FakeGrid, bound

NODES = (101, 102, 103, 104)  # node ids of partitions 0..3 in these tests (archs cnn_small, mlp, ...)


# --- free functions -----------------------------------------------------------------------------
def test_weighted_average_of_full_state_dicts_keeps_integer_buffers_integer():
    a = {"w": torch.tensor([1.0, 2.0]), "bn.running_var": torch.tensor([1.0]),
         "bn.num_batches_tracked": torch.tensor(4)}
    b = {"w": torch.tensor([5.0, 6.0]), "bn.running_var": torch.tensor([3.0]),
         "bn.num_batches_tracked": torch.tensor(9)}

    avg = average_states([a, b], weights=[1, 3])

    torch.testing.assert_close(avg["w"], torch.tensor([4.0, 5.0]))  # (1*1 + 3*5) / 4, (2 + 18) / 4
    torch.testing.assert_close(avg["bn.running_var"], torch.tensor([2.5]))
    assert avg["bn.num_batches_tracked"].dtype == torch.int64 and avg["bn.num_batches_tracked"] == 9
    torch.testing.assert_close(average_states([a, b], [0, 0])["w"], torch.tensor([3.0, 4.0]))


def test_average_of_one_real_model_with_batchnorm_is_that_model():
    torch.manual_seed(0)
    model = build_model({"_target_": "fedkd.models.CNN2d", "channels": [4]}, (1, 8, 8), 10)
    model.train()
    model(torch.randn(16, 1, 8, 8))  # moves the BatchNorm buffers away from their init
    state = model.state_dict()
    avg = average_states([state, state], [2.0, 5.0])
    assert avg.keys() == state.keys()
    for key in state:
        torch.testing.assert_close(avg[key], state[key])


def test_prefixing_round_trips_and_rejects_unprefixed_keys():
    models = {"cnn": {"a.weight": torch.ones(2, 3)}, "mlp": {"b.bias": torch.zeros(4)}}
    record = join_models(models)
    assert sorted(record.keys()) == ["cnn/a.weight", "mlp/b.bias"]
    split = split_models(record)
    assert sorted(split) == ["cnn", "mlp"] and list(split["cnn"].keys()) == ["a.weight"]
    np.testing.assert_array_equal(split["cnn"]["a.weight"].numpy(), np.ones((2, 3)))
    assert split_models(ArrayRecord()) == {}
    with pytest.raises(ValueError, match="<arch>"):
        split_models(ArrayRecord({"weight": Array(np.zeros(1))}))


@pytest.mark.parametrize("bad", ["missing key", "extra key", "shape", "nan", "int for float"])
def test_checked_state_refuses_weights_that_do_not_fit_the_architecture(bad):
    reference = {"w": torch.zeros(2, 2), "n": torch.tensor(0)}
    arrays = {"w": np.zeros((2, 2), np.float32), "n": np.array(3)}
    if bad == "missing key":
        del arrays["n"]
    elif bad == "extra key":
        arrays["z"] = np.zeros(1, np.float32)
    elif bad == "shape":
        arrays["w"] = np.zeros((2, 3), np.float32)
    elif bad == "nan":
        arrays["w"] = np.full((2, 2), np.nan, np.float32)
    else:
        arrays["w"] = np.zeros((2, 2), np.int64)
    with pytest.raises(ValueError):
        checked_state(ArrayRecord({k: Array(v) for k, v in arrays.items()}), reference)
    good = checked_state(ArrayRecord({"w": Array(np.ones((2, 2), np.float32)), "n": Array(np.array(3))}),
                         reference)
    assert good["n"].dtype == torch.int64 and good["w"].sum() == 4


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model({"_target_": "fedkd.models.MLP", "hidden": [16]}, (1, 8, 8), 10)


def test_server_distillation_reduces_kl_to_the_soft_targets_deterministically():
    x = torch.rand(128, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    soft = torch.from_numpy(mean_logits(teacher_logits([_mlp(1), _mlp(2)], x), temperature=3.0))
    students = [_mlp(3), _mlp(3)]
    before = kd_divergence(students[0], x, soft, 3.0)
    global_state = torch.random.get_rng_state()

    history = [distill(s, x, soft, temperature=3.0, epochs=20, lr=0.01, batch_size=32, seed=(0, 1))
               for s in students]

    assert kd_divergence(students[0], x, soft, 3.0) < 0.5 * before
    assert history[0] == history[1] and history[0][-1] < history[0][0]
    assert torch.equal(torch.random.get_rng_state(), global_state)  # seeded privately


# --- the strategy's hooks -----------------------------------------------------------------------
def _config(settings):
    return settings.to_config()


def _strategy(**kwargs) -> FedDF:
    return FedDF(aggregator=kwargs.pop("aggregator", mean_probs), min_available_nodes=1,
                 wait_for_nodes_s=0, **kwargs)


def _weights(small_run, pid: int, seed: int | None = None) -> dict[str, torch.Tensor]:
    name, spec = small_run.settings.arch_of(pid)
    torch.manual_seed(pid if seed is None else seed)
    return build_model(spec, (1, 8, 8), small_run.data.num_classes).state_dict()


def _train_reply(msg, small_run, pid, weights=None, num_examples=10):
    out = reply(msg, partition_id=pid, num_examples=num_examples, **{"train-loss": 0.5})
    if weights is not False:
        state = _weights(small_run, pid) if weights is None else weights
        out.content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in state.items()})
    return out


def _round_one(strategy, small_run, settings=None, weights=None):
    settings = settings or small_run.settings
    msgs = bound(strategy, settings).configure_train(1, ArrayRecord(), settings.to_config(), FakeGrid(list(NODES)))
    by_node = {m.metadata.dst_node_id: m for m in msgs}
    replies = [_train_reply(by_node[n], small_run, pid, (weights or {}).get(pid))
               for pid, n in enumerate(NODES)]
    return msgs, strategy.aggregate_train(1, replies)


def test_feddf_is_a_flower_strategy_and_names_bad_values():
    assert isinstance(FedDF(), Strategy)
    for kwargs in ({"aggregator": None}, {"server_epochs": -1}, {"server_lr": 0}):
        with pytest.raises(ConfigError):
            FedDF(**kwargs)


def test_round_one_sends_no_weights_and_learns_each_nodes_architecture(flower_ids, small_run):
    # FedDF's default 5 server epochs: after fewer, the BatchNorm statistics of the small CNN
    # (head_pool 2) have not settled and the eval-mode KD can still be above its start
    strategy = _strategy(server_epochs=5)
    losses = {}
    strategy.server_metric_sinks.append(lambda rnd, values: losses.update(values))
    msgs, (arrays, metrics) = _round_one(strategy, small_run)

    assert sorted(m.metadata.dst_node_id for m in msgs) == list(NODES)
    for msg in msgs:
        assert msg.metadata.message_type == "train" and "arrays" not in msg.content
        assert msg.content["config"]["server-round"] == 1 and "fedkd.settings" in msg.content["config"]
    models = split_models(arrays)
    assert sorted(models) == ["cnn_small", "mlp"]
    for pid, arch in enumerate(small_run.archs):
        assert list(models[arch].keys()) == list(_weights(small_run, pid).keys())
    assert metrics["train-loss"] == 0.5 and losses["server-kd-after"] < losses["server-kd-before"]


def test_round_two_sends_each_node_the_model_of_its_architecture(flower_ids, small_run):
    strategy = _strategy(server_epochs=1)
    _, (arrays, _) = _round_one(strategy, small_run)

    msgs = bound(strategy, small_run.settings).configure_train(2, arrays, small_run.settings.to_config(),
                                    FakeGrid([*NODES, 999]))  # 999 joined late: unknown

    by_node = {m.metadata.dst_node_id: m for m in msgs}
    assert "arrays" not in by_node[999].content
    expected = split_models(arrays)
    for pid, node in enumerate(NODES):
        sent = by_node[node].content["arrays"]
        model = expected[small_run.archs[pid]]
        assert list(sent.keys()) == list(model.keys())
        build_model(small_run.settings.arch_of(pid)[1], (1, 8, 8), 10).load_state_dict(
            sent.to_torch_state_dict())  # loads strictly into the node's architecture


def test_without_server_epochs_each_group_is_the_weighted_average(flower_ids, small_run):
    weights = {pid: _weights(small_run, pid, seed=10 + pid) for pid in range(4)}
    strategy = _strategy(server_epochs=0)
    msgs = bound(strategy, small_run.settings).configure_train(1, ArrayRecord(), small_run.settings.to_config(), FakeGrid(list(NODES)))
    by_node = {m.metadata.dst_node_id: m for m in msgs}
    sizes = [10, 30, 30, 10]
    replies = [_train_reply(by_node[n], small_run, p, weights[p], sizes[p]) for p, n in enumerate(NODES)]

    arrays, _ = strategy.aggregate_train(1, replies)

    cnn = split_models(arrays)["cnn_small"].to_torch_state_dict()
    expected = average_states([weights[0], weights[2]], [10, 30])
    for key in expected:
        torch.testing.assert_close(cnn[key], expected[key])


@pytest.mark.parametrize("bad", ["no arrays", "wrong arch", "wrong shape", "nan", "bad partition"])
def test_malformed_replies_are_dropped(flower_ids, small_run, bad):
    def attempt(min_replies):
        strategy = _strategy(server_epochs=1, min_replies=min_replies)
        msgs = bound(strategy, small_run.settings).configure_train(1, ArrayRecord(), small_run.settings.to_config(),
                                        FakeGrid([101, 102, 103]))
        good = [_train_reply(msgs[0], small_run, 0), _train_reply(msgs[2], small_run, 2)]
        state = dict(_weights(small_run, 1))
        first = next(iter(state))
        if bad == "wrong arch":
            state = _weights(small_run, 0)  # cnn weights from an mlp partition
        elif bad == "wrong shape":
            state[first] = state[first][:1]
        elif bad == "nan":
            state[first] = torch.full_like(state[first], float("nan"))
        broken = _train_reply(msgs[1], small_run, 1, False if bad == "no arrays" else state)
        if bad == "bad partition":
            broken.content["metrics"]["partition-id"] = 99
        return strategy.aggregate_train(1, [good[0], broken, good[1]])[0]

    assert sorted(split_models(attempt(2))) == ["cnn_small"]  # the mlp reply was the broken one
    assert attempt(3) is None  # below the minimum: previous models stay in place


def test_class_weighted_ensemble_gets_every_teachers_class_counts(flower_ids, small_run):
    seen = []

    def spy(logits, meta, temperature):
        seen.append(meta.class_counts)
        return mean_probs(logits, meta, temperature=temperature)

    settings = dataclasses.replace(small_run.settings, train=dataclasses.replace(
        small_run.settings.train, share_class_counts=True))
    strategy = _strategy(aggregator=spy, server_epochs=0)
    msgs = bound(strategy, settings).configure_train(1, ArrayRecord(), settings.to_config(),
                                                     FakeGrid(list(NODES)))
    replies = []
    for pid, msg in enumerate(msgs):
        out = _train_reply(msg, small_run, pid)
        if pid != 3:  # the last teacher leaves its counts out: dropped
            out.content["logits"] = ArrayRecord({"class_counts": Array(np.arange(10) + pid)})
        replies.append(out)

    arrays, _ = strategy.aggregate_train(1, replies)

    assert arrays is not None and len(seen) == 1
    np.testing.assert_array_equal(seen[0], np.stack([np.arange(10) + p for p in range(3)]))


def test_evaluate_sends_known_nodes_their_distilled_model(flower_ids, small_run):
    strategy = _strategy(server_epochs=1)
    _, (arrays, _) = _round_one(strategy, small_run)
    grid = FakeGrid([*NODES, 999])
    grid.busy_node_ids = lambda: {104}

    msgs = bound(strategy, small_run.settings).configure_evaluate(1, arrays, small_run.settings.to_config(), grid)

    assert sorted(m.metadata.dst_node_id for m in msgs) == [101, 102, 103]
    models = split_models(arrays)
    for msg in msgs:
        pid = NODES.index(msg.metadata.dst_node_id)
        assert msg.metadata.message_type == "evaluate"
        assert list(msg.content["arrays"].keys()) == list(models[small_run.archs[pid]].keys())
    answers = [reply(m, partition_id=0, **{"test-accuracy": acc}) for m, acc in zip(msgs, (0.5, 0.7, 0.9))]
    assert strategy.aggregate_evaluate(1, answers)["test-accuracy"] == pytest.approx(0.7)


@pytest.mark.parametrize(("num_rounds", "eval_every", "evaluated"), [
    (3, 2, [2, 3]),  # 3 is not a multiple of 2: the last round is evaluated all the same
    (5, 2, [2, 4, 5]),
    (4, 3, [3, 4]),
    (4, 2, [2, 4]),  # a multiple: evaluated once, not twice
    (2, 1, [1, 2]),
])
def test_evaluation_runs_every_eval_every_rounds_and_always_in_the_last(
        flower_ids, small_run, num_rounds, eval_every, evaluated):
    settings = dataclasses.replace(small_run.settings, num_rounds=num_rounds,
                                   train=dataclasses.replace(small_run.settings.train, eval_every=eval_every))
    strategy = _strategy(server_epochs=0)
    _, (arrays, _) = _round_one(strategy, small_run)
    bound(strategy, settings)

    sent = {rnd: strategy.configure_evaluate(rnd, arrays, settings.to_config(), FakeGrid(list(NODES)))
            for rnd in range(1, num_rounds + 1)}

    assert [rnd for rnd, msgs in sent.items() if msgs] == evaluated
    assert all(len(sent[rnd]) == len(NODES) for rnd in evaluated)


def test_teachers_are_never_taught_but_join_the_ensemble(flower_ids, small_run):
    settings = dataclasses.replace(small_run.settings, roles=["teacher", "student", "student", "student"])
    strategy = _strategy(server_epochs=0)  # no distillation: the group models are the averages
    _, (arrays, _) = _round_one(strategy, small_run, settings)
    train = bound(strategy, settings).configure_train(2, arrays, settings.to_config(), FakeGrid(list(NODES)))
    evaluate = bound(strategy, settings).configure_evaluate(2, arrays, settings.to_config(), FakeGrid(list(NODES)))

    assert "arrays" not in next(m for m in train if m.metadata.dst_node_id == 101).content
    own = next(m for m in evaluate if m.metadata.dst_node_id == 101).content["arrays"]
    torch.testing.assert_close(own.to_torch_state_dict(), dict(_weights(small_run, 0)))
    cnn = split_models(arrays)["cnn_small"].to_torch_state_dict()  # partition 2's, not the teacher's
    torch.testing.assert_close(cnn, dict(_weights(small_run, 2)))


def test_a_weights_reply_outweighs_a_logits_reply_by_the_model_minus_the_logits(flower_ids, small_run):
    n, c = small_run.data.num_public, small_run.data.num_classes
    fedmd = bound(FedMD(min_available_nodes=1), small_run.settings).configure_train(1, ArrayRecord(), small_run.settings.to_config(),
                                                           FakeGrid([101]))[0]
    feddf = bound(_strategy(), small_run.settings).configure_train(1, ArrayRecord(), small_run.settings.to_config(), FakeGrid([101]))[0]
    logits_reply = reply(fedmd, logits=np.zeros((n, c), np.float32), partition_id=1, **{"train-loss": 0.5})
    weights_reply = _train_reply(feddf, small_run, 1)

    state = _weights(small_run, 1)
    state_bytes = sum(v.numel() * v.element_size() for v in state.values())
    difference = message_bytes(weights_reply) - message_bytes(logits_reply)
    overhead = 160 * (len(state) + 1)  # a .npy header and a key per array
    assert abs(difference - (state_bytes - n * c * 4)) < overhead


# --- end to end (Ray) -------------------------------------------------------------------------
@pytest.mark.slow  # a second Ray simulation; tests/test_simulation.py keeps one in the default suite
def test_feddf_runs_end_to_end_and_uploads_every_clients_weights(tmp_path):
    waves = []
    original = Recorder.on_replies

    def spy(self, server_round, replies, stats):
        waves.append(stats)
        original(self, server_round, replies, stats)

    Recorder.on_replies = spy
    try:
        cfg = compose_config([*SMALL, f"simulation.cache_dir={tmp_path / 'cache'}", "strategy=feddf"])
        summary = run(cfg, tmp_path / "out")
    finally:
        Recorder.on_replies = original

    assert summary["status"] == "ok" and summary["final_mean_accuracy"] > 0.6  # chance is 0.1
    weights = sum(ArrayRecord(_state_of(cfg, arch)).count_bytes() for arch in summary["archs"])
    train = [w for w in waves if w.message_type == "train"]
    assert len(train) == 3 and all(w.replied == 4 and w.errors == 0 for w in train)
    for wave in train:  # every client's full state dict, plus its metrics
        assert 0 < wave.bytes_up - weights < 4 * 200
    assert summary["bytes_up"] == sum(w.bytes_up for w in waves)


def _state_of(cfg, arch: str) -> dict[str, torch.Tensor]:
    return build_model(OmegaConf.to_container(cfg.model.archs[arch]), (1, 8, 8), 10).state_dict()
