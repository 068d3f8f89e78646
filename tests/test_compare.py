"""`fedkd-compare` on hand-made run folders: arm statistics, partition check, files, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from fedkd.simulations.compare import (COLUMNS, arm_table, check_partitions, compare, final_epsilon,
                                      load_runs, main, rounds_to_target)
from fedkd.simulations.compare_labels import override_labels, short_override

UP, DOWN = 100, 300  # bytes per round
# seed -> per-round client accuracies (3 rounds, 2 clients); round means:
CURVES = {
    0: [[0.5, 0.7], [0.8, 0.9], [0.85, 0.95]],  # 0.60 0.85 0.90 -> target 0.9 in round 3
    1: [[0.9, 0.9], [0.9, 0.94], [0.9, 0.94]],  # 0.90 0.92 0.92 -> round 1
    2: [[0.6, 0.6], [0.7, 0.7], [0.8, 0.8]],    # 0.60 0.70 0.80 -> never
}


def make_run(root: Path, seed: int, strategy: str = "fedmd", curve: list[list[float]] | None = None,
             *, status: str = "ok", partition_hash: str = "h1", overrides: bool = True,
             epsilon_rows: list[float] | None = None, extra_overrides: tuple[str, ...] = (),
             **summary: object) -> Path:
    """A run folder as `fedkd-sim -m` leaves it: summary.json, metrics.parquet, overrides.

    `extra_overrides` follow the strategy, seed and partition seed in ``overrides.yaml``;
    `summary` adds or replaces summary keys (``top5_own_accuracy=0.8``).
    """
    run_dir = root / f"seed={seed},strategy={strategy}"
    (run_dir / ".hydra").mkdir(parents=True)
    curve = CURVES[seed] if curve is None else curve
    rows = []
    for r, accs in enumerate(curve, start=1):
        rows += [(r, -1, "wire", "bytes_up", UP), (r, -1, "wire", "bytes_down", DOWN)]
        rows += [(r, c, "cnn", "test-accuracy", a) for c, a in enumerate(accs)]
    for r, eps in enumerate(epsilon_rows or [], start=1):
        rows.append((r, -1, "wire", "epsilon", eps))
    pd.DataFrame(rows, columns=["round", "client", "model", "metric", "value"]).to_parquet(
        run_dir / "metrics.parquet")
    last = curve[-1]
    (run_dir / "summary.json").write_text(json.dumps({
        "strategy": strategy, "aggregator": "mean_probs" if strategy == "fedmd" else None,
        "dataset": "digits", "partition": "dirichlet", "num_clients": 2,
        "num_rounds": len(curve), "seed": seed, "partition_hash": partition_hash,
        "status": status, "error": "RuntimeError: boom" if status == "failed" else None,
        "final_mean_accuracy": float(np.mean(last)), "final_min_accuracy": float(np.min(last)),
        "bytes_up": UP * len(curve), "bytes_down": DOWN * len(curve), "wall_time_s": 10.0 + seed,
        **summary}))
    if overrides:
        lines = [f"strategy={strategy}", f"seed={seed}", "partition_seed=7", *extra_overrides]
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in lines))
    return run_dir


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """fedmd x 3 seeds (hand-chosen curves), local x 2 seeds (flat 0.5)."""
    root = tmp_path / "multirun" / "2025-01-01" / "12-00-00"
    for seed in CURVES:
        make_run(root, seed)
    for seed in (0, 1):
        make_run(root, seed, "local", [[0.5, 0.5]] * 3)
    return root


def row(table: pd.DataFrame, strategy: str) -> pd.Series:
    return table.set_index("strategy").loc[strategy]


def test_rounds_to_target_is_the_first_round_at_or_above():
    accuracy = pd.Series([0.5, 0.9, 0.95], index=[2, 4, 6])  # eval every 2 rounds
    assert rounds_to_target(accuracy, 0.9) == 4
    assert rounds_to_target(accuracy, 0.1) == 2
    assert math.isnan(rounds_to_target(accuracy, 0.99))
    assert math.isnan(rounds_to_target(pd.Series(dtype=float), 0.5))


def test_arm_statistics_over_seeds(sweep):
    runs = load_runs(sweep)
    assert len(runs) == 5
    table = arm_table(runs, target=0.9)

    fedmd = row(table, "fedmd")
    assert fedmd.arm == "partition_seed=7 strategy=fedmd"  # the seed is not part of the arm
    assert fedmd.seeds == 3 and fedmd.failed == 0
    assert fedmd.final_acc_mean == pytest.approx(np.mean([0.9, 0.92, 0.8]))
    assert fedmd.final_acc_std == pytest.approx(np.std([0.9, 0.92, 0.8], ddof=1))
    assert fedmd.worst_client_acc == pytest.approx(0.8)
    assert fedmd.best_acc == pytest.approx(np.mean([0.9, 0.92, 0.8]))
    assert fedmd.rounds_to_target == pytest.approx(2.0)  # rounds 3 and 1; seed 2 never
    assert fedmd.seeds_reached == 2
    assert fedmd.bytes_up == 3 * UP and fedmd.bytes_down == 3 * DOWN
    assert fedmd.bytes_per_round == UP + DOWN
    assert math.isnan(fedmd.epsilon)
    assert fedmd.partition_hash == "h1" and fedmd.partition_ok

    local = row(table, "local")
    assert math.isnan(local.rounds_to_target) and local.seeds_reached == 0
    assert local.wall_time_s == pytest.approx(10.5)
    assert list(table.strategy) == ["fedmd", "local"]  # final accuracy, descending
    ascending = arm_table(runs, 0.9, "final_acc_mean", ascending=True)
    assert list(ascending.strategy) == ["local", "fedmd"]


def test_epsilon_from_the_summary_else_the_last_metric_row(tmp_path):
    metrics = pd.DataFrame({"round": [1, 2, 2], "client": -1, "model": "wire",
                            "metric": "epsilon", "value": [0.5, 1.25, 1.25]})
    assert final_epsilon({"epsilon": 3.0}, metrics) == 3.0
    assert final_epsilon({}, metrics) == 1.25
    assert math.isnan(final_epsilon({}, metrics.assign(metric="test-accuracy")))
    assert math.isnan(final_epsilon({}, None))

    make_run(tmp_path, 0, "fedmd", epsilon_rows=[0.5, 1.0, 1.5])
    make_run(tmp_path, 1, "fedmd", epsilon_rows=[0.5, 1.0, 2.0])
    make_run(tmp_path, 2, "fedmd", epsilon=4.0)
    assert row(arm_table(load_runs(tmp_path)), "fedmd").epsilon == 4.0  # worst case over seeds


def test_failed_runs_are_counted_not_averaged(tmp_path, caplog):
    make_run(tmp_path, 0)
    make_run(tmp_path, 1)
    make_run(tmp_path, 2, status="failed", curve=[[0.1, 0.1]])
    make_run(tmp_path, 0, "local", status="failed")
    table = arm_table(load_runs(tmp_path))

    fedmd = row(table, "fedmd")
    assert fedmd.seeds == 2 and fedmd.failed == 1
    assert fedmd.final_acc_mean == pytest.approx(0.91)
    local = row(table, "local")  # every seed failed: listed, no numbers
    assert local.seeds == 0 and local.failed == 1 and math.isnan(local.final_acc_mean)

    paths = compare(tmp_path)
    markdown = paths["comparison.md"].read_text()
    assert "failed: `" in markdown and "RuntimeError: boom" in markdown
    assert "(excluded from the stats)" in caplog.text


def test_degraded_runs_are_averaged_and_flagged_interrupted_ones_excluded(tmp_path, caplog):
    make_run(tmp_path, 0)
    make_run(tmp_path, 1, status="degraded", status_reasons=["client 1 failed in 1 of 3 training "
                                                             "rounds: round 2"])
    make_run(tmp_path, 2, status="interrupted", status_reasons=["stopped by SIGINT after round 1"])
    make_run(tmp_path, 0, "local")
    make_run(tmp_path, 1, "local", status="weird")  # unknown: counted as failed
    runs = load_runs(tmp_path)
    assert sorted(runs.status) == ["degraded", "failed", "interrupted", "ok", "ok"]
    table = arm_table(runs)
    fedmd, local = row(table, "fedmd"), row(table, "local")
    assert fedmd.status == "interrupted" and (fedmd.seeds, fedmd.failed, fedmd.degraded) == (2, 1, 1)
    assert fedmd.final_acc_mean == pytest.approx(0.91)  # seeds 0 (ok) and 1 (degraded)
    assert local.status == "failed" and (local.seeds, local.failed, local.degraded) == (1, 1, 0)

    markdown = compare(tmp_path)["comparison.md"].read_text()
    assert "| **interrupted** | 2 | 1 | 1 |" in markdown and "| **failed** | 1 | 1 | 0 |" in markdown
    lines = [line for line in markdown.splitlines() if line.startswith("- ")]
    assert [line.split(":")[0] for line in lines] == ["- failed", "- interrupted", "- degraded"]
    assert lines[2].endswith(": client 1 failed in 1 of 3 training rounds: round 2")
    assert "stopped by SIGINT after round 1 (excluded from the stats)" in caplog.text


def test_strict_exits_1_when_a_run_is_not_ok(tmp_path, capsys):
    make_run(tmp_path, 0)
    make_run(tmp_path, 1)
    assert main([str(tmp_path), "--strict"]) == 0
    make_run(tmp_path, 2, status="degraded", status_reasons=["2 replies dropped as malformed in "
                                                             "round 1"])
    assert main([str(tmp_path)]) == 0  # flagged, not fatal
    assert main([str(tmp_path), "--strict"]) == 1
    assert "**degraded**" in capsys.readouterr().out


def test_partition_mismatch_is_flagged(tmp_path, caplog):
    make_run(tmp_path, 0, "fedmd")
    make_run(tmp_path, 1, "fedmd")
    make_run(tmp_path, 0, "local")
    make_run(tmp_path, 0, "fedavg", partition_hash="h2")
    table = arm_table(load_runs(tmp_path))
    assert dict(zip(table.strategy, table.partition_ok)) == {"fedmd": True, "local": True,
                                                            "fedavg": False}
    _, warnings = check_partitions(table)
    assert any("did not reproduce" in w for w in warnings)
    assert any("2 different partitions" in w and "fedavg" in w for w in warnings)

    paths = compare(tmp_path, out=tmp_path / "out")
    assert paths["comparison.md"].read_text().startswith("**WARNING:")
    assert "PARTITION MISMATCH" in caplog.text
    assert not pd.read_csv(paths["comparison.csv"]).partition_ok.all()


def test_seeds_of_one_arm_on_different_partitions_are_flagged(tmp_path):
    make_run(tmp_path, 0, partition_hash="h1")
    make_run(tmp_path, 1, partition_hash="h2")
    table = arm_table(load_runs(tmp_path))
    assert table.partition_hash[0] == "h1,h2" and not table.partition_ok[0]
    assert check_partitions(table)[1]


def test_arms_from_summary_fields_without_overrides(tmp_path):
    make_run(tmp_path, 0, "fedmd", overrides=False)
    make_run(tmp_path, 1, "fedmd", overrides=False)
    make_run(tmp_path, 0, "local", overrides=False)
    table = arm_table(load_runs(tmp_path))
    # only the fields that differ between runs name the arm
    assert sorted(table.arm) == ["strategy=fedmd aggregator=mean_probs", "strategy=local"]
    assert row(table, "fedmd").seeds == 2


def test_unreadable_files_are_skipped_with_a_warning(tmp_path, caplog):
    make_run(tmp_path, 0)
    (make_run(tmp_path, 1) / "metrics.parquet").write_text("not parquet")
    (make_run(tmp_path, 2) / "summary.json").write_text("{ broken")
    runs = load_runs(tmp_path)
    assert sorted(runs.seed) == [0, 1]  # seed 1 keeps its summary, loses its curve
    assert "unreadable" in caplog.text and "broken" not in set(runs.run)
    fedmd = row(arm_table(runs), "fedmd")
    assert fedmd.seeds == 2 and fedmd.seeds_reached == 1


def test_files_written_and_plots_not_blank(sweep, tmp_path):
    paths = compare(sweep, target=0.9, out=tmp_path / "cmp")
    assert {p.name for p in (tmp_path / "cmp").iterdir()} == {
        "comparison.csv", "comparison.md", "accuracy_vs_round.png", "accuracy_vs_bytes.png"}
    assert len(pd.read_csv(paths["comparison.csv"])) == 2
    markdown = paths["comparison.md"].read_text()
    assert "--target 0.9" in markdown and "WARNING" not in markdown
    assert "0.873 ± 0.064" in markdown and "2.0 (2/3)" in markdown and "- (0/2)" in markdown
    for name in ("accuracy_vs_round.png", "accuracy_vs_bytes.png"):
        image = matplotlib.image.imread(paths[name])
        assert image.shape[0] > 200 and image.std() > 0.05  # drawn, not one colour


def test_thousands_separators(tmp_path):
    make_run(tmp_path, 0, bytes_up=1_710_800)
    assert "| 1,710,800 |" in compare(tmp_path)["comparison.md"].read_text()


def test_cli(sweep, tmp_path, capsys):
    assert main([str(sweep), "--target", "0.85", "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "fedkd-compare" in printed and "| partition_seed=7 strategy=fedmd |" in printed
    assert str(tmp_path / "o" / "accuracy_vs_bytes.png") in printed


def test_cli_without_runs_exits_2_naming_the_path(tmp_path):
    script = Path(sys.executable).with_name("fedkd-compare")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "fedkd.simulations.compare"]
    done = subprocess.run([*command, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    assert str(tmp_path) in done.stderr and "no runs" in done.stderr


def test_top5_own_accuracy_over_seeds_nan_for_runs_without_it(tmp_path):
    for seed, top5 in zip(CURVES, (0.8, 0.9, 0.85)):
        make_run(tmp_path, seed, final_own_accuracy=top5 - 0.01, top5_own_accuracy=top5)
    make_run(tmp_path, 0, "local", [[0.5, 0.5]] * 3)  # an older run: no such keys
    make_run(tmp_path, 1, "local", [[0.5, 0.5]] * 3, top5_own_accuracy=None)  # no chunks
    table = arm_table(load_runs(tmp_path))

    fedmd = row(table, "fedmd")
    assert fedmd.top5_own_mean == pytest.approx(0.85)
    assert fedmd.top5_own_std == pytest.approx(np.std([0.8, 0.9, 0.85], ddof=1))
    local = row(table, "local")
    assert math.isnan(local.top5_own_mean) and math.isnan(local.top5_own_std)
    assert local.final_acc_mean == pytest.approx(0.5)  # the rest of the row is unchanged
    assert COLUMNS.index("top5_own_mean") == COLUMNS.index("final_acc_std") + 1
    by_top5 = arm_table(load_runs(tmp_path), sort_by="top5_own_mean", ascending=True)
    assert list(by_top5.strategy) == ["fedmd", "local"]  # NaN last

    paths = compare(tmp_path)
    csv = pd.read_csv(paths["comparison.csv"]).set_index("strategy")
    assert csv.loc["fedmd", "top5_own_mean"] == pytest.approx(0.85)
    assert math.isnan(csv.loc["local", "top5_own_std"])
    markdown = paths["comparison.md"].read_text()
    assert "| final accuracy | top-5 own-label |" in markdown
    assert "| 0.850 ± 0.050 |" in markdown and "| 0.500 ± 0.000 | - |" in markdown


def test_short_override_shows_file_paths_by_basename():
    assert short_override("dataset.path=/long/path/mnist_train.npz") == \
        "dataset.path=mnist_train.npz"
    assert short_override("+dataset.test_path='/a b/mnist_test.npz'") == \
        "+dataset.test_path=mnist_test.npz"
    assert short_override("paths.data_dir=data/mnist") == "paths.data_dir=mnist"  # key: a path
    assert short_override("out=./runs/a") == "out=a"  # the value says path
    assert short_override("model=cnn/small") == "model=cnn/small"  # a config-group choice
    assert short_override("dataset.path=mnist.npz") == "dataset.path=mnist.npz"
    assert short_override("strategy=fedmd") == "strategy=fedmd"


def test_override_labels_leave_out_shared_data_paths_and_stay_distinct():
    train, test = "dataset.path=/a/mnist_train.npz", "dataset.test_path=/a/mnist_test.npz"
    labels = override_labels(pd.Series([(train, test, "s=1"), (train, test, "s=2")]))
    assert list(labels) == ["s=1", "s=2"]
    with_plain = override_labels(pd.Series([(train, test, "s=1"), None]))  # None: no overrides
    assert with_plain[0] == "dataset.path=mnist_train.npz dataset.test_path=mnist_test.npz s=1"
    assert pd.isna(with_plain[1])  # a run without overrides does not share them: kept

    one = override_labels(pd.Series([(train, test), (train, test)]))  # nothing else: kept
    assert list(one) == ["dataset.path=mnist_train.npz dataset.test_path=mnist_test.npz"] * 2

    partly = override_labels(pd.Series([(train, test, "s=1"), (test, "s=1")]))  # not in all
    assert list(partly) == ["dataset.path=mnist_train.npz s=1", "s=1"]

    same_name = "dataset.path=/b/mnist_train.npz"  # another folder, the same file name
    clash = override_labels(pd.Series([(train, "s=1"), (same_name, "s=1"), ("s=2",)]))
    assert list(clash) == [f"{train} s=1", f"{same_name} s=1", "s=2"]


def test_arms_on_shared_data_files_are_labelled_without_paths(tmp_path):
    data = ("+experiment=fedgen_mnist", "dataset.path=/long/path/mnist_train.npz",
            "dataset.test_path=/long/path/mnist_test.npz")
    make_run(tmp_path, 0, "fedmd", extra_overrides=data)
    make_run(tmp_path, 1, "fedmd", extra_overrides=data)
    make_run(tmp_path, 0, "local", extra_overrides=data)
    table = arm_table(load_runs(tmp_path))
    assert dict(zip(table.arm, table.seeds)) == {
        "+experiment=fedgen_mnist partition_seed=7 strategy=fedmd": 2,
        "+experiment=fedgen_mnist partition_seed=7 strategy=local": 1}
    assert "/long/path" not in compare(tmp_path)["comparison.md"].read_text()


def test_runs_on_different_data_files_stay_different_arms(tmp_path):
    test = "dataset.test_path=/data/mnist_test.npz"
    for seed in (0, 1):
        make_run(tmp_path / "a", seed, extra_overrides=("dataset.path=/a/mnist_train.npz", test))
    make_run(tmp_path / "b", 0, extra_overrides=("dataset.path=/b/fmnist_train.npz", test))
    table = arm_table(load_runs(tmp_path))
    assert dict(zip(table.arm, table.seeds)) == {
        "dataset.path=mnist_train.npz partition_seed=7 strategy=fedmd": 2,
        "dataset.path=fmnist_train.npz partition_seed=7 strategy=fedmd": 1}

    make_run(tmp_path / "c", 0, extra_overrides=("dataset.path=/c/mnist_train.npz", test))
    table = arm_table(load_runs(tmp_path))  # two files named mnist_train.npz: full paths
    assert sorted(zip(table.arm, table.seeds)) == [
        ("dataset.path=/a/mnist_train.npz partition_seed=7 strategy=fedmd", 2),
        ("dataset.path=/c/mnist_train.npz partition_seed=7 strategy=fedmd", 1),
        ("dataset.path=fmnist_train.npz partition_seed=7 strategy=fedmd", 1)]


def test_a_sweep_over_the_partition_compares_hashes_per_data_setting(tmp_path):
    for alpha, digest in (("0.1", "h1"), ("1", "h2")):
        for strategy in ("fedmd", "fedavg"):
            make_run(tmp_path / alpha, 0, strategy, partition_hash=digest,
                     extra_overrides=(f"partition.partitioner.alpha={alpha}",))
    table = arm_table(load_runs(tmp_path))
    ok, warnings = check_partitions(table)
    assert ok.all() and warnings == []
    make_run(tmp_path / "again", 1, "local", partition_hash="h3",
             extra_overrides=("partition.partitioner.alpha=1",))
    table = arm_table(load_runs(tmp_path))
    ok, warnings = check_partitions(table)
    assert not ok[table.strategy == "local"].any()
    assert len(warnings) == 1 and "alpha=1" in warnings[0] and "did not reproduce" in warnings[0]
