"""The plain-PyTorch reference: the same client work as a fedkd simulation, sequentially, no Flower.

Same data, models, seeds, epochs, rounds, aggregator and client functions (`fedkd.training`);
students live in a dict instead of Flower's `Context.state`, and soft targets are handed over in
memory instead of messages. Supports the logit-exchange strategies and `local`; with
``strategy.flower.fraction_train < 1`` each round trains (and evaluates) only the partitions
`fedkd.sampling.sample_partitions` picks, as the simulation's strategy does. A client is created
the first time it is sampled, as `fedkd.client.state.Student.restore` creates it (model seeded
with ``seed + partition id`` at first use, data loaded then), so at 10,000 clients with 100 a
round the loop builds and loads only the sampled ones. It is the reference the benchmark times
the simulation against.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import hydra.utils
import numpy as np
import torch

from fedkd.aggregation import TeacherMeta
from fedkd.client.state import new_optimizer
from fedkd.data import load_client, load_public, load_test
from fedkd.data.own_test import own_test_chunks
from fedkd.generators import LogitGuided, ModelGuided
from fedkd.generators.base import models_query
from fedkd.losses import distill_loss
from fedkd.models import build_model
from fedkd.protocol import rows_to_inputs
from fedkd.optim import schedule_lr
from fedkd.sampling import sample_partitions
from fedkd.server import PreparedRun
from fedkd.timing import PhaseTimer
from fedkd.training import (
    digest, evaluate, own_accuracy, predict_logits, revisit, round_generator,
)
from fedkd.transfer import Public

log = logging.getLogger(__name__)


@dataclass
class PlainClient:
    """One client of the plain loop: its student, optimizer, data and rounds trained."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor
    own: torch.Tensor | None
    rounds_done: int = 0


def fresh_model(run: PreparedRun, pid: int) -> torch.nn.Module:
    """Partition `pid`'s untrained student, seeded as `Student.restore` seeds a new one."""
    s, info = run.settings, run.data
    torch.manual_seed(s.seed + pid)
    return build_model(s.arch_of(pid)[1], tuple(info.input_shape), info.num_classes)


class LazyClients:
    """Partition id -> `PlainClient`, each built (model, optimizer, data) on first access."""

    def __init__(self, run: PreparedRun) -> None:
        self.run = run
        self.built: dict[int, PlainClient] = {}

    def __len__(self) -> int:
        return len(self.run.settings.assignment)

    def __getitem__(self, pid: int) -> PlainClient:
        if pid not in self.built:
            cache_dir = self.run.data.cache_dir
            x, y = load_client(cache_dir, pid)
            own = own_test_chunks(cache_dir).get(pid)
            model = fresh_model(self.run, pid)
            self.built[pid] = PlainClient(
                model, new_optimizer(self.run.settings, model), torch.from_numpy(x).float(),
                torch.from_numpy(y).long(), None if own is None else torch.from_numpy(own))
        return self.built[pid]

    def models(self) -> list[torch.nn.Module]:
        """Every partition's current student, as every connected node answers a query: a
        client never sampled answers with its untrained model (built, not kept, as the
        simulation's query handler does)."""
        return [self.built[p].model if p in self.built else fresh_model(self.run, p)
                for p in range(len(self))]


def run_plain(
    run: PreparedRun, on_round: Callable[[int], None] | None = None,
    timer: PhaseTimer | None = None, clients: LazyClients | None = None,
) -> dict[int, dict[int, float]]:
    """Run all rounds sequentially; return test accuracy per round and partition id.

    `on_round(rnd)` is called at the end of each round (the benchmark's per-round timings);
    `timer` accumulates the clients' phases (restore: creating a client, digest, revisit,
    logits, evaluate) as the simulation's clients report them with ``distill.profile=true``;
    `clients` (default: new) holds the clients, so a caller can see which were built.
    """
    timer = timer or PhaseTimer()
    clients = clients if clients is not None else LazyClients(run)
    torch.set_num_threads(1)
    s, info, cfg = run.settings, run.data, run.cfg
    t = s.train
    flower = cfg.strategy.flower
    aggregator = hydra.utils.instantiate(flower.aggregator) if "aggregator" in flower else None
    transfer = (hydra.utils.instantiate(flower.transfer) if "transfer" in flower
                else Public(flower.get("transfer_size"), int(cfg.seed)))
    if isinstance(transfer, ModelGuided):
        raise ValueError("the plain loop runs logit-exchange strategies; a white-box generator needs feddf")
    public = torch.from_numpy(load_public(info.cache_dir)).float()
    test_x, test_y = (torch.from_numpy(a) for a in load_test(info.cache_dir))
    test_x, test_y = test_x.float(), test_y.long()
    loss = distill_loss(t.alpha, t.temperature)
    soft = rows = None
    history: dict[int, dict[int, float]] = {}
    for rnd in range(1, s.num_rounds + 1):
        logits, sizes = [], []
        sampled = sample_partitions(len(clients), float(flower.get("fraction_train", 1.0)),
                                    int(flower.get("min_train_nodes", 2)),
                                    int(flower.get("seed", cfg.seed)), rnd)
        if aggregator is not None and isinstance(transfer, LogitGuided):  # as the clients answer
            transfer.fit_logits(rnd, s, models_query(clients.models()))
        next_rows = transfer.rows(rnd, s) if aggregator is not None else None
        next_x = None if next_rows is None else rows_to_inputs(next_rows, public)
        history[rnd] = {}
        target_x = None if rows is None else rows_to_inputs(rows, public)
        for pid in sampled:
            with timer("restore"):
                c = clients[pid]
            model, opt, x, y, own = c.model, c.optimizer, c.x, c.y, c.own
            gen = round_generator(s.seed, pid, rnd)
            schedule_lr(opt, t.lr_decay, c.rounds_done)
            digested = soft is not None and s.role_of(pid) == "student"  # teachers: never taught
            if digested:
                with timer("digest"):
                    digest(model, opt, target_x, soft, x, y, loss=loss, epochs=t.digest_epochs,
                           batch_size=t.batch_size, gen=gen)
            first = c.rounds_done == 0  # a client's first round is its warm-up
            if t.revisits(first_round=first, digested=digested):
                with timer("revisit"):
                    revisit(model, opt, x, y, batch_size=t.batch_size, gen=gen,
                            **t.local_budget(first_round=first))
            c.rounds_done += 1
            if next_rows is not None:
                with timer("logits"):
                    logits.append(predict_logits(model, next_x))
                sizes.append(len(x))
            with timer("evaluate"):
                own_accuracy(model, test_x, test_y, own)
                if rnd % t.eval_every == 0 or rnd == s.num_rounds:
                    history[rnd][pid] = evaluate(model, test_x, test_y)[0]
        if aggregator is not None and len(logits) >= int(flower.get("min_replies", 1)):
            counts = (np.array([info.class_histograms[p] for p in sampled], dtype=np.float64)
                      if t.share_class_counts else None)
            meta = TeacherMeta(num_examples=np.array(sizes, dtype=np.float64),
                               partition_ids=np.array(sampled), class_counts=counts,
                               server_round=rnd,
                               seed=int(flower.get("seed", cfg.seed)))
            targets = aggregator(np.stack(logits), meta, temperature=float(flower.temperature))
            soft, rows = torch.from_numpy(np.asarray(targets, dtype=np.float32)), next_rows
        if history[rnd]:
            acc = list(history[rnd].values())
            log.info("plain round %d: accuracy mean %.3f min %.3f max %.3f", rnd, np.mean(acc),
                     min(acc), max(acc))
        if on_round is not None:
            on_round(rnd)
    return history


if __name__ == "__main__":
    import sys

    from fedkd.server import compose_config, prepare_run

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    hist = run_plain(prepare_run(compose_config(sys.argv[1:])))
    last = hist[max(hist)]
    print(f"final mean {np.mean(list(last.values())):.4f} min {min(last.values()):.4f} "
          f"in {time.perf_counter() - start:.1f} s")
