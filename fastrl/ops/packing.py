"""Between the padded ``[B, L, ...]`` layout and the packed ``[T, ...]`` + ``cu_seqlens`` one.

>>> import torch
>>> from fastrl.ops.packing import pack_sequences, unpack
>>> x = torch.tensor([[1, 2, 0], [3, 0, 0]])
>>> flat, cu_seqlens = pack_sequences(x, x != 0)
>>> flat.tolist(), cu_seqlens.tolist()
([1, 2, 3], [0, 2, 3])
>>> padded, mask = unpack(flat, cu_seqlens)
>>> padded.tolist(), mask.tolist()
([[1, 2], [3, 0]], [[True, True], [True, False]])

The ``cu_seqlens`` and mask checks every packed op shares are in :mod:`fastrl._checks`.
"""

from __future__ import annotations

import numbers

import torch

from fastrl import _checks
from fastrl._checks import check_cu_seqlens, check_mask, cu_seqlens_checks, mask_checks, raise_first

__all__ = ["pack_sequences", "unpack"]

def pack_sequences(padded: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the masked positions of ``padded`` into one flat tensor.

    The marked positions need not be left-aligned and keep their order within each row.

    Args:
        padded: ``[B, L, ...]``, any dtype.
        mask: ``[B, L]`` bool or 0/1 integer / floating, on ``padded``'s device: the positions to keep.

    Returns:
        ``(flat [T, ...], cu_seqlens [B+1] int32)``: ``flat`` in ``padded``'s dtype, T the number of
        marked positions and row b's tokens at ``flat[cu_seqlens[b]:cu_seqlens[b+1]]``.
        Differentiable with respect to ``padded``.

    Raises:
        TypeError: ``padded`` or ``mask`` not a tensor.
        ValueError: ``padded`` below 2-D, a ``mask`` of the wrong shape, dtype or device, a ``mask``
            value other than 0 and 1 (one device sync; skipped under ``torch.compile``), or more
            marked positions than int32 counts.
    """
    _checks.check_tensor("padded", padded)
    if padded.dim() < 2:
        raise ValueError(f"padded must be [B, L, ...] (at least 2-D), got shape {tuple(padded.shape)}")
    check_mask(mask, tuple(padded.shape[:2]), padded.device)
    raise_first(mask_checks(mask))
    keep = mask != 0
    flat = padded[keep]
    if flat.shape[0] > torch.iinfo(torch.int32).max:
        raise ValueError(f"mask marks {flat.shape[0]} positions, more than int32 cu_seqlens can count")
    cu_seqlens = torch.zeros(padded.shape[0] + 1, dtype=torch.int32, device=padded.device)
    cu_seqlens[1:] = keep.sum(1).cumsum(0)
    return flat, cu_seqlens


def unpack(flat: torch.Tensor, cu_seqlens: torch.Tensor, *, max_len: int | None = None,
           padding_value: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Spread the packed sequences of ``flat`` into rows, left-aligned.

    ``unpack(*pack_sequences(x, m))`` gives back ``x`` where a left-aligned ``m`` is set.

    Args:
        flat: ``[T, ...]``, any dtype.
        cu_seqlens: ``[B+1]`` int32 / int64 (starts at 0, non-decreasing, ends at T), on ``flat``'s
            device: sequence b is ``flat[cu_seqlens[b]:cu_seqlens[b+1]]``.
        max_len: the row length (default: the longest sequence); it must hold every sequence.
        padding_value: a number, the value of the positions past each sequence.

    Returns:
        ``(padded [B, max_len, ...], mask [B, max_len] bool)``: ``padded`` in ``flat``'s dtype,
        filled with ``padding_value`` past each sequence; ``mask`` marks the sequences' positions.
        Differentiable with respect to ``flat``.

    Raises:
        TypeError: a non-tensor ``flat`` / ``cu_seqlens``, a non-number ``padding_value``, a non-int
            ``max_len``.
        ValueError: a 0-d ``flat``, a ``cu_seqlens`` of the wrong rank, dtype, device or values (one
            device sync; skipped under ``torch.compile``), a ``max_len`` shorter than the longest
            sequence.
    """
    _checks.check_tensor("flat", flat)
    if flat.dim() < 1:
        raise ValueError("flat must be [T, ...] (at least 1-D), got a 0-d tensor")
    check_cu_seqlens(cu_seqlens, flat.device)
    if isinstance(padding_value, bool) or not isinstance(padding_value, numbers.Number):
        raise TypeError(f"padding_value must be a number, got {type(padding_value).__name__}")
    raise_first(cu_seqlens_checks(cu_seqlens, flat.shape[0]))
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    longest = int(lengths.max()) if lengths.numel() else 0
    if max_len is None:
        max_len = longest
    elif _checks.check_int("max_len", max_len, low=0) < longest:
        raise ValueError(f"max_len ({max_len}) is shorter than the longest sequence ({longest})")
    mask = torch.arange(max_len, device=flat.device) < lengths[:, None]
    padded = flat.new_full((lengths.shape[0], max_len, *flat.shape[1:]), padding_value)
    padded[mask] = flat  # row-major order of a left-aligned mask is the packed order
    return padded, mask
