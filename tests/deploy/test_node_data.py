"""A deployed node's own files give exactly the arrays a simulated client gets from the cache."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedkd.client.node import NodeConfig
from fedkd.client.node_data import hold_out, load_node_arrays
from fedkd.data import fingerprint, load_client, load_public, load_test
from fedkd.errors import ConfigError
from fedkd.server import compose_config, prepare_run
from tests.deploy.conftest import BASE, NODES, node_context


def _node(files, pid, **extra) -> NodeConfig:
    return NodeConfig.from_context(node_context(files, pid, **extra))


def test_exported_partition_is_the_simulation_partition(deployment):
    assert deployment.files.partition_hash == deployment.sim.data.partition_hash
    assert deployment.server.data.public_fingerprint == deployment.sim.data.public_fingerprint
    assert deployment.server.data.num_public == deployment.sim.data.num_public
    assert deployment.server.data.input_shape == deployment.sim.data.input_shape


@pytest.mark.parametrize("pid", range(NODES))
def test_node_arrays_equal_the_simulation_cache(deployment, pid):
    cache = deployment.sim.data.cache_dir

    arrays = load_node_arrays(_node(deployment.files, pid), deployment.server.settings.data)

    x, y = load_client(cache, pid)
    test_x, test_y = load_test(cache)
    np.testing.assert_array_equal(arrays.x, x)
    np.testing.assert_array_equal(arrays.y, y)
    np.testing.assert_array_equal(arrays.public_x, load_public(cache))
    np.testing.assert_array_equal(arrays.test_x, test_x)
    np.testing.assert_array_equal(arrays.test_y, test_y)
    assert fingerprint(arrays.public_x) == deployment.sim.data.public_fingerprint


def test_embedded_public_set_is_the_file_one(deployment, tmp_path):
    server = prepare_run(compose_config([*BASE, f"simulation.cache_dir={tmp_path}",
                                         "dataset=nodes", "dataset.public=digits"]))
    node = NodeConfig.from_context(_embedded_context(deployment.files))

    arrays = load_node_arrays(node, server.settings.data)

    assert server.settings.data["public_recipe"]["name"] == "digits"
    assert server.data.public_fingerprint == deployment.sim.data.public_fingerprint
    np.testing.assert_array_equal(arrays.public_x, load_public(deployment.sim.data.cache_dir))


def _embedded_context(files):
    ctx = node_context(files, 0)
    config = dict(ctx.node_config)
    del config["public-path"]
    config["public"] = "digits"
    ctx.node_config = config
    return ctx


def test_embedded_name_must_match_the_servers_public_set(deployment):
    node = NodeConfig.from_context(_embedded_context(deployment.files))

    with pytest.raises(ConfigError, match="public='digits'.*the server uses 'a public file'"):
        load_node_arrays(node, deployment.server.settings.data)


def test_simulation_data_is_refused_by_a_deployed_node(deployment):
    with pytest.raises(ConfigError, match="run the server with dataset=nodes"):
        load_node_arrays(_node(deployment.files, 0), deployment.sim.settings.data)


def test_a_table_of_flat_pixels_is_reshaped_to_the_federations_inputs(deployment, tmp_path):
    with np.load(deployment.files.train[1]) as npz:
        x, y = npz["x"], npz["y"]
    table = pd.DataFrame(x.reshape(len(x), -1), columns=[f"p{i}" for i in range(64)])
    table["digit"] = y
    table.to_csv(tmp_path / "train.csv", index=False)
    node = _node(deployment.files, 1, **{"data-path": str(tmp_path / "train.csv"),
                                         "label-column": "digit"})

    arrays = load_node_arrays(node, deployment.server.settings.data)

    np.testing.assert_array_equal(arrays.x, load_client(deployment.sim.data.cache_dir, 1)[0])


def test_labels_outside_the_federations_classes_are_refused(deployment, tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 1, 8, 8)), y=np.array([0, 1, 2, 10]))
    node = _node(deployment.files, 0, **{"data-path": str(tmp_path / "bad.npz")})

    with pytest.raises(ConfigError, match=r"label 10 is outside the federation's class ids 0\.\.9"):
        load_node_arrays(node, deployment.server.settings.data)


def test_rows_of_another_shape_are_refused(deployment, tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 5)), y=np.array([0, 1, 2, 3]))
    node = _node(deployment.files, 0, **{"data-path": str(tmp_path / "bad.npz")})

    with pytest.raises(ConfigError, match=r"rows have shape \(5,\).*\(1, 8, 8\)"):
        load_node_arrays(node, deployment.server.settings.data)


def test_without_test_path_a_seeded_share_is_held_out(deployment):
    ctx = node_context(deployment.files, 2)
    config = dict(ctx.node_config)
    del config["test-path"]
    ctx.node_config = {**config, "test-fraction": 0.25}

    arrays = load_node_arrays(NodeConfig.from_context(ctx), deployment.server.settings.data)

    total = len(load_client(deployment.sim.data.cache_dir, 2)[1])
    assert len(arrays.test_y) == int(np.ceil(0.25 * total)) and len(arrays.y) + len(arrays.test_y) == total
    x, y = np.arange(10)[:, None], np.arange(10)
    first, again = hold_out(x, y, 0.3, seed=2), hold_out(x, y, 0.3, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert sorted(np.concatenate([first[1], first[3]])) == list(range(10))
