"""The deployment's pure pieces: latency table, Flower tuning, worker module reloads, stragglers,
certificates and keys, node-config strings."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time

import pandas as pd
import pytest

from benchmarks.deploy_latency import _parse, markdown
from fedkd.deploy import tuning
from fedkd.deploy.latency import round_latency
from fedkd.deploy.security import make_certificates, make_node_key, san_entries
from fedkd.deploy.worker import forget_modules_of
from fedkd.errors import ConfigError
from fedkd.wire import WireGrid
from tests.test_wire import FakeGrid, _wave


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


def test_capped_sleep_and_supernode_polls():
    from flwr.supernode import start_client_internal as loop

    saved = loop.time
    try:
        tuning.cap_supernode_polls(0.01)
        start = time.monotonic()
        loop.time.sleep(3)
        assert time.monotonic() - start < 0.5 and loop.time.monotonic() > 0
        tuning.cap_supernode_polls(0.02)  # again: still the same module underneath
        assert loop.time.cap == 0.02
    finally:
        loop.time = saved


def test_pull_backoff_is_shortened():
    from flwr.supercore.inflatable import inflatable_utils as utils

    saved = [dict(f.__kwdefaults__) for f in (utils.pull_objects,
                                              utils.pull_and_inflate_object_from_tree)]
    try:
        tuning.shorten_pull_backoff(0.05)
        assert utils.pull_objects.__kwdefaults__["initial_backoff"] == 0.05
        assert utils.pull_and_inflate_object_from_tree.__kwdefaults__["initial_backoff"] == 0.05
    finally:
        for function, defaults in zip((utils.pull_objects,
                                       utils.pull_and_inflate_object_from_tree), saved):
            function.__kwdefaults__.update(defaults)


def test_worker_drops_modules_the_app_folder_provides(tmp_path, monkeypatch):
    (tmp_path / "fedkd_fake_pkg").mkdir()
    (tmp_path / "fedkd_fake_pkg" / "__init__.py").write_text("VALUE = 1\n")
    (tmp_path / "fedkd_fake_mod.py").write_text("VALUE = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import fedkd_fake_mod  # noqa: F401
    import fedkd_fake_pkg  # noqa: F401

    forget_modules_of(tmp_path)

    assert "fedkd_fake_pkg" not in sys.modules and "fedkd_fake_mod" not in sys.modules
    assert str(tmp_path) not in sys.path


def test_a_straggler_is_asked_again_after_its_patience(flower_ids):
    fake = FakeGrid([1, 2])
    wire = WireGrid(fake, poll_interval=0.001, straggler_patience=0.05)
    fake.silent = {2}
    wire.send_and_receive(_wave([1, 2]), timeout=0.02)
    assert wire.busy_node_ids() == {2}

    time.sleep(0.06)

    assert wire.busy_node_ids() == set()  # e.g. restarted under the same node id


def test_certificates_are_signed_by_the_ca_for_the_given_hosts(tmp_path):
    certs = make_certificates(tmp_path, ["127.0.0.1", "fl.example.org"])

    verify = subprocess.run(["openssl", "verify", "-CAfile", str(certs.ca_cert),
                             str(certs.server_cert)], capture_output=True, text=True)
    text = subprocess.run(["openssl", "x509", "-in", str(certs.server_cert), "-noout", "-text"],
                          capture_output=True, text=True).stdout
    assert verify.returncode == 0 and "IP Address:127.0.0.1" in text and "DNS:fl.example.org" in text
    assert oct(certs.server_key.stat().st_mode)[-3:] == "600"
    assert certs.superlink_args()[:2] == ["--ssl-ca-certfile", str(certs.ca_cert)]
    assert san_entries(["::1", "host"]) == "IP:::1,DNS:host"
    with pytest.raises(ConfigError, match="at least one host"):
        san_entries([])


def test_node_keys_are_ecdsa_p384(tmp_path):
    key, pub = make_node_key(tmp_path, "node-0")

    assert key.is_file() and pub.read_text().startswith("ecdsa-sha2-nistp384 ")


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
