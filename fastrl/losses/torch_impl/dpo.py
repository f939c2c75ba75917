"""The torch implementation of the pairwise DPO-family loss (:func:`fastrl.losses.dpo.dpo_loss`).

This is the ``torch`` backend of :func:`fastrl.losses.dpo.dpo_loss` (CPU tensors, or
``FASTRL_BACKEND=torch``) and what its Triton kernels are tested against; its backward is the
autograd of :func:`dpo_loss_stats` (taken with ``torch.func.vjp``), so the hand-derived gradients
of the kernels are checked against a derivative nobody wrote by hand. Formulas: ``docs/losses.md``
(pairwise table and modifiers); conventions: TRL 1.16 ``DPOTrainer._compute_loss`` and the CPO /
ORPO trainers (see :mod:`fastrl.losses.dpo` for which is which).

Notation: ``π_c, π_r`` summed completion log-probs of the policy, ``ρ_c, ρ_r`` of the reference,
``r = π − ρ``, ``F`` the f-divergence score of a log-ratio, ``h = F(r_c) − F(r_r)``,
``h̄ = F(r_c)/|y_c| − F(r_r)/|y_r|``, ``ls = log σ``, ``ε`` label smoothing, ``β`` (per pair with
dynamic β).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# DPO_STATS: what :func:`dpo_loss_stats` returns, in this order (one fp32 / fp64 vector, so that one launch
# of the finishing kernel writes everything on the GPU), the layout the kernels share.
from fastrl.kernels.dpo_columns import DPO_STATS  # noqa: F401 (re-exported: the layout this module returns)

__all__ = ["ALPHA_CLAMP", "DPO_STATS", "aot_delta", "aot_unpaired_delta", "compute_dtype", "dpo_loss_stats",
           "dpo_pair_losses", "f_score", "log1mexp", "smoothed_sigmoid_loss"]

# The types whose batch term is the mean token NLL of the chosen completions, Σ NLL_c / Σ |y_c|
# (TRL: DPO ``sft``, ``cpo_alpha`` × the CPO cross-entropy, ORPO's NLL); the coefficient of each.
_BATCH_NLL = ("sft", "cpo", "orpo")

# TRL clamps the alpha-divergence exponent (α − 1)·r from above before exp: 80 in fp32 / bf16.
ALPHA_CLAMP = 80.0


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype the loss computes in: fp64 when any input is fp64, else fp32 (bf16 / fp16 are widened).

    Args:
        *tensors: floating tensors of any shape (``[...]``), or None (skipped).

    Returns:
        ``torch.float64`` or ``torch.float32``.
    """
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def f_score(r: torch.Tensor, f_divergence: str, f_alpha: float) -> torch.Tensor:
    """The f′-score of a log-ratio ``r`` (f-DPO), TRL 1.16's constants kept.

    reverse_kl ``r``, forward_kl ``1 − e^{−r}``, js ``log 2 + ls(r)``, alpha ``(e^{(α−1)r} − 1)/(α−1)``
    with the exponent clamped at 80 and ``|α − 1| < 1e-6`` falling back to reverse_kl.

    Args:
        r: ``[B]`` (any shape) fp32 or fp64 log-ratios.
        f_divergence: reverse_kl, forward_kl, js or alpha.
        f_alpha: the α of alpha.

    Returns:
        The shape and dtype of ``r``.

    Raises:
        ValueError: an unknown ``f_divergence``.
    """
    if f_divergence == "reverse_kl":
        return r
    if f_divergence == "forward_kl":
        return 1 - torch.exp(-r)
    if f_divergence == "js":
        return math.log(2) + F.logsigmoid(r)
    if f_divergence == "alpha":
        if abs(f_alpha - 1.0) < 1e-6:
            return r
        t = torch.clamp((f_alpha - 1.0) * r, max=ALPHA_CLAMP)
        return (torch.exp(t) - 1.0) / (f_alpha - 1.0)
    raise ValueError(f"unknown f_divergence {f_divergence!r}")


def smoothed_sigmoid_loss(z: torch.Tensor, eps: float) -> torch.Tensor:
    """The conservative (cDPO) logistic loss ``−(1−ε)·ls(z) − ε·ls(−z)``.

    Args:
        z: ``[B]`` (any shape) fp32 or fp64.
        eps: ε, the label smoothing.

    Returns:
        The shape and dtype of ``z``.
    """
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − e^x)`` for ``x < 0``, branching at −log 2 (TRL ORPO's ``log1mexp``).

    Args:
        x: ``[B]`` (any shape) fp32 or fp64, negative.

    Returns:
        The shape and dtype of ``x``.
    """
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def aot_delta(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps) -> torch.Tensor:
    """AOT (paired): sort ``π_c − π_r`` and ``ρ_c − ρ_r`` over the batch; their difference.

    Args:
        chosen_logps: ``[B]`` floating, π_c.
        rejected_logps: ``[B]`` floating, π_r.
        ref_chosen_logps: ``[B]`` floating, ρ_c.
        ref_rejected_logps: ``[B]`` floating, ρ_r.

    Returns:
        ``[B]``, the promoted dtype of the inputs; differentiable through the sorts.
    """
    return torch.sort(chosen_logps - rejected_logps, dim=0).values - \
        torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0).values


def aot_unpaired_delta(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps) -> torch.Tensor:
    """AOT (unpaired): sort ``r_c`` and ``r_r`` separately over the batch; their difference.

    Args:
        chosen_logps: ``[B]`` floating, π_c.
        rejected_logps: ``[B]`` floating, π_r.
        ref_chosen_logps: ``[B]`` floating, ρ_c.
        ref_rejected_logps: ``[B]`` floating, ρ_r.

    Returns:
        ``[B]``, the promoted dtype of the inputs; differentiable through the sorts.
    """
    return torch.sort(chosen_logps - ref_chosen_logps, dim=0).values - \
        torch.sort(rejected_logps - ref_rejected_logps, dim=0).values


def dpo_pair_losses(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
                    loss_weights: dict[str, float], beta=0.1, label_smoothing=0.0, f_divergence="reverse_kl",
                    f_alpha=1.0, chosen_lengths=None, rejected_lengths=None, gamma_beta_ratio=0.5, rpo_alpha=None,
                    chosen_nll=None, soft_labels=None, discopop_tau=0.05, dpop_lambda=50.0, bco_delta=0.0,
                    aot_delta=None, aot_unpaired_delta=None) -> torch.Tensor:
    """The per-pair part of the loss (before pair weights): ``Σ_type weight · loss_type`` plus RPO's term.

    RPO's term is ``α·NLL_c/|y_c|``. The batch-level NLL of sft / cpo / orpo is not in it (see
    :func:`dpo_loss_stats`). Lengths are clamped to at least 1 where they divide; absent references
    count as 0. The options are those of :class:`fastrl.losses.DPOSettings`, already checked.

    Args:
        chosen_logps: ``[B]`` fp32 or fp64, π_c.
        rejected_logps: ``[B]`` fp32 or fp64, π_r.
        ref_chosen_logps: ``[B]`` fp32 or fp64, ρ_c, or None.
        ref_rejected_logps: ``[B]`` fp32 or fp64, ρ_r, or None.
        loss_weights: ``{loss type: weight}``.
        beta: a number or a per-pair ``[B]`` tensor (dynamic β).
        label_smoothing: ε.
        f_divergence: reverse_kl, forward_kl, js or alpha.
        f_alpha: the α of alpha.
        chosen_lengths: ``[B]`` integer or floating, |y_c|, or None.
        rejected_lengths: ``[B]`` integer or floating, |y_r|, or None.
        gamma_beta_ratio: SimPO's γ/β.
        rpo_alpha: RPO's α, or None.
        chosen_nll: ``[B]``, the summed chosen NLL (default ``−π_c``), or None.
        soft_labels: ``[B]``, SmPO's p̃, or None.
        discopop_tau: DiscoPOP's τ.
        dpop_lambda: DPO-Positive's λ.
        bco_delta: bco_pair's δ, a number or a 0-d tensor.
        aot_delta: ``[B]``, :func:`aot_delta`'s, for aot, or None.
        aot_unpaired_delta: ``[B]``, :func:`aot_unpaired_delta`'s, for aot_unpaired, or None.

    Returns:
        ``[B]`` in the dtype of ``chosen_logps``.

    Raises:
        ValueError: an unknown loss type.
    """
    pc, pr = chosen_logps, rejected_logps
    zero = torch.zeros((), dtype=pc.dtype, device=pc.device)
    qc = zero if ref_chosen_logps is None else ref_chosen_logps
    qr = zero if ref_rejected_logps is None else ref_rejected_logps
    lc = None if chosen_lengths is None else chosen_lengths.to(pc.dtype).clamp(min=1)
    lr = None if rejected_lengths is None else rejected_lengths.to(pc.dtype).clamp(min=1)
    nll = -pc if chosen_nll is None else chosen_nll
    s = 1.0 if soft_labels is None else 2 * soft_labels - 1  # SmPO: scales the margin
    eps = label_smoothing
    rc, rr = pc - qc, pr - qr
    fc, fr = f_score(rc, f_divergence, f_alpha), f_score(rr, f_divergence, f_alpha)
    h = fc - fr
    hbar = None if lc is None or lr is None else fc / lc - fr / lr
    a, b = beta * rc, beta * rr  # the implicit rewards

    total = torch.zeros_like(pc)
    for name, weight in loss_weights.items():
        if name == "sigmoid":  # DPO (Rafailov et al. 2023, Eq. 7); TRL 1.16 ignores ε here
            loss = -F.logsigmoid(beta * s * h)
        elif name == "cdpo":  # conservative DPO: the table's sigmoid row with ε > 0
            loss = smoothed_sigmoid_loss(beta * s * h, eps)
        elif name == "robust":  # rDPO (Chowdhury et al. 2024)
            z = beta * s * h
            loss = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        elif name == "hinge":  # SLiC / RSO
            loss = torch.relu(1 - beta * s * h)
        elif name == "ipo":  # IPO Eq. 17 on per-token average scores (TRL)
            loss = (hbar - 1 / (2 * beta)) ** 2
        elif name == "sigmoid_norm":
            loss = -F.logsigmoid(beta * s * hbar)
        elif name == "exo_pair":  # EXO-pref, Eq. 16 with K = 2
            z = beta * s * h
            loss = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + \
                torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))
        elif name == "nca_pair":
            loss = -F.logsigmoid(a) - 0.5 * F.logsigmoid(-a) - 0.5 * F.logsigmoid(-b)
        elif name == "bco_pair":
            loss = -F.logsigmoid(a - bco_delta) - F.logsigmoid(-(b - bco_delta))
        elif name == "sppo_hard":
            loss = (rc - 0.5 / beta) ** 2 + (rr + 0.5 / beta) ** 2
        elif name == "aot":
            loss = smoothed_sigmoid_loss(beta * aot_delta, eps)
        elif name == "aot_unpaired":
            loss = smoothed_sigmoid_loss(beta * aot_unpaired_delta, eps)
        elif name == "apo_zero":  # APO Eq. 7
            loss = 1 - torch.sigmoid(a) + torch.sigmoid(b)
        elif name == "apo_down":  # APO Eq. 8
            loss = torch.sigmoid(a) + 1 - torch.sigmoid(beta * (rc - rr))
        elif name == "discopop":  # DiscoPOP Eq. 5
            z = beta * s * h
            m = torch.sigmoid(z / discopop_tau)
            loss = (1 - m) * -F.logsigmoid(z) + m * torch.exp(-z)
        elif name == "sft":  # only the batch term
            loss = torch.zeros_like(pc)
        elif name == "simpo":  # SimPO Eq. 6 (TRL CPO loss_type="simpo": γ = ratio·β, ε kept)
            z = beta * (pc / lc - pr / lr) - gamma_beta_ratio * beta
            loss = smoothed_sigmoid_loss(z, eps)
        elif name == "orpo":  # ORPO Eqs. 4 and 7: λ = β times the odds-ratio term (+ batch NLL)
            xc, xr = pc / lc, pr / lr
            log_odds = (xc - xr) - (log1mexp(xc) - log1mexp(xr))
            loss = -beta * F.logsigmoid(log_odds)
        elif name == "cpo":  # CPO Eq. 3 (TRL CPO loss_type="sigmoid", ε kept; + batch NLL)
            loss = smoothed_sigmoid_loss(beta * (pc - pr), eps)
        elif name == "dpop":  # DPO-Positive (Smaug): penalty when π_c falls below ρ_c
            loss = -F.logsigmoid(beta * ((rc - rr) - dpop_lambda * torch.relu(qc - pc)))
        else:
            raise ValueError(f"unknown loss type {name!r}")
        total = total + weight * loss
    if rpo_alpha is not None:  # RPO: α · mean token NLL of the chosen completion, per pair
        total = total + rpo_alpha * nll / lc
    return total


def dpo_loss_stats(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
                   loss_weights: dict[str, float], beta=0.1, pair_beta=None, pair_weights=None, cpo_alpha=1.0,
                   norm_rewards=False, **kwargs) -> torch.Tensor:
    """The loss and its metrics, one vector laid out as :data:`DPO_STATS` (:mod:`fastrl.kernels.dpo_columns`).

    ``loss = mean_i(w_i · P_i) + c · mean_i(w_i) · Σ_i NLL_c,i / Σ_i |y_c,i|`` where ``P`` is
    :func:`dpo_pair_losses`, ``w`` the pair weights (WPO; 1 without), and
    ``c = weight_sft + weight_cpo·cpo_alpha + weight_orpo`` (0 when none of them is used; then the
    NLL term is left out, lengths or not). Rewards are ``β·r`` (``β·π/|y|`` with ``norm_rewards``,
    the SimPO / ORPO convention), accuracies count ``reward_c > reward_r``.

    Args:
        chosen_logps: ``[B]`` fp32, bf16, fp16 or fp64, π_c.
        rejected_logps: ``[B]`` floating, π_r.
        ref_chosen_logps: ``[B]`` floating, ρ_c, or None.
        ref_rejected_logps: ``[B]`` floating, ρ_r, or None.
        loss_weights: ``{loss type: weight}``.
        beta: β, a number.
        pair_beta: ``[B]`` floating dynamic β, or None.
        pair_weights: ``[B]`` floating WPO weights, or None.
        cpo_alpha: CPO's NLL weight.
        norm_rewards: report rewards as ``β·π/|y|``.
        **kwargs: the other keywords of :func:`dpo_pair_losses`.

    Returns:
        ``[len(DPO_STATS)]`` fp32 (fp64 for fp64 inputs), element 0 the loss (differentiable), the
        metrics detached.
    """
    dtype = compute_dtype(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                          kwargs.get("chosen_nll"), pair_beta, pair_weights)

    def cast(t):
        return None if t is None else t.to(dtype)

    pc, pr = cast(chosen_logps), cast(rejected_logps)
    qc, qr = cast(ref_chosen_logps), cast(ref_rejected_logps)
    kwargs = {k: cast(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    b = beta if pair_beta is None else cast(pair_beta)
    per_pair = dpo_pair_losses(pc, pr, qc, qr, loss_weights=loss_weights, beta=b, **kwargs)
    n = pc.shape[0]
    w = torch.ones_like(pc) if pair_weights is None else cast(pair_weights)
    loss = (w * per_pair).sum() / n

    lc = kwargs.get("chosen_lengths")
    nll = -pc if kwargs.get("chosen_nll") is None else kwargs["chosen_nll"]
    coefficient = sum(loss_weights.get(name, 0.0) * (cpo_alpha if name == "cpo" else 1.0) for name in _BATCH_NLL)
    if lc is not None:
        tokens = lc.to(dtype).sum()
        nll_mean = torch.where(tokens > 0, nll.sum() / tokens.clamp(min=1e-30), torch.zeros_like(tokens))
    else:
        tokens = torch.zeros((), dtype=dtype, device=pc.device)
        nll_mean = tokens
    if coefficient != 0.0:
        loss = loss + coefficient * (w.sum() / n) * nll_mean

    with torch.no_grad():
        zero = torch.zeros((), dtype=dtype, device=pc.device)
        rc = pc - (zero if qc is None else qc)
        rr = pr - (zero if qr is None else qr)
        if norm_rewards:
            rc = rc / kwargs["chosen_lengths"].to(dtype).clamp(min=1)
            rr = rr / kwargs["rejected_lengths"].to(dtype).clamp(min=1)
        chosen_rewards, rejected_rewards = b * rc, b * rr
        metrics = [nll_mean, w.mean(), chosen_rewards.mean(), rejected_rewards.mean(),
                   (chosen_rewards - rejected_rewards).mean(), (chosen_rewards > rejected_rewards).to(dtype).mean(),
                   pc.mean(), pr.mean(), tokens]
    return torch.stack([loss, *[m.detach().to(dtype) for m in metrics]])
