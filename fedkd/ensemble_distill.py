"""Server-side ensemble distillation with feature, attention and relation terms (FedDF's).

`fedkd.server_distill.distill` distils soft targets alone. Here the server, which holds every
teacher model, also hands each term that reads a teacher's tap (``hint``, ``attention``,
``attention_weights``, ``rkd_distance``, ``rkd_angle``, ``similarity``: ``needs`` holds
``teacher_features`` or ``teacher_attention``) the taps of each teacher on the same rows. With K
teachers such a term counts as the mean of its value against each teacher (teachers of different
architectures have different widths; a ``hint`` term then has one projector per teacher
architecture, trained with the student). Terms without a teacher input (``kd``) run once, on the
ensemble's soft targets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedkd.devices import on_device
from fedkd.errors import ConfigError
from fedkd.losses import WeightedSum, build_losses, check_losses
from fedkd.losses.rounds import TEACHER_INPUTS
from fedkd.models._common import plain_mapping
from fedkd.models.taps import check_tap
from fedkd.server_distill import distill

ATTENTION = "attention"


def tap_width(model: nn.Module, tap: str, example: torch.Tensor) -> int:
    """The tap's width: channels of a map, last axis otherwise (one row, eval mode, no grad)."""
    kind = check_tap(model, tap)
    with torch.no_grad():
        was = model.training
        model.eval()
        out = model.forward_taps(example[:1], [tap])[1][tap]
        model.train(was)
    return int(out.shape[1] if kind == "map" else out.shape[-1])


@torch.no_grad()
def teacher_taps(teachers: Sequence[nn.Module], taps: Sequence[str], x: torch.Tensor,
                 device: torch.device, batch_size: int = 1024) -> list[torch.Tensor]:
    """Each teacher's tap on all of `x`, in eval mode, on `device`."""
    out = []
    for model, tap in zip(teachers, taps):
        with on_device([model], device):
            model.eval()
            out.append(torch.cat([model.forward_taps(chunk.to(device), [tap])[1][tap]
                                  for chunk in x.split(batch_size)]))
    return out


class EnsembleLoss(nn.Module):
    """A student's loss against the soft targets and K teachers' taps (module docstring).

    Parameters
    ----------
    spec : mapping
        The term spec (``fedkd.losses.specs``), e.g. ``{kd: {weight: 1}, similarity: {weight: 1}}``.
    temperature : float
        Default temperature of the terms.
    student_width : int
        The student's tap width; ``teacher_widths`` the teachers' (for ``hint`` projectors).
    """

    def __init__(self, spec: Mapping[str, Any], temperature: float, student_width: int,
                 teacher_widths: Sequence[int]) -> None:
        super().__init__()
        full = build_losses(spec, alpha=1.0, temperature=temperature,
                            dims={"student": student_width, "teacher": max(teacher_widths)})
        self.own = [(w, t) for w, t in full.active_terms()
                    if not set(t.needs) & set(TEACHER_INPUTS)]
        teacher_spec = {name: options for name, options in spec.items()
                        if set(_needs(name)) & set(TEACHER_INPUTS)}
        self.per_width = nn.ModuleDict({
            str(width): build_losses(teacher_spec, alpha=1.0, temperature=temperature,
                                     dims={"student": student_width, "teacher": width})
            for width in sorted(set(teacher_widths))} if teacher_spec else {})
        self.own_terms = nn.ModuleList(t for _, t in self.own)
        self.teacher_widths = list(teacher_widths)
        self.needs_taps = bool(teacher_spec)

    def forward(self, logits: torch.Tensor, soft_targets: torch.Tensor,
                features: torch.Tensor | None, teachers: Sequence[torch.Tensor]) -> torch.Tensor:
        """The weighted sum on one batch: own terms once, teacher terms averaged over teachers."""
        total = logits.new_zeros(())
        for weight, term in self.own:
            total = total + weight * term(logits, soft_targets=soft_targets)
        if not self.needs_taps:
            return total
        for t_feat, width in zip(teachers, self.teacher_widths):
            loss: WeightedSum = self.per_width[str(width)]
            for weight, term in loss.active_terms():
                key = "attention" if "attention" in term.needs else "features"
                inputs = {key: features, f"teacher_{key}": t_feat}
                total = total + weight * term(logits, **inputs) / len(teachers)
        return total


def _needs(name: str) -> tuple[str, ...]:
    from fedkd.losses import LOSS_TERMS

    return LOSS_TERMS[name].needs


def feature_distill(student: nn.Module, x: torch.Tensor, soft_targets: torch.Tensor, *,
                    spec: Mapping[str, Any], student_tap: str, teachers: Sequence[nn.Module],
                    teacher_tap_names: Sequence[str], temperature: float, epochs: int, lr: float,
                    batch_size: int, seed: Sequence[int],
                    device: torch.device | None = None) -> list[float]:
    """`fedkd.server_distill.distill` with the terms of `spec` (module docstring); return the
    mean loss per epoch. Adam trains the student and any hint projectors; shuffling is seeded
    from `seed` and the global RNG left as it was."""

    def step(device: torch.device) -> tuple[list[nn.Parameter], Any]:
        widths = [tap_width(t, tap, x) for t, tap in zip(teachers, teacher_tap_names)]
        loss_fn = EnsembleLoss(spec, temperature, tap_width(student, student_tap, x),
                               widths).to(device)
        feats = (teacher_taps(teachers, teacher_tap_names, x, device) if loss_fn.needs_taps
                 else [])

        def batch_loss(xb: torch.Tensor, soft: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            if loss_fn.needs_taps:
                logits, taps = student.forward_taps(xb, [student_tap])
                features = taps[student_tap]
            else:
                logits, features = student(xb), None
            return loss_fn(logits, soft, features, [f[idx.to(f.device)] for f in feats])

        return list(loss_fn.parameters()), batch_loss

    return distill(student, x, soft_targets, temperature=temperature, epochs=epochs, lr=lr,
                   batch_size=batch_size, seed=seed, device=device, step=step)


def server_loss_spec(spec: Any, temperature: float) -> dict[str, dict[str, Any]]:
    """``server_losses`` checked as ``distill.losses`` is (`fedkd.losses.check_losses`), its
    errors named under ``strategy.flower.server_losses``."""
    try:
        return check_losses(plain_mapping(spec, "server_losses"), temperature)
    except ConfigError as err:  # named under strategy.flower by whoever builds the strategy
        if err.key.startswith("distill.losses"):
            raise ConfigError("server_losses" + err.key.removeprefix("distill.losses"),
                              *((err.value, err.allowed) if err.has_value else ())) from None
        raise
