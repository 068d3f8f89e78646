"""Distillation losses: small modules with one call signature, and their weighted composition.

Every loss is an ``nn.Module`` called as ``term(student_logits, **inputs)`` that returns a scalar.
Each declares ``needs``, the keyword inputs it reads (names from `INPUTS`: soft targets, labels,
the student's and a teacher's features or attention, a target relation, class prototypes, a
snapshot's or the exits' logits), and ``rows``, where the caller evaluates it (``transfer`` or
``private`` rows, `ROWS`). A training loop reads those two and never branches on a loss's type:
it evaluates each of a `WeightedSum`'s ``active_terms()`` on its rows with what it needs and hands
the values to ``combine``. Terms of weight 0 are not active, so their forward pass (and its side
effects on BatchNorm statistics and the random stream) never happens.

Modules: `response` (KD, CE, the weighted sum, the vocabulary), `feature` (FitNets hints, attention
transfer, attention weights), `relation` (RKD, similarity preserving, relation matching, prototypes),
`self_distill` (an earlier snapshot, exits), `specs` (``distill.losses`` from the config).
"""

from fedkd.losses.feature import AttentionTransfer, AttentionWeightsLoss, HintLoss, attention_map
from fedkd.losses.relation import (
    PrototypeLoss,
    RelationMatch,
    RKDAngle,
    RKDDistance,
    SimilarityPreserving,
    class_prototypes,
    fixed_projection,
    pairwise_distances,
    similarity_matrix,
    sp_matrix,
)
from fedkd.losses.response import (
    INPUTS,
    ROWS,
    CELoss,
    KDLoss,
    WeightedSum,
    _fmt,
    distill_loss,
    term_inputs,
)
from fedkd.losses.self_distill import ExitDistill, SnapshotKD
from fedkd.losses.specs import LOSS_TERMS, build_losses, check_losses, term_options

__all__ = [
    "INPUTS", "LOSS_TERMS", "ROWS", "AttentionTransfer", "AttentionWeightsLoss", "CELoss", "ExitDistill",
    "HintLoss", "KDLoss", "PrototypeLoss", "RKDAngle", "RKDDistance", "RelationMatch", "SimilarityPreserving",
    "SnapshotKD", "WeightedSum", "attention_map", "build_losses", "check_losses", "class_prototypes",
    "distill_loss", "fixed_projection", "pairwise_distances", "similarity_matrix", "sp_matrix",
    "term_inputs", "term_options",
    "_fmt",  # the formulas' short floats, importable here as from the old fedkd/losses.py
]
