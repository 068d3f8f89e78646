"""Which loss terms run where in a client's round: the digest, and the revisit's extras.

``distill.losses`` names the digest's terms (`fedkd.losses.specs`). A client has no teacher model
at hand, only what crossed the wire (soft targets, a relation, prototypes) and its own student,
so `check_client_losses` refuses terms that read a teacher's features or attention (FedDF's
server distillation takes those). `revisit_losses` is the revisit's loss: CE on the private
batch plus every private-row term of the spec other than ``ce`` (self-distillation from the
round-start snapshot, deep-to-shallow exits, the pull toward prototypes), at their weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedkd.errors import ConfigError
from fedkd.losses.response import CELoss, WeightedSum
from fedkd.losses.specs import LOSS_TERMS, WHERE, build_losses, check_losses

TEACHER_INPUTS = ("teacher_features", "attention", "teacher_attention")
"""Inputs only a holder of teacher models can give (server side)."""


def check_client_losses(spec: Mapping[str, Any] | None, temperature: float
                        ) -> dict[str, dict[str, Any]] | None:
    """`check_losses` for a client's digest: also refuses terms that need a teacher's features
    or attention (one line naming the term)."""
    checked = check_losses(spec, temperature)
    for name in checked or {}:
        if needs := [n for n in LOSS_TERMS[name].needs if n in TEACHER_INPUTS]:
            client_terms = sorted(t for t, cls in LOSS_TERMS.items()
                                  if not set(cls.needs) & set(TEACHER_INPUTS))
            raise ConfigError(f"{WHERE}.{name}", checked[name],
                              f"reads {needs[0]}, which a client never has (a teacher model's "
                              f"tap: use it in FedDF's strategy.flower.server_losses); client "
                              f"terms: {client_terms}")
    return checked


def revisit_losses(spec: Mapping[str, Any] | None, temperature: float) -> WeightedSum | None:
    """CE plus the spec's private-row terms other than ``ce``; None when there are none (the
    revisit is then plain CE, as without a spec)."""
    checked = check_losses(spec, temperature)
    extras = {name: options for name, options in (checked or {}).items()
              if name != "ce" and LOSS_TERMS[name].rows == "private" and options["weight"]}
    if not extras:
        return None
    terms = build_losses(extras, alpha=0.0, temperature=temperature).active_terms()
    return WeightedSum([(1.0, CELoss()), *terms])
