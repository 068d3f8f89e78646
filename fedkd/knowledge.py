"""What a client distils from besides soft targets and labels, and the inputs each loss term reads.

A training loop (`fedkd.training`) evaluates every active term of a `fedkd.losses.WeightedSum` on
the rows the term names (``transfer`` or ``private``) with the inputs it ``needs``. It never asks
which loss a term is: `taps_for` says which model taps one forward pass must keep, and
`term_inputs` hands each term what it needs, from the step's rows and the round's `Knowledge`:

- ``soft_targets``, ``labels``: the rows' soft targets and private labels;
- ``features``: the student's tap (`Knowledge.tap`) on the rows, projected to the prototypes'
  width (`Knowledge.projection`) for a term that also reads ``prototypes``;
- ``relation``: the rows' block of the round's target relation (`Knowledge.relation`, row
  distributions over the other transfer rows), each row renormalised over the block;
- ``prototypes``: the round's class prototypes;
- ``snapshot_logits``: the logits of the student's frozen snapshot (taken at the round's start)
  on the same rows;
- ``exit_logits``: the model's exit taps (`Knowledge.exits`), shallow first.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fedkd.models.taps import EMBEDDING

TAPPED_INPUTS = ("features", "exit_logits")
"""Inputs that come from the model's taps (the others from the rows or the round)."""


@dataclass
class Knowledge:
    """A round's inputs for the terms beyond KD and CE (all optional).

    Parameters
    ----------
    tap : str
        The student's tap that ``features`` reads (its arch spec's ``tap``).
    relation : torch.Tensor or None
        ``[N, N]`` target relation over the round's transfer rows: row ``i`` is a distribution over
        the other rows (the diagonal is 0).
    prototypes : torch.Tensor or None
        ``[C, P]`` class prototypes (NaN rows: classes nobody reported).
    projection : torch.Tensor or None
        ``[D, P]`` fixed projection of the flattened tap to the prototypes' width.
    snapshot : nn.Module or None
        A frozen copy of the student from the round's start (self-distillation across rounds).
    exits : tuple of str
        The model's exit taps, shallow first (deep-to-shallow self-distillation).
    """

    tap: str = EMBEDDING
    relation: torch.Tensor | None = None
    prototypes: torch.Tensor | None = None
    projection: torch.Tensor | None = None
    snapshot: nn.Module | None = None
    exits: tuple[str, ...] = field(default_factory=tuple)

    def to(self, device: torch.device) -> Knowledge:
        """The same knowledge with its tensors and snapshot on `device`."""
        move = (lambda t: None if t is None else t.to(device))
        if self.snapshot is not None:
            self.snapshot.to(device)
        return Knowledge(self.tap, move(self.relation), move(self.prototypes),
                         move(self.projection), self.snapshot, self.exits)


def taps_for(needs: Sequence[str], knowledge: Knowledge | None) -> list[str]:
    """The model taps one forward pass must keep for terms that read `needs`."""
    knowledge = knowledge or Knowledge()
    names = [knowledge.tap] if "features" in needs else []
    if "exit_logits" in needs:
        names += [name for name in knowledge.exits if name not in names]
    return names


def forward(model: nn.Module, x: torch.Tensor, taps: Sequence[str]
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The logits and the taps `taps` of one forward pass (no taps: a plain ``model(x)``)."""
    if not taps:
        return model(x), {}
    return model.forward_taps(x, list(taps))


def relation_block(relation: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``relation[idx][:, idx]`` with the diagonal 0 and every row renormalised to sum 1 (a row
    with no mass in the block stays 0)."""
    block = relation[idx][:, idx].clone()
    block.fill_diagonal_(0.0)
    sums = block.sum(1, keepdim=True)
    return torch.where(sums > 0, block / sums.clamp_min(1e-12), block)


def term_inputs(needs: Sequence[str], logits: torch.Tensor, taps: dict[str, torch.Tensor], *,
                x: torch.Tensor, idx: torch.Tensor | None = None,
                soft_targets: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                knowledge: Knowledge | None = None) -> dict[str, object]:
    """Every input in `needs` for a term evaluated on rows `x` (transfer rows `idx`, with their
    `soft_targets`; or private rows with their `labels`), given the step's `logits` and `taps`."""
    knowledge = knowledge or Knowledge()
    inputs: dict[str, object] = {}
    if "soft_targets" in needs and soft_targets is not None:
        inputs["soft_targets"] = soft_targets
    if "labels" in needs and labels is not None:
        inputs["labels"] = labels
    if "features" in needs and knowledge.tap in taps:
        features = taps[knowledge.tap]
        if "prototypes" in needs and knowledge.projection is not None:
            features = features.flatten(1) @ knowledge.projection.to(features.dtype)
        inputs["features"] = features
    if "prototypes" in needs and knowledge.prototypes is not None:
        inputs["prototypes"] = knowledge.prototypes
    if "relation" in needs and knowledge.relation is not None and idx is not None:
        inputs["relation"] = relation_block(knowledge.relation, idx)
    if "snapshot_logits" in needs and knowledge.snapshot is not None:
        with torch.no_grad():
            inputs["snapshot_logits"] = knowledge.snapshot(x)
    if "exit_logits" in needs:
        inputs["exit_logits"] = tuple(taps[name] for name in knowledge.exits if name in taps)
    return inputs


def frozen_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` that takes no gradient (the round-start snapshot)."""
    snapshot = copy.deepcopy(model)
    snapshot.eval()
    for p in snapshot.parameters():
        p.requires_grad_(False)
    return snapshot
