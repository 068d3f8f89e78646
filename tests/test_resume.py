"""Checkpoints and ``resume=``: a run stopped after a checkpoint and resumed ends with the numbers
of a run never stopped, bit for bit.

The default suite drives whole runs in process: `fedkd.simulations.run.run` with a runner that
puts the real ClientApp behind a fake grid (`tests.helpers.FakeGrid`) and keeps every client's
``Context`` the way Flower's engine does (`Engine`). A "kill" ends the process's work mid-round,
after a checkpoint; the resumed run gets new node ids, fresh contexts and a fresh recorder, as a
new process would. The Ray simulations, with a real SIGKILL, are in tests/test_resume_sigkill.py
(slow).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fedkd.client.app import app as client_app
from fedkd.errors import ConfigError
from fedkd.server import PreparedRun, compose_config, run_strategy
from fedkd.simulations.results import Recorder
from fedkd.simulations.resume import Checkpointing
from fedkd.simulations.run import run
from fedkd.strategies.checkpointed import (
    CHECKPOINT, Nodes, load_checkpoint, rng_state, save_atomic, set_rng_state,
)
from tests.conftest import SMALL
from tests.helpers import FakeGrid

WALL_TIME = {"elapsed_s"}  # metrics.parquet rows that measure time
SUMMARY_NOT_COMPARED = {"wall_time_s", "resumed_from_round"}


class Killed(BaseException):
    """The process dies here (nothing catches it but the test)."""


class Engine:
    """Stands in for Flower's engine (`fedkd.flower_compat.SimulationNodes`): one Context per
    node, node ids `base + partition id`."""

    def __init__(self, num_clients: int, base: int) -> None:
        self.contexts = {base + p: Context(run_id=1, node_id=base + p,
                                           node_config={"partition-id": p, "num-partitions": num_clients},
                                           state=RecordDict(), run_config={})
                         for p in range(num_clients)}

    def partition_of(self) -> dict[int, int]:
        return {n: int(c.node_config["partition-id"]) for n, c in self.contexts.items()}

    def states(self) -> dict[int, RecordDict]:
        return {int(c.node_config["partition-id"]): c.state for c in self.contexts.values()}

    def set_states(self, states: dict[int, RecordDict]) -> None:
        for context in self.contexts.values():
            context.state = states[int(context.node_config["partition-id"])]


def in_process(engine: Engine, kill_at: tuple[int, int] | None = None):
    """A runner: the configured strategy through `run_strategy` on a fake grid whose nodes run the
    real ClientApp; `kill_at=(round, n)` dies at the n-th message of that round."""

    def runner(prepared: PreparedRun, recorder: Recorder) -> None:
        seen: dict[int, int] = {}

        def answer(msg):
            server_round = int(msg.metadata.group_id or msg.content["config"]["server-round"])
            seen[server_round] = seen.get(server_round, 0) + 1
            if kill_at is not None and (server_round, seen[server_round]) >= kill_at:
                raise Killed(f"killed in round {server_round}")
            TaskIdentity.node_id = msg.metadata.dst_node_id
            try:
                return client_app(message=msg, context=engine.contexts[msg.metadata.dst_node_id])
            except Exception as err:  # noqa: BLE001 - Flower's engine answers with an error reply
                return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                     reason=f"{type(err)}:<'{err}'>"), reply_to=msg)
            finally:
                TaskIdentity.node_id = 1

        checkpoints = Checkpointing(prepared, recorder, engine=engine)
        grid = FakeGrid(list(engine.contexts), answer=answer)
        run_strategy(grid, prepared, [recorder.on_replies], recorder.on_server_metrics,
                     recorder.out_dir, checkpoints.plan)

    return runner


def _config(tmp: Path, overrides: list[str]) -> list[str]:
    return [*SMALL, "num_rounds=5", "distill.warmup_epochs=2", "simulation.checkpoint_every=2",
            "simulation.poll_interval=0.001", f"simulation.cache_dir={tmp / 'cache'}", *overrides]


def run_killed_and_resumed(tmp: Path, overrides: list[str], kill_at: tuple[int, int]
                           ) -> tuple[Path, Path, Engine, Engine]:
    """The same config run through, and killed at `kill_at` then resumed (other node ids)."""
    args = _config(tmp, overrides)
    cfg = compose_config(args)
    n = int(cfg.num_clients)
    whole = Engine(n, base=100)
    run(cfg, tmp / "whole", runner=in_process(whole))
    with pytest.raises(Killed):
        run(cfg, tmp / "killed", runner=in_process(Engine(n, base=300), kill_at=kill_at))
    (tmp / "killed" / "summary.json").unlink()  # SIGKILL writes none
    resumed = Engine(n, base=500)
    run(compose_config([*args, f"resume={tmp / 'killed'}"]), tmp / "ignored",
        runner=in_process(resumed))
    return tmp / "whole", tmp / "killed", whole, resumed


def assert_same_results(whole: Path, resumed: Path) -> None:
    """metrics.parquet (wall times aside) and summary.json (timing aside) are equal."""
    a, b = (pd.read_parquet(d / "metrics.parquet") for d in (whole, resumed))
    a, b = (f[~f.metric.isin(WALL_TIME)].reset_index(drop=True) for f in (a, b))
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (whole, resumed))
    assert {k: v for k, v in sa.items() if k not in SUMMARY_NOT_COMPARED} == \
        {k: v for k, v in sb.items() if k not in SUMMARY_NOT_COMPARED}


def assert_same_checkpoints(whole: Path, resumed: Path) -> None:
    """The last checkpoints of both runs (written after the resume) hold the same models, client
    states, strategy state and reply-guard bindings, byte for byte, and Python's RNG state
    (`fedkd.server.run_strategy` seeds it). numpy's and torch's global RNGs start from entropy in
    every process and fedkd draws nothing from them: two processes differ there."""
    a, b = (load_checkpoint(d / CHECKPOINT) for d in (whole, resumed))
    assert a["round"] == b["round"]
    for key in ("arrays", "strategy"):
        _assert_equal(a[key], b[key], key)
    _assert_equal(a["rng"]["python"], b["rng"]["python"], "rng.python")
    _assert_equal(a["parts"]["clients"], b["parts"]["clients"], "clients")
    _assert_equal(a["parts"]["reply-guard"], b["parts"]["reply-guard"], "reply-guard")


def _assert_equal(x: object, y: object, where: str) -> None:
    """Nested dicts, lists, tensors and plain values equal exactly (NaN equals NaN)."""
    if isinstance(x, dict):
        assert isinstance(y, dict) and set(x) == set(y), where
        for key in x:
            _assert_equal(x[key], y[key], f"{where}.{key}")
    elif isinstance(x, list | tuple):
        assert type(x) is type(y) and len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            _assert_equal(u, v, f"{where}[{i}]")
    elif isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
    else:
        assert x == y or (x != x and y != y), where


def assert_same_clients(a: Engine, b: Engine) -> None:
    """Every client's final Context.state is the same, tensor for tensor."""
    for pid, state in a.states().items():
        other = b.states()[pid]
        assert set(state.keys()) == set(other.keys())
        for name, record in state.items():
            if isinstance(record, ArrayRecord):
                for key in record:
                    assert record[key].numpy().tobytes() == other[name][key].numpy().tobytes(), \
                        (pid, name, key)
            else:
                assert dict(record) == dict(other[name]), (pid, name)


@pytest.mark.parametrize("overrides, kill_at", [
    pytest.param([], (3, 2), id="fedmd"),
    pytest.param(["strategy.flower.fraction_train=0.5", "aggregator=noisy_vote"], (5, 1),
                 id="fedmd-partial-noisy-vote", marks=pytest.mark.slow),
    pytest.param(["transfer=generator_blackbox", "transfer.steps=2", "transfer.size=40",
                  "transfer.batch_size=8", "transfer.directions=2"], (3, 6),
                 id="fedmd-blackbox-generator", marks=pytest.mark.slow),
    pytest.param(["strategy=feddf", "strategy.flower.server_epochs=1"], (3, 3), id="feddf", marks=pytest.mark.slow),
    pytest.param(["strategy=fedavg", "strategy.flower.fraction_train=0.5",
                  "strategy.client.local_epochs=1"], (4, 1), id="fedavg-partial"),
])
def test_a_killed_run_resumed_ends_bit_for_bit_like_one_never_stopped(
        tmp_path, flower_ids, overrides, kill_at):
    whole, killed, a, b = run_killed_and_resumed(tmp_path, overrides, kill_at)
    assert_same_results(whole, killed)
    assert_same_clients(a, b)
    assert_same_checkpoints(whole, killed)
    summary = json.loads((killed / "summary.json").read_text())
    last_checkpoint = 2 * ((kill_at[0] - 1) // 2)  # the last one before the kill
    assert summary["status"] == "ok" and summary["resumed_from_round"] == last_checkpoint
    assert not (tmp_path / "ignored").exists()  # the resumed run writes into the run's folder


@pytest.mark.slow  # the bit-for-bit test above stays in the default suite
def test_a_resume_that_changes_the_numbers_is_caught(tmp_path, flower_ids):
    """The comparison can fail: resuming without the clients' states (fresh students) differs."""
    args = _config(tmp_path, [])
    cfg = compose_config(args)
    run(cfg, tmp_path / "whole", runner=in_process(Engine(4, base=100)))
    with pytest.raises(Killed):
        run(cfg, tmp_path / "killed", runner=in_process(Engine(4, base=300), kill_at=(3, 1)))
    state = load_checkpoint(tmp_path / "killed" / CHECKPOINT)
    state["parts"]["clients"]["by_partition"] = {p: {} for p in range(4)}
    save_atomic(state, tmp_path / "killed" / CHECKPOINT)
    run(compose_config([*args, f"resume={tmp_path / 'killed'}"]), tmp_path / "x",
        runner=in_process(Engine(4, base=500)))
    with pytest.raises(AssertionError):
        assert_same_results(tmp_path / "whole", tmp_path / "killed")


# --- resume= is checked before anything runs -------------------------------------------------
@pytest.fixture
def finished_run(tmp_path):
    """A run folder as `run` leaves it (config.yaml), with a summary of the given status."""
    args = _config(tmp_path, [])
    folder = tmp_path / "run"
    folder.mkdir()
    from omegaconf import OmegaConf

    (folder / "config.yaml").write_text(OmegaConf.to_yaml(compose_config(args), resolve=True))
    return args, folder


def _refusal(args: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        run(compose_config(args), "unused", runner=lambda *_: pytest.fail("it ran"))
    assert "\n" not in str(err.value)
    return str(err.value)


def test_resume_refuses_other_overrides_in_one_line(finished_run):
    args, folder = finished_run
    message = _refusal([*args, "num_rounds=7", "seed=3", f"resume={folder}"])
    assert "num_rounds=7 (the run's: 5)" in message and "seed=3 (the run's: 0)" in message


def test_resume_refuses_a_finished_run_a_missing_folder_and_the_pooled_baseline(finished_run,
                                                                               tmp_path):
    args, folder = finished_run
    (folder / "summary.json").write_text(json.dumps({"status": "ok"}))
    assert "finished (status ok)" in _refusal([*args, f"resume={folder}"])
    assert "no run there" in _refusal([*args, f"resume={tmp_path / 'nowhere'}"])
    assert "no rounds to resume" in _refusal([*args, "strategy=centralized", f"resume={folder}"])


@pytest.mark.parametrize("every", ["-1", "1.5", "true", "abc"])
def test_checkpoint_every_must_be_a_whole_number_of_rounds(tmp_path, every):
    message = _refusal([*_config(tmp_path, []), f"simulation.checkpoint_every={every}"])
    assert message.startswith("simulation.checkpoint_every=")


# --- the pieces --------------------------------------------------------------------------------
def test_a_torn_temporary_file_never_replaces_a_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT
    save_atomic({"format": 1, "round": 2, "x": torch.arange(3)}, path)
    good = path.read_bytes()

    def torn(obj, file):  # writes half, then the process "dies"
        file.write(b"PK\x03\x04 half a checkpoint")
        raise Killed("mid-write")

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(Killed):
        save_atomic({"format": 1, "round": 4}, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]  # no temporary file left
    assert load_checkpoint(path)["round"] == 2


def test_a_damaged_checkpoint_is_named_in_one_line(tmp_path):
    path = tmp_path / CHECKPOINT
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=f"checkpoint {path} cannot be read"):
        load_checkpoint(path)
    save_atomic({"round": 1}, path)
    with pytest.raises(ConfigError, match="not a fedkd checkpoint"):
        load_checkpoint(path)


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    import random

    save_atomic({"rng": rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_records_round_trip_bit_for_bit():
    from fedkd.records import record_dict_from_state, record_dict_state

    records = RecordDict({
        "model": ArrayRecord(torch.nn.BatchNorm1d(3).state_dict()),
        "extra": ConfigRecord({"blob": b"\x00\x01", "none": ["a.b"], "x": 1.5, "flag": True}),
        "progress": MetricRecord({"rounds-done": 3, "list": [1.0, 2.5]}),
    })
    back = record_dict_from_state(record_dict_state(records))
    assert list(back.keys()) == list(records.keys())
    for key, array in records["model"].items():
        assert back["model"][key].numpy().tobytes() == array.numpy().tobytes()
        assert back["model"][key].dtype == array.dtype
    assert dict(back["extra"]) == dict(records["extra"])
    assert isinstance(back["progress"], MetricRecord) and dict(back["progress"]) == dict(records["progress"])


def test_node_keyed_state_follows_the_partition_to_its_new_node():
    before, after = Nodes({11: 0, 12: 1}), Nodes({21: 1, 22: 0})
    assert after.to_nodes(before.to_partitions({11: "a", 12: "b", 99: "gone"})) == {22: "a", 21: "b"}


def test_noisy_vote_privacy_ledger_resumes_to_the_last_bit():
    from fedkd.aggregation import NoisyVote

    vote, again = NoisyVote(sigma=2.0), NoisyVote(sigma=2.0)
    logits = np.random.default_rng(0).normal(size=(3, 7, 4)).astype(np.float32)
    for _ in range(3):
        vote(logits)
    again.load_state_dict(vote.state_dict())
    assert again.report() == vote.report()
    np.testing.assert_array_equal(again(logits), vote(logits))
    assert again.report() == vote.report()


def test_no_checkpoint_without_checkpoint_every(tmp_path, flower_ids):
    args = [*_config(tmp_path, []), "simulation.checkpoint_every=0", "num_rounds=2"]
    run(compose_config(args), tmp_path / "out", runner=in_process(Engine(4, base=100)))
    assert not (tmp_path / "out" / CHECKPOINT).exists()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["status"] == "ok"
    assert os.listdir(tmp_path / "out")  # results written as ever


def test_a_resumed_run_stays_in_its_arm_for_fedkd_compare():
    from fedkd.simulations.compare import _arm_overrides

    assert _arm_overrides(["seed=1", "resume=outputs/a", "strategy=feddf"]) == ("strategy=feddf",)


def test_engine_partitions_wait_for_the_node_stores_registered_just_after_the_nodes():
    """The ServerApp may see the nodes a moment before the engine registers their stores; the
    partition map must wait for them instead of coming back empty (a whoami wave to every node)."""
    import threading
    from types import SimpleNamespace

    from fedkd.flower_compat import SimulationNodes

    nodes = SimulationNodes()
    stores = {7: SimpleNamespace(node_config={"partition-id": 3}),
              9: SimpleNamespace(node_config={"partition-id": 0})}
    timer = threading.Timer(0.2, nodes._capture, args=(stores, 1))
    timer.start()
    assert nodes.known() == {7: 3, 9: 0}  # waited the 0.2 s
    timer.join()
    assert SimulationNodes().known(timeout=0.01) == {}  # never registered: empty, no error
