"""Input checks the loss modules share (a missing input or mismatched rows named in one line)."""

from __future__ import annotations

import torch


def need(name: str, value: torch.Tensor | None, owner: str, what: str) -> torch.Tensor:
    """`value`, or a ValueError saying that `owner` needs input `name` (`what` it is)."""
    if value is None:
        raise ValueError(f"{owner} needs {name} ({what})")
    return value


def same_rows(owner: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Refuse two inputs whose first axes (the rows N) differ."""
    if student.dim() < 1 or teacher.dim() < 1 or len(student) != len(teacher):
        raise ValueError(f"{owner}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                         "must have the same rows N")


def student_and_teacher(owner: str, features: torch.Tensor | None,
                        teacher_features: torch.Tensor | None, what: str = "tap"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both inputs of a term that compares a student's `what` with a teacher's: present, on the
    same rows N, the teacher's detached (no gradient reaches a teacher)."""
    features = need("features", features, owner, f"the student's {what}")
    teacher = need("teacher_features", teacher_features, owner, f"the teacher's {what}").detach()
    same_rows(owner, features, teacher)
    return features, teacher


def zero(x: torch.Tensor) -> torch.Tensor:
    """A 0-d zero on `x`'s graph (the sum of none of its elements: no NaN leaks in, backward works)."""
    return x.reshape(-1)[:0].sum()
