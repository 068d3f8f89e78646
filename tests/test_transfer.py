"""Transfer-set sources: public rows or data-free noise, seeded, shaped like the inputs."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord

from tests.helpers import run_plain
from fedkd.errors import ConfigError
from fedkd.server import compose_config, prepare_run
from fedkd.transfer import GaussianNoise, Public, UniformNoise
from fedkd.strategies.fedmd import FedMD
from tests.conftest import SMALL, reply
from tests.helpers import FakeGrid
from tests.helpers import bound


def test_public_is_all_rows_or_a_seeded_sample(small_run):
    n = small_run.data.num_public
    np.testing.assert_array_equal(Public().rows(1, small_run.settings), np.arange(n))
    a, b = Public(size=30, seed=1).rows(2, small_run.settings), Public(size=30, seed=1).rows(2, small_run.settings)
    np.testing.assert_array_equal(a, b)
    assert len(set(a)) == 30 and a.dtype == np.int64
    assert not np.array_equal(a, Public(size=30, seed=1).rows(3, small_run.settings))


@pytest.mark.parametrize("source", [UniformNoise(size=50, low=0.2, high=0.7, seed=3),
                                    GaussianNoise(size=50, mean=0.5, std=0.1, seed=3)])
def test_noise_is_shaped_like_the_inputs_and_seeded_per_round(small_run, source):
    x = source.rows(1, small_run.settings)
    assert x.shape == (50, *small_run.data.input_shape) and x.dtype == np.float32
    np.testing.assert_array_equal(x, source.rows(1, small_run.settings))
    assert not np.array_equal(x, source.rows(2, small_run.settings))
    if isinstance(source, UniformNoise):
        assert x.min() >= 0.2 and x.max() <= 0.7
    else:
        assert abs(x.mean() - 0.5) < 0.01 and abs(x.std() - 0.1) < 0.01


@pytest.mark.parametrize("make, match", [(lambda: UniformNoise(size=0), "size"),
                                         (lambda: UniformNoise(low=1, high=0), "high"),
                                         (lambda: GaussianNoise(std=0), "std"),
                                         (lambda: Public(size=-3), "size")])
def test_bad_values_are_named(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_noise_travels_as_inputs_and_comes_back_as_their_targets(flower_ids, small_run):
    strategy = FedMD(transfer=UniformNoise(size=20, seed=0), min_available_nodes=1)
    msgs = bound(strategy, small_run.settings).configure_train(1, ArrayRecord(), small_run.settings.to_config(), FakeGrid([5, 6]))
    sent = msgs[0].content["transfer"]
    assert list(sent.keys()) == ["next.inputs"]
    inputs = sent["next.inputs"].numpy()
    assert inputs.shape == (20, *small_run.data.input_shape)
    logits = np.zeros((20, small_run.data.num_classes), np.float32)
    arrays, _ = strategy.aggregate_train(1, [reply(m, logits=logits, partition_id=i)
                                             for i, m in enumerate(msgs)])
    np.testing.assert_array_equal(arrays["targets.inputs"].numpy(), inputs)
    nxt = bound(strategy, small_run.settings).configure_train(2, arrays, small_run.settings.to_config(), FakeGrid([5, 6]))
    assert sorted(nxt[0].content["transfer"].keys()) == ["next.inputs", "targets.inputs", "targets.probs"]


def test_fedmd_distils_on_noise_end_to_end(tmp_path):
    cfg = compose_config([*SMALL, "transfer=uniform_noise", "transfer.size=100",
                          f"simulation.cache_dir={tmp_path}"])
    history = run_plain(prepare_run(cfg))
    assert np.mean(list(history[3].values())) > 0.3  # chance is 0.1


def test_rows_become_public_rows_or_stay_synthetic_inputs():
    import torch

    from fedkd.protocol import rows_to_inputs

    public = torch.arange(12, dtype=torch.float32).reshape(4, 1, 3)
    np.testing.assert_array_equal(rows_to_inputs(np.array([2, 0]), public).numpy(),
                                  public[[2, 0]].numpy())
    synthetic = np.ones((5, 1, 3), dtype=np.float64)
    out = rows_to_inputs(synthetic, public)
    assert out.dtype == torch.float32 and out.shape == (5, 1, 3)
    with pytest.raises(ValueError, match="outside the public set"):
        rows_to_inputs(np.array([4]), public, "next")
    with pytest.raises(ValueError, match="next.inputs have shape"):
        rows_to_inputs(np.ones((2, 3), dtype=np.float32), public, "next")
