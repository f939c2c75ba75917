"""Input checks shared by every public function: one place, one wording.

Each raises ``TypeError`` for a wrong kind of value and ``ValueError`` for a wrong value, and names
the argument, so a bad input never reaches a kernel. The packed layout's ``cu_seqlens`` and the padded
layout's 0/1 masks are checked here too (:func:`check_cu_seqlens` / :func:`cu_seqlens_checks`,
:func:`check_mask` / :func:`mask_checks`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
               torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check that ``value`` is a tensor with the given rank, one of ``dtypes``, on ``device``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise ValueError(f"{name} must have dtype {allowed}; got {str(value.dtype).removeprefix('torch.')}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on {device} (the device of the other inputs), got {value.device}")
    return value


def check_real(name: str, value: object, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """Check a finite real scalar within [low, high] (either end open if asked); return it as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    lo_bad = low is not None and (v <= low if low_open else v < low)
    hi_bad = high is not None and (v >= high if high_open else v > high)
    if not math.isfinite(v) or lo_bad or hi_bad:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        rng = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
        raise ValueError(f"{name} must be finite and in {rng}, got {value!r}")
    return v


def check_int(name: str, value: object, *, low: int | None = None) -> int:
    """Check an integer scalar (not a bool) that is at least ``low``; return it as int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def check_row_tensor(name: str, value: torch.Tensor, rows: int, device: torch.device, *,
                     integer: bool) -> torch.Tensor:
    """A per-row setting: a 1-D tensor of ``rows`` values (or a 0-d tensor, one value for all rows) on
    ``device``. Returned as a contiguous int64 (``integer``) or float64 tensor [rows]; its values are
    checked where they are read."""
    check_tensor(name, value, device=device)
    if value.dim() == 0:
        value = value.expand(rows)
    if value.dim() != 1 or value.shape[0] != rows:
        raise ValueError(f"{name} must hold one value per row ({rows}), got shape {tuple(value.shape)}")
    if integer:
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        return value.to(torch.int64).contiguous()
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    return value.to(torch.float64).contiguous()


def raise_first(checks: list[tuple[torch.Tensor, str]]) -> None:
    """Raise ``ValueError(message)`` for the first ``(flag, message)`` whose 0-d bool ``flag`` is
    true. All flags come back in one device sync. Skipped under ``torch.compile`` (a data-dependent
    branch would break the graph); kernels clamp what they read, so unchecked values can give wrong
    numbers but never an out-of-bounds access."""
    if not checks or torch.compiler.is_compiling():
        return
    flags = torch.stack([flag.reshape(()) for flag, _ in checks]).tolist()
    for bad, (_, message) in zip(flags, checks):
        if bad:
            raise ValueError(message)


def check_labels(name: str, labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every label in ``[0, vocab)`` or equal to ``ignore_index`` (a :func:`raise_first` check, so
    skipped under ``torch.compile``, where kernels clamp labels so they never read out of bounds)."""
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    raise_first([(bad.any(), f"{name} must be in [0, {vocab}) or equal ignore_index ({ignore_index})")])


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_token_labels(labels: object, positions: torch.Size, device: torch.device, vocab: int, temperature: object,
                       ignore_index: object, source: str) -> tuple[float, int]:
    """The arguments every log-prob op shares: ``labels`` [positions] int64/int32 in ``[0, vocab)`` or
    ``ignore_index`` (``source`` names the tensor the positions come from), temperature > 0.
    Returns ``(temperature, ignore_index)`` as float and int."""
    check_tensor("labels", labels, dtypes=(torch.int64, torch.int32), device=device)
    if labels.shape != positions:
        raise ValueError(f"labels must have shape {tuple(positions)} ({source} without its last dimension), "
                         f"got {tuple(labels.shape)}")
    temperature = check_real("temperature", temperature, low=0.0, low_open=True)
    ignore_index = check_int("ignore_index", ignore_index)
    check_labels("labels", labels, vocab, ignore_index)
    return temperature, ignore_index


def check_cu_seqlens(cu_seqlens: object, device: torch.device, name: str = "cu_seqlens") -> torch.Tensor:
    """Kind, rank, dtype (int32 / int64) and device of a ``cu_seqlens`` [N+1].

    Its values are checked by :func:`cu_seqlens_checks`.

    Args:
        cu_seqlens: should be ``[N+1]`` int32 / int64, N >= 0.
        device: the device it must be on (the other inputs').
        name: the argument's name in the messages.

    Returns:
        ``cu_seqlens``, unchanged.

    Raises:
        TypeError: not a tensor.
        ValueError: not 1-D, empty, of another dtype or on another device.
    """
    check_tensor(name, cu_seqlens, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if cu_seqlens.shape[0] == 0:
        raise ValueError(f"{name} must hold N+1 >= 1 offsets (a leading 0), got an empty tensor")
    return cu_seqlens


def cu_seqlens_checks(cu_seqlens: torch.Tensor, total: int, name: str = "cu_seqlens") -> list[tuple[torch.Tensor, str]]:
    """Value checks of ``cu_seqlens`` for :func:`raise_first`.

    Args:
        cu_seqlens: ``[N+1]`` int32 / int64 (checked by :func:`check_cu_seqlens`).
        total: the number of packed tokens, where it must end.
        name: the argument's name in the messages.

    Returns:
        ``(flag, message)`` pairs, each flag a 0-d bool tensor, true when it fails: starts at 0,
        never decreases, ends at ``total``.
    """
    return [
        (cu_seqlens[0] != 0, f"{name} must start at 0"),
        ((cu_seqlens[1:] < cu_seqlens[:-1]).any(), f"{name} must be non-decreasing"),
        (cu_seqlens[-1] != total, f"{name} must end at the number of tokens, {total}"),
    ]


def check_mask(mask: object, shape: tuple[int, ...], device: torch.device, name: str = "mask") -> torch.Tensor:
    """Kind, shape, dtype (bool, integer or floating) and device of a 0/1 ``mask``.

    Its values are checked by :func:`mask_checks`.

    Args:
        mask: should be ``shape``, bool, integer or floating.
        shape: the shape it must have.
        device: the device it must be on.
        name: the argument's name in the messages.

    Returns:
        ``mask``, unchanged.

    Raises:
        TypeError: not a tensor.
        ValueError: another shape, dtype or device.
    """
    check_tensor(name, mask, ndim=len(shape), dtypes=MASK_DTYPES, device=device)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask


def mask_checks(mask: torch.Tensor, name: str = "mask") -> list[tuple[torch.Tensor, str]]:
    """Value check of a mask for :func:`raise_first`: only 0 and 1 (nothing to check for bool).

    Args:
        mask: ``[...]`` (any shape) bool, integer or floating.
        name: the argument's name in the message.

    Returns:
        ``[(flag, message)]`` with a 0-d bool flag, or ``[]`` for a bool mask.
    """
    if mask.dtype == torch.bool:
        return []
    return [(((mask != 0) & (mask != 1)).any(), f"{name} must hold only 0 and 1 (or be bool)")]
