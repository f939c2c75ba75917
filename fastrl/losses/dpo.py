"""Pairwise DPO-family losses on per-sequence log-probs: one fused op, every type and modifier.

>>> import torch
>>> from fastrl.losses.dpo import dpo_loss
>>> loss, metrics = dpo_loss(torch.tensor([-10.0, -12.0]), torch.tensor([-14.0, -11.0]),
...                          torch.tensor([-11.0, -12.0]), torch.tensor([-13.0, -12.0]), beta=0.5)
>>> round(loss.item(), 4), metrics["rewards/accuracies"].item()
(0.6437, 0.5)

Inputs are the summed completion log-probs ``[B]`` of the chosen and rejected completion of each
pair (``fastrl.ops.sequence_logps``; LD-DPO is its ``ld_alpha``), under the policy and, for the
types that need one, the reference. Formulas: ``shared/LOSSES.md``. On CUDA the per-pair maths
runs in Triton (:mod:`fastrl.kernels.dpo_loss`): one launch of a kernel with one program per block
of pairs that writes per-block partial sums, then a one-program launch that adds them in a fixed
order and writes the loss and the metrics; backward is one launch. The loss types are a constexpr
bit mask, so a specialisation holds only the maths it uses. On CPU (or ``FASTRL_BACKEND=torch``)
the torch reference :mod:`fastrl.losses.torch_impl.dpo` runs, and its autograd is the backward.
AOT's batch sorts run in torch before the kernel (``torch.sort``, differentiable).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import torch
from torch import nn

from fastrl import _checks
from fastrl.losses.torch_impl import dpo as torch_dpo
from fastrl.ops.dispatch import resolve

__all__ = ["DPOLoss", "LOSS_TYPES", "dpo_loss", "dynamic_beta", "wpo_weights"]

# Bit k of the kernels' TYPES mask is LOSS_TYPES[k]; keep the order.
LOSS_TYPES = ("sigmoid", "cdpo", "robust", "hinge", "ipo", "sigmoid_norm", "exo_pair", "nca_pair", "bco_pair",
              "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "simpo", "orpo", "cpo",
              "dpop")
REFERENCE_FREE = frozenset({"sft", "simpo", "orpo", "cpo"})
NEEDS_BOTH_LENGTHS = frozenset({"ipo", "sigmoid_norm", "simpo", "orpo"})
# TRL 1.16 accepts a non-default f-divergence only for the types built on the reward difference,
# where the f-DPO partition term cancels; sft is unaffected by it.
F_DIVERGENCE_TYPES = frozenset({"sigmoid", "cdpo", "robust", "hinge", "ipo", "sigmoid_norm", "exo_pair",
                                "discopop", "sft"})
# Soft labels (SmPO) scale the margin h; they mean something only where the loss is a function of βh.
SOFT_LABEL_TYPES = frozenset({"sigmoid", "cdpo", "robust", "hinge", "sigmoid_norm", "exo_pair", "discopop", "sft"})
SORTED_TYPES = frozenset({"aot", "aot_unpaired"})  # sort over the batch: pairs lose their identity
F_DIVERGENCES = {"reverse_kl": 0, "forward_kl": 1, "js": 2, "js_divergence": 2, "alpha": 3, "alpha_divergence": 3}
_F_NAMES = ("reverse_kl", "forward_kl", "js", "alpha")

# Pairs per program: 2 per thread at 4 warps, so that even every type at once compiles without
# register spills (tests lower it to exercise several blocks).
_MAX_BLOCK = 256
_NSTAT_PAD = 16


@dataclasses.dataclass(frozen=True)
class _Options:
    """Validated loss options (everything that is not a tensor)."""

    types: tuple[str, ...]
    weights: tuple[float, ...]
    beta: float
    label_smoothing: float
    f_divergence: str  # canonical: reverse_kl, forward_kl, js, alpha
    f_alpha: float
    gamma_beta_ratio: float
    rpo_alpha: float | None
    discopop_tau: float
    cpo_alpha: float
    dpop_lambda: float

    @property
    def mask(self) -> int:
        return sum(1 << LOSS_TYPES.index(t) for t in self.types)

    @property
    def type_weights(self) -> list[float]:
        table = dict(zip(self.types, self.weights))
        return [table.get(t, 0.0) for t in LOSS_TYPES]

    @property
    def f_div_id(self) -> int:
        if self.f_divergence == "alpha" and abs(self.f_alpha - 1.0) < 1e-6:
            return 0  # the α → 1 limit is reverse KL (TRL's fallback)
        return _F_NAMES.index(self.f_divergence)

    @property
    def nll_coef(self) -> float:
        """Coefficient of the batch mean token NLL of the chosen completions."""
        table = dict(zip(self.types, self.weights))
        return table.get("sft", 0.0) + table.get("cpo", 0.0) * self.cpo_alpha + table.get("orpo", 0.0)

    @property
    def needs_reference(self) -> bool:
        return any(t not in REFERENCE_FREE for t in self.types)

    @property
    def needs_chosen_lengths(self) -> bool:
        return (any(t in NEEDS_BOTH_LENGTHS for t in self.types) or self.nll_coef != 0.0 or "sft" in self.types
                or self.rpo_alpha is not None)

    @property
    def needs_rejected_lengths(self) -> bool:
        return any(t in NEEDS_BOTH_LENGTHS for t in self.types)


def _options(loss_type, loss_weights, beta, label_smoothing, f_divergence, f_alpha, gamma_beta_ratio, rpo_alpha,
             discopop_tau, cpo_alpha, dpop_lambda) -> _Options:
    if isinstance(loss_type, str):
        types = (loss_type,)
    elif isinstance(loss_type, Sequence) and all(isinstance(t, str) for t in loss_type):
        types = tuple(loss_type)
    else:
        raise TypeError(f"loss_type must be a str or a list of str, got {loss_type!r}")
    if not types:
        raise ValueError("loss_type must name at least one loss type")
    for t in types:
        if t not in LOSS_TYPES:
            raise ValueError(f"loss_type {t!r} is unknown; known: {', '.join(LOSS_TYPES)}")
    if len(set(types)) != len(types):
        raise ValueError(f"loss_type names a type twice: {list(types)}")
    if loss_weights is None:
        weights = (1.0,) * len(types)
    else:
        if isinstance(loss_weights, (str, bytes)) or not isinstance(loss_weights, Sequence):
            raise TypeError(f"loss_weights must be a list of numbers, got {type(loss_weights).__name__}")
        if len(loss_weights) != len(types):
            raise ValueError(f"loss_weights must hold one weight per loss type ({len(types)}), got {len(loss_weights)}")
        weights = tuple(_checks.check_real("loss_weights", w) for w in loss_weights)
    beta = _checks.check_real("beta", beta, low=0.0, low_open=True)
    label_smoothing = _checks.check_real("label_smoothing", label_smoothing, low=0.0, high=0.5, high_open=True)
    if "exo_pair" in types and label_smoothing == 0.0:
        raise ValueError("label_smoothing must be > 0 for loss_type 'exo_pair' (EXO's ε; the paper recommends 1e-3)")
    if not isinstance(f_divergence, str) or f_divergence not in F_DIVERGENCES:
        raise ValueError(f"f_divergence must be one of {', '.join(F_DIVERGENCES)}; got {f_divergence!r}")
    f_divergence = _F_NAMES[F_DIVERGENCES[f_divergence]]
    f_alpha = _checks.check_real("f_alpha", f_alpha)
    if f_divergence != "reverse_kl":
        other = [t for t in types if t not in F_DIVERGENCE_TYPES]
        if other:
            raise ValueError(f"f_divergence {f_divergence!r} applies only to loss types "
                             f"{', '.join(sorted(F_DIVERGENCE_TYPES))}; not to {', '.join(other)}")
    gamma_beta_ratio = _checks.check_real("gamma_beta_ratio", gamma_beta_ratio)
    if rpo_alpha is not None:
        rpo_alpha = _checks.check_real("rpo_alpha", rpo_alpha, low=0.0)
    discopop_tau = _checks.check_real("discopop_tau", discopop_tau, low=0.0, low_open=True)
    cpo_alpha = _checks.check_real("cpo_alpha", cpo_alpha, low=0.0)
    dpop_lambda = _checks.check_real("dpop_lambda", dpop_lambda, low=0.0)
    return _Options(types, weights, beta, label_smoothing, f_divergence, f_alpha, gamma_beta_ratio, rpo_alpha,
                    discopop_tau, cpo_alpha, dpop_lambda)


_FLOATS = (*_checks.FLOAT_DTYPES, torch.float64)


def _check_pairs(name: str, value, n: int, device: torch.device, *, integer_ok: bool = False) -> torch.Tensor:
    dtypes = _FLOATS + ((torch.int32, torch.int64) if integer_ok else ())
    _checks.check_tensor(name, value, ndim=1, dtypes=dtypes, device=device)
    if value.shape[0] != n:
        raise ValueError(f"{name} must hold one value per pair ({n}, the length of chosen_logps), got shape "
                         f"{tuple(value.shape)}")
    return value


def _finite(name: str, t: torch.Tensor):
    """A :func:`fastrl._checks.raise_first` check: no NaN or inf in ``t`` (integers always pass)."""
    bad = (~torch.isfinite(t)).any() if t.is_floating_point() else torch.zeros((), dtype=torch.bool, device=t.device)
    return bad, f"{name} must be finite (no NaN or inf)"


def dynamic_beta(reward_margins: torch.Tensor, beta: float = 0.1, *, w: float = 0.5, k: float = 0.5) -> torch.Tensor:
    """Per-pair β from the reward-model margin δ of each pair (MM-DPO ‡, unchecked against the paper):
    ``β_i = β·(1 + w·(1 − e^{−k·δ_i}))``. Pass the result as ``pair_beta``. [B] fp32, no grad."""
    _checks.check_tensor("reward_margins", reward_margins, ndim=1, dtypes=_FLOATS)
    beta = _checks.check_real("beta", beta, low=0.0, low_open=True)
    w = _checks.check_real("w", w)
    k = _checks.check_real("k", k)
    d = reward_margins.detach().float()
    return beta * (1 + w * (1 - torch.exp(-k * d)))


def wpo_weights(chosen_token_logps: torch.Tensor, chosen_log_sum_sq: torch.Tensor, chosen_mask: torch.Tensor,
                rejected_token_logps: torch.Tensor, rejected_log_sum_sq: torch.Tensor,
                rejected_mask: torch.Tensor) -> torch.Tensor:
    """WPO pair weights ``w_c·w_r``, ``w = exp(mean_t(logp_t − log Σ_v p_v²))`` (WPO Eq. 2 as TRL 1.16's
    ``use_weighting``), from padded per-token log-probs, per-token ``log Σ_v p_v²`` and masks
    ``[B, L]``. Pass the result as ``pair_weights``. [B] fp32, no grad."""
    with torch.no_grad():
        def mean_aligned(logps, log_sum_sq, mask):
            _checks.check_tensor("token_logps", logps, ndim=2, dtypes=_FLOATS)
            if log_sum_sq.shape != logps.shape or mask.shape != logps.shape:
                raise ValueError("the log_sum_sq and mask of a completion must have the shape of its token_logps")
            m = mask.to(torch.float32)
            return ((logps.float() - log_sum_sq.float()) * m).sum(1) / m.sum(1).clamp(min=1)

        return torch.exp(mean_aligned(chosen_token_logps, chosen_log_sum_sq, chosen_mask)
                         + mean_aligned(rejected_token_logps, rejected_log_sum_sq, rejected_mask))


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 1.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    gamma_beta_ratio: float = 0.5,
    rpo_alpha: float | None = None,
    chosen_nll: torch.Tensor | None = None,
    loss_weights: Sequence[float] | None = None,
    pair_beta: torch.Tensor | None = None,
    soft_labels: torch.Tensor | None = None,
    discopop_tau: float = 0.05,
    pair_weights: torch.Tensor | None = None,
    cpo_alpha: float = 1.0,
    dpop_lambda: float = 50.0,
    bco_delta: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A pairwise preference loss (or a weighted sum of several) and its metrics.

    Tensors, all ``[B]`` on one device: ``chosen_logps``, ``rejected_logps`` (π_c, π_r: summed
    completion log-probs of the policy; fp32 / bf16 / fp16 / fp64; differentiable), the reference's
    ``ref_chosen_logps``, ``ref_rejected_logps`` (ρ; no gradient; required by every type except the
    reference-free sft, simpo, orpo, cpo, which ignore them), ``chosen_lengths`` /
    ``rejected_lengths`` (|y| in tokens, int or float, >= 0; clamped to >= 1 where they divide),
    ``chosen_nll`` (summed token NLL of the chosen completion; differentiable; default ``−π_c``, the
    right value unless π_c carries LD-DPO weights), ``pair_beta`` (dynamic β per pair, > 0, e.g.
    :func:`dynamic_beta`), ``soft_labels`` (SmPO preference probabilities p̃ in [0, 1]),
    ``pair_weights`` (WPO weights w_c·w_r >= 0, e.g. :func:`wpo_weights`; no gradient).

    ``loss_type`` is one name or a list, summed with ``loss_weights`` (default 1 each). Per pair,
    with r = π − ρ, F the f-divergence score (``f_divergence``), h = F(r_c) − F(r_r),
    h̄ = F(r_c)/|y_c| − F(r_r)/|y_r|, ε = ``label_smoothing``, ls = log σ, s = 2p̃ − 1 (1 without soft
    labels); "TRL" is ``DPOTrainer._compute_loss`` of TRL 1.16 unless another trainer is named:

    ======================  =============================================================  ==========
    sigmoid                 −ls(β·s·h); ε ignored, as TRL 1.16 (DPO Eq. 7)                  checked
    cdpo                    −(1−ε)·ls(βsh) − ε·ls(−βsh): LOSSES.md's sigmoid row with ε > 0  table
                            (cDPO; TRL 1.16 has it only as CPO's smoothing)
    robust                  (−(1−ε)·ls(βsh) + ε·ls(−βsh)) / (1−2ε) (rDPO; TRL)              checked
    hinge                   relu(1 − βsh) (SLiC; TRL)                                        checked
    ipo                     (h̄ − 1/(2β))² (IPO Eq. 17 on token means; TRL)                   checked
    sigmoid_norm            −ls(β·s·h̄) (TRL)                                                 checked
    exo_pair                σ(z)(ls(z) − log(1−ε)) + σ(−z)(ls(−z) − log ε), z = βsh; ε > 0   checked
                            (EXO Eq. 16; TRL)
    nca_pair                −ls(βr_c) − ½ls(−βr_c) − ½ls(−βr_r) (TRL)                        checked
    bco_pair                −ls(βr_c − δ) − ls(−(βr_r − δ)), δ = ``bco_delta`` (TRL 1.16:   checked
                            δ = 0; :class:`DPOLoss` can keep BCO's running mean)
    sppo_hard               (r_c − 1/(2β))² + (r_r + 1/(2β))² (SPPO Eq. 4.7, hard P; TRL)    checked
    aot / aot_unpaired      cDPO form on Δ = sorted(π_c−π_r) − sorted(ρ_c−ρ_r) / sorted(r_c)  checked
                            − sorted(r_r) over the batch (TRL)
    apo_zero / apo_down     1 − σ(βr_c) + σ(βr_r) / σ(βr_c) + 1 − σ(βh) (APO Eqs. 7, 8; TRL) checked
    discopop                (1−m)·(−ls(z)) + m·e^{−z}, m = σ(z/τ), z = βsh, τ = discopop_tau  checked
                            (DiscoPOP Eq. 5; TRL)
    sft                     mean token NLL of the batch's chosen tokens, Σ NLL_c / Σ |y_c|   checked
                            (TRL: not a per-sequence mean)
    simpo                   cDPO form on β(π_c/|y_c| − π_r/|y_r|) − γ, γ = gamma_beta_ratio·β checked
                            (SimPO Eq. 6; TRL CPOTrainer loss_type="simpo" with cpo_alpha=0)
    orpo                    Σ NLL_c/Σ|y_c| − β·mean ls(log odds_c − log odds_r), odds from   checked
                            p = exp(π/|y|) (ORPO Eqs. 4, 7; TRL ORPOTrainer)
    cpo                     cDPO form on β(π_c − π_r) + cpo_alpha·Σ NLL_c/Σ|y_c|            checked
                            (CPO Eq. 3; TRL CPOTrainer loss_type="sigmoid")
    dpop ‡                  −ls(β(h_raw − λ·max(0, ρ_c − π_c))), λ = dpop_lambda            unchecked
                            (DPO-Positive / Smaug Eq. 3, from LOSSES.md)
    ======================  =============================================================  ==========

    "checked": loss and gradients agree with that TRL code path, and with Liger-Kernel 0.8.5 where it
    has the type (``tests/losses/test_dpo_loss.py``, run when they are installed); "table":
    LOSSES.md only; ‡ as in LOSSES.md (summarised from a paper, not yet checked against it). Modifiers: ``f_divergence`` reverse_kl | forward_kl |
    js | alpha (TRL names js_divergence / alpha_divergence accepted; ``f_alpha`` is α; constants as
    TRL) on the types above marked with h or h̄; ``rpo_alpha`` adds α·NLL_c/|y_c| per pair (RPO, as
    LOSSES.md: a per-sequence mean); ``pair_beta`` replaces β everywhere, per pair (MM-DPO ‡,
    unchecked); ``soft_labels`` scale h (SmPO ‡, unchecked; only on the h-based types);
    ``pair_weights`` multiply each pair's total, the batch NLL term by their mean (WPO; TRL's
    ``use_weighting`` when the weights come from :func:`wpo_weights`).

    The loss is ``mean_i(w_i·P_i) + c·mean_i(w_i)·Σ NLL_c / Σ |y_c|`` with P the per-pair sum above
    and c = weight_sft + weight_cpo·cpo_alpha + weight_orpo. A TRL CPOTrainer SimPO run with
    ``cpo_alpha`` a is ``loss_type=["simpo", "sft"], loss_weights=[1, a]``.

    Returns ``(loss, metrics)``: loss 0-d fp32 (fp64 for fp64 inputs); metrics, detached:
    ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (batch
    means of β·r, TRL's naming; β·π/|y| for the reference-free simpo / orpo without a reference,
    as TRL's CPO / ORPO log them), ``logps/chosen``, ``logps/rejected`` and, when a type uses it,
    ``nll_loss``. Gradients reach ``chosen_logps``, ``rejected_logps`` and ``chosen_nll``.

    Bad arguments raise ``TypeError`` / ``ValueError`` naming the argument; the value checks (finite
    inputs, lengths >= 0, p̃ in [0, 1], β > 0, weights >= 0) cost one device sync and are skipped
    under ``torch.compile``.
    """
    opts = _options(loss_type, loss_weights, beta, label_smoothing, f_divergence, f_alpha, gamma_beta_ratio,
                    rpo_alpha, discopop_tau, cpo_alpha, dpop_lambda)
    return _dpo_loss(opts, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
                     rejected_lengths, chosen_nll, pair_beta, soft_labels, pair_weights, bco_delta)


def _dpo_loss(opts: _Options, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
              rejected_lengths, chosen_nll, pair_beta, soft_labels, pair_weights, bco_delta):
    _checks.check_tensor("chosen_logps", chosen_logps, ndim=1, dtypes=_FLOATS)
    device, n = chosen_logps.device, chosen_logps.shape[0]
    if n == 0:
        raise ValueError("chosen_logps must hold at least one pair")
    _check_pairs("rejected_logps", rejected_logps, n, device)
    values = [_finite("chosen_logps", chosen_logps), _finite("rejected_logps", rejected_logps)]
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    if ref_chosen_logps is None and opts.needs_reference:
        need = [t for t in opts.types if t not in REFERENCE_FREE]
        raise ValueError(f"ref_chosen_logps and ref_rejected_logps are required by loss type {', '.join(need)} "
                         "(only sft, simpo, orpo, cpo are reference-free)")
    if ref_chosen_logps is not None:
        _check_pairs("ref_chosen_logps", ref_chosen_logps, n, device)
        _check_pairs("ref_rejected_logps", ref_rejected_logps, n, device)
        values += [_finite("ref_chosen_logps", ref_chosen_logps), _finite("ref_rejected_logps", ref_rejected_logps)]
        # The reference is a constant of the loss.
        ref_chosen_logps, ref_rejected_logps = ref_chosen_logps.detach(), ref_rejected_logps.detach()
    if opts.needs_chosen_lengths and chosen_lengths is None:
        raise ValueError(f"chosen_lengths is required by loss type {', '.join(opts.types)}"
                         f"{' with rpo_alpha' if opts.rpo_alpha is not None else ''} (completion lengths in tokens)")
    if opts.needs_rejected_lengths and rejected_lengths is None:
        raise ValueError(f"rejected_lengths is required by loss type {', '.join(opts.types)} "
                         "(completion lengths in tokens)")
    for name, t in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if t is not None:
            _check_pairs(name, t, n, device, integer_ok=True)
            values += [_finite(name, t), ((t < 0).any(), f"{name} must be >= 0")]
    if not opts.needs_chosen_lengths and not opts.needs_rejected_lengths:
        chosen_lengths = rejected_lengths = None  # unused: keep them out of the kernel
    elif not opts.needs_rejected_lengths:
        rejected_lengths = None
    if chosen_nll is not None:
        _check_pairs("chosen_nll", chosen_nll, n, device)
        values.append(_finite("chosen_nll", chosen_nll))
    sorted_types = [t for t in opts.types if t in SORTED_TYPES]
    for name, t in (("pair_beta", pair_beta), ("soft_labels", soft_labels), ("pair_weights", pair_weights)):
        if t is not None:
            _check_pairs(name, t, n, device)
            if sorted_types:
                raise ValueError(f"{name} cannot be used with loss type {', '.join(sorted_types)}: those sort "
                                 "the batch, so per-pair values no longer line up with the pairs")
            values.append(_finite(name, t))
    if pair_beta is not None:
        pair_beta = pair_beta.detach()
        values.append(((pair_beta <= 0).any(), "pair_beta must be > 0"))
    if soft_labels is not None:
        other = [t for t in opts.types if t not in SOFT_LABEL_TYPES]
        if other:
            raise ValueError(f"soft_labels apply only to loss types {', '.join(sorted(SOFT_LABEL_TYPES))}; "
                             f"not to {', '.join(other)}")
        soft_labels = soft_labels.detach()
        values.append((((soft_labels < 0) | (soft_labels > 1)).any(), "soft_labels must be in [0, 1]"))
    if pair_weights is not None:
        pair_weights = pair_weights.detach()
        values.append(((pair_weights < 0).any(), "pair_weights must be >= 0"))
    if isinstance(bco_delta, torch.Tensor):
        _checks.check_tensor("bco_delta", bco_delta, dtypes=_FLOATS, device=device)
        if bco_delta.numel() != 1:
            raise ValueError(f"bco_delta must be a number or a one-element tensor, got shape {tuple(bco_delta.shape)}")
        values.append(_finite("bco_delta", bco_delta))
        delta = bco_delta.detach().reshape(()).to(torch.float64)
    else:
        delta = _checks.check_real("bco_delta", bco_delta)
        if "bco_pair" in opts.types:  # (a compiled graph holds it as a constant)
            delta = torch.tensor(delta, dtype=torch.float64, device=device) if torch.compiler.is_compiling() \
                else _scalar(delta, device)
    if "bco_pair" not in opts.types:
        delta = None
    _checks.raise_first(values)

    d1 = d2 = None
    if "aot" in opts.types:
        d1 = torch_dpo.aot_delta(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if "aot_unpaired" in opts.types:
        d2 = torch_dpo.aot_unpaired_delta(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    norm_rewards = ref_chosen_logps is None and any(t in ("simpo", "orpo") for t in opts.types)
    tensors = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths,
               chosen_nll, pair_beta, soft_labels, pair_weights, d1, d2, delta)
    scalars = (opts.mask, opts.type_weights, opts.f_div_id, opts.beta, opts.label_smoothing, opts.f_alpha,
               opts.gamma_beta_ratio, opts.discopop_tau, opts.rpo_alpha, opts.cpo_alpha, opts.dpop_lambda, norm_rewards)
    if not torch.compiler.is_compiling() and resolve(chosen_logps.device) == "torch":
        # eager torch path: the reference runs once and its vjp is kept for the backward (the operator's
        # backward would run it again)
        stats = _EagerReferenceStats.apply(scalars, *tensors)
    else:
        stats = _dpo_loss_op(*tensors, *scalars)
    detached = stats.detach()
    metrics = {name: detached[i] for i, name in enumerate(torch_dpo.DPO_STATS) if 3 <= i <= 8}
    if opts.nll_coef != 0.0 or opts.rpo_alpha is not None:
        metrics["nll_loss"] = detached[1]
    return stats[0], metrics


# ---------------------------------------------------------------------------------------------------
# The operator: Triton on CUDA, the torch reference otherwise.


def _out_dtype(*tensors) -> torch.dtype:
    return torch_dpo.compute_dtype(*tensors)


_DIFFERENTIABLE = (0, 1, 6, 10, 11)  # pc, pr, nll, d1, d2: what the operator's backward differentiates


class _EagerReferenceStats(torch.autograd.Function):
    """The torch reference with the operator's gradient contract (d stats / d pc, pr, nll, d1, d2; zeros
    for an input the loss type does not use), its vjp taken in the forward."""

    @staticmethod
    def forward(ctx, scalars, *tensors):
        wanted = [k for k in _DIFFERENTIABLE if tensors[k] is not None]

        def stats_of(*xs):
            full = list(tensors)
            for k, x in zip(wanted, xs):
                full[k] = x
            return _reference_stats(*full, *scalars)

        stats, ctx.vjp = torch.func.vjp(stats_of, *(tensors[k] for k in wanted))
        ctx.wanted, ctx.count = wanted, len(tensors)
        return stats

    @staticmethod
    def backward(ctx, grad):
        grads = [None] * ctx.count
        for k, g in zip(ctx.wanted, ctx.vjp(grad)):
            grads[k] = g
        ctx.vjp = None
        return (None, *grads)


def _reference_stats(pc, pr, qc, qr, lc, lr, nll, pair_beta, soft, weights, d1, d2, delta, types, type_weights,
                     f_div, beta, eps, f_alpha, gamma_ratio, tau, rpo_alpha, cpo_alpha, dpop_lambda, norm_rewards):
    loss_weights = {t: type_weights[k] for k, t in enumerate(LOSS_TYPES) if (types >> k) & 1}
    return torch_dpo.dpo_loss_stats(
        pc, pr, qc, qr, loss_weights=loss_weights, beta=beta, pair_beta=pair_beta, pair_weights=weights,
        cpo_alpha=cpo_alpha, norm_rewards=norm_rewards, label_smoothing=eps, f_divergence=_F_NAMES[f_div],
        f_alpha=f_alpha, chosen_lengths=lc, rejected_lengths=lr, gamma_beta_ratio=gamma_ratio, rpo_alpha=rpo_alpha,
        chosen_nll=nll, soft_labels=soft, discopop_tau=tau, dpop_lambda=dpop_lambda,
        bco_delta=0.0 if delta is None else delta, aot_delta=d1, aot_unpaired_delta=d2)


def _kernel_args(pc, pr, qc, qr, lc, lr, nll, pair_beta, soft, weights, d1, d2, delta, types, type_weights):
    """Pointers (an absent input is replaced by ``pc``, never read) and the matching HAS_* flags."""
    present = dict(HAS_REF=qc is not None, HAS_LC=lc is not None, HAS_LR=lr is not None, HAS_NLL=nll is not None,
                   HAS_BETA=pair_beta is not None, HAS_SOFT=soft is not None, HAS_W=weights is not None,
                   HAS_D1=d1 is not None, HAS_D2=d2 is not None, HAS_DELTA=delta is not None)
    tensors = [t.contiguous() if t is not None else pc for t in (pc, pr, qc, qr, lc, lr, nll, pair_beta, soft, weights,
                                                                 d1, d2, delta)]
    return tensors, _type_weights(tuple(type_weights), pc.device), present


@functools.lru_cache(maxsize=64)
def _scalar(value: float, device: torch.device) -> torch.Tensor:
    """A constant 0-d fp64 device tensor, made once per value (see :func:`_type_weights`)."""
    return torch.tensor(value, dtype=torch.float64, device=device)


@functools.lru_cache(maxsize=64)
def _type_weights(weights: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """The per-type weights as a device tensor, made once per setting: a fresh host-to-device copy
    every step would be a synchronising copy (and is not allowed while a CUDA graph is captured)."""
    return torch.tensor(weights, dtype=torch.float32, device=device)


def _block(n: int) -> int:
    import triton

    return max(16, min(_MAX_BLOCK, triton.next_power_of_2(n)))


@torch.library.custom_op("fastrl::dpo_loss", mutates_args=())
def _dpo_loss_op(pc: torch.Tensor, pr: torch.Tensor, qc: torch.Tensor | None, qr: torch.Tensor | None,
                 lc: torch.Tensor | None, lr: torch.Tensor | None, nll: torch.Tensor | None,
                 pair_beta: torch.Tensor | None, soft: torch.Tensor | None, weights: torch.Tensor | None,
                 d1: torch.Tensor | None, d2: torch.Tensor | None, delta: torch.Tensor | None, types: int,
                 type_weights: list[float], f_div: int, beta: float, eps: float, f_alpha: float, gamma_ratio: float,
                 tau: float, rpo_alpha: float | None, cpo_alpha: float, dpop_lambda: float,
                 norm_rewards: bool) -> torch.Tensor:
    """The operator under :func:`dpo_loss` (arguments checked there): the vector of
    :data:`fastrl.losses.torch_impl.dpo.DPO_STATS`, element 0 the loss."""
    args = (pc, pr, qc, qr, lc, lr, nll, pair_beta, soft, weights, d1, d2, delta)
    scalars = (types, type_weights, f_div, beta, eps, f_alpha, gamma_ratio, tau, rpo_alpha, cpo_alpha, dpop_lambda)
    if resolve(pc.device) == "torch":
        return _reference_stats(*args, *scalars, norm_rewards)
    from fastrl.kernels import launch
    from fastrl.kernels.dpo_loss import NSTAT, dpo_loss_finish_kernel, dpo_loss_fwd_kernel

    n = pc.shape[0]
    tensors, tw, present = _kernel_args(*args, types, type_weights)
    block = _block(n)
    n_blocks = (n + block - 1) // block
    partials = torch.empty(n_blocks, NSTAT, dtype=torch.float32, device=pc.device)
    launch(dpo_loss_fwd_kernel, (n_blocks,), *tensors, tw, partials, n, beta, eps, f_alpha, gamma_ratio, tau,
           0.0 if rpo_alpha is None else rpo_alpha, dpop_lambda, TYPES=types, F_DIV=f_div, **present,
           HAS_RPO=rpo_alpha is not None, NORM_REWARDS=norm_rewards, NSTAT=NSTAT, BLOCK=block,
           num_warps=max(1, min(4, block // 64)))
    nll_coef = _nll_coef(types, type_weights, cpo_alpha)
    out = torch.empty(len(torch_dpo.DPO_STATS), dtype=_out_dtype(pc, pr, qc, qr, nll, pair_beta, weights),
                      device=pc.device)
    launch(dpo_loss_finish_kernel, (1,), partials, out, n_blocks, n, nll_coef, BATCH_NLL=nll_coef != 0.0,
           NSTAT=NSTAT, NSTAT_PAD=_NSTAT_PAD, RBLOCK=max(2, min(32, _next_pow2(n_blocks))), num_warps=1)
    return out


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _nll_coef(types: int, type_weights: Sequence[float], cpo_alpha: float) -> float:
    coef = 0.0
    for name, factor in (("sft", 1.0), ("cpo", cpo_alpha), ("orpo", 1.0)):
        k = LOSS_TYPES.index(name)
        if (types >> k) & 1:
            coef += type_weights[k] * factor
    return coef


@_dpo_loss_op.register_fake
def _(pc, pr, qc, qr, lc, lr, nll, pair_beta, soft, weights, d1, d2, delta, types, type_weights, f_div, beta, eps,
      f_alpha, gamma_ratio, tau, rpo_alpha, cpo_alpha, dpop_lambda, norm_rewards):
    return pc.new_empty(len(torch_dpo.DPO_STATS), dtype=_out_dtype(pc, pr, qc, qr, nll, pair_beta, weights))


@torch.library.custom_op("fastrl::dpo_loss_backward", mutates_args=())
def _dpo_loss_backward(grad: torch.Tensor, stats: torch.Tensor, pc: torch.Tensor, pr: torch.Tensor,
                       qc: torch.Tensor | None, qr: torch.Tensor | None, lc: torch.Tensor | None,
                       lr: torch.Tensor | None, nll: torch.Tensor | None, pair_beta: torch.Tensor | None,
                       soft: torch.Tensor | None, weights: torch.Tensor | None, d1: torch.Tensor | None,
                       d2: torch.Tensor | None, delta: torch.Tensor | None, types: int, type_weights: list[float],
                       f_div: int, beta: float, eps: float, f_alpha: float, gamma_ratio: float, tau: float,
                       rpo_alpha: float | None, cpo_alpha: float, dpop_lambda: float) -> torch.Tensor:
    """d loss / d (π_c, π_r, NLL_c, Δ_aot, Δ_aot_unpaired) as rows of a [5, B] tensor, times ``grad[0]``
    (the gradient of the loss element of the stats vector). Rows of absent inputs are unspecified."""
    n = pc.shape[0]
    scalars = (types, type_weights, f_div, beta, eps, f_alpha, gamma_ratio, tau, rpo_alpha, cpo_alpha, dpop_lambda)
    dtype = _out_dtype(pc, pr, qc, qr, nll, pair_beta, weights)
    if resolve(pc.device) == "torch":
        differentiable = {"pc": pc, "pr": pr, "nll": nll, "d1": d1, "d2": d2}
        names = [k for k, v in differentiable.items() if v is not None]

        def loss_of(*xs):
            full = dict(differentiable, **dict(zip(names, xs)))
            return _reference_stats(full["pc"], full["pr"], qc, qr, lc, lr, full["nll"], pair_beta, soft, weights,
                                    full["d1"], full["d2"], delta, *scalars, False)[0]

        _, vjp = torch.func.vjp(loss_of, *[differentiable[k] for k in names])
        grads = dict(zip(names, vjp(grad[0].to(dtype))))
        out = torch.zeros(5, n, dtype=dtype, device=pc.device)
        for row, name in enumerate(differentiable):
            if name in grads:
                out[row] = grads[name]
        return out
    from fastrl.kernels import launch
    from fastrl.kernels.dpo_loss import dpo_loss_bwd_kernel

    tensors, tw, present = _kernel_args(pc, pr, qc, qr, lc, lr, nll, pair_beta, soft, weights, d1, d2, delta, types,
                                        type_weights)
    block = _block(n)
    dx = torch.empty(5, n, dtype=dtype, device=pc.device)
    nll_coef = _nll_coef(types, type_weights, cpo_alpha)
    launch(dpo_loss_bwd_kernel, ((n + block - 1) // block,), grad.contiguous(), stats.contiguous(), *tensors, tw, dx,
           n, beta, eps, f_alpha, gamma_ratio, tau, 0.0 if rpo_alpha is None else rpo_alpha, dpop_lambda, nll_coef,
           TYPES=types, F_DIV=f_div, **present, HAS_RPO=rpo_alpha is not None, BATCH_NLL=nll_coef != 0.0,
           BLOCK=block, num_warps=max(1, min(4, block // 64)))
    return dx


@_dpo_loss_backward.register_fake
def _(grad, stats, pc, pr, qc, qr, lc, lr, nll, pair_beta, soft, weights, d1, d2, delta, types, type_weights, f_div,
      beta, eps, f_alpha, gamma_ratio, tau, rpo_alpha, cpo_alpha, dpop_lambda):
    return pc.new_empty(5, pc.shape[0], dtype=_out_dtype(pc, pr, qc, qr, nll, pair_beta, weights))


def _setup_context(ctx, inputs, output):
    tensors, scalars = inputs[:13], inputs[13:24]
    ctx.save_for_backward(*tensors, output)
    ctx.scalars = scalars
    ctx.dtypes = [None if t is None else t.dtype for t in tensors]


def _backward(ctx, grad):
    *tensors, stats = ctx.saved_tensors
    dx = _dpo_loss_backward(grad, stats, *tensors, *ctx.scalars)
    pc, pr, nll, d1, d2 = (tensors[i] for i in (0, 1, 6, 10, 11))

    def row(k, t):
        return None if t is None else dx[k].to(t.dtype)

    return (row(0, pc), row(1, pr), None, None, None, None, row(2, nll), None, None, None, row(3, d1), row(4, d2),
            *([None] * 13))


_dpo_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# Module form


class DPOLoss(nn.Module):
    """Module form of :func:`dpo_loss`: the options in ``__init__`` (checked there), the tensors in
    ``forward``, which returns ``(loss, metrics)``.

    ``bco_running_mean=True`` (with ``loss_type`` "bco_pair") keeps BCO's reward baseline δ as
    buffers (the count-weighted mean of every β·r_c and β·r_r seen in training mode, updated with
    the batch before its loss, as TRL's BCO ``RunningMoments``); TRL 1.16's DPO ``bco_pair`` uses
    δ = 0, the default. In eval mode δ is read, not updated.
    """

    def __init__(self, loss_type: str | Sequence[str] = "sigmoid", *, beta: float = 0.1, label_smoothing: float = 0.0,
                 f_divergence: str = "reverse_kl", f_alpha: float = 1.0, gamma_beta_ratio: float = 0.5,
                 rpo_alpha: float | None = None, loss_weights: Sequence[float] | None = None,
                 discopop_tau: float = 0.05, cpo_alpha: float = 1.0, dpop_lambda: float = 50.0,
                 bco_running_mean: bool = False):
        super().__init__()
        self.options = _options(loss_type, loss_weights, beta, label_smoothing, f_divergence, f_alpha,
                                gamma_beta_ratio, rpo_alpha, discopop_tau, cpo_alpha, dpop_lambda)
        self.bco_running_mean = _checks.check_bool("bco_running_mean", bco_running_mean)
        if bco_running_mean:
            if "bco_pair" not in self.options.types:
                raise ValueError("bco_running_mean needs loss_type 'bco_pair'")
            from fastrl.losses.preference import RunningMean

            self.running = RunningMean()

    def forward(self, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None, *,
                chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
                chosen_nll: torch.Tensor | None = None, pair_beta: torch.Tensor | None = None,
                soft_labels: torch.Tensor | None = None, pair_weights: torch.Tensor | None = None,
                bco_delta: float | torch.Tensor = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.bco_running_mean:
            if ref_chosen_logps is None or ref_rejected_logps is None:
                raise ValueError("ref_chosen_logps and ref_rejected_logps are required by loss type bco_pair")
            if self.training:
                with torch.no_grad():
                    b = self.options.beta if pair_beta is None else pair_beta.detach()
                    rewards = torch.cat([b * (chosen_logps.detach() - ref_chosen_logps),
                                         b * (rejected_logps.detach() - ref_rejected_logps)])
                    self.running.update(rewards)
            bco_delta = self.running.mean
        return _dpo_loss(self.options, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                         chosen_lengths, rejected_lengths, chosen_nll, pair_beta, soft_labels, pair_weights, bco_delta)

    def extra_repr(self) -> str:
        o = self.options
        return f"loss_type={list(o.types)}, beta={o.beta}"
