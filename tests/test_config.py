"""The Hydra config in conf/: every group option composes, instantiates and prepares a run."""

from __future__ import annotations

from collections import Counter
from dataclasses import fields
from pathlib import Path

import hydra.utils
import numpy as np
import pytest
import torch
from flwr.serverapp.strategy import Strategy
from omegaconf import OmegaConf

from fedkd.aggregation import TeacherMeta, answered_rows
from fedkd.settings import TrainSettings
from fedkd.errors import ConfigError
from fedkd.models import build_model, resolve_model
from fedkd.server import CONF_DIR, PreparedRun, compose_config, prepare_run

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml"))
                and p.name != "experiment")  # presets (`+experiment=...`): tests/test_presets.py
OPTIONS = [(group, p.stem) for group in GROUPS for p in sorted((CONF_DIR / group).glob("*.yaml"))
           if not p.stem.startswith("_")]  # `_base.yaml`: shared by the options, not one itself


def options(group: str) -> list[str]:
    return [name for g, name in OPTIONS if g == group]


MNIST1D_SMALL = ["dataset=mnist1d", "dataset.source.num_samples=600", "dataset.public_size=100"]
"""MNIST-1D small enough to generate and split in a fraction of a second."""

MODEL_DATASETS = {
    "auto": ["digits", "mnist1d"],  # the default: the families follow the input (tests/models/test_auto.py)
    "cnn": ["digits"],
    "hetero": ["digits"],
    "hetero_cnn": ["digits"],
    "mlp": ["digits", "mnist1d"],
    "hetero1d": ["mnist1d"],
    "teachers": ["digits"],
    "zoo": ["digits"],  # also MNIST 28x28 (tests/models/test_zoo.py)
}
"""Model option -> the data sets its architectures are meant for."""


@pytest.fixture(scope="module")
def npz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small labelled .npz: 300 single-channel 8x8 images, 10 balanced classes."""
    path = tmp_path_factory.mktemp("files") / "train.npz"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 1, 8, 8)).astype(np.float32)
    y = np.arange(300) % 10
    np.savez(path, x=x, y=y)
    return path


def compose(tmp_path: Path, *overrides: str):
    return compose_config([f"simulation.cache_dir={tmp_path / 'cache'}", *overrides])


def test_expected_groups_exist() -> None:
    assert {"dataset", "partition", "model", "strategy", "aggregator", "distill", "simulation"} <= set(GROUPS)
    assert {"digits", "files", "hub", "mnist1d"} <= set(options("dataset"))
    assert {"fedmd", "fedavg", "local"} <= set(options("strategy"))


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_resolves(tmp_path: Path, npz_file: Path, group: str, option: str) -> None:
    extra = {("dataset", "files"): [f"dataset.path={npz_file}"],
             ("dataset", "nodes"): ["dataset.public=digits"]}.get((group, option), [])

    cfg = compose(tmp_path, f"{group}={option}", *extra)
    resolved = OmegaConf.to_container(cfg, resolve=True)

    assert resolved[group] is not None
    if group in ("dataset", "partition", "strategy"):
        assert resolved[group]["name"] == option
    assert resolved["simulation"]["cache_dir"] == str(tmp_path / "cache")


def test_strategies_share_one_base() -> None:
    base = OmegaConf.load(CONF_DIR / "strategy" / "_base.yaml")
    for name in options("strategy"):
        raw = OmegaConf.load(CONF_DIR / "strategy" / f"{name}.yaml")
        if raw.flower is None:  # centralized: no Flower strategy, no shared runner
            continue
        assert list(raw.defaults) == ["_base", "_self_"], name
        assert "runner" not in raw, name
        assert not set(raw.flower) & {"fraction_train", "min_train_nodes"}, name
        cfg = compose_config([f"strategy={name}"])
        assert cfg.strategy.runner == base.runner and cfg.strategy.flower.min_train_nodes == 2, name


@pytest.mark.parametrize("option", options("strategy"))
def test_strategy_instantiates(tmp_path: Path, option: str) -> None:
    cfg = compose(tmp_path, f"strategy={option}")

    runner = hydra.utils.instantiate(cfg.strategy.runner)

    assert callable(runner)
    assert isinstance(cfg.strategy.homogeneous, bool)
    if cfg.strategy.flower is not None:
        strategy = hydra.utils.instantiate(cfg.strategy.flower)
        assert isinstance(strategy, Strategy), type(strategy)


@pytest.mark.parametrize("option", options("aggregator"))
def test_aggregator_maps_logits_to_probs(tmp_path: Path, option: str) -> None:
    cfg = compose(tmp_path, f"aggregator={option}")
    k, n, c = 3, 7, 10
    logits = np.random.default_rng(0).normal(size=(k, n, c)).astype(np.float32)
    meta = TeacherMeta(num_examples=np.array([10, 20, 30]), partition_ids=np.arange(k),
                       class_counts=np.full((k, c), 2))

    aggregator = hydra.utils.instantiate(cfg.aggregator)
    probs = aggregator(logits, meta, temperature=3.0)

    assert callable(aggregator)
    assert probs.shape == (n, c)
    answered = answered_rows(probs)  # confident_vote leaves rows unanswered: NaN throughout
    assert np.isnan(probs[~answered]).all()
    assert np.all(probs[answered] >= 0)
    np.testing.assert_allclose(probs[answered].sum(axis=1), 1.0, rtol=1e-5)


def test_every_model_option_has_a_dataset() -> None:
    assert set(MODEL_DATASETS) == set(options("model"))


@pytest.mark.parametrize(
    ("model", "dataset"),
    [(m, d) for m, ds in MODEL_DATASETS.items() for d in ds],
)
def test_model_option_builds_every_arch(tmp_path: Path, model: str, dataset: str) -> None:
    extra = MNIST1D_SMALL if dataset == "mnist1d" else [f"dataset={dataset}"]
    cfg = compose(tmp_path, f"model={model}", *extra)
    raw = hydra.utils.instantiate(cfg.dataset.source)
    resolved = resolve_model(OmegaConf.to_container(cfg.model, resolve=True), raw.input_shape,
                             raw.num_classes)  # model=auto: the archs for this input
    archs = resolved["archs"]

    for name, spec in archs.items():
        net = build_model(spec, tuple(raw.input_shape), raw.num_classes)
        out = net(torch.zeros(4, *raw.input_shape))
        assert out.shape == (4, raw.num_classes), name
    assert set(resolved["cycle"]) <= set(archs)


def _check_run(run: PreparedRun, num_clients: int) -> None:
    assert len(run.archs) == num_clients
    assert len(run.data.client_sizes) == num_clients and min(run.data.client_sizes) > 0
    assert set(run.param_counts) == set(run.archs) and min(run.param_counts.values()) > 0
    assert Path(run.data.cache_dir).is_dir()
    assert isinstance(run.settings.train, TrainSettings)


def test_prepare_default(tmp_path: Path) -> None:
    run = prepare_run(compose(tmp_path))

    _check_run(run, 10)
    assert run.data.num_classes == 10 and tuple(run.data.input_shape) == (1, 8, 8)
    assert run.archs == ["cnn_small", "cnn_deep"] * 5
    assert Path(run.data.cache_dir).is_relative_to(tmp_path / "cache")


def test_prepare_mnist1d_hetero1d(tmp_path: Path) -> None:
    run = prepare_run(compose(tmp_path, *MNIST1D_SMALL, "model=hetero1d"))

    _check_run(run, 10)
    assert tuple(run.data.input_shape) == (1, 40) and run.data.num_public == 100
    assert Counter(run.archs) == {"cnn1d": 5, "mlp": 5}


def test_prepare_iid(tmp_path: Path) -> None:
    run = prepare_run(compose(tmp_path, "partition=iid"))

    _check_run(run, 10)
    assert max(run.data.client_sizes) - min(run.data.client_sizes) <= 1


def test_prepare_pathological(tmp_path: Path) -> None:
    cfg = compose(tmp_path, "partition=pathological")
    run = prepare_run(cfg)

    _check_run(run, 10)
    per_client = cfg.partition.partitioner.num_classes_per_partition
    assert all(sum(1 for n in hist if n) <= per_client for hist in run.data.class_histograms)


def test_prepare_fedavg_gives_everyone_one_arch(tmp_path: Path) -> None:
    cfg = compose(tmp_path, "strategy=fedavg")
    run = prepare_run(cfg)

    _check_run(run, 10)
    assert set(run.archs) == {"cnn_small"}  # the first of the cycle (model=auto on digits: hetero_cnn's)
    assert len(run.settings.archs) == 1
    # the strategy's `client` delta overrides distill.* for its clients only
    assert run.settings.train.local_epochs == cfg.strategy.client.local_epochs == 4
    assert prepare_run(compose(tmp_path)).settings.train.local_epochs == cfg.distill.local_epochs


def test_fedavg_clients_never_share_class_counts(tmp_path: Path) -> None:
    """Flower's FedAvg takes one ArrayRecord per reply: no counts, even under class_weighted."""
    fedavg = prepare_run(compose(tmp_path, "strategy=fedavg", "aggregator=class_weighted"))
    feddf = prepare_run(compose(tmp_path, "strategy=feddf", "aggregator=class_weighted"))
    assert not fedavg.settings.train.share_class_counts and feddf.settings.train.share_class_counts


def test_prepare_files_npz_with_cnn(tmp_path: Path, npz_file: Path) -> None:
    run = prepare_run(compose(tmp_path, "dataset=files", f"dataset.path={npz_file}", "model=cnn"))

    _check_run(run, 10)
    assert tuple(run.data.input_shape) == (1, 8, 8) and run.data.num_classes == 10
    assert set(run.archs) == {"cnn_small"}
    assert run.data.num_test + run.data.num_public + sum(run.data.client_sizes) == 300


def test_distill_values_make_train_settings(tmp_path: Path) -> None:
    distill = OmegaConf.to_container(compose(tmp_path).distill, resolve=True)

    train = TrainSettings(**distill)

    assert set(distill) <= {f.name for f in fields(TrainSettings)}
    for key, value in distill.items():
        assert getattr(train, key) == value, key


def test_unknown_distill_key_names_allowed_keys(tmp_path: Path) -> None:
    cfg = compose(tmp_path, "+distill.foo=1")

    with pytest.raises(ConfigError, match="foo") as err:
        prepare_run(cfg)

    assert str(err.value).startswith("distill.foo=1: is not an option of distill; options: [")
    assert all(f.name in str(err.value) for f in fields(TrainSettings))
