"""Pairwise DPO-family losses (``fastrl.losses.dpo_loss``): per-pair maths, forward and backward.

Three kernels. ``dpo_loss_fwd_kernel`` runs one program per ``BLOCK`` pairs: it computes each pair's
loss and writes the block's partial sums (``NSTAT`` numbers: the weighted loss, Σ NLL_c, Σ |y_c|,
Σ weights, Σ rewards, Σ accuracies, Σ log-probs). ``dpo_loss_finish_kernel`` (one program) adds
the partials in a fixed order, so the result is deterministic, and writes the loss and the metrics
(layout of :data:`fastrl.kernels.dpo_columns.DPO_STATS`). ``dpo_loss_bwd_kernel``, one program per block,
writes d loss / d (π_c, π_r, NLL_c, Δ_aot, Δ_aot_unpaired), reading the upstream gradient and the
batch sums from device memory (no host sync).

The loss types present are the bits of the constexpr ``TYPES`` (bit k =
:data:`fastrl.kernels.dpo_columns.LOSS_TYPES` [k]), so each specialisation compiles only the branches it uses:

  0 sigmoid   1 cdpo      2 robust    3 hinge     4 ipo        5 sigmoid_norm  6 exo_pair
  7 nca_pair  8 bco_pair  9 sppo_hard 10 aot      11 aot_unpaired 12 apo_zero  13 apo_down
  14 discopop 15 sft      16 simpo    17 orpo     18 cpo       19 dpop

``_pair_loss`` holds the maths of every type once, with its derivative beside it; forward and
backward both call it (the forward's unused derivatives are dead code the compiler drops).
All arithmetic is fp32; inputs are read in their own dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import dpo_columns as columns

NSTAT = columns.NSTAT  # partial sums per block (columns.PARTIALS)
# The partial-sum columns and the stats-vector elements, as constexprs the kernels index with.
_P_LOSS = tl.constexpr(columns.PARTIALS.index("weighted_loss"))
_P_NLL = tl.constexpr(columns.PARTIALS.index("nll"))
_P_TOKENS = tl.constexpr(columns.PARTIALS.index("chosen_tokens"))
_P_W = tl.constexpr(columns.PARTIALS.index("weight"))
_P_RC = tl.constexpr(columns.PARTIALS.index("reward_chosen"))
_P_RR = tl.constexpr(columns.PARTIALS.index("reward_rejected"))
_P_ACC = tl.constexpr(columns.PARTIALS.index("accuracy"))
_P_PC = tl.constexpr(columns.PARTIALS.index("logps_chosen"))
_P_PR = tl.constexpr(columns.PARTIALS.index("logps_rejected"))
_S_LOSS = tl.constexpr(columns.STAT["loss"])
_S_NLL = tl.constexpr(columns.STAT["nll_loss"])
_S_W_MEAN = tl.constexpr(columns.STAT["weight_mean"])
_S_RC = tl.constexpr(columns.STAT["rewards/chosen"])
_S_RR = tl.constexpr(columns.STAT["rewards/rejected"])
_S_MARGIN = tl.constexpr(columns.STAT["rewards/margins"])
_S_ACC = tl.constexpr(columns.STAT["rewards/accuracies"])
_S_PC = tl.constexpr(columns.STAT["logps/chosen"])
_S_PR = tl.constexpr(columns.STAT["logps/rejected"])
_S_TOKENS = tl.constexpr(columns.STAT["chosen_tokens"])
# The rows of the backward's dx [5, B].
_G_PC = tl.constexpr(columns.GRAD_ROWS.index("pc"))
_G_PR = tl.constexpr(columns.GRAD_ROWS.index("pr"))
_G_NLL = tl.constexpr(columns.GRAD_ROWS.index("nll"))
_G_D1 = tl.constexpr(columns.GRAD_ROWS.index("d1"))
_G_D2 = tl.constexpr(columns.GRAD_ROWS.index("d2"))


@triton.jit
def _log1p(x):
    """log(1 + x), accurate for small |x| (Kahan's trick)."""
    u = 1.0 + x
    d = tl.where(u == 1.0, 1.0, u - 1.0)
    return tl.where(u == 1.0, x, tl.log(u) * (x / d))


@triton.jit
def _expm1(x):
    """e^x − 1, accurate for small |x| (Kahan's trick); −1 once e^x underflows."""
    u = tl.exp(x)
    lu = tl.log(u)
    ok = (u != 1.0) & (u != 0.0)
    return tl.where(u == 1.0, x, tl.where(u == 0.0, -1.0, (u - 1.0) * (x / tl.where(ok, lu, 1.0))))


@triton.jit
def _logsigmoid(x):
    return tl.minimum(x, 0.0) - _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _log1mexp(x):
    """log(1 − e^x) for x < 0, branching at −log 2."""
    return tl.where(x < -0.6931471805599453, _log1p(-tl.exp(x)), tl.log(-_expm1(x)))


@triton.jit
def _f_score(r, f_alpha, F_DIV: tl.constexpr):
    """The f-divergence score of a log-ratio and its derivative: 0 reverse_kl, 1 forward_kl, 2 js,
    3 alpha (exponent clamped at 80 as TRL; F_DIV = 0 also stands for alpha with α = 1)."""
    if F_DIV == 1:
        e = tl.exp(-r)
        score = 1.0 - e
        slope = e
    elif F_DIV == 2:
        score = 0.6931471805599453 + _logsigmoid(r)
        slope = _sigmoid(-r)
    elif F_DIV == 3:
        t = (f_alpha - 1.0) * r
        e = tl.exp(tl.minimum(t, 80.0))
        score = (e - 1.0) / (f_alpha - 1.0)
        slope = tl.where(t <= 80.0, e, 0.0)
    else:
        score = r
        slope = tl.full(r.shape, 1.0, tl.float32)
    return score, slope


@triton.jit
def _smoothed(z, eps):
    """cDPO logistic loss −(1−ε)·ls(z) − ε·ls(−z) and its derivative in z."""
    loss = -(1.0 - eps) * _logsigmoid(z) - eps * _logsigmoid(-z)
    grad = -(1.0 - eps) * _sigmoid(-z) + eps * _sigmoid(z)
    return loss, grad


@triton.jit
def _pair_loss(pc, pr, qc, qr, lc, lr, nll, beta, s, d1, d2, delta, tw_ptr,
               eps, f_alpha, gamma_ratio, tau, rpo_alpha, dpop_lambda,
               TYPES: tl.constexpr, F_DIV: tl.constexpr, HAS_RPO: tl.constexpr):
    """Per pair: the loss P = Σ_type weight·loss_type (+ RPO) and dP / d(π_c, π_r, NLL_c, Δ1, Δ2).

    ``lc``, ``lr`` are lengths clamped to ≥ 1, ``s = 2p̃ − 1`` the soft-label factor, ``d1`` / ``d2``
    the sorted AOT differences, ``delta`` BCO's reward baseline."""
    rc = pc - qc
    rr = pr - qr
    fc, dfc = _f_score(rc, f_alpha, F_DIV)
    fr, dfr = _f_score(rr, f_alpha, F_DIV)
    h = fc - fr
    hbar = fc / lc - fr / lr
    a = beta * rc
    b = beta * rr
    zero = tl.zeros(pc.shape, tl.float32)
    loss = zero
    g_h = zero  # dP/dh, h = F(r_c) − F(r_r)
    g_hbar = zero  # dP/dh̄
    g_rc = zero  # dP/dr_c and dP/dr_r through the raw log-ratios
    g_rr = zero
    g_pc = zero  # dP/dπ_c, dP/dπ_r through terms on the log-probs themselves
    g_pr = zero
    g_nll = zero
    g_d1 = zero
    g_d2 = zero
    bs = beta * s
    if (TYPES >> 0) & 1:  # sigmoid
        w = tl.load(tw_ptr + 0)
        z = bs * h
        loss += w * -_logsigmoid(z)
        g_h += w * -_sigmoid(-z) * bs
    if (TYPES >> 1) & 1:  # cdpo
        w = tl.load(tw_ptr + 1)
        sl, sg = _smoothed(bs * h, eps)
        loss += w * sl
        g_h += w * sg * bs
    if (TYPES >> 2) & 1:  # robust
        w = tl.load(tw_ptr + 2)
        z = bs * h
        inv = 1.0 / (1.0 - 2.0 * eps)
        loss += w * (-(1.0 - eps) * _logsigmoid(z) + eps * _logsigmoid(-z)) * inv
        g_h += w * (-(1.0 - eps) * _sigmoid(-z) - eps * _sigmoid(z)) * inv * bs
    if (TYPES >> 3) & 1:  # hinge
        w = tl.load(tw_ptr + 3)
        z = bs * h
        loss += w * tl.maximum(1.0 - z, 0.0)
        g_h += w * tl.where(z < 1.0, -bs, 0.0)
    if (TYPES >> 4) & 1:  # ipo
        w = tl.load(tw_ptr + 4)
        e = hbar - 0.5 / beta
        loss += w * e * e
        g_hbar += w * 2.0 * e
    if (TYPES >> 5) & 1:  # sigmoid_norm
        w = tl.load(tw_ptr + 5)
        z = bs * hbar
        loss += w * -_logsigmoid(z)
        g_hbar += w * -_sigmoid(-z) * bs
    if (TYPES >> 6) & 1:  # exo_pair
        w = tl.load(tw_ptr + 6)
        z = bs * h
        sp = _sigmoid(z)
        sn = _sigmoid(-z)
        log_1me = _log1p(-eps)
        log_e = tl.log(eps)
        loss += w * (sp * (_logsigmoid(z) - log_1me) + sn * (_logsigmoid(-z) - log_e))
        g_h += w * sp * sn * (z - log_1me + log_e) * bs
    if (TYPES >> 7) & 1:  # nca_pair
        w = tl.load(tw_ptr + 7)
        loss += w * (-_logsigmoid(a) - 0.5 * _logsigmoid(-a) - 0.5 * _logsigmoid(-b))
        g_rc += w * (-_sigmoid(-a) + 0.5 * _sigmoid(a)) * beta
        g_rr += w * 0.5 * _sigmoid(b) * beta
    if (TYPES >> 8) & 1:  # bco_pair
        w = tl.load(tw_ptr + 8)
        ua = a - delta
        ub = b - delta
        loss += w * (-_logsigmoid(ua) - _logsigmoid(-ub))
        g_rc += w * -_sigmoid(-ua) * beta
        g_rr += w * _sigmoid(ub) * beta
    if (TYPES >> 9) & 1:  # sppo_hard
        w = tl.load(tw_ptr + 9)
        ec = rc - 0.5 / beta
        er = rr + 0.5 / beta
        loss += w * (ec * ec + er * er)
        g_rc += w * 2.0 * ec
        g_rr += w * 2.0 * er
    if (TYPES >> 10) & 1:  # aot
        w = tl.load(tw_ptr + 10)
        sl, sg = _smoothed(beta * d1, eps)
        loss += w * sl
        g_d1 += w * sg * beta
    if (TYPES >> 11) & 1:  # aot_unpaired
        w = tl.load(tw_ptr + 11)
        sl, sg = _smoothed(beta * d2, eps)
        loss += w * sl
        g_d2 += w * sg * beta
    if (TYPES >> 12) & 1:  # apo_zero
        w = tl.load(tw_ptr + 12)
        sa = _sigmoid(a)
        sb = _sigmoid(b)
        loss += w * (1.0 - sa + sb)
        g_rc += w * -sa * (1.0 - sa) * beta
        g_rr += w * sb * (1.0 - sb) * beta
    if (TYPES >> 13) & 1:  # apo_down
        w = tl.load(tw_ptr + 13)
        sa = _sigmoid(a)
        sz = _sigmoid(a - b)
        loss += w * (sa + 1.0 - sz)
        g_rc += w * (sa * (1.0 - sa) - sz * (1.0 - sz)) * beta
        g_rr += w * sz * (1.0 - sz) * beta
    if (TYPES >> 14) & 1:  # discopop
        w = tl.load(tw_ptr + 14)
        z = bs * h
        m = _sigmoid(z / tau)
        ez = tl.exp(-z)
        nls = -_logsigmoid(z)
        loss += w * ((1.0 - m) * nls + m * ez)
        dm = m * (1.0 - m) / tau
        g_h += w * (dm * (ez - nls) - (1.0 - m) * _sigmoid(-z) - m * ez) * bs
    # bit 15, sft: only the batch NLL term (added by the caller)
    if (TYPES >> 16) & 1:  # simpo
        w = tl.load(tw_ptr + 16)
        sl, sg = _smoothed(beta * (pc / lc - pr / lr) - gamma_ratio * beta, eps)
        loss += w * sl
        g_pc += w * sg * beta / lc
        g_pr -= w * sg * beta / lr
    if (TYPES >> 17) & 1:  # orpo
        w = tl.load(tw_ptr + 17)
        xc = pc / lc
        xr = pr / lr
        log_odds = (xc - xr) - (_log1mexp(xc) - _log1mexp(xr))
        loss += w * -beta * _logsigmoid(log_odds)
        g = w * -beta * _sigmoid(-log_odds)
        # d log-odds / dx = 1 / (1 − e^x) = −1 / expm1(x)
        g_pc += g * (-1.0 / _expm1(xc)) / lc
        g_pr -= g * (-1.0 / _expm1(xr)) / lr
    if (TYPES >> 18) & 1:  # cpo
        w = tl.load(tw_ptr + 18)
        sl, sg = _smoothed(beta * (pc - pr), eps)
        loss += w * sl
        g_pc += w * sg * beta
        g_pr -= w * sg * beta
    if (TYPES >> 19) & 1:  # dpop
        w = tl.load(tw_ptr + 19)
        below = qc > pc
        z = beta * ((rc - rr) - dpop_lambda * tl.maximum(qc - pc, 0.0))
        gz = w * -_sigmoid(-z) * beta
        loss += w * -_logsigmoid(z)
        g_rc += gz
        g_rr -= gz
        g_pc += tl.where(below, gz * dpop_lambda, 0.0)
    if HAS_RPO:
        loss += rpo_alpha * nll / lc
        g_nll += rpo_alpha / lc
    d_pc = g_h * dfc + g_hbar * dfc / lc + g_rc + g_pc
    d_pr = -g_h * dfr - g_hbar * dfr / lr + g_rr + g_pr
    return loss, d_pc, d_pr, g_nll, g_d1, g_d2


@triton.jit
def _load_pairs(idx, inside, pc_ptr, pr_ptr, qc_ptr, qr_ptr, lc_ptr, lr_ptr, nll_ptr, beta_ptr, soft_ptr, w_ptr,
                d1_ptr, d2_ptr, beta0,
                HAS_REF: tl.constexpr, HAS_LC: tl.constexpr, HAS_LR: tl.constexpr, HAS_NLL: tl.constexpr,
                HAS_BETA: tl.constexpr, HAS_SOFT: tl.constexpr, HAS_W: tl.constexpr, HAS_D1: tl.constexpr,
                HAS_D2: tl.constexpr):
    """One block of pairs, fp32, with harmless values past the end (log-probs −1, lengths 1,
    weights 0) so that no lane outside the batch makes a NaN."""
    pc = tl.load(pc_ptr + idx, mask=inside, other=-1.0).to(tl.float32)
    pr = tl.load(pr_ptr + idx, mask=inside, other=-1.0).to(tl.float32)
    if HAS_REF:
        qc = tl.load(qc_ptr + idx, mask=inside, other=-1.0).to(tl.float32)
        qr = tl.load(qr_ptr + idx, mask=inside, other=-1.0).to(tl.float32)
    else:
        qc = tl.zeros(pc.shape, tl.float32)
        qr = tl.zeros(pc.shape, tl.float32)
    if HAS_LC:
        lc_raw = tl.load(lc_ptr + idx, mask=inside, other=0).to(tl.float32)
    else:
        lc_raw = tl.zeros(pc.shape, tl.float32)
    if HAS_LR:
        lr_raw = tl.load(lr_ptr + idx, mask=inside, other=0).to(tl.float32)
    else:
        lr_raw = tl.zeros(pc.shape, tl.float32)
    if HAS_NLL:
        nll = tl.load(nll_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    else:
        nll = -pc
    if HAS_BETA:
        beta = tl.load(beta_ptr + idx, mask=inside, other=1.0).to(tl.float32)
    else:
        beta = tl.full(pc.shape, beta0, tl.float32)
    if HAS_SOFT:
        s = 2.0 * tl.load(soft_ptr + idx, mask=inside, other=1.0).to(tl.float32) - 1.0
    else:
        s = tl.full(pc.shape, 1.0, tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    else:
        w = tl.where(inside, 1.0, 0.0)
    if HAS_D1:
        d1 = tl.load(d1_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    else:
        d1 = tl.zeros(pc.shape, tl.float32)
    if HAS_D2:
        d2 = tl.load(d2_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    else:
        d2 = tl.zeros(pc.shape, tl.float32)
    return pc, pr, qc, qr, lc_raw, lr_raw, nll, beta, s, w, d1, d2


@triton.jit
def dpo_loss_fwd_kernel(
    pc_ptr, pr_ptr, qc_ptr, qr_ptr, lc_ptr, lr_ptr, nll_ptr, beta_ptr, soft_ptr, w_ptr, d1_ptr, d2_ptr,
    delta_ptr, tw_ptr, part_ptr,
    n, beta0, eps, f_alpha, gamma_ratio, tau, rpo_alpha, dpop_lambda,
    TYPES: tl.constexpr, F_DIV: tl.constexpr, HAS_REF: tl.constexpr, HAS_LC: tl.constexpr, HAS_LR: tl.constexpr,
    HAS_NLL: tl.constexpr, HAS_BETA: tl.constexpr, HAS_SOFT: tl.constexpr, HAS_W: tl.constexpr,
    HAS_D1: tl.constexpr, HAS_D2: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_RPO: tl.constexpr,
    NORM_REWARDS: tl.constexpr, NSTAT: tl.constexpr, BLOCK: tl.constexpr,
):
    """Partial sums of one block of pairs into ``part[pid, :NSTAT]``."""
    pid = tl.program_id(0)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    pc, pr, qc, qr, lc_raw, lr_raw, nll, beta, s, w, d1, d2 = _load_pairs(
        idx, inside, pc_ptr, pr_ptr, qc_ptr, qr_ptr, lc_ptr, lr_ptr, nll_ptr, beta_ptr, soft_ptr, w_ptr,
        d1_ptr, d2_ptr, beta0, HAS_REF, HAS_LC, HAS_LR, HAS_NLL, HAS_BETA, HAS_SOFT, HAS_W, HAS_D1, HAS_D2)
    delta = tl.load(delta_ptr).to(tl.float32) if HAS_DELTA else 0.0
    lc = tl.maximum(lc_raw, 1.0)
    lr = tl.maximum(lr_raw, 1.0)
    loss, _, _, _, _, _ = _pair_loss(pc, pr, qc, qr, lc, lr, nll, beta, s, d1, d2, delta, tw_ptr, eps, f_alpha,
                                     gamma_ratio, tau, rpo_alpha, dpop_lambda, TYPES, F_DIV, HAS_RPO)
    rc = pc - qc
    rr = pr - qr
    if NORM_REWARDS:  # rounded as torch rounds them: the accuracy metric compares ra with rb exactly
        rc = tl.div_rn(rc, lc)
        rr = tl.div_rn(rr, lr)
    ra = beta * rc
    rb = beta * rr
    out = part_ptr + pid * NSTAT
    tl.store(out + _P_LOSS, tl.sum(tl.where(inside, w * loss, 0.0), 0))
    tl.store(out + _P_NLL, tl.sum(tl.where(inside, nll, 0.0), 0))
    tl.store(out + _P_TOKENS, tl.sum(tl.where(inside, lc_raw, 0.0), 0))
    tl.store(out + _P_W, tl.sum(tl.where(inside, w, 0.0), 0))
    tl.store(out + _P_RC, tl.sum(tl.where(inside, ra, 0.0), 0))
    tl.store(out + _P_RR, tl.sum(tl.where(inside, rb, 0.0), 0))
    tl.store(out + _P_ACC, tl.sum(tl.where(inside & (ra > rb), 1.0, 0.0), 0))
    tl.store(out + _P_PC, tl.sum(tl.where(inside, pc, 0.0), 0))
    tl.store(out + _P_PR, tl.sum(tl.where(inside, pr, 0.0), 0))


@triton.jit
def dpo_loss_finish_kernel(part_ptr, out_ptr, n_blocks, n, nll_coef, BATCH_NLL: tl.constexpr, NSTAT: tl.constexpr,
                           NSTAT_PAD: tl.constexpr, RBLOCK: tl.constexpr):
    """One program: add the per-block partials in order, write the loss and the metrics.

    ``out`` is laid out as :data:`fastrl.kernels.dpo_columns.DPO_STATS`: loss, Σ NLL/Σ|y_c|, mean w, reward_c,
    reward_r, margin, accuracy, π_c, π_r, Σ|y_c|."""
    cols = tl.arange(0, NSTAT_PAD)
    acc = tl.zeros([RBLOCK, NSTAT_PAD], dtype=tl.float32)
    for start in range(0, n_blocks, RBLOCK):
        rows = start + tl.arange(0, RBLOCK)
        m = (rows[:, None] < n_blocks) & (cols[None, :] < NSTAT)
        acc += tl.load(part_ptr + rows[:, None] * NSTAT + cols[None, :], mask=m, other=0.0)
    tot = tl.sum(acc, 0)
    wl = tl.sum(tl.where(cols == _P_LOSS, tot, 0.0), 0)
    nll = tl.sum(tl.where(cols == _P_NLL, tot, 0.0), 0)
    tokens = tl.sum(tl.where(cols == _P_TOKENS, tot, 0.0), 0)
    wsum = tl.sum(tl.where(cols == _P_W, tot, 0.0), 0)
    ra = tl.sum(tl.where(cols == _P_RC, tot, 0.0), 0)
    rb = tl.sum(tl.where(cols == _P_RR, tot, 0.0), 0)
    accs = tl.sum(tl.where(cols == _P_ACC, tot, 0.0), 0)
    pcs = tl.sum(tl.where(cols == _P_PC, tot, 0.0), 0)
    prs = tl.sum(tl.where(cols == _P_PR, tot, 0.0), 0)
    nf = n * 1.0
    nll_mean = tl.where(tokens > 0, nll / tl.where(tokens > 0, tokens, 1.0), 0.0)
    loss = wl / nf
    if BATCH_NLL:
        loss += nll_coef * (wsum / nf) * nll_mean
    dt = out_ptr.dtype.element_ty
    tl.store(out_ptr + _S_LOSS, loss.to(dt))
    tl.store(out_ptr + _S_NLL, nll_mean.to(dt))
    tl.store(out_ptr + _S_W_MEAN, (wsum / nf).to(dt))
    tl.store(out_ptr + _S_RC, (ra / nf).to(dt))
    tl.store(out_ptr + _S_RR, (rb / nf).to(dt))
    tl.store(out_ptr + _S_MARGIN, ((ra - rb) / nf).to(dt))
    tl.store(out_ptr + _S_ACC, (accs / nf).to(dt))
    tl.store(out_ptr + _S_PC, (pcs / nf).to(dt))
    tl.store(out_ptr + _S_PR, (prs / nf).to(dt))
    tl.store(out_ptr + _S_TOKENS, tokens.to(dt))


@triton.jit
def dpo_loss_bwd_kernel(
    grad_ptr, stats_ptr, pc_ptr, pr_ptr, qc_ptr, qr_ptr, lc_ptr, lr_ptr, nll_ptr, beta_ptr, soft_ptr, w_ptr,
    d1_ptr, d2_ptr, delta_ptr, tw_ptr, dx_ptr,
    n, beta0, eps, f_alpha, gamma_ratio, tau, rpo_alpha, dpop_lambda, nll_coef,
    TYPES: tl.constexpr, F_DIV: tl.constexpr, HAS_REF: tl.constexpr, HAS_LC: tl.constexpr, HAS_LR: tl.constexpr,
    HAS_NLL: tl.constexpr, HAS_BETA: tl.constexpr, HAS_SOFT: tl.constexpr, HAS_W: tl.constexpr,
    HAS_D1: tl.constexpr, HAS_D2: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_RPO: tl.constexpr,
    BATCH_NLL: tl.constexpr, BLOCK: tl.constexpr,
):
    """``dx[k, i]`` = d loss / d input k of pair i, rows :data:`fastrl.kernels.dpo_columns.GRAD_ROWS`: π_c, π_r,
    NLL_c, Δ_aot, Δ_aot_unpaired (the last three written only when that input exists), times the upstream
    gradient ``grad[0]``.

    ``loss = Σ_i w_i P_i / B + c · (Σ w / B) · Σ NLL / Σ |y_c|``: the batch term's share of each
    pair's NLL gradient is ``c · mean(w) / Σ |y_c|`` (both read from ``stats``: its weight_mean and
    chosen_tokens elements)."""
    pid = tl.program_id(0)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    pc, pr, qc, qr, lc_raw, lr_raw, nll, beta, s, w, d1, d2 = _load_pairs(
        idx, inside, pc_ptr, pr_ptr, qc_ptr, qr_ptr, lc_ptr, lr_ptr, nll_ptr, beta_ptr, soft_ptr, w_ptr,
        d1_ptr, d2_ptr, beta0, HAS_REF, HAS_LC, HAS_LR, HAS_NLL, HAS_BETA, HAS_SOFT, HAS_W, HAS_D1, HAS_D2)
    delta = tl.load(delta_ptr).to(tl.float32) if HAS_DELTA else 0.0
    lc = tl.maximum(lc_raw, 1.0)
    lr = tl.maximum(lr_raw, 1.0)
    _, d_pc, d_pr, d_nll, d_d1, d_d2 = _pair_loss(pc, pr, qc, qr, lc, lr, nll, beta, s, d1, d2, delta, tw_ptr, eps,
                                                  f_alpha, gamma_ratio, tau, rpo_alpha, dpop_lambda, TYPES, F_DIV,
                                                  HAS_RPO)
    g = tl.load(grad_ptr).to(tl.float32)
    scale = g * w / (n * 1.0)
    d_nll = d_nll * scale
    if BATCH_NLL:
        tokens = tl.load(stats_ptr + _S_TOKENS).to(tl.float32)
        w_mean = tl.load(stats_ptr + _S_W_MEAN).to(tl.float32)
        d_nll += tl.where(tokens > 0, g * nll_coef * w_mean / tl.where(tokens > 0, tokens, 1.0), 0.0)
    d_pc = d_pc * scale
    if not HAS_NLL:  # NLL_c = −π_c
        d_pc -= d_nll
    dt = dx_ptr.dtype.element_ty
    tl.store(dx_ptr + _G_PC * n + idx, d_pc.to(dt), mask=inside)
    tl.store(dx_ptr + _G_PR * n + idx, (d_pr * scale).to(dt), mask=inside)
    if HAS_NLL:
        tl.store(dx_ptr + _G_NLL * n + idx, d_nll.to(dt), mask=inside)
    if HAS_D1:
        tl.store(dx_ptr + _G_D1 * n + idx, (d_d1 * scale).to(dt), mask=inside)
    if HAS_D2:
        tl.store(dx_ptr + _G_D2 * n + idx, (d_d2 * scale).to(dt), mask=inside)
