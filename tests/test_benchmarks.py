"""benchmarks.sim_vs_plain: the pure pieces (breakdown, argv, memory sampler), no simulation."""

from __future__ import annotations

import subprocess
import sys
import time

import pandas as pd
import pytest

from benchmarks import sim_vs_plain as svp


def test_breakdown_adds_up_to_the_extra_wall_time() -> None:
    elapsed = {1: 5.0, 2: 6.0, 3: 7.0}  # s since the Recorder started
    plain = {1: 1.0, 2: 1.5, 3: 2.0}  # s since run_plain started, at each round's end
    sim_wall = 0.3 + 7.0 + 1.2 + 0.5
    parts = svp.breakdown(elapsed, plain, sim_wall=sim_wall, recorder_at=0.3, finish_at=8.5)
    assert parts["startup_extra_s"] == pytest.approx(4.0)
    assert parts["sim_later_round_mean_s"] == pytest.approx(1.0)
    assert parts["plain_later_round_mean_s"] == pytest.approx(0.5)
    assert parts["per_round_extra_s"] == pytest.approx(0.5)
    assert parts["rounds_extra_s"] == pytest.approx(1.0)
    assert parts["teardown_s"] == pytest.approx(1.2)
    assert parts["write_results_s"] == pytest.approx(0.5)
    assert parts["extra_total_s"] == pytest.approx(sim_wall - plain[3])


def test_breakdown_with_sparse_evaluation_rounds() -> None:
    elapsed = {2: 6.0, 4: 8.0}  # eval_every=2: elapsed rows only in rounds 2 and 4
    plain = {1: 1.0, 2: 2.0, 3: 2.5, 4: 3.0}
    parts = svp.breakdown(elapsed, plain, sim_wall=10.0, recorder_at=0.0, finish_at=9.0)
    assert parts["startup_extra_s"] == pytest.approx(4.0)
    assert parts["per_round_extra_s"] == pytest.approx(0.5)
    assert parts["rounds_extra_s"] == pytest.approx(1.0)
    assert parts["extra_total_s"] == pytest.approx(10.0 - plain[4])


def test_elapsed_rounds_reads_only_the_wire_rows() -> None:
    frame = pd.DataFrame(
        [(1, -1, "wire", "elapsed_s", 4.0), (1, 0, "mlp", "test-accuracy", 0.5),
         (1, -1, "wire", "bytes_up", 10.0), (2, -1, "wire", "elapsed_s", 4.5)],
        columns=["round", "client", "model", "metric", "value"])
    assert svp.elapsed_rounds(frame) == {1: 4.0, 2: 4.5}


def test_parse_args_splits_options_and_overrides() -> None:
    assert svp.parse_args(["num_rounds=3", "--json", "x.json", "seed=1"]) == (
        {"json": "x.json"}, ["num_rounds=3", "seed=1"])
    assert svp.parse_args(["--json=y.json"]) == ({"json": "y.json"}, [])
    assert svp.parse_args(["--flower-dispatch", "seed=1", "--repeat", "3"]) == (
        {"flower-dispatch": "1", "repeat": "3"}, ["seed=1"])


def test_repeated_takes_the_median_and_the_best_walls() -> None:
    runs = [{"ratio": r, "plain_wall_s": p, "sim_wall_s": s, "loadavg_1min": [1, 1]}
            for r, p, s in [(2.0, 10.0, 20.0), (1.2, 12.0, 14.4), (1.5, 11.0, 16.5)]]
    out = svp.repeated(runs)
    assert out["median_ratio"] == 1.5
    assert out["best_ratio"] == pytest.approx(14.4 / 10.0, abs=1e-3)
    with pytest.raises(SystemExit):
        svp.parse_args(["--nope"])


def test_tree_memory_samples_this_process_and_its_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        with svp.TreeMemory(interval=0.05, full_every=0.2) as mem:
            deadline = time.monotonic() + 60  # waits on the sampler, not a fixed time
            while mem.samples < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert child.pid in {p.pid for p in mem.processes()}
    finally:
        child.kill()
        child.wait()
    result = mem.result()
    assert result["samples"] >= 3
    assert result["max_processes"] >= 2
    assert result["peak_rss_gib"] > 0
    assert 0 < result["peak_main_rss_gib"] <= result["peak_rss_gib"]
    if result["peak_uss_gib"] is not None:
        assert result["peak_uss_gib"] <= result["peak_rss_gib"]


def test_tree_memory_finds_reparented_ray_processes_by_token() -> None:
    mem = svp.TreeMemory(since=time.time() - 1)
    # the shell exits at once: its "raylet" child is re-parented, but inherits our token
    script = f"{sys.executable} -c 'import time; time.sleep(3)' raylet >/dev/null 2>&1 & echo $!"
    pid = int(subprocess.run(["sh", "-c", script], capture_output=True, text=True).stdout)
    try:
        time.sleep(0.2)
        assert pid in {p.pid for p in mem.processes()}
    finally:
        svp.psutil.Process(pid).kill()


def test_accuracy_history_matches_the_plain_loop_shape() -> None:
    frame = pd.DataFrame(
        [(1, 0, "a", "test-accuracy", 0.5), (1, 1, "b", "test-accuracy", 0.25),
         (1, 0, "a", "train-loss", 2.0), (2, 0, "a", "test-accuracy", 0.75)],
        columns=["round", "client", "model", "metric", "value"])
    assert svp.accuracy_history(frame) == {1: {0: 0.5, 1: 0.25}, 2: {0: 0.75}}


def test_last_accuracies_take_each_clients_last_report_under_partial_participation() -> None:
    history = {1: {0: 0.5, 1: 0.6}, 2: {1: 0.7, 2: 0.4}, 3: {0: 0.8}}  # round -> client -> acc
    assert svp.last_accuracies(history) == {0: 0.8, 1: 0.7, 2: 0.4}


def test_phase_totals_sum_each_phase_over_clients_and_rounds() -> None:
    frame = pd.DataFrame(
        [(1, 0, "m", "time-digest-s", 0.5), (1, 1, "m", "time-digest-s", 0.25),
         (2, 0, "m", "time-restore-s", 0.125), (2, 0, "m", "test-accuracy", 0.9)],
        columns=["round", "client", "model", "metric", "value"])
    totals = svp.phase_totals(frame)
    assert totals == {"restore": 0.125, "digest": 0.75, "revisit": 0.0, "logits": 0.0,
                      "evaluate": 0.0, "save": 0.0}


def test_phase_table_splits_the_wall_time() -> None:
    phases = {p: 1.0 for p in ("restore", "digest", "revisit", "logits", "evaluate", "save")}
    r = {"phases": {"plain": {**phases, "restore": 0.0, "save": 0.0}, "simulation": phases},
         "workers": 2, "plain_wall_s": 5.0, "sim_wall_s": 10.0}
    lines = "\n".join(svp.phase_table(r))
    assert "sum" in lines and "4.00" in lines and "6.00" in lines
    assert "outside           1.00        7.00" in lines  # 5 - 4; 10 - 6 / 2


def test_timed_hooks_leave_the_runs_config_checks_working() -> None:
    """The benchmark times ray.init through a wrapper; the backend check reads its options."""
    from fedkd.server import compose_config
    from fedkd.simulations.launch import check_backend

    cfg = compose_config(["simulation.ray_init.num_cpus=2"])
    with svp.timed_hooks({}):
        check_backend(cfg)
