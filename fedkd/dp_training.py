"""A client's private-data steps under DP-SGD (Opacus): revisit and digest with privacy.

Flower-free, the DP twins of `fedkd.training.revisit` and `fedkd.training.digest`.

What one DP-SGD step does (and what the guarantee covers)
    The client's private rows are Poisson-sampled at rate ``q`` (Opacus's
    ``UniformWithReplacementSampler``: each row joins the step's batch independently with
    probability ``q``; an empty batch is a step too). The model is wrapped in Opacus's
    ``GradSampleModule``, which computes every sampled row's own gradient of its cross-entropy;
    Opacus's ``DPOptimizer`` clips each to L2 norm ``max_grad_norm``, sums them, adds Gaussian
    noise of std ``noise_multiplier * max_grad_norm`` and divides by the expected batch size
    ``round(q * n)``. Every such step is one sampled Gaussian mechanism on the private rows, and
    the client's `fedkd.dpsgd.Accountant` composes one per step. This covers **every gradient
    that depends on a private row**: the revisit's CE steps and the digest's CE term.

What is not a DP step, and why it needs none
    The digest's KD term runs on public transfer rows with soft targets from the server. Its
    gradient depends on no private row of this client, only on the current (already DP) model,
    the public rows and the server's targets (an aggregate of every client's released logits,
    themselves outputs of DP models): it is added to the noisy private gradient unclipped and
    unnoised, in a separate forward pass (so no private row shares a normalisation with it:
    DP models carry no BatchNorm, `fedkd.dpsgd`). Pure distillation (``alpha = 1``) takes no DP
    step at all. Adaptive composition makes the whole run's releases post-processing of the DP
    steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from fedkd.devices import model_device
from fedkd.dpsgd import Accountant, DPSettings, steps_per_epoch
from fedkd.losses import CELoss, KDLoss, WeightedSum


def noise_generator(seed: int, partition_id: int, server_round: int,
                    device: torch.device | str = "cpu") -> torch.Generator:
    """The DP noise stream of a client's round, apart from its sampling stream (seeded, so runs
    repeat; Opacus's ``secure_mode`` would draw from a cryptographic source instead). It lives on
    the model's `device` (Opacus draws the noise there): a GPU stream differs from the CPU's."""
    state = np.random.SeedSequence([seed, partition_id, server_round, 1]).generate_state(1)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def poisson_batches(n: int, rate: float, steps: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """`steps` Poisson-sampled batches of row indices (Opacus's ``UniformWithReplacementSampler``)."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=rate, generator=gen,
                                            steps=steps)
    for batch in sampler:
        yield torch.as_tensor(batch, dtype=torch.long)


class PrivateSteps:
    """One round's DP-SGD machinery around a client's model and optimizer.

    Wraps `model` in a ``GradSampleModule`` and `optimizer` in a ``DPOptimizer`` (its state stays
    the wrapped optimizer's, so it persists as before); `close` removes the hooks. Steps run where
    the model is (`device`); the sampling stream stays on the CPU.

    Parameters
    ----------
    model, optimizer : nn.Module, torch.optim.Optimizer
        The student and its optimizer.
    dp : DPSettings
        Clipping norm (and accountant kind, through `accountant`).
    accountant : Accountant
        This client's ledger; its noise multiplier and sampling rate are used; every step is
        accounted on it.
    num_rows : int
        Rows of the private data (the sampling rate is ``accountant.rate``).
    noise : torch.Generator
        The noise stream (`noise_generator`).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, dp: DPSettings,
                 accountant: Accountant, num_rows: int, noise: torch.Generator) -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        self.model, self.accountant, self.num_rows = model, accountant, num_rows
        self.device = model_device(model)
        self.module = GradSampleModule(model, loss_reduction="mean")
        self.optimizer = DPOptimizer(
            optimizer, noise_multiplier=accountant.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=max(1, round(accountant.rate * num_rows)),
            loss_reduction="mean", generator=noise)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, weight: float = 1.0,
             public: torch.Tensor | None = None) -> float:
        """One DP-SGD step on the private rows `idx`: ``weight`` times the noisy clipped mean CE
        gradient, plus the gradient of `public` (a loss on public rows only, never clipped);
        return the private batch's mean CE (not released: it is no DP output)."""
        extra = None
        if public is not None:  # the public term's gradient, without per-sample hooks
            self.optimizer.zero_grad()
            self._backward_without_hooks(public)
            extra = [p.grad.clone() if p.grad is not None else None for p in self.params]
        self.optimizer.zero_grad()
        loss = float("nan")
        if len(idx):
            value = CELoss()(self.module(x[idx]), labels=y[idx])
            with warnings.catch_warnings():  # inputs need no grad: Opacus's hooks still fire
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                value.backward()
            loss = value.item()
        else:  # an empty Poisson batch: no gradient, the noise alone (Opacus's empty-batch path)
            for p in self.params:
                p.grad_sample = p.new_zeros((0, *p.shape))
        self.optimizer.pre_step()  # clip per sample, sum, add noise, divide by expected batch
        for i, p in enumerate(self.params):
            p.grad.mul_(weight)
            if extra is not None and extra[i] is not None:
                p.grad.add_(extra[i])
        self.optimizer.original_optimizer.step()
        self.accountant.step()
        return loss

    def public_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The model's output on public rows, with the per-sample hooks off (call its loss's
        backward through `step`'s `public`)."""
        self.module.disable_hooks()
        try:
            return self.module(inputs)
        finally:
            self.module.enable_hooks()

    def public_step(self, public: torch.Tensor) -> None:
        """An ordinary optimizer step on a loss of public rows only (no clipping, no noise, no
        accounting: no private row is involved)."""
        self.optimizer.original_optimizer.zero_grad()
        self._backward_without_hooks(public)
        self.optimizer.original_optimizer.step()

    def _backward_without_hooks(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` with Opacus's per-sample hooks off (a loss of public rows)."""
        self.module.disable_hooks()
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
        finally:
            self.module.enable_hooks()

    def close(self) -> None:
        """Remove Opacus's hooks and per-sample gradients from the model."""
        self.optimizer.zero_grad()
        self.module._close()


def dp_revisit(steps: PrivateSteps, x: torch.Tensor, y: torch.Tensor, *, epochs: int,
               batch_size: int, gen: torch.Generator, step_count: int | None = None) -> float:
    """`fedkd.training.revisit` under DP-SGD: ``epochs * ceil(n / batch_size)`` (or `step_count`)
    DP steps on Poisson batches; returns the mean private loss (kept on the client)."""
    steps.model.train()
    x, y = x.to(steps.device), y.to(steps.device)
    count = step_count if step_count is not None else epochs * steps_per_epoch(batch_size, len(x))
    losses = [steps.step(x, y, idx) for idx in
              poisson_batches(len(x), steps.accountant.rate, count, gen)]
    losses = [v for v in losses if not np.isnan(v)]
    return float(np.mean(losses)) if losses else float("nan")


def dp_digest(steps: PrivateSteps, transfer_x: torch.Tensor, soft_targets: torch.Tensor,
              x: torch.Tensor, y: torch.Tensor, *, loss: WeightedSum, epochs: int,
              batch_size: int, gen: torch.Generator) -> float:
    """`fedkd.training.digest` under DP-SGD: one step per transfer mini-batch, the KD term on it
    (public, unclipped) plus ``(1 - alpha)`` times a DP-SGD step on a Poisson batch of private
    rows. With ``alpha = 1`` no private row is touched and the steps are ordinary (no
    accounting). Returns the mean KD loss (public rows; kept on the client)."""
    steps.model.train()
    transfer_x, soft_targets = transfer_x.to(steps.device), soft_targets.to(steps.device)
    x, y = x.to(steps.device), y.to(steps.device)
    terms = {type(term): (w, term) for w, term in loss.active_terms()}
    kd_weight, kd = terms.get(KDLoss, (0.0, None))
    ce_weight = terms.get(CELoss, (0.0, None))[0]
    values = []
    for _ in range(epochs):
        batches = list(torch.randperm(len(transfer_x), generator=gen).split(batch_size))
        private = (poisson_batches(len(x), steps.accountant.rate, len(batches), gen)
                   if ce_weight else iter(()))
        for idx in batches:
            public = None
            if kd is not None:
                public = kd_weight * kd(steps.public_forward(transfer_x[idx]),
                                        soft_targets=soft_targets[idx])
                values.append(public.item() / kd_weight)
            if ce_weight:
                steps.step(x, y, next(private), weight=ce_weight, public=public)
            elif public is not None:  # pure distillation: no private row, an ordinary step
                steps.public_step(public)
    return float(np.mean(values)) if values else float("nan")
