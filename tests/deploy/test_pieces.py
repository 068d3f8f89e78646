"""The deployment's pure pieces: latency table, Flower tuning, worker module reloads,
node-config strings, fedkd-supernode's checks (certificates and keys: test_security.py)."""

from __future__ import annotations

import shlex
import sys
import time

import pandas as pd
import pytest

from benchmarks.deploy_latency import _parse, markdown
from fedkd import flower_compat as tuning
from fedkd.deploy.latency import round_latency
from fedkd.deploy.worker import forget_modules_of


def _rows(rows):
    return pd.DataFrame(rows, columns=["round", "client", "model", "metric", "value"])


def test_latency_is_the_time_between_round_ends_against_the_slowest_client():
    frame = _rows([(1, -1, "wire", "elapsed_s", 5.0), (2, -1, "wire", "elapsed_s", 7.5),
                   (3, -1, "wire", "elapsed_s", 13.0),
                   (1, 0, "a", "compute-s", 2.0), (1, 1, "b", "compute-s", 3.0),
                   (2, 0, "a", "compute-s", 0.2), (2, 1, "b", "compute-s", 0.5),
                   (3, 0, "a", "compute-s", 0.4), (3, 1, "b", "test-accuracy", 0.9)])

    table = round_latency(frame)

    assert list(table["round"]) == [1, 2, 3]
    assert list(table.latency_s) == [5.0, 2.5, 5.5]
    assert list(table.slowest_compute_s) == [3.0, 0.5, 0.4]
    assert list(table.bound_s) == [8.0, 3.0, 2.8] and list(table.within) == [True, True, False]


@pytest.fixture
def restore_flower():
    """Undo fedkd's patches of Flower internals after the test."""
    from flwr.supercore import heartbeat
    from flwr.supercore.inflatable import inflatable_utils as utils
    from flwr.supernode import fleet_http_connection, start_client_internal

    pulls = (utils.pull_objects, utils.pull_and_inflate_object_from_tree)
    saved = (start_client_internal.time, [dict(f.__kwdefaults__) for f in pulls],
             heartbeat.HEARTBEAT_DEFAULT_INTERVAL, fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL)
    yield
    start_client_internal.time = saved[0]
    for function, defaults in zip(pulls, saved[1]):
        function.__kwdefaults__.update(defaults)
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL, fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = saved[2:]


def test_capped_sleep_and_supernode_polls(restore_flower):
    from flwr.supernode import start_client_internal as loop

    tuning.cap_supernode_polls(0.01)
    start = time.monotonic()
    loop.time.sleep(3)  # what the SuperNode loop calls when idle
    assert time.monotonic() - start < 0.5 and loop.time.monotonic() > 0
    tuning.cap_supernode_polls(0.02)  # again: still the same module underneath
    assert loop.time.cap == 0.02


def _retry_gap(pull) -> float:
    """Seconds between the first (missing) and second pull of an object, through `pull`."""
    from flwr.app import ConfigRecord
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    record = ConfigRecord({"a": 1})
    contents = {i: o.deflate() for i, o in get_all_nested_objects(record).items()}
    calls: list[float] = []

    def fetch(object_id: str) -> bytes:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise ObjectUnavailableError(object_id)  # announced, not stored yet
        return contents[object_id]

    assert pull(record, fetch, contents) is not None
    return calls[1] - calls[0]


def _pull_objects(record, fetch, contents):
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    return pull_objects(list(contents), fetch)  # the SuperNode's and the ServerApp's pulls


def _pull_tree(record, fetch, contents):
    from flwr.supercore.inflatable.inflatable_object import get_object_tree
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

    return pull_and_inflate_object_from_tree(  # the ClientApp's pull of its message
        get_object_tree(record), fetch, lambda object_id: None, return_type=type(record))


@pytest.mark.parametrize("pull", [_pull_objects, _pull_tree], ids=["objects", "tree"])
def test_a_missing_object_is_retried_after_the_short_backoff(pull, restore_flower):
    tuning.shorten_pull_backoff(0.05)

    assert _retry_gap(pull) < 0.5  # Flower's first retry comes after 1 s +- 20%


def test_worker_drops_modules_the_app_folder_provides(tmp_path, monkeypatch):
    (tmp_path / "fedkd_fake_pkg").mkdir()
    (tmp_path / "fedkd_fake_pkg" / "__init__.py").write_text("VALUE = 1\n")
    (tmp_path / "fedkd_fake_mod.py").write_text("VALUE = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__("fedkd_fake_mod"), __import__("fedkd_fake_pkg")

    forget_modules_of(tmp_path)

    assert "fedkd_fake_pkg" not in sys.modules and "fedkd_fake_mod" not in sys.modules
    assert str(tmp_path) not in sys.path


def test_node_config_strings_round_trip(deployment):
    text = deployment.files.node_config(1, arch="mlp", **{"checkpoint-dir": "/tmp/x y"})

    parsed = _parse(text)

    assert parsed["partition-id"] == 1 and parsed["arch"] == "mlp"
    assert parsed["checkpoint-dir"] == "/tmp/x y" and parsed["data-path"].endswith("train.npz")
    assert shlex.split(text)[0] == "partition-id=1"


def test_markdown_table():
    table = pd.DataFrame({"latency_s": [1.234], "within": [True]}, index=pd.Index([2], name="round"))

    assert markdown(table).splitlines() == ["| round | latency_s | within |", "|---|---|---|",
                                            "| 2 | 1.23 | True |"]


@pytest.mark.parametrize("superlink", ["10.0.0.5:9200", "fl.example.org:9200"])
def test_insecure_supernode_towards_another_machine_is_refused(superlink, capsys):
    from fedkd.deploy.supernode import main

    with pytest.raises(SystemExit):
        main(["--insecure", "--superlink", superlink, "--node-config", "partition-id=0"])

    err = capsys.readouterr().err
    assert err.startswith(f"configuration error: --superlink='{superlink}': --insecure towards")
    assert len(err.splitlines()) == 1


def test_supernode_poll_interval_is_checked(capsys):
    from fedkd.deploy.supernode import main

    with pytest.raises(SystemExit):
        main(["--poll-interval", "0", "--superlink", "127.0.0.1:1"])

    assert capsys.readouterr().err == ("configuration error: --poll-interval=0.0: must be a "
                                       "number in [0.01, 3]\n")


def test_a_node_config_toml_file_gives_the_same_keys(deployment, tmp_path):
    from flwr.common.config import parse_config_args

    text = deployment.files.node_config(0, arch="mlp")
    (tmp_path / "node.toml").write_text("\n".join(
        f"{k} = {v if v.isdigit() else repr(v).replace(chr(39), chr(34))}"
        for k, v in (item.split("=", 1) for item in shlex.split(text))))

    assert parse_config_args([str(tmp_path / "node.toml")]) == parse_config_args([text]) == _parse(text)


def test_heartbeat_sender_waits_the_set_interval(restore_flower):
    import threading

    from flwr.supercore.heartbeat import HeartbeatSender

    class StopAfterOneWait(threading.Event):
        def wait(self, timeout=None):
            waits.append(timeout)
            self.set()
            return True

    tuning.set_heartbeat_interval(10)
    waits: list[float] = []
    sender = HeartbeatSender(lambda: True)
    sender._stop_event = StopAfterOneWait()  # observe the wait after one heartbeat
    sender.start()
    sender._thread.join(5)

    # Flower waits (interval - 5 s call timeout) * (0.8 +- 0.1): 20 s at its default of 30 s
    assert len(waits) == 1 and 3.5 <= waits[0] <= 4.5
    with pytest.raises(ValueError, match=r"must be in \[10, 1800\] s, got 5"):
        tuning.set_heartbeat_interval(5)


def test_patches_refuse_another_flower_version(monkeypatch, restore_flower, capsys):
    import flwr
    from flwr.supercore.inflatable import inflatable_utils as utils
    from flwr.supernode import start_client_internal as loop

    from fedkd.deploy.supernode import main

    before = loop.time, dict(utils.pull_objects.__kwdefaults__)
    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    for patch in (lambda: tuning.cap_supernode_polls(0.1), tuning.shorten_pull_backoff,
                  lambda: tuning.set_heartbeat_interval(10),
                  lambda: tuning.run_flower_supernode(["--help"]),
                  lambda: tuning.ClientAppExecutor(None)):
        with pytest.raises(tuning.UnsupportedFlowerError,
                           match=r"flwr 1\.42\.x only, but flwr 1\.43\.0 is installed"):
            patch()
    assert (loop.time, dict(utils.pull_objects.__kwdefaults__)) == before  # nothing patched
    with pytest.raises(SystemExit):
        main(["--superlink", "127.0.0.1:1", "--insecure"])
    assert "flwr 1.43.0 is installed" in capsys.readouterr().err

    monkeypatch.setattr(flwr, "__version__", "1.42.7")  # any 1.42 patch release
    assert tuning.require_supported_flower() == "1.42.7"


def test_federation_cli_export_and_argument_checks(tmp_path, capsys):
    from fedkd.deploy.cli import main

    assert main(["export", "--out", str(tmp_path), "--nodes", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and "partition-id=1" in printed[1]
    assert {p.name for p in tmp_path.iterdir()} == {"node-0", "node-1", "public.npz", "test.npz"}
    with pytest.raises(SystemExit):
        main(["run", "--nodes", "2", "--kill-node", "5"])
    assert capsys.readouterr().err == ("configuration error: --kill-node=5: must be an int in "
                                       "[0, 1]\n")
