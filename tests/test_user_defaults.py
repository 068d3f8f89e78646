"""Defaults that work on a user's table: per-column normalisation, an MLP, clear partition errors.

All through `prepare_run` (no Ray, no Flower run): config errors stop there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedkd.data import load_public
from fedkd.errors import ConfigError
from fedkd.server import compose_config, prepare_run


def _table(path: Path, rows: int, seed: int = 0) -> Path:
    """A csv of 3 classes x 13 numeric columns, column scales from 1 to 1000."""
    rng = np.random.default_rng(seed)
    y = np.arange(rows) % 3
    x = rng.normal(size=(rows, 13)) + y[:, None] * 0.5
    x = x * np.geomspace(1, 1000, 13)
    pd.DataFrame(x, columns=[f"f{i}" for i in range(13)]).assign(label=y).to_csv(path, index=False)
    return path


def _compose(tmp_path: Path, csv: Path, *overrides: str):
    return compose_config([f"simulation.cache_dir={tmp_path / 'cache'}", "dataset=files",
                           f"dataset.path={csv}", *overrides])


def test_a_table_gets_an_mlp_and_per_column_normalisation(tmp_path: Path) -> None:
    csv = _table(tmp_path / "train.csv", 300)

    run = prepare_run(_compose(tmp_path, csv))

    assert run.archs == ["mlp"] * 10 and list(run.settings.archs) == ["mlp"]
    public = load_public(run.data.cache_dir)
    np.testing.assert_allclose(public.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(public.std(axis=0), 1, atol=1e-5)


def test_a_named_model_that_does_not_fit_a_table_says_which_does(tmp_path: Path) -> None:
    csv = _table(tmp_path / "train.csv", 300)

    with pytest.raises(ConfigError) as err:
        prepare_run(_compose(tmp_path, csv, "model=hetero"))

    message = str(err.value)
    assert "cannot be built for the vector input (13,)" in message and "\n" not in message
    assert message.endswith("use model=mlp (or model=auto)")


def test_too_few_rows_for_the_clients_names_the_counts(tmp_path: Path) -> None:
    csv = _table(tmp_path / "train.csv", 60)  # 12 test, 10 public, 38 private rows

    with pytest.raises(ConfigError, match=r"^partition: 10 clients x min_partition_size=5 needs 50 "
                                          r"private rows, but only 38 private rows .*num_clients"):
        prepare_run(_compose(tmp_path, csv))


def test_enough_rows_but_failed_dirichlet_draws_suggest_alpha(tmp_path: Path) -> None:
    csv = _table(tmp_path / "train.csv", 178)  # wine's size: 114 private rows

    with pytest.raises(ConfigError, match=r"needs 50 of the 114 private rows .*enough in total.*"
                                          r"\(alpha=0\.1\).*larger partition\.partitioner\.alpha"):
        prepare_run(_compose(tmp_path, csv, "partition.partitioner.alpha=0.1"))
