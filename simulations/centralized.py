"""Centralized baseline: each architecture trained on the pooled private data (the upper bound).

No Flower here: the private partitions are concatenated and every distinct architecture is
trained once with the same client code (`fedkd.training`); each client is then credited with
the accuracy of its architecture's pooled model, so the report reads like the federated ones.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

from fedkd.client.state import new_optimizer
from fedkd.errors import require_bool, require_int
from fedkd.training import evaluate, revisit, round_generator
from fedkd.data import load_private_pool, load_test
from fedkd.models import build_model
from fedkd.server import PreparedRun
from fedkd.simulations.faults import fault_plan
from fedkd.simulations.results import Recorder

log = logging.getLogger(__name__)


def train_pooled(
    run: PreparedRun, recorder: Recorder, epochs_per_round: int = 5, cosine: bool = True
) -> None:
    """Train each architecture on the pooled private data; one evaluation per round.

    With `cosine` the learning rate anneals to 0 over the run (stepped once per round), as an
    upper-bound recipe should; without it the constant rate leaves the last rounds noisy.
    """
    settings, data = run.settings, run.data
    cache = data.cache_dir
    x, y = (torch.from_numpy(a) for a in load_private_pool(cache))
    test_x, test_y = (torch.from_numpy(a) for a in load_test(cache))
    x, y, test_x, test_y = x.float(), y.long(), test_x.float(), test_y.long()
    accuracy: dict[str, list[float]] = {}
    for arch, spec in settings.archs.items():
        torch.manual_seed(settings.seed)
        model = build_model(spec, tuple(data.input_shape), data.num_classes)
        optimizer = new_optimizer(settings, model)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.num_rounds)
        for server_round in range(1, settings.num_rounds + 1):
            gen = round_generator(settings.seed, len(settings.assignment), server_round)
            loss = revisit(model, optimizer, x, y, epochs=epochs_per_round,
                           batch_size=settings.train.batch_size, gen=gen)
            if cosine:
                schedule.step()
            acc, test_loss = evaluate(model, test_x, test_y)
            accuracy.setdefault(arch, []).append(acc)
            log.info("centralized %s: round %d/%d | accuracy %.3f | train loss %.4f", arch,
                     server_round, settings.num_rounds, acc, loss)
            for client, name in enumerate(settings.assignment):
                if name == arch:
                    recorder.record(server_round, client, "test-accuracy", acc)
                    recorder.record(server_round, client, "test-loss", test_loss)
                    recorder.record(server_round, client, "train-loss", loss)
        log.info("centralized %s: final test accuracy %.3f", arch, accuracy[arch][-1])
    for server_round in range(1, settings.num_rounds + 1):
        recorder.end_round(server_round)


def check_pooled(cfg: DictConfig) -> None:
    """`train_pooled`'s options, before the data is prepared (`fedkd.simulations.run`)."""
    runner = cfg.strategy.runner
    require_int("strategy.runner.epochs_per_round", runner.get("epochs_per_round", 5), 1)
    require_bool("strategy.runner.cosine", runner.get("cosine", True))
    fault_plan(cfg)  # faults need the simulation's clients


train_pooled.check_config = check_pooled  # type: ignore[attr-defined]
