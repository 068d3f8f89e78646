"""A deployed node: what its replies carry, and its student surviving a lost Context.state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from fedkd.client import app as client_app
from fedkd.client import checkpoint
from fedkd.client.state import PROGRESS, STUDENT
from fedkd.errors import ConfigError
from fedkd.records import transfer_record
from tests.conftest import request
from tests.deploy.conftest import node_context


def _msg(settings, server_round: int, rows: np.ndarray, soft: np.ndarray | None = None):
    config = ConfigRecord({**settings.to_config(), "server-round": server_round})
    transfer = transfer_record(soft, rows if soft is not None else None, rows)
    return request(RecordDict({"config": config, "transfer": transfer}), dst=500,
                   server_round=server_round)


def _rounds(settings, ctx, rounds: range):
    rows = np.arange(settings.data["num_public"])
    soft = np.full((len(rows), 10), 0.1, dtype=np.float32)
    return [client_app.app(_msg(settings, r, rows, soft if r > 1 else None), ctx) for r in rounds]


def test_deployed_reply_reports_arch_role_and_compute_time(flower_ids, deployment, tmp_path):
    ctx = node_context(deployment.files, 2, arch="cnn_teacher", **{"checkpoint-dir": str(tmp_path)})

    (reply,) = _rounds(deployment.server.settings, ctx, range(1, 2))

    assert set(reply.content.keys()) == {"logits", "metrics", "node"}
    assert dict(reply.content["node"]) == {"arch": "cnn_teacher", "role": "student"}
    assert 0 < reply.content["metrics"]["compute-s"] < 60
    assert reply.content["metrics"]["num-examples"] == deployment.sim.data.client_sizes[2]


def test_simulated_reply_is_unchanged(flower_ids, small_run):
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                  run_config={})

    reply = client_app.app(_msg(small_run.settings, 1, np.arange(5)), ctx)

    assert set(reply.content.keys()) == {"logits", "metrics"}
    assert "compute-s" not in reply.content["metrics"]


def test_student_resumes_from_checkpoint_after_context_state_is_lost(
        flower_ids, deployment, tmp_path):
    settings = deployment.server.settings
    ctx = node_context(deployment.files, 1, **{"checkpoint-dir": str(tmp_path)})
    _rounds(settings, ctx, range(1, 3))
    path = tmp_path / "run-1" / "partition-1.pt"
    assert path.is_file() and not list(path.parent.glob(".*"))  # atomic: no temporary file left
    saved = checkpoint.load(ctx, "mlp")
    assert saved is not None and saved.rounds_done == 2
    in_state = ctx.state[STUDENT].to_torch_state_dict()
    assert all(torch.equal(in_state[k], v) for k, v in saved.model.items())

    restarted = node_context(deployment.files, 1, **{"checkpoint-dir": str(tmp_path)})  # empty
    (resumed,) = _rounds(settings, restarted, range(3, 4))
    (continued,) = _rounds(settings, ctx, range(3, 4))  # the same node without a restart
    fresh = node_context(deployment.files, 1, **{"checkpoint-dir": str(tmp_path / "none")})
    (started_over,) = _rounds(settings, fresh, range(3, 4))

    assert restarted.state[PROGRESS]["rounds-done"] == 3 == ctx.state[PROGRESS]["rounds-done"]
    logits = [r.content["logits"]["logits"].numpy() for r in (resumed, continued, started_over)]
    np.testing.assert_array_equal(logits[0], logits[1])  # resuming changes no number
    assert fresh.state[PROGRESS]["rounds-done"] == 1 and not np.array_equal(logits[0], logits[2])


def test_checkpoint_of_another_arch_is_refused(flower_ids, deployment, tmp_path):
    settings = deployment.server.settings
    ctx = node_context(deployment.files, 0, **{"checkpoint-dir": str(tmp_path)})
    _rounds(settings, ctx, range(1, 2))
    other = node_context(deployment.files, 0, arch="cnn_teacher", **{"checkpoint-dir": str(tmp_path)})

    with pytest.raises(ConfigError, match="holds a 'cnn_small' student, but this node now runs"):
        client_app.distill(_msg(settings, 2, np.arange(5)), other)


def test_checkpoints_are_keyed_by_run(flower_ids, deployment, tmp_path):
    ctx = node_context(deployment.files, 0, run_id=7, **{"checkpoint-dir": str(tmp_path)})
    _rounds(deployment.server.settings, ctx, range(1, 2))

    assert (tmp_path / "run-7" / "partition-0.pt").is_file()
    assert checkpoint.load(node_context(deployment.files, 0, run_id=8,
                                        **{"checkpoint-dir": str(tmp_path)}), "cnn_small") is None


def test_dpsgd_ledger_survives_a_node_restart(flower_ids, deployment, tmp_path):
    """privacy=dpsgd: the accountant is in the node's checkpoint, so a node restarted with an
    empty Context.state continues its ledger: the same epsilon and steps as without a restart."""
    from dataclasses import replace

    from fedkd.client.state import PRIVACY
    from fedkd.dpsgd import DPSettings, dp_archs

    dp = DPSettings(noise_multiplier=1.0, target_epsilon=None)
    base = deployment.server.settings
    settings = replace(base, dpsgd=dp, archs=dp_archs(dp, base.archs))
    ctx = node_context(deployment.files, 1, **{"checkpoint-dir": str(tmp_path)})
    _rounds(settings, ctx, range(1, 3))
    assert checkpoint.load(ctx, "mlp").privacy == dict(ctx.state[PRIVACY])

    restarted = node_context(deployment.files, 1, **{"checkpoint-dir": str(tmp_path)})  # empty
    (resumed,) = _rounds(settings, restarted, range(3, 4))
    (continued,) = _rounds(settings, ctx, range(3, 4))
    for key in ("dp-epsilon", "dp-steps", "dp-noise-multiplier", "dp-sample-rate"):
        assert resumed.content["metrics"][key] == continued.content["metrics"][key], key
    assert resumed.content["metrics"]["dp-steps"] > 0
