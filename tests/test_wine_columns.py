"""Measured: wine (13 columns) with columns scaled up to x1000 trains as well as standardised.

Slow (two pooled trainings, no Flower): ``pytest -m slow tests/test_wine_columns.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedkd.server import compose_config
from fedkd.simulations.run import run

FACTORS = np.geomspace(1, 1000, 13)
"""Column i of wine is multiplied by FACTORS[i]: 1 .. 1000."""


def wine_csvs(folder: Path) -> dict[str, Path]:
    """sklearn's wine as two csv files: columns scaled by 1..1000, and standardised beforehand."""
    from sklearn.datasets import load_wine

    bunch = load_wine()
    x, y = bunch.data, bunch.target
    tables = {"scaled": x * FACTORS, "standardised": (x - x.mean(axis=0)) / x.std(axis=0)}
    paths = {}
    for name, table in tables.items():
        paths[name] = folder / f"wine_{name}.csv"
        frame = pd.DataFrame(table, columns=[f"f{i}" for i in range(x.shape[1])])
        frame.assign(label=y).to_csv(paths[name], index=False)
    return paths


def pooled_accuracy(csv: Path, out_dir: Path, *overrides: str) -> float:
    """Final test accuracy of the pooled (centralized) model with the default model and normalisation."""
    cfg = compose_config([f"simulation.cache_dir={out_dir / 'cache'}", "dataset=files",
                          f"dataset.path={csv}", "strategy=centralized", "partition=iid",
                          *overrides])
    summary = run(cfg, out_dir / csv.stem)
    return float(summary["final_mean_accuracy"])


@pytest.mark.slow
def test_scaled_columns_train_as_well_as_standardised(tmp_path: Path) -> None:
    csvs = wine_csvs(tmp_path)

    scaled = pooled_accuracy(csvs["scaled"], tmp_path)
    standardised = pooled_accuracy(csvs["standardised"], tmp_path)

    assert abs(scaled - standardised) <= 0.01, (scaled, standardised)
    assert standardised > 0.9
