"""The black-box generator: fitted from the teachers' logits alone, with zero-order estimates."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from fedkd.settings import ClientSettings
from fedkd.errors import require_int, require_number
from fedkd.generators.base import Query, _GeneratorSource, _seed
from fedkd.generators.objectives import zo_input_gradient
from fedkd.protocol import query_directions

log = logging.getLogger(__name__)


class BlackBoxGenerator(_GeneratorSource):
    """Generator fitted from the teachers' logits alone, with zero-order gradient estimates.

    Each round (from `start_round` on, when the teachers have trained): up to `steps` query waves.
    A wave sends `batch_size` generated inputs plus a seed; each teacher answers logits on them and
    on `directions` seeded perturbations of them (step `mu`), so only the inputs travel. The
    server estimates ``dL/dx`` (`zo_input_gradient`) and backpropagates it through the generator.
    The adversarial term is the teachers' disagreement with their ensemble. At most
    `query_budget` inputs are evaluated per teacher over the run (None: no limit).
    """

    kind = "black-box"

    def __init__(self, directions: int = 8, mu: float = 0.05, query_budget: int | None = None,
                 start_round: int = 2, **kwargs) -> None:
        kwargs.setdefault("steps", 10)
        kwargs.setdefault("batch_size", 64)
        super().__init__(**kwargs)
        require_int("directions", directions, 1)
        require_number("mu", mu, 0.0, low_open=True)
        require_int("query_budget", query_budget, 1, null=True)
        require_int("start_round", start_round, 1)
        self.directions, self.mu, self.query_budget = directions, mu, query_budget
        self.start_round = start_round
        self.queries = 0  # inputs evaluated per teacher so far

    def extra_state(self) -> dict[str, Any]:
        """The query count travels with the checkpoint."""
        return {"queries": self.queries}

    def wave_cost(self) -> int:
        """Inputs each teacher evaluates in one wave."""
        return self.batch_size * (1 + self.directions)

    def fit_logits(self, server_round: int, settings: ClientSettings, query: Query) -> dict[str, float]:
        """Up to `steps` query waves and generator updates; nothing before `start_round`."""
        if server_round < self.start_round:
            return {}
        generator = self.build(settings)
        assert self.optimizer is not None
        gen = torch.Generator().manual_seed(_seed(self.seed, server_round, 2))
        history = []
        generator.train()
        for step in range(self.steps):
            if self.query_budget is not None and self.queries + self.wave_cost() > self.query_budget:
                log.info("round %d: query budget of %d inputs per teacher spent", server_round,
                         self.query_budget)
                break
            z, y = self.draw_pairs(self.batch_size, gen, settings)
            x = generator(z, y)
            seed = _seed(self.seed, server_round, 3, step)
            logits = query(x.detach().cpu().numpy(), seed, self.directions, self.mu)
            if logits is None:
                break
            self.queries += self.wave_cost()
            history.append(self._step(x, z, y, logits, seed))
        return self.finish_fit(server_round, settings, history, {"gen-queries": float(self.queries)})

    def _step(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor, logits: np.ndarray,
              seed: int) -> dict[str, float]:
        """One generator update from the teachers' logits ``[K, (1 + Q) * N, C]``."""
        n, q = len(x), self.directions
        k, _, c = logits.shape
        blocks = logits.reshape(k, 1 + q, n, c)
        base = torch.from_numpy(np.ascontiguousarray(blocks[:, 0])).to(x.device)
        base.requires_grad_(True)
        loss, terms = self.objective(base.mean(0), y, base if self.w_adv else None)
        (grad_logits,) = torch.autograd.grad(loss, base)
        u = query_directions(seed, q, tuple(x.shape))
        grad_x = zo_input_gradient(grad_logits.cpu().numpy(), blocks[:, 0], blocks[:, 1:], u,
                                   self.mu)
        exact, more = self.exact_terms(x, z)  # exact gradient; the rest is estimated
        terms.update(more)
        assert self.optimizer is not None
        self.optimizer.zero_grad()
        ((x * torch.from_numpy(grad_x).to(x.device)).sum() + exact).backward()
        self.optimizer.step()
        self.steps_done += 1
        return terms
