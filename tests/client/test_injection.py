"""Clients run only what they allow: nothing in a message is imported, instantiated or unpickled.

Every payload here would act if it ran: ``os.system`` touches a marker file, `trip` records a call,
``builtins.print`` prints. Each is sent through every field of the settings, both to
`ClientSettings.from_json` and to the real ClientApp (`fedkd.client.app.app`, mods and routing
included), and each test checks that the client refused with a ConfigError and nothing ran.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedkd.client import app as client_app
from fedkd.errors import ConfigError
from fedkd.optim import OPTIMIZERS, build_optimizer, check_optimizer
from fedkd.settings import SERVER_ONLY_DATA_KEYS, ClientSettings, TrainSettings
from tests.client.test_app import _context
from tests.conftest import request

TRIPPED: list[object] = []
MARKER: list[Path] = []


def trip(*args: object, **kwargs: object) -> None:
    """What a payload calls if anything instantiates it: records the call, writes the marker."""
    TRIPPED.append((args, kwargs))
    for marker in MARKER:
        marker.write_text("ran")


class Boom:
    """Unpickling this runs `trip` (a pickle hidden in an .npz must never be loaded)."""

    def __reduce__(self):
        return trip, ("unpickled",)


@pytest.fixture
def marker(tmp_path: Path, capsys: pytest.CaptureFixture) -> Iterator[Path]:
    """The marker file a payload would write; after the test: no file, no call, nothing printed."""
    path = tmp_path / "marker"
    TRIPPED.clear()
    MARKER[:] = [path]
    yield path
    MARKER.clear()
    assert not path.exists(), "a payload ran on the client"
    assert TRIPPED == [], "a payload was called on the client"
    assert "pwned" not in capsys.readouterr().out, "builtins.print ran on the client"


def dict_payloads(marker: Path) -> dict[str, dict]:
    return {
        "os.system": {"_target_": "os.system", "_args_": [f"touch {marker}"]},
        "trip": {"_target_": f"{__name__}.trip"},
        "print": {"_target_": "builtins.print", "_args_": ["pwned"]},
    }


STRING_PAYLOADS = ("os.system", f"{__name__}.trip", "builtins.eval")
RECIPE = {"name": "digits", "args": {}, "test_fraction": 0.3, "public_size": 400, "seed": 0}

# JSON paths into the settings document. Values here are numbers, booleans, lists, mappings or
# allowlisted names, so both a nested `_target_` and a callable-as-string must be refused.
FIELDS = [
    ("train",), ("train", "optimizer"), ("train", "optimizer", "_target_"),
    ("train", "optimizer", "lr"), ("train", "optimizer", "betas"),
    ("train", "optimizer", "betas", 0), ("train", "optimizer", "weight_decay"),
    ("train", "optimizer", "amsgrad"), ("train", "optimizer", "foreach"),
    ("train", "optimizer", "params"), ("train", "optimizer", "_args_"),
    ("train", "optimizer", "_partial_"), ("train", "batch_size"), ("train", "local_epochs"),
    ("train", "local_steps"), ("train", "warmup_epochs"), ("train", "digest_epochs"),
    ("train", "temperature"), ("train", "alpha"), ("train", "eval_every"),
    ("archs",), ("archs", "mlp"), ("archs", "mlp", "_target_"), ("archs", "mlp", "hidden"),
    ("archs", "mlp", "hidden", 0), ("archs", "mlp", "dropout"), ("archs", "mlp", "_args_"),
    ("archs", "cnn_small", "channels"), ("archs", "cnn_small", "batchnorm"),
    ("archs", "cnn_small", "head_pool"), ("archs", "cnn_small", "input_shape"),
    ("data",), ("data", "num_classes"), ("data", "input_shape"), ("data", "input_shape", 0),
    ("data", "num_public"), ("data", "num_test"), ("data", "client_sizes"),
    ("data", "client_sizes", 0), ("data", "class_histograms"), ("data", "class_histograms", 0),
    ("data", "class_histograms", 0, 0), ("data", "public_recipe"),
    ("data", "public_recipe", "args"), ("data", "public_recipe", "seed"),
    ("data", "public_recipe", "test_fraction"), ("data", "_target_"),
    ("assignment",), ("assignment", 0), ("roles",), ("roles", 0), ("seed",), ("num_rounds",),
    ("_target_",),
]
# Free-form strings (paths, fingerprints, names): a nested `_target_` is refused; a string there
# is data, never looked up (see test_strings_in_string_fields_are_inert).
STRING_FIELDS = [
    ("data", "cache_dir"), ("data", "public_fingerprint"), ("data", "partition_hash"),
    ("data", "normalize"), ("archs", "mlp", "name"), ("data", "public_recipe", "name"),
    ("data", "public_recipe", "args", "num_samples"),
]
HANDLERS = ("train.distill", "train.fd", "query", "train", "evaluate")


def _ids(path: tuple) -> str:
    return ".".join(map(str, path))


def tampered(settings: ClientSettings, path: tuple, value: object) -> str:
    """The settings' JSON with `value` at `path` (mapping keys are added where missing)."""
    doc = json.loads(settings.to_json())
    doc["train"]["optimizer"].setdefault("betas", [0.9, 0.999])
    for key in SERVER_ONLY_DATA_KEYS:  # optional on the wire: tamper with them where sent
        doc["data"][key] = copy.deepcopy(settings.data[key])
    doc["assignment"], doc["roles"] = list(settings.assignment), list(settings.roles)  # plain lists
    if len(path) > 2 and path[:2] == ("data", "public_recipe"):
        doc["data"]["public_recipe"] = copy.deepcopy(RECIPE)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return json.dumps(doc)


def _field_named(err: pytest.ExceptionInfo, path: tuple) -> None:
    message = str(err.value)
    name = [k for k in path if isinstance(k, str)][-1]
    assert "fedkd.settings" in message, message
    assert name in message or "_target_" in message, message
    assert "Traceback" not in message and "allow_pickle" not in message


@pytest.fixture(scope="module")
def settings(small_run) -> ClientSettings:
    """The small run's settings (simulation; archs cnn_small and mlp) to tamper with."""
    assert {"mlp", "cnn_small"} <= set(small_run.settings.archs)
    return small_run.settings


# --- ClientSettings.from_json ---------------------------------------------------------------------
@pytest.mark.parametrize("path", FIELDS + STRING_FIELDS, ids=_ids)
@pytest.mark.parametrize("kind", ["os.system", "trip", "print"])
def test_nested_target_in_any_field_is_refused(settings, marker, path, kind):
    text = tampered(settings, path, dict_payloads(marker)[kind])
    with pytest.raises(ConfigError) as err:
        ClientSettings.from_json(text)
    _field_named(err, path)


@pytest.mark.parametrize("path", FIELDS, ids=_ids)
@pytest.mark.parametrize("payload", STRING_PAYLOADS)
def test_callable_as_string_in_any_field_is_refused(settings, marker, path, payload):
    with pytest.raises(ConfigError) as err:
        ClientSettings.from_json(tampered(settings, path, payload))
    _field_named(err, path)


@pytest.mark.parametrize("path", FIELDS, ids=_ids)
def test_nested_target_inside_a_list_is_refused(settings, marker, path):
    with pytest.raises(ConfigError) as err:
        ClientSettings.from_json(tampered(settings, path, [dict_payloads(marker)["trip"]]))
    _field_named(err, path)


@pytest.mark.parametrize("target", [
    "torch.optim.LBFGS", "torch.optim.SparseAdam", "torch.optim.Optimizer", "torch.optim.Muon",
    "torch.optim.lr_scheduler.LambdaLR", "torch.optim.adam.Adam", "torch.optim.Adam.__init__",
    "torch.optim.", "torch.optim.__builtins__", "torch.save", "fedkd.models.MLP", "", None, 3,
])
def test_unknown_optimizer_classes_are_refused(settings, marker, target):
    with pytest.raises(ConfigError, match=r"_target_=.*: must be one of: torch\.optim\.ASGD"):
        ClientSettings.from_json(tampered(settings, ("train", "optimizer", "_target_"), target))


@pytest.mark.parametrize("target", [
    "torch.nn.Linear", "fedkd.models.build_model", "fedkd.models.build.ConfigError",
    "fedkd.models.build.importlib.import_module", "fedkd.models.nothere.Model", "builtins.eval",
])
def test_unknown_model_classes_are_refused(settings, marker, target):
    with pytest.raises(ConfigError, match=r"_target_.*allowed: \['fedkd.models.CNN1d'"):
        ClientSettings.from_json(tampered(settings, ("archs", "mlp", "_target_"), target))


@pytest.mark.parametrize(("text", "match"), [
    ("not json", "Expecting value"), ("[1, 2]", "JSON object"), ('"os.system"', "JSON object"),
    ("[" * 100_000 + "]" * 100_000, "recursion"),
    ('{"_target_": "os.system"}', r"settings._target_='os.system': is not an option"),
])
def test_malformed_documents_are_refused(marker, text, match):
    with pytest.raises(ConfigError, match=match):
        ClientSettings.from_json(text)


@pytest.mark.parametrize(("path", "value", "match"), [
    (("train", "optimizer", "lr"), "NaN", "NaN is not allowed"),
    (("train", "temperature"), "Infinity", "Infinity is not allowed"),
    (("train", "optimizer", "lr"), -1.0, "Invalid learning rate"),
    (("train", "optimizer", "betas"), [0.9], "2 finite numbers"),
    (("train", "optimizer", "amsgrad"), 1, "true or false"),
    (("train", "optimizer", "lr"), True, "a finite number"),
    (("train", "batch_size"), 0, "distill.batch_size=0: must be an int >= 1"),
    (("train", "batch_size"), 3.5, "distill.batch_size=3.5: must be an int >= 1"),
    (("train", "alpha"), 2, r"distill.alpha=2: must be a number in \[0, 1\]"),
    (("train", "local_steps"), False, "local_steps=false: must be an int >= 1 or null"),
    (("train", "bogus"), 1, r"distill.bogus=1: is not an option"),
    (("seed",), -1, r"settings.seed=-1: must be an int in \[0, "),
    (("num_rounds",), 0, "settings.num_rounds=0: must be an int >= 1"),
    (("roles",), ["student"], "one role per partition"),
    (("assignment",), [], "non-empty list of names"),
    (("data", "num_classes"), "10", "settings.data.num_classes='10': must be an int >= 1"),
    (("data", "input_shape"), [1, 0, 8], "non-empty list of ints >= 1"),
    (("archs", "mlp", "hidden"), [[64]], "flat list"),
    (("archs", "mlp", "width"), 64, r"'width' is not an argument of MLP"),
    (("archs", "mlp", "num_classes"), 3, "come from the data"),
])
def test_values_are_type_and_range_checked(settings, path, value, match):
    with pytest.raises(ConfigError, match=match):
        ClientSettings.from_json(tampered(settings, path, value).replace('"NaN"', "NaN")
                                 .replace('"Infinity"', "Infinity"))


def test_missing_fields_are_named(settings):
    doc = json.loads(settings.to_json())
    del doc["seed"], doc["data"]["num_classes"]
    with pytest.raises(ConfigError, match=r"settings key\(s\) \['seed'\] missing"):
        ClientSettings.from_json(json.dumps(doc))
    doc["seed"] = 0
    with pytest.raises(ConfigError, match=r"settings.data key\(s\) \['num_classes'\] missing"):
        ClientSettings.from_json(json.dumps(doc))


def test_a_clean_document_round_trips(settings):
    data = {k: v for k, v in settings.data.items() if k not in SERVER_ONLY_DATA_KEYS}
    assert ClientSettings.from_json(settings.to_json()) == dataclasses.replace(settings, data=data)


def test_the_canary_would_fire_under_hydra(marker):
    """The payloads are live: Hydra's instantiate (what the client used to call) runs a nested one.

    (This Hydra build blocklists ``os.system``, not an arbitrary importable function.)"""
    import hydra.utils

    hydra.utils.instantiate({"_target_": "builtins.dict", "lr": dict_payloads(marker)["trip"]})
    assert len(TRIPPED) == 1 and marker.read_text() == "ran"
    marker.unlink()
    TRIPPED.clear()


# --- the real ClientApp -----------------------------------------------------------------------------
def _message(text: str, message_type: str, pid: int = 0):
    config = ConfigRecord({"fedkd.settings": text, "server-round": 1, "query-seed": 0,
                           "query-directions": 1, "query-mu": 0.1})
    return request(RecordDict({"config": config}), dst=100 + pid, message_type=message_type)


@pytest.mark.parametrize("path", FIELDS + STRING_FIELDS, ids=_ids)
@pytest.mark.parametrize("message_type", HANDLERS)
def test_client_app_refuses_nested_targets(flower_ids, settings, marker, path, message_type):
    ctx = _context(0)
    msg = _message(tampered(settings, path, dict_payloads(marker)["os.system"]), message_type)
    with pytest.raises(ConfigError) as err:  # Flower's runtime replies with an Error carrying it
        client_app.app(msg, ctx)
    _field_named(err, path)
    assert not ctx.state.keys(), "the refused message left state behind"


@pytest.mark.parametrize("path", FIELDS, ids=_ids)
def test_client_app_refuses_callables_as_strings(flower_ids, settings, marker, path):
    msg = _message(tampered(settings, path, "os.system"), "train.distill")
    with pytest.raises(ConfigError) as err:
        client_app.app(msg, _context(0))
    _field_named(err, path)


def test_client_app_refuses_a_settings_entry_that_is_not_a_string(flower_ids, settings, marker):
    msg = _message("{}", "train.distill")
    msg.content["config"]["fedkd.settings"] = [1, 2]
    with pytest.raises(ConfigError, match="must be a JSON string"):
        client_app.app(msg, _context(0))


def test_strings_in_string_fields_are_inert(flower_ids, settings, marker):
    """Names, hashes and an unused recipe may say anything: they are compared, never looked up."""
    doc = json.loads(settings.to_json())
    doc["archs"]["mlp"]["name"] = "os.system"
    doc["data"].update(partition_hash="os.system", normalize="builtins.eval",
                       public_recipe={**RECIPE, "name": "os.system", "args": {"cmd": "os.system"}})
    reply = client_app.app(_message(json.dumps(doc), "train.distill", pid=1), _context(1))
    assert "metrics" in reply.content
    doc["data"]["public_fingerprint"] = "os.system"
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        client_app.app(_message(json.dumps(doc), "train.distill", pid=1), _context(1))


def test_an_embedded_recipe_runs_only_fixed_sources(marker):
    from fedkd.data.public import embedded_public

    with pytest.raises(ConfigError, match="'os.system' is unknown"):
        embedded_public({**RECIPE, "name": "os.system"})
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) \['cmd'\]"):
        embedded_public({**RECIPE, "args": {"cmd": "os.system"}})


# --- fedkd.optim ------------------------------------------------------------------------------------
def test_the_config_form_builds_every_allowlisted_optimizer():
    params = [torch.nn.Parameter(torch.zeros(2))]
    for name in OPTIMIZERS:
        assert type(build_optimizer({"_target_": f"torch.optim.{name}"}, params)).__name__ == name
    adam = build_optimizer({"_target_": "torch.optim.Adam", "lr": 0.01, "betas": [0.5, 0.9],
                            "amsgrad": True, "foreach": None}, params)
    assert adam.defaults["betas"] == (0.5, 0.9) and adam.defaults["amsgrad"] is True


def test_the_default_config_passes():
    from fedkd.server import compose_config
    from omegaconf import OmegaConf

    distill = OmegaConf.to_container(compose_config([]).distill, resolve=True)
    assert check_optimizer(distill["optimizer"]) == ("Adam", {"lr": 0.01})
    assert TrainSettings(**distill).optimizer == distill["optimizer"]


def test_the_server_refuses_at_config_time(small_run, marker):
    cfg = copy.deepcopy(small_run.cfg)
    cfg.distill.optimizer.lr = {"_target_": f"{__name__}.trip"}
    from fedkd.server import prepare_run

    with pytest.raises(ConfigError, match="distill.optimizer.lr"):
        prepare_run(cfg)


# --- malformed .npz files -------------------------------------------------------------------------
def _bad_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: folder / f"{name}.npz" for name in
             ("pickle", "objects", "text", "empty", "truncated", "npy")}
    files["pickle"].write_bytes(pickle.dumps(Boom()))
    np.savez(files["objects"], x=np.array([Boom(), 1], dtype=object), y=np.zeros(2, int))
    files["text"].write_text("x,y\n1,2\n")
    files["empty"].write_bytes(b"")
    np.savez(folder / "good.npz", x=np.ones((4, 3)), y=np.arange(4))
    files["truncated"].write_bytes((folder / "good.npz").read_bytes()[:100])
    with open(files["npy"], "wb") as handle:
        np.save(handle, np.ones(3))
    return files


@pytest.mark.parametrize("kind", ["pickle", "objects", "text", "empty", "truncated", "npy"])
def test_a_malformed_npz_is_named_and_never_unpickled(tmp_path, marker, kind):
    from fedkd.data import sources
    from fedkd.data.cache import load_npz, load_public
    from fedkd.data.public import read_public_file

    file = _bad_files(tmp_path / "files")[kind]
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "public.npz").write_bytes(file.read_bytes())
    for load, path in ((lambda: load_npz(file), file),
                       (lambda: sources.files(str(file)), file),
                       (lambda: read_public_file(str(file), "node config public-path"), file),
                       (lambda: load_public(cache), cache / "public.npz")):
        with pytest.raises(ConfigError) as err:
            load()
        assert f"not a valid .npz file: {path}" in str(err.value)
        assert "allow_pickle" not in str(err.value) and "pickled" not in str(err.value).lower()
