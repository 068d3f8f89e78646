"""Response-based losses (on logits), the one input vocabulary, and the weighted composition.

Every loss is an ``nn.Module`` called as ``term(student_logits, **inputs)`` that returns a scalar; it
declares the keyword inputs it reads (``needs``, names from `INPUTS`) and the rows the caller
evaluates it on (``rows``, one of `ROWS`). In a fedkd client the KD term runs on the transfer batch
and the CE term on private data, so a :class:`WeightedSum` is usually not called on one batch: the
caller evaluates each of ``active_terms()`` on its own rows, with the inputs it ``needs``, and
passes the values to ``combine``. Terms with weight 0 are not active, so their forward pass (and its
side effects on BatchNorm statistics and the random stream) never happens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real

import torch
import torch.nn.functional as F
from torch import nn

from fedkd.aggregation import check_temperature
from fedkd.errors import ConfigError

INPUTS: tuple[str, ...] = (
    "soft_targets",       # [N, C] teacher probabilities at the term's temperature
    "labels",             # [N] int64 class indices
    "features",           # the student's tap on these rows: [N, D], [N, C, H, W] / [N, C, L] or [N, T, D]
    "teacher_features",   # the teacher's tap on the same rows
    "attention",          # the student's transformer attention weights [N, heads, T, T]
    "teacher_attention",  # the teacher's attention weights [N, heads, T, T]
    "relation",           # a target similarity matrix [N, N] (e.g. aggregated from other clients)
    "prototypes",         # [C, P] class prototypes; NaN rows: classes nobody reported
    "snapshot_logits",    # [N, C] logits of the same student's earlier snapshot on these rows
    "exit_logits",        # tuple of [N, C] logits of the auxiliary exits, shallow first
)
"""Every keyword input a loss may read (its ``needs``); callers compute only those the active terms need."""

ROWS: tuple[str, ...] = ("transfer", "private")
"""Where a term runs: ``transfer`` (the transfer batch) or ``private`` (a private batch with labels)."""


def _fmt(x: float) -> str:
    """Short float for formulas: 0.5, 1.0, 0.3 (not 0.30000000000000004)."""
    text = f"{x:.6g}"
    return text if any(c in text for c in ".eni") else text + ".0"


def term_inputs(term: nn.Module, inputs: Mapping[str, object]) -> dict[str, object]:
    """The entries of `inputs` that `term` ``needs`` (those missing are left out: the term says so)."""
    return {name: inputs[name] for name in term.needs if name in inputs}


class KDLoss(nn.Module):
    """Hinton KD: ``T**2 * KL(soft_targets || softmax(student_logits / T))``, averaged over the batch.

    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015.

    Parameters
    ----------
    temperature : float
        Softmax temperature T > 0; ``soft_targets`` must be teacher probabilities at this same T.
    """

    needs: tuple[str, ...] = ("soft_targets",)
    rows: str = "transfer"

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)

    def forward(
        self,
        student_logits: torch.Tensor,
        *,
        soft_targets: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """KD loss for logits ``[N, C]`` and teacher probabilities ``soft_targets`` ``[N, C]`` (rows sum to 1)."""
        if soft_targets is None:
            raise ValueError("KDLoss needs soft_targets (teacher probabilities [N, C])")
        if soft_targets.shape != student_logits.shape or student_logits.dim() != 2:
            raise ValueError(
                f"KDLoss: soft_targets {tuple(soft_targets.shape)} and student_logits "
                f"{tuple(student_logits.shape)} must both be [N, C]"
            )
        t = self.temperature
        log_q = F.log_softmax(student_logits / t, dim=-1)
        return F.kl_div(log_q, soft_targets.to(log_q.dtype), reduction="batchmean") * t**2

    def __str__(self) -> str:
        return f"KD(T={_fmt(self.temperature)})"

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class CELoss(nn.Module):
    """Cross-entropy of the student logits against integer ``labels``, averaged over the batch."""

    needs: tuple[str, ...] = ("labels",)
    rows: str = "private"

    def forward(
        self,
        student_logits: torch.Tensor,
        *,
        soft_targets: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """CE loss for logits ``[N, C]`` and labels ``[N]``."""
        if labels is None:
            raise ValueError("CELoss needs labels (class indices [N])")
        return F.cross_entropy(student_logits, labels)

    def __str__(self) -> str:
        return "CE"


def _declares(term: nn.Module) -> bool:
    needs, rows = getattr(term, "needs", None), getattr(term, "rows", None)
    return (isinstance(needs, tuple) and all(name in INPUTS for name in needs)
            and isinstance(rows, str) and rows in ROWS)


class WeightedSum(nn.Module):
    """``sum_i w_i * term_i``, where terms with ``w_i == 0`` are skipped entirely.

    Parameters
    ----------
    terms : sequence of (float, nn.Module)
        Weights (finite) and losses with the shared call signature (each declaring ``needs`` and
        ``rows``).
    """

    def __init__(self, terms: Sequence[tuple[float, nn.Module]]) -> None:
        super().__init__()
        if not terms:
            raise ConfigError("WeightedSum needs at least one (weight, loss) term")
        for weight, term in terms:
            if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(weight):
                raise ConfigError(f"WeightedSum: weight {weight!r} of {term} must be a finite number")
            if not isinstance(term, nn.Module):
                raise ConfigError(f"WeightedSum: term {term!r} must be an nn.Module loss")
            if not _declares(term):
                raise ConfigError(f"WeightedSum: term {term} must declare needs (names from "
                                  f"{list(INPUTS)}) and rows (one of {list(ROWS)})")
        self._weights = tuple(float(w) for w, _ in terms)
        if not any(self._weights):
            raise ConfigError(f"WeightedSum: weights {self._weights} are all 0; at least one must be non-zero")
        self.terms = nn.ModuleList(term for _, term in terms)

    @property
    def weights(self) -> tuple[float, ...]:
        """Weight of every term, active or not, in order."""
        return self._weights

    @property
    def needs(self) -> tuple[str, ...]:
        """The inputs the active terms read (their union, in the order of `INPUTS`)."""
        used = {name for _, term in self.active_terms() for name in term.needs}
        return tuple(name for name in INPUTS if name in used)

    def needs_on(self, rows: str) -> tuple[str, ...]:
        """The inputs the active terms evaluated on `rows` (``transfer`` or ``private``) read."""
        used = {name for _, term in self.active_terms() if term.rows == rows for name in term.needs}
        return tuple(name for name in INPUTS if name in used)

    def active_terms(self) -> list[tuple[float, nn.Module]]:
        """``(weight, loss)`` for the terms with non-zero weight, in order; ``combine`` takes one value each."""
        return [(w, term) for w, term in zip(self._weights, self.terms) if w != 0.0]

    def combine(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the values of ``active_terms()`` (same order, one scalar per active term)."""
        active = self.active_terms()
        if len(values) != len(active):
            raise ValueError(f"combine got {len(values)} values for {len(active)} active terms of {self}")
        total = values[0] * active[0][0]
        for value, (weight, _) in zip(values[1:], active[1:]):
            total = total + value * weight
        return total

    def forward(self, student_logits: torch.Tensor, **inputs: object) -> torch.Tensor:
        """All active terms on the same batch (for the case where they do share one), each given
        the entries of `inputs` it ``needs``."""
        values = [term(student_logits, **term_inputs(term, inputs)) for _, term in self.active_terms()]
        return self.combine(values)

    def __str__(self) -> str:
        return " + ".join(f"{_fmt(w)} * {term}" for w, term in zip(self._weights, self.terms))


def distill_loss(alpha: float, temperature: float) -> WeightedSum:
    """``alpha * KD(T) + (1 - alpha) * CE``.

    Parameters
    ----------
    alpha : float
        Weight of the KD term, in [0, 1]; 0 is plain cross-entropy training, 1 is pure distillation.
    temperature : float
        KD temperature T > 0.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha={alpha!r} must be a number in [0, 1]")
    return WeightedSum([(float(alpha), KDLoss(temperature)), (1.0 - float(alpha), CELoss())])
