"""A picture of what the generator makes: one row per class, a few samples each."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fedkd.generators.model import ConditionalGenerator
from fedkd.settings import ClientSettings


class GeneratorSource(Protocol):
    """What the grid needs of a generator source (`fedkd.generators.base._GeneratorSource`)."""

    def build(self, settings: ClientSettings) -> ConditionalGenerator:
        """The source's current generator."""


def sample_grid(source: GeneratorSource, settings: ClientSettings, per_class: int = 8,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` samples of every class, seeded: inputs ``[C * per_class, ...]`` and labels."""
    generator = source.build(settings)
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(generator.num_classes).repeat_interleave(per_class)
    z = torch.randn(len(y), generator.z_dim, generator=gen)
    device = next(generator.parameters()).device
    generator.eval()
    with torch.no_grad():
        return generator(z.to(device), y.to(device)).cpu().numpy(), y.numpy()


def save_sample_grid(source: GeneratorSource, settings: ClientSettings, path: Path,
                     per_class: int = 8) -> Path:
    """Save a PNG grid: images for ``[C, H, W]`` / ``[H, W]`` inputs, line plots for 1-d signals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = sample_grid(source, settings, per_class)
    classes = int(y.max()) + 1
    fig, axes = plt.subplots(classes, per_class, figsize=(per_class * 0.9, classes * 0.9),
                             squeeze=False)
    image = x.ndim == 3 or (x.ndim == 4 and x.shape[1] in (1, 3))
    for ax, sample, label in zip(axes.flat, x, y):
        if image:
            pixels = sample[0] if sample.ndim == 3 and sample.shape[0] == 1 else sample
            if pixels.ndim == 3:
                pixels = np.moveaxis(pixels, 0, -1)
            ax.imshow(pixels, cmap="gray_r", vmin=source.low, vmax=source.high)
        else:
            ax.plot(sample.reshape(-1), linewidth=0.8)
            ax.set_ylim(source.low, source.high)
        ax.set_xticks([])
        ax.set_yticks([])
    for label, row in enumerate(axes):
        row[0].set_ylabel(str(label), rotation=0, labelpad=10)
    fig.suptitle(f"{source.kind} generator: {per_class} samples per requested class "
                 f"({source.steps_done} steps)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


