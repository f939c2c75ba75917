"""Per-sequence sums of token log-probs (``fastrl.ops.sequence_logps``): forward and backward.

One program per sequence walks its tokens in blocks of ``BLOCK``. A sequence is either a span
``cu_seqlens[i]:cu_seqlens[i+1]`` of a flat ``[T]`` tensor (``PACKED``) or the masked tokens of row
``i`` of a ``[B, L]`` tensor; there a token's position within its sequence is the running count of
the mask (``tl.cumsum`` inside a block plus the count carried from the blocks before). With
``WEIGHTED`` (LD-DPO) the token at position ``t`` weighs 1 if ``t < pair_lengths[i]`` else
``ld_alpha``; with ``MEAN`` the weighted sum is divided by the sequence's token count.
The backward is linear: ``d x[t] = grad[i] * weight_t (/ count)``, 0 outside every sequence.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _sequence_span(seq, x_ptr, cu_ptr, total, length, stride_xb, stride_xl, PACKED: tl.constexpr):
    """First element of sequence ``seq`` in ``x`` and the length of the span its tokens lie in.

    Packed: ``cu_seqlens`` bounds are clamped into ``[0, total]`` so no input can make a program
    read outside ``x``. Padded: the whole row.
    """
    if PACKED:
        start = tl.minimum(tl.maximum(tl.load(cu_ptr + seq).to(tl.int64), 0), total)
        end = tl.minimum(tl.maximum(tl.load(cu_ptr + seq + 1).to(tl.int64), start), total)
        row = x_ptr + start * stride_xl
        span = end - start
    else:
        row = x_ptr + seq * stride_xb
        # tl.cast, not length.to: Triton compiles an int argument equal to 1 as a constexpr, a Python
        # int inside the kernel, which has no .to (the interpreter never does; tests/test_gpu_compile.py)
        span = tl.cast(length, tl.int64)
    return row, span


@triton.jit
def _block_weights(idx, span, carry, m_row, stride_ml, pair_len, ld_alpha,
                   PACKED: tl.constexpr, WEIGHTED: tl.constexpr):
    """For the offsets ``idx`` [BLOCK] of one block of a sequence's span: which are tokens of the
    sequence with a non-zero weight (``keep``), their weights, and the token count so far
    (``carry``, updated past this block; padded form only)."""
    inside = idx < span
    if PACKED:
        keep = inside
        pos = idx
    else:
        keep = (tl.load(m_row + idx * stride_ml, mask=inside, other=0) != 0) & inside
        k = keep.to(tl.int32)
        pos = carry + tl.cumsum(k, 0) - 1  # position among the sequence's (masked) tokens
        carry = carry + tl.sum(k, 0)
    if WEIGHTED:
        w = tl.where(pos < pair_len, 1.0, ld_alpha)
        keep = keep & (w != 0.0)  # a token of weight 0 is left out, even a -inf one
    else:
        w = tl.full(idx.shape, 1.0, tl.float32)
    return keep, w, carry


@triton.jit
def sequence_logps_fwd_kernel(
    x_ptr, cu_ptr, m_ptr, pair_ptr, out_ptr,
    total, length, stride_xb, stride_xl, stride_mb, stride_ml, ld_alpha,
    PACKED: tl.constexpr, WEIGHTED: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[i] = sum_t w_t x_t over sequence i's tokens (/ their count with ``MEAN``), fp32."""
    seq = tl.program_id(0).to(tl.int64)
    x_row, span = _sequence_span(seq, x_ptr, cu_ptr, total, length, stride_xb, stride_xl, PACKED)
    m_row = m_ptr + seq * stride_mb
    pair_len = tl.load(pair_ptr + seq).to(tl.int64) if WEIGHTED else 0
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    carry = tl.zeros([], dtype=tl.int32)
    for off in range(0, span, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        keep, w, carry = _block_weights(idx, span, carry, m_row, stride_ml, pair_len, ld_alpha, PACKED, WEIGHTED)
        # masked by the span, not by keep: the load need not wait for the mask's
        x = tl.load(x_row + idx * stride_xl, mask=idx < span, other=0.0).to(tl.float32)
        acc += tl.where(keep, x, 0.0) * w
    s = tl.sum(acc, 0)
    if MEAN:
        count = span if PACKED else carry
        s = s / tl.maximum(count, 1).to(tl.float32)
    tl.store(out_ptr + seq, s)


@triton.jit
def sequence_logps_bwd_kernel(
    grad_ptr, cu_ptr, m_ptr, pair_ptr, dx_ptr,
    total, length, stride_db, stride_dl, stride_mb, stride_ml, ld_alpha,
    PACKED: tl.constexpr, WEIGHTED: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr,
):
    """dx[t] = grad[i] * w_t (/ count with ``MEAN``) over sequence i's span, 0 where it holds no
    token of weight > 0; ``dx`` in its own dtype. Positions outside every span are not written."""
    seq = tl.program_id(0).to(tl.int64)
    dx_row, span = _sequence_span(seq, dx_ptr, cu_ptr, total, length, stride_db, stride_dl, PACKED)
    m_row = m_ptr + seq * stride_mb
    pair_len = tl.load(pair_ptr + seq).to(tl.int64) if WEIGHTED else 0
    g = tl.load(grad_ptr + seq).to(tl.float32)
    if MEAN:
        if PACKED:
            count = span
        else:  # the count must be known before the first gradient is written: one pass over the mask
            count = tl.zeros([], dtype=tl.int32)
            for off in range(0, span, BLOCK):
                idx = off + tl.arange(0, BLOCK)
                inside = idx < span
                m = tl.load(m_row + idx * stride_ml, mask=inside, other=0) != 0
                count += tl.sum((m & inside).to(tl.int32), 0)
        g = g / tl.maximum(count, 1).to(tl.float32)
    carry = tl.zeros([], dtype=tl.int32)
    for off in range(0, span, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        keep, w, carry = _block_weights(idx, span, carry, m_row, stride_ml, pair_len, ld_alpha, PACKED, WEIGHTED)
        dx = tl.where(keep, g * w, 0.0)
        tl.store(dx_row + idx * stride_dl, dx.to(dx_ptr.dtype.element_ty), mask=idx < span)

