"""Real vote histograms for PATE: K clients' students, trained on their own partitions, vote on test rows.

The synthetic teachers of `benchmarks.pate_tradeoff` agree as a Beta distribution says; real clients of a
label-skewed split agree far less (a client that never saw a 7 votes for something else). This script
builds the votes a first round of a run would give: it prepares the run's data and architectures exactly
as ``fedkd-sim`` does (any Hydra overrides), trains every client's student on its private rows with the
run's optimizer, batch size and warm-up epochs (`fedkd.training.revisit`, the client's own step), and
counts the students' argmax votes on the first ``--queries`` test rows. The trade-off table on them::

    M=../shared/data/mnist
    python -m benchmarks.pate_votes dataset=files dataset.path=$M/mnist_train.npz \\
        dataset.test_path=$M/mnist_test.npz num_clients=100 distill.warmup_epochs=3 --out votes100
    python -m benchmarks.pate_tradeoff --votes votes100/votes.npy --labels votes100/labels.npy

Arguments that start with ``--`` are options; all others are Hydra overrides. Writes ``votes.npy``
(``[queries, classes]`` counts), ``labels.npy`` and ``teachers.csv`` (each student's accuracy on the queries).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedkd.data import load_client, load_test
from fedkd.models import build_model
from fedkd.optim import build_optimizer
from fedkd.server import compose_config, prepare_run
from fedkd.training import predict_logits, revisit, round_generator

log = logging.getLogger(__name__)


def client_votes(overrides: list[str], queries: int) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """``(votes [queries, C], labels [queries], per-teacher table)`` of the run `overrides` describe."""
    cfg = compose_config(overrides)
    run = prepare_run(cfg)
    train = run.settings.train
    x_test, y_test = load_test(run.data.cache_dir)
    x_q, y_q = torch.as_tensor(x_test[:queries]), np.asarray(y_test[:queries])
    votes = np.zeros((len(y_q), run.data.num_classes), dtype=np.int64)
    rows = []
    seed = int(cfg.seed)
    for pid in range(len(run.data.client_sizes)):
        x, y = load_client(run.data.cache_dir, pid)
        name, spec = run.settings.arch_of(pid)
        torch.manual_seed(seed + pid)
        model = build_model(spec, tuple(run.data.input_shape), run.data.num_classes)
        optimizer = build_optimizer(train.optimizer, model.parameters())
        revisit(model, optimizer, torch.as_tensor(x), torch.as_tensor(y).long(), epochs=train.warmup_epochs,
                batch_size=train.batch_size, gen=round_generator(seed, pid, 1))
        answer = predict_logits(model, x_q).argmax(axis=1)
        votes[np.arange(len(y_q)), answer] += 1
        rows.append({"client": pid, "arch": name, "rows": len(y), "accuracy": float((answer == y_q).mean())})
        if (pid + 1) % 10 == 0:
            log.info("%d / %d students trained", pid + 1, len(run.data.client_sizes))
    return votes, y_q, pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1000, help="test rows voted on")
    parser.add_argument("--out", type=Path, required=True, help="folder for votes.npy, labels.npy, teachers.csv")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    votes, labels, teachers = client_votes(overrides, args.queries)
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "votes.npy", votes)
    np.save(args.out / "labels.npy", labels)
    teachers.to_csv(args.out / "teachers.csv", index=False)
    top = votes.max(axis=1)
    log.info("%d teachers: mean accuracy %.3f, plurality accuracy %.3f, top count median %d (10%%: %d, 90%%: %d)",
             len(teachers), teachers.accuracy.mean(), float((votes.argmax(axis=1) == labels).mean()),
             np.median(top), np.quantile(top, 0.1), np.quantile(top, 0.9))


if __name__ == "__main__":
    main()
