"""``distill.losses`` from the config: the allowlist, the one-line refusals, the composed sum, and
the default (null) equal to ``distill_loss``."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from fedkd.errors import ConfigError
from fedkd.losses import (
    INPUTS,
    LOSS_TERMS,
    ROWS,
    CELoss,
    HintLoss,
    KDLoss,
    RelationMatch,
    WeightedSum,
    _fmt,
    build_losses,
    check_losses,
    distill_loss,
    similarity_matrix,
)

DIMS = {"student": 4, "teacher": 6}


def batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"logits": torch.randn(4, 3, generator=gen),
            "soft_targets": torch.softmax(torch.randn(4, 3, generator=gen), -1),
            "labels": torch.tensor([0, 2, 1, 1]),
            "features": torch.randn(4, 5, generator=gen),
            "relation": torch.rand(4, 4, generator=gen)}


NAMES = ["kd", "ce", "hint", "attention", "attention_weights", "rkd_distance", "rkd_angle", "similarity",
         "relation", "prototype", "self_kd", "exits"]
"""The terms of issue 14 (the allowlist may hold more)."""


def test_the_allowlist() -> None:
    assert [name for name in LOSS_TERMS if name in NAMES] == NAMES
    for name, cls in LOSS_TERMS.items():
        term = build_losses({name: {}}, alpha=0.5, temperature=2.0, dims=DIMS).terms[0]
        assert type(term) is cls
        assert term.needs and set(term.needs) <= set(INPUTS) and term.rows in ROWS, name


@pytest.mark.parametrize(("alpha", "temperature"), [(0.5, 3.0), (0.3, 2), (0.0, 1.0), (1.0, 4.0)])
def test_null_is_distill_loss(alpha: float, temperature: float) -> None:
    b = batch()
    built, reference = build_losses(None, alpha=alpha, temperature=temperature), distill_loss(alpha, temperature)
    assert str(built) == str(reference) and built.weights == reference.weights
    assert [type(t) for _, t in built.active_terms()] == [type(t) for _, t in reference.active_terms()]
    inputs = {"soft_targets": b["soft_targets"], "labels": b["labels"]}
    assert torch.equal(built(b["logits"], **inputs), reference(b["logits"], **inputs))
    assert check_losses(None, temperature) is None


def test_kd_and_ce_spelled_out_equal_the_default() -> None:
    b = batch()
    built = build_losses({"kd": {"weight": 0.5}, "ce": {"weight": 0.5}}, alpha=0.9, temperature=3.0)
    reference = distill_loss(0.5, 3.0)
    assert str(built) == str(reference) == "0.5 * KD(T=3.0) + 0.5 * CE"
    inputs = {"soft_targets": b["soft_targets"], "labels": b["labels"]}
    assert torch.equal(built(b["logits"], **inputs), reference(b["logits"], **inputs))


def test_check_losses_returns_plain_complete_options() -> None:
    spec = {"relation": {"weight": 2}, "kd": {"weight": 0.5, "temperature": 4}, "ce": None, "hint": {"kind": "map"}}
    checked = check_losses(spec, 3.0)
    assert checked == {"relation": {"weight": 2.0}, "kd": {"weight": 0.5, "temperature": 4},
                       "ce": {"weight": 1.0}, "hint": {"weight": 1.0, "kind": "map"}}
    assert list(checked) == ["relation", "kd", "ce", "hint"]  # the mapping's order
    assert check_losses({"self_kd": {}, "exits": {"weight": 0.1, "temperature": None}}, 2.5) == {
        "self_kd": {"weight": 1.0, "temperature": 2.5}, "exits": {"weight": 0.1, "temperature": 2.5}}
    assert type(check_losses(OmegaConf.create(spec), 3.0)["kd"]) is dict  # a composed config too


def test_build_order_formula_and_dims() -> None:
    loss = build_losses({"relation": {"weight": 1.0}, "kd": {"weight": 0.25, "temperature": 2},
                         "hint": {"weight": 0.5, "kind": "embedding"}}, alpha=0.5, temperature=3.0, dims=DIMS)
    assert str(loss) == "1.0 * RelMSE + 0.25 * KD(T=2.0) + 0.5 * Hint(4->6)"
    hint = loss.terms[2]
    assert isinstance(hint, HintLoss) and hint.projector.weight.shape == (6, 4)


def test_hint_needs_dims() -> None:
    with pytest.raises(ConfigError, match=r"^distill\.losses\.hint=\{'weight': 1\.0\}: hint needs a teacher "
                                          r"with features.*server side\)$"):
        build_losses({"hint": {"weight": 1.0}}, alpha=0.5, temperature=3.0)


def test_check_leaves_the_global_rng_alone() -> None:
    before = torch.get_rng_state()
    check_losses({"hint": {"kind": "map"}}, 3.0)
    assert torch.equal(before, torch.get_rng_state())


def test_weighted_sum_needs_and_forward_pass_only_what_each_term_needs() -> None:
    b = batch()
    loss = build_losses({"ce": {"weight": 0.5}, "relation": {"weight": 2.0}, "kd": {"weight": 0.0}},
                        alpha=0.5, temperature=2.0)
    assert loss.needs == ("labels", "features", "relation")  # kd (weight 0) is not active
    assert loss.needs_on("private") == ("labels",) and loss.needs_on("transfer") == ("features", "relation")
    inputs = {k: b[k] for k in ("soft_targets", "labels", "features", "relation")}
    expected = (0.5 * CELoss()(b["logits"], labels=b["labels"])
                + 2.0 * RelationMatch()(b["logits"], features=b["features"], relation=b["relation"]))
    assert loss(b["logits"], **inputs).item() == pytest.approx(expected.item(), rel=1e-6)
    x = b["features"]
    assert build_losses({"relation": {}}, alpha=0.5, temperature=1.0)(
        b["logits"], features=x, relation=similarity_matrix(x)).item() == 0.0


def test_weighted_sum_refuses_terms_without_declarations() -> None:
    class Bare(torch.nn.Module):
        def forward(self, student_logits: torch.Tensor) -> torch.Tensor:
            return student_logits.sum()

    with pytest.raises(ConfigError, match="must declare needs"):
        WeightedSum([(1.0, Bare())])
    assert WeightedSum([(1.0, KDLoss(2.0))]).needs == ("soft_targets",)
    assert _fmt(0.30000000000000004) == "0.3"


@pytest.mark.parametrize(("spec", "message"), [
    ({"foo": {"weight": 1.0}}, "distill.losses.foo={'weight': 1.0}: is not a loss term; terms: ['attention', "),
    ({"_target_": "fedkd.losses.KDLoss"}, "distill.losses._target_='fedkd.losses.KDLoss': is not a loss term"),
    ({"kd": {"_target_": "os.system", "weight": 1.0}},
     "distill.losses.kd._target_='os.system': is not an option of kd; options: ['temperature', 'weight']"),
    ({"kd": {"weight": "high"}}, "distill.losses.kd.weight='high': must be a number >= 0"),
    ({"kd": {"weight": float("nan")}}, "distill.losses.kd.weight=nan: must be a number >= 0"),
    ({"kd": {"weight": True}}, "distill.losses.kd.weight=true: must be a number >= 0"),
    ({"kd": {"weight": -1.0}}, "distill.losses.kd.weight=-1.0: must be a number >= 0"),
    ({"ce": {"beta": 2.0}}, "distill.losses.ce.beta=2.0: is not an option of ce; options: ['weight']"),
    ({"hint": {"student_dim": 3}}, "distill.losses.hint.student_dim=3: is not an option of hint; "
                                   "options: ['kind', 'weight']"),
    ({"kd": {"temperature": 0}}, "distill.losses.kd.temperature=0: must be a number > 0"),
    ({"kd": {"temperature": [1, 2]}}, "distill.losses.kd.temperature=[1, 2]: must be a plain value"),
    ({"hint": {"kind": "conv"}}, "distill.losses.hint.kind='conv': must be one of ['embedding', 'tokens', 'map']"),
    ({"attention": {"p": -1}}, "distill.losses.attention.p=-1: must be a number > 0"),
    ({"kd": 0.5}, "distill.losses.kd=0.5: must be a mapping of options"),
    ({"kd": {"weight": 0}, "ce": {"weight": 0.0}}, "distill.losses={'kd': {'weight': 0}, 'ce': {'weight': 0.0}}: "
                                                   "needs at least one term of non-zero weight"),
    ({}, "distill.losses={}: must be a mapping of loss terms"),
    ("kd", "distill.losses='kd': must be a mapping of loss terms"),
])
def test_refusals_are_one_line(spec: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_losses(spec, 3.0)
    text = str(caught.value)
    assert text.startswith(message) and "\n" not in text
    with pytest.raises(ConfigError):
        build_losses(spec, alpha=0.5, temperature=3.0, dims=DIMS)


def test_an_unknown_term_lists_every_term() -> None:
    with pytest.raises(ConfigError) as caught:
        check_losses({"foo": None}, 3.0)
    assert str(caught.value).endswith(f"terms: {sorted(LOSS_TERMS)}")


def test_a_bad_default_temperature_is_named() -> None:
    with pytest.raises(ConfigError, match=r"^distill\.temperature=-1\.0: must be a number > 0$"):
        check_losses({"kd": {}}, -1.0)
