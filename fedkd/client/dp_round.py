"""A client's round under DP-SGD (``privacy=dpsgd``): the accountant restored, the private steps,
what the reply may say.

`open_private` returns None without DP, so a handler reads ``private.revisit(...) if private
else revisit(...)``. The accountant is created in the client's first DP round: the sampling rate
``min(1, batch_size / n)`` from its own row count, the noise multiplier configured or derived
(Opacus's ``get_noise_multiplier``) for the planned steps of the whole run; it lives in the
student's state (``Context.state``, and the node's checkpoint in deployment), so every later
round, a resumed run and a restarted node continue the same ledger.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedkd.client.state import Student
from fedkd.devices import model_device
from fedkd.dp_training import PrivateSteps, dp_digest, dp_revisit, noise_generator
from fedkd.dpsgd import (
    Accountant, budget_steps, derive_noise, planned_steps, sample_rate, steps_per_epoch,
)
from fedkd.losses import WeightedSum
from fedkd.protocol import DIGEST_LOSS, TRAIN_LOSS
from fedkd.settings import ClientSettings, TrainSettings

log = logging.getLogger(__name__)

PRIVATE_LOSSES = (TRAIN_LOSS, DIGEST_LOSS)
"""Reply metrics computed on private rows: not outputs of the DP model, never sent under DP."""


@dataclass
class PrivateRound:
    """One round's DP-SGD for a client: its ledger and the Opacus-wrapped model and optimizer."""

    accountant: Accountant
    steps: PrivateSteps

    def revisit(self, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int,
                gen: torch.Generator, steps: int | None = None) -> float:
        """`fedkd.dp_training.dp_revisit` (same keywords as `fedkd.training.revisit`)."""
        return dp_revisit(self.steps, x, y, epochs=epochs, batch_size=batch_size, gen=gen,
                          step_count=steps)

    def digest(self, transfer_x: torch.Tensor, soft: torch.Tensor, x: torch.Tensor,
               y: torch.Tensor, *, loss: WeightedSum, epochs: int, batch_size: int,
               gen: torch.Generator) -> float:
        """`fedkd.dp_training.dp_digest` (same keywords as `fedkd.training.digest`)."""
        return dp_digest(self.steps, transfer_x, soft, x, y, loss=loss, epochs=epochs,
                         batch_size=batch_size, gen=gen)

    def close(self, student: Student, metrics: dict[str, float | int]) -> None:
        """Unwrap the model, keep the ledger in the student's state, and make the reply's metrics
        say the spent (epsilon, delta) and the accountant's inputs instead of private losses."""
        self.steps.close()
        student.privacy = self.accountant.state_dict()
        for key in PRIVATE_LOSSES:
            metrics.pop(key, None)
        metrics.update(self.accountant.report())


def open_private(settings: ClientSettings, student: Student, num_rows: int, partition_id: int,
                 server_round: int, plan: Callable[[], tuple[int, int]]) -> PrivateRound | None:
    """This round's DP-SGD, or None when the run has none.

    Parameters
    ----------
    settings : ClientSettings
        The run (``settings.dpsgd``, the batch size, the number of rounds).
    student : Student
        The restored student; ``student.privacy`` holds the ledger of earlier rounds.
    num_rows : int
        The client's private rows.
    partition_id, server_round : int
        Seed the noise stream.
    plan : callable
        ``() -> (steps this round, steps per later round)``: called in the client's first DP
        round only, to derive the noise for a target epsilon.
    """
    dp = settings.dpsgd
    if dp is None:
        return None
    if student.privacy is not None:
        accountant = Accountant.from_state(dp, student.privacy)
    else:
        rate = sample_rate(settings.train.batch_size, num_rows)
        first, later = plan()
        steps = planned_steps(first, later, settings.num_rounds)
        accountant = Accountant(dp, derive_noise(dp, rate, steps), rate, steps)
        log.info("partition %d: DP-SGD noise multiplier %.4g, sample rate %.4g, %d planned steps",
                 partition_id, accountant.noise_multiplier, rate, steps)
    noise = noise_generator(settings.seed, partition_id, server_round,
                            model_device(student.model))
    return PrivateRound(accountant, PrivateSteps(student.model, student.optimizer, dp, accountant,
                                                 num_rows, noise))


def distill_plan(train: TrainSettings, num_rows: int, first: bool, digests: bool,
                 transfer_rows: int) -> tuple[int, int]:
    """DP-SGD steps of a ``train.distill`` round: (this round, each later round).

    A round's DP steps are its revisit's (when it revisits) and, when it digests with
    ``alpha < 1``, one per transfer mini-batch (the digest's CE term on private rows). Later
    rounds are assumed to digest `transfer_rows` rows (this round's ``next`` rows) when
    `transfer_rows` > 0.
    """
    batch = train.batch_size

    def steps(first_round: bool, digested: bool) -> int:
        count = 0
        if digested and train.alpha < 1:
            count += train.digest_epochs * steps_per_epoch(batch, transfer_rows)
        if train.revisits(first_round=first_round, digested=digested):
            count += budget_steps(train.local_budget(first_round=first_round), batch, num_rows)
        return count

    return steps(first, digests), steps(False, transfer_rows > 0)


def train_plan(train: TrainSettings, num_rows: int, first: bool) -> tuple[int, int]:
    """DP-SGD steps of a parameter-exchange ``train`` round (FedAvg, FedDF): its revisit budget,
    then the later rounds' budget."""
    batch = train.batch_size
    return (budget_steps(train.local_budget(first_round=first), batch, num_rows),
            budget_steps(train.local_budget(first_round=False), batch, num_rows))
