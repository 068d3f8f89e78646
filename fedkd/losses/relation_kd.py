"""Relation distillation across architectures: similarity distributions that cross the wire.

Each client sends the cosine similarities of its tap between the transfer rows
(`fedkd.losses.relation.similarity_matrix`, the diagonal left out); the server aggregates the
clients' rows with the run's aggregator as if they were logits at the relation temperature, so
row ``i`` of the result is a distribution over the other rows: how the ensemble sees row ``i``'s
neighbours (`fedkd.strategies.relational`). `RelationKD` pulls the student's own distribution
toward it. Only sample-to-sample structure travels, never a feature vector, so clients of any
width and architecture share it (Park et al. 2019, "Relational Knowledge Distillation"; the
softmax over similarities at a temperature follows Fang et al. 2021, "SEED").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedkd.aggregation import check_temperature
from fedkd.losses._checks import need, zero
from fedkd.losses.relation import similarity_matrix


def similarity_rows(features: torch.Tensor) -> torch.Tensor:
    """``[N, N - 1]``: each row's cosine similarities to the other rows, in row order (what a
    client sends)."""
    sim = similarity_matrix(features)
    n = len(sim)
    keep = ~torch.eye(n, dtype=torch.bool, device=sim.device)
    return sim[keep].reshape(n, n - 1)


def top_similarities(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` largest entries of `similarity_rows`' ``[N, N - 1]`` (all when fewer),
    largest first, and their columns in that layout: float32 and int16 ``[N, min(k, N - 1)]``."""
    values, index = torch.topk(rows, min(int(k), rows.shape[1]), dim=1)
    return values.float(), index.to(torch.int16)


def full_relation(rows: torch.Tensor) -> torch.Tensor:
    """Inverse layout of `similarity_rows` (the wire's): ``[N, N - 1]`` -> ``[N, N]`` with a
    zero diagonal."""
    n = len(rows)
    if rows.shape != (n, max(n - 1, 0)):
        raise ValueError(f"full_relation: {tuple(rows.shape)} must be [N, N - 1]")
    out = rows.new_zeros(n, n)
    out[~torch.eye(n, dtype=torch.bool, device=rows.device)] = rows.reshape(-1)
    return out


class RelationKD(nn.Module):
    """``KL(R_i || softmax_{j != i}(cos(f_i, f_j) / tau))``, averaged over the rows that have a
    target (a row of ``relation`` summing to 0 has none).

    Parameters
    ----------
    temperature : float
        tau > 0, the temperature the server formed the target distributions at.
    """

    needs: tuple[str, ...] = ("features", "relation")
    rows: str = "transfer"

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)

    def forward(self, student_logits: torch.Tensor, *, features: torch.Tensor | None = None,
                relation: torch.Tensor | None = None) -> torch.Tensor:
        """KL for the student's tap ``[N, ...]`` and a target ``[N, N]`` (rows: distributions
        over the other rows, zero diagonal)."""
        features = need("features", features, "RelationKD", "the student's tap")
        target = need("relation", relation, "RelationKD", "target distributions [N, N]").detach()
        n = len(features)
        if target.shape != (n, n):
            raise ValueError(f"RelationKD: relation {tuple(target.shape)} must be [N, N] for "
                             f"features {tuple(features.shape)}")
        has = target.sum(1) > 0
        if n < 2 or not bool(has.any()):
            return zero(features)
        eye = torch.eye(n, dtype=torch.bool, device=features.device)
        scores = (similarity_matrix(features) / self.temperature).masked_fill(eye, float("-inf"))
        log_q = F.log_softmax(scores, dim=1).masked_fill(eye, 0.0)
        p = target.to(log_q.dtype)
        kl = (torch.xlogy(p, p) - p * log_q).sum(1)
        return kl[has].mean()

    def __str__(self) -> str:
        return f"RelKD(tau={self.temperature:g})"
