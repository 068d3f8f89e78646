"""A small vision transformer (Dosovitskiy et al. 2021) for small images.

Non-overlapping ``patch x patch`` patches are embedded by one strided conv, a learned class token
is prepended and a learned position embedding added; ``depth`` pre-norm blocks
(``x + attention(LN(x))``, then ``x + MLP(LN(x))``, GELU) follow, and the head reads the normed
class token. Attention is written here with nn.Linear (not nn.MultiheadAttention, which Opacus
cannot compute per-example gradients of, and which hides the weights). No dropout.

Taps (`fedkd.models.taps`): ``block<i>`` (tokens ``[N, T, D]``: block i's output, T = patches + 1),
``attention<i>`` (block i's softmaxed weights ``[N, heads, T, T]``) and ``embedding`` (the normed
class token the head reads).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch
from torch import nn

from fedkd.errors import ConfigError
from fedkd.models._common import as_shape, channels_first, check_num_classes, positive_int
from fedkd.models.taps import EMBEDDING, Tapped, Taps


class Attention(nn.Module):
    """Multi-head self-attention: one Linear for queries, keys and values, one for the output."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output ``[N, T, D]`` and the weights ``[N, heads, T, T]`` (rows sum to 1)."""
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(n, t, d)
        return self.proj(out), weights


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attention(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's output tokens and its attention weights."""
        attended, weights = self.attention(self.norm1(x))
        x = x + attended
        return x + self.mlp(self.norm2(x)), weights


class TokenEmbedding(nn.Module):
    """The class token prepended to the patch tokens, and the learned position embedding added.

    Its own module, so that Opacus computes its per-example gradients (as one small layer).
    """

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, num_tokens, dim))
        nn.init.trunc_normal_(self.cls, std=0.02)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """Tokens ``[N, 1 + P, D]`` from patch embeddings ``[N, P, D]``."""
        cls = self.cls.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.pos


def _check(shape: tuple[int, ...], patch: int, dim: int, heads: int, mlp_ratio: object) -> int:
    """Check the patch against the image and heads against dim; return the MLP's hidden width."""
    height, width = shape[-2:]
    if height % patch or width % patch:
        fits = [p for p in range(1, min(height, width) + 1) if not height % p and not width % p]
        raise ConfigError(f"ViT: patch={patch} must divide the image sides {height}x{width}: "
                          f"one of {fits}")
    if dim % heads:
        raise ConfigError(f"ViT: dim={dim} must be a multiple of heads={heads}")
    ok = isinstance(mlp_ratio, Real) and not isinstance(mlp_ratio, bool) and math.isfinite(mlp_ratio)
    hidden = round(dim * float(mlp_ratio)) if ok else 0
    if hidden < 1:
        raise ConfigError(f"ViT: mlp_ratio={mlp_ratio!r} must be a number > 0 (the MLP's width, "
                          "dim * mlp_ratio, rounds to >= 1)")
    return hidden


class ViT(Tapped):
    """Vision transformer with a class token (module docstring).

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, H, W)``, or ``(H, W)`` for single-channel images (a channel axis is added).
    num_classes : int
        Number of output logits.
    patch : int
        Side of the square patches; it must divide H and W.
    dim : int
        Token width.
    depth : int
        Number of transformer blocks.
    heads : int
        Attention heads; they split `dim`.
    mlp_ratio : float
        Hidden width of each block's MLP, as a multiple of `dim`.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        patch: int = 4,
        dim: int = 32,
        depth: int = 2,
        heads: int = 2,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        shape = as_shape(input_shape, "ViT", (2, 3), "(C, H, W) or (H, W)")
        classes = check_num_classes(num_classes, "ViT")
        side, width, blocks, num_heads = (
            positive_int(value, "ViT", name)
            for name, value in (("patch", patch), ("dim", dim), ("depth", depth), ("heads", heads)))
        hidden = _check(shape, side, width, num_heads, mlp_ratio)
        self.add_channel, in_channels, _ = channels_first(shape, 2)
        num_patches = (shape[-2] // side) * (shape[-1] // side)
        self.patches = nn.Conv2d(in_channels, width, side, stride=side)
        self.tokens = TokenEmbedding(num_patches + 1, width)
        self.blocks = nn.ModuleList(Block(width, num_heads, hidden) for _ in range(blocks))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)
        self.declare_taps({**{f"block{i}": "tokens" for i in range(1, blocks + 1)},
                           **{f"attention{i}": "attention" for i in range(1, blocks + 1)},
                           EMBEDDING: EMBEDDING})

    def _run(self, x: torch.Tensor, taps: Taps) -> torch.Tensor:
        if self.add_channel:
            x = x.unsqueeze(1)
        x = self.tokens(self.patches(x).flatten(2).transpose(1, 2))
        for index, block in enumerate(self.blocks, start=1):
            x, weights = block(x)
            taps.put(f"block{index}", x)
            taps.put(f"attention{index}", weights)
        return self.head(taps.put(EMBEDDING, self.norm(x[:, 0])))
