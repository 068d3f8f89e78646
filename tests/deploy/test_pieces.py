"""The deployment's pure pieces: latency table, Flower tuning, worker module reloads,
certificates and keys, node-config strings, fedkd-supernode's checks."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest

from benchmarks.deploy_latency import _parse, markdown
from fedkd import flower_compat as tuning
from fedkd.deploy.latency import round_latency
from fedkd.deploy.security import make_certificates, make_node_key, san_entries
from fedkd.deploy.worker import forget_modules_of
from fedkd.errors import ConfigError


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
    __import__("fedkd_fake_mod"), __import__("fedkd_fake_pkg")

    forget_modules_of(tmp_path)

    assert "fedkd_fake_pkg" not in sys.modules and "fedkd_fake_mod" not in sys.modules
    assert str(tmp_path) not in sys.path


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
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


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
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


@pytest.mark.parametrize("superlink", ["10.0.0.5:9200", "fl.example.org:9200"])
def test_insecure_supernode_towards_another_machine_is_refused(superlink, capsys):
    from fedkd.deploy.supernode import main

    with pytest.raises(SystemExit):
        main(["--insecure", "--superlink", superlink, "--node-config", "partition-id=0"])

    assert "--insecure towards --superlink" in capsys.readouterr().err


def test_supernode_poll_interval_is_checked(capsys):
    from fedkd.deploy.supernode import main

    with pytest.raises(SystemExit):
        main(["--poll-interval", "0", "--superlink", "127.0.0.1:1"])

    assert "--poll-interval must be in [0.01, 3] seconds, got 0.0" in capsys.readouterr().err


def test_a_node_config_toml_file_gives_the_same_keys(deployment, tmp_path):
    from flwr.common.config import parse_config_args

    text = deployment.files.node_config(0, arch="mlp")
    (tmp_path / "node.toml").write_text("\n".join(
        f"{k} = {v if v.isdigit() else repr(v).replace(chr(39), chr(34))}"
        for k, v in (item.split("=", 1) for item in shlex.split(text))))

    assert parse_config_args([str(tmp_path / "node.toml")]) == parse_config_args([text]) == _parse(text)


def test_heartbeat_interval_is_set_within_flowers_bounds():
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    saved = heartbeat.HEARTBEAT_DEFAULT_INTERVAL, fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL
    try:
        tuning.set_heartbeat_interval(10)
        assert heartbeat.HEARTBEAT_DEFAULT_INTERVAL == fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL == 10
        with pytest.raises(ValueError, match=r"must be in \[10, 1800\] s, got 5"):
            tuning.set_heartbeat_interval(5)
    finally:
        heartbeat.HEARTBEAT_DEFAULT_INTERVAL, fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = saved


def test_federation_cli_export_and_argument_checks(tmp_path, capsys):
    from fedkd.deploy.cli import main

    assert main(["export", "--out", str(tmp_path), "--nodes", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and "partition-id=1" in printed[1]
    assert {p.name for p in tmp_path.iterdir()} == {"node-0", "node-1", "public.npz", "test.npz"}
    with pytest.raises(SystemExit):
        main(["run", "--nodes", "2", "--kill-node", "5"])
    assert "--kill-node must be a node of 0..1, got 5" in capsys.readouterr().err
