"""The white-box generator: fitted by backpropagation through the teachers' models."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedkd.devices import on_device
from fedkd.settings import ClientSettings
from fedkd.errors import require_number
from fedkd.generators.base import _GeneratorSource, _seed
from fedkd.generators.objectives import BatchNormStatistics, frozen


class WhiteBoxGenerator(_GeneratorSource):
    """DENSE / DeepInversion-style generator fitted through the teachers' models.

    Each round: `steps` Adam steps on batches of `batch_size` requested classes, minimising
    ``w_ce * CE(ensemble, y) + w_bn * BatchNorm statistics - w_adv * KL(ensemble || students)
    + w_bal * balance``. See `_GeneratorSource` for the shared parameters.
    """

    kind = "white-box"

    def __init__(self, w_bn: float = 1.0, **kwargs) -> None:
        kwargs.setdefault("w_adv", 0.2)  # 0.5 was less stable on digits (5 clients, 3 seeds)
        super().__init__(**kwargs)
        require_number("w_bn", w_bn, 0.0)
        self.w_bn = w_bn

    def fit_models(self, server_round: int, settings: ClientSettings, teachers: Sequence[nn.Module],
                   students: Sequence[nn.Module]) -> dict[str, float]:
        """Fit the generator for `steps` steps against the teachers' ensemble (the models join
        the generator on its device for the fit, and go back afterwards)."""
        generator = self.build(settings)
        assert self.optimizer is not None
        gen = torch.Generator().manual_seed(_seed(self.seed, server_round, 2))
        history = []
        generator.train()
        with on_device([*teachers, *students], self.device), frozen([*teachers, *students]):
            for _ in range(self.steps):
                z, y = self.draw_pairs(self.batch_size, gen, settings)
                x = generator(z, y)
                with BatchNormStatistics(teachers) as bn:
                    ensemble = torch.stack([t(x) for t in teachers]).mean(0)
                members = torch.stack([s(x) for s in students]) if students and self.w_adv else None
                loss, terms = self.objective(ensemble, y, members)
                exact, more = self.exact_terms(x, z)
                loss = loss + self.w_bn * bn.loss + exact
                terms.update(more, **{"gen-bn": bn.loss.item()})
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                self.steps_done += 1
                history.append(terms)
        return self.finish_fit(server_round, settings, history, {})
