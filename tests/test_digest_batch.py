"""The digest's one forward pass over the joint batch (transfer rows + private rows): what BatchNorm
sees, checked against a hand-written step."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedkd.losses import distill_loss
from fedkd.training import digest


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn, self.head = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.lin(x))))


def _data():
    torch.manual_seed(0)
    x_pub, x_priv = torch.randn(4, 3), torch.randn(6, 3) + 2.0  # private rows: a shifted domain
    soft = torch.softmax(torch.randn(4, 2), dim=1)
    return x_pub, soft, x_priv, torch.zeros(6, dtype=torch.long)  # one label only: label skew


def test_one_step_equals_a_hand_written_joint_batch_step():
    x_pub, soft, x_priv, y_priv = _data()
    torch.manual_seed(1)
    model = _BNNet()
    reference = _BNNet()
    reference.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    digest(model, opt, x_pub, soft, x_priv, y_priv, loss=distill_loss(0.5, 2.0), epochs=1,
           batch_size=4, gen=torch.Generator().manual_seed(3))

    gen = torch.Generator().manual_seed(3)
    idx = torch.randperm(4, generator=gen)  # the one transfer batch, as digest shuffles it
    pidx = torch.randint(6, (4,), generator=gen)
    out = reference(torch.cat([x_pub[idx], x_priv[pidx]]))  # BN statistics over all 8 rows
    kd = F.kl_div(F.log_softmax(out[:4] / 2.0, dim=1), soft[idx], reduction="batchmean") * 4.0
    ce = F.cross_entropy(out[4:], y_priv[pidx])
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    (0.5 * kd + 0.5 * ce).backward()
    ref_opt.step()
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    # One pass, one running-statistics update, from the joint batch.
    assert int(model.bn.num_batches_tracked) == 1
