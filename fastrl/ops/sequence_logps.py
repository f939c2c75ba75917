"""Per-sequence log-probs from token log-probs: packed or padded, sum or mean, LD-DPO weights.

>>> import torch
>>> from fastrl.ops.sequence_logps import sequence_logps
>>> token_logps = torch.tensor([-1.0, -2.0, -0.5, -0.25, -4.0])
>>> sequence_logps(token_logps, torch.tensor([0, 2, 5])).tolist()
[-3.0, -4.75]
>>> sequence_logps(token_logps, torch.tensor([0, 2, 5]), ld_alpha=0.5, pair_lengths=torch.tensor([2, 2])).tolist()
[-3.0, -2.75]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastrl import _checks
from fastrl._checks import INDEX_DTYPES, check_cu_seqlens, check_mask, cu_seqlens_checks, mask_checks, raise_first
from fastrl.ops import torch_impl
from fastrl.ops.dispatch import resolve

__all__ = ["sequence_logps"]

REDUCTIONS = ("sum", "mean")
_MAX_BLOCK = 1024  # tokens per block of the kernels (tests lower it to exercise the block loop)


def sequence_logps(
    token_logps: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    ld_alpha: float | None = None,
    pair_lengths: torch.Tensor | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """The log-prob of each sequence: the (weighted) sum, or mean, of its tokens' log-probs.

    Two layouts; pass exactly one of ``cu_seqlens`` and ``mask``:

    - packed: ``token_logps`` [T] with ``cu_seqlens`` [N+1]; sequence i is
      ``token_logps[cu_seqlens[i]:cu_seqlens[i+1]]``.
    - padded: ``token_logps`` [B, L] with ``mask`` [B, L]; sequence i is the tokens of row i where
      ``mask`` is set (anywhere in the row), N = B.

    Sums run in fp32. LD-DPO: with ``ld_alpha``, the token at position t of sequence i (0-based,
    counting only that sequence's tokens) weighs 1 if ``t < pair_lengths[i]`` else ``ld_alpha``. A
    token of weight 0 adds nothing, even a ``-inf`` one. One Triton launch each way on CUDA (one
    program per sequence), :func:`fastrl.ops.torch_impl.sequence_logps` otherwise (see
    :mod:`fastrl.ops.dispatch`).

    Args:
        token_logps: ``[T]`` (packed) or ``[B, L]`` (padded) fp32, bf16 or fp16, any strides.
        cu_seqlens: ``[N+1]`` int32 / int64 (starts at 0, non-decreasing, ends at T): the packed
            layout.
        mask: ``[B, L]`` bool or 0/1 integer / floating: the padded layout.
        ld_alpha: in [0, 1], the weight of the tokens past ``pair_lengths``; None: every token
            weighs 1.
        pair_lengths: ``[N]`` int32 / int64, >= 0, required with ``ld_alpha`` and only with it (for
            a preference pair, ``min(|y_chosen|, |y_rejected|)``).
        reduction: ``"sum"``, or ``"mean"``: each (weighted) sum divided by the sequence's token
            count; an empty sequence gives 0.

    Returns:
        ``[N]`` fp32; differentiable with respect to ``token_logps`` (gradient 0 at positions that
        belong to no sequence, e.g. padding).

    Raises:
        TypeError: an argument of the wrong kind, naming it.
        ValueError: a wrong shape, dtype, device or value, naming the argument; both or neither of
            ``cu_seqlens`` and ``mask``; ``pair_lengths`` without ``ld_alpha`` or the other way round.
            The value checks (``cu_seqlens`` offsets, ``pair_lengths >= 0``, a 0/1 ``mask``) read the
            tensors, one device sync; they are skipped under ``torch.compile``, where out-of-range
            offsets are clamped.
    """
    _checks.check_tensor("token_logps", token_logps, dtypes=_checks.FLOAT_DTYPES)
    device = token_logps.device
    if (cu_seqlens is None) == (mask is None):
        raise ValueError("pass exactly one of cu_seqlens (packed token_logps [T]) and mask (padded [B, L])")
    value_checks = []
    if cu_seqlens is not None:
        if token_logps.dim() != 1:
            raise ValueError(f"token_logps must be 1-D [T] with cu_seqlens, got shape {tuple(token_logps.shape)}")
        check_cu_seqlens(cu_seqlens, device)
        value_checks += cu_seqlens_checks(cu_seqlens, token_logps.shape[0])
        n = cu_seqlens.shape[0] - 1
    else:
        if token_logps.dim() != 2:
            raise ValueError(f"token_logps must be 2-D [B, L] with mask, got shape {tuple(token_logps.shape)}")
        check_mask(mask, tuple(token_logps.shape), device)
        value_checks += mask_checks(mask)
        n = token_logps.shape[0]
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be a str, got {type(reduction).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    if ld_alpha is not None:
        ld_alpha = _checks.check_real("ld_alpha", ld_alpha, low=0.0, high=1.0)
        if pair_lengths is None:
            raise ValueError("ld_alpha needs pair_lengths [N], the length each sequence keeps at full weight")
        _checks.check_tensor("pair_lengths", pair_lengths, ndim=1, dtypes=INDEX_DTYPES, device=device)
        if pair_lengths.shape[0] != n:
            raise ValueError(f"pair_lengths must hold one length per sequence ({n}), got shape "
                             f"{tuple(pair_lengths.shape)}")
        value_checks.append(((pair_lengths < 0).any(), "pair_lengths must be >= 0"))
    elif pair_lengths is not None:
        raise ValueError("pair_lengths is only used with ld_alpha; pass ld_alpha too (or drop pair_lengths)")
    raise_first(value_checks)
    return _sequence_logps(token_logps, cu_seqlens, mask, pair_lengths,
                           1.0 if ld_alpha is None else ld_alpha, reduction == "mean")


def _reference_kwargs(mask, pair_lengths, ld_alpha: float, mean: bool) -> dict:
    return dict(mask=mask, ld_alpha=None if pair_lengths is None else ld_alpha, pair_lengths=pair_lengths,
                reduction="mean" if mean else "sum")


def _launch(kernel, src, dst, per_token, cu_seqlens, mask, pair_lengths, ld_alpha: float, mean: bool) -> None:
    """One launch of ``kernel`` reading ``src`` and writing ``dst``, one program per sequence.

    ``per_token`` is whichever of the two the programs walk ([T] packed, [B, L] padded):
    token_logps forward, its gradient backward; the other one is [N].
    """
    import triton

    from fastrl.kernels import launch

    n = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else per_token.shape[0]
    if cu_seqlens is not None:
        length, stride_b, stride_l = 0, 0, per_token.stride(0)
        span = per_token.shape[0] // max(n, 1)  # the mean sequence length
    else:
        length, (stride_b, stride_l) = per_token.shape[1], per_token.stride()
        span = length
    block = max(16, min(_MAX_BLOCK, triton.next_power_of_2(max(span, 1))))
    unused = src  # pointers a variant does not read still need a tensor
    launch(kernel, (n,), src, unused if cu_seqlens is None else cu_seqlens, unused if mask is None else mask,
           unused if pair_lengths is None else pair_lengths, dst, per_token.shape[0], length, stride_b, stride_l,
           *(mask.stride() if mask is not None else (0, 0)), ld_alpha,
           PACKED=cu_seqlens is not None, WEIGHTED=pair_lengths is not None, MEAN=mean, BLOCK=block,
           num_warps=max(1, min(4, block // 256)))


@torch.library.custom_op("fastrl::sequence_logps", mutates_args=())
def _sequence_logps(token_logps: torch.Tensor, cu_seqlens: torch.Tensor | None, mask: torch.Tensor | None,
                    pair_lengths: torch.Tensor | None, ld_alpha: float, mean: bool) -> torch.Tensor:
    """The operator under :func:`sequence_logps` (arguments checked there): [N] fp32. Without
    ``pair_lengths`` every token weighs 1 and ``ld_alpha`` is ignored."""
    n = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else token_logps.shape[0]
    if resolve(token_logps.device) == "torch" or token_logps.numel() == 0 or n == 0:
        return torch_impl.sequence_logps(token_logps, cu_seqlens,
                                        **_reference_kwargs(mask, pair_lengths, ld_alpha, mean))
    from fastrl.kernels.sequence_logps import sequence_logps_fwd_kernel

    out = torch.empty(n, dtype=torch.float32, device=token_logps.device)
    _launch(sequence_logps_fwd_kernel, token_logps, out, token_logps, cu_seqlens, mask, pair_lengths, ld_alpha, mean)
    return out


@_sequence_logps.register_fake
def _(token_logps, cu_seqlens, mask, pair_lengths, ld_alpha, mean):
    n = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else token_logps.shape[0]
    return token_logps.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("fastrl::sequence_logps_backward", mutates_args=())
def _sequence_logps_backward(grad: torch.Tensor, cu_seqlens: torch.Tensor | None, mask: torch.Tensor | None,
                             pair_lengths: torch.Tensor | None, ld_alpha: float, mean: bool, shape: Sequence[int],
                             dtype: torch.dtype) -> torch.Tensor:
    """d token_logps (of ``shape`` and ``dtype``) from ``grad`` [N]: ``grad[i] * weight_t`` on
    sequence i's tokens, 0 elsewhere."""
    shape = tuple(shape)
    if resolve(grad.device) == "torch" or grad.numel() == 0 or 0 in shape:
        return torch_impl.sequence_logps_backward(grad, shape, dtype, cu_seqlens,
                                                 **_reference_kwargs(mask, pair_lengths, ld_alpha, mean))
    from fastrl.kernels.sequence_logps import sequence_logps_bwd_kernel

    # Packed: positions outside every span (only reachable with unchecked offsets) stay 0.
    # Padded: the kernel writes every position of every row.
    dx = (torch.zeros if cu_seqlens is not None else torch.empty)(shape, dtype=dtype, device=grad.device)
    _launch(sequence_logps_bwd_kernel, grad.contiguous(), dx, dx, cu_seqlens, mask, pair_lengths, ld_alpha, mean)
    return dx


@_sequence_logps_backward.register_fake
def _(grad, cu_seqlens, mask, pair_lengths, ld_alpha, mean, shape, dtype):
    return grad.new_empty(tuple(shape), dtype=dtype)


def _setup_context(ctx, inputs, output):
    token_logps, cu_seqlens, mask, pair_lengths, ld_alpha, mean = inputs
    ctx.save_for_backward(cu_seqlens, mask, pair_lengths)
    ctx.ld_alpha, ctx.mean = ld_alpha, mean
    ctx.shape, ctx.dtype = tuple(token_logps.shape), token_logps.dtype


def _backward(ctx, grad):
    cu_seqlens, mask, pair_lengths = ctx.saved_tensors
    dx = _sequence_logps_backward(grad, cu_seqlens, mask, pair_lengths, ctx.ld_alpha, ctx.mean, ctx.shape, ctx.dtype)
    return dx, None, None, None, None, None


_sequence_logps.register_autograd(_backward, setup_context=_setup_context)
