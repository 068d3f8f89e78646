"""Feature-based losses: the student's intermediate representations against a teacher's.

Each is called as ``term(student_logits, features=..., teacher_features=...)`` (or the attention
weights), reads only what it ``needs`` and returns a scalar. Teacher inputs are detached: no gradient
ever reaches them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedkd.errors import require_choice, require_int, require_number
from fedkd.losses._checks import need, student_and_teacher
from fedkd.losses.response import _fmt

_POOL = {3: F.adaptive_avg_pool1d, 4: F.adaptive_avg_pool2d, 5: F.adaptive_avg_pool3d}
"""Adaptive average pooling by the rank of a map ``[N, C, *spatial]``."""


def _pool_to(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """``x`` ``[N, C, *spatial]`` average-pooled (adaptive) to `size`; unchanged when it already has it."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return _POOL[x.dim()](x, size)


class HintLoss(nn.Module):
    """FitNets hint: ``MSE(r(features), teacher_features)`` with a learned projector ``r``.

    Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015. The projector (the paper's
    regressor) is this module's parameters: the caller adds them to its optimizer. It is a Linear
    ``student_dim -> teacher_dim`` on the last axis for ``kind="embedding"`` (``[N, D]``) and
    ``kind="tokens"`` (``[N, T, D]``, the same T on both sides), and a 1x1 convolution (the same
    Linear over the channel axis) for ``kind="map"`` (``[N, C, H, W]`` or ``[N, C, L]``). When the
    maps' spatial sizes differ, the projected student map is adaptive-average-pooled to the
    teacher's size. The MSE is the mean over every element.

    Parameters
    ----------
    student_dim : int
        Width of the student's features (last axis, or channels of a map).
    teacher_dim : int
        Width of the teacher's features.
    kind : {"embedding", "tokens", "map"}
        Vectors or tokens (projected on the last axis) or maps (projected on the channel axis); the
        names of `fedkd.models.taps`' kinds.
    """

    needs: tuple[str, ...] = ("features", "teacher_features")
    rows: str = "transfer"
    from_dims: dict[str, str] = {"student_dim": "student", "teacher_dim": "teacher"}
    """Constructor parameters that `fedkd.losses.build_losses` fills from its ``dims``, not from the config."""

    def __init__(self, student_dim: int, teacher_dim: int, kind: str = "embedding") -> None:
        super().__init__()
        self.student_dim = require_int("student_dim", student_dim, 1)
        self.teacher_dim = require_int("teacher_dim", teacher_dim, 1)
        self.kind = require_choice("kind", kind, ("embedding", "tokens", "map"))
        self.projector = nn.Linear(self.student_dim, self.teacher_dim)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The student's features in the teacher's width (the regressor ``r``)."""
        if self.kind != "map":
            return self.projector(features)
        if features.dim() not in _POOL:
            raise ValueError(f"HintLoss(kind='map'): features {tuple(features.shape)} must be [N, C, L], "
                             "[N, C, H, W] or [N, C, D, H, W]")
        return self.projector(features.movedim(1, -1)).movedim(-1, 1)

    def forward(
        self,
        student_logits: torch.Tensor,
        *,
        features: torch.Tensor | None = None,
        teacher_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MSE between the projected student features and the teacher's (same rows)."""
        features, teacher = student_and_teacher("HintLoss", features, teacher_features)
        projected = self.project(features)
        if self.kind == "map" and projected.dim() == teacher.dim():
            projected = _pool_to(projected, tuple(teacher.shape[2:]))
        if projected.shape != teacher.shape:
            raise ValueError(f"HintLoss: projected features {tuple(projected.shape)} do not match the "
                             f"teacher's {tuple(teacher.shape)}")
        return F.mse_loss(projected, teacher.to(projected.dtype))

    def __str__(self) -> str:
        return f"Hint({self.student_dim}->{self.teacher_dim})"

    def extra_repr(self) -> str:
        return f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, kind={self.kind!r}"


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention of activations ``[N, C, *spatial]``: ``mean_c |a_c|**p``, ``[N, *spatial]``
    (Zagoruyko & Komodakis 2017, before flattening and normalising)."""
    if features.dim() < 3:
        raise ValueError(f"attention transfer needs maps [N, C, *spatial], got {tuple(features.shape)}")
    return features.abs().pow(p).mean(1)


class AttentionTransfer(nn.Module):
    """Attention transfer: ``mean((Q_s / ||Q_s|| - Q_t / ||Q_t||)**2)``.

    Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017, in the form of the
    authors' code (``at_loss``): ``Q = mean_c |a_c|**p`` flattened per sample and L2-normalised, the
    squared difference averaged over the batch and the positions (the paper's beta / 2 goes into the
    term's weight; they used beta = 1000). Channel counts may differ. When spatial sizes differ, each
    attention map (after the channel mean, before normalising) is adaptive-average-pooled to the
    smaller size along every spatial axis.

    Parameters
    ----------
    p : float
        Exponent of the activations (the paper's 2).
    """

    needs: tuple[str, ...] = ("features", "teacher_features")
    rows: str = "transfer"

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = require_number("p", p, 0.0, low_open=True)

    def forward(
        self,
        student_logits: torch.Tensor,
        *,
        features: torch.Tensor | None = None,
        teacher_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """AT loss for maps ``[N, C_s, *spatial_s]`` and ``[N, C_t, *spatial_t]`` of the same rank."""
        features, teacher = student_and_teacher("AttentionTransfer", features, teacher_features,
                                                "map")
        if features.dim() != teacher.dim():
            raise ValueError(f"AttentionTransfer: maps {tuple(features.shape)} and {tuple(teacher.shape)} "
                             "must have the same rank")
        a_s, a_t = attention_map(features, self.p), attention_map(teacher.to(features.dtype), self.p)
        size = tuple(min(s, t) for s, t in zip(a_s.shape[1:], a_t.shape[1:]))
        a_s, a_t = (_pool_to(a.unsqueeze(1), size).squeeze(1) for a in (a_s, a_t))
        q_s = F.normalize(a_s.reshape(len(a_s), -1), dim=1)
        q_t = F.normalize(a_t.reshape(len(a_t), -1), dim=1)
        return (q_s - q_t).pow(2).mean()

    def __str__(self) -> str:
        return f"AT(p={_fmt(self.p)})"

    def extra_repr(self) -> str:
        return f"p={self.p}"


class AttentionWeightsLoss(nn.Module):
    """KL between a transformer teacher's and the student's attention weights.

    ``mean over (n, head, query) of KL(A_t[n, h, i, :] || A_s[n, h, i, :])``, as MiniLM (Wang et
    al., "MiniLM: Deep Self-Attention Distillation", NeurIPS 2020) distils self-attention
    distributions. KL rather than MSE because each query's row is a probability distribution over the
    keys (post-softmax weights): KL compares distributions, is 0 exactly when they agree and weighs a
    row by how much mass moved, whereas MSE on probabilities shrinks with the number of tokens.
    Teacher zeros (masked keys) count as ``0 * log 0 = 0``; the student's weights are clamped at
    1e-12 before the log. When the head counts differ, both are averaged over their heads first (a
    mean of distributions is one). Token counts must match.
    """

    needs: tuple[str, ...] = ("attention", "teacher_attention")
    rows: str = "transfer"
    eps: float = 1e-12
    """Floor of the student's attention weights under the log."""

    def forward(
        self,
        student_logits: torch.Tensor,
        *,
        attention: torch.Tensor | None = None,
        teacher_attention: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """KL for attention weights ``[N, heads_s, T, T]`` and ``[N, heads_t, T, T]``."""
        student = need("attention", attention, "AttentionWeightsLoss", "[N, heads, T, T]")
        teacher = need("teacher_attention", teacher_attention, "AttentionWeightsLoss",
                        "[N, heads, T, T]").detach().to(student.dtype)
        if (student.dim() != 4 or teacher.dim() != 4 or len(student) != len(teacher)
                or student.shape[2:] != teacher.shape[2:]):
            raise ValueError(f"AttentionWeightsLoss: attention {tuple(student.shape)} and teacher_attention "
                             f"{tuple(teacher.shape)} must be [N, heads, T, T] with the same N and T")
        if student.shape[1] != teacher.shape[1]:
            student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
        log_s = student.clamp_min(self.eps).log()
        kl = (torch.xlogy(teacher, teacher) - teacher * log_s).sum(-1)
        return kl.mean()

    def __str__(self) -> str:
        return "AttnKL"
