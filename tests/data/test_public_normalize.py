"""Deployment's public set: normalised per column (``auto``) from the public rows alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedkd.data.cache import load_public
from fedkd.data.public import prepare_public, read_public_file
from fedkd.data.split import normalizer


def _public_csv(path: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4)) * [1, 1000, 10, 1] + [0, 5000, 0, 2]
    frame = pd.DataFrame(x, columns=["a", "b", "c", "d"]).assign(d=2.0, label=np.arange(50) % 3)
    frame.to_csv(path, index=False)
    return path


def test_server_public_set_is_standardised_per_column(tmp_path: Path) -> None:
    csv = _public_csv(tmp_path / "public.csv")

    info, node_data = prepare_public(str(csv), "auto", 3, tmp_path / "cache")

    public = load_public(info.cache_dir)
    np.testing.assert_allclose(public[:, :3].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(public[:, :3].std(axis=0), 1, atol=1e-5)
    assert np.all(public[:, 3] == 0)  # the constant column: shifted, scale 1
    assert node_data["normalize"] == "auto" and info.input_shape == (4,)


def test_node_rebuilds_the_servers_public_set(tmp_path: Path) -> None:
    csv = _public_csv(tmp_path / "public.csv")
    info, _ = prepare_public(str(csv), "auto", 3, tmp_path / "cache")

    raw = read_public_file(str(csv), "node config public-path")  # what a node reads
    mine = normalizer(raw, "auto")(raw)

    assert np.array_equal(mine, load_public(info.cache_dir))
