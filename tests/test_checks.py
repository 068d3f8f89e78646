"""Every config value is checked before data, Ray or Flower: one line, `key=value: allowed`.

Each case runs `fedkd.simulations.run.run` (what `fedkd-sim` runs) with the default runner, the
Flower simulation; preparing the data or starting Ray fails the case. The real `fedkd-sim`
process is tested in tests/test_cli.py.
"""

from __future__ import annotations

import math
import re
import time

import pytest
from omegaconf import OmegaConf

import fedkd.server
import fedkd.simulations.launch as launch
from fedkd.checks import check_run, key_path, options_of
from fedkd.errors import ConfigError, error_line, find_config_error, require_int, require_number
from fedkd.server import CONF_DIR, compose_config
from fedkd.simulations.run import run

MAX_SECONDS = 10.0
CPUS = launch.available_cpus()


def _case(overrides: str, key: str, allowed: str = "") -> tuple[tuple[str, ...], str, str]:
    return tuple(overrides.split()), key, allowed


FOUND_LATE = {  # issue 11, "Bad values found late"
    "lr": _case("distill.optimizer.lr=-1", "distill.optimizer.lr=-1", "must be a number >= 0"),
    "weight decay": _case("+distill.optimizer.weight_decay=-1",
                          "distill.optimizer.weight_decay=-1", "must be a number >= 0"),
    "betas": _case("+distill.optimizer.betas=[0.9,2]", "distill.optimizer.betas=(0.9, 2)",
                   "two numbers in [0, 1)"),
    "eps": _case("+distill.optimizer.eps=-1e-8", "distill.optimizer.eps=-1e-08", ">= 0"),
    "momentum": _case("distill.optimizer._target_=torch.optim.SGD +distill.optimizer.momentum=-0.9",
                      "distill.optimizer.momentum=-0.9", "must be a number >= 0"),
    "nesterov without momentum": _case(
        "distill.optimizer._target_=torch.optim.SGD +distill.optimizer.nesterov=true",
        "distill.optimizer.nesterov=true", "Nesterov momentum requires a momentum"),
    "unknown optimizer argument": _case("+distill.optimizer.gamma=1", "distill.optimizer.gamma=1",
                                        "is not an argument of torch.optim.Adam"),
    "optimizer class": _case("distill.optimizer._target_=torch.optim.LBFGS",
                             "distill.optimizer._target_='torch.optim.LBFGS'", "must be one of"),
    "lr as text": _case("distill.optimizer.lr=fast", "distill.optimizer.lr='fast'",
                        "must be a finite number"),
    "seed": _case("seed=-1", "seed=-1", "must be an int in [0, 9223372036854775807]"),
    "seed as text": _case("seed=abc", "seed='abc'", "must be an int in [0, "),
    "partition seed": _case("partition_seed=-1", "partition_seed=-1", "[0, 4294967295]"),
    "audit": _case("audit=maybe", "audit='maybe'", "must be true or false"),
    "partition seed too big": _case("partition_seed=4294967296", "partition_seed=4294967296",
                                    "[0, 4294967295]"),
    "trimmed mean fraction": _case("aggregator=trimmed_mean aggregator.fraction=0.7",
                                   "aggregator.fraction=0.7", "must be a number in [0, 0.5)"),
    "era sharpen": _case("aggregator=era aggregator.sharpen=0", "aggregator.sharpen=0",
                         "must be a number > 0"),
    "dsfl sharpen": _case("strategy=dsfl strategy.flower.aggregator.sharpen=-1",
                          "strategy.flower.aggregator.sharpen=-1", "must be a number > 0"),
    "round timeout": _case("simulation.round_timeout=0", "simulation.round_timeout=0",
                           "must be a number > 0"),
    "num_clients as text": _case("num_clients=abc", "num_clients='abc'", "must be an int >= 1"),
    "no clients": _case("num_clients=0", "num_clients=0", "must be an int >= 1"),
    "no rounds": _case("num_rounds=0", "num_rounds=0", "must be an int >= 1"),
    "no CPU per client": _case("simulation.client_resources.num_cpus=0",
                               "simulation.client_resources.num_cpus=0",
                               f"must be a number in (0, {CPUS}]"),
    "more CPUs than the machine": _case(f"simulation.client_resources.num_cpus={CPUS + 1}",
                                        f"simulation.client_resources.num_cpus={CPUS + 1}",
                                        f"must be a number in (0, {CPUS}]"),
    "more CPUs than ray_init": _case(
        "simulation.ray_init.num_cpus=1 simulation.client_resources.num_cpus=2",
        "simulation.client_resources.num_cpus=2", "(simulation.ray_init.num_cpus: 1)"),
    "negative GPUs": _case("simulation.client_resources.num_gpus=-1",
                           "simulation.client_resources.num_gpus=-1", "must be"),
}

MORE = {
    "relational without relations": _case("strategy=relational strategy.client.relation_rows=0",
                                           "distill.relation_rows=0", "must be > 0"),
    "relational temperatures": _case(
        "strategy=relational strategy.client.losses.relation_kd.temperature=0.5",
        "distill.losses.relation_kd.temperature=0.5", "must equal"),
    "relations nothing uses": _case(
        "strategy=relational strategy.client.losses.relation_kd.weight=0",
        "strategy.flower.propagation=0.0", "must be > 0 when no client term uses the relations"),
    "negative top-k": _case("strategy=relational strategy.client.relation_topk=-1",
                            "strategy.client.relation_topk=-1", "must be an int in [0, 4096]"),
    "fedproto without prototypes": _case("strategy=fedproto strategy.client.prototype_dim=0",
                                         "distill.prototype_dim=0", "must be > 0"),
    "client term with a teacher": _case("+distill.losses.similarity.weight=1",
                                        "distill.losses.similarity={'weight': 1.0}", "a client never has"),
    "unknown loss term": _case("+distill.losses.bogus.weight=1", "distill.losses.bogus={'weight': 1}",
                               "is not a loss term"),
    "dpsgd with loss terms": _case("privacy=dpsgd +distill.losses.kd.weight=1",
                                   "distill.losses={'kd': {'weight': 1.0, 'temperature': 3.0}}",
                                   "must be null with privacy=dpsgd"),
    "client_dp clip": _case("privacy=client_dp privacy.server.clip=0", "privacy.server.clip=0", "> 0"),
    "client_dp noise": _case("privacy=client_dp privacy.server.noise_multiplier=0",
                             "privacy.server.noise_multiplier=0", "> 0"),
    "client_dp delta": _case("privacy=client_dp privacy.server.delta=1", "privacy.server.delta=1", "(0, 1)"),
    "client_dp aggregator": _case("privacy=client_dp aggregator=median", "aggregator='median'",
                                  "mean_probs or mean_logits"),
    "alpha": _case("distill.alpha=1.5", "distill.alpha=1.5", "must be a number in [0, 1]"),
    "batch size": _case("distill.batch_size=0", "distill.batch_size=0", "must be an int >= 1"),
    "unknown distill key": _case("+distill.bogus=1", "distill.bogus=1", "is not an option"),
    "strategy client delta": _case("strategy=fd strategy.client.alpha=2",
                                   "strategy.client.alpha=2", "[0, 1]"),
    "unknown strategy client key": _case("+strategy.client.bogus=1", "strategy.client.bogus=1",
                                         "is not an option of distill"),
    "poll interval": _case("simulation.poll_interval=0", "simulation.poll_interval=0",
                           "must be a number in (0, 600]"),
    "verbose": _case("simulation.verbose=maybe", "simulation.verbose='maybe'", "true or false"),
    "unknown client resource": _case("+simulation.client_resources.memory=1",
                                     "simulation.client_resources.memory=1", "is not an option"),
    "unknown ray_init option": _case("+simulation.ray_init.bogus=1", "simulation.ray_init.bogus=1",
                                     "is not an option of ray.init"),
    "ray_init CPUs": _case("simulation.ray_init.num_cpus=0", "simulation.ray_init.num_cpus=0",
                           "must be an int >= 1 or null"),
    "strategy temperature": _case("distill.temperature=0", "distill.temperature=0", "> 0"),
    "unknown strategy option": _case("+strategy.flower.bogus=1", "strategy.flower.bogus=1",
                                     "is not an option of fedkd.strategies.fedmd.FedMD"),
    "strategy class": _case("strategy.flower._target_=fedkd.strategies.nosuch.X",
                            "strategy.flower._target_='fedkd.strategies.nosuch.X'",
                            "cannot be imported"),
    "white-box generator without models": _case("transfer=generator_whitebox",
                                                "transfer='WhiteBoxGenerator'", "strategy=feddf"),
    "centralized epochs": _case("strategy=centralized strategy.runner.epochs_per_round=0",
                                "strategy.runner.epochs_per_round=0", "must be an int >= 1"),
    "unknown runner option": _case("+strategy.runner.bogus=1", "strategy.runner.bogus=1",
                                   "is not an option of fedkd.simulations.launch.simulate"),
}

BAD_AGGREGATOR = {"fraction": -0.1, "sharpen": 0, "sigma": 0, "delta": 1, "iters": 0, "sigma_threshold": 0,
                  "decay": 1, "threshold": 0, "floor": 2}
"""A value each aggregator option (conf/aggregator/*.yaml) refuses."""
BAD_TRANSFER = {
    "size": 0, "seed": -1, "low": "low", "high": -1, "mean": "mid", "std": 0, "steps": -1,
    "batch_size": 0, "directions": 0, "mu": 0, "query_budget": 0, "start_round": 0, "lr": 0,
    "z_dim": 0, "hidden": 0, "w_ce": -1, "w_adv": -1, "w_bal": -1, "w_div": -1, "w_bn": -1,
    "adv_temperature": 0,
}
"""A value each transfer option (conf/transfer/*.yaml) refuses."""
BAD_STRATEGY = {
    "fraction_train": 0, "min_train_nodes": -1, "min_available_nodes": -1, "min_replies": 0,
    "temperature": 0, "seed": -1, "server_epochs": -1, "server_lr": 0, "server_batch_size": 0,
    "fraction_evaluate": 1.5, "min_evaluate_nodes": -1, "server_losses": 5,
    "relation_temperature": 0, "propagation": 1.5,
}
"""A value each strategy option (conf/strategy/*.yaml, under `flower`) refuses."""


def _options(group: str) -> dict[str, dict]:
    return {p.stem: OmegaConf.to_container(OmegaConf.load(p))
            for p in sorted((CONF_DIR / group).glob("*.yaml")) if not p.stem.startswith("_")}


def _group_cases() -> dict[str, tuple[tuple[str, ...], str, str]]:
    """One case per option of every aggregator, transfer source and strategy, plus an unknown
    option for each aggregator and transfer source."""
    cases = {}
    for name, node in _options("aggregator").items():
        node = node.get("aggregator", node)  # class_weighted is a global package
        for key in node:
            if not key.startswith("_"):
                value = BAD_AGGREGATOR[key]
                cases[f"aggregator={name} {key}"] = _case(
                    f"aggregator={name} aggregator.{key}={value}", f"aggregator.{key}={value}")
        cases[f"aggregator={name} unknown"] = _case(
            f"aggregator={name} +aggregator.bogus=1", "aggregator.bogus=1", "is not an option")
    for name, node in _options("transfer").items():
        strategy = "strategy=feddf" if name == "generator_whitebox" else "strategy=fedmd"
        for key in node:
            if not key.startswith("_"):
                value = BAD_TRANSFER[key]
                cases[f"transfer={name} {key}"] = _case(
                    f"{strategy} transfer={name} transfer.{key}={value}",
                    f"transfer.{key}={value!r}" if isinstance(value, str) else
                    f"transfer.{key}={value}")
        cases[f"transfer={name} unknown"] = _case(
            f"{strategy} transfer={name} +transfer.bogus=1", "transfer.bogus=1", "is not an option")
    base = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "strategy" / "_base.yaml"))["flower"]
    for name in ("fedmd", "fedavg"):  # node sampling, shared by all (conf/strategy/_base.yaml)
        for key in base:
            if not key.startswith("_"):
                value = BAD_STRATEGY[key]
                cases[f"strategy={name} {key}"] = _case(
                    f"strategy={name} strategy.flower.{key}={value}",
                    f"strategy.flower.{key}={value}")
    for name, node in _options("strategy").items():
        for key, default in (node.get("flower") or {}).items():
            if key.startswith("_") or isinstance(default, dict) or str(default).startswith("${"):
                continue  # objects (their own cases) and interpolations (named where they come from)
            value = BAD_STRATEGY[key]
            cases[f"strategy={name} {key}"] = _case(
                f"strategy={name} strategy.flower.{key}={value}", f"strategy.flower.{key}={value}")
        for key in ("temperature", "seed"):  # set here, they are the strategy's own
            if key in (node.get("flower") or {}):
                value = BAD_STRATEGY[key]
                cases[f"strategy={name} own {key}"] = _case(
                    f"strategy={name} strategy.flower.{key}={value}",
                    f"strategy.flower.{key}={value}")
    return cases


FAULTS = {  # conf/faults (fedkd.faults.plan_faults)
    "fault attack": _case("faults=byzantine faults.byzantine.attack=bogus",
                          "faults.byzantine.attack='bogus'", "must be one of none, random"),
    "fault fraction": _case("faults=crash faults.crash.clients=1.5", "faults.crash.clients=1.5",
                            "must be a number in [0, 1]"),
    "fault probability": _case("faults=crash faults.crash.probability=-0.1",
                               "faults.crash.probability=-0.1", "must be a number in [0, 1]"),
    "fault client id": _case("faults=crash faults.crash.clients=[12]", "faults.crash.clients[]=12",
                             "must be an int in 0..9"),
    "fault unknown kind": _case("+faults.bogus=1", "faults.bogus=1", "is not an option of faults"),
    "fault unknown key": _case("+faults.crash.bogus=1", "faults.crash.bogus=1",
                               "is not an option of faults.crash"),
    "faults pooled": _case("strategy=centralized faults=crash", "strategy='centralized'",
                           "cannot inject faults: use faults=none"),
}

CASES = {**FOUND_LATE, **MORE, **FAULTS, **_group_cases()}


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail on preparing data or starting Ray / Flower's simulation; the names of those reached."""
    reached: list[str] = []

    def reach(name: str):
        def refuse(*args, **kwargs):
            reached.append(name)
            raise AssertionError(f"{name} was reached: the value was not checked before it")
        return refuse

    monkeypatch.setattr(fedkd.server, "prepare_data", reach("prepare_data"))
    monkeypatch.setattr(fedkd.server, "prepare_public_set", reach("prepare_public_set"))
    monkeypatch.setattr(launch, "init_ray", reach("ray.init"))
    import flwr.simulation
    monkeypatch.setattr(flwr.simulation, "run_simulation", reach("run_simulation"))
    return reached


GROUP_CI = {"aggregator=trimmed_mean", "aggregator=reputation", "transfer=generator_blackbox",
            "strategy=fedmd", "strategy=dsfl"}
"""Groups whose option cases run in the default suite; the others' run with ``-m slow``."""


def _bad_value_params() -> list:
    return [pytest.param(name, marks=() if name in FOUND_LATE or name in MORE or name in FAULTS
                         or name.split(" ")[0] in GROUP_CI else pytest.mark.slow)
            for name in CASES]


@pytest.mark.parametrize("name", _bad_value_params())
def test_bad_value_stops_before_data_and_ray_in_one_line(name, tmp_path, nothing_starts):
    overrides, key, allowed = CASES[name]
    cfg = compose_config([f"simulation.cache_dir={tmp_path / 'cache'}", *overrides])

    t0 = time.monotonic()
    with pytest.raises(Exception) as caught:
        run(cfg, tmp_path / "out")
    seconds = time.monotonic() - t0

    import ray
    err = find_config_error(caught.value)
    assert isinstance(err, ConfigError), repr(caught.value)
    message = str(err)
    assert message.startswith(f"{key}: "), message
    assert allowed in message and len(message) > len(key) + 10, message
    assert "\n" not in error_line(err) and error_line(err) == f"configuration error: {message}"
    assert not nothing_starts and not ray.is_initialized()
    assert seconds < MAX_SECONDS


def test_every_group_option_has_a_case():
    """A new aggregator, transfer or strategy option needs a bad value here (the tables above)."""
    keys = {key for name, node in _options("aggregator").items()
            for key in node.get("aggregator", node) if not key.startswith("_")}
    assert keys <= set(BAD_AGGREGATOR)
    keys = {key for node in _options("transfer").values() for key in node
            if not key.startswith("_")}
    assert keys <= set(BAD_TRANSFER)
    assert len([c for c in CASES if c.startswith("transfer=")]) >= 30


def _combinations() -> list:
    """Every strategy x aggregator; the default suite takes each strategy and each aggregator
    at least once, the rest run with ``-m slow``."""
    strategies, aggregators = sorted(_options("strategy")), sorted(_options("aggregator"))
    size = max(len(strategies), len(aggregators))
    quick = {(strategies[i % len(strategies)], aggregators[i % len(aggregators)])
             for i in range(size)}
    return [pytest.param(o, a, marks=() if (o, a) in quick else pytest.mark.slow)
            for o in strategies for a in aggregators]


@pytest.mark.parametrize(("option", "aggregator"), _combinations())
def test_every_good_combination_passes(option, aggregator):
    cfg = compose_config([f"strategy={option}", f"aggregator={aggregator}"])

    train = check_run(cfg)

    assert train.batch_size == cfg.distill.batch_size


@pytest.mark.parametrize("gpus, num_gpus, allowed", [
    (0, 0.5, "must be 0: no GPU here (the GPUs torch sees: 0)"),
    (1, 2, "must be a number in [0, 1] (the GPUs torch sees: 1)"),
    (1, 0.5, None), (2, 2, None), (0, 0, None),
])
def test_gpus_per_client_must_fit_the_gpus_here(monkeypatch, gpus, num_gpus, allowed):
    monkeypatch.setattr(launch, "available_gpus", lambda: gpus)
    cfg = compose_config([f"simulation.client_resources.num_gpus={num_gpus}"])

    if allowed is None:
        launch.check_backend(cfg)
        return
    with pytest.raises(ConfigError) as err:
        launch.check_backend(cfg)
    assert str(err.value) == f"simulation.client_resources.num_gpus={num_gpus}: {allowed}"


def test_a_fraction_of_a_cpu_per_client_is_allowed():
    launch.check_backend(compose_config(["simulation.client_resources.num_cpus=0.5"]))


# --- the pieces -----------------------------------------------------------------------------------
def test_the_message_format():
    assert str(ConfigError("a.b", 0.7, "must be in [0, 0.5)")) == "a.b=0.7: must be in [0, 0.5)"
    assert str(ConfigError("a", "x", "y")) == "a='x': y"
    assert str(ConfigError("a", None, "y")) == "a=null: y" and str(ConfigError("a", True, "y")) == "a=true: y"
    assert str(ConfigError("something is wrong")) == "something is wrong"
    assert str(ConfigError("fraction", 0.7, "y").within("aggregator")) == "aggregator.fraction=0.7: y"
    assert str(ConfigError("no file").within("dataset")) == "dataset: no file"
    assert error_line(ConfigError("k", 1, "two\nlines")) == "configuration error: k=1: two"


def test_config_errors_survive_pickling():
    import pickle

    for err in (ConfigError("k", 1, "allowed"), ConfigError("a message")):
        back = pickle.loads(pickle.dumps(err))
        assert str(back) == str(err) and back.has_value == err.has_value


@pytest.mark.parametrize("value, ok", [(1, True), (0, False), (True, False), (1.0, False),
                                       ("1", False), (None, False)])
def test_require_int(value, ok):
    if ok:
        assert require_int("k", value, 1) == value
    else:
        with pytest.raises(ConfigError, match=r"^k=.*: must be an int >= 1$"):
            require_int("k", value, 1)


@pytest.mark.parametrize("value", [math.nan, math.inf, True, "0.1", -0.1, 0.5])
def test_require_number_refuses_what_is_not_a_finite_number_in_range(value):
    with pytest.raises(ConfigError, match=re.escape(": must be a number in [0, 0.5)")):
        require_number("k", value, 0.0, 0.5, high_open=True)


def test_options_follow_kwargs_along_the_mro():
    from fedkd.strategies.feddf import FedDF
    from fedkd.strategies.fedavg import FedAvg
    from fedkd.aggregation import trimmed_mean

    assert {"server_lr", "fraction_train", "transfer"} <= options_of(FedDF)
    assert {"seed", "fraction_evaluate", "min_evaluate_nodes"} <= options_of(FedAvg)
    assert options_of(trimmed_mean, partial=True) == {"meta", "temperature", "fraction"}


def test_keys_are_named_where_their_value_comes_from():
    cfg = compose_config([])
    flower = cfg.strategy.flower

    assert key_path(flower, "strategy.flower", "aggregator") == "aggregator"
    assert key_path(flower, "strategy.flower", "transfer.size") == "transfer.size"
    assert key_path(flower, "strategy.flower", "temperature") == "distill.temperature"
    assert key_path(flower, "strategy.flower", "min_replies") == "strategy.flower.min_replies"
