"""The generator's objectives as small pure functions, and the zero-order gradient estimate.

White-box (the server holds the teachers' models) and black-box (it sees only their logits)
generators minimise the same objective over generated inputs ``x = G(z, y)``:

``w_ce * class_loss + w_bn * BatchNorm statistics - w_adv * disagreement + w_bal * balance_loss
+ w_div * diversity_loss``

- `class_loss`: cross-entropy of the ensemble (mean of the teachers' logits) to the requested class;
- `bn_statistics_loss`: DeepInversion's match of a batch's feature statistics to the BatchNorm
  running statistics the teachers learnt on their private data (white-box only);
- `disagreement`: KL between the ensemble and the students where they still agree on the class
  (DENSE's adversarial term: seek inputs where they disagree; it enters with a minus sign);
- `balance_loss`: ``log C - H(mean prediction)``, 0 when the batch covers every class equally;
- `diversity_loss`: mode seeking, so that one class does not collapse onto a single input (it
  needs only the generator's outputs: exact in both settings).

`zo_input_gradient` estimates ``dL/dx`` from logits alone (forward differences along random
directions, chained through the exact gradient of L with respect to the logits).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def class_loss(ensemble_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the ensemble's logits ``[N, C]`` to the requested classes ``[N]``."""
    return F.cross_entropy(ensemble_logits, labels)


def balance_loss(ensemble_logits: torch.Tensor) -> torch.Tensor:
    """``log C - H(p_mean)`` with ``p_mean`` the batch-mean softmax: >= 0, 0 iff classes are even."""
    mean = F.softmax(ensemble_logits, dim=-1).mean(0)
    return math.log(mean.numel()) + (mean * torch.log(mean.clamp_min(1e-12))).sum()


def disagreement(ensemble_logits: torch.Tensor, member_logits: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """``KL(softmax(ens / T) || softmax(member / T))`` averaged over members and rows, counting
    only the (member, row) pairs whose argmax still equals the ensemble's (others add 0).

    The mask (as in DENSE's and CMI's adversarial loss) keeps the term bounded: once a member
    disagrees with the ensemble on a row, pushing that row further teaches nothing.

    Parameters
    ----------
    ensemble_logits : torch.Tensor
        ``[N, C]``.
    member_logits : torch.Tensor
        ``[S, N, C]`` logits of S students (or teachers) on the same rows.
    """
    p = F.softmax(ensemble_logits / temperature, dim=-1)
    log_p = F.log_softmax(ensemble_logits / temperature, dim=-1)
    log_q = F.log_softmax(member_logits / temperature, dim=-1)
    kl = (p * (log_p - log_q)).sum(-1)  # [S, N]
    agree = (member_logits.argmax(-1) == ensemble_logits.argmax(-1)).to(kl.dtype)
    return (kl * agree).mean()


def diversity_loss(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mode seeking (MSGAN): minus the mean L1 distance of paired samples per unit of noise distance.

    Rows ``i`` and ``i + N/2`` form the pairs (the sources draw them with the same class), so the
    loss falls as samples of one class spread out instead of collapsing onto one input.
    """
    half = len(x) // 2
    dx = (x[:half] - x[half:2 * half]).abs().flatten(1).mean(1)
    dz = (z[:half] - z[half:2 * half]).abs().mean(1)
    return -(dx / dz.clamp_min(1e-8)).mean()


def bn_statistics_loss(features: torch.Tensor, running_mean: torch.Tensor,
                       running_var: torch.Tensor) -> torch.Tensor:
    """``||mean - running_mean||_2 + ||var - running_var||_2`` over a BatchNorm layer's channels.

    ``features`` is the layer's input ``[N, C, ...]``; mean and (biased) variance are taken over
    every dimension but the channels.
    """
    dims = [0, *range(2, features.dim())]
    mean = features.mean(dims)
    var = features.var(dims, unbiased=False)
    return torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(var - running_var)


class BatchNormStatistics:
    """Collects `bn_statistics_loss` of every BatchNorm layer while the models run forward.

    Use as ``with BatchNormStatistics(models) as bn: ...forward...; bn.loss``; ``bn.loss`` is the
    mean over layers (0 for models without BatchNorm).
    """

    def __init__(self, models: Iterable[nn.Module]) -> None:
        self.layers = [m for model in models for m in model.modules() if isinstance(m, _BATCHNORM)]
        self.terms: list[torch.Tensor] = []
        self._handles: list = []

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], _output) -> None:
        self.terms.append(bn_statistics_loss(inputs[0], module.running_mean, module.running_var))

    def __enter__(self) -> BatchNormStatistics:
        self.terms = []
        self._handles = [layer.register_forward_hook(self._hook) for layer in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def loss(self) -> torch.Tensor:
        """Mean BatchNorm statistics loss over the layers seen."""
        return torch.stack(self.terms).mean() if self.terms else torch.zeros(())


@contextmanager
def frozen(models: Iterable[nn.Module]) -> Iterator[None]:
    """Eval mode and no parameter gradients inside the block; both restored afterwards."""
    saved = []
    for model in models:
        saved.append((model, model.training, [p.requires_grad for p in model.parameters()]))
        model.eval()
        model.requires_grad_(False)
    try:
        yield
    finally:
        for model, training, flags in saved:
            model.train(training)
            for p, flag in zip(model.parameters(), flags):
                p.requires_grad_(flag)


def zo_input_gradient(
    grad_logits: np.ndarray,
    base_logits: np.ndarray,
    perturbed_logits: np.ndarray,
    directions: np.ndarray,
    mu: float,
) -> np.ndarray:
    """Zero-order estimate of ``dL/dx`` per row, from logits on ``x`` and on ``x + mu * u_i``.

    The directional derivative along ``u_i`` is ``sum_k <dL/dz_k, (z_k(x + mu u_i) - z_k(x)) / mu>``
    (forward differences of every teacher's logits ``z_k``, chained through the exact gradient of
    the loss with respect to the logits); with Gaussian directions the estimate is
    ``mean_i (directional derivative_i) * u_i``.

    Parameters
    ----------
    grad_logits : np.ndarray
        ``[K, N, C]`` gradient of the loss with respect to each teacher's logits at ``x``.
    base_logits : np.ndarray
        ``[K, N, C]`` logits at ``x``.
    perturbed_logits : np.ndarray
        ``[K, Q, N, C]`` logits at ``x + mu * u_i`` for the Q directions.
    directions : np.ndarray
        ``[Q, N, ...]`` the directions ``u_i``.
    mu : float
        Step of the forward differences.

    Returns
    -------
    np.ndarray
        ``[N, ...]`` the estimated gradient, shaped like the inputs.
    """
    diff = (perturbed_logits - base_logits[:, None]) / mu  # [K, Q, N, C]
    slopes = np.einsum("knc,kqnc->qn", grad_logits, diff)  # [Q, N]
    flat = directions.reshape(*directions.shape[:2], -1)  # [Q, N, D]
    grad = np.einsum("qn,qnd->nd", slopes, flat) / directions.shape[0]
    return grad.reshape(directions.shape[1:]).astype(np.float32)
