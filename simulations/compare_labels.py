"""Short, distinct arm labels for `fedkd-compare` (file paths by basename, shared data left out)."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

import pandas as pd

SHARED_PATHS = ("dataset.path", "dataset.test_path")  # left out of labels when all runs share one
_PATH_KEY = re.compile(r"(^|_)(path|dir|file)$")  # a key's last part that names a file path


def override_labels(overrides: pd.Series) -> pd.Series:
    """Labels of override tuples (None stays NaN): `short_override` each, `SHARED_PATHS` left out.

    A `SHARED_PATHS` override is left out when every run (`overrides` holds them all) has it
    with the same value, unless nothing else is left. Different overrides always get different
    labels: those whose short labels would coincide keep their full paths.
    """
    sets = [set(o) if isinstance(o, tuple) else set() for o in overrides]
    drop = {o for o in set.intersection(*sets) if _key(o) in SHARED_PATHS} if sets else set()
    given = overrides.dropna()
    kept = given.map(lambda o: [x for x in o if x not in drop] or list(o))
    pairs = pd.DataFrame({"key": given.map(" ".join), "full": kept.map(" ".join),
                          "label": kept.map(lambda o: " ".join(map(short_override, o)))})
    pairs = pairs.drop_duplicates("key")
    labels = pairs.label.where(~pairs.label.duplicated(keep=False), pairs.full)
    if labels.nunique() < len(labels):  # a full label equal to another's short one: all full
        labels = pairs.key
    mapping = dict(zip(pairs.key, labels))
    return overrides.map(lambda o: mapping[" ".join(o)] if isinstance(o, tuple) else None)


def _key(override: str) -> str:
    """``+dataset.path=/x`` -> ``dataset.path``."""
    return override.partition("=")[0].lstrip("+~")


def short_override(override: str) -> str:
    """`override` with a file path value shown by its basename: ``dataset.path=mnist_train.npz``.

    A value is a file path when it holds a ``/`` and starts with ``/``, ``~`` or ``.``, or its
    key's last part is ``path``, ``dir``, ``file`` or ends in ``_path``, ``_dir``, ``_file``; a
    config-group choice such as ``model=cnn/small`` stays whole.
    """
    head, sep, value = override.partition("=")
    bare = value.strip("'\"")
    leaf = _key(override).rsplit(".", 1)[-1]
    if sep and "/" in bare and (bare[0] in "/~." or _PATH_KEY.search(leaf)):
        return f"{head}={PurePosixPath(bare).name or bare}"
    return override
