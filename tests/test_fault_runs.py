"""The ``faults`` config group in runs: composition, the summary's account of who misbehaved, and
(slow) a real simulation with Byzantine, crashing and corrupting clients."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from omegaconf import OmegaConf

from fedkd.errors import ConfigError
from fedkd.server import CONF_DIR, compose_config, prepare_run
from fedkd.simulations.faults import fault_plan, with_faults
from fedkd.simulations.results import Recorder
from fedkd.simulations.run import run
from tests.conftest import SMALL

OPTIONS = sorted(p.stem for p in (CONF_DIR / "faults").glob("*.yaml") if not p.stem.startswith("_"))


def _cfg(small_run, *overrides: str):
    return compose_config([*SMALL, f"simulation.cache_dir={small_run.cfg.simulation.cache_dir}",
                           *overrides])


def test_no_faults_by_default(small_run):
    cfg = _cfg(small_run)
    assert fault_plan(cfg) is None
    from fedkd.client.app import app

    assert with_faults(app, None) is app


@pytest.mark.parametrize("option", OPTIONS)
def test_every_faults_option_composes_and_plans(small_run, option):
    plan = fault_plan(_cfg(small_run, f"faults={option}", "num_clients=10"))
    if option == "none":
        assert plan is None
        return
    assert plan is not None and option in plan.clients and plan.honest


def test_a_bad_faults_value_is_a_config_error_before_anything_runs(small_run, tmp_path):
    cfg = _cfg(small_run, "faults=crash", "faults.crash.clients=1.5")
    with pytest.raises(ConfigError, match=r"faults.crash.clients=1.5"):
        run(cfg, tmp_path)


def test_faults_need_the_simulation(small_run):
    with pytest.raises(ConfigError, match="use faults=none"):
        fault_plan(_cfg(small_run, "strategy=centralized", "faults=crash"))


def test_byzantine_presets_sweep_every_attack_and_aggregator():
    for preset, clients in (("byzantine_1of5", 5), ("byzantine_2of10", 10)):
        raw = OmegaConf.load(CONF_DIR / "experiment" / f"{preset}.yaml")
        params = raw.hydra.sweeper.params
        attacks = params["faults.byzantine.attack"].split(",")
        assert set(attacks) == {"none", "random", "sign_flip", "confident_wrong", "label_flip",
                                "fixed_class", "scaled"}
        for name in params["aggregator"].split(","):
            assert (CONF_DIR / "aggregator" / f"{name}.yaml").is_file()
        cfg = compose_config([f"+experiment={preset}"])
        plan = fault_plan(cfg)
        assert cfg.num_clients == clients and len(plan.clients["byzantine"]) == clients // 5


def test_the_summary_names_who_misbehaved_and_the_honest_mean(small_run, tmp_path):
    cfg = _cfg(small_run, "faults=byzantine", "faults.byzantine.clients=[1]",
               "faults.crash.clients=[3]", "faults.crash.probability=0.5", "num_rounds=4")
    recorder = Recorder.for_run(prepare_run(cfg), tmp_path)
    for client, accuracy in enumerate((0.9, 0.1, 0.7, 0.5)):
        recorder.record(4, client, "test-accuracy", accuracy)
    summary = recorder.finish()
    plan = fault_plan(cfg)
    assert summary["faults"] == {"seed": 0, "byzantine": [1], "crash": [3],
                                 "crash_rounds": {"3": list(plan.rounds["crash"][3])},
                                 "attack": "confident_wrong", "claim": None}
    assert summary["honest_clients"] == [0, 2]
    assert summary["final_mean_accuracy_honest"] == pytest.approx(0.8)
    assert summary["final_mean_accuracy"] == pytest.approx(0.55)
    assert json.loads((tmp_path / "summary.json").read_text())["faults"] == summary["faults"]


def test_without_faults_the_honest_mean_is_the_mean(small_run, tmp_path):
    recorder = Recorder.for_run(prepare_run(_cfg(small_run)), tmp_path)
    for client in range(4):
        recorder.record(3, client, "test-accuracy", 0.2 * (client + 1))
    summary = recorder.finish()
    assert summary["faults"] is None and "honest_clients" not in summary
    assert summary["final_mean_accuracy_honest"] == summary["final_mean_accuracy"]


@pytest.mark.slow  # a Ray simulation (~2 min); the default suite keeps one
def test_a_simulation_with_byzantine_crashing_and_corrupting_clients(small_run, tmp_path):
    cfg = _cfg(small_run, "faults=byzantine", "faults.byzantine.clients=[1]",
               "faults.crash.clients=[2]", "faults.crash.probability=0.5",
               "faults.corrupt.clients=[3]", "faults.corrupt.probability=0.5",
               "aggregator=reputation", "faults.seed=3")
    plan = fault_plan(cfg)
    crashed, corrupted = plan.rounds["crash"][2], plan.rounds["corrupt"][3]
    assert crashed == (2,) and corrupted == (2,)  # faults.seed=3: round 2 only
    summary = run(cfg, tmp_path)

    assert summary["status"] == "degraded" and summary["last_round"] == 3
    assert summary["faults"]["byzantine"] == [1] and summary["faults"]["crash"] == [2]
    # a dropped reply is a round that client failed, as an error reply is
    assert summary["failed_rounds_by_client"] == {"2": list(crashed), "3": list(corrupted)}
    assert summary["replies_dropped"] == len(corrupted)
    assert summary["status_reasons"][0].startswith(f"client 2 failed in {len(crashed)} of 3")
    assert any("injected crash (partition 2" in r for r in summary["status_reasons"])
    assert summary["honest_clients"] == [0]
    assert summary["final_mean_accuracy_honest"] == summary["final_accuracy_by_client"]["0"]
    frame = pd.read_parquet(tmp_path / "metrics.parquet")
    anomaly = frame[frame.metric == "anomaly-score"]
    by_client = anomaly.groupby("client").value.mean()
    # the Byzantine teacher stands out (in round 2 it is one of two: the consensus is their mean)
    assert by_client[1] > 0.6 and by_client[1] > 2 * by_client.drop(1).max()
    dropped = frame[frame.metric == "replies-dropped"].groupby("round").value.sum()
    assert [r for r, n in dropped.items() if n] == list(corrupted)
