"""``fedkd-federation``: every flag is checked before a process starts, in one line."""

from __future__ import annotations

import pytest

import fedkd.deploy.cli as cli
from fedkd.deploy.federation import Options
from fedkd.errors import ConfigError

CASES = {  # argv -> the one line on stderr
    "no rounds": ("run --rounds 0", "--rounds=0: must be an int >= 1"),
    "no nodes": ("run --nodes 0", "--nodes=0: must be an int >= 1"),
    "rounds as text": ("run --rounds abc", "argument --rounds: invalid int value: 'abc'"),
    "round timeout": ("run --round-timeout 0", "--round-timeout=0.0: must be a number > 0"),
    "run timeout": ("run --timeout -1", "--timeout=-1.0: must be a number > 0"),
    "poll interval": ("run --poll-interval 5", "--poll-interval=5.0: must be a number in [0.01, 3]"),
    "unknown arch": ("run --archs cnn_small,resnet",
                     "--archs='resnet': must be one of ['cnn_small', 'cnn_teacher', 'mlp']"),
    "arch of another model group": ("run --model hetero1d --archs cnn_small",
                                    "--archs='cnn_small': must be one of ['cnn1d', 'mlp']"),
    "unknown model": ("run --model resnet", "--model='resnet': must be one of ["),
    "unknown strategy": ("run --strategy nosuch", "--strategy='nosuch': must be one of ["),
    "strategy without Flower": ("run --strategy centralized",
                                "--strategy='centralized': runs no Flower strategy; one of ["),
    "launcher": ("run --launcher nope", "argument --launcher: invalid choice: 'nope'"),
    "kill a node that is not there": ("run --nodes 2 --kill-node 2",
                                      "--kill-node=2: must be an int in [0, 1]"),
    "kill after the last round": ("run --rounds 3 --kill-node 0 --kill-after-round 3",
                                  "--kill-after-round=3: must be an int in [1, 2]"),
    "kill with one round": ("run --rounds 1 --kill-node 0",
                            "--kill-node=0: needs --rounds >= 2"),
    "negative kill delay": ("run --kill-node 0 --kill-delay -1",
                            "--kill-delay=-1.0: must be a number >= 0"),
    "negative restart delay": ("run --kill-node 0 --restart-delay -1",
                               "--restart-delay=-1.0: must be a number >= 0"),
    "clean with workdir": ("run --clean --workdir /tmp/x", "--clean=true: removes only the"),
    "server value": ("run distill.optimizer.lr=-1",
                     "distill.optimizer.lr=-1: must be a number >= 0"),
    "server round timeout override": ("run simulation.round_timeout=0",
                                      "simulation.round_timeout=0: must be a number > 0"),
    "unknown override": ("run nosuchkey=1", "the server's overrides ['nosuchkey=1']: Could not"),
    "export no nodes": ("export --out /tmp/x --nodes 0", "--nodes=0: must be an int >= 1"),
    "keys no nodes": ("keys --out /tmp/x --nodes -1", "--nodes=-1: must be an int >= 1"),
    "certificate days": ("certs --out /tmp/x --host h --days 0", "--days=0: must be an int >= 1"),
}


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """No federation, no data files, no certificates: each fails the test if reached."""
    def refuse(*args, **kwargs):
        raise AssertionError("a process or a file was started before the flags were checked")

    for name in ("LocalFederation", "_export", "_certs", "_keys"):
        monkeypatch.setattr(cli, name, refuse)
    monkeypatch.setattr(cli, "_run", refuse)


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_flag_stops_before_anything_starts(name, nothing_starts, capsys):
    argv, line = CASES[name]

    with pytest.raises(SystemExit) as stopped:
        cli.main(argv.split())

    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"configuration error: {line}"), err


def test_good_flags_pass():
    parser = cli.parser()
    for argv in ("run", "run --nodes 2 --rounds 2 --kill-node 1 --kill-after-round 1",
                 "run --model auto --archs cnn_small,cnn_deep --strategy feddf",
                 "export --out /tmp/x", "certs --out /tmp/x --host h"):
        cli.check_args(parser.parse_args(argv.split()))


def test_options_check_the_server_config_they_make():
    with pytest.raises(ConfigError, match=r"^aggregator.fraction=0.7: must be a number in \[0, 0.5\)"):
        Options(overrides=("aggregator=trimmed_mean", "aggregator.fraction=0.7")).check()
    Options().check()
