"""Pixels: the codebook decoder (image codes -> an RGB image) and a detector that reads objects back.

The demo's image model writes a canvas as ``size * size`` image codes (:data:`~fastrl.tasks.t2i.vocab.
CODE_ITEMS`: code 0 the empty cell, then the 12 colour-shape objects). :func:`decode_codes` is its
fixed "VQ decoder": each code becomes a ``patch`` x ``patch`` glyph (a filled circle, square or
triangle in one of four colours on white; the empty code a white patch), and the glyphs tile the
image row-major: a 6 x 6 canvas is a ``[n, 48, 48, 3]`` uint8 image at the default 8-pixel patch.
It is the ``decode`` of the demo's :class:`fastrl.rollout.image.ImageModel`.

:func:`detect` plays the object detector (GroundingDINO's role in the study's reward): it sees only
the pixels. Per patch, each pixel is classed by its nearest colour among white and the palette; a
patch with fewer than ``min_pixels`` coloured pixels is empty; else the object's colour is the
majority colour of its coloured pixels and its shape the glyph template nearest (in Hamming
distance) to the patch's coloured-pixel mask. The three templates differ pairwise in 12 of 64
pixels, so a glyph with a few pixels flipped or moderate noise is still read right.
:func:`pixel_reward` scores the detected objects with the scorer's rules
(:func:`~fastrl.tasks.t2i.scorer.score_canvas`): presence, counts, relations and clutter.

>>> import torch
>>> from fastrl.tasks.t2i import Canvas, Vocab
>>> from fastrl.tasks.t2i.pixels import decode_codes, detect
>>> canvas = Canvas.from_ascii("Rc .. ..\\n.. Bs ..\\n.. .. Yt")
>>> vocab = Vocab(grid_size=3)
>>> codes = torch.tensor([vocab.read_completion(vocab.encode_image_completion(canvas))[0]])
>>> decode_codes(codes, size=3).shape
torch.Size([1, 24, 24, 3])
>>> detect(decode_codes(codes, size=3), size=3)[0] == canvas
True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from fastrl.tasks.t2i.grid import COLOURS, SHAPES, Canvas
from fastrl.tasks.t2i.prompts import PromptSpec
from fastrl.tasks.t2i.scorer import (CLUTTER_PENALTY, MALFORMED_SCALE, Score, prompt_reader, score_canvas,
                                     score_completion)
from fastrl.tasks.t2i.vocab import CODE_ITEMS, Vocab

__all__ = ["PALETTE", "PATCH", "WHITE", "decode_codes", "detect", "detect_completions", "glyph_masks", "pixel_reward",
           "score_images"]

PATCH = 8
"""Pixels a side of one cell's glyph."""
WHITE = (255, 255, 255)
PALETTE = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 119, 180), "yellow": (242, 197, 0)}
"""The glyphs' colours (RGB), those of :mod:`~fastrl.tasks.t2i.render`'s drawings."""


def glyph_masks(patch: int = PATCH) -> torch.Tensor:
    """``[3, patch, patch]`` bool: the filled pixels of each shape of :data:`~fastrl.tasks.t2i.grid.SHAPES`
    (circle, square, triangle), each inside a one-pixel white margin (at 8 pixels: 24, 36 and 24 pixels,
    12 apart pairwise)."""
    if patch < 4:
        raise ValueError(f"patch must be >= 4 pixels, got {patch}")
    centre = torch.arange(patch, dtype=torch.float64) + 0.5
    y, x = torch.meshgrid(centre, centre, indexing="ij")
    mid, inner = patch / 2, patch - 2  # the glyph box: rows and columns 1 .. patch - 2
    circle = (y - mid) ** 2 + (x - mid) ** 2 <= (0.36 * patch) ** 2
    square = (y > 1) & (y < patch - 1) & (x > 1) & (x < patch - 1)
    row = y - 1.5  # 0 on the glyph's top row, inner - 1 on its bottom row
    triangle = (row >= 0) & (row <= inner - 1) & ((x - mid).abs() <= 0.5 + row * (inner / 2 - 0.5) / (inner - 1))
    masks = {"circle": circle, "square": square, "triangle": triangle}
    return torch.stack([masks[s] for s in SHAPES])


def _glyphs(patch: int) -> torch.Tensor:
    """``[codebook, patch, patch, 3]`` uint8: the drawing of every image code."""
    masks = glyph_masks(patch)
    out = torch.full((len(CODE_ITEMS), patch, patch, 3), 255, dtype=torch.uint8)
    for c, item in enumerate(CODE_ITEMS):
        if item is not None:
            colour, shape = item
            out[c][masks[SHAPES.index(shape)]] = torch.tensor(PALETTE[colour], dtype=torch.uint8)
    return out


_GLYPHS: dict[int, torch.Tensor] = {}


def decode_codes(codes: torch.Tensor, *, size: int = 6, patch: int = PATCH) -> torch.Tensor:
    """Images of canvases given as codes: uint8 ``[n, size * patch, size * patch, 3]`` (on the CPU).

    Args:
        codes: ``[n, size * size]`` integer codes in ``[0, 13)`` (row-major cells; see the module docstring).
        size: the canvas's cells a side.
        patch: pixels a side of one cell.

    Raises:
        ValueError: ``codes`` of the wrong shape or out of range.
    """
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.shape[1] != size * size \
            or codes.is_floating_point():
        raise ValueError(f"codes must be an integer [n, {size * size}] tensor, got "
                         f"{tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= len(CODE_ITEMS)):
        raise ValueError(f"codes must lie in [0, {len(CODE_ITEMS)})")
    if patch not in _GLYPHS:
        _GLYPHS[patch] = _glyphs(patch)
    tiles = _GLYPHS[patch][codes.long().cpu()]  # [n, size * size, patch, patch, 3]
    n = codes.shape[0]
    return tiles.view(n, size, size, patch, patch, 3).permute(0, 1, 3, 2, 4, 5).reshape(
        n, size * patch, size * patch, 3).contiguous()


def detect(images: torch.Tensor, *, size: int = 6, min_pixels: int | None = None) -> list[Canvas]:
    """The objects in each image, as canvases (an object per patch of ``image side / size`` pixels).

    Args:
        images: uint8 (or float 0-255) ``[n, H, W, 3]`` with ``H == W`` a multiple of ``size``.
        size: the canvas's cells a side.
        min_pixels: coloured pixels a patch needs to hold an object (default: a quarter of the smallest
            glyph's).

    Returns:
        ``n`` :class:`~fastrl.tasks.t2i.grid.Canvas` of ``size`` x ``size``.

    Raises:
        ValueError: ``images`` of the wrong shape.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] != 3 \
            or images.shape[1] != images.shape[2] or images.shape[1] % size:
        raise ValueError(f"images must be [n, H, H, 3] with H a multiple of size={size}, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    n, patch = images.shape[0], images.shape[1] // size
    masks = glyph_masks(patch).reshape(len(SHAPES), -1).float()  # [3, P]
    threshold = max(1, int(masks.sum(1).min()) // 4) if min_pixels is None else min_pixels
    colours = torch.tensor([WHITE, *(PALETTE[c] for c in COLOURS)], dtype=torch.float32)  # [5, 3]
    pixels = images.float().cpu().view(n, size, patch, size, patch, 3).permute(0, 1, 3, 2, 4, 5)
    pixels = pixels.reshape(n, size * size, patch * patch, 3)
    nearest = torch.cdist(pixels.reshape(-1, 3), colours).argmin(-1).view(n, size * size, -1)  # 0 = white
    coloured = nearest > 0
    counts = torch.stack([(nearest == k + 1).sum(-1) for k in range(len(COLOURS))], -1)  # [n, cells, 4]
    colour = counts.argmax(-1)
    # Hamming distance of the coloured mask to each template: |m| + |t| - 2 m.t
    fg = coloured.float()
    distance = fg.sum(-1, keepdim=True) + masks.sum(-1) - 2 * fg @ masks.T  # [n, cells, 3]
    shape = distance.argmin(-1)
    present = coloured.sum(-1) >= threshold
    out = []
    for i in range(n):
        cells = tuple((COLOURS[int(colour[i, k])], SHAPES[int(shape[i, k])]) if bool(present[i, k]) else None
                      for k in range(size * size))
        out.append(Canvas(size, cells))
    return out


def detect_completions(completions: Sequence[Iterable[int]], vocab: Vocab, *, patch: int = PATCH) -> list[Canvas]:
    """What the detector sees in each completion's image: its codes
    (:meth:`~fastrl.tasks.t2i.vocab.Vocab.read_completion`, either format) drawn by :func:`decode_codes`,
    then :func:`detect`."""
    if not completions:
        return []
    codes = torch.tensor([vocab.read_completion(c)[0] for c in completions], dtype=torch.long)
    return detect(decode_codes(codes, size=vocab.grid_size, patch=patch), size=vocab.grid_size)


def score_images(specs: Sequence[PromptSpec | None], images: torch.Tensor, *, size: int = 6,
                 clutter_penalty: float = CLUTTER_PENALTY) -> list[Score | None]:
    """The scorer's verdict on the objects :func:`detect` finds in each image (None where the spec is)."""
    if len(specs) != images.shape[0]:
        raise ValueError(f"specs: {len(specs)} prompts for {images.shape[0]} images")
    return [None if spec is None else score_canvas(spec, canvas, clutter_penalty=clutter_penalty)
            for spec, canvas in zip(specs, detect(images, size=size))]


def pixel_reward(vocab: Vocab | None = None, *, pass_weight: float = 0.0, clutter_penalty: float = CLUTTER_PENALTY,
                 malformed_scale: float = MALFORMED_SCALE, patch: int = PATCH,
                 name: str = "detector") -> Callable[..., list[float]]:
    """A batched reward callable ``(prompt_ids, completion_ids) -> list[float]`` that scores pixels: each
    completion's image codes (:meth:`~fastrl.tasks.t2i.vocab.Vocab.read_completion`, either format) are
    drawn by :func:`decode_codes`, the objects found by :func:`detect`, and the scorer's rules applied
    to them. Each reward is ``(1 - pass_weight) * reward + pass_weight * passed``; a completion that is
    not well formed (a bad plan, a wrong number of image tokens) is scaled by ``malformed_scale`` and
    never passes, as in :func:`~fastrl.tasks.t2i.scorer.score_completion`; a prompt that does not parse
    scores 0. On clean images it equals the token-level scorer's reward.

    The callable is named ``name`` (the trainer's metrics use it) and marked ``batched``.
    """
    if not 0.0 <= pass_weight <= 1.0:
        raise ValueError(f"pass_weight must be in [0, 1], got {pass_weight}")
    vocab = vocab or Vocab()
    spec_of = prompt_reader(vocab)

    def reward(prompt_ids, completion_ids, **columns) -> list[float]:
        completion_ids = list(completion_ids)
        out = []
        for prompt, ids, canvas in zip(prompt_ids, completion_ids, detect_completions(completion_ids, vocab,
                                                                                        patch=patch)):
            spec = spec_of(prompt)
            if spec is None:
                out.append(0.0)
                continue
            score = score_completion(spec, ids, vocab, clutter_penalty=clutter_penalty,
                                     malformed_scale=malformed_scale, canvas=canvas)
            out.append((1.0 - pass_weight) * score.reward + pass_weight * float(score.passed))
        return out

    reward.__name__ = reward.__qualname__ = name
    reward.batched = True
    return reward
