"""The loops' loss plumbing (`fedkd.knowledge`, `fedkd.training`) and the relation term."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedkd.knowledge import Knowledge, relation_block, taps_for, term_inputs
from fedkd.losses import WeightedSum, build_losses, distill_loss
from fedkd.losses.relation_kd import RelationKD, full_relation, similarity_rows
from fedkd.losses.response import CELoss
from fedkd.losses.rounds import check_client_losses, revisit_losses
from fedkd.errors import ConfigError
from fedkd.models import MLP
from fedkd.training import digest, revisit


def _data(n=40, d=6, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g),
            torch.randn(24, d, generator=g), torch.softmax(torch.randn(24, c, generator=g), 1))


def _trained(loss, knowledge=None, steps="digest"):
    torch.manual_seed(0)
    model = MLP((6,), 3, hidden=[8])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y, tx, soft = _data()
    gen = torch.Generator().manual_seed(1)
    if steps == "digest":
        digest(model, opt, tx, soft, x, y, loss=loss, epochs=2, batch_size=8, gen=gen,
               knowledge=knowledge)
    else:
        revisit(model, opt, x, y, epochs=2, batch_size=8, gen=gen, loss=loss, knowledge=knowledge)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_a_spec_of_kd_and_ce_trains_exactly_as_alpha():
    spec = {"kd": {"weight": 0.3}, "ce": {"weight": 0.7}}
    assert torch.equal(_trained(build_losses(spec, alpha=0.0, temperature=2.0)),
                       _trained(distill_loss(0.3, 2.0)))


def test_a_revisit_with_ce_alone_is_the_plain_revisit():
    assert torch.equal(_trained(WeightedSum([(1.0, CELoss())]), steps="revisit"),
                       _trained(None, steps="revisit"))


def test_self_kd_against_an_identical_snapshot_is_zero():
    loss = revisit_losses({"self_kd": {"weight": 1.0}}, 3.0)
    torch.manual_seed(0)
    model = MLP((6,), 3, hidden=[8])
    x, y, _, _ = _data()
    snapshot = copy.deepcopy(model).eval()
    logits = model(x)
    inputs = term_inputs(("snapshot_logits",), logits, {}, x=x,
                         knowledge=Knowledge(snapshot=snapshot))
    term = loss.active_terms()[1][1]
    assert float(term(logits, **inputs).detach()) == pytest.approx(0.0, abs=1e-7)


def test_a_term_without_its_input_this_round_is_left_out():
    loss = revisit_losses({"self_kd": {"weight": 5.0}}, 3.0)  # no snapshot: CE alone
    assert torch.equal(_trained(loss, Knowledge(), steps="revisit"),
                       _trained(None, steps="revisit"))


def test_revisit_losses_take_private_extras_only():
    assert revisit_losses(None, 3.0) is None
    assert revisit_losses({"kd": {"weight": 1.0}, "ce": {"weight": 1.0}}, 3.0) is None
    assert str(revisit_losses({"kd": {}, "prototype": {"weight": 2.0}}, 3.0)) == "1.0 * CE + 2.0 * Proto"


def test_clients_refuse_terms_that_read_a_teacher():
    with pytest.raises(ConfigError, match="distill.losses.similarity.*teacher_features"):
        check_client_losses({"similarity": {}}, 3.0)


def test_taps_follow_the_needs():
    k = Knowledge(tap="block2", exits=("exit1",))
    assert taps_for(("soft_targets", "labels"), k) == []
    assert taps_for(("features", "relation"), k) == ["block2"]
    assert taps_for(("exit_logits",), k) == ["exit1"]


def test_features_are_projected_for_prototype_terms_only():
    feats = torch.ones(2, 4)
    proj = torch.full((4, 2), 0.5)
    k = Knowledge(prototypes=torch.zeros(3, 2), projection=proj)
    logits = torch.zeros(2, 3)
    plain = term_inputs(("features",), logits, {"embedding": feats}, x=feats, knowledge=k)
    proto = term_inputs(("features", "prototypes"), logits, {"embedding": feats}, x=feats,
                        knowledge=k)
    assert plain["features"] is feats
    assert torch.equal(proto["features"], torch.full((2, 2), 2.0))


def test_relation_block_renormalises_the_batch_rows():
    rel = torch.tensor([[0.0, 0.2, 0.8], [0.5, 0.0, 0.5], [0.1, 0.9, 0.0]])
    block = relation_block(rel, torch.tensor([2, 0]))
    assert torch.allclose(block, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def test_similarity_rows_leave_the_diagonal_out_and_full_relation_puts_it_back():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    rows = similarity_rows(f)
    s = 2 ** -0.5
    assert torch.allclose(rows, torch.tensor([[0.0, s], [0.0, s], [s, s]]))
    assert torch.allclose(full_relation(rows), torch.tensor([[0.0, 0.0, s], [0.0, 0.0, s],
                                                             [s, s, 0.0]]))


def test_relation_kd_golden_and_zero_on_its_own_distribution():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    tau = 0.5
    sim = np.array([[1, 0, 2 ** -0.5], [0, 1, 2 ** -0.5], [2 ** -0.5, 2 ** -0.5, 1]])
    q = np.zeros((3, 3))
    for i in range(3):
        others = [j for j in range(3) if j != i]
        e = np.exp(sim[i, others] / tau)
        q[i, others] = e / e.sum()
    term = RelationKD(tau)
    assert float(term(torch.zeros(3, 2), features=f, relation=torch.tensor(q, dtype=torch.float32))) \
        == pytest.approx(0.0, abs=1e-6)
    target = np.array([[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    expected = np.mean([sum(target[i, j] * np.log(target[i, j] / q[i, j])
                            for j in range(3) if j != i) for i in range(3)])
    got = term(torch.zeros(3, 2), features=f, relation=torch.tensor(target, dtype=torch.float32))
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_relation_kd_pulls_the_features_and_skips_rows_without_a_target():
    f = torch.randn(4, 3, requires_grad=True)
    target = torch.zeros(4, 4)
    target[0, 1:] = torch.tensor([1.0, 0.0, 0.0])
    loss = RelationKD(0.1)(torch.zeros(4, 2), features=f, relation=target)
    loss.backward()
    assert f.grad is not None and f.grad.abs().sum() > 0
    expected = -F.log_softmax((F.normalize(f, dim=1)[0] @ F.normalize(f, dim=1)[1:].T) / 0.1, 0)[0]
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-4)


def test_exits_distil_from_the_final_logits_in_the_revisit():
    from fedkd.client.knowledge import exits_of
    from fedkd.models import ResNet

    torch.manual_seed(0)
    model = ResNet((1, 8, 8), 3, depth=8, exits=True)
    exits = exits_of(model)
    assert exits == ("exit1", "exit2")
    heads = {n: p.detach().clone() for n, p in model.named_parameters() if "exit" in n}
    assert heads
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    revisit(model, opt, x, y, epochs=1, batch_size=8, gen=gen,
            loss=revisit_losses({"exits": {"weight": 1.0}}, 3.0), knowledge=Knowledge(exits=exits))
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n].detach(), before) for n, before in heads.items())
