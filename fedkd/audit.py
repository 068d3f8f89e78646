"""Membership inference: the loss-threshold attack and the numbers that describe it.

The attack is Yeom et al. (2018), "Privacy Risk in Machine Learning": a row on which the model's
loss is low is guessed to be a member of its training set. Its score is the negative
cross-entropy of the row's true label, ``-CE(f(x), y)``: higher means "member". How well the
score separates members from non-members is given as

- the area under the ROC curve (AUC; 0.5: the attack is a coin toss), and
- the true-positive rate at a false-positive rate of at most 1% (TPR@1%FPR), read off the ROC
  curve without interpolation (Carlini et al. 2022, "Membership Inference Attacks From First
  Principles": the low-FPR regime is what matters for a confident attacker);
- a threshold calibrated on held-out rows: the attacker sets the threshold at the
  ``1 - fpr`` quantile of the scores of non-member rows it holds (never the evaluated ones) and
  we report the TPR and FPR that threshold reaches on the evaluated rows;
- the membership advantage ``max(TPR - FPR)`` over thresholds (Yeom et al.'s measure).

Members and non-members are matched by class (`matched_rows`): a model of a client that holds
mostly 3s has a low loss on any 3, member or not, so comparing its 3s with a test set of every
digit would measure the label skew, not membership. This module is Flower-free.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_FPR = 0.01
"""The false-positive rate at which the TPR is reported."""


def loss_scores(model: nn.Module, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray,
                batch_size: int = 512) -> np.ndarray:
    """Yeom et al.'s attack score of every row: ``-CE(model(x), y)`` (higher: member).

    Parameters
    ----------
    model : nn.Module
        The target; put in eval mode, its gradients untouched.
    x, y : tensor or array
        Inputs [N, ...] and integer labels [N].
    batch_size : int
        Rows per forward pass.

    Returns
    -------
    np.ndarray
        float64 [N].
    """
    x = torch.as_tensor(np.asarray(x, dtype=np.float32) if isinstance(x, np.ndarray) else x)
    y = torch.as_tensor(np.asarray(y, dtype=np.int64) if isinstance(y, np.ndarray) else y)
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            logits = model(x[start:start + batch_size].float())
            loss = nn.functional.cross_entropy(logits.double(), y[start:start + batch_size].long(),
                                               reduction="none")
            out.append(-loss.numpy())
    return np.concatenate(out) if out else np.zeros(0)


def _labelled(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    members, nonmembers = np.asarray(members, float), np.asarray(nonmembers, float)
    if not len(members) or not len(nonmembers):
        raise ValueError("membership scores need at least one member and one non-member")
    if not (np.isfinite(members).all() and np.isfinite(nonmembers).all()):
        raise ValueError("membership scores must be finite")
    labels = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    return labels, np.r_[members, nonmembers]


def auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """Area under the ROC curve of scores (higher: member); ties count one half.

    Equals the probability that a random member scores above a random non-member.
    """
    labels, scores = _labelled(members, nonmembers)
    return float(roc_auc_score(labels, scores))


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float = DEFAULT_FPR) -> float:
    """The largest TPR of a threshold whose FPR is at most `fpr`, from the ROC curve.

    With fewer than ``1 / fpr`` non-members the only such FPR is 0: the TPR at zero false
    positives.
    """
    labels, scores = _labelled(members, nonmembers)
    fprs, tprs, _ = roc_curve(labels, scores)
    return float(tprs[fprs <= fpr + 1e-12].max())


def advantage(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """Yeom et al.'s membership advantage: ``max(TPR - FPR)`` over thresholds."""
    labels, scores = _labelled(members, nonmembers)
    fprs, tprs, _ = roc_curve(labels, scores)
    return float(np.max(tprs - fprs))


def calibrated_threshold(reference: np.ndarray, fpr: float = DEFAULT_FPR) -> float:
    """The threshold an attacker sets from non-member rows it holds (`reference`): rows
    scoring above it are called members; about `fpr` of the reference rows do."""
    reference = np.asarray(reference, float)
    if not len(reference):
        raise ValueError("calibration needs at least one reference row")
    return float(np.quantile(reference, 1.0 - fpr, method="higher"))


def matched_rows(member_y: np.ndarray, pool_y: np.ndarray, rng: np.random.Generator,
                 limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices of members and of non-members, as many of each, class by class.

    For every class the smaller of its member count and its pool count is drawn from each
    (without replacement), so both sides have the same size and the same label distribution.
    With `limit`, at most that many pairs (drawn evenly over the matched ones).

    Returns
    -------
    tuple of np.ndarray
        Sorted indices into `member_y` and into `pool_y`.
    """
    member_y, pool_y = np.asarray(member_y), np.asarray(pool_y)
    picked_m, picked_n = [], []
    for label in np.unique(member_y):
        mine, theirs = np.flatnonzero(member_y == label), np.flatnonzero(pool_y == label)
        k = min(len(mine), len(theirs))
        picked_m.append(rng.choice(mine, k, replace=False))
        picked_n.append(rng.choice(theirs, k, replace=False))
    members = np.concatenate(picked_m) if picked_m else np.zeros(0, int)
    nonmembers = np.concatenate(picked_n) if picked_n else np.zeros(0, int)
    if limit is not None and len(members) > limit:
        keep = rng.choice(len(members), limit, replace=False)
        members, nonmembers = members[keep], nonmembers[keep]
    return np.sort(members), np.sort(nonmembers)


@dataclass(frozen=True)
class AttackResult:
    """How well the scores tell members from non-members (see the module's docstring)."""

    auc: float
    tpr_at_fpr: float
    advantage: float
    members: int
    nonmembers: int
    fpr: float = DEFAULT_FPR
    calibrated_tpr: float | None = None
    calibrated_fpr: float | None = None
    reference_rows: int = 0

    def to_dict(self) -> dict[str, float | int | None]:
        """Plain values (JSON)."""
        return asdict(self)


def attack(members: np.ndarray, nonmembers: np.ndarray, reference: np.ndarray | None = None,
           fpr: float = DEFAULT_FPR) -> AttackResult:
    """The attack's numbers from scores of members, non-members and (optionally) held-out
    `reference` non-members that calibrate the threshold."""
    cal_tpr = cal_fpr = None
    if reference is not None and len(reference):
        threshold = calibrated_threshold(reference, fpr)
        cal_tpr = float(np.mean(np.asarray(members) > threshold))
        cal_fpr = float(np.mean(np.asarray(nonmembers) > threshold))
    return AttackResult(
        auc=auc(members, nonmembers), tpr_at_fpr=tpr_at_fpr(members, nonmembers, fpr),
        advantage=advantage(members, nonmembers), members=len(members),
        nonmembers=len(nonmembers), fpr=fpr, calibrated_tpr=cal_tpr, calibrated_fpr=cal_fpr,
        reference_rows=0 if reference is None else len(reference))


def audit_model(model: nn.Module, members: tuple[np.ndarray, np.ndarray],
                pool: tuple[np.ndarray, np.ndarray], seed: int = 0,
                limit: int | None = None, fpr: float = DEFAULT_FPR) -> AttackResult:
    """The loss attack on `model`: its training rows `members` (x, y) against class-matched rows
    of `pool` (x, y: rows of the same distribution it never trained on). Pool rows left over
    after matching calibrate the threshold.

    Raises ValueError when no class has both a member and a pool row.
    """
    rng = np.random.default_rng(seed)
    (mx, my), (px, py) = members, pool
    m_idx, n_idx = matched_rows(my, py, rng, limit)
    if not len(m_idx):
        raise ValueError("no class has both member rows and held-out rows")
    rest = np.setdiff1d(np.arange(len(py)), n_idx)
    scores = loss_scores(model, np.concatenate([mx[m_idx], px[n_idx], px[rest]]),
                         np.concatenate([my[m_idx], py[n_idx], py[rest]]))
    k = len(m_idx)
    return attack(scores[:k], scores[k:2 * k], scores[2 * k:], fpr)


def summarise(results: dict[int, AttackResult]) -> dict[str, float | None]:
    """Means over clients: ``auc_mean``, ``tpr_at_fpr_mean``, ``advantage_mean`` (None: none)."""
    values = list(results.values())
    if not values:
        return {"auc_mean": None, "tpr_at_fpr_mean": None, "advantage_mean": None}
    return {"auc_mean": float(np.mean([r.auc for r in values])),
            "tpr_at_fpr_mean": float(np.mean([r.tpr_at_fpr for r in values])),
            "advantage_mean": float(np.mean([r.advantage for r in values]))}
