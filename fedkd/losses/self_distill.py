"""Self-distillation: the student as its own teacher, across rounds (an earlier snapshot) or across
depth (the final logits teaching the auxiliary exits). The teaching side is detached."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedkd.aggregation import check_temperature
from fedkd.losses._checks import need
from fedkd.losses.response import _fmt


def _kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """``T**2 * KL(softmax(teacher / T) || softmax(student / T))``, batch mean; the teacher detached.

    Both sides as log-probabilities (``log_target``), so equal logits give exactly 0.
    """
    if student_logits.dim() != 2 or teacher_logits.shape != student_logits.shape:
        raise ValueError(f"logits {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)} must both "
                         "be [N, C]")
    log_q = F.log_softmax(student_logits / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().to(log_q.dtype) / t, dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * t**2


class SnapshotKD(nn.Module):
    """Self-KD from the student's own earlier snapshot:
    ``T**2 * KL(softmax(snapshot_logits / T) || softmax(student_logits / T))``, batch mean.

    Yang et al., "Snapshot Distillation: Teacher-Student Optimization in One Generation", CVPR
    2019, distil a network from its own snapshot of an earlier training cycle; here the snapshot is
    the client's student of an earlier round. No gradient flows into ``snapshot_logits``.

    Parameters
    ----------
    temperature : float
        Softmax temperature T > 0.
    """

    needs: tuple[str, ...] = ("snapshot_logits",)
    rows: str = "private"

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)

    def forward(self, student_logits: torch.Tensor, *,
                snapshot_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Self-KD for logits ``[N, C]`` against the snapshot's logits ``[N, C]`` on the same rows."""
        snapshot = need("snapshot_logits", snapshot_logits, "SnapshotKD", "the snapshot's logits [N, C]")
        return _kd(student_logits, snapshot, self.temperature)

    def __str__(self) -> str:
        return f"SelfKD(T={_fmt(self.temperature)})"

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class ExitDistill(nn.Module):
    """Deep-to-shallow self-distillation: every auxiliary exit distils from the final logits.

    ``mean over exits e of T**2 * KL(softmax(student_logits / T) || softmax(e / T))`` (batch mean),
    the final logits detached, as in Zhang et al., "Be Your Own Teacher: Improve the Performance of
    Convolutional Neural Networks via Self Distillation", ICCV 2019 (its KL part; the exits' own CE
    is a separate term's business, and its feature hints are not used).

    Parameters
    ----------
    temperature : float
        Softmax temperature T > 0.
    """

    needs: tuple[str, ...] = ("exit_logits",)
    rows: str = "private"

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)

    def forward(self, student_logits: torch.Tensor, *,
                exit_logits: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Mean KD of the exits' logits (each ``[N, C]``, shallow first) from the final ``[N, C]``."""
        exits = need("exit_logits", exit_logits, "ExitDistill", "a tuple of the exits' logits [N, C]")
        if len(exits) == 0:
            raise ValueError("ExitDistill needs at least one exit in exit_logits (the model has none)")
        values = [_kd(logits, student_logits, self.temperature) for logits in exits]
        return torch.stack(values).mean()

    def __str__(self) -> str:
        return f"ExitKD(T={_fmt(self.temperature)})"

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
