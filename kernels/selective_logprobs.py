"""Triton kernels of fastrl.ops.selective_logprobs: one program per row, the vocabulary in blocks.

Forward, in one pass over the row with s = x / T: the running maximum m, z = sum exp(s - m) and
w = sum exp(s - m) (s - m) (rescaled as m grows), so that log p_label = (s_label - m) - log z and the
entropy H = log z - w / z, with no cancellation even for huge logits (m and log z are kept apart:
m + log z would round away log z when |s| ~ 1e7). The label's logit is one extra load.
Backward recomputes log p = (s - m) - log z block by block and writes
d x_j = (g_lp (1[j = label] - p_j) - g_H p_j (log p_j + H)) / T, optionally over the logits.

A row whose label is ``ignore_index`` (prompt and pad positions: often most of a batch) counts for
nothing, and neither kernel reads its logits. The forward runs no step of its loop there (the loop
bound is 0) and writes log p = 0, entropy = 0 and stats (0, 0); the backward writes the row's zeros
(the gradient buffer is not pre-zeroed, and may be the logits themselves) with its loads predicated
off, so an ignored row costs one write of the row and nothing else, whatever its logits hold (NaN,
inf). Predicates rather than an early ``return``: the same memory traffic, and ptxas keeps the
registers of the single loop (an early return cost 5-8 more registers per thread at some launches).
"""

import triton
import triton.language as tl

# The running maximum starts at the lowest finite fp32 value (rows filled with finfo.min, a common
# mask, stay finite); the (m - m_new) * z term is guarded while z is still 0.
NEG_START = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def selective_logprobs_fwd_kernel(
    logits_ptr, labels_ptr, logp_ptr, entropy_ptr, stats_ptr,
    n_cols, stride_row, inv_temperature, ignore_index,
    RETURN_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    keep = label != ignore_index
    span = tl.where(keep, n_cols, 0)  # an ignored row: no step of the loop, its logits are never read
    base = logits_ptr + row * stride_row
    m = tl.full((), NEG_START, tl.float32)
    z = tl.zeros((), tl.float32)
    w = tl.zeros((), tl.float32)
    for start in range(0, span, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_cols
        s = tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(s, axis=0))
        scale = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        if RETURN_ENTROPY:
            d = tl.where(p > 0, s - m_new, 0.0)
            w = scale * (w + tl.where(z > 0, (m - m_new) * z, 0.0)) + tl.sum(p * d, axis=0)
        z = z * scale + tl.sum(p, axis=0)
        m = m_new
    log_z = tl.log(z)
    # labels are checked in Python; the clamp keeps a bad one from reading outside the row anyway
    picked = tl.load(base + tl.minimum(tl.maximum(label, 0), n_cols - 1), mask=keep, other=0.0)
    picked = picked.to(tl.float32) * inv_temperature
    tl.store(logp_ptr + row, tl.where(keep, (picked - m) - log_z, 0.0))
    tl.store(stats_ptr + 2 * row, tl.where(keep, m, 0.0))
    tl.store(stats_ptr + 2 * row + 1, tl.where(keep, log_z, 0.0))
    if RETURN_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(keep, log_z - w / z, 0.0))


@triton.jit
def selective_logprobs_bwd_kernel(
    grad_logits_ptr, grad_logp_ptr, grad_entropy_ptr, logits_ptr, labels_ptr, entropy_ptr, stats_ptr,
    n_cols, stride_row, grad_stride_row, inv_temperature, ignore_index,
    HAS_GRAD_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    out = grad_logits_ptr + row * grad_stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    keep = label != ignore_index
    read_end = tl.where(keep, n_cols, 0)  # an ignored row's logits are not read; its gradient is 0
    g_lp = tl.where(keep, tl.load(grad_logp_ptr + row), 0.0)
    m = tl.load(stats_ptr + 2 * row)
    log_z = tl.load(stats_ptr + 2 * row + 1)
    if HAS_GRAD_ENTROPY:
        g_h = tl.where(keep, tl.load(grad_entropy_ptr + row), 0.0)
        h = tl.load(entropy_ptr + row)
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_cols
        s = tl.load(base + offs, mask=offs < read_end, other=float("-inf")).to(tl.float32) * inv_temperature
        log_p = (s - m) - log_z
        p = tl.exp(log_p)
        g = tl.where(offs == label, g_lp, 0.0) - g_lp * p
        if HAS_GRAD_ENTROPY:
            g -= g_h * p * (tl.where(p > 0, log_p, 0.0) + h)
        g = tl.where(keep, g * inv_temperature, 0.0)
        tl.store(out + offs, g.to(grad_logits_ptr.dtype.element_ty), mask=mask)
