"""A pixel reward and a fixed codebook decoder for the image-generation example configs.

Referenced from a config as ``reward_funcs: [examples/janus_rewards.py:redness]`` and
``image_generation: {decode: examples/janus_rewards.py:palette_decode}`` (file paths, relative to
the working directory), or imported from Python.
"""

from __future__ import annotations

import torch

# one colour per code of a 32-code codebook (fixed, seeded)
PALETTE = torch.randint(0, 256, (32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def palette_decode(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``[n, N]`` (N a square, e.g. 16) to uint8 pixels ``[n, 2 sqrt(N), 2 sqrt(N), 3]``: code c
    paints its 2 x 2 patch in ``PALETTE[c]``. (A random VQ-VAE paints nearly every image the same
    grey; this decoder gives a pixel reward something to see.)"""
    side = int(codes.shape[1] ** 0.5)
    patches = PALETTE[codes.cpu() % len(PALETTE)].view(-1, side, side, 3)
    return patches.repeat_interleave(2, 1).repeat_interleave(2, 2)


def redness(prompt_ids, completion_ids, images) -> float:
    """Per image (``images`` is its uint8 ``[H, W, 3]``): mean red minus mean green and blue, in [-1, 1]."""
    pixels = images.float() / 255.0
    return float(pixels[..., 0].mean() - pixels[..., 1:].mean())
