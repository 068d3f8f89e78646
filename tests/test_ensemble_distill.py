"""FedDF's server distillation with feature and relation terms (`fedkd.ensemble_distill`)."""

from __future__ import annotations

import copy

import pytest
import torch

from fedkd.ensemble_distill import EnsembleLoss, feature_distill, tap_width
from fedkd.errors import ConfigError
from fedkd.models import MLP, CNN2d
from fedkd.server_distill import distill
from fedkd.strategies.feddf import FedDF

CPU = torch.device("cpu")


def _setup():
    torch.manual_seed(0)
    student = MLP((1, 8, 8), 10, hidden=[16])
    teachers = [CNN2d((1, 8, 8), 10, channels=[4, 8]), MLP((1, 8, 8), 10, hidden=[32])]
    x = torch.randn(48, 1, 8, 8)
    soft = torch.softmax(torch.randn(48, 10), 1)
    return student, teachers, x, soft


COMMON = dict(temperature=2.0, epochs=2, lr=1e-2, batch_size=16, seed=(0, 1, 2), device=CPU)


def test_kd_alone_is_fedDFs_plain_distillation():
    student, teachers, x, soft = _setup()
    other = copy.deepcopy(student)
    distill(student, x, soft, **COMMON)
    feature_distill(other, x, soft, spec={"kd": {"weight": 1.0}}, student_tap="embedding",
                    teachers=teachers, teacher_tap_names=["embedding"] * 2, **COMMON)
    for a, b in zip(student.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("term", ["similarity", "rkd_distance", "rkd_angle", "hint"])
def test_teacher_terms_change_the_student_and_leave_the_teachers(term):
    student, teachers, x, soft = _setup()
    plain, before = copy.deepcopy(student), [copy.deepcopy(t.state_dict()) for t in teachers]
    distill(plain, x, soft, **COMMON)
    history = feature_distill(student, x, soft, spec={"kd": {"weight": 1.0}, term: {"weight": 1.0}},
                              student_tap="embedding", teachers=teachers,
                              teacher_tap_names=["embedding"] * 2, **COMMON)
    assert len(history) == 2 and all(h == h for h in history)
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(),
                                                    plain.state_dict().values()))
    for t, state in zip(teachers, before):
        assert all(torch.equal(a, b) for a, b in zip(t.state_dict().values(), state.values()))


def test_a_hint_gets_one_projector_per_teacher_width():
    student, teachers, x, _ = _setup()
    widths = [tap_width(t, "embedding", x) for t in teachers]
    loss = EnsembleLoss({"kd": {}, "hint": {}}, 2.0, tap_width(student, "embedding", x), widths)
    assert sorted(loss.per_width) == sorted(str(w) for w in set(widths))
    assert sum(p.numel() for p in loss.parameters()) == sum(16 * w + w for w in set(widths))


def test_relation_terms_are_zero_against_a_copy_of_the_student():
    student, _, x, soft = _setup()
    w = tap_width(student, "embedding", x)
    loss = EnsembleLoss({"similarity": {}, "rkd_distance": {}}, 2.0, w, [w])
    logits, taps = student.forward_taps(x, ["embedding"])
    value = loss(logits, soft, taps["embedding"], [taps["embedding"].detach()])
    assert float(value.detach()) == pytest.approx(0.0, abs=1e-6)


def test_feddf_checks_its_server_losses():
    with pytest.raises(ConfigError, match="server_losses.nope"):
        FedDF(server_losses={"nope": {}})
    assert FedDF(server_losses={"kd": {}, "similarity": {"weight": 2.0}}).server_losses == {
        "kd": {"weight": 1.0, "temperature": 1.0}, "similarity": {"weight": 2.0}}
