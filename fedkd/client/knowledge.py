"""A client's knowledge beyond logits: what it reads from a request, and what it answers.

- `round_knowledge`: the round's `fedkd.knowledge.Knowledge` for the digest and the revisit: the
  arch's tap (its spec's ``tap``), the aggregated relation over the target rows and the class
  prototypes when the request carries them, the fixed projection to the prototypes' width, a
  frozen snapshot of the student from the round's start (when a term reads ``snapshot_logits``
  and the student has trained before), the model's exits.
- `knowledge_reply`: the ``knowledge`` record of the reply (`fedkd.protocol.KNOWLEDGE`): the
  cosine similarities of the tap between the first ``distill.relation_rows`` ``next`` rows and the
  per-class means of the projected tap over the private rows (``distill.prototype_dim``).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from fedkd.knowledge import Knowledge, frozen_copy
from fedkd.losses import WeightedSum, class_prototypes, fixed_projection
from fedkd.losses.relation_kd import full_relation, similarity_rows, top_similarities
from fedkd.models.build import spec_tap
from fedkd.protocol import PROTOTYPE_COUNTS, PROTOTYPES, RELATION, RELATION_INDEX
from fedkd.records import prototype_targets, relation_targets, relation_topk
from fedkd.settings import ClientSettings


def exits_of(model: nn.Module) -> tuple[str, ...]:
    """The model's exit taps (kind ``logits``), shallow first."""
    return tuple(name for name, kind in getattr(model, "tap_kinds", {}).items() if kind == "logits")


@torch.no_grad()
def tap_of(model: nn.Module, tap: str, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The model's tap on `x` in eval mode, flattened per row ``[N, D]`` (the mode restored)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out = [model.forward_taps(chunk.to(device), [tap])[1][tap].flatten(1).float().cpu()
               for chunk in x.split(batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out)


def projection_for(settings: ClientSettings, model: nn.Module, tap: str,
                   example: torch.Tensor) -> torch.Tensor | None:
    """The fixed projection of the flattened tap to ``distill.prototype_dim`` (None: off)."""
    dim = settings.train.prototype_dim
    if not dim:
        return None
    width = tap_of(model, tap, example[:1]).shape[1]
    return fixed_projection(width, dim, settings.seed)


def padded(relation: torch.Tensor, rows: int) -> torch.Tensor:
    """A relation over the first R rows as ``[rows, rows]``: the other rows have none (zero)."""
    out = relation.new_zeros(rows, rows)
    out[:len(relation), :len(relation)] = relation
    return out


def round_knowledge(settings: ClientSettings, pid: int, model: nn.Module, transfer: ArrayRecord,
                    target_rows: int, example: torch.Tensor, trained_before: bool,
                    losses: list[WeightedSum | None]) -> Knowledge:
    """The round's knowledge (module docstring); `losses` are the round's loss sums, which say
    whether a snapshot is needed."""
    _, spec = settings.arch_of(pid)
    tap = spec_tap(spec)
    classes = int(settings.data["num_classes"])
    relation = relation_targets(transfer, target_rows) if target_rows else None
    protos = (prototype_targets(transfer, classes, settings.train.prototype_dim)
              if settings.train.prototype_dim else None)
    snapshot_needed = trained_before and any(
        loss is not None and "snapshot_logits" in loss.needs for loss in losses)
    return Knowledge(
        tap=tap,
        relation=None if relation is None else padded(full_relation(torch.from_numpy(relation)),
                                                      target_rows),
        prototypes=None if protos is None else torch.from_numpy(protos),
        projection=projection_for(settings, model, tap, example),
        snapshot=frozen_copy(model) if snapshot_needed else None,
        exits=exits_of(model),
    )


def knowledge_reply(settings: ClientSettings, pid: int, model: nn.Module,
                    next_x: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor,
                    projection: torch.Tensor | None) -> ArrayRecord | None:
    """The reply's ``knowledge`` record, None when the run shares none; `projection` is the
    round's (`round_knowledge`)."""
    train = settings.train
    if not train.relation_rows and not train.prototype_dim:
        return None
    _, spec = settings.arch_of(pid)
    tap = spec_tap(spec)
    record = ArrayRecord()
    if train.relation_rows and next_x is not None:
        head = next_x[:train.relation_rows]
        rows = similarity_rows(tap_of(model, tap, head))
        if k := relation_topk(len(head), train.relation_topk):  # each row's k nearest, their columns
            rows, index = top_similarities(rows, k)
            record[RELATION_INDEX] = Array(index.numpy())
        record[RELATION] = Array(rows.numpy())
    if train.prototype_dim:
        classes = int(settings.data["num_classes"])
        means, counts = class_prototypes(tap_of(model, tap, x) @ projection, y, classes)
        record[PROTOTYPES] = Array(np.nan_to_num(means.numpy(), nan=0.0).astype(np.float32))
        record[PROTOTYPE_COUNTS] = Array(counts.numpy().astype(np.int64))
    return record
