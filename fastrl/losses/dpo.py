"""Pairwise DPO-family losses on per-sequence log-probs: one fused op, every type and modifier.

>>> import torch
>>> from fastrl.losses.dpo import DPOSettings, dpo_loss
>>> loss, metrics = dpo_loss(torch.tensor([-10.0, -12.0]), torch.tensor([-14.0, -11.0]),
...                          torch.tensor([-11.0, -12.0]), torch.tensor([-13.0, -12.0]), beta=0.5)
>>> round(loss.item(), 4), metrics["rewards/accuracies"].item()
(0.6437, 0.5)
>>> settings = DPOSettings(beta=0.5)  # the same call with the options as one value
>>> dpo_loss(torch.tensor([-10.0, -12.0]), torch.tensor([-14.0, -11.0]), torch.tensor([-11.0, -12.0]),
...          torch.tensor([-13.0, -12.0]), settings=settings)[0].item() == loss.item()
True

Inputs are the summed completion log-probs ``[B]`` of the chosen and rejected completion of each
pair (``fastrl.ops.sequence_logps``; LD-DPO is its ``ld_alpha``), under the policy and, for the
types that need one, the reference. Every option that is not a tensor is a field of
:class:`DPOSettings` (documented there); formulas: ``docs/losses.md``. On CUDA the per-pair maths
runs in Triton (:mod:`fastrl.kernels.dpo_loss`): one launch of a kernel with one program per block
of pairs that writes per-block partial sums, then a one-program launch that adds them in a fixed
order and writes the loss and the metrics; backward is one launch. The loss types are a constexpr
bit mask, so a specialisation holds only the maths it uses. On CPU (or ``FASTRL_BACKEND=torch``)
the torch implementation :mod:`fastrl.losses.torch_impl.dpo` runs, and the backward is the vjp of
its :func:`~fastrl.losses.torch_impl.dpo.dpo_loss_stats` (autograd, not a hand-derived gradient).
AOT's batch sorts run in torch before the kernel (``torch.sort``, differentiable).

The custom op ``fastrl::dpo_loss`` takes the per-pair tensors (:class:`PairTensors`, its schema made
from their names) and the settings as :meth:`DPOSettings.encode` writes them (``int[]``, ``float[]``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from fastrl import _checks
from fastrl.kernels.dpo_columns import DPO_STATS, F_DIVERGENCES, GRAD_ROWS, LOSS_TYPES, METRICS, NSTAT_PAD, STAT
from fastrl.losses.settings import Settings, option
from fastrl.losses.torch_impl import dpo as torch_dpo
from fastrl.ops.dispatch import resolve

__all__ = ["DPOLoss", "DPOSettings", "LOSS_TYPES", "PairTensors", "dpo_loss", "dynamic_beta", "wpo_weights"]

REFERENCE_FREE = frozenset({"sft", "simpo", "orpo", "cpo"})
NEEDS_BOTH_LENGTHS = frozenset({"ipo", "sigmoid_norm", "simpo", "orpo"})
# TRL 1.16 accepts a non-default f-divergence only for the types built on the reward difference,
# where the f-DPO partition term cancels; sft is unaffected by it.
F_DIVERGENCE_TYPES = frozenset({"sigmoid", "cdpo", "robust", "hinge", "ipo", "sigmoid_norm", "exo_pair",
                                "discopop", "sft"})
# Soft labels (SmPO) scale the margin h; they mean something only where the loss is a function of βh.
SOFT_LABEL_TYPES = frozenset({"sigmoid", "cdpo", "robust", "hinge", "sigmoid_norm", "exo_pair", "discopop", "sft"})
SORTED_TYPES = frozenset({"aot", "aot_unpaired"})  # sort over the batch: pairs lose their identity
F_DIVERGENCE_ALIASES = {"js_divergence": "js", "alpha_divergence": "alpha"}  # TRL's names
# Pairs per program: 2 per thread at 4 warps, so that even every type at once compiles without
# register spills (tests lower it to exercise several blocks).
_MAX_BLOCK = 256


def _loss_types(loss_type) -> tuple[str, ...]:
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
    return types


@dataclasses.dataclass(frozen=True)
class DPOSettings(Settings):
    """Every option of :func:`dpo_loss` that is not a tensor, checked on construction.

    Each field is also a keyword of :func:`dpo_loss` and :class:`DPOLoss` (their ``**options``).
    ``loss_type`` is one name or a list, summed with ``loss_weights`` (default 1 each). Per pair,
    with r = π − ρ, F the f-divergence score (``f_divergence``), h = F(r_c) − F(r_r),
    h̄ = F(r_c)/|y_c| − F(r_r)/|y_r|, ε = ``label_smoothing``, ls = log σ, s = 2p̃ − 1 (1 without soft
    labels); "TRL" is ``DPOTrainer._compute_loss`` of TRL 1.16 unless another trainer is named:

    ======================  =============================================================  ==========
    sigmoid                 −ls(β·s·h); ε ignored, as TRL 1.16 (DPO Eq. 7)                  checked
    cdpo                    −(1−ε)·ls(βsh) − ε·ls(−βsh): the table's sigmoid row with ε > 0  table
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
                            (DPO-Positive / Smaug Eq. 3, from docs/losses.md)
    ======================  =============================================================  ==========

    "checked": loss and gradients agree with that TRL code path, and with Liger-Kernel 0.8.5 where it
    has the type (``tests/losses/test_dpo_loss.py``, run when they are installed); "table":
    ``docs/losses.md`` only; ‡ as there (summarised from a paper, not yet checked against it).

    The loss is ``mean_i(w_i·P_i) + c·mean_i(w_i)·Σ NLL_c / Σ |y_c|`` with P the per-pair sum above
    and c = weight_sft + weight_cpo·cpo_alpha + weight_orpo (:attr:`nll_coef`). A TRL CPOTrainer
    SimPO run with ``cpo_alpha`` a is ``loss_type=["simpo", "sft"], loss_weights=[1, a]``.

    Args:
        loss_type: one name of :data:`LOSS_TYPES` or a list of them [sigmoid].
        loss_weights: the weight of each entry of ``loss_type`` [1 each].
        beta: β > 0 [0.1].
        label_smoothing: ε in [0, 0.5) of cdpo / robust / exo_pair [0; > 0 for exo_pair].
        f_divergence: reverse_kl | forward_kl | js | alpha [reverse_kl] (TRL's js_divergence /
            alpha_divergence accepted and stored as js / alpha; constants as TRL; only on the types
            marked with h or h̄ above, and sft).
        f_alpha: the α of the alpha divergence [1].
        gamma_beta_ratio: SimPO's γ/β [0.5].
        rpo_alpha: >= 0, adds α·NLL_c/|y_c| per pair (RPO, a per-sequence mean) [off].
        discopop_tau: DiscoPOP's τ > 0 [0.05].
        cpo_alpha: CPO's NLL weight >= 0 [1].
        dpop_lambda: DPO-Positive's λ >= 0 [50].
        bco_delta: bco_pair's reward shift δ [0; TRL 1.16: 0] (:func:`dpo_loss` also takes a
            one-element tensor for it).

    Raises:
        TypeError: a field of the wrong type, naming it.
        ValueError: an unknown, empty or repeated loss type, a field out of range, ``loss_weights``
            not one per type, exo_pair without ``label_smoothing``, or an ``f_divergence`` on a type
            it does not apply to.
    """

    family: ClassVar[str] = "dpo"
    peer_names: ClassVar[dict[str, str]] = {
        "alpha": "an 'sft' entry: loss_type=[type, 'sft'], loss_weights=[1, alpha]",
        "compute_nll_loss": "an 'sft' entry: loss_type=[type, 'sft'], loss_weights=[1, alpha]",
        "average_log_prob": "loss types sigmoid_norm / ipo (token means), or fastrl.losses.liger."
                            "LigerFusedLinearDPOLoss(average_log_prob=True)",
        "use_ref_model": "pass ref_chosen_logps / ref_rejected_logps (the reference-free types need none)",
        "reference_free": "a reference-free loss type (simpo, orpo, cpo, sft)",
        "gamma": "'gamma_beta_ratio' (γ / β)",
        "use_weighting": "forward's pair_weights=wpo_weights(...)",
        "compiled": "none, leave it out (fastrl's ops need no torch.compile)",
        "chunk_size": "'workspace_bytes' of FusedLinearDPOLoss (a byte budget, not a count)",
        "ignore_index": "forward's mask (0 at the positions not scored)",
    }

    loss_type: tuple[str, ...] = option(
        ("sigmoid",), "DPO-family loss type(s): sigmoid, ipo, hinge, robust, simpo, ... (docs/losses.md)",
        choices=LOSS_TYPES, many=True)
    loss_weights: tuple[float, ...] | None = option(None, "weights of several loss types (default 1 each)", many=True)
    beta: float = option(0.1, "β", low=0.0, low_open=True)
    label_smoothing: float = option(0.0, "ε of cdpo / robust / exo_pair", low=0.0, high=0.5, high_open=True)
    f_divergence: str = option("reverse_kl", "reverse_kl, forward_kl, js or alpha",
                               choices=("reverse_kl", "forward_kl", "js", "js_divergence", "alpha", "alpha_divergence"))
    f_alpha: float = option(1.0, "α of the alpha divergence")
    gamma_beta_ratio: float = option(0.5, "SimPO γ/β")
    rpo_alpha: float | None = option(None, "RPO: add rpo_alpha × the chosen per-token NLL", low=0.0)
    discopop_tau: float = option(0.05, "DiscoPOP τ", low=0.0, low_open=True)
    cpo_alpha: float = option(1.0, "CPO NLL weight", low=0.0)
    dpop_lambda: float = option(50.0, "DPO-Positive λ", low=0.0)
    bco_delta: float = option(0.0, "bco_pair reward shift δ (TRL 1.16: 0)")

    def __post_init__(self) -> None:
        # loss_type first, with its own messages (unknown / empty / repeated names)
        object.__setattr__(self, "loss_type", _loss_types(self.loss_type))
        super().__post_init__()

    def check(self) -> None:
        types = self.loss_type
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ValueError(f"loss_weights must hold one weight per loss type ({len(types)}), "
                             f"got {len(self.loss_weights)}")
        if "exo_pair" in types and self.label_smoothing == 0.0:
            raise ValueError("label_smoothing must be > 0 for loss_type 'exo_pair' (EXO's ε; the paper recommends "
                             "1e-3)")
        f_divergence = F_DIVERGENCE_ALIASES.get(self.f_divergence, self.f_divergence)
        object.__setattr__(self, "f_divergence", f_divergence)
        if f_divergence != "reverse_kl":
            other = [t for t in types if t not in F_DIVERGENCE_TYPES]
            if other:
                raise ValueError(f"f_divergence {f_divergence!r} applies only to loss types "
                                 f"{', '.join(sorted(F_DIVERGENCE_TYPES))}; not to {', '.join(other)}")

    # ---- derived values

    @property
    def weights(self) -> tuple[float, ...]:
        """One weight per entry of ``loss_type``."""
        return (1.0,) * len(self.loss_type) if self.loss_weights is None else self.loss_weights

    @property
    def weight_of_type(self) -> dict[str, float]:
        """``{type: weight}`` in :data:`LOSS_TYPES` order (the order the torch path adds the types in)."""
        table = dict(zip(self.loss_type, self.weights))
        return {t: table[t] for t in LOSS_TYPES if t in table}

    @property
    def mask(self) -> int:
        """The kernels' ``TYPES`` bit mask (bit k: ``LOSS_TYPES[k]``)."""
        return sum(1 << LOSS_TYPES.index(t) for t in self.loss_type)

    @property
    def type_weights(self) -> tuple[float, ...]:
        """The weight of each of :data:`LOSS_TYPES` (0 for a type not used), as the kernels read them."""
        table = self.weight_of_type
        return tuple(table.get(t, 0.0) for t in LOSS_TYPES)

    @property
    def f_div_id(self) -> int:
        """The kernels' ``F_DIV`` (:data:`fastrl.kernels.dpo_columns.F_DIVERGENCES`)."""
        if self.f_divergence == "alpha" and abs(self.f_alpha - 1.0) < 1e-6:
            return 0  # the α → 1 limit is reverse KL (TRL's fallback)
        return F_DIVERGENCES.index(self.f_divergence)

    @property
    def nll_coef(self) -> float:
        """Coefficient of the batch mean token NLL of the chosen completions."""
        table = dict(zip(self.loss_type, self.weights))
        return table.get("sft", 0.0) + table.get("cpo", 0.0) * self.cpo_alpha + table.get("orpo", 0.0)

    @property
    def reports_nll(self) -> bool:
        """Whether the metrics hold ``nll_loss``."""
        return self.nll_coef != 0.0 or self.rpo_alpha is not None

    @property
    def needs_reference(self) -> bool:
        return any(t not in REFERENCE_FREE for t in self.loss_type)

    @property
    def needs_chosen_lengths(self) -> bool:
        return (any(t in NEEDS_BOTH_LENGTHS for t in self.loss_type) or self.nll_coef != 0.0
                or "sft" in self.loss_type or self.rpo_alpha is not None)

    @property
    def needs_rejected_lengths(self) -> bool:
        return any(t in NEEDS_BOTH_LENGTHS for t in self.loss_type)

    @property
    def sorted_types(self) -> tuple[str, ...]:
        """The types used that sort the batch (a pair's loss then depends on the other pairs)."""
        return tuple(t for t in self.loss_type if t in SORTED_TYPES)

    def norm_rewards(self, has_reference: bool) -> bool:
        """Rewards are β·π/|y| (SimPO / ORPO's convention) for those types without a reference."""
        return not has_reference and any(t in ("simpo", "orpo") for t in self.loss_type)


class PairTensors(NamedTuple):
    """The per-pair tensors of the DPO op, all ``[B]`` on one device (an absent one is None).

    The op's schema is made from these names, in this order.
    """

    pc: torch.Tensor  # π_c, the policy's summed log-probs of the chosen completions
    pr: torch.Tensor  # π_r, of the rejected ones
    qc: torch.Tensor | None  # ρ_c, the reference's (detached)
    qr: torch.Tensor | None  # ρ_r
    lc: torch.Tensor | None  # |y_c| in tokens
    lr: torch.Tensor | None  # |y_r|
    nll: torch.Tensor | None  # summed token NLL of the chosen completions (default −π_c)
    pair_beta: torch.Tensor | None  # dynamic β (detached)
    soft: torch.Tensor | None  # SmPO soft labels p̃ (detached)
    weights: torch.Tensor | None  # WPO pair weights (detached)
    d1: torch.Tensor | None  # AOT's sorted Δ
    d2: torch.Tensor | None  # AOT-unpaired's sorted Δ
    delta: torch.Tensor | None  # bco_pair's δ, a 0-d fp64 tensor


# The inputs the op differentiates, in the order of the rows of its backward's output.
DIFFERENTIABLE = GRAD_ROWS
_REQUIRED = ("pc", "pr")
_PAIRS_SCHEMA = ", ".join(f"Tensor{'' if name in _REQUIRED else '?'} {name}" for name in PairTensors._fields)
_ENCODING_SCHEMA = "int[] ints, float[] floats"
# The ops read the settings back from that encoding, once per distinct setting (a step's calls share a few).
_decode = functools.lru_cache(maxsize=256)(DPOSettings.decode)


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
    """Per-pair β from the reward-model margin δ of each pair (MM-DPO ‡, unchecked against the paper).

    ``β_i = β·(1 + w·(1 − e^{−k·δ_i}))``. Pass the result as ``pair_beta``.

    Args:
        reward_margins: ``[B]`` fp32, bf16, fp16 or fp64, the margins δ.
        beta: the base β > 0.
        w: the weight of the margin term.
        k: the margin's scale.

    Returns:
        ``[B]`` fp32 β, no grad.

    Raises:
        TypeError: ``reward_margins`` not a floating tensor, or a non-number scalar.
        ValueError: ``reward_margins`` not 1-D, or ``beta <= 0``.
    """
    _checks.check_tensor("reward_margins", reward_margins, ndim=1, dtypes=_FLOATS)
    beta = _checks.check_real("beta", beta, low=0.0, low_open=True)
    w = _checks.check_real("w", w)
    k = _checks.check_real("k", k)
    d = reward_margins.detach().float()
    return beta * (1 + w * (1 - torch.exp(-k * d)))


def wpo_weights(chosen_token_logps: torch.Tensor, chosen_log_sum_sq: torch.Tensor, chosen_mask: torch.Tensor,
                rejected_token_logps: torch.Tensor, rejected_log_sum_sq: torch.Tensor,
                rejected_mask: torch.Tensor) -> torch.Tensor:
    """WPO pair weights ``w_c·w_r``, ``w = exp(mean_t(logp_t − log Σ_v p_v²))``.

    WPO Eq. 2 as TRL 1.16's ``use_weighting``, from padded per-token log-probs, per-token
    ``log Σ_v p_v²`` and masks. Pass the result as ``pair_weights``.

    Args:
        chosen_token_logps: ``[B, L]`` fp32, bf16, fp16 or fp64, the chosen completions' token log-probs.
        chosen_log_sum_sq: ``[B, L]`` floating, ``log Σ_v p_v²`` per chosen token.
        chosen_mask: ``[B, L]`` bool or 0/1 integer, the chosen completions' tokens.
        rejected_token_logps: ``[B, L']`` fp32, bf16, fp16 or fp64, the rejected completions'.
        rejected_log_sum_sq: ``[B, L']`` floating.
        rejected_mask: ``[B, L']`` bool or 0/1 integer.

    Returns:
        ``[B]`` fp32 weights, no grad.

    Raises:
        TypeError: a token_logps that is not a floating tensor.
        ValueError: a token_logps not 2-D, or its log_sum_sq / mask of another shape.
    """
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
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    chosen_nll: torch.Tensor | None = None,
    pair_beta: torch.Tensor | None = None,
    soft_labels: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
    settings: DPOSettings | None = None,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A pairwise preference loss (or a weighted sum of several) and its metrics.

    The options are ``settings`` (a :class:`DPOSettings`, where each is documented) or the same
    fields as keywords (``loss_type="ipo", beta=0.2``), not both; ``bco_delta`` may also be a
    one-element tensor (e.g. a running mean), which replaces the setting. Gradients reach
    ``chosen_logps``, ``rejected_logps`` and ``chosen_nll``.

    Args:
        chosen_logps: ``[B]`` fp32, bf16, fp16 or fp64: π_c, the policy's summed completion log-probs
            of the chosen completions; differentiable.
        rejected_logps: ``[B]`` fp32, bf16, fp16 or fp64: π_r, of the rejected ones; differentiable.
        ref_chosen_logps: ``[B]`` floating: ρ_c, the reference's (no gradient; required by every type
            except the reference-free sft, simpo, orpo, cpo, which ignore them).
        ref_rejected_logps: ``[B]`` floating: ρ_r (pass both references or neither).
        chosen_lengths: ``[B]`` int or float, |y_c| in tokens, >= 0; clamped to >= 1 where they divide.
        rejected_lengths: ``[B]`` int or float, |y_r| in tokens, >= 0.
        chosen_nll: ``[B]`` floating, the summed token NLL of the chosen completion; differentiable;
            default ``−π_c``, the right value unless π_c carries LD-DPO weights.
        pair_beta: ``[B]`` floating, dynamic β per pair, > 0, e.g. :func:`dynamic_beta` (MM-DPO ‡,
            unchecked); replaces β everywhere.
        soft_labels: ``[B]`` floating, SmPO preference probabilities p̃ in [0, 1] scaling h (‡,
            unchecked; only on the h-based types).
        pair_weights: ``[B]`` floating, WPO weights w_c·w_r >= 0, e.g. :func:`wpo_weights`, multiplying
            each pair's total and the batch NLL term by their mean (TRL's ``use_weighting``); no
            gradient.
        settings: a :class:`DPOSettings`; or pass its fields as ``**options``.
        **options: the fields of :class:`DPOSettings` (``bco_delta`` also as a one-element tensor).

    Returns:
        ``(loss, metrics)``: ``loss`` 0-d fp32 (fp64 for fp64 inputs); ``metrics`` a dict of detached
        0-d tensors: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
        ``rewards/accuracies`` (batch means of β·r, TRL's naming; β·π/|y| for the reference-free
        simpo / orpo without a reference, as TRL's CPO / ORPO log them), ``logps/chosen``,
        ``logps/rejected`` and, when a type uses it, ``nll_loss``.

    Raises:
        TypeError: an argument of the wrong type or dtype, naming it.
        ValueError: a bad shape, a missing reference or length a type needs, per-pair values with a
            sorting type, bad settings; the value checks (finite inputs, lengths >= 0, p̃ in [0, 1],
            β > 0, weights >= 0) cost one device sync and are skipped under ``torch.compile``.
    """
    bco_delta = options.pop("bco_delta") if isinstance(options.get("bco_delta"), torch.Tensor) else None
    s = DPOSettings.from_options(settings, options, where="dpo_loss")
    _checks.check_tensor("chosen_logps", chosen_logps, ndim=1, dtypes=_FLOATS)
    device, n = chosen_logps.device, chosen_logps.shape[0]
    if n == 0:
        raise ValueError("chosen_logps must hold at least one pair")
    _check_pairs("rejected_logps", rejected_logps, n, device)
    values = [_finite("chosen_logps", chosen_logps), _finite("rejected_logps", rejected_logps)]
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    if ref_chosen_logps is None and s.needs_reference:
        need = [t for t in s.loss_type if t not in REFERENCE_FREE]
        raise ValueError(f"ref_chosen_logps and ref_rejected_logps are required by loss type {', '.join(need)} "
                         "(only sft, simpo, orpo, cpo are reference-free)")
    if ref_chosen_logps is not None:
        _check_pairs("ref_chosen_logps", ref_chosen_logps, n, device)
        _check_pairs("ref_rejected_logps", ref_rejected_logps, n, device)
        values += [_finite("ref_chosen_logps", ref_chosen_logps), _finite("ref_rejected_logps", ref_rejected_logps)]
        # The reference is a constant of the loss.
        ref_chosen_logps, ref_rejected_logps = ref_chosen_logps.detach(), ref_rejected_logps.detach()
    if s.needs_chosen_lengths and chosen_lengths is None:
        raise ValueError(f"chosen_lengths is required by loss type {', '.join(s.loss_type)}"
                         f"{' with rpo_alpha' if s.rpo_alpha is not None else ''} (completion lengths in tokens)")
    if s.needs_rejected_lengths and rejected_lengths is None:
        raise ValueError(f"rejected_lengths is required by loss type {', '.join(s.loss_type)} "
                         "(completion lengths in tokens)")
    for name, t in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if t is not None:
            _check_pairs(name, t, n, device, integer_ok=True)
            values += [_finite(name, t), ((t < 0).any(), f"{name} must be >= 0")]
    if not s.needs_chosen_lengths and not s.needs_rejected_lengths:
        chosen_lengths = rejected_lengths = None  # unused: keep them out of the kernel
    elif not s.needs_rejected_lengths:
        rejected_lengths = None
    if chosen_nll is not None:
        _check_pairs("chosen_nll", chosen_nll, n, device)
        values.append(_finite("chosen_nll", chosen_nll))
    for name, t in (("pair_beta", pair_beta), ("soft_labels", soft_labels), ("pair_weights", pair_weights)):
        if t is not None:
            _check_pairs(name, t, n, device)
            if s.sorted_types:
                raise ValueError(f"{name} cannot be used with loss type {', '.join(s.sorted_types)}: those sort "
                                 "the batch, so per-pair values no longer line up with the pairs")
            values.append(_finite(name, t))
    if pair_beta is not None:
        pair_beta = pair_beta.detach()
        values.append(((pair_beta <= 0).any(), "pair_beta must be > 0"))
    if soft_labels is not None:
        other = [t for t in s.loss_type if t not in SOFT_LABEL_TYPES]
        if other:
            raise ValueError(f"soft_labels apply only to loss types {', '.join(sorted(SOFT_LABEL_TYPES))}; "
                             f"not to {', '.join(other)}")
        soft_labels = soft_labels.detach()
        values.append((((soft_labels < 0) | (soft_labels > 1)).any(), "soft_labels must be in [0, 1]"))
    if pair_weights is not None:
        pair_weights = pair_weights.detach()
        values.append(((pair_weights < 0).any(), "pair_weights must be >= 0"))
    delta = None
    if bco_delta is not None:
        _checks.check_tensor("bco_delta", bco_delta, dtypes=_FLOATS, device=device)
        if bco_delta.numel() != 1:
            raise ValueError(f"bco_delta must be a number or a one-element tensor, got shape {tuple(bco_delta.shape)}")
        values.append(_finite("bco_delta", bco_delta))
        delta = bco_delta.detach().reshape(()).to(torch.float64)
    elif "bco_pair" in s.loss_type:  # (a compiled graph holds it as a constant)
        delta = torch.tensor(s.bco_delta, dtype=torch.float64, device=device) if torch.compiler.is_compiling() \
            else _scalar(s.bco_delta, device)
    if "bco_pair" not in s.loss_type:
        delta = None
    _checks.raise_first(values)

    d1 = d2 = None
    if "aot" in s.loss_type:
        d1 = torch_dpo.aot_delta(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if "aot_unpaired" in s.loss_type:
        d2 = torch_dpo.aot_unpaired_delta(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    pairs = PairTensors(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
                        rejected_lengths, chosen_nll, pair_beta, soft_labels, pair_weights, d1, d2, delta)
    stats = _dpo_loss_op(*pairs, *s.encoded)
    detached = stats.detach()
    metrics = {name: detached[STAT[name]] for name in METRICS}
    if s.reports_nll:
        metrics["nll_loss"] = detached[STAT["nll_loss"]]
    return stats[STAT["loss"]], metrics


# ---------------------------------------------------------------------------------------------------
# The operator: Triton on CUDA, the torch implementation otherwise.


def _out_dtype(p: PairTensors) -> torch.dtype:
    return torch_dpo.compute_dtype(p.pc, p.pr, p.qc, p.qr, p.nll, p.pair_beta, p.weights)


def _torch_stats(p: PairTensors, s: DPOSettings) -> torch.Tensor:
    """The stats vector from :func:`fastrl.losses.torch_impl.dpo.dpo_loss_stats`."""
    return torch_dpo.dpo_loss_stats(
        p.pc, p.pr, p.qc, p.qr, loss_weights=s.weight_of_type, beta=s.beta, pair_beta=p.pair_beta,
        pair_weights=p.weights, cpo_alpha=s.cpo_alpha, norm_rewards=s.norm_rewards(p.qc is not None),
        label_smoothing=s.label_smoothing, f_divergence=F_DIVERGENCES[s.f_div_id], f_alpha=s.f_alpha,
        chosen_lengths=p.lc, rejected_lengths=p.lr, gamma_beta_ratio=s.gamma_beta_ratio, rpo_alpha=s.rpo_alpha,
        chosen_nll=p.nll, soft_labels=p.soft, discopop_tau=s.discopop_tau, dpop_lambda=s.dpop_lambda,
        bco_delta=0.0 if p.delta is None else p.delta, aot_delta=p.d1, aot_unpaired_delta=p.d2)


def _torch_grads(grad: torch.Tensor, p: PairTensors, s: DPOSettings) -> torch.Tensor:
    """The backward of the torch path: the vjp of the loss element of :func:`_torch_stats` with respect to
    the :data:`DIFFERENTIABLE` inputs, as the rows of a ``[5, B]`` tensor (zero rows for absent inputs)."""
    names = [name for name in DIFFERENTIABLE if getattr(p, name) is not None]

    def loss_of(*xs):
        return _torch_stats(p._replace(**dict(zip(names, xs))), s)[STAT["loss"]]

    _, vjp = torch.func.vjp(loss_of, *(getattr(p, name) for name in names))
    dtype = _out_dtype(p)
    grads = dict(zip(names, vjp(grad[STAT["loss"]].to(dtype))))
    out = torch.zeros(len(DIFFERENTIABLE), p.pc.shape[0], dtype=dtype, device=p.pc.device)
    for row, name in enumerate(DIFFERENTIABLE):
        if name in grads:
            out[row] = grads[name]
    return out


def _kernel_args(p: PairTensors, s: DPOSettings):
    """The launch arguments both kernels share: the pointers (an absent input replaced by ``pc``, never
    read), the per-type weights, the scalars, and the constexprs (HAS_* flags, types, f-divergence)."""
    tensors = [t.contiguous() if t is not None else p.pc for t in p]
    scalars = (s.beta, s.label_smoothing, s.f_alpha, s.gamma_beta_ratio, s.discopop_tau,
               0.0 if s.rpo_alpha is None else s.rpo_alpha, s.dpop_lambda)
    flags = dict(HAS_REF=p.qc is not None, HAS_LC=p.lc is not None, HAS_LR=p.lr is not None,
                 HAS_NLL=p.nll is not None, HAS_BETA=p.pair_beta is not None, HAS_SOFT=p.soft is not None,
                 HAS_W=p.weights is not None, HAS_D1=p.d1 is not None, HAS_D2=p.d2 is not None,
                 HAS_DELTA=p.delta is not None, TYPES=s.mask, F_DIV=s.f_div_id, HAS_RPO=s.rpo_alpha is not None)
    return tensors, _type_weights(s.type_weights, p.pc.device), scalars, flags


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


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _dpo_loss_impl(*args) -> torch.Tensor:
    """The operator under :func:`dpo_loss` (arguments checked there): ``(*PairTensors, ints, floats)`` with
    the settings as :meth:`DPOSettings.encode` wrote them; returns the vector of
    :data:`fastrl.kernels.dpo_columns.DPO_STATS`, element 0 the loss."""
    *tensors, ints, floats = args
    p, s = PairTensors(*tensors), _decode(tuple(ints), tuple(floats))
    if resolve(p.pc.device) == "torch":
        return _torch_stats(p, s)
    from fastrl.kernels import launch
    from fastrl.kernels.dpo_loss import NSTAT, dpo_loss_finish_kernel, dpo_loss_fwd_kernel

    n = p.pc.shape[0]
    tensors, tw, scalars, flags = _kernel_args(p, s)
    block = _block(n)
    n_blocks = (n + block - 1) // block
    partials = torch.empty(n_blocks, NSTAT, dtype=torch.float32, device=p.pc.device)
    launch(dpo_loss_fwd_kernel, (n_blocks,), *tensors, tw, partials, n, *scalars, **flags,
           NORM_REWARDS=s.norm_rewards(p.qc is not None), NSTAT=NSTAT, BLOCK=block,
           num_warps=max(1, min(4, block // 64)))
    out = torch.empty(len(DPO_STATS), dtype=_out_dtype(p), device=p.pc.device)
    launch(dpo_loss_finish_kernel, (1,), partials, out, n_blocks, n, s.nll_coef, BATCH_NLL=s.nll_coef != 0.0,
           NSTAT=NSTAT, NSTAT_PAD=NSTAT_PAD, RBLOCK=max(2, min(32, _next_pow2(n_blocks))), num_warps=1)
    return out


_dpo_loss_op = torch.library.custom_op("fastrl::dpo_loss", _dpo_loss_impl, mutates_args=(),
                                       schema=f"({_PAIRS_SCHEMA}, {_ENCODING_SCHEMA}) -> Tensor")


@_dpo_loss_op.register_fake
def _(*args):
    p = PairTensors(*args[:len(PairTensors._fields)])
    return p.pc.new_empty(len(DPO_STATS), dtype=_out_dtype(p))


def _dpo_loss_backward_impl(grad: torch.Tensor, stats: torch.Tensor, *args) -> torch.Tensor:
    """d loss / d :data:`DIFFERENTIABLE` as rows of a [5, B] tensor, times ``grad[0]`` (the gradient of
    the loss element of the stats vector). Rows of absent inputs are unspecified."""
    *tensors, ints, floats = args
    p, s = PairTensors(*tensors), _decode(tuple(ints), tuple(floats))
    if resolve(p.pc.device) == "torch":
        return _torch_grads(grad, p, s)
    from fastrl.kernels import launch
    from fastrl.kernels.dpo_loss import dpo_loss_bwd_kernel

    n = p.pc.shape[0]
    tensors, tw, scalars, flags = _kernel_args(p, s)
    block = _block(n)
    dx = torch.empty(len(DIFFERENTIABLE), n, dtype=_out_dtype(p), device=p.pc.device)
    launch(dpo_loss_bwd_kernel, ((n + block - 1) // block,), grad.contiguous(), stats.contiguous(), *tensors, tw, dx,
           n, *scalars, s.nll_coef, **flags, BATCH_NLL=s.nll_coef != 0.0, BLOCK=block,
           num_warps=max(1, min(4, block // 64)))
    return dx


_dpo_loss_backward = torch.library.custom_op(
    "fastrl::dpo_loss_backward", _dpo_loss_backward_impl, mutates_args=(),
    schema=f"(Tensor grad, Tensor stats, {_PAIRS_SCHEMA}, {_ENCODING_SCHEMA}) -> Tensor")


@_dpo_loss_backward.register_fake
def _(grad, stats, *args):
    p = PairTensors(*args[:len(PairTensors._fields)])
    return p.pc.new_empty(len(DIFFERENTIABLE), p.pc.shape[0], dtype=_out_dtype(p))


def _setup_context(ctx, inputs, output):
    *tensors, ints, floats = inputs
    ctx.save_for_backward(*tensors, output)
    ctx.encoding = (ints, floats)


def _backward(ctx, grad):
    *tensors, stats = ctx.saved_tensors
    p = PairTensors(*tensors)
    dx = _dpo_loss_backward(grad, stats, *p, *ctx.encoding)
    grads = {name: None if getattr(p, name) is None else dx[row].to(getattr(p, name).dtype)
             for row, name in enumerate(DIFFERENTIABLE)}
    return (*PairTensors(**{name: grads.get(name) for name in PairTensors._fields}), None, None)


_dpo_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# Module form


class DPOLoss(nn.Module):
    """Module form of :func:`dpo_loss`: the options in ``__init__`` (checked there), the tensors in ``forward``.

    ``bco_running_mean=True`` (with ``loss_type`` "bco_pair") keeps BCO's reward baseline δ as
    buffers (the count-weighted mean of every β·r_c and β·r_r seen in training mode, updated with
    the batch before its loss, as TRL's BCO ``RunningMoments``); TRL 1.16's DPO ``bco_pair`` uses
    δ = 0, the default. In eval mode δ is read, not updated.

    Args:
        loss_type: one loss type or a list (also a field of the settings), or None.
        settings: a :class:`DPOSettings`; or pass its fields as ``**options``.
        bco_running_mean: keep BCO's running reward mean as δ (needs ``loss_type`` "bco_pair").
        **options: the fields of :class:`DPOSettings`.

    Raises:
        TypeError: bad settings, naming the field.
        ValueError: bad settings, or ``bco_running_mean`` without "bco_pair".
    """

    def __init__(self, loss_type: str | Sequence[str] | None = None, *, settings: DPOSettings | None = None,
                 bco_running_mean: bool = False, **options):
        super().__init__()
        if loss_type is not None:
            options["loss_type"] = loss_type
        self.settings = DPOSettings.from_options(settings, options, where="DPOLoss")
        self.bco_running_mean = _checks.check_bool("bco_running_mean", bco_running_mean)
        if bco_running_mean:
            if "bco_pair" not in self.settings.loss_type:
                raise ValueError("bco_running_mean needs loss_type 'bco_pair'")
            from fastrl.losses.preference import RunningMean

            self.running = RunningMean()

    def forward(self, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None, *,
                chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
                chosen_nll: torch.Tensor | None = None, pair_beta: torch.Tensor | None = None,
                soft_labels: torch.Tensor | None = None, pair_weights: torch.Tensor | None = None,
                bco_delta: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one batch of pairs: :func:`dpo_loss` with this module's settings.

        Args:
            chosen_logps: ``[B]`` fp32, bf16, fp16 or fp64, as :func:`dpo_loss`.
            rejected_logps: ``[B]`` fp32, bf16, fp16 or fp64.
            ref_chosen_logps: ``[B]`` floating, or None.
            ref_rejected_logps: ``[B]`` floating, or None.
            chosen_lengths: ``[B]`` int or float, or None.
            rejected_lengths: ``[B]`` int or float, or None.
            chosen_nll: ``[B]`` floating, or None.
            pair_beta: ``[B]`` floating, or None.
            soft_labels: ``[B]`` floating, or None.
            pair_weights: ``[B]`` floating, or None.
            bco_delta: a number or a one-element (``[]`` / ``[1]``) floating tensor, which replaces the
                setting for this call (with ``bco_running_mean``, the running mean is used instead).

        Returns:
            ``(loss, metrics)`` as :func:`dpo_loss`.

        Raises:
            ValueError: as :func:`dpo_loss`; with ``bco_running_mean``, missing references.
        """
        settings = self.settings
        if bco_delta is not None and not isinstance(bco_delta, torch.Tensor):
            settings, bco_delta = settings.replace(bco_delta=bco_delta), None
        if self.bco_running_mean:
            if ref_chosen_logps is None or ref_rejected_logps is None:
                raise ValueError("ref_chosen_logps and ref_rejected_logps are required by loss type bco_pair")
            if self.training:
                with torch.no_grad():
                    b = settings.beta if pair_beta is None else pair_beta.detach()
                    rewards = torch.cat([b * (chosen_logps.detach() - ref_chosen_logps),
                                         b * (rejected_logps.detach() - ref_rejected_logps)])
                    self.running.update(rewards)
            bco_delta = self.running.mean
        tensors = {} if bco_delta is None else {"bco_delta": bco_delta}
        return dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, chosen_nll=chosen_nll,
                        pair_beta=pair_beta, soft_labels=soft_labels, pair_weights=pair_weights, settings=settings,
                        **tensors)

    def extra_repr(self) -> str:
        s = self.settings
        return f"loss_type={list(s.loss_type)}, beta={s.beta}"
