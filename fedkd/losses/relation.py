"""Relation-based losses: how samples relate to each other (distances, angles, similarities), and
class prototypes.

Relations compare rows with rows, so a student and a teacher of different architectures (and feature
widths) can be compared: features of any shape are flattened per sample. The pure functions here
(`similarity_matrix`, `sp_matrix`, `class_prototypes`, `fixed_projection`) are also what the relational
and prototype strategies compute and send over the wire. Teacher inputs are detached.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedkd.errors import require_int
from fedkd.losses._checks import need, student_and_teacher, zero

_EPS = 1e-12
"""Floor of squared distances and of their mean (as in the RKD authors' code)."""


def _flat(features: torch.Tensor) -> torch.Tensor:
    """``[N, ...]`` -> ``[N, D]``."""
    if features.dim() < 1:
        raise ValueError(f"features {tuple(features.shape)} need a row axis [N, ...]")
    return features.reshape(len(features), -1)


def _off_diagonal(n: int, like: torch.Tensor) -> torch.Tensor:
    """``[n, n]`` mask, 1 off the diagonal and 0 on it, in `like`'s dtype and device."""
    return 1.0 - torch.eye(n, dtype=like.dtype, device=like.device)


def similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[N, N]``: features flattened per sample, rows L2-normalised, ``F @ F.T``."""
    flat = F.normalize(_flat(features), dim=1)
    return flat @ flat.T


def sp_matrix(features: torch.Tensor) -> torch.Tensor:
    """Tung & Mori's similarity ``[N, N]``: ``G = F @ F.T`` of the flattened features, then each row
    of G L2-normalised (unlike `similarity_matrix`, which normalises the features first)."""
    flat = _flat(features)
    return F.normalize(flat @ flat.T, dim=1)


def pairwise_distances(features: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``[N, N]`` between flattened rows (squared distances floored at 1e-12
    before the root, the diagonal exactly 0), as in the RKD authors' ``pdist``."""
    flat = _flat(features)
    square = flat.pow(2).sum(1)
    d2 = (square.unsqueeze(1) + square.unsqueeze(0) - 2.0 * flat @ flat.T).clamp_min(_EPS)
    return d2.sqrt() * _off_diagonal(len(flat), flat)


def _normalised_distances(features: torch.Tensor) -> torch.Tensor:
    d = pairwise_distances(features)
    n = len(d)
    mean = d.sum() / (n * (n - 1))
    return d / mean.clamp_min(_EPS)


def _angles(features: torch.Tensor) -> torch.Tensor:
    """``[N, N, N]``: cosine of the angle at ``e_i`` between ``e_j`` and ``e_k`` (0 when j or k is i)."""
    flat = _flat(features)
    directions = F.normalize(flat.unsqueeze(0) - flat.unsqueeze(1), dim=2)  # [i, j]: e_j - e_i
    return directions @ directions.transpose(1, 2)


class RKDDistance(nn.Module):
    """Distance-wise relational KD: Huber between normalised pairwise distances.

    Park et al., "Relational Knowledge Distillation", CVPR 2019. Distances ``||e_i - e_j||`` of the
    flattened features, each set divided by its mean over the off-diagonal pairs (so the loss is
    invariant to scaling either side's features), compared with smooth L1 (delta 1) averaged over
    all N x N entries, as in the authors' code (the diagonal contributes 0). Fewer than 2 rows: 0.
    The paper's weight was 25.
    """

    needs: tuple[str, ...] = ("features", "teacher_features")
    rows: str = "transfer"

    def forward(
        self,
        student_logits: torch.Tensor,
        *,
        features: torch.Tensor | None = None,
        teacher_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """RKD-D for features ``[N, ...]`` of any widths (same N)."""
        features, teacher = student_and_teacher("RKDDistance", features, teacher_features)
        if len(features) < 2:
            return zero(features)
        student_d = _normalised_distances(features)
        teacher_d = _normalised_distances(teacher.to(features.dtype))
        return F.smooth_l1_loss(student_d, teacher_d)

    def __str__(self) -> str:
        return "RKD-D"


class RKDAngle(nn.Module):
    """Angle-wise relational KD: Huber between the cosines of the angles of every triplet.

    Park et al., "Relational Knowledge Distillation", CVPR 2019: ``cos angle(e_i, e_j, e_k) =
    <(e_j - e_i) / ||.||, (e_k - e_i) / ||.||>``, smooth L1 (delta 1) averaged over all N x N x N
    triplets as in the authors' code (degenerate ones are 0 on both sides). Builds ``[N, N, D]``
    differences: memory grows as N^2 times the flattened width. Fewer than 3 rows: 0. The paper's
    weight was 50.
    """

    needs: tuple[str, ...] = ("features", "teacher_features")
    rows: str = "transfer"

    def forward(
        self,
        student_logits: torch.Tensor,
        *,
        features: torch.Tensor | None = None,
        teacher_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """RKD-A for features ``[N, ...]`` of any widths (same N)."""
        features, teacher = student_and_teacher("RKDAngle", features, teacher_features)
        if len(features) < 3:
            return zero(features)
        return F.smooth_l1_loss(_angles(features), _angles(teacher.to(features.dtype)))

    def __str__(self) -> str:
        return "RKD-A"


class SimilarityPreserving(nn.Module):
    """Similarity-preserving KD: ``||G_s - G_t||_F**2 / N**2`` with row-normalised Gram matrices.

    Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019 (`sp_matrix` on each
    side; the paper's gamma, 3000, goes into the weight).
    """

    needs: tuple[str, ...] = ("features", "teacher_features")
    rows: str = "transfer"

    def forward(
        self,
        student_logits: torch.Tensor,
        *,
        features: torch.Tensor | None = None,
        teacher_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """SP loss for features ``[N, ...]`` of any widths (same N)."""
        features, teacher = student_and_teacher("SimilarityPreserving", features, teacher_features)
        g_s, g_t = sp_matrix(features), sp_matrix(teacher.to(features.dtype))
        return (g_s - g_t).pow(2).sum() / len(features) ** 2

    def __str__(self) -> str:
        return "SP"


class RelationMatch(nn.Module):
    """The student's cosine similarities against a target relation: MSE over off-diagonal pairs.

    ``sum_{i != j} (S_ij - R_ij)**2 / (N (N - 1))`` with ``S = similarity_matrix(features)``: the
    client-side half of a relational strategy whose server aggregates ``[N, N]`` relations from the
    clients' `similarity_matrix` on the transfer rows (in the spirit of Park et al. 2019 and Tung &
    Mori 2019, with the relation crossing the wire instead of a teacher's features). Cosine
    similarities rather than the SP form because they need no per-row renormalisation, so a mean of
    clients' matrices is again one on the same scale; the diagonal (always 1, or 0 for a zero row)
    carries nothing and is left out. Fewer than 2 rows: 0.
    """

    needs: tuple[str, ...] = ("features", "relation")
    rows: str = "transfer"

    def forward(
        self,
        student_logits: torch.Tensor,
        *,
        features: torch.Tensor | None = None,
        relation: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MSE between ``similarity_matrix(features)`` and ``relation`` ``[N, N]`` off the diagonal."""
        features = need("features", features, "RelationMatch", "the student's tap")
        target = need("relation", relation, "RelationMatch", "a target similarity matrix [N, N]").detach()
        n = len(features)
        if target.shape != (n, n):
            raise ValueError(f"RelationMatch: relation {tuple(target.shape)} must be [N, N] for features "
                             f"{tuple(features.shape)}")
        if n < 2:
            return zero(features)
        similarity = similarity_matrix(features)
        off = _off_diagonal(n, similarity)
        return ((similarity - target.to(similarity.dtype)).pow(2) * off).sum() / (n * (n - 1))

    def __str__(self) -> str:
        return "RelMSE"


def class_prototypes(features: torch.Tensor, labels: torch.Tensor,
                     num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class means of embeddings (FedProto's local prototypes).

    Parameters
    ----------
    features : torch.Tensor
        ``[N, P]`` embeddings (projected to the shared width P).
    labels : torch.Tensor
        ``[N]`` class indices in ``0..num_classes-1``.
    num_classes : int
        C.

    Returns
    -------
    means : torch.Tensor
        ``[C, P]``; the rows of classes without an example are NaN.
    counts : torch.Tensor
        ``[C]`` int64 examples per class.
    """
    num_classes = require_int("num_classes", num_classes, 1)
    if features.dim() != 2 or labels.shape != (len(features),):
        raise ValueError(f"class_prototypes: features {tuple(features.shape)} must be [N, P] and labels "
                         f"{tuple(labels.shape)} [N]")
    labels = labels.long()
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"class_prototypes: labels must be in 0..{num_classes - 1}")
    counts = torch.bincount(labels, minlength=num_classes)
    sums = features.new_zeros(num_classes, features.shape[1]).index_add(0, labels, features)
    means = sums / counts.clamp_min(1).unsqueeze(1).to(features.dtype)
    return torch.where((counts > 0).unsqueeze(1), means, torch.full_like(means, float("nan"))), counts


def fixed_projection(in_dim: int, out_dim: int, seed: int) -> torch.Tensor:
    """A seeded random projection ``[in_dim, out_dim]`` (``x @ R`` keeps norms in expectation).

    Entries ``+-1 / sqrt(out_dim)`` with equal probability: the Rademacher form of the
    Johnson-Lindenstrauss projection (Achlioptas, "Database-friendly random projections", 2003).
    The signs come from integer draws of a CPU ``torch.Generator`` seeded from ``(seed, in_dim,
    out_dim)``, so every machine builds the same matrix bit for bit (a Gaussian one would go through
    log/cos, whose last bits may differ between CPUs and libraries).

    Parameters
    ----------
    in_dim, out_dim : int
        Width of an architecture's embedding and the shared width P.
    seed : int
        The run's seed (>= 0).
    """
    in_dim, out_dim = require_int("in_dim", in_dim, 1), require_int("out_dim", out_dim, 1)
    seed = require_int("seed", seed, 0)
    state = np.random.SeedSequence([seed, in_dim, out_dim]).generate_state(1)[0]
    gen = torch.Generator(device="cpu").manual_seed(int(state))
    signs = torch.randint(0, 2, (in_dim, out_dim), generator=gen, dtype=torch.int64) * 2 - 1
    return signs.to(torch.float32) / float(np.sqrt(out_dim))


class PrototypeLoss(nn.Module):
    """FedProto regulariser: MSE between each embedding and the global prototype of its label.

    Tan et al., "FedProto: Federated Prototype Learning across Heterogeneous Clients", AAAI 2022.
    ``features`` are the embeddings already projected to the prototypes' width P (e.g. by
    `fixed_projection`); rows whose class has no prototype (a NaN row of ``prototypes``) are skipped;
    the mean is over the remaining rows and the P coordinates, and 0 when none remain.
    """

    needs: tuple[str, ...] = ("features", "prototypes", "labels")
    rows: str = "private"

    def forward(
        self,
        student_logits: torch.Tensor,
        *,
        features: torch.Tensor | None = None,
        prototypes: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MSE for embeddings ``[N, P]``, prototypes ``[C, P]`` and labels ``[N]``."""
        features = need("features", features, "PrototypeLoss", "projected embeddings [N, P]")
        prototypes = need("prototypes", prototypes, "PrototypeLoss", "class prototypes [C, P]").detach()
        labels = need("labels", labels, "PrototypeLoss", "class indices [N]")
        if (features.dim() != 2 or prototypes.dim() != 2 or features.shape[1] != prototypes.shape[1]
                or labels.shape != (len(features),)):
            raise ValueError(f"PrototypeLoss: features {tuple(features.shape)} must be [N, P], prototypes "
                             f"{tuple(prototypes.shape)} [C, P] and labels {tuple(labels.shape)} [N]")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(prototypes)):
            raise ValueError(f"PrototypeLoss: labels must be in 0..{len(prototypes) - 1}")
        target = prototypes.to(features.dtype)[labels]
        known = ~torch.isnan(target).any(1)
        if not bool(known.any()):
            return zero(features)
        return F.mse_loss(features[known], target[known])

    def __str__(self) -> str:
        return "Proto"
