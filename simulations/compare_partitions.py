"""`fedkd-compare`'s partition check: every compared arm must have trained on the same split.

Arms are compared within groups of equal *data setting* (see docs/compare.md, "The partition
check"); a mismatch of partition hashes is flagged, never silently compared.
"""

from __future__ import annotations

from collections import Counter

import pandas as pd

DATA_KEYS = ("partition", "dataset", "num_clients", "partition_seed")
"""Override keys (and their sub-keys) that change the data split: arms differing in them are
expected to use different partitions."""


def data_setting(arm: str) -> str:
    """The part of an arm label (its overrides) that changes the data split."""
    tokens = [t for t in str(arm).split()
              if t.partition("=")[0].lstrip("+~").split(".")[0] in DATA_KEYS]
    return " ".join(sorted(tokens))


def check_partitions(table: pd.DataFrame) -> tuple[pd.Series, list[str]]:
    """Whether each arm used the partition of the arms with its data setting, and what is wrong.

    Arms are compared within groups of equal data setting (dataset, partition, number of
    clients and the overrides of `DATA_KEYS`, e.g. a sweep over ``partition.partitioner.alpha``
    forms one group per alpha). An arm is not ok when its seeds disagree, its hash is missing, or
    it differs from the most common hash of its group (with a tie, no arm of the group is ok).
    """
    warnings = []
    single = table.partition_hash.where(~table.partition_hash.str.contains(",") &
                                        (table.partition_hash != ""))
    for arm in table.arm[single.isna()]:
        warnings.append(f"arm '{arm}': seeds used different or unknown partitions")
    ok = pd.Series(False, index=table.index)
    groups = table.assign(h=single, data=table.arm.map(data_setting)).groupby(
        ["dataset", "partition", "num_clients", "data"], dropna=False)
    for key, group in groups:
        counts = Counter(group.h.dropna()).most_common()
        tie = len(counts) > 1 and counts[0][1] == counts[1][1]
        if counts and not tie:
            ok[group.index] = group.h == counts[0][0]
        if len(counts) > 1:
            warnings.append(
                f"same data setting {key} but {len(counts)} different partitions: " +
                "; ".join(f"{h} ({', '.join(group.arm[group.h == h])})" for h, _ in counts) +
                ": the split did not reproduce")
    return ok, warnings
