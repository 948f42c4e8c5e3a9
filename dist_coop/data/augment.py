"""Batched augmentation on tensors, on the device the net trains on.

Random crop with zero padding and horizontal flip, drawn from an explicit ``torch.Generator``
so a step's augmentation is a function of (seed, epoch, step): a resumed run and every net of an
exchange group see exactly the same pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop_flip(x: Tensor, padding: int, generator: torch.Generator, *, flip: bool = True) -> Tensor:
    """(B, C, H, W) -> (B, C, H, W): per-sample random crop of the zero-padded image, random h-flip."""
    b, _, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
        c = x.shape[1]
        # one advanced index over the B * C padded planes (each channel of sample i at sample i's offsets): the
        # result has the canonical strides, so no copy into layout follows (indexing a (B, H, W, C) view would need one)
        rows = (dy[:, None] + torch.arange(h, device=x.device)[None]).repeat_interleave(c, 0)  # (B * C, H)
        cols = (dx[:, None] + torch.arange(w, device=x.device)[None]).repeat_interleave(c, 0)  # (B * C, W)
        planes = torch.arange(b * c, device=x.device)[:, None, None]
        x = padded.flatten(0, 1)[planes, rows[:, :, None], cols[:, None, :]].view(b, c, h, w)
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 or [0, 1] float (B, C, H, W) -> standardised float32."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The permutation of epoch ``epoch``: the same on every rank for a given seed."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def augment_step(x: Tensor, padding: int, *, seed: int, epoch: int, step: int, shard: int) -> Tensor:
    """Crop + flip of batch ``step`` of ``epoch`` on data shard ``shard``, seeded by all four, so every
    rank reading that shard (an exchange group) and a resumed run draw the same augmentation."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 100_003 + step) * 1009 + shard)
    return random_crop_flip(x, padding, g)
