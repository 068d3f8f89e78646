"""The audit of a run folder: ``students.pt`` written at the end of a run, ``fedkd-audit <run
dir>``, ``audit=true`` on a run (whose failure keeps the run's results), and the audit columns of
`fedkd-compare`.

Runs are driven in process (the real ClientApp behind a fake grid, as in tests/test_resume.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from fedkd.client.app import app as client_app
from fedkd.server import PreparedRun, compose_config, run_strategy
from fedkd.simulations import audit as audit_module
from fedkd.simulations.audit import AUDIT, STUDENTS, final_models_saver, main
from fedkd.simulations.compare import compare
from fedkd.simulations.results import Recorder
from fedkd.simulations.run import run
from tests.conftest import SMALL
from tests.helpers import FakeGrid
from tests.test_resume import Engine


def in_process(engine: Engine):
    """A runner: the configured strategy on a fake grid whose nodes run the real ClientApp; the
    final models are saved as `fedkd.simulations.launch.simulate` saves them."""

    def runner(prepared: PreparedRun, recorder: Recorder) -> None:
        def answer(msg):
            TaskIdentity.node_id = msg.metadata.dst_node_id
            try:
                return client_app(message=msg, context=engine.contexts[msg.metadata.dst_node_id])
            finally:
                TaskIdentity.node_id = 1

        grid = FakeGrid(list(engine.contexts), answer=answer)
        run_strategy(grid, prepared, [recorder.on_replies], recorder.on_server_metrics,
                     recorder.out_dir, on_result=final_models_saver(recorder.out_dir, prepared,
                                                                    engine.states))

    return runner


def _run(tmp: Path, name: str, *overrides: str) -> Path:
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # as flower_ids
    try:
        return _run_now(tmp, name, *overrides)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _run_now(tmp: Path, name: str, *overrides: str) -> Path:
    args = [*SMALL, "num_rounds=2", "simulation.poll_interval=0.001",
            "simulation.checkpoint_every=0", f"simulation.cache_dir={tmp / 'cache'}", *overrides]
    cfg = compose_config(args)
    run(cfg, tmp / name, runner=in_process(Engine(int(cfg.num_clients), base=100)))
    return tmp / name


@pytest.fixture(scope="module")
def fedmd_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("runs"), "fedmd")


def test_a_run_saves_every_final_student_loadable_with_weights_only(fedmd_run):
    saved = torch.load(fedmd_run / STUDENTS, weights_only=True)
    assert sorted(saved["students"]) == [0, 1, 2, 3]
    assert saved["global"] is None  # fedmd: no global model crosses the wire
    archs = json.loads((fedmd_run / "summary.json").read_text())["archs"]
    assert [saved["students"][p]["arch"] for p in range(4)] == archs
    assert all(isinstance(v, torch.Tensor) for e in saved["students"].values()
               for v in e["state"].values())


def test_fedkd_audit_writes_audit_json_and_the_summary_keys(fedmd_run):
    # Execute
    assert main([str(fedmd_run), "--seed", "3"]) == 0
    # Assert
    audit = json.loads((fedmd_run / AUDIT).read_text())
    student = audit["targets"]["student"]
    assert sorted(student["by_client"]) == ["0", "1", "2", "3"]
    for r in student["by_client"].values():
        assert r["members"] == r["nonmembers"] > 0
        assert 0.0 <= r["auc"] <= 1.0 and 0.0 <= r["tpr_at_fpr"] <= 1.0
    assert "public transfer rows" in audit["wire"]
    summary = json.loads((fedmd_run / "summary.json").read_text())
    assert summary["audit_auc_mean"] == pytest.approx(student["auc_mean"])
    assert summary["audit_tpr_at_fpr_mean"] == pytest.approx(student["tpr_at_fpr_mean"])
    assert summary["audit_error"] is None and summary["final_mean_accuracy"] is not None
    # the same seed draws the same rows: the same numbers
    assert main([str(fedmd_run), "--seed", "3"]) == 0
    assert json.loads((fedmd_run / AUDIT).read_text()) == audit


def test_fedkd_audit_refuses_a_folder_without_final_models_in_one_line(tmp_path, caplog):
    (tmp_path / "config.yaml").write_text("num_clients: 1\n")
    assert main([str(tmp_path)]) == 2
    assert f"no {STUDENTS}" in caplog.text
    assert main([str(tmp_path / "nothing")]) == 2
    assert main([str(tmp_path), "--fpr", "1.5"]) == 2
    assert "--fpr=1.5: must be a number in [0, 1)" in caplog.text
    assert main([str(tmp_path), "--limit", "0"]) == 2


def test_audit_true_audits_fedavg_students_and_the_global_model(tmp_path):
    folder = _run(tmp_path, "fedavg", "strategy=fedavg", "audit=true")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] in ("ok", "degraded")
    assert summary["audit_error"] is None
    assert 0.0 <= summary["audit_global_auc_mean"] <= 1.0
    audit = json.loads((folder / AUDIT).read_text())
    assert sorted(audit["targets"]) == ["global", "student"]
    assert "global model" in audit["wire"]


def test_a_failed_audit_keeps_the_runs_results(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the attack broke")

    monkeypatch.setattr(audit_module, "audit_run", broken)
    folder = _run(tmp_path, "run", "audit=true")  # no exception: the run succeeded
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["audit_error"] == "RuntimeError: the attack broke"
    assert summary["final_mean_accuracy"] is not None and summary["status"] in ("ok", "degraded")
    assert (folder / "metrics.parquet").is_file() and not (folder / AUDIT).exists()


def test_bad_audit_value_is_refused_before_any_data(tmp_path):
    from fedkd.errors import ConfigError

    with pytest.raises(ConfigError, match=r"audit='maybe': must be true or false"):
        run(compose_config([*SMALL, "audit=maybe", f"simulation.cache_dir={tmp_path}"]),
            tmp_path / "out", runner=lambda *_: pytest.fail("it ran"))
    assert not any(tmp_path.glob("*/meta.json"))


def test_fedkd_compare_shows_the_audit_beside_accuracy_and_bytes(fedmd_run, tmp_path):
    main([str(fedmd_run)])
    paths = compare(fedmd_run.parent, out=tmp_path)
    text = paths["comparison.md"].read_text()
    assert "audit AUC" in text and "TPR@1%FPR" in text
    summary = json.loads((fedmd_run / "summary.json").read_text())
    assert f"{summary['audit_auc_mean']:.3f}" in text
