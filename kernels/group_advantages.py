"""Group-relative advantages (``fastrl.ops.group_advantages``): the whole batch in one program.

One program (one CTA) walks the batch in blocks of ``BLOCK`` samples, several times, with a CTA
barrier between the phases; the per-group statistics live in a small scratch buffer that the program
initialises itself, so a call is exactly one launch, with no host sync and nothing data-dependent on
the host (CUDA-graph capturable). The phases:

1. group of each sample (``HASHED`` only, i.e. ``group_ids``): insert every id into an open-addressing
   hash table of ``H`` (a power of two >= 2B) int64 keys with ``atomic_cas`` and linear probing; the
   slot an id lands in is its group's index into the statistics. With ``group_size`` the group of
   sample i is simply ``i // group_size``. For ``pref_grpo`` the first and last sample of each group
   are recorded too (``atomic_min`` / ``atomic_max``), to bound the pairwise loop.
2. per pass (the combined reward, or each reward column with ``SPLIT``): the value of every sample
   (rounded to fp32: the working precision; NaN / inf mark an unscorable sample), its group's count and
   sum (``atomic_add`` in fp64), the batch count and sum (in-program reductions); for ``pref_grpo`` the
   win rates are then computed from the preference matrix over each group's span.
3. deviations from the group mean: the group's sum of squares (and OPO's length sums), the batch's.
4. the advantage of every sample, written out (or, with ``SPLIT``, accumulated with the column's
   weight; a last loop then divides by the batch std of the weighted sums).

Group sums are fp64 atomics (their order varies between runs; each value is an fp32 number, so the
sums of equal rewards are exact and a group of equal rewards gets exactly 0). Batch sums are
in-program tree reductions. Scratch reads that follow atomics use ``.cg`` loads (L2, never a stale L1
line). Values the Python checks refuse (skipped under ``torch.compile``) are made harmless here:
negative ids count as 0, non-finite weights / lengths as 0, out-of-range preferences are clamped into
[0, 1] (NaN as a tie), so no input can make the kernel read out of bounds or write a NaN.

GPU resources (BLOCK 2048; checked ahead of time with Triton 3.6 and 3.9, tests/gpu_resources.json):
launched with 8 warps, up to ~190 registers per thread (the round-to-nearest fp32 division and sqrt
added 10-45 in some variants; one CTA, so registers cost no occupancy); at 16 warps at most 128. No
local memory. Some variants show a stack frame of 8-32 bytes (at 40-128 registers, so
not register pressure): ptxas brackets loops that hold a CTA barrier (the layout conversions between
fp64 / atomic / 32-bit tensors, ``tl.max`` in the hash and pairwise loops, the per-column passes)
with a convergence CALL and saves a register or two around it. One element per thread (BLOCK 512)
removes the conversions and most of those frames, at four times the loop trips.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Estimator codes (dr_grpo arrives as GRPO with SCALE_NONE)
GRPO = tl.constexpr(0)
RLOO = tl.constexpr(1)
REINFORCE_PP = tl.constexpr(2)
REINFORCE_PP_BASELINE = tl.constexpr(3)
REMAX = tl.constexpr(4)
OPO = tl.constexpr(5)
PREF_GRPO = tl.constexpr(6)
# scale codes
SCALE_GROUP = tl.constexpr(0)
SCALE_BATCH = tl.constexpr(1)
SCALE_NONE = tl.constexpr(2)
# rows of the fp64 statistics scratch, each H long
COUNT = tl.constexpr(0)
SUM = tl.constexpr(1)
M2 = tl.constexpr(2)
LEN_SUM = tl.constexpr(3)  # opo: sum of lengths
LEN_DEV = tl.constexpr(4)  # opo: sum of length * (R - group mean)
EMPTY = tl.constexpr(-1)  # a free hash-table slot (ids are >= 0)


@triton.jit
def _finite(x):
    return tl.abs(x) < float("inf")  # false for NaN and +-inf


# No fp64 division or sqrt anywhere: ptxas compiles them to subroutine calls and keeps registers on the
# stack around each call. Counts get an fp64 reciprocal by Newton steps; the last division of an
# advantage and the sqrt of a variance, whose results are fp32, run in fp32, rounded to nearest as
# torch rounds them (tl.div_rn, tl.sqrt_rn: div.rn.f32 / sqrt.rn.f32; a plain `/` and tl.sqrt compile
# to the approximate div.full.f32 / sqrt.approx.f32, up to 2 ulp off, and the interpreter, which
# rounds correctly, would never show it).


@triton.jit
def _rcp(n):
    """1 / n in fp64 for n >= 1: the fp32 reciprocal refined by two Newton steps (~1 ulp of fp64)."""
    r = tl.div_rn(1.0, n.to(tl.float32)).to(tl.float64)  # _rn: no approximate division in the kernel
    r = r * (2.0 - n * r)
    return r * (2.0 - n * r)


@triton.jit
def _dev(x, total, n):
    """x - total / n, exactly 0 when the n values summing to ``total`` all equal x (n x - total is
    exact: x is an fp32 number, n < 2**29)."""
    return (n * x - total) * _rcp(tl.maximum(n, 1.0))


@triton.jit
def _divide(num, den):
    """num / den in fp32 where den > 0, else 0 (an all-equal group with eps = 0 gives 0); 0 too where
    both overflow fp32 (inf / inf, from rewards near the fp32 limit): never NaN."""
    den = den.to(tl.float32)
    pos = den > 0
    q = tl.div_rn(num.to(tl.float32), tl.where(pos, den, 1.0))
    return tl.where(pos, tl.where(q == q, q, 0.0), 0.0)


@triton.jit
def _std(m2, n):
    """Unbiased (correction = 1) standard deviation from a sum of squared deviations; 0 for n <= 1."""
    var = tl.maximum(m2, 0.0) * _rcp(tl.maximum(n - 1.0, 1.0))
    return tl.where(n > 1, tl.sqrt_rn(var.to(tl.float32)), 0.0)


@triton.jit
def _hash(key, log2_h):
    """Fibonacci hashing of an int64 id >= 0 into [0, 2**log2_h), log2_h in [1, 32]."""
    x = (key ^ (key >> 32)) & 0xFFFFFFFF
    x = (x * 2654435769) & 0xFFFFFFFF  # wraps in int64: the low 32 bits are still right
    return x >> (32 - log2_h)


@triton.jit
def _slot(idx, inb, slot_ptr, group_size, HASHED: tl.constexpr):
    """The statistics index of samples ``idx`` (0 outside the batch)."""
    if HASHED:
        s = tl.load(slot_ptr + idx, mask=inb, other=0, cache_modifier=".cg")
    else:
        s = tl.where(inb, idx // group_size, 0)
    return s


@triton.jit
def _weighted(ptr, idx, inb, stride_b, stride_c, col, n_cols, w_ptr, stride_w, HAS_WEIGHTS: tl.constexpr,
              SPLIT: tl.constexpr):
    """Column ``col`` of rows ``idx`` (``SPLIT``), or their weighted sum over the finite columns, in
    fp64 rounded to fp32; and whether it is scorable (finite, also once rounded to fp32; some finite
    column for a sum)."""
    row = ptr + idx * stride_b
    if SPLIT:
        x = tl.load(row + col * stride_c, mask=inb, other=float("nan")).to(tl.float64)
        ok = _finite(x) & inb
        x = tl.where(ok, x, 0.0)
    else:
        x = tl.zeros(idx.shape, tl.float64)
        ok = tl.zeros(idx.shape, tl.int1)
        for c in range(0, n_cols):
            r = tl.load(row + c * stride_c, mask=inb, other=float("nan")).to(tl.float64)
            fin = _finite(r)
            w = 1.0
            if HAS_WEIGHTS:
                w = tl.load(w_ptr + c * stride_w).to(tl.float64)
                w = tl.where(_finite(w), w, 0.0)
            x += tl.where(fin, w * r, 0.0)
            ok = ok | fin
    x = x.to(tl.float32).to(tl.float64)
    ok = ok & _finite(x)  # an fp64 reward beyond the fp32 range, or an overflowing sum: unscorable
    return tl.where(ok, x, 0.0), ok


@triton.jit
def _values(r_ptr, stride_rb, stride_rc, base_ptr, stride_bb, stride_bc, w_ptr, stride_w, idx, inb, col, n_cols,
            ESTIMATOR: tl.constexpr, SPLIT: tl.constexpr, HAS_WEIGHTS: tl.constexpr):
    """The value the estimator normalises (0 for pref_grpo, whose win rates come later) and whether
    the sample is scorable."""
    x, ok = _weighted(r_ptr, idx, inb, stride_rb, stride_rc, col, n_cols, w_ptr, stride_w, HAS_WEIGHTS, SPLIT)
    if ESTIMATOR == REMAX:
        b, ok_b = _weighted(base_ptr, idx, inb, stride_bb, stride_bc, col, n_cols, w_ptr, stride_w, HAS_WEIGHTS,
                              SPLIT)
        x = (x - b).to(tl.float32).to(tl.float64)
        ok = ok & ok_b & _finite(x)
    if ESTIMATOR == PREF_GRPO:
        x = tl.zeros(idx.shape, tl.float64)
    return tl.where(ok, x, 0.0), ok


@triton.jit
def _assign_groups(ids_ptr, stride_id, keys_ptr, slot_ptr, span_ptr, B, H, log2_h,
                   SPANS: tl.constexpr, BLOCK: tl.constexpr):
    """Phase 1 (``group_ids``): slot_ptr[i] = the hash-table slot of ids[i]; with ``SPANS`` the first
    and last sample of each slot."""
    for start in range(0, B, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        inb = idx < B
        key = tl.maximum(tl.load(ids_ptr + idx * stride_id, mask=inb, other=0).to(tl.int64), 0)
        slot = _hash(key, log2_h)
        pending = inb
        # The table is at most half full, so every id finds its slot; a lane that is done (or outside
        # the batch) swaps EMPTY for EMPTY in the spare slot H, a no-op.
        while tl.max(pending.to(tl.int32), 0) > 0:
            prev = tl.atomic_cas(keys_ptr + tl.where(pending, slot, H), tl.full(slot.shape, EMPTY, tl.int64),
                                 tl.where(pending, key, EMPTY), sem="relaxed")
            pending = pending & (prev != EMPTY) & (prev != key)
            slot = tl.where(pending, (slot + 1) & (H - 1), slot)
        tl.store(slot_ptr + idx, slot, mask=inb)
        if SPANS:
            tl.atomic_min(span_ptr + slot, idx.to(tl.int64), mask=inb, sem="relaxed")
            tl.atomic_max(span_ptr + H + slot, idx.to(tl.int64), mask=inb, sem="relaxed")


@triton.jit
def _win_rates(r_ptr, stride_rb, pref_ptr, stride_pi, stride_pj, val_ptr, slot_ptr, span_ptr, stats_ptr,
               B, H, group_size, HASHED: tl.constexpr, PREF_BLOCKED: tl.constexpr, BLOCK: tl.constexpr):
    """pref_grpo: w_i = sum of P[i, j] over the other scorable samples j of i's group / (n - 1),
    stored in val_ptr, added to the group sums; returns the batch sum of w (a [BLOCK] partial)."""
    bsum = tl.zeros([BLOCK], tl.float64)
    for start in range(0, B, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        inb = idx < B
        ok = _finite(tl.load(r_ptr + idx * stride_rb, mask=inb, other=float("nan")).to(tl.float64)) & inb
        s = _slot(idx, inb, slot_ptr, group_size, HASHED)
        if HASHED:
            lo = tl.load(span_ptr + s, mask=inb, other=0, cache_modifier=".cg")
            hi = tl.load(span_ptr + H + s, mask=inb, other=0, cache_modifier=".cg")
        else:
            lo = (s * group_size).to(tl.int64)
            hi = lo + group_size - 1
        n = tl.load(stats_ptr + COUNT * H + s, mask=inb, other=0.0, cache_modifier=".cg")
        width = tl.max(tl.where(ok, hi - lo, 0), 0)
        wins = tl.zeros([BLOCK], tl.float64)
        p_row = pref_ptr + idx.to(tl.int64) * stride_pi
        for k in range(0, width + 1):
            j = lo + k
            m = ok & (j <= hi) & (j != idx)
            if HASHED:  # the span may hold other groups' samples
                m = m & (tl.load(slot_ptr + j, mask=m, other=-1, cache_modifier=".cg") == s)
            m = m & _finite(tl.load(r_ptr + j * stride_rb, mask=m, other=float("nan")).to(tl.float64))
            col = j - lo if PREF_BLOCKED else j
            p = tl.load(p_row + col * stride_pj, mask=m, other=0.0).to(tl.float64)
            p = tl.where(p == p, tl.minimum(tl.maximum(p, 0.0), 1.0), 0.5)
            wins += tl.where(m, p, 0.0)
        w = tl.where(n > 1, wins * _rcp(tl.maximum(n - 1.0, 1.0)), 0.0).to(tl.float32).to(tl.float64)
        w = tl.where(ok, w, 0.0)
        tl.store(val_ptr + idx, tl.where(ok, w, float("nan")), mask=inb)
        tl.atomic_add(stats_ptr + SUM * H + s, w, mask=ok, sem="relaxed")
        bsum += w
    return bsum


@triton.jit
def _pass(r_ptr, stride_rb, stride_rc, n_cols, w_ptr, stride_w, len_ptr, stride_len, base_ptr, stride_bb, stride_bc,
          pref_ptr, stride_pi, stride_pj, out_ptr, slot_ptr, span_ptr, stats_ptr, val_ptr, acc_ptr,
          col, B, H, group_size, eps,
          ESTIMATOR: tl.constexpr, SCALE: tl.constexpr, SPLIT: tl.constexpr, HASHED: tl.constexpr,
          HAS_WEIGHTS: tl.constexpr, PREF_BLOCKED: tl.constexpr, NSTATS: tl.constexpr, BLOCK: tl.constexpr):
    """Phases 2-4 for one value per sample (column ``col`` with ``SPLIT``, else the weighted sum)."""
    GROUPED: tl.constexpr = (ESTIMATOR != REINFORCE_PP) and (ESTIMATOR != REMAX)
    NEED_M2: tl.constexpr = (ESTIMATOR == GRPO or ESTIMATOR == PREF_GRPO) and SCALE == SCALE_GROUP
    NEED_BATCH: tl.constexpr = ESTIMATOR == REINFORCE_PP or (
        (ESTIMATOR == GRPO or ESTIMATOR == PREF_GRPO) and SCALE == SCALE_BATCH)
    GROUP_DEV: tl.constexpr = NEED_M2 or ESTIMATOR == OPO or ESTIMATOR == REINFORCE_PP_BASELINE
    if GROUPED:
        for start in range(0, NSTATS * H, BLOCK):
            o = start + tl.arange(0, BLOCK)
            tl.store(stats_ptr + o, tl.zeros([BLOCK], tl.float64), mask=o < NSTATS * H)
        tl.debug_barrier()

    # Phase 2: values, group counts and sums, batch count and sum
    bsum = tl.zeros([BLOCK], tl.float64)
    bcnt = tl.zeros([BLOCK], tl.float64)
    for start in range(0, B, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        inb = idx < B
        x, ok = _values(r_ptr, stride_rb, stride_rc, base_ptr, stride_bb, stride_bc, w_ptr, stride_w, idx, inb, col,
                        n_cols, ESTIMATOR, SPLIT, HAS_WEIGHTS)
        tl.store(val_ptr + idx, tl.where(ok, x, float("nan")), mask=inb)
        if GROUPED:
            s = _slot(idx, inb, slot_ptr, group_size, HASHED)
            tl.atomic_add(stats_ptr + COUNT * H + s, tl.full([BLOCK], 1.0, tl.float64), mask=ok, sem="relaxed")
            if ESTIMATOR != PREF_GRPO:
                tl.atomic_add(stats_ptr + SUM * H + s, x, mask=ok, sem="relaxed")
        bsum += x
        bcnt += ok.to(tl.float64)
    tl.debug_barrier()
    if ESTIMATOR == PREF_GRPO:
        bsum = _win_rates(r_ptr, stride_rb, pref_ptr, stride_pi, stride_pj, val_ptr, slot_ptr, span_ptr, stats_ptr,
                          B, H, group_size, HASHED, PREF_BLOCKED, BLOCK)
        tl.debug_barrier()
    n_b = tl.sum(bcnt, 0)
    sum_b = tl.sum(bsum, 0)

    # Phase 3: squared deviations (group, batch), OPO's length sums, the batch spread of x - mean_g
    m2_b = tl.zeros([BLOCK], tl.float64)
    c_sum = tl.zeros([BLOCK], tl.float64)
    c_sq = tl.zeros([BLOCK], tl.float64)
    if NEED_BATCH or GROUP_DEV:
        for start in range(0, B, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            inb = idx < B
            x = tl.load(val_ptr + idx, mask=inb, other=float("nan"), cache_modifier=".cg")
            ok = x == x
            x = tl.where(ok, x, 0.0)
            if NEED_BATCH:
                d_b = tl.where(ok, _dev(x, sum_b, n_b), 0.0)
                m2_b += d_b * d_b
            if GROUP_DEV:
                s = _slot(idx, inb, slot_ptr, group_size, HASHED)
                n = tl.load(stats_ptr + COUNT * H + s, mask=ok, other=1.0, cache_modifier=".cg")
                total = tl.load(stats_ptr + SUM * H + s, mask=ok, other=0.0, cache_modifier=".cg")
                d = tl.where(ok, _dev(x, total, n), 0.0)
                if NEED_M2:
                    tl.atomic_add(stats_ptr + M2 * H + s, d * d, mask=ok, sem="relaxed")
                if ESTIMATOR == OPO:
                    length = tl.load(len_ptr + idx * stride_len, mask=ok, other=0).to(tl.float64)
                    length = tl.where((length > 0) & _finite(length), length, 0.0)
                    tl.atomic_add(stats_ptr + LEN_SUM * H + s, length, mask=ok, sem="relaxed")
                    tl.atomic_add(stats_ptr + LEN_DEV * H + s, length * d, mask=ok, sem="relaxed")
                if ESTIMATOR == REINFORCE_PP_BASELINE:
                    c_sum += d
                    c_sq += d * d
        tl.debug_barrier()
    std_b = _std(tl.sum(m2_b, 0), n_b)
    c_total = tl.sum(c_sum, 0)
    std_c = _std(tl.sum(c_sq, 0) - c_total * c_total * _rcp(tl.maximum(n_b, 1.0)), n_b)

    # Phase 4: advantages
    if SPLIT:
        weight = 1.0
        if HAS_WEIGHTS:
            weight = tl.load(w_ptr + col * stride_w).to(tl.float64)
            weight = tl.where(_finite(weight), weight, 0.0)
    for start in range(0, B, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        inb = idx < B
        x = tl.load(val_ptr + idx, mask=inb, other=float("nan"), cache_modifier=".cg")
        ok = x == x
        x = tl.where(ok, x, 0.0)
        if GROUPED:
            s = _slot(idx, inb, slot_ptr, group_size, HASHED)
            n = tl.load(stats_ptr + COUNT * H + s, mask=ok, other=1.0, cache_modifier=".cg")
            total = tl.load(stats_ptr + SUM * H + s, mask=ok, other=0.0, cache_modifier=".cg")
            d = _dev(x, total, n)
        if ESTIMATOR == GRPO or ESTIMATOR == PREF_GRPO:
            if SCALE == SCALE_GROUP:
                m2 = tl.load(stats_ptr + M2 * H + s, mask=ok, other=0.0, cache_modifier=".cg")
                a = _divide(d, _std(m2, n) + eps)
            elif SCALE == SCALE_BATCH:
                a = _divide(d, std_b + eps)
            else:
                a = d
        elif ESTIMATOR == RLOO:
            a = tl.where(n > 1, (n * x - total) * _rcp(tl.maximum(n - 1.0, 1.0)), 0.0)
        elif ESTIMATOR == REINFORCE_PP:
            a = _divide(_dev(x, sum_b, n_b), std_b + eps)
        elif ESTIMATOR == REINFORCE_PP_BASELINE:
            a = _divide(d, std_c + eps)
        elif ESTIMATOR == REMAX:
            a = x
        else:  # OPO: R - (mean + sum L (R - mean) / sum L), the plain mean when the lengths sum to 0
            l_sum = tl.load(stats_ptr + LEN_SUM * H + s, mask=ok, other=0.0, cache_modifier=".cg")
            l_dev = tl.load(stats_ptr + LEN_DEV * H + s, mask=ok, other=0.0, cache_modifier=".cg")
            a = d - _divide(l_dev, l_sum)  # fp32: fine for an advantage, exactly 0 when l_dev is
        a = tl.where(ok, a, 0.0)
        if SPLIT:  # acc holds NaN until one of the sample's columns is scorable
            acc = tl.load(acc_ptr + idx, mask=inb, other=0.0, cache_modifier=".cg")
            acc = tl.where(ok, tl.where(acc == acc, acc, 0.0) + weight * a, acc)
            tl.store(acc_ptr + idx, acc, mask=inb)
        else:
            tl.store(out_ptr + idx, a.to(tl.float32), mask=inb)
    tl.debug_barrier()  # the next pass zeroes the statistics read above


@triton.jit
def group_advantages_kernel(
    r_ptr, stride_rb, stride_rc, n_cols, w_ptr, stride_w,
    ids_ptr, stride_id, group_size,
    len_ptr, stride_len,
    base_ptr, stride_bb, stride_bc,
    pref_ptr, stride_pi, stride_pj,
    out_ptr, keys_ptr, slot_ptr, span_ptr, stats_ptr, val_ptr, acc_ptr,
    B, H, log2_h, eps,
    ESTIMATOR: tl.constexpr, SCALE: tl.constexpr, SPLIT: tl.constexpr, HASHED: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr, PREF_BLOCKED: tl.constexpr, NSTATS: tl.constexpr, BLOCK: tl.constexpr,
):
    """advantages [B] fp32 of rewards [B, n_cols]; launch with grid (1,). See the module docstring.

    Scratch (uninitialised on entry): keys [H + 1] int64, slot [B] int64 and span [2H] int64
    (``HASHED``), stats [NSTATS * H] fp64 (H = number of groups with ``group_size``), val [B] fp64,
    acc [B] fp64 (``SPLIT``).
    """
    if HASHED:
        for start in range(0, H + 1, BLOCK):
            o = start + tl.arange(0, BLOCK)
            tl.store(keys_ptr + o, tl.full([BLOCK], EMPTY, tl.int64), mask=o <= H)
            if ESTIMATOR == PREF_GRPO:
                tl.store(span_ptr + o, tl.full([BLOCK], B, tl.int64), mask=o < H)
                tl.store(span_ptr + H + o, tl.full([BLOCK], -1, tl.int64), mask=o < H)
    if SPLIT:
        for start in range(0, B, BLOCK):
            o = start + tl.arange(0, BLOCK)
            tl.store(acc_ptr + o, tl.full([BLOCK], float("nan"), tl.float64), mask=o < B)
    tl.debug_barrier()
    if HASHED:
        _assign_groups(ids_ptr, stride_id, keys_ptr, slot_ptr, span_ptr, B, H, log2_h, ESTIMATOR == PREF_GRPO,
                       BLOCK)
        tl.debug_barrier()
    if SPLIT:  # one pass per reward column
        for col in range(0, n_cols):
            _pass(r_ptr, stride_rb, stride_rc, n_cols, w_ptr, stride_w, len_ptr, stride_len, base_ptr, stride_bb,
                  stride_bc, pref_ptr, stride_pi, stride_pj, out_ptr, slot_ptr, span_ptr, stats_ptr, val_ptr,
                  acc_ptr, col, B, H, group_size, eps, ESTIMATOR, SCALE, SPLIT, HASHED, HAS_WEIGHTS, PREF_BLOCKED,
                  NSTATS, BLOCK)
        _divide_by_batch_std(acc_ptr, out_ptr, B, eps, BLOCK)
    else:  # one pass over the weighted sum
        _pass(r_ptr, stride_rb, stride_rc, n_cols, w_ptr, stride_w, len_ptr, stride_len, base_ptr, stride_bb,
              stride_bc, pref_ptr, stride_pi, stride_pj, out_ptr, slot_ptr, span_ptr, stats_ptr, val_ptr, acc_ptr,
              0, B, H, group_size, eps, ESTIMATOR, SCALE, SPLIT, HASHED, HAS_WEIGHTS, PREF_BLOCKED, NSTATS, BLOCK)


@triton.jit
def _divide_by_batch_std(acc_ptr, out_ptr, B, eps, BLOCK: tl.constexpr):
    """normalize_then_sum: out = acc / (batch std of acc + eps) over the samples with a scorable column
    (acc not NaN), 0 for the others. Not re-centred (see the op's docstring)."""
    a_sum = tl.zeros([BLOCK], tl.float64)
    a_cnt = tl.zeros([BLOCK], tl.float64)
    for start in range(0, B, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        acc = tl.load(acc_ptr + idx, mask=idx < B, other=float("nan"), cache_modifier=".cg")
        a_sum += tl.where(acc == acc, acc, 0.0)
        a_cnt += (acc == acc).to(tl.float64)
    n = tl.sum(a_cnt, 0)
    total = tl.sum(a_sum, 0)
    a_m2 = tl.zeros([BLOCK], tl.float64)
    for start in range(0, B, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        acc = tl.load(acc_ptr + idx, mask=idx < B, other=float("nan"), cache_modifier=".cg")
        d = tl.where(acc == acc, _dev(acc, total, n), 0.0)
        a_m2 += d * d
    den = _std(tl.sum(a_m2, 0), n) + eps
    for start in range(0, B, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        acc = tl.load(acc_ptr + idx, mask=idx < B, other=float("nan"), cache_modifier=".cg")
        tl.store(out_ptr + idx, tl.where(acc == acc, _divide(acc, den), 0.0).to(tl.float32), mask=idx < B)
