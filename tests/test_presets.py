"""Every experiment preset composes, prepares and instantiates; at a tiny budget each one runs (slow)."""

from __future__ import annotations

from pathlib import Path

import hydra.utils
import numpy as np
import pytest
from omegaconf import OmegaConf

from fedkd.server import CONF_DIR, compose_config, prepare_run
from fedkd.simulations.run import run

PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
TINY = ["num_rounds=2", "distill.warmup_epochs=2"]
PLAIN_MODEL = {"digits": "hetero_cnn", "mnist1d": "hetero1d"}
"""Dataset -> the model option a plain run on it uses: picking only these three is no preset."""


@pytest.fixture(scope="module")
def mnist_like(tmp_path_factory) -> list[str]:
    """A small stand-in for the MNIST files a user brings (28 x 28, 10 classes)."""
    folder = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)
    for name, n in (("train", 1200), ("test", 200)):
        y = np.arange(n) % 10
        x = rng.random((n, 28, 28), dtype=np.float32) * 0.3
        x[np.arange(n), y * 2, :] += 1.0  # a class-dependent stripe: learnable
        np.savez(folder / f"{name}.npz", x=x, y=y)
    return [f"dataset.path={folder / 'train.npz'}", f"dataset.test_path={folder / 'test.npz'}",
            "dataset.public_size=200", "num_clients=6", "num_rounds=2"]


def _brings_files(preset: str) -> bool:
    """Whether the preset runs on files the user brings (``override /dataset: files``)."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "experiment" / f"{preset}.yaml"))
    return any(d.get("override /dataset") == "files" for d in raw.get("defaults", []))


def _overrides(preset: str, tmp_path: Path, mnist_like: list[str]) -> list[str]:
    extra = mnist_like if _brings_files(preset) else []
    return [f"+experiment={preset}", f"simulation.cache_dir={tmp_path}", *extra]


def test_presets_are_deltas_not_picks():
    """A preset that only picks a strategy and a dataset (and its plain model) is a multirun."""
    kept = {"fedgen_mnist", "hetero_teachers", "datafree_blackbox_digits",
            "datafree_whitebox_digits"}
    assert kept <= set(PRESETS)
    for preset in PRESETS:
        raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "experiment" / f"{preset}.yaml"))
        picks = {k.removeprefix("override /"): v
                 for d in raw.pop("defaults", []) for k, v in d.items()}
        plain = {"strategy": picks.get("strategy"), "dataset": picks.get("dataset"),
                 "model": PLAIN_MODEL.get(picks.get("dataset"))}
        assert raw or picks.items() - plain.items(), f"{preset}: only picks {picks}"


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_prepares_and_instantiates(preset, tmp_path, mnist_like):
    cfg = compose_config(_overrides(preset, tmp_path, mnist_like))
    prepared = prepare_run(cfg)
    assert len(prepared.archs) == cfg.num_clients
    if cfg.strategy.flower is not None:
        hydra.utils.instantiate(cfg.strategy.flower)
    assert callable(hydra.utils.instantiate(cfg.strategy.runner))


def test_fedgen_preset_matches_the_paper_setting(tmp_path, mnist_like):
    cfg = compose_config(_overrides("fedgen_mnist", tmp_path, mnist_like)[:3])
    assert (cfg.num_clients, cfg.num_rounds) == (20, 200)
    assert cfg.strategy.flower.fraction_train == 0.5
    assert (cfg.distill.local_steps, cfg.distill.batch_size) == (20, 32)
    assert OmegaConf.to_container(cfg.distill.optimizer) == {"_target_": "torch.optim.SGD",
                                                             "lr": 0.01, "momentum": 0.9}
    assert cfg.distill.lr_decay == 0.99
    assert cfg.partition.partitioner.alpha == 0.1
    assert cfg.partition.partitioner.min_partition_size == 10
    assert (cfg.dataset.public_size, cfg.dataset.max_class_rows) == (1000, 1500)
    assert cfg.partition.partitioner.max_partition_size == 1500
    assert list(cfg.model.cycle) == ["fedgen_cnn"]
    assert cfg.model.archs.fedgen_cnn._target_ == "fedkd.models.FedGenCNN"


def test_dpsgd_mnist_preset_is_the_issue_setting_with_a_free_digest(tmp_path, mnist_like):
    cfg = compose_config(_overrides("dpsgd_mnist", tmp_path, mnist_like)[:2] + mnist_like[:2])
    assert (cfg.num_clients, cfg.num_rounds, cfg.partition.partitioner.alpha) == (10, 20, 0.5)
    assert (cfg.privacy.name, cfg.privacy.target_epsilon, cfg.privacy.delta) == ("dpsgd", 8.0, 1e-5)
    assert cfg.distill.alpha == 1.0  # the digest touches no private row: no privacy spent on it
    assert (cfg.distill.batch_size, cfg.dataset.public_size) == (256, 3000)


def test_pate_mnist100_preset_asks_100_teachers_500_queries(tmp_path, mnist_like):
    cfg = compose_config(_overrides("pate_mnist100", tmp_path, mnist_like)[:2] + mnist_like[:2])
    assert cfg.num_clients == 100 and cfg.aggregator._target_ == "fedkd.aggregation.ConfidentVote"
    assert cfg.num_rounds * cfg.transfer.size == 500
    assert (cfg.aggregator.threshold, cfg.aggregator.sigma_threshold, cfg.aggregator.sigma) == (60, 20, 10)


MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.mark.slow
@pytest.mark.skipif(not (MNIST / "mnist_train.npz").is_file(), reason="MNIST files absent")
@pytest.mark.parametrize("alpha", [0.05, 1])
def test_fedgen_preset_on_mnist_caps_and_chunks_as_the_paper(tmp_path, alpha):
    cfg = compose_config(["+experiment=fedgen_mnist", f"simulation.cache_dir={tmp_path}",
                          f"dataset.path={MNIST / 'mnist_train.npz'}",
                          f"dataset.test_path={MNIST / 'mnist_test.npz'}",
                          f"partition.partitioner.alpha={alpha}"])
    prepared = prepare_run(cfg)
    sizes = prepared.data.client_sizes
    assert len(sizes) == 20 and min(sizes) >= 10 and sum(sizes) == 15000
    assert all(n == 1500 for n in np.sum(prepared.data.class_histograms, axis=0))
    assert prepared.data.num_public == 1000 and prepared.data.num_test == 10000
    assert prepared.param_counts == {"fedgen_cnn": 26434}
    from fedkd.data import load_test
    from fedkd.data.cache import load_own_test

    _, test_y = load_test(prepared.data.cache_dir)
    chunks = [load_own_test(prepared.data.cache_dir, i) for i in range(20)]
    for hist, chunk in zip(prepared.data.class_histograms, chunks):
        assert set(test_y[chunk].tolist()) <= {c for c, n in enumerate(hist) if n}


def test_teachers_preset_has_two_large_teachers(tmp_path, mnist_like):
    prepared = prepare_run(compose_config(_overrides("hetero_teachers", tmp_path, mnist_like)))
    assert prepared.settings.roles[:2] == ["teacher", "teacher"]
    assert set(prepared.settings.roles[2:]) == {"student"}
    counts = prepared.param_counts
    assert counts["cnn_teacher"] > 5 * max(counts["cnn_small"], counts["mlp"]) / 2


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_at_a_tiny_budget(preset, tmp_path, mnist_like):
    overrides = _overrides(preset, tmp_path / "cache", mnist_like)
    if preset != "fedgen_mnist":
        overrides += ["num_clients=4", *TINY]
    summary = run(compose_config(overrides), tmp_path / "out")
    assert summary["status"] == "ok" and summary["final_mean_accuracy"] > 0.1


def test_few_bytes_preset_sends_labels_and_confidences(tmp_path):
    cfg = compose_config(["+experiment=few_bytes_digits", f"simulation.cache_dir={tmp_path}"])
    assert cfg.codec.name == "hard_label" and cfg.codec.temperature == cfg.distill.temperature
    assert cfg.distill.digest_epochs == 5 and cfg.strategy.name == "fedmd"
