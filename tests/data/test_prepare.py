"""prepare_data: cache layout, reuse, determinism and loaders."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from fedkd.data import (
    DataInfo,
    fingerprint,
    load_client,
    load_private_pool,
    load_public,
    load_test,
    prepare_data,
)
from fedkd.data import prepare
from fedkd.errors import ConfigError
from tests.data.factories import DIGITS_CFG, DIRICHLET, IID


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> DataInfo:
    return prepare_data(DIGITS_CFG, DIRICHLET, 5, 0, tmp_path_factory.mktemp("cache"))


def test_sizes_match_the_reference_split(prepared: DataInfo) -> None:
    assert (prepared.num_test, prepared.num_public, sum(prepared.client_sizes)) == (540, 400, 857)
    assert prepared.num_classes == 10 and prepared.input_shape == (1, 8, 8)


def test_cache_holds_no_public_labels(prepared: DataInfo) -> None:
    cache = Path(prepared.cache_dir)

    with np.load(cache / "public.npz") as public:
        assert public.files == ["x"]
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        ["meta.json", "own_test.npz", "public.npz", "test.npz"]
        + [f"client_{i}.npz" for i in range(5)]
    )
    assert "public" not in json.loads((cache / "meta.json").read_text())["class_histograms"]


def test_loaders_agree_with_info(prepared: DataInfo) -> None:
    public = load_public(prepared.cache_dir)
    test_x, test_y = load_test(prepared.cache_dir)
    pool_x, pool_y = load_private_pool(prepared.cache_dir)

    assert fingerprint(public) == prepared.public_fingerprint
    assert public.min() == 0.0 and public.max() == 1.0  # minmax from the public set
    assert test_x.shape == (540, 1, 8, 8) and test_y.dtype == np.int64
    for i, size in enumerate(prepared.client_sizes):
        x, y = load_client(prepared.cache_dir, i)
        assert len(x) == len(y) == size
        assert np.bincount(y, minlength=10).tolist() == list(prepared.class_histograms[i])
    assert len(pool_x) == len(pool_y) == sum(prepared.client_sizes)


def test_load_client_out_of_range(prepared: DataInfo) -> None:
    with pytest.raises(ConfigError, match=r"partition_id=5 .* clients 0\.\.4"):
        load_client(prepared.cache_dir, 5)


def test_data_info_json_round_trip(prepared: DataInfo) -> None:
    assert DataInfo.from_dict(json.loads(json.dumps(prepared.to_dict()))) == prepared


def test_second_call_reuses_the_cache(prepared: DataInfo) -> None:
    root = Path(prepared.cache_dir).parent

    with mock.patch("fedkd.data.prepare.split_data") as split:
        again = prepare_data(DIGITS_CFG, DIRICHLET, 5, 0, root)

    split.assert_not_called()
    assert again == prepared


@pytest.mark.parametrize("partition", [IID, DIRICHLET], ids=["iid", "dirichlet"])
def test_same_seed_same_files_other_seed_other_hash(tmp_path: Path, partition: dict) -> None:
    a = prepare_data(DIGITS_CFG, partition, 4, 1, tmp_path / "a")
    b = prepare_data(DIGITS_CFG, partition, 4, 1, tmp_path / "b")
    c = prepare_data(DIGITS_CFG, partition, 4, 2, tmp_path / "a")

    assert a.partition_hash == b.partition_hash and a.public_fingerprint == b.public_fingerprint
    for name in ["public.npz", "test.npz", "client_3.npz"]:
        with np.load(Path(a.cache_dir) / name) as fa, np.load(Path(b.cache_dir) / name) as fb:
            assert all(np.array_equal(fa[k], fb[k]) for k in fa.files)
    assert c.partition_hash != a.partition_hash and c.cache_dir != a.cache_dir


def test_seed_in_partition_cfg_cannot_diverge_from_partition_seed(tmp_path: Path) -> None:
    a = prepare_data(DIGITS_CFG, {**DIRICHLET, "seed": 123}, 4, 1, tmp_path)
    b = prepare_data(DIGITS_CFG, {**DIRICHLET, "seed": 1}, 4, 1, tmp_path)

    assert a.partition_hash == b.partition_hash


def test_fingerprint_is_stable_and_shape_aware() -> None:
    x = np.arange(12, dtype=np.float64)

    assert fingerprint(x) == fingerprint(x.astype(np.float32)) == fingerprint(x.copy())
    assert fingerprint(x) != fingerprint(x.reshape(3, 4))
    assert fingerprint(x.reshape(3, 4)) == fingerprint(np.asfortranarray(x.reshape(3, 4)))
    assert fingerprint(x) == "0204df951007ea49"  # pinned: caches and logs depend on it


def test_files_source_cache_key_follows_file_changes(tmp_path: Path) -> None:
    file = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(file, x=rng.normal(size=(100, 3)), y=np.arange(100) % 2)
    cfg = {"source": {"_target_": "fedkd.data.sources.files", "path": str(file)},
           "test_fraction": 0.2, "public_size": 20, "normalize": "standard"}

    first = prepare_data(cfg, IID, 2, 0, tmp_path / "cache")
    np.savez(file, x=rng.normal(size=(100, 3)), y=np.arange(100) % 2)
    os.utime(file, ns=(1, 1))
    second = prepare_data(cfg, IID, 2, 0, tmp_path / "cache")

    assert first.cache_dir != second.cache_dir
    assert first.public_fingerprint != second.public_fingerprint


def test_lost_race_keeps_the_winners_files(tmp_path: Path) -> None:
    from fedkd.data import prepare as prep

    winner = prepare_data(DIGITS_CFG, IID, 2, 0, tmp_path)
    meta_before = (Path(winner.cache_dir) / "meta.json").read_text()
    info, arrays = prep._build(DIGITS_CFG, DIGITS_CFG["source"], IID, 2, 0, Path(winner.cache_dir))

    prep.write_atomically(Path(winner.cache_dir), arrays, info)

    assert (Path(winner.cache_dir) / "meta.json").read_text() == meta_before
    assert [p.name for p in tmp_path.iterdir()] == [Path(winner.cache_dir).name]


BAD_DATASET = {
    "no source": ({"test_fraction": 0.2}, r"dataset.source must .* '_target_'"),
    "source not RawData": ({"source": {"_target_": "builtins.dict"}}, r"must return RawData"),
    "unknown source": ({"source": {"_target_": "fedkd.data.sources.nope"}}, r"sources\.nope"),
    "normalize": ({**DIGITS_CFG, "normalize": "l2"}, r"dataset.normalize='l2'"),
    "public size": ({**DIGITS_CFG, "public_size": 5000}, r"dataset.public_size=5000"),
}


@pytest.mark.parametrize("case", BAD_DATASET)
def test_bad_dataset_config(tmp_path: Path, case: str) -> None:
    cfg, message = BAD_DATASET[case]

    with pytest.raises(ConfigError, match=message):
        prepare_data(cfg, IID, 2, 0, tmp_path)


def test_too_many_clients_names_the_private_count(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"num_clients=900 exceeds the 857 private samples"):
        prepare_data(DIGITS_CFG, IID, 900, 0, tmp_path)


def test_each_client_gets_an_own_label_test_chunk(prepared: DataInfo) -> None:
    from fedkd.data.cache import load_own_test

    _, test_y = load_test(prepared.cache_dir)
    chunks = [load_own_test(prepared.cache_dir, i) for i in range(len(prepared.client_sizes))]
    flat = np.concatenate(chunks)
    assert len(flat) == len(set(flat.tolist()))  # disjoint
    for hist, chunk in zip(prepared.class_histograms, chunks):
        held = {c for c, n in enumerate(hist) if n}
        counts = np.bincount(test_y[chunk], minlength=len(hist))
        assert {c for c, n in enumerate(counts) if n} == held
        assert all(counts[c] == (test_y == c).sum() // 5 for c in held)


def test_max_class_rows_caps_the_private_pool_per_label(tmp_path: Path) -> None:
    info = prepare_data({**DIGITS_CFG, "max_class_rows": 50}, IID, 5, 0, tmp_path)
    assert sum(info.client_sizes) == 500
    assert np.sum(info.class_histograms, axis=0).tolist() == [50] * 10
    with pytest.raises(ConfigError, match=r"dataset.max_class_rows=.*: must be an int >= 1 or null"):
        prepare_data({**DIGITS_CFG, "max_class_rows": 0}, IID, 5, 0, tmp_path / "x")


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:100])


def test_a_truncated_cache_file_is_rebuilt_once(tmp_path: Path, caplog) -> None:
    info = prepare_data(DIGITS_CFG, DIRICHLET, 5, 0, tmp_path)
    broken = Path(info.cache_dir) / "client_3.npz"
    _truncate(broken)

    with mock.patch("fedkd.data.prepare.split_data", wraps=prepare.split_data) as split:
        again = prepare_data(DIGITS_CFG, DIRICHLET, 5, 0, tmp_path)

    assert split.call_count == 1
    assert again == info
    assert len(load_client(info.cache_dir, 3)[0]) == info.client_sizes[3]
    assert f"prepared data file {broken} fails to load" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == [Path(info.cache_dir).name]  # nothing aside


def test_a_cache_file_that_fails_again_after_the_rebuild_is_reported(tmp_path: Path) -> None:
    info = prepare_data(DIGITS_CFG, DIRICHLET, 5, 0, tmp_path)
    broken = Path(info.cache_dir) / "client_3.npz"
    _truncate(broken)
    write = prepare.write_atomically

    def write_truncated(cache_dir, arrays, info):  # e.g. a disk that loses the file's tail
        write(cache_dir, arrays, info)
        _truncate(cache_dir / "client_3.npz")

    with mock.patch("fedkd.data.prepare.write_atomically", write_truncated), \
            mock.patch("fedkd.data.prepare.split_data", wraps=prepare.split_data) as split, \
            pytest.raises(ConfigError) as err:
        prepare_data(DIGITS_CFG, DIRICHLET, 5, 0, tmp_path)

    assert split.call_count == 1  # rebuilt once, not again and again
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"prepared data file {broken} fails to load even after it was "
                              "written again")


def test_a_cache_file_without_its_arrays_is_rebuilt(tmp_path: Path) -> None:
    info = prepare_data(DIGITS_CFG, DIRICHLET, 5, 0, tmp_path)
    np.savez(Path(info.cache_dir) / "test.npz", x=np.zeros(3))  # loads, but has no labels

    again = prepare_data(DIGITS_CFG, DIRICHLET, 5, 0, tmp_path)

    assert again == info and len(load_test(info.cache_dir)[1]) == info.num_test
