"""Whether a run's numbers can be trusted: ``ok``, ``degraded``, ``failed`` or ``interrupted``.

The `Recorder`'s `fedkd.simulations.ledger.Ledger` collects the facts as the run goes: per
training round, who was asked, who answered, which replies were dropped and whether the strategy
aggregated enough of them (`RoundFacts`); per client, its last evaluation. `run_status` turns
them into the summary's ``status`` and ``status_reasons``, short sentences a reader can act on:

- ``interrupted``: a signal stopped the run;
- ``failed``: the run raised, no client ever reported an accuracy, no training round got one
  valid reply, or the accuracy stayed at chance (``1 / num_classes + CHANCE_MARGIN``) while no
  soft targets ever formed;
- ``degraded``: it finished, but some client failed (error reply, no reply, timed out) in some
  rounds, replies were dropped as malformed, a round aggregated fewer than ``min_replies`` valid
  replies, or a client's final accuracy is not from the final evaluation (stale, or none at all);
- ``ok``: none of the above.

Everything here is a pure function of its arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

OK, DEGRADED, FAILED, INTERRUPTED = "ok", "degraded", "failed", "interrupted"
STATUSES = (OK, DEGRADED, INTERRUPTED, FAILED)
"""Every status, from best to worst."""
USABLE = (OK, DEGRADED)
"""Statuses whose numbers may be compared (`fedkd-compare` ranks these, flags ``degraded``)."""
CHANCE_MARGIN = 0.05
"""Accuracy up to ``1 / num_classes + CHANCE_MARGIN`` counts as chance."""


@dataclass
class RoundFacts:
    """What happened to one training round's replies.

    Attributes
    ----------
    asked : int
        Clients the round's train wave should have asked: those it asked (sent, or skipped while
        busy with an old message), at least the configured sample (a node that is gone counts).
    answered : int
        Replies that reported a partition id (error replies and dropped replies do not).
    failed : set of int
        Partition ids known to have failed this round (error reply, no reply, timed out).
    unidentified : int
        Failures whose partition is not known (a node that never answered under partial
        participation).
    dropped : int
        Replies dropped as malformed: by the wire (`fedkd.wire.WireStats.dropped`) or by the
        strategy's reply parser (its ``rejected-replies``).
    valid : int or None
        Replies the strategy aggregated; None when it reported nothing (it aggregates nothing).
    below_min : bool
        Fewer than ``min_replies`` valid replies: the previous soft targets stayed.
    """

    asked: int = 0
    answered: int = 0
    failed: set[int] = field(default_factory=set)
    unidentified: int = 0
    dropped: int = 0
    valid: int | None = None
    below_min: bool = False


@dataclass
class RunFacts:
    """What `run_status` judges a finished run by.

    Attributes
    ----------
    num_clients : int
        Clients (partitions) of the run.
    num_classes : int or None
        Classes of the task (None: no chance check).
    last_eval : dict
        Client -> (round, test accuracy) of its last evaluation; clients that never reported
        one are absent.
    rounds : dict
        Training round -> `RoundFacts`.
    best_mean_accuracy : float or None
        The best round's mean test accuracy over the clients evaluated in it.
    full_final : bool
        Whether every client is asked every round (then a client without an evaluation in the
        final round is stale; under partial participation unsampled clients keep an older one).
    first_error : str or None
        The first error a client replied with.
    """

    num_clients: int
    num_classes: int | None = None
    last_eval: dict[int, tuple[int, float]] = field(default_factory=dict)
    rounds: dict[int, RoundFacts] = field(default_factory=dict)
    best_mean_accuracy: float | None = None
    full_final: bool = True
    first_error: str | None = None


def run_status(outcome: str, facts: RunFacts, error: str | None = None,
               stop_signal: str | None = None, last_round: int = 0) -> tuple[str, list[str]]:
    """The run's status and the reasons for it (empty for ``ok``).

    Parameters
    ----------
    outcome : str
        How the run ended: ``ok`` (the runner returned), ``failed`` (it raised `error`) or
        ``interrupted`` (by `stop_signal`, after `last_round`).
    facts : RunFacts
        What the recorder saw.
    """
    if outcome == INTERRUPTED:
        return INTERRUPTED, [f"stopped by {stop_signal or 'a signal'} after round {last_round}"]
    if outcome == FAILED:
        error = error or facts.first_error or "failed without an error message"
        return FAILED, [error, *degradation_reasons(facts, first_error=False)]
    failed = failure_reasons(facts)
    if failed:
        return FAILED, [*failed, *degradation_reasons(facts, first_error=False)]
    degraded = degradation_reasons(facts)
    return (DEGRADED, degraded) if degraded else (OK, [])


def failure_reasons(facts: RunFacts) -> list[str]:
    """Why a run that finished has no valid result (empty: it has one)."""
    first = f"; first error: {first_line(facts.first_error)}" if facts.first_error else ""
    if not facts.last_eval:
        return [f"no client reported a test accuracy{first}"]
    trained = [r for r, f in facts.rounds.items() if f.asked]
    if trained and not any(facts.rounds[r].answered for r in trained):
        return [f"no valid reply in any of the {len(trained)} training rounds{first}"]
    reasons = []
    chance = chance_level(facts.num_classes)
    formed = targets_formed(facts.rounds.values())
    if (chance is not None and formed is False and facts.best_mean_accuracy is not None
            and facts.best_mean_accuracy <= chance):
        reasons.append(f"accuracy stayed at chance (best round mean {facts.best_mean_accuracy:.3f} "
                       f"<= 1/{facts.num_classes} + {CHANCE_MARGIN}) and no soft targets ever "
                       "formed (no round had enough valid replies)")
    return reasons


def degradation_reasons(facts: RunFacts, first_error: bool = True) -> list[str]:
    """Why a run's numbers are worse than its settings promise (empty: they are not); with
    `first_error`, the first error a client replied with follows the failed clients."""
    rounds = facts.rounds
    trained = sorted(r for r, f in rounds.items() if f.asked)
    reasons = []
    for client, failed in sorted(failed_rounds(rounds).items()):
        every = " (every round)" if len(failed) == len(trained) else ""
        reasons.append(f"client {client} failed in {len(failed)} of {len(trained)} training "
                       f"rounds{every}: {rounds_text(failed)}")
    unknown = {r: f.unidentified for r, f in rounds.items() if f.unidentified}
    if unknown:
        reasons.append(f"{replies(sum(unknown.values()))} missing from unidentified clients in "
                       f"{rounds_text(unknown)}")
    if (failed_rounds(rounds) or unknown) and facts.first_error and first_error:
        reasons.append(f"first error: {first_line(facts.first_error)}")
    dropped = {r: f.dropped for r, f in rounds.items() if f.dropped}
    if dropped:
        reasons.append(f"{replies(sum(dropped.values()))} dropped as malformed in "
                       f"{rounds_text(dropped)}")
    below = [r for r, f in rounds.items() if f.below_min]
    if below:
        reasons.append(f"fewer valid replies than min_replies in {rounds_text(below)}: the soft "
                       "targets of the round before stayed")
    reasons += final_reasons(facts)
    return reasons


def final_reasons(facts: RunFacts) -> list[str]:
    """Under full participation, clients whose final accuracy is missing or older than the rest.

    Under partial participation a client without an evaluation may simply never have been
    sampled (10,000 clients, 100 a round): not a fault. One that was asked and failed is named
    by the failure reasons (`failed_rounds`)."""
    reasons: list[str] = []
    if not facts.last_eval:  # no result at all: a failure (`failure_reasons`), not per client
        return reasons
    final = max(r for r, _ in facts.last_eval.values())
    for client in range(facts.num_clients if facts.full_final else 0):
        if client not in facts.last_eval:
            reasons.append(f"client {client} never reported a test accuracy (null in "
                           "final_accuracy_by_client, left out of the final mean)")
        elif facts.last_eval[client][0] != final:
            reasons.append(f"client {client}'s final accuracy is stale: from round "
                           f"{facts.last_eval[client][0]}, not the final round {final}")
    return reasons


def failed_rounds(rounds: Mapping[int, RoundFacts]) -> dict[int, list[int]]:
    """Client -> the sorted training rounds in which it is known to have failed."""
    out: dict[int, list[int]] = {}
    for server_round in sorted(rounds):
        for client in rounds[server_round].failed:
            out.setdefault(client, []).append(server_round)
    return dict(sorted(out.items()))


def targets_formed(rounds: Iterable[RoundFacts]) -> bool | None:
    """Whether any round aggregated enough replies; None when the strategy reports none."""
    reported = [f for f in rounds if f.valid is not None]
    return any(not f.below_min for f in reported) if reported else None


def chance_level(num_classes: int | None) -> float | None:
    """The accuracy that counts as chance: ``1 / num_classes + CHANCE_MARGIN``."""
    return 1.0 / num_classes + CHANCE_MARGIN if num_classes and num_classes > 0 else None


def rounds_text(rounds: Iterable[int]) -> str:
    """``round 2`` or ``rounds 1-3, 5``."""
    values = sorted(set(rounds))
    return f"round{'s' if len(values) > 1 else ''} {span(values)}"


def replies(count: int) -> str:
    """``1 reply``, ``3 replies``."""
    return f"{count} repl{'y' if count == 1 else 'ies'}"


def span(rounds: Iterable[int]) -> str:
    """Rounds as short text: ``1-3, 5``."""
    values = sorted(set(rounds))
    parts, start = [], None
    for i, r in enumerate(values):
        start = r if start is None else start
        if i + 1 == len(values) or values[i + 1] != r + 1:
            parts.append(str(r) if r == start else f"{start}-{r}")
            start = None
    return ", ".join(parts)


def first_line(text: str | None) -> str:
    """The last non-empty line of an error (a traceback's ``Type: message``), shortened."""
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= 200 else line[:197] + "..."
