"""The fault plan (which clients, which rounds) and what each attack does to logits."""

from __future__ import annotations

import numpy as np
import pytest

from fedkd import reply_checks
from fedkd.errors import ConfigError
from fedkd.faults import (
    ATTACKS, CORRUPTIONS, Attack, FaultPlan, attack_logits, class_shift, corrupt_logits,
    plan_faults,
)
from fedkd.reply_checks import MAX_ABS_LOGIT, ReplyError

MIXED = {"byzantine": {"clients": 0.2, "attack": "random"},
         "crash": {"clients": 0.3, "probability": 0.3},
         "corrupt": {"clients": [9], "probability": 0.5}}


def _plan(spec=MIXED, clients=10, rounds=20, seed=0) -> FaultPlan:
    plan = plan_faults(spec, clients, rounds, round_timeout=5.0, seed=seed)
    assert plan is not None
    return plan


# --- the plan ---------------------------------------------------------------------------------
def test_the_plan_is_a_function_of_the_config_and_the_seed():
    assert _plan() == _plan()
    plans = [_plan(seed=s) for s in range(6)]
    assert len({p.clients["byzantine"] for p in plans}) > 1  # the seed picks other clients
    assert len({tuple(p.rounds["crash"].values())[0] for p in plans}) > 1


def test_faults_seed_overrides_the_run_seed():
    assert _plan({**MIXED, "seed": 3}, seed=0) == _plan(MIXED, seed=3)


def test_fractions_take_distinct_clients_and_lists_are_kept():
    plan = _plan()
    byzantine, crash = plan.clients["byzantine"], plan.clients["crash"]
    assert len(byzantine) == 2 and len(crash) == 3 and plan.clients["corrupt"] == (9,)
    assert not set(byzantine) & set(crash) and 9 not in set(byzantine) | set(crash)
    assert plan.faulty == tuple(sorted({*byzantine, *crash, 9}))
    assert set(plan.honest) == set(range(10)) - set(plan.faulty) and len(plan.honest) == 4


@pytest.mark.parametrize(("fraction", "count"), [(0.2, 1), (0.01, 1), (0.3, 2), (0.5, 3)])
def test_a_fraction_rounds_to_a_whole_number_of_clients(fraction, count):
    assert len(_plan({"crash": {"clients": fraction}}, clients=5).clients["crash"]) == count


def test_probability_picks_rounds_per_client_and_one_means_every_round():
    plan = _plan()
    assert all(r == tuple(range(1, 21)) for r in plan.rounds["byzantine"].values())
    crash = [len(r) for r in plan.rounds["crash"].values()]
    assert 0 < sum(crash) < 60 and len(set(plan.rounds["crash"].values())) == 3
    client = plan.clients["crash"][0]
    first = plan.rounds["crash"][client][0]
    assert plan.faults_at(client, first) == ("crash",)
    assert plan.faults_at(plan.honest[0], first) == ()


def test_describe_names_the_misbehaving_clients_for_the_summary():
    plan = _plan()
    described = plan.describe()
    assert described["byzantine"] == list(plan.clients["byzantine"])
    assert "byzantine_rounds" not in described  # every round
    assert described["crash_rounds"] == {str(c): list(r) for c, r in plan.rounds["crash"].items()}
    assert described["attack"] == "random" and described["claim"] is None
    assert described["corruption"] == "nan" and "sleep_s" not in described


def test_no_client_chosen_is_no_plan():
    assert plan_faults(None, 5, 3, 5.0) is None
    assert plan_faults({"byzantine": {"clients": 0}, "crash": {"clients": []}}, 5, 3, 5.0) is None


def test_hang_and_dropout_sleep_past_the_round_timeout_unless_told():
    assert _plan({"hang": {"clients": [0]}}).sleep_s == 6.0
    assert _plan({"dropout": {"clients": [0], "seconds": 0.5}}).sleep_s == 0.5


@pytest.mark.parametrize(("spec", "named"), [
    ({"byzantine": {"clients": 1.0}}, "faults.byzantine.clients=1.0"),
    ({"crash": {"clients": -0.1}}, "faults.crash.clients=-0.1"),
    ({"crash": {"clients": [10]}}, "faults.crash.clients[]=10"),
    ({"crash": {"clients": 0.5}, "hang": {"clients": 0.6}}, "faults.hang.clients=0.6"),
    ({"crash": {"clients": 0.2, "probability": 2}}, "faults.crash.probability=2"),
    ({"byzantine": {"clients": 0.2, "attack": "nice"}}, "faults.byzantine.attack='nice'"),
    ({"byzantine": {"clients": 0.2, "claim": -1}}, "faults.byzantine.claim=-1"),
    ({"corrupt": {"clients": 0.2, "kind": "zeros"}}, "faults.corrupt.kind='zeros'"),
    ({"crash": {"clients": 0.2, "when": 3}}, "faults.crash.when=3: is not an option of faults.crash"),
    ({"meteor": {}}, "faults.meteor={}: is not an option of faults"),
    ({"seed": -1, "crash": {"clients": 0.2}}, "faults.seed=-1"),
])
def test_bad_values_are_named(spec, named):
    with pytest.raises(ConfigError) as err:
        plan_faults(spec, 10, 3, 5.0)
    assert str(err.value).startswith(named), str(err.value)


# --- attacks: golden values ---------------------------------------------------------------------
X = np.array([[1.0, 3.0, 2.0], [0.5, -1.0, 4.0]])


def test_class_shift_is_a_seeded_derangement():
    assert [class_shift(s, 3) for s in range(3)] == [1, 2, 2]
    assert class_shift(0, 1) == 0
    assert all(1 <= class_shift(s, 10) <= 9 for s in range(20))


@pytest.mark.parametrize(("attack", "expected"), [
    (Attack("none"), X),
    (Attack("sign_flip"), -X),
    (Attack("scaled", scale=10.0), 10 * X),
    (Attack("confident_wrong", margin=20.0), [[0.0, 0.0, 20.0], [20.0, 0.0, 0.0]]),  # shift 1
    (Attack("label_flip"), [[2.0, 1.0, 3.0], [4.0, 0.5, -1.0]]),  # class c -> c + 1
    (Attack("fixed_class", margin=5.0, target=2), [[0.0, 0.0, 5.0], [0.0, 0.0, 5.0]]),
])
def test_attack_golden_values(attack, expected):
    out = attack_logits(X, attack, seed=0, client=1, server_round=1)
    assert out.dtype == np.float32 and out.shape == X.shape
    np.testing.assert_array_equal(out, np.asarray(expected, np.float32))


def test_confident_wrong_and_label_flip_never_keep_the_honest_class():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 10))
    for seed in range(5):
        for name in ("confident_wrong", "label_flip"):
            out = attack_logits(x, Attack(name), seed, 0, 1)
            assert (out.argmax(1) != x.argmax(1)).all()


def test_random_attack_is_seeded_per_client_and_round():
    a = attack_logits(X, Attack("random", margin=2.0), 0, 1, 1)
    np.testing.assert_array_equal(a, attack_logits(X, Attack("random", margin=2.0), 0, 1, 1))
    assert not np.array_equal(a, attack_logits(X, Attack("random", margin=2.0), 0, 1, 2))
    assert not np.array_equal(a, attack_logits(X, Attack("random", margin=2.0), 0, 2, 1))
    np.testing.assert_allclose(a, [[1.3485771, 0.6520982, 1.8895991],
                                   [0.7721074, 0.9885557, -1.2918144]], rtol=1e-6)


@pytest.mark.parametrize("name", ATTACKS)
def test_every_attack_passes_the_servers_checks(name):
    huge = X * 1e6
    out = attack_logits(huge, Attack(name, scale=1e4, margin=1e4), 0, 0, 1)
    reply_checks.logits(out, X.shape, "logits.logits")  # clipped to MAX_ABS_LOGIT
    assert np.abs(out).max() <= MAX_ABS_LOGIT


def test_fixed_class_outside_the_classes_is_refused():
    with pytest.raises(ValueError, match="target=3 is not a class in 0..2"):
        attack_logits(X, Attack("fixed_class", target=3), 0, 0, 1)


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_every_corruption_fails_the_servers_logit_check(kind):
    out = corrupt_logits(X.astype(np.float32), kind)
    with pytest.raises(ReplyError):
        reply_checks.logits(out, X.shape, "logits.logits")
