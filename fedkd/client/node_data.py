"""A deployed node's data: its own files, normalised like the server's public set.

The node reads its private (and test) file in the ``files`` dataset format, and its copy of the
public set (a file, or an embedded name the server cut with the same recipe). Normalisation takes
scalar statistics of the public set, which the server announces only by mode, so node and server
compute identical functions; the fingerprint of the normalised public set is checked by
`fedkd.client.data.client_data`. Labels must already be the federation's class ids
``0..num_classes-1`` (no per-file re-encoding: a node may lack classes).

Arrays are memoised per process (keyed by file path, size and modification time).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fedkd.client.node import NodeConfig, cache_root
from fedkd.errors import ConfigError


@dataclass(frozen=True)
class NodeArrays:
    """Normalised float32 inputs and int64 labels of one node."""

    x: np.ndarray
    y: np.ndarray
    public_x: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def _stamp(path: str) -> tuple[str, int, int]:
    stat = Path(path).expanduser().stat()
    return str(Path(path).expanduser().resolve()), stat.st_size, stat.st_mtime_ns


@lru_cache(maxsize=8)
def _labelled(stamp: tuple[str, int, int], key: str,
              label_column: str) -> tuple[np.ndarray, np.ndarray]:
    from fedkd.data.raw import check_features, check_labels
    from fedkd.data.sources import read_labelled_file

    x, y = read_labelled_file(stamp[0], f"node config {key}", label_column)
    where = f"node config {key}='{stamp[0]}'"
    y = check_labels(y, where)
    return check_features(x, len(y), where), y


@lru_cache(maxsize=4)
def _public_raw(stamp: tuple[str, int, int] | None, recipe_json: str,
                label_column: str) -> np.ndarray:
    from fedkd.data.public import embedded_public, read_public_file

    if stamp is not None:
        return read_public_file(stamp[0], "node config public-path", label_column)
    return embedded_public(json.loads(recipe_json), cache_root())


def public_raw(node: NodeConfig, data: Mapping[str, Any]) -> np.ndarray:
    """This node's raw public rows: its public-path file, or the embedded set the server cut."""
    recipe = data.get("public_recipe")
    if node.public is not None:
        if not recipe or recipe.get("name") != node.public:
            announced = recipe.get("name") if recipe else "a public file"
            raise ConfigError(f"node config public={node.public!r}, but the server uses "
                              f"{announced!r} as the public set")
        return _public_raw(None, json.dumps(recipe, sort_keys=True), node.label_column)
    return _public_raw(_stamp(str(node.public_path)), "", node.label_column)


def load_node_arrays(node: NodeConfig, data: Mapping[str, Any]) -> NodeArrays:
    """Read, check and normalise the node's private, test and public data.

    `data` is the run's data description (`ClientSettings.data`); its ``normalize`` tells how the
    server normalised its public set.
    """
    from fedkd.data.split import normalizer

    mode = data.get("normalize")
    if mode is None:
        raise ConfigError("this node reads its own files (node config data-path), but the server "
                          "prepared simulation data; run the server with dataset=nodes")
    raw_public = public_raw(node, data)
    apply = normalizer(raw_public, str(mode))
    shape = tuple(int(d) for d in data["input_shape"])
    num_classes = int(data["num_classes"])
    x, y = _checked(node, "data-path", str(node.data_path), shape, num_classes)
    if node.test_path is not None:
        test_x, test_y = _checked(node, "test-path", node.test_path, shape, num_classes)
    else:
        x, y, test_x, test_y = hold_out(x, y, node.test_fraction, node.partition_id)
    return NodeArrays(x=apply(x), y=y, public_x=apply(raw_public), test_x=apply(test_x),
                      test_y=test_y)


def _checked(node: NodeConfig, key: str, path: str, shape: tuple[int, ...],
             num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A labelled file whose rows fit the public set's input shape and the run's classes."""
    x, y = _labelled(_stamp(path), key, node.label_column)
    if x.shape[1:] != shape:
        if int(np.prod(x.shape[1:])) != int(np.prod(shape)):
            raise ConfigError(f"node config {key}='{path}': rows have shape {x.shape[1:]}, the "
                              f"federation's inputs have shape {shape}")
        x = x.reshape(len(x), *shape)  # a table's flat feature vector, e.g. 64 pixels -> 1x8x8
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        bad = y[(y < 0) | (y >= num_classes)][0]
        raise ConfigError(f"node config {key}='{path}': label {bad} is outside the federation's "
                          f"class ids 0..{num_classes - 1}")
    return x, y


def hold_out(x: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Split ``(x, y)`` into train and a seeded random test share ``fraction``."""
    n_test = math.ceil(fraction * len(y))
    if not 0 < n_test < len(y):
        raise ConfigError(f"node config test-fraction={fraction} leaves {n_test} of {len(y)} rows "
                          f"for testing; give test-path or a fraction that leaves both parts")
    order = np.random.default_rng(seed).permutation(len(y))
    train, test = np.sort(order[n_test:]), np.sort(order[:n_test])
    return x[train], y[train], x[test], y[test]
