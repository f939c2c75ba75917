"""GRPO-family loss (``fastrl.losses.grpo_loss``): per-token terms summed per sequence, forward and backward.

One program per sequence. A sequence is a span ``cu_seqlens[i]:cu_seqlens[i+1]`` of flat ``[T]``
tensors (``PACKED``) or the masked positions of row ``i`` of contiguous ``[B, L]`` tensors.

Forward (:func:`grpo_loss_fwd_kernel`): a first pass over the sequence, only when a per-sequence
quantity is needed before the per-token loss (sequence-level ratio, vespo weight, off-policy mask,
sequence-level sampler weight), then a second pass that evaluates every token's loss and sums it,
with the metric counts, into one row of ``stats`` [B, NSTATS] (column layout:
``fastrl.kernels.grpo_columns``). The aggregation across sequences is left to the caller: the loss is
``sum_i c_i * stats[i, LOSS]`` with weights that depend on the token counts only.

Backward (:func:`grpo_loss_bwd_kernel`): one pass per sequence writing ``d logps`` (and ``d
entropy``) from the per-sequence gradients ``gS`` / ``gE`` and the constants the forward left in
``stats`` (no per-sequence reduction is repeated). :func:`_token_terms` is the per-token maths both
passes share; the forward uses its values, the backward its derivative, and the compiler drops
the part each does not use.

Codes of the constexpr switches: POLICY 0 clip (grpo, bnpo, dr_grpo, dapo, luspo), 1 cispo, 2 sapo,
3 vespo; LEVEL 0 token, 1 sequence, 2 sequence_token; KL 0 k1, 1 abs, 2 k2, 3 k3, 4 low_var_kl;
IS_MODE 0 none, 1 token_truncate, 2 token_mask, 3 sequence_truncate, 4 sequence_mask.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import grpo_columns as columns

# Columns of stats (fastrl.kernels.grpo_columns; the torch implementation reads the same module)
_LOSS = tl.constexpr(columns.LOSS)
_ENT = tl.constexpr(columns.ENT)
_COUNT = tl.constexpr(columns.COUNT)
_KL = tl.constexpr(columns.KL)
_RATIO = tl.constexpr(columns.RATIO)
_LOW = tl.constexpr(columns.LOW)
_HIGH = tl.constexpr(columns.HIGH)
_DUAL = tl.constexpr(columns.DUAL)
_PHI = tl.constexpr(columns.PHI)
_LOG_RATIO = tl.constexpr(columns.LOG_RATIO)
_COUPLING = tl.constexpr(columns.COUPLING)
_OFF_POLICY_KL = tl.constexpr(columns.OFF_POLICY_KL)
_IS_WEIGHT = tl.constexpr(columns.IS_WEIGHT)
_VESPO_LOG_W = tl.constexpr(columns.VESPO_LOG_W)
_USED = tl.constexpr(columns.USED)
NSTATS = tl.constexpr(columns.NSTATS)
_LOG_EPS = tl.constexpr(columns.LOG_EPS)  # log(1e-8), TRL's lower clamp of vespo log-weights


@triton.jit
def _span(seq, cu_ptr, total, length, PACKED: tl.constexpr):
    """(offset of the sequence's first position, length of its span); packed bounds clamped into
    [0, total] so that no input makes a program read outside the tensors."""
    if PACKED:
        start = tl.minimum(tl.maximum(tl.load(cu_ptr + seq).to(tl.int64), 0), total)
        end = tl.minimum(tl.maximum(tl.load(cu_ptr + seq + 1).to(tl.int64), start), total)
        base = start
        span = end - start
    else:
        base = seq * length
        span = seq * 0 + length  # int64 even when Triton specialises length to a constant
    return base, span


@triton.jit
def _valid(m_ptr, base, idx, span, PACKED: tl.constexpr):
    inside = idx < span
    if PACKED:
        return inside
    return (tl.load(m_ptr + base + idx, mask=inside, other=0) != 0) & inside


@triton.jit
def _load(ptr, base, idx, valid):
    """fp32 values at the sequence's tokens, 0 elsewhere (padding never enters the arithmetic)."""
    return tl.load(ptr + base + idx, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _nan_to_zero(x):
    return tl.where(x != x, 0.0, x)


@triton.jit
def _is_weight(log_w, is_min, is_max, TRUNCATE: tl.constexpr):
    """Sampler importance weight exp(log_w): clamped to [is_min, is_max] or zeroed outside it."""
    w = tl.exp(log_w)
    if TRUNCATE:
        w = tl.minimum(tl.maximum(w, is_min), is_max)
    else:
        w = tl.where((w < is_min) | (w > is_max), 0.0, w)
    return w


@triton.jit
def _vespo_phi(log_w, a, k_pos, k_neg, lam_pos, lam_neg):
    """phi(w) = exp(lambda + k log w - lambda w), (k, lambda) by the sign of A; NaN / inf -> 0."""
    nonneg = a >= 0
    k = tl.where(nonneg, k_pos, k_neg)
    lam = tl.maximum(tl.where(nonneg, lam_pos, lam_neg), 1e-4)
    phi = tl.exp(lam + k * log_w - lam * tl.exp(log_w))
    return tl.where(phi < 3.0e38, phi, 0.0)  # also false for NaN


@triton.jit
def _kl_terms(lp, rf, KL: tl.constexpr, KL_ST: tl.constexpr):
    """(value, d value / d lp) of the KL estimator between pi (lp) and pi_ref (rf)."""
    x = lp - rf
    if KL == 0:
        k = x
        dk = tl.full(x.shape, 1.0, tl.float32)
    elif KL == 1:
        k = tl.abs(x)
        dk = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
    elif KL == 2:
        k = 0.5 * x * x
        dk = x
    elif KL == 3:
        e = tl.exp(-x)
        k = e + x - 1.0
        dk = 1.0 - e
    else:  # low_var_kl: verl's k3 with the log-ratio clamped to [-20, 20] and the value to [-10, 10]
        d = -x
        dc = tl.minimum(tl.maximum(d, -20.0), 20.0)
        e = tl.exp(dc)
        raw = e - dc - 1.0
        k = tl.minimum(tl.maximum(raw, -10.0), 10.0)
        dk = tl.where((d >= -20.0) & (d <= 20.0) & (raw >= -10.0) & (raw <= 10.0), 1.0 - e, 0.0)
    if KL_ST:  # straight-through ("k3+"): the estimator's value, the gradient of k2
        dk = x
    return k, dk


@triton.jit
def _token_terms(lp, od, a, rf, smp, seq_log_ratio, off_policy_kl, seq_is_weight, vespo_log_w,
                 clip_lo, clip_hi, eps_high, delta, clip_c, beta, is_min, is_max, opm_threshold,
                 tau_pos, tau_neg, k_pos, k_neg, lam_pos, lam_neg,
                 POLICY: tl.constexpr, LEVEL: tl.constexpr, KL: tl.constexpr, KL_ST: tl.constexpr,
                 BIAS: tl.constexpr, HAS_REF: tl.constexpr, HAS_BETA: tl.constexpr, HAS_DELTA: tl.constexpr,
                 DUAL: tl.constexpr, IS_MODE: tl.constexpr, OFF_POLICY: tl.constexpr):
    """Per-token loss l_t and what the passes need of it, for one block of tokens (lp, od, rf, smp
    blocks; ``a`` a block or the sequence's scalar advantage).

    Returns (loss, direct, coupling, r, kl, low, high, dual, phi): ``direct`` = d l_t / d lp_t
    through token t's own log-prob, ``coupling`` = d l_t / d s for the sequence ratio s (used at
    LEVEL 1), ``r`` the ratio applied, ``kl`` the KL term as it enters the loss, the clip
    indicators (fp32 0/1) and vespo's phi.
    """
    zero = tl.zeros(lp.shape, tl.float32)
    a = a + zero  # a scalar advantage becomes a block
    if LEVEL == 0:
        r = tl.exp(lp - od)
        dr = r
    elif LEVEL == 1:
        r = zero + tl.exp(seq_log_ratio)
        dr = zero
    else:  # GSPO-token: value s_i, gradient s_i * d lp_t, log clamped at 10 (verl)
        r = zero + tl.exp(tl.minimum(seq_log_ratio, 10.0))
        dr = tl.where(seq_log_ratio <= 10.0, r, 0.0)

    # weight of the policy term: off-policy mask x sampler importance weight
    w = zero + 1.0
    if OFF_POLICY:
        w = tl.where((a >= 0) | ((zero + off_policy_kl) <= opm_threshold), w, 0.0)
    if POLICY != 3:  # vespo folds the sampler weight into phi instead
        if IS_MODE == 1 or IS_MODE == 2:
            w = w * _is_weight(_nan_to_zero(od - smp), is_min, is_max, IS_MODE == 1)
        elif IS_MODE >= 3:
            w = w * seq_is_weight

    low = zero
    high = zero
    dual = zero
    phi = zero
    dp_dlp = zero
    if POLICY == 0:
        if HAS_DELTA:  # two-sided clipping: the unclipped ratio is capped at delta
            r1 = tl.minimum(r, delta)
            d1 = tl.where(r <= delta, 1.0, 0.0)
        else:
            r1 = r
            d1 = zero + 1.0
        r2 = tl.minimum(tl.maximum(r, clip_lo), clip_hi)
        d2 = tl.where((r >= clip_lo) & (r <= clip_hi), 1.0, 0.0)
        pa = r1 * a
        pb = r2 * a
        policy = -tl.minimum(pa, pb)
        # as torch.minimum: the gradient goes to the smaller term, half to each on a tie
        dp_dr = -a * tl.where(pa < pb, d1, tl.where(pb < pa, d2, 0.5 * (d1 + d2)))
        low = tl.where((r1 < clip_lo) & (a < 0), 1.0, 0.0)
        high = tl.where((r1 > clip_hi) & (a > 0), 1.0, 0.0)
        if DUAL:  # dual clip: for A < 0 the loss is at most -c * A
            bound = -clip_c * a
            neg = a < 0
            dual = tl.where(neg & (policy > bound), 1.0, 0.0)
            factor = tl.where(policy < bound, 1.0, tl.where(policy == bound, 0.5, 0.0))
            dp_dr = tl.where(neg, dp_dr * factor, dp_dr)
            policy = tl.where(neg, tl.minimum(bound, policy), policy)
    elif POLICY == 1:  # cispo: -sg(min(r, eps_high)) * A * lp
        cw = tl.minimum(r, eps_high)
        policy = -cw * a * lp
        dp_dlp = -cw * a
        dp_dr = zero
        high = tl.where((r > eps_high) & (a > 0), 1.0, 0.0)
    elif POLICY == 2:  # sapo: -(4 / tau) * sigmoid(tau (r - 1)) * A
        tau = tl.where(a > 0, tau_pos, tau_neg)
        gate = 1.0 / (1.0 + tl.exp(-tau * (r - 1.0)))
        policy = -(4.0 / tau) * gate * a
        dp_dr = -4.0 * gate * (1.0 - gate) * a
    else:  # vespo: -sg(phi(w)) * A * lp with the sequence weight w
        phi = _vespo_phi(vespo_log_w, a, k_pos, k_neg, lam_pos, lam_neg)
        policy = -phi * a * lp
        dp_dlp = -phi * a
        dp_dr = zero

    loss = w * policy
    direct = w * (dp_dr * dr + dp_dlp)
    coupling = w * dp_dr
    kl = zero
    if HAS_REF:
        k, dk = _kl_terms(lp, rf, KL, KL_ST)
        if BIAS:  # TRL use_bias_correction_kl: KL x ratio, differentiable through the ratio
            kl = k * r
            dkl = dk * r + k * dr
            kc = k
        else:
            kl = k
            dkl = dk
            kc = zero
        if HAS_BETA:
            loss += beta * kl
            direct += beta * dkl
            coupling += beta * kc
    return loss, direct, coupling, r, kl, low, high, dual, phi


@triton.jit
def grpo_loss_fwd_kernel(
    lp_ptr, old_ptr, adv_ptr, ref_ptr, smp_ptr, opsrc_ptr, ent_ptr, m_ptr, cu_ptr, stats_ptr,
    total, length,
    clip_lo, clip_hi, eps_high, delta, clip_c, beta, is_min, is_max, opm_threshold,
    tau_pos, tau_neg, k_pos, k_neg, lam_pos, lam_neg,
    PACKED: tl.constexpr, ADV_TOKEN: tl.constexpr, POLICY: tl.constexpr, LEVEL: tl.constexpr,
    KL: tl.constexpr, KL_ST: tl.constexpr, BIAS: tl.constexpr, HAS_REF: tl.constexpr, HAS_BETA: tl.constexpr,
    HAS_DELTA: tl.constexpr, DUAL: tl.constexpr, IS_MODE: tl.constexpr, OFF_POLICY: tl.constexpr,
    HAS_ENT: tl.constexpr, SEQ_PASS: tl.constexpr, BLOCK: tl.constexpr,
):
    """stats[i, :] of sequence i = program_id(0); see the module docstring. ``SEQ_PASS`` (the first
    pass) must be set when LEVEL != 0, POLICY == 3, OFF_POLICY or IS_MODE >= 3."""
    seq = tl.program_id(0).to(tl.int64)
    base, span = _span(seq, cu_ptr, total, length, PACKED)
    if ADV_TOKEN:
        a_seq = 0.0
    else:
        a_seq = tl.load(adv_ptr + seq).to(tl.float32)

    # Pass 1: the per-sequence quantities the token terms depend on
    seq_log_ratio = 0.0
    off_policy_kl = 0.0
    seq_is_weight = 1.0
    vespo_log_w = 0.0
    n = 0.0
    if SEQ_PASS:
        acc_lr = tl.zeros([BLOCK], tl.float32)
        acc_lrc = tl.zeros([BLOCK], tl.float32)
        acc_op = tl.zeros([BLOCK], tl.float32)
        acc_is = tl.zeros([BLOCK], tl.float32)
        acc_n = tl.zeros([BLOCK], tl.float32)
        for off in range(0, span, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            valid = _valid(m_ptr, base, idx, span, PACKED)
            acc_n += tl.where(valid, 1.0, 0.0)
            lp = _load(lp_ptr, base, idx, valid)
            od = _load(old_ptr, base, idx, valid)
            if LEVEL != 0:
                acc_lr += tl.where(valid, lp - od, 0.0)
            if POLICY == 3:
                acc_lrc += tl.where(valid, tl.minimum(tl.maximum(lp - od, -20.0), 20.0), 0.0)
            if OFF_POLICY:
                acc_op += tl.where(valid, _nan_to_zero(_load(opsrc_ptr, base, idx, valid) - lp), 0.0)
            if IS_MODE != 0:
                d = _nan_to_zero(od - _load(smp_ptr, base, idx, valid))
                if IS_MODE >= 3:
                    acc_is += tl.where(valid, d, 0.0)
                elif POLICY == 3:  # the log of the token's sampler weight joins vespo's sequence weight
                    lw = tl.log(_is_weight(d, is_min, is_max, IS_MODE == 1))
                    acc_lrc += tl.where(valid, tl.minimum(tl.maximum(lw, _LOG_EPS), 20.0), 0.0)
        n = tl.sum(acc_n, 0)
        n1 = tl.maximum(n, 1.0)
        # per-sequence means that are compared with thresholds (the clip range, the off-policy delta):
        # rounded as torch rounds its mean (div.rn, not the approximate div.full of `/`)
        if LEVEL != 0:
            seq_log_ratio = tl.div_rn(tl.sum(acc_lr, 0), n1)
        if OFF_POLICY:
            off_policy_kl = tl.div_rn(tl.sum(acc_op, 0), n1)
        if IS_MODE >= 3:
            seq_is_weight = _is_weight(tl.sum(acc_is, 0), is_min, is_max, IS_MODE == 3)
        if POLICY == 3:
            vespo_log_w = tl.minimum(tl.maximum(tl.sum(acc_lrc, 0), _LOG_EPS), 20.0)

    # Pass 2: the per-token loss, summed
    acc_loss = tl.zeros([BLOCK], tl.float32)
    acc_ent = tl.zeros([BLOCK], tl.float32)
    acc_n2 = tl.zeros([BLOCK], tl.float32)
    acc_kl = tl.zeros([BLOCK], tl.float32)
    acc_r = tl.zeros([BLOCK], tl.float32)
    acc_low = tl.zeros([BLOCK], tl.float32)
    acc_high = tl.zeros([BLOCK], tl.float32)
    acc_dual = tl.zeros([BLOCK], tl.float32)
    acc_phi = tl.zeros([BLOCK], tl.float32)
    acc_cpl = tl.zeros([BLOCK], tl.float32)
    for off in range(0, span, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        valid = _valid(m_ptr, base, idx, span, PACKED)
        lp = _load(lp_ptr, base, idx, valid)
        od = _load(old_ptr, base, idx, valid)
        if ADV_TOKEN:
            a = _load(adv_ptr, base, idx, valid)
        else:
            a = a_seq
        rf = lp
        if HAS_REF:
            rf = _load(ref_ptr, base, idx, valid)
        smp = od
        if IS_MODE == 1 or IS_MODE == 2:
            smp = _load(smp_ptr, base, idx, valid)
        loss, direct, coupling, r, kl, low, high, dual, phi = _token_terms(
            lp, od, a, rf, smp, seq_log_ratio, off_policy_kl, seq_is_weight, vespo_log_w,
            clip_lo, clip_hi, eps_high, delta, clip_c, beta, is_min, is_max, opm_threshold,
            tau_pos, tau_neg, k_pos, k_neg, lam_pos, lam_neg,
            POLICY, LEVEL, KL, KL_ST, BIAS, HAS_REF, HAS_BETA, HAS_DELTA, DUAL, IS_MODE, OFF_POLICY)
        acc_loss += tl.where(valid, loss, 0.0)
        acc_n2 += tl.where(valid, 1.0, 0.0)
        acc_r += tl.where(valid, r, 0.0)
        acc_low += tl.where(valid, low, 0.0)
        acc_high += tl.where(valid, high, 0.0)
        acc_dual += tl.where(valid, dual, 0.0)
        if HAS_REF:
            acc_kl += tl.where(valid, kl, 0.0)
        if HAS_ENT:
            acc_ent += tl.where(valid, _load(ent_ptr, base, idx, valid), 0.0)
        if POLICY == 3 and ADV_TOKEN:
            acc_phi += tl.where(valid, phi, 0.0)
        if LEVEL == 1:
            acc_cpl += tl.where(valid, coupling, 0.0)

    row = stats_ptr + seq * NSTATS
    tl.store(row + _LOSS, tl.sum(acc_loss, 0))
    tl.store(row + _ENT, tl.sum(acc_ent, 0))
    tl.store(row + _COUNT, tl.sum(acc_n2, 0))
    tl.store(row + _KL, tl.sum(acc_kl, 0))
    tl.store(row + _RATIO, tl.sum(acc_r, 0))
    tl.store(row + _LOW, tl.sum(acc_low, 0))
    tl.store(row + _HIGH, tl.sum(acc_high, 0))
    tl.store(row + _DUAL, tl.sum(acc_dual, 0))
    if POLICY == 3 and not ADV_TOKEN:  # TRL's phi of the sequence (1 for an empty one)
        tl.store(row + _PHI, _vespo_phi(vespo_log_w, a_seq, k_pos, k_neg, lam_pos, lam_neg))
    else:
        tl.store(row + _PHI, tl.sum(acc_phi, 0))
    tl.store(row + _LOG_RATIO, seq_log_ratio)
    tl.store(row + _COUPLING, tl.sum(acc_cpl, 0))
    tl.store(row + _OFF_POLICY_KL, off_policy_kl)
    tl.store(row + _IS_WEIGHT, seq_is_weight)
    tl.store(row + _VESPO_LOG_W, vespo_log_w)
    for pad in tl.static_range(_USED, NSTATS):  # the padding columns
        tl.store(row + pad, 0.0)


@triton.jit
def grpo_loss_bwd_kernel(
    lp_ptr, old_ptr, adv_ptr, ref_ptr, smp_ptr, m_ptr, cu_ptr, stats_ptr, gs_ptr, ge_ptr, dlp_ptr, dent_ptr,
    total, length,
    clip_lo, clip_hi, eps_high, delta, clip_c, beta, is_min, is_max, opm_threshold,
    tau_pos, tau_neg, k_pos, k_neg, lam_pos, lam_neg,
    PACKED: tl.constexpr, ADV_TOKEN: tl.constexpr, POLICY: tl.constexpr, LEVEL: tl.constexpr,
    KL: tl.constexpr, KL_ST: tl.constexpr, BIAS: tl.constexpr, HAS_REF: tl.constexpr, HAS_BETA: tl.constexpr,
    HAS_DELTA: tl.constexpr, DUAL: tl.constexpr, IS_MODE: tl.constexpr, OFF_POLICY: tl.constexpr,
    HAS_ENT: tl.constexpr, SEQ_PASS: tl.constexpr, BLOCK: tl.constexpr,
):
    """d lp_t = gS[i] * direct_t (+ gS[i] * coupling_i * s_i / n_i at the sequence level) and
    d entropy_t = gE[i] over sequence i's span, 0 at its padding; in the outputs' dtypes."""
    seq = tl.program_id(0).to(tl.int64)
    base, span = _span(seq, cu_ptr, total, length, PACKED)
    row = stats_ptr + seq * NSTATS
    seq_log_ratio = tl.load(row + _LOG_RATIO)
    off_policy_kl = tl.load(row + _OFF_POLICY_KL)
    seq_is_weight = tl.load(row + _IS_WEIGHT)
    vespo_log_w = tl.load(row + _VESPO_LOG_W)
    g = tl.load(gs_ptr + seq).to(tl.float32)
    if LEVEL == 1:  # through s_i = exp(mean log ratio): d s_i / d lp_t = s_i / n_i
        n1 = tl.maximum(tl.load(row + _COUNT), 1.0)
        shared = g * tl.load(row + _COUPLING) * tl.exp(seq_log_ratio) / n1
    else:
        shared = 0.0
    if ADV_TOKEN:
        a_seq = 0.0
    else:
        a_seq = tl.load(adv_ptr + seq).to(tl.float32)
    if HAS_ENT:
        ge = tl.load(ge_ptr + seq).to(tl.float32)
    for off in range(0, span, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        valid = _valid(m_ptr, base, idx, span, PACKED)
        lp = _load(lp_ptr, base, idx, valid)
        od = _load(old_ptr, base, idx, valid)
        if ADV_TOKEN:
            a = _load(adv_ptr, base, idx, valid)
        else:
            a = a_seq
        rf = lp
        if HAS_REF:
            rf = _load(ref_ptr, base, idx, valid)
        smp = od
        if IS_MODE == 1 or IS_MODE == 2:
            smp = _load(smp_ptr, base, idx, valid)
        loss, direct, coupling, r, kl, low, high, dual, phi = _token_terms(
            lp, od, a, rf, smp, seq_log_ratio, off_policy_kl, seq_is_weight, vespo_log_w,
            clip_lo, clip_hi, eps_high, delta, clip_c, beta, is_min, is_max, opm_threshold,
            tau_pos, tau_neg, k_pos, k_neg, lam_pos, lam_neg,
            POLICY, LEVEL, KL, KL_ST, BIAS, HAS_REF, HAS_BETA, HAS_DELTA, DUAL, IS_MODE, OFF_POLICY)
        d = tl.where(valid, g * direct + shared, 0.0)
        inside = idx < span
        tl.store(dlp_ptr + base + idx, d.to(dlp_ptr.dtype.element_ty), mask=inside)
        if HAS_ENT:
            tl.store(dent_ptr + base + idx, tl.where(valid, ge, 0.0).to(dent_ptr.dtype.element_ty), mask=inside)
