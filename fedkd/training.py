"""A client's work in plain PyTorch: revisit, digest, logits, evaluate.

These functions know nothing of Flower; the ClientApp and the plain-PyTorch benchmark loop both
call them, so the simulation and the reference do exactly the same arithmetic.

Devices: each function computes where the model is (or on `device`, moving the model there: do it
before the optimizer's first step, whose state lives with the parameters) and sends its inputs
there; the seeded generator and the index permutations stay on the CPU, so the batch order does
not depend on the device, and what it returns (losses, logits) is on the CPU (`fedkd.devices`,
docs/gpu.md).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from fedkd.devices import place
from fedkd.knowledge import Knowledge, forward, taps_for, term_inputs
from fedkd.losses import CELoss, WeightedSum


def round_generator(seed: int, partition_id: int, server_round: int) -> torch.Generator:
    """A torch Generator seeded from (seed, partition id, round): shuffles never share a stream."""
    state = np.random.SeedSequence([seed, partition_id, server_round]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    return list(torch.randperm(n, generator=gen).split(batch_size))


def mean_loss(losses: list[torch.Tensor]) -> float:
    """The mean of per-batch losses (0-d tensors), exactly ``np.mean`` of their ``.item()``, with
    one device synchronisation instead of one per batch; NaN for none."""
    if not losses:
        return float("nan")
    return float(np.mean(torch.stack(losses).double().cpu().numpy()))


def revisit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    gen: torch.Generator,
    steps: int | None = None,
    device: torch.device | None = None,
    loss: WeightedSum | None = None,
    knowledge: Knowledge | None = None,
) -> float:
    """Train on private data with cross-entropy; return the mean batch loss.

    Runs `epochs` passes over the data, or exactly `steps` mini-batches when `steps` is given
    (reshuffling at every pass), as in papers that count local steps instead of epochs. Computes
    on `device` (None: where the model is). `loss` (private-row terms, e.g. CE plus
    self-distillation or prototypes, `fedkd.losses.specs.revisit_losses`) replaces plain CE, with
    the round's `knowledge`; a term whose inputs this round lacks (no snapshot yet) is left out.
    """
    device = place(model, device)
    x, y = x.to(device), y.to(device)
    knowledge = knowledge.to(device) if knowledge is not None else None
    ce = CELoss()
    model.train()
    losses = []
    for idx in private_batches(len(x), batch_size, gen, epochs, steps):
        if loss is None:
            loss_value = ce(model(x[idx]), labels=y[idx])
        else:
            logits, taps = forward(model, x[idx], taps_for(loss.needs, knowledge))
            loss_value = _weighted([(w, term, logits, term_inputs(
                term.needs, logits, taps, x=x[idx], labels=y[idx], knowledge=knowledge))
                for w, term in loss.active_terms()])
            if loss_value is None:
                continue
        optimizer.zero_grad()
        loss_value.backward()
        optimizer.step()
        losses.append(loss_value.detach())
    return mean_loss(losses)


def _weighted(terms: list[tuple[float, nn.Module, torch.Tensor, dict]]) -> torch.Tensor | None:
    """``sum w * term(logits, **inputs)`` over the entries (weight, term, the logits of its rows,
    its inputs) whose inputs are all there; None when no term can run."""
    total = None
    for weight, term, logits, inputs in terms:
        if not all(name in inputs for name in term.needs):
            continue
        value = term(logits, **inputs) * weight
        total = value if total is None else total + value
    return total


def private_batches(
    n: int, batch_size: int, gen: torch.Generator, epochs: int, steps: int | None
) -> Iterator[torch.Tensor]:
    if steps is None:
        for _ in range(epochs):
            yield from _batches(n, batch_size, gen)
        return
    done = 0
    while done < steps:
        for idx in _batches(n, batch_size, gen):
            yield idx
            done += 1
            if done == steps:
                return


def digest(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    transfer_x: torch.Tensor,
    soft_targets: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss: WeightedSum,
    epochs: int,
    batch_size: int,
    gen: torch.Generator,
    device: torch.device | None = None,
    knowledge: Knowledge | None = None,
) -> float:
    """Distil on soft targets, mixed with CE on private batches; return the mean batch loss.

    One step per transfer mini-batch: the KD term runs on the transfer batch, the CE term on a
    private batch of the same size drawn at random, both in one forward pass over the joint batch
    (BatchNorm then never normalises a label-skewed private batch on its own: with separate passes
    the FedGen MNIST students at alpha 0.05 peaked at 0.89 and drifted, see
    docs/results/fedgen_mnist). A term of weight 0 is not even evaluated, so `alpha=0` is plain CE
    training and `alpha=1` pure distillation. Computes on `device` (None: where the model is).

    Every term runs on the rows it names (``term.rows``: the transfer batch, or one private batch
    of the same size shared by every private-row term) with the inputs it ``needs``
    (`fedkd.knowledge.term_inputs`: taps of the same forward pass, the round's `knowledge`); a
    term whose inputs this round lacks is left out of the step.
    """
    device = place(model, device)
    transfer_x, soft_targets = transfer_x.to(device), soft_targets.to(device)
    x, y = x.to(device), y.to(device)
    knowledge = knowledge.to(device) if knowledge is not None else None
    model.train()
    losses = []
    active = loss.active_terms()
    on_transfer = any(term.rows == "transfer" for _w, term in active)
    on_private = any(term.rows == "private" for _w, term in active)
    taps = taps_for(loss.needs, knowledge)
    for _ in range(epochs):
        for idx in _batches(len(transfer_x), batch_size, gen):
            parts = {}  # rows -> (inputs, extra) in the order of the joint batch
            if on_transfer:
                parts["transfer"] = (transfer_x[idx], {"idx": idx, "soft_targets": soft_targets[idx]})
            if on_private:
                pidx = torch.randint(len(x), (len(idx),), generator=gen)
                parts["private"] = (x[pidx], {"labels": y[pidx]})
            if not parts:
                continue
            # One forward pass over the joint batch: BatchNorm normalises the transfer and the
            # (label-skewed) private rows together, as it will see them mixed at test time.
            sizes = [len(rows) for rows, _ in parts.values()]
            logits, kept = forward(model, torch.cat([rows for rows, _ in parts.values()]), taps)
            split = dict(zip(parts, logits.split(sizes)))
            pieces = {name: tensor.split(sizes) for name, tensor in kept.items()}
            split_taps = {rows: {name: pieces[name][i] for name in pieces}
                          for i, rows in enumerate(parts)}
            terms = []
            for weight, term in active:
                rows, extra = parts[term.rows]
                inputs = term_inputs(term.needs, split[term.rows], split_taps[term.rows], x=rows,
                                     knowledge=knowledge, **extra)
                terms.append((weight, term, split[term.rows], inputs))
            total = _weighted(terms)
            if total is None:
                continue
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            losses.append(total.detach())
    return mean_loss(losses)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024,
                   device: torch.device | None = None) -> np.ndarray:
    """Logits of the model in eval mode, float32 [N, C] (on `device`, None: where the model is;
    `x` goes there a chunk at a time)."""
    device = place(model, device)
    model.eval()
    out = [model(chunk.to(device)) for chunk in x.split(batch_size)]
    return torch.cat(out).float().cpu().numpy()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             device: torch.device | None = None) -> tuple[float, float]:
    """Accuracy and mean cross-entropy on (x, y) (the logits computed on `device`)."""
    logits = torch.from_numpy(predict_logits(model, x, device=device))
    loss = nn.functional.cross_entropy(logits, y).item()
    acc = (logits.argmax(1) == y).float().mean().item()
    return acc, loss


def label_counts(y: torch.Tensor, num_classes: int) -> np.ndarray:
    """int64 [C]: rows per class of the labels `y` (each in ``0..num_classes-1``)."""
    return np.bincount(y.numpy(), minlength=num_classes)[:num_classes].astype(np.int64)


@torch.no_grad()
def own_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 own: torch.Tensor | None, device: torch.device | None = None) -> float | None:
    """Accuracy on the test rows `own` (a client's own-label chunk); None without a chunk."""
    if own is None or len(own) == 0:
        return None
    return evaluate(model, x[own], y[own], device=device)[0]
