"""`benchmarks.communication`: runs become one tidy row each; means over seeds carry the byte
ratio and the accuracy gap against FedAvg without a codec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from benchmarks.communication import codec_label, collect, main, summarise


def _run(root: Path, name: str, strategy: str, codec: dict, seed: int, acc: float, up: int,
         down: int) -> None:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
        {"codec": codec, "distill": {"digest_epochs": 5}}))
    (run / "summary.json").write_text(json.dumps({
        "strategy": strategy, "seed": seed, "dataset": "digits", "status": "ok",
        "final_mean_accuracy": acc, "bytes_up": up, "bytes_down": down}))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    for seed, (a, b) in enumerate([(0.97, 0.96), (0.98, 0.96)]):
        _run(tmp_path, f"avg{seed}", "fedavg", {"name": "none"}, seed, a, 2_000_000, 4_000_000)
        _run(tmp_path, f"md{seed}", "fedmd", {"name": "topk", "k": 2}, seed, b, 200_000, 300_000)
    return tmp_path


def test_runs_are_rows_and_groups_have_ratio_and_gap(sweep):
    runs = collect([sweep])
    assert len(runs) == 4 and set(runs["codec"]) == {"none", "topk2"}
    assert runs.loc[runs.strategy == "fedmd", "bytes_total"].tolist() == [500_000, 500_000]
    table = summarise(runs, ["strategy", "codec"]).set_index("strategy")
    assert table.loc["fedmd", "bytes_ratio"] == pytest.approx(12.0)
    assert table.loc["fedmd", "accuracy_gap"] == pytest.approx(0.96 - 0.975)
    assert table.loc["fedavg", "seeds"] == 2


def test_codec_labels():
    assert codec_label(None) == "none" and codec_label({"name": "topk", "k": 3}) == "topk3"
    assert codec_label({"name": "hard_label", "temperature": 3.0}) == "hard_label"


def test_cli_writes_the_table_and_the_plot(sweep, tmp_path):
    main([str(sweep), "--by", "strategy,codec", "--csv", str(tmp_path / "t.csv"),
          "--plot", str(tmp_path / "p.png")])
    assert (tmp_path / "t.csv").read_text().startswith("strategy,codec,seeds")
    assert (tmp_path / "p.png").stat().st_size > 1000
