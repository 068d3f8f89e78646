"""How class-pure a model's relations are: the share of each row's neighbour distribution that
falls on rows of its own class, by relation temperature (docs/results/kd_families).

    python -m benchmarks.relation_purity [--taus 0.1,0.03,0.01] [--topk 4,8,16,32]

Trains each default digits architecture (`conf/model/auto.yaml`: cnn_small, cnn_deep) on 1,000
labelled digits rows (30 epochs, Adam 0.01, seed 0), then takes its tap (``embedding``) on the
next 400 rows, as a relational client would, and prints per tau the mean same-class mass of
``softmax_{j != i}(cos(f_i, f_j) / tau)``, its entropy, and the mass kept by each row's k
largest entries at the sharpest tau (what ``distill.relation_topk`` keeps).
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from fedkd.knowledge import forward
from fedkd.losses.relation import similarity_matrix
from fedkd.models.build import build_model

log = logging.getLogger(__name__)

ARCHS = {"cnn_small": {"_target_": "fedkd.models.CNN2d", "channels": [8, 16], "head_pool": 2},
         "cnn_deep": {"_target_": "fedkd.models.CNN2d", "channels": [8, 16, 32]}}


def neighbour_distributions(features: torch.Tensor, tau: float) -> np.ndarray:
    """``[N, N]`` rows ``softmax_{j != i}(cos / tau)`` with a zero diagonal."""
    sim = similarity_matrix(features)
    eye = torch.eye(len(sim), dtype=torch.bool)
    return F.softmax((sim / tau).masked_fill(eye, float("-inf")), dim=1).numpy()


def purity(dist: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Mean mass on rows of the same class, and mean entropy (nats)."""
    same = (labels[:, None] == labels[None, :]) & ~np.eye(len(labels), dtype=bool)
    entropy = -(dist * np.log(np.where(dist > 0, dist, 1.0))).sum(1)
    return float((dist * same).sum(1).mean()), float(entropy.mean())


def trained(spec: dict, x: torch.Tensor, y: torch.Tensor, epochs: int = 30) -> torch.nn.Module:
    """`spec` trained with CE on (x, y), seeded."""
    torch.manual_seed(0)
    model = build_model(spec, tuple(x.shape[1:]), 10)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--taus", default="0.1,0.03,0.01")
    parser.add_argument("--topk", default="4,8,16,32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor((x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8))
    train_x, train_y, rows, labels = x[:1000], torch.tensor(y[:1000]), x[1000:1400], y[1000:1400]
    taus = [float(t) for t in args.taus.split(",")]
    for name, spec in ARCHS.items():
        model = trained(spec, train_x, train_y)
        with torch.no_grad():
            logits, taps = forward(model, rows, ["embedding"])
        accuracy = float((logits.argmax(1).numpy() == labels).mean())
        for tau in taus:
            mass, entropy = purity(neighbour_distributions(taps["embedding"], tau), labels)
            log.info("%s (accuracy %.3f, tap %s): tau %g: same-class mass %.3f, entropy %.2f "
                     "nats (uniform %.2f)", name, accuracy, tuple(taps["embedding"].shape), tau,
                     mass, entropy, np.log(len(rows) - 1))
        top = -np.sort(-neighbour_distributions(taps["embedding"], min(taus)), axis=1)
        kept = {int(k): round(float(top[:, :int(k)].sum(1).mean()), 3) for k in args.topk.split(",")}
        log.info("%s: at tau %g each row's k largest keep %s of its mass", name, min(taus), kept)


if __name__ == "__main__":
    main()
