"""FD / FedDistill (Jeong et al. 2018) on the client: per-class mean logits, no transfer set.

Message type ``train.fd``
    Request  ``config`` (settings, ``server-round``) and ``transfer`` with, from the second round,
             ``targets.class_logits`` [C, C] (row c: the mean logit vector of class c over all
             clients) and ``targets.class_counts`` [C] (global examples per class; rows with
             count 0 carry no information and are ignored).
    Reply    ``logits`` ArrayRecord: ``class_logits`` [C, C] float32 (this client's mean logits per
             class on its private data, zero rows for classes it lacks) and ``class_counts`` [C]
             int64; ``metrics`` as in ``train.distill``. Nothing else leaves the client.

Each private mini-batch is trained on ``(1 - alpha) * CE(student(x), y) + alpha * KD`` where the KD
term pulls each sample whose class has a global count > 0 toward ``softmax(global[y] / T)``
(`distill_loss(alpha, T)` with both terms on the same batch). Without targets (a client's first
round) it is plain CE on the warm-up budget; clients in the teacher role are never regularized.

The ClientApp registers the handler with ``app.train("fd")(fd_round)``.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from fedkd.client.round import open_round, round_of, test_metrics
from fedkd.devices import place
from fedkd.training import label_counts, mean_loss, predict_logits, private_batches, round_generator
from fedkd.losses import CELoss, KDLoss, WeightedSum, distill_loss
from fedkd.protocol import (
    CLASS_COUNTS, CLASS_LOGITS, LOGITS, METRICS, NUM_EXAMPLES, PARTITION_ID, TARGETS, TRAIN_LOSS,
    TRANSFER,
)

log = logging.getLogger(__name__)

def class_mean_logits(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean logit vector per class of the model (eval mode) on labelled data.

    Returns
    -------
    class_logits : np.ndarray
        float32 [C, C]; row c is the mean over the rows labelled c, zeros if there are none.
    class_counts : np.ndarray
        int64 [C]; rows per class.
    """
    logits = predict_logits(model, x).astype(np.float64)
    labels = y.numpy()
    counts = label_counts(y, num_classes)
    sums = np.zeros((num_classes, num_classes))
    np.add.at(sums, labels, logits)
    means = np.divide(sums, counts[:, None], out=np.zeros_like(sums), where=counts[:, None] > 0)
    return means.astype(np.float32), counts


def class_soft_targets(
    class_logits: np.ndarray, class_counts: np.ndarray, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class teacher probabilities ``softmax(class_logits / T)`` [C, C] and the mask [C] of
    classes with a global count > 0."""
    logits = torch.from_numpy(np.asarray(class_logits, dtype=np.float32))
    counts = np.asarray(class_counts)
    num_classes = len(counts)
    if logits.shape != (num_classes, num_classes) or counts.shape != (num_classes,):
        raise ValueError(f"class targets have shapes {tuple(logits.shape)} and {counts.shape}, "
                         f"expected [C, C] and [C]")
    if not torch.isfinite(logits).all() or not np.isfinite(counts).all():
        raise ValueError("class targets must be finite")
    return torch.softmax(logits / temperature, dim=1), torch.from_numpy(counts > 0)


def regularized_train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss: WeightedSum,
    class_probs: torch.Tensor | None,
    known: torch.Tensor | None,
    epochs: int,
    batch_size: int,
    gen: torch.Generator,
    steps: int | None = None,
    device: torch.device | None = None,
) -> float:
    """Train on private batches with CE plus KD toward the class soft targets; mean batch loss.

    One forward pass per batch feeds both terms of `loss`. The KD term of a batch is the sum of
    the per-sample KD losses of the samples whose class is `known`, divided by the batch size
    (unknown classes contribute 0); a batch with nothing to learn from is skipped. The batches
    are those of `fedkd.training.revisit`, so with ``alpha = 0`` this is exactly `revisit`.
    Computes on `device` (None: where the model is).
    """
    device = place(model, device)
    x, y = x.to(device), y.to(device)
    if class_probs is not None and known is not None:
        class_probs, known = class_probs.to(device), known.to(device)
    model.train()
    losses = []
    for idx in private_batches(len(x), batch_size, gen, epochs, steps):
        out, labels = model(x[idx]), y[idx]
        values = []
        for _weight, term in loss.active_terms():
            if not isinstance(term, KDLoss):
                values.append(term(out, labels=labels))
            elif class_probs is None or known is None or not known[labels].any():
                values.append(out.new_zeros(()))
            else:
                mask = known[labels]
                kd = term(out[mask], soft_targets=class_probs[labels[mask]])
                values.append(kd * mask.sum() / len(idx))
        total = loss.combine(values)
        if not total.requires_grad:  # alpha = 1 and no sample of a known class in the batch
            continue
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.detach())
    return mean_loss(losses)


def fd_round(msg: Message, context: Context) -> Message:
    """One FD round: train (regularized toward the global class logits), report class logits."""
    settings, pid, data, student = open_round(msg, context)
    train = settings.train
    server_round = round_of(msg)
    num_classes = int(settings.data["num_classes"])
    transfer = msg.content.array_records.get(TRANSFER, ArrayRecord())
    class_probs = known = None
    if f"{TARGETS}.{CLASS_LOGITS}" in transfer and settings.role_of(pid) == "student":
        class_probs, known = class_soft_targets(
            transfer[f"{TARGETS}.{CLASS_LOGITS}"].numpy(),
            transfer[f"{TARGETS}.{CLASS_COUNTS}"].numpy(), train.temperature)
        if class_probs.shape[0] != num_classes:
            raise ValueError(f"class targets for {class_probs.shape[0]} classes, data has "
                             f"{num_classes}")
    # Without targets (first round, nothing aggregated yet, or a teacher): plain CE, as `revisit`.
    loss = (distill_loss(train.alpha, train.temperature) if class_probs is not None
            else WeightedSum([(1.0, CELoss())]))
    metrics: dict[str, float | int] = {PARTITION_ID: pid, NUM_EXAMPLES: len(data.x)}
    metrics[TRAIN_LOSS] = regularized_train(
        student.model, student.optimizer, data.x, data.y,
        loss=loss, class_probs=class_probs, known=known,
        batch_size=train.batch_size, gen=round_generator(settings.seed, pid, server_round),
        **train.local_budget(first_round=student.rounds_done == 0),
    )
    student.rounds_done += 1
    class_logits, class_counts = class_mean_logits(student.model, data.x, data.y, num_classes)
    metrics.update(test_metrics(student.model, data, settings, server_round))
    student.save(context)
    log.debug("client %d round %d: %s", pid, server_round, metrics)
    content = RecordDict({
        LOGITS: ArrayRecord({CLASS_LOGITS: Array(class_logits), CLASS_COUNTS: Array(class_counts)}),
        METRICS: MetricRecord(metrics),
    })
    return Message(content, reply_to=msg)
