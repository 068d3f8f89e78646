"""``privacy=dpsgd``: example-level DP-SGD on every client (fedkd.dpsgd, fedkd.dp_training).

Golden epsilons against Opacus's own accountant, BatchNorm fixed or refused, per-sample clipping
checked against a manual per-sample computation, the ledger carried across rounds in
``Context.state``, config errors, and two in-process rounds end to end (no Ray).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from flwr.app import Context, RecordDict
from torch import nn

from fedkd.checks import check_run
from fedkd.client.dp_round import distill_plan, open_private
from fedkd.client.state import PRIVACY, Student
from fedkd.dp_training import PrivateSteps, dp_digest, poisson_batches
from fedkd.dpsgd import Accountant, DPSettings, derive_noise, dp_archs, sample_rate
from fedkd.errors import ConfigError
from fedkd.losses import distill_loss
from fedkd.models import build_model
from fedkd.protocol import DP_EPSILON, DP_STEPS, TRAIN_LOSS
from fedkd.reply_checks import ReplyError, metric
from fedkd.server import compose_config, prepare_run
from fedkd.settings import ClientSettings
from fedkd.simulations.run import run
from tests.conftest import SMALL
from tests.test_resume import Engine, Killed, assert_same_results, in_process

CNN = {"_target_": "fedkd.models.CNN2d", "channels": [4, 8], "head_pool": 2}


# --- accounting ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_epsilon_equals_opacus_accountant(kind: str) -> None:
    """Prepare: 37 steps at (noise 1.1, rate 0.05). Assert: the ledger's epsilon is the one
    Opacus's accountant gives for the same history, and it survives a state round trip."""
    from opacus.accountants import create_accountant

    dp = DPSettings(noise_multiplier=1.1, target_epsilon=None, accountant=kind)
    accountant = Accountant(dp, 1.1, 0.05, planned_steps=37)
    for _ in range(37):
        accountant.step()
    reference = create_accountant(mechanism=kind)
    reference.history = [(1.1, 0.05, 37)]
    assert accountant.epsilon == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-12)
    assert accountant.steps == 37
    restored = Accountant.from_state(dp, accountant.state_dict())
    assert restored.epsilon == accountant.epsilon and restored.steps == 37


def test_derived_noise_meets_target_epsilon() -> None:
    """The noise derived for a target epsilon (Opacus's get_noise_multiplier) spends at most the
    target over the planned steps, and the configured noise is used as is."""
    dp = DPSettings(target_epsilon=4.0, delta=1e-5)
    noise = derive_noise(dp, 0.1, 200)
    accountant = Accountant(dp, noise, 0.1, 200)
    for _ in range(200):
        accountant.step()
    assert 3.5 < accountant.epsilon <= 4.0
    assert derive_noise(DPSettings(noise_multiplier=0.7, target_epsilon=None), 0.1, 200) == 0.7


def test_poisson_sampling_rate() -> None:
    """Opacus's Poisson sampler: batches of random size with mean q * n."""
    gen = torch.Generator().manual_seed(0)
    sizes = [len(b) for b in poisson_batches(200, 0.1, 400, gen)]
    assert len(sizes) == 400 and len(set(sizes)) > 5
    assert sum(sizes) / len(sizes) == pytest.approx(20, rel=0.1)
    assert sample_rate(32, 10) == 1.0 and sample_rate(32, 320) == 0.1


# --- models -------------------------------------------------------------------------------------
def test_batchnorm_is_fixed_to_groupnorm() -> None:
    """A DP-compatible spec builds GroupNorm where the plain spec has BatchNorm."""
    plain = build_model(CNN, (1, 8, 8), 10)
    fixed = build_model({**CNN, "dp_compatible": True}, (1, 8, 8), 10)
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fixed.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in fixed.modules())


def test_batchnorm_refused_or_fixed_in_check_run() -> None:
    """privacy.batchnorm=refuse stops a run whose archs have BatchNorm; an MLP passes; fix passes."""
    with pytest.raises(ConfigError, match=r"model.archs.cnn_small=.*privacy.batchnorm=refuse"):
        check_run(compose_config(["privacy=dpsgd", "privacy.batchnorm=refuse", "model=cnn"]))
    check_run(compose_config(["privacy=dpsgd", "privacy.batchnorm=refuse", "model=mlp"]))
    check_run(compose_config(["privacy=dpsgd", "model=cnn"]))


@pytest.mark.parametrize(("override", "key"), [
    (["privacy.max_grad_norm=0"], "privacy.max_grad_norm"),
    (["privacy.delta=1.5"], "privacy.delta"),
    (["privacy.target_epsilon=-1"], "privacy.target_epsilon"),
    (["privacy.noise_multiplier=1.0"], "privacy.noise_multiplier"),  # both set
    (["privacy.target_epsilon=null"], "privacy.noise_multiplier"),  # neither set
    (["privacy.accountant=gdp2"], "privacy.accountant"),
    (["privacy.batchnorm=drop"], "privacy.batchnorm"),
    (["+privacy.clip=1"], "privacy.clip"),
    (["strategy=fd"], "strategy"),
    (["distill.share_class_counts=true"], "distill.share_class_counts"),
])
def test_config_errors(override: list[str], key: str) -> None:
    """Every bad DP-SGD value stops the run in check_run, named by its key, in one line."""
    with pytest.raises(ConfigError) as caught:
        check_run(compose_config(["privacy=dpsgd", *override]))
    assert str(caught.value).startswith(f"{key}=") and "\n" not in str(caught.value)


def test_dp_metrics_pass_the_reply_guard() -> None:
    """The reply guard knows the dp-* keys: finite and >= 0 pass, negative or NaN are refused."""
    assert metric(DP_EPSILON, 3.2) == 3.2
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ReplyError):
            metric(DP_EPSILON, bad)


# --- clipping -----------------------------------------------------------------------------------
def test_clipping_bounds_per_sample_gradients() -> None:
    """With zero noise and SGD(lr=1), one DP step moves the weights by exactly the mean of the
    manually computed, manually clipped per-sample gradients (each of norm <= C)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    x, y = torch.randn(12, 5) * 10, torch.randint(0, 3, (12,))
    clip = 0.1
    manual, norms = [], []
    for i in range(12):  # per-sample gradients, by hand
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        norms.append(float(norm))
        manual.append([g * min(1.0, clip / (float(norm) + 1e-6)) for g in grads])
    assert sum(n > clip for n in norms) >= 6  # clipping is exercised (and not everywhere)
    expected = [sum(g[j] for g in manual) / 12 for j in range(2)]
    before = [p.detach().clone() for p in model.parameters()]
    dp = DPSettings(max_grad_norm=clip, noise_multiplier=1.0, target_epsilon=None)
    accountant = Accountant(dp, 0.0, 1.0, 1)  # noise 0: the clipped mean alone
    steps = PrivateSteps(model, torch.optim.SGD(model.parameters(), lr=1.0), dp, accountant, 12,
                         torch.Generator().manual_seed(0))
    steps.step(x, y, torch.arange(12))
    steps.close()
    for p, b, e in zip(model.parameters(), before, expected):
        torch.testing.assert_close(b - p.detach(), e, rtol=1e-5, atol=1e-7)
    assert accountant.steps == 1


def test_pure_distillation_takes_no_private_step() -> None:
    """alpha = 1: the digest touches no private row, so nothing is accounted."""
    model = build_model({**CNN, "dp_compatible": True}, (1, 8, 8), 10)
    dp = DPSettings(noise_multiplier=1.0, target_epsilon=None)
    accountant = Accountant(dp, 1.0, 0.5, 1)
    steps = PrivateSteps(model, torch.optim.SGD(model.parameters(), lr=0.1), dp, accountant, 16,
                         torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    soft = torch.softmax(torch.randn(20, 10), 1)
    dp_digest(steps, torch.randn(20, 1, 8, 8), soft, x, y, loss=distill_loss(1.0, 3.0), epochs=1,
              batch_size=8, gen=gen)
    assert accountant.steps == 0
    dp_digest(steps, torch.randn(20, 1, 8, 8), soft, x, y, loss=distill_loss(0.5, 3.0), epochs=1,
              batch_size=8, gen=gen)
    steps.close()
    assert accountant.steps == 3  # one per transfer mini-batch


# --- state --------------------------------------------------------------------------------------
def test_ledger_persists_in_context_state(small_run) -> None:
    """Two rounds on one Context: the second restores the first's ledger from Context.state
    (records, no pickle) and continues it; the noise is derived once."""
    settings = ClientSettings.from_json(small_run.settings.to_json())
    dp = DPSettings(noise_multiplier=1.3, target_epsilon=None)
    settings = ClientSettings(**{**settings.__dict__, "dpsgd": dp,
                                 "archs": dp_archs(dp, settings.archs)})
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    x, y = torch.randn(40, *small_run.data.input_shape), torch.randint(0, 10, (40,))
    epsilons = []
    for server_round in (1, 2):
        student = Student.restore(context, settings, 0)
        private = open_private(settings, student, 40, 0, server_round,
                               lambda: distill_plan(settings.train, 40, True, False, 0))
        private.revisit(x, y, epochs=1, batch_size=settings.train.batch_size,  # 32: 2 steps
                        gen=torch.Generator().manual_seed(0))
        metrics = {TRAIN_LOSS: 1.0}
        private.close(student, metrics)
        student.save(context)
        assert TRAIN_LOSS not in metrics  # a loss on private rows is not released
        epsilons.append(metrics[DP_EPSILON])
        assert metrics[DP_STEPS] == 2 * server_round
    assert PRIVACY in context.state.config_records
    assert epsilons[1] > epsilons[0] > 0
    reference = Accountant(settings.dpsgd, 1.3, 32 / 40, 1)
    for _ in range(4):
        reference.step()
    assert epsilons[1] == pytest.approx(reference.epsilon)


# --- a run --------------------------------------------------------------------------------------
def test_two_rounds_in_process(tmp_path: Path, flower_ids) -> None:
    """privacy=dpsgd through the real ClientApp and strategy (no Ray): every client reports its
    epsilon every round, it grows, summary.json carries it per client with the accountant's
    inputs and the max over clients; the reply guard dropped nothing; BatchNorm was fixed."""
    args = [*SMALL, "num_rounds=2", "distill.warmup_epochs=1", "distill.digest_epochs=1",
            "privacy=dpsgd", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0",
            "simulation.poll_interval=0.001", f"simulation.cache_dir={tmp_path / 'cache'}"]
    cfg = compose_config(args)
    prepared = prepare_run(cfg)
    assert all(spec["dp_compatible"] for spec in prepared.settings.archs.values())
    run(cfg, tmp_path / "out", runner=in_process(Engine(int(cfg.num_clients), base=100)))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    frame = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    assert summary["status"] == "ok" and summary["replies_dropped"] == 0
    eps = frame[frame.metric == DP_EPSILON].pivot(index="client", columns="round", values="value")
    assert eps.shape == (4, 2) and (eps[2] > eps[1]).all() and (eps[1] > 0).all()
    assert "train-loss" not in set(frame.metric) and "digest-loss" not in set(frame.metric)
    by_client = summary["dpsgd_by_client"]
    assert set(by_client) == {"0", "1", "2", "3"}
    for client, values in by_client.items():
        assert values["epsilon"] == pytest.approx(eps.loc[int(client), 2])
        assert values["noise_multiplier"] == 1.0 and values["delta"] == 1e-5
        n = prepared.data.client_sizes[int(client)]
        assert values["sample_rate"] == pytest.approx(min(1.0, 32 / n))
        assert values["steps"] > 0
    assert summary["dpsgd_epsilon_max"] == max(v["epsilon"] for v in by_client.values())


@pytest.mark.slow
def test_a_killed_dpsgd_run_resumes_with_the_same_epsilons(tmp_path: Path, flower_ids) -> None:
    """Killed after the round-2 checkpoint and resumed (fresh contexts, new node ids): the
    ledgers come back from the checkpoint's client states, so every dp-* row and the summary equal
    those of a run never stopped."""
    args = [*SMALL, "num_rounds=3", "distill.warmup_epochs=1", "distill.digest_epochs=1",
            "privacy=dpsgd", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0",
            "simulation.checkpoint_every=2", "simulation.poll_interval=0.001",
            f"simulation.cache_dir={tmp_path / 'cache'}"]
    cfg = compose_config(args)
    run(cfg, tmp_path / "whole", runner=in_process(Engine(4, base=100)))
    with pytest.raises(Killed):
        run(cfg, tmp_path / "killed", runner=in_process(Engine(4, base=300), kill_at=(3, 2)))
    (tmp_path / "killed" / "summary.json").unlink()
    resumed = Engine(4, base=500)
    run(compose_config([*args, f"resume={tmp_path / 'killed'}"]), tmp_path / "ignored",
        runner=in_process(resumed))
    assert_same_results(tmp_path / "whole", tmp_path / "killed")
    assert all(PRIVACY in state for state in resumed.states().values())
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert all(v["steps"] > 0 for v in summary["dpsgd_by_client"].values())


def test_settings_carry_dpsgd_over_the_wire(small_run) -> None:
    """The settings JSON round-trips the DP-SGD settings; an unknown or bad key is refused; the
    default run has none."""
    assert small_run.settings.dpsgd is None
    assert compose_config([]).privacy.name == "none"
    dp = DPSettings(noise_multiplier=0.9, target_epsilon=None, accountant="prv")
    settings = ClientSettings(**{**small_run.settings.__dict__, "dpsgd": dp})
    assert ClientSettings.from_json(settings.to_json()).dpsgd == dp
    raw = json.loads(settings.to_json())
    raw["dpsgd"]["clip"] = 1.0
    with pytest.raises(ConfigError, match="clip"):
        ClientSettings.from_json(json.dumps(raw))
    raw["dpsgd"].pop("clip")
    raw["dpsgd"]["max_grad_norm"] = -1
    with pytest.raises(ConfigError, match="privacy.max_grad_norm"):
        ClientSettings.from_json(json.dumps(raw))
