"""Generator transfer sources: the server synthesises the transfer set it asks logits on.

This module holds what both share; `fedkd.generators.whitebox` and `fedkd.generators.blackbox`
hold the two sources.

Both sources keep one conditional generator for the whole run (seeded), fit it a little every
round and sample a class-balanced transfer set from it (seeded per round):

- `WhiteBoxGenerator` (`ModelGuided`): for strategies that hold the teachers' models (FedDF);
  fitted by backpropagation through the teachers, BatchNorm statistics included.
- `BlackBoxGenerator` (`LogitGuided`): for logit-only strategies (FedMD, DS-FL); fitted from the
  teachers' logits on queried inputs with zero-order gradient estimates, under a query budget.

The generator (and, for a white-box fit, the teachers and students) compute on the device
`fedkd.devices.select_device` picks when the generator is built; the noise and the requested
classes are drawn on the CPU (seeded), generated inputs and checkpoints come back as CPU data.

After each fit the generator is checkpointed (``generator.pt``) into the run's output folder when
the strategy gives one (`set_output_dir`), and a sample grid (``generator_samples.png``) is drawn
in the last round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from fedkd.devices import cpu_state, deterministic_from_env, select_device
from fedkd.settings import ClientSettings
from fedkd.errors import ConfigError, is_number, require_int, require_number
from fedkd.generators.model import ConditionalGenerator, balanced_labels
from fedkd.generators.objectives import balance_loss, class_loss, disagreement, diversity_loss

log = logging.getLogger(__name__)

Query = Callable[[np.ndarray, int, int, float], np.ndarray | None]
"""``query(inputs [N, ...], seed, directions Q, mu) -> logits [K, (1 + Q) * N, C]`` (None: no answer)."""

CHECKPOINT, SAMPLES = "generator.pt", "generator_samples.png"


@runtime_checkable
class ModelGuided(Protocol):
    """A transfer source fitted on the teachers' models (white-box)."""

    def fit_models(self, server_round: int, settings: ClientSettings, teachers: Sequence[nn.Module],
                   students: Sequence[nn.Module]) -> dict[str, float]:
        """Fit on the teachers (and the students, for the adversarial term); return metrics."""


@runtime_checkable
class LogitGuided(Protocol):
    """A transfer source fitted on the teachers' logits only (black-box)."""

    def fit_logits(self, server_round: int, settings: ClientSettings, query: Query) -> dict[str, float]:
        """Fit from logits on queried inputs; return metrics."""


def models_query(models: Sequence[nn.Module]) -> Query:
    """A `Query` answered by models in memory (what each client's ``query`` handler computes)."""
    from fedkd.training import predict_logits
    from fedkd.protocol import expand_query

    def query(inputs: np.ndarray, seed: int, directions: int, mu: float) -> np.ndarray:
        x = torch.from_numpy(expand_query(inputs, seed, directions, mu))
        return np.stack([predict_logits(model, x) for model in models])

    return query


def _seed(*entropy: int) -> int:
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


class _GeneratorSource:
    """What both generator sources share: the generator, sampling, checkpoints, the sample grid."""

    kind = "generator"

    def __init__(self, size: int = 400, steps: int = 20, batch_size: int = 128, lr: float = 1e-3,
                 z_dim: int = 32, hidden: int = 256, low: float = 0.0, high: float = 1.0,
                 w_ce: float = 1.0, w_adv: float = 0.5, w_bal: float = 1.0, w_div: float = 0.0,
                 adv_temperature: float = 1.0, seed: int = 0) -> None:
        for name, value in (("size", size), ("batch_size", batch_size), ("z_dim", z_dim),
                            ("hidden", hidden)):
            require_int(name, value, 1)
        require_int("steps", steps, 0)
        require_number("lr", lr, 0.0, low_open=True)
        require_number("low", low)
        if not (is_number(high) and high > low):
            raise ConfigError("high", high, f"must be a number > low (low={low:g})")
        require_number("adv_temperature", adv_temperature, 0.0, low_open=True)
        for name, value in (("w_ce", w_ce), ("w_adv", w_adv), ("w_bal", w_bal), ("w_div", w_div)):
            require_number(name, value, 0.0)
        require_int("seed", seed, 0)
        self.size, self.steps, self.batch_size, self.lr = size, steps, batch_size, lr
        self.z_dim, self.hidden, self.low, self.high = z_dim, hidden, low, high
        self.w_ce, self.w_adv, self.w_bal, self.adv_temperature = w_ce, w_adv, w_bal, adv_temperature
        self.w_div = w_div
        self.seed = seed
        self.generator: ConditionalGenerator | None = None
        self.device: torch.device | None = None
        """Where the generator computes (chosen when it is built)."""
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps_done = 0
        self.output_dir: Path | None = None
        self.last_metrics: dict[str, float] = {}

    # --- the generator ------------------------------------------------------------------------
    def build(self, settings: ClientSettings) -> ConditionalGenerator:
        """The generator (built, seeded, on first use from the data's shape and classes; its
        weights are initialised on the CPU, then it moves to `device`)."""
        if self.generator is None:
            data = settings.data
            self.device = select_device()
            deterministic_from_env(self.device)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_seed(self.seed, 0))
                self.generator = ConditionalGenerator(
                    tuple(data["input_shape"]), int(data["num_classes"]), z_dim=self.z_dim,
                    hidden=self.hidden, low=self.low, high=self.high)
            self.generator.to(self.device)
            self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.lr, betas=(0.5, 0.999))
        return self.generator

    def draw(self, n: int, gen: torch.Generator, settings: ClientSettings) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` class-balanced (noise, label) pairs from `gen` (a CPU generator), on `device`."""
        generator = self.build(settings)
        z = torch.randn(n, self.z_dim, generator=gen)
        return z.to(self.device), balanced_labels(n, generator.num_classes, gen).to(self.device)

    def draw_pairs(self, n: int, gen: torch.Generator,
                   settings: ClientSettings) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch: rows ``i`` and ``i + n // 2`` ask for the same class (`diversity_loss`)."""
        z, y = self.draw(n, gen, settings)
        half = n // 2
        return z, torch.cat([y[:half], y[:half], y[2 * half:]])

    def sample(self, server_round: int, settings: ClientSettings) -> tuple[np.ndarray, np.ndarray]:
        """This round's `size` generated inputs (float32) and the classes they were asked for."""
        generator = self.build(settings)
        z, y = self.draw(self.size, torch.Generator().manual_seed(_seed(self.seed, server_round, 1)),
                         settings)
        generator.eval()
        with torch.no_grad():
            return generator(z, y).cpu().numpy().astype(np.float32), y.cpu().numpy()

    def rows(self, server_round: int, settings: ClientSettings) -> np.ndarray:
        """This round's transfer set: `size` generated inputs, classes balanced (float32)."""
        return self.sample(server_round, settings)[0]

    def exact_terms(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Terms that depend on the generated inputs alone (no teacher): diversity."""
        if not self.w_div:
            return x.new_zeros(()), {}
        div = diversity_loss(x, z)
        return self.w_div * div, {"gen-diversity": -div.item()}

    def objective(self, ensemble: torch.Tensor, labels: torch.Tensor,
                  members: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        """The shared objective terms (BatchNorm statistics are added by the white-box source)."""
        ce, bal = class_loss(ensemble, labels), balance_loss(ensemble)
        loss = self.w_ce * ce + self.w_bal * bal
        terms = {"gen-ce": ce.item(), "gen-balance": bal.item(),
                 "gen-agree": float((ensemble.argmax(1) == labels).float().mean())}
        if members is not None and self.w_adv > 0:
            adv = disagreement(ensemble, members, self.adv_temperature)
            loss = loss - self.w_adv * adv
            terms["gen-disagreement"] = adv.item()
        return loss, terms

    # --- after a fit: progress, checkpoint, picture ------------------------------------------
    def finish_fit(self, server_round: int, settings: ClientSettings,
                   history: list[dict[str, float]], extra: dict[str, float]) -> dict[str, float]:
        """Average the steps' metrics, log progress, checkpoint, draw the grid in the last round."""
        metrics = {k: float(np.mean([h[k] for h in history])) for k in history[0]} if history else {}
        metrics.update(extra)
        metrics["gen-steps"] = float(self.steps_done)
        self.last_metrics = metrics
        log.info("round %d: %s generator, %d steps (%d in all) | %s", server_round, self.kind,
                 len(history), self.steps_done,
                 " ".join(f"{k[4:]} {v:.3g}" for k, v in metrics.items() if k != "gen-steps"))
        if self.output_dir is not None:
            self.save(self.output_dir / CHECKPOINT, server_round)
            if server_round >= settings.num_rounds:
                from fedkd.generators.grid import save_sample_grid

                save_sample_grid(self, settings, self.output_dir / SAMPLES)
        return metrics

    def set_output_dir(self, path: str | Path) -> None:
        """Where checkpoints and the sample grid go."""
        self.output_dir = Path(path)

    def state_dict(self) -> dict[str, Any]:
        """Generator and optimizer state (once built, as CPU tensors), counters, the last fit's
        metrics."""
        state = {"steps_done": self.steps_done, "extra": self.extra_state(),
                 "last_metrics": dict(self.last_metrics)}
        if self.generator is not None and self.optimizer is not None:
            state.update(generator=cpu_state(self.generator.state_dict()),
                         optimizer=cpu_state(self.optimizer.state_dict()))
        return state

    def load_state_dict(self, state: dict[str, Any], settings: ClientSettings) -> None:
        """Inverse of `state_dict`."""
        if "generator" in state:
            self.build(settings).load_state_dict(state["generator"])
            assert self.optimizer is not None
            self.optimizer.load_state_dict(state["optimizer"])
        self.steps_done = int(state["steps_done"])
        for key, value in state.get("extra", {}).items():
            setattr(self, key, value)
        self.last_metrics = dict(state.get("last_metrics", {}))

    def extra_state(self) -> dict[str, Any]:
        """Counters a subclass adds to the checkpoint."""
        return {}

    def save(self, path: Path, server_round: int) -> None:
        """Write a checkpoint atomically (a crash mid-write keeps the previous one)."""
        tmp = path.with_suffix(".tmp")
        torch.save({**self.state_dict(), "round": server_round}, tmp)
        tmp.replace(path)

    def load(self, path: str | Path, settings: ClientSettings) -> int:
        """Restore a checkpoint written by `save`; return its round."""
        state = torch.load(path, weights_only=True, map_location="cpu")
        self.load_state_dict(state, settings)
        return int(state["round"])

    def report(self) -> dict[str, float]:
        """The last fit's metrics (for the round's server metrics)."""
        return dict(self.last_metrics)
