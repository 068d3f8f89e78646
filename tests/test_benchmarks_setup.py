"""Client set-up at many clients: own-label test chunks read one member at a time."""

from __future__ import annotations

import queue
import time

import numpy as np
import pytest

from fedkd.data.cache import OWN_TEST, load_own_test
from fedkd.data.own_test import OwnTestChunks, own_test_sizes
from fedkd.errors import ConfigError


def _cache(tmp_path, chunks: dict[str, np.ndarray]):
    np.savez(tmp_path / OWN_TEST, **chunks)
    return tmp_path


def test_chunks_read_one_member_equal_the_whole_archive_loader(tmp_path) -> None:
    chunks = {f"client_{i}": np.arange(i, 3 * i, dtype=np.int64) for i in range(5)}
    cache = _cache(tmp_path, chunks)
    reader = OwnTestChunks(cache)
    for pid in range(5):
        np.testing.assert_array_equal(reader.get(pid), load_own_test(cache, pid))
    assert reader.get(7) is None and load_own_test(cache, 7) is None  # no chunk for it
    assert own_test_sizes(cache, 5) == [0, 2, 4, 6, 8]
    assert own_test_sizes(cache, 6) is None  # client 5 has no chunk


def test_a_cache_without_chunks_and_a_corrupt_archive(tmp_path) -> None:
    assert OwnTestChunks(tmp_path).get(0) is None  # no own_test.npz: no chunks, as before
    with pytest.raises(ConfigError):
        own_test_sizes(tmp_path, 1)  # summary_maths.own_test_sizes turns this into None
    (tmp_path / OWN_TEST).write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not a valid .npz file"):
        OwnTestChunks(tmp_path).get(0)  # the checked loader's error, as before


def test_client_data_reads_the_chunk_of_its_partition(small_run) -> None:
    from fedkd.client import data as client_data

    cache = small_run.data.cache_dir
    for pid in range(len(small_run.data.client_sizes)):
        expected = load_own_test(cache, pid)
        got = client_data._own_test(cache, pid)
        assert (got is None) == (expected is None)
        if got is not None:
            np.testing.assert_array_equal(got.numpy(), expected)


def test_one_pass_dispatch_hands_out_what_flowers_loop_does() -> None:
    """Same messages, same order, sweep after sweep (two messages queued for some nodes)."""
    from benchmarks import flower_dispatch as fd

    ids = []
    for one_pass in (False, True):
        state, mapping = fd.loaded_state(nodes=40, messages=15, per_node=2)
        order = {n: i for i, n in enumerate(mapping)}
        sweeps = [fd.first_undelivered(state, order) if one_pass else fd.flower_sweep(state, mapping)
                  for _ in range(3)]
        ids.append([[(order[m.metadata.dst_node_id], m.metadata.group_id) for m in s]
                    for s in sweeps])  # node ids are random: compare their registration order
    flower, one_pass = ids
    assert one_pass == flower
    assert [len(s) for s in flower] == [15, 15, 0]
    assert {g for _, g in flower[0]} == {"0"} and {g for _, g in flower[1]} == {"1"}


def test_one_pass_dispatch_patches_flowers_engine_within_the_block() -> None:
    import importlib

    from fedkd import flower_compat

    vce_api = importlib.import_module(flower_compat.VCE_API)
    original = vce_api.add_messages_to_queue
    with flower_compat.one_pass_dispatch():
        assert vce_api.add_messages_to_queue is flower_compat._add_messages_to_queue
        assert vce_api.Queue is flower_compat.PromptQueue
    assert vce_api.add_messages_to_queue is original
    assert vce_api.Queue is queue.Queue


def test_the_engine_s_queues_wait_briefly_between_looks_at_the_stop_event() -> None:
    from fedkd.flower_compat import STOP_POLL_S, PromptQueue

    q = PromptQueue()
    start = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get(timeout=1.0)  # Flower's engine threads wait 1 s at a time
    assert time.monotonic() - start < 0.5 and STOP_POLL_S <= 0.1
    q.put("message")
    assert q.get(timeout=1.0) == "message" and q.empty()


def test_flower_own_dispatch_turns_fedkds_dispatcher_off_within_the_block() -> None:
    from contextlib import nullcontext

    import fedkd.simulations.launch as launch
    from benchmarks import flower_dispatch as fd

    with fd.flower_own_dispatch():
        assert isinstance(launch.dispatch(), nullcontext)
    assert not isinstance(launch.dispatch(), nullcontext)
