"""Simulated adversaries and faults: which clients misbehave, in which rounds, and how.

A `FaultPlan` is a pure function of the ``faults`` config, the number of clients and rounds, and
``faults.seed`` (the run's ``seed`` unless set): the same config picks the same clients and
rounds on any machine. The client side (`fedkd.client.faults`) applies it to the honest replies;
the results record it (``summary.json``: ``faults``, ``honest_clients``,
``final_mean_accuracy_honest``). Nothing here imports Flower.

Fault kinds (each: ``clients``, a fraction of the clients or a list of partition ids, and
``probability``, the chance that a chosen client misbehaves in a given round):

- ``byzantine``: the reply's logits are replaced by an `ATTACKS` transform of the honest ones
  (and ``claim`` replaces the reported example count);
- ``crash``: the handler raises instead of running (an error reply; no training that round);
- ``hang``: the handler runs, then sleeps ``seconds`` before replying (past the round timeout:
  the reply is late and discarded);
- ``dropout``: the node is gone for the round: it sleeps ``seconds`` without training, then fails;
- ``corrupt``: the reply's logits are garbage the server's reply guard must drop (`CORRUPTIONS`).

Clients picked by fraction are drawn from one seeded permutation, in the order of `KINDS`, so
two kinds never share a client; listed clients are taken as given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

import numpy as np

from fedkd.errors import ConfigError
from fedkd.reply_checks import MAX_ABS_LOGIT

KINDS = ("byzantine", "crash", "hang", "dropout", "corrupt")
"""Every fault kind, in the order clients are drawn for them."""
ATTACKS = ("none", "random", "sign_flip", "confident_wrong", "label_flip", "fixed_class", "scaled")
"""Byzantine logit attacks (``none``: honest logits; the clients still count as Byzantine)."""
CORRUPTIONS = ("nan", "inf", "huge", "shape")
"""How a corrupted reply's logits are broken (each fails `fedkd.reply_checks.logits`)."""
EXTRA_SLEEP_S = 1.0
"""A hanging or dropped-out client sleeps this much past the round timeout by default."""
_SALT = {kind: i + 1 for i, kind in enumerate(KINDS)}  # keys the per-kind random streams
_SHIFT_SALT = 101  # the class shift of label_flip / confident_wrong
_NOISE_SALT = 102  # the random attack's noise


@dataclass(frozen=True)
class Attack:
    """What a Byzantine client does to its reply.

    Attributes
    ----------
    name : str
        One of `ATTACKS`.
    margin : float
        Logit gap of the confident attacks (``confident_wrong``, ``fixed_class``); the standard
        deviation of ``random``.
    scale : float
        Factor of ``scaled``.
    target : int
        The class ``fixed_class`` pushes on every sample.
    claim : int or None
        Examples the client claims to hold (None: the truth). Above its partition's size the
        server's reply guard drops the reply.
    """

    name: str = "none"
    margin: float = 20.0
    scale: float = 100.0
    target: int = 0
    claim: int | None = None


@dataclass(frozen=True)
class FaultPlan:
    """Who misbehaves how, and when.

    Attributes
    ----------
    num_clients, num_rounds, seed : int
        The run the plan is for; `seed` keys every random choice of the plan and the attacks.
    clients : dict
        Kind -> the partition ids chosen for it (sorted).
    rounds : dict
        Kind -> partition id -> the rounds (1-based, sorted) it misbehaves in.
    attack : Attack
        The Byzantine clients' attack.
    corruption : str
        How corrupted replies are broken (`CORRUPTIONS`).
    sleep_s : float
        How long a hanging or dropped-out client sleeps.
    """

    num_clients: int
    num_rounds: int
    seed: int
    clients: dict[str, tuple[int, ...]] = field(default_factory=dict)
    rounds: dict[str, dict[int, tuple[int, ...]]] = field(default_factory=dict)
    attack: Attack = Attack()
    corruption: str = "nan"
    sleep_s: float = 0.0

    @property
    def faulty(self) -> tuple[int, ...]:
        """Every client a fault kind chose (sorted)."""
        return tuple(sorted({c for chosen in self.clients.values() for c in chosen}))

    @property
    def honest(self) -> tuple[int, ...]:
        """The clients no fault kind chose (sorted)."""
        faulty = set(self.faulty)
        return tuple(c for c in range(self.num_clients) if c not in faulty)

    def faults_at(self, client: int, server_round: int) -> tuple[str, ...]:
        """The kinds of fault `client` shows in `server_round` (in `KINDS` order)."""
        return tuple(kind for kind in KINDS
                     if server_round in self.rounds.get(kind, {}).get(client, ()))

    def describe(self) -> dict[str, Any]:
        """The plan for ``summary.json``: the chosen clients of each kind (``byzantine: [4, 6]``),
        the attack, and for a kind whose clients skip some rounds, client -> the rounds it acts
        in (``crash_rounds: {"2": [1, 3]}``; JSON keys are strings)."""
        out: dict[str, Any] = {"seed": self.seed}
        for kind in KINDS:
            if not self.clients.get(kind):
                continue
            out[kind] = list(self.clients[kind])
            every = tuple(range(1, self.num_rounds + 1))
            if any(r != every for r in self.rounds[kind].values()):
                out[f"{kind}_rounds"] = {str(c): list(r) for c, r in self.rounds[kind].items()}
        if self.clients.get("byzantine"):
            out["attack"] = self.attack.name
            out["claim"] = self.attack.claim
        if self.clients.get("corrupt"):
            out["corruption"] = self.corruption
        if self.clients.get("hang") or self.clients.get("dropout"):
            out["sleep_s"] = self.sleep_s
        return out


def plan_faults(spec: Mapping[str, Any] | None, num_clients: int, num_rounds: int,
                round_timeout: float, seed: int = 0) -> FaultPlan | None:
    """The `FaultPlan` of a ``faults`` config, or None when no kind chooses any client.

    Parameters
    ----------
    spec : mapping or None
        The ``faults`` config group (``conf/faults/``): ``seed`` (optional: `seed` is used
        without it) and one mapping per kind of `KINDS`.
    round_timeout : float
        The run's round timeout: the default sleep of hanging and dropped-out clients is this
        plus `EXTRA_SLEEP_S`.

    Raises
    ------
    ConfigError
        A value outside what is allowed, named as ``faults.<kind>.<key>``.
    """
    if not spec:
        return None
    unknown = set(spec) - {"seed", *KINDS}
    if unknown:
        raise ConfigError(f"faults.{sorted(unknown)[0]}", spec[sorted(unknown)[0]],
                          f"is not an option of faults; options: seed, {', '.join(KINDS)}")
    if spec.get("seed") is not None:
        seed = _int("faults.seed", spec["seed"], 0)
    order = [int(c) for c in np.random.default_rng([seed, 0]).permutation(num_clients)]
    listed = {c for kind in KINDS for c in _listed(spec.get(kind), num_clients, kind)}
    pool = [c for c in order if c not in listed]
    clients: dict[str, tuple[int, ...]] = {}
    rounds: dict[str, dict[int, tuple[int, ...]]] = {}
    for kind in KINDS:
        part = spec.get(kind) or {}
        _known_keys(kind, part)
        chosen, pool = _choose(kind, part.get("clients", 0), num_clients, pool)
        probability = _number(f"faults.{kind}.probability", part.get("probability", 1.0), 0.0, 1.0)
        if chosen:
            clients[kind] = chosen
            rounds[kind] = {c: _rounds(seed, kind, c, num_rounds, probability) for c in chosen}
    if not clients:
        return None
    byzantine = spec.get("byzantine") or {}
    attack = Attack(
        name=_choice("faults.byzantine.attack", byzantine.get("attack", "none"), ATTACKS),
        margin=_number("faults.byzantine.margin", byzantine.get("margin", 20.0), 0.0, MAX_ABS_LOGIT),
        scale=_number("faults.byzantine.scale", byzantine.get("scale", 100.0), -MAX_ABS_LOGIT,
                      MAX_ABS_LOGIT),
        target=_int("faults.byzantine.target", byzantine.get("target", 0), 0),
        claim=None if byzantine.get("claim") is None else _int("faults.byzantine.claim",
                                                                byzantine["claim"], 0),
    )
    corruption = _choice("faults.corrupt.kind", (spec.get("corrupt") or {}).get("kind", "nan"),
                         CORRUPTIONS)
    default_sleep = _number("simulation.round_timeout", round_timeout, 0.0) + EXTRA_SLEEP_S
    sleep_s = 0.0
    for kind in ("hang", "dropout"):
        seconds = (spec.get(kind) or {}).get("seconds")
        if seconds is not None:
            seconds = _number(f"faults.{kind}.seconds", seconds, 0.0, 3600.0)
        if kind in clients:
            sleep_s = max(sleep_s, default_sleep if seconds is None else seconds)
    return FaultPlan(num_clients=num_clients, num_rounds=num_rounds, seed=seed, clients=clients,
                     rounds=rounds, attack=attack, corruption=corruption, sleep_s=sleep_s)


# --- what the faults do to a reply: pure functions of arrays -----------------------------------
def class_shift(seed: int, num_classes: int) -> int:
    """The run's class shift in ``1..C-1`` (``label_flip``, ``confident_wrong``): class c is
    replaced by ``(c + shift) % C``, a permutation without fixed points (0 when C = 1)."""
    if num_classes < 2:
        return 0
    return int(np.random.default_rng([seed, _SHIFT_SALT]).integers(1, num_classes))


def attack_logits(logits: np.ndarray, attack: Attack, seed: int, client: int,
                  server_round: int) -> np.ndarray:
    """A Byzantine client's logits ``[..., C]`` in place of its honest `logits` (float32).

    ``random``: N(0, margin^2) noise, drawn from ``(seed, client, round)``; ``sign_flip``:
    ``-logits``; ``confident_wrong``: ``margin`` on ``(argmax + shift) % C``, 0 elsewhere;
    ``label_flip``: class c's logit moved to ``(c + shift) % C``; ``fixed_class``: ``margin`` on
    class ``target`` for every row; ``scaled``: ``scale * logits``. The result is clipped to
    ``MAX_ABS_LOGIT`` so that it passes the server's bound: the attacker knows the rules.
    """
    x = np.asarray(logits, dtype=np.float64)
    c = x.shape[-1]
    shift = class_shift(seed, c)
    name = attack.name
    if name == "none":
        out = x
    elif name == "random":
        rng = np.random.default_rng([seed, _NOISE_SALT, client, server_round])
        out = rng.normal(0.0, attack.margin, size=x.shape)
    elif name == "sign_flip":
        out = -x
    elif name == "confident_wrong":
        out = one_hot((x.argmax(axis=-1) + shift) % c, c) * attack.margin
    elif name == "label_flip":
        out = np.roll(x, shift, axis=-1)
    elif name == "fixed_class":
        if attack.target >= c:
            raise ValueError(f"faults.byzantine.target={attack.target} is not a class in 0..{c - 1}")
        out = np.broadcast_to(one_hot(np.array(attack.target), c) * attack.margin, x.shape)
    elif name == "scaled":
        out = x * attack.scale
    else:
        raise ValueError(f"unknown attack {name!r}; allowed: {', '.join(ATTACKS)}")
    return np.clip(out, -MAX_ABS_LOGIT, MAX_ABS_LOGIT).astype(np.float32)


def corrupt_logits(logits: np.ndarray, kind: str) -> np.ndarray:
    """Logits broken as `kind` says (`CORRUPTIONS`): all NaN, all +inf, ``10 * MAX_ABS_LOGIT``,
    or one row short."""
    x = np.asarray(logits, dtype=np.float32)
    if kind == "nan":
        return np.full_like(x, np.nan)
    if kind == "inf":
        return np.full_like(x, np.inf)
    if kind == "huge":
        return np.full_like(x, 10 * MAX_ABS_LOGIT)
    if kind == "shape":
        return x[:-1].copy() if len(x) > 1 else np.zeros((len(x) + 1, *x.shape[1:]), np.float32)
    raise ValueError(f"unknown corruption {kind!r}; allowed: {', '.join(CORRUPTIONS)}")


def one_hot(index: np.ndarray, num_classes: int) -> np.ndarray:
    """``[..., C]`` float64 one-hot rows of the integer array `index`."""
    return np.eye(num_classes)[np.asarray(index, dtype=np.int64)]


# --- config reading --------------------------------------------------------------------------
_KEYS = {
    "byzantine": {"clients", "probability", "attack", "margin", "scale", "target", "claim"},
    "crash": {"clients", "probability"},
    "hang": {"clients", "probability", "seconds"},
    "dropout": {"clients", "probability", "seconds"},
    "corrupt": {"clients", "probability", "kind"},
}


def _known_keys(kind: str, part: Mapping[str, Any]) -> None:
    if not isinstance(part, Mapping):
        raise ConfigError(f"faults.{kind}", part,
                          f"must be a mapping with keys {', '.join(sorted(_KEYS[kind]))}")
    unknown = set(part) - _KEYS[kind]
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"faults.{kind}.{key}", part[key], f"is not an option of faults.{kind}; "
                          f"options: {', '.join(sorted(_KEYS[kind]))}")


def _listed(part: Any, num_clients: int, kind: str) -> list[int]:
    clients = (part or {}).get("clients", 0) if isinstance(part, Mapping) else 0
    if isinstance(clients, Sequence) and not isinstance(clients, str):
        return [_int(f"faults.{kind}.clients[]", c, 0, num_clients - 1) for c in clients]
    return []


def _choose(kind: str, clients: Any, num_clients: int,
            pool: list[int]) -> tuple[tuple[int, ...], list[int]]:
    """The clients of `kind`: a list as given, or ``round(fraction * num_clients)`` (at least 1
    for a fraction > 0) from the front of `pool`. Returns them and what is left of the pool."""
    name = f"faults.{kind}.clients"
    if isinstance(clients, Sequence) and not isinstance(clients, str):
        chosen = sorted({_int(f"{name}[]", c, 0, num_clients - 1) for c in clients})
        return tuple(chosen), pool
    fraction = _number(name, clients, 0.0, 1.0)
    if fraction >= 1.0:
        raise ConfigError(name, clients, f"must be a fraction in [0, 1) or a list of "
                          f"partition ids in 0..{num_clients - 1}")
    count = 0 if fraction == 0 else max(1, math.floor(fraction * num_clients + 0.5))
    if count > len(pool):
        raise ConfigError(name, clients, f"asks for {count} clients but only {len(pool)} of "
                          f"{num_clients} are left (fault kinds never share a drawn client)")
    return tuple(sorted(pool[:count])), pool[count:]


def _rounds(seed: int, kind: str, client: int, num_rounds: int,
            probability: float) -> tuple[int, ...]:
    """The rounds in which `client` shows `kind`: each with `probability`, seeded per client."""
    draws = np.random.default_rng([seed, _SALT[kind], client]).random(num_rounds)
    return tuple(int(r) + 1 for r in np.flatnonzero(draws < probability))


def _number(name: str, value: Any, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) \
            or not low <= value <= high:
        allowed = f">= {low:g}" if math.isinf(high) else f"in [{low:g}, {high:g}]"
        raise ConfigError(name, value, f"must be a number {allowed}")
    return float(value)


def _int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low \
            or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in {low}..{high}"
        raise ConfigError(name, value, f"must be an int {allowed}")
    return int(value)


def _choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ConfigError(name, value, f"must be one of {', '.join(allowed)}")
    return str(value)
