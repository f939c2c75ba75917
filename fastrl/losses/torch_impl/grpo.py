"""The torch implementation of the GRPO-family loss: readable, fp64 when given fp64, and slow.

The fused Triton kernels of :mod:`fastrl.losses.grpo` are tested against the functions here, and
these against an independent per-sequence implementation in ``tests/losses/test_grpo_loss.py``.
They are also the ``torch`` backend (the CPU path). The maths is that of ``docs/losses.md#grpo-family``
with TRL 1.16 ``GRPOTrainer._compute_loss`` conventions; verl names are accepted
where verl has the same thing (KL estimators, ``loss_agg_mode``, ``clip_ratio_c``, GSPO-token).

The computation is split the way the kernels split it:

1. :func:`grpo_sequence_stats` — per-token terms, summed per sequence into ``stats`` [B, NSTATS]:
   the summed per-token loss ``S_i`` (column ``LOSS``), the summed entropy ``E_i`` (``ENT``), the
   token count, metric sums, and per-sequence constants the backward reads again.
2. :func:`combine` — the loss ``sum_i c_i S_i - entropy_coef * sum_i e_i E_i`` with the
   aggregation weights ``c_i`` / ``e_i`` of :func:`aggregation_weights`, and the metrics.
3. :func:`grpo_sequence_stats_backward` — the gradient of ``sum_i gS_i S_i + gE_i E_i`` with respect
   to the log-probs and the entropy, written out by hand (what the backward kernel computes).

The loss is linear in ``S`` and ``E`` with weights that depend only on the token counts, so
``d loss / d logps = grpo_sequence_stats_backward(gS=c, gE=-entropy_coef * e)``.

:class:`GRPOSettings` (exported as :class:`fastrl.losses.GRPOSettings`) is defined here, below the
names it chooses among, because every function here reads it and the custom ops of
:mod:`fastrl.losses.grpo` import this module (not the other way round).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from fastrl.kernels.grpo_columns import (COUNT, COUPLING, DUAL, ENT, HIGH, IS_WEIGHT, KL, LOG_EPS, LOG_RATIO, LOSS,
                                         LOW, NSTATS, OFF_POLICY_KL, PHI, RATIO, VESPO_LOG_W)
from fastrl.losses.settings import Settings, option

__all__ = ["GRPOSettings", "LOSS_TYPES", "LOSS_AGG_MODES", "DEFAULT_AGG", "POLICY", "KL_ESTIMATORS", "KL_ALIASES",
           "KL_NAMES", "IS_LEVELS", "IS_MODES", "num_sequences", "advantages_per_token", "aggregation_weights",
           "token_counts", "grpo_token_weights", "grpo_sequence_stats", "grpo_sequence_stats_backward", "combine",
           "grpo_loss"]

# The columns of the per-sequence ``stats`` [B, NSTATS] (fp32; fp64 for fp64 inputs) and vespo's clamp
# LOG_EPS are the kernels' (fastrl.kernels.grpo_columns, one module both implementations read).

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")
# The default aggregation of each loss type (TRL 1.16). "grpo": per-sequence token mean, then the mean
# over all B sequences (empty ones count as 0); "bnpo": sum / tokens of this batch; "dr_grpo": sum /
# (B * max_completion_length); "dapo": sum / num_items_in_batch; "luspo": mean over the B sequences
# of their token sums.
DEFAULT_AGG = {"grpo": "grpo", "sapo": "grpo", "bnpo": "bnpo", "dr_grpo": "dr_grpo", "dapo": "dapo",
               "cispo": "dapo", "vespo": "dapo", "luspo": "luspo"}
# Per-token policy term of each loss type.
POLICY = {"grpo": "clip", "bnpo": "clip", "dr_grpo": "clip", "dapo": "clip", "luspo": "clip", "cispo": "cispo",
          "sapo": "sapo", "vespo": "vespo"}
KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "low_var_kl")  # the canonical names (GRPOSettings.kl_estimator)
KL_ALIASES = {"kl": "k1", "mse": "k2"}
KL_NAMES = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")  # what GRPOSettings.kl accepts, each also with "+"
IS_LEVELS = ("token", "sequence", "sequence_token")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@dataclasses.dataclass(frozen=True)
class GRPOSettings(Settings):
    """The settings of a GRPO-family loss, checked on construction.

    They serve :func:`fastrl.losses.grpo_loss` and the functions and modules built on it; each field is
    also a keyword of those functions (their ``**options``). What the options mean in the loss is
    written out in :func:`fastrl.losses.grpo_loss`. The properties below the fields are what the
    implementations read: the aggregation, the policy term, the clip range and the KL estimator
    resolved from the options.

    Args:
        loss_type: the policy loss: grpo, bnpo, dr_grpo, dapo (default), cispo, sapo, luspo, vespo.
        epsilon: the lower clip ε of the ratio, ``1 - epsilon`` (0.2; >= 0).
        epsilon_high: the upper clip ε (default ``epsilon``): the clip range is
            ``[1 - epsilon, 1 + epsilon_high]``; cispo: ``epsilon_high`` caps the ratio.
        delta: two-sided clipping bound of the unclipped term's ratio (> 1).
        clip_ratio_c: verl's dual-clip c (> 1).
        beta: the KL coefficient (>= 0; 0 = no reference model).
        kl: the KL estimator: k1 (kl), abs, k2 (mse), k3 (default), low_var_kl, each optionally with a
            trailing ``+`` (the value of the estimator, the gradient of k2).
        use_bias_correction_kl: KL times the ratio (TRL).
        importance_sampling_level: token (default), sequence (GSPO) or sequence_token (GSPO-token).
        is_mode: the sampler importance-weight mode (from ``sampler_logps``): token_truncate (default),
            token_mask, sequence_truncate, sequence_mask.
        is_cap: the sampler importance-weight cap (> 0).
        is_min: the sampler importance-weight floor (>= 0, below ``is_cap``).
        off_policy_mask_threshold: drop negative-advantage sequences this far off-policy.
        entropy_coef: the entropy bonus coefficient.
        max_completion_length: the normaliser of dr_grpo / seq-mean-token-sum-norm (>= 1; default: L
            padded, the longest sequence packed).
        sapo_tau_pos: sapo's temperature where A > 0 (> 0).
        sapo_tau_neg: sapo's temperature where A <= 0 (> 0).
        vespo_k: vespo's k, a number or a (positive, negative advantage) pair.
        vespo_lambda: vespo's λ, a number or a (positive, negative advantage) pair.
        loss_agg_mode: a verl aggregation (token-mean, seq-mean-token-mean, seq-mean-token-sum,
            seq-mean-token-sum-norm, token-sum) in place of the loss type's.

    Raises:
        TypeError: a field of the wrong type, naming it.
        ValueError: a field out of range or not among its choices, ``is_min >= is_cap``, or a
            sequence ``is_mode`` with vespo.

    >>> s = GRPOSettings(loss_type="sapo", kl="mse+", vespo_k=4)
    >>> s.agg, s.policy, s.eps_high, s.kl_estimator, s.kl_straight_through, s.vespo_k
    ('grpo', 'sapo', 0.2, 'k2', False, (4.0, 4.0))
    """

    family: ClassVar[str] = "grpo"
    peer_names: ClassVar[dict[str, str]] = {
        "epsilon_low": "'epsilon'", "clip_ratio_low": "'epsilon'", "clip_ratio_high": "'epsilon_high'",
        "sapo_temperature_pos": "'sapo_tau_pos'", "sapo_temperature_neg": "'sapo_tau_neg'",
        "vespo_k_pos": "'vespo_k' (a (positive, negative) pair)",
        "vespo_k_neg": "'vespo_k' (a (positive, negative) pair)",
        "vespo_lambda_pos": "'vespo_lambda' (a (positive, negative) pair)",
        "vespo_lambda_neg": "'vespo_lambda' (a (positive, negative) pair)",
        "kl_loss_coef": "'beta'", "kl_loss_type": "'kl'", "kl_estimator": "'kl'", "entropy_coeff": "'entropy_coef'",
        "vllm_importance_sampling_mode": "'is_mode'", "vllm_importance_sampling_cap": "'is_cap'",
        "vllm_importance_sampling_clip_max": "'is_cap'", "vllm_importance_sampling_clip_min": "'is_min'",
        "vllm_is_ratio": "forward's sampler_logps (the engine's log-probs; the weight is exp(old - sampler))",
        "use_ref_model": "beta > 0 with forward's ref_logps (beta=0: no reference)",
        "compiled": "none, leave it out (fastrl's ops need no torch.compile)",
        "chunk_size": "'workspace_bytes' of the fused-linear losses (a byte budget, not a count)",
        "ignore_index": "forward's mask (0 at the positions not scored)",
        "temperature": "'temperature' of FusedLinearGRPOLoss (log-probs taken from hidden states)",
    }

    loss_type: str = option("dapo", "policy loss: grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo",
                            choices=LOSS_TYPES)
    epsilon: float = option(0.2, "lower clip ε of the ratio (1 - epsilon)", low=0.0)
    epsilon_high: float | None = option(None, "upper clip ε of the ratio (default epsilon; cispo: the ratio's cap)",
                                        low=0.0)
    delta: float | None = option(None, "two-sided clipping bound of the ratio (> 1)", low=1.0, low_open=True)
    clip_ratio_c: float | None = option(None, "dual-clip c (verl, > 1)", low=1.0, low_open=True)
    beta: float = option(0.0, "KL coefficient (0 = no reference model)", low=0.0)
    kl: str = option("k3", "KL estimator: k1 (kl), abs, k2 (mse), k3, low_var_kl; a trailing + keeps the value "
                     "with the gradient of k2", choices=KL_NAMES + tuple(n + "+" for n in KL_NAMES))
    use_bias_correction_kl: bool = option(False, "TRL's KL × ratio")
    importance_sampling_level: str = option("token", "token, sequence (GSPO) or sequence_token", choices=IS_LEVELS)
    is_mode: str = option("token_truncate", "sampler importance-weight mode: token_truncate, token_mask, "
                          "sequence_truncate, sequence_mask", choices=IS_MODES)
    is_cap: float | None = option(None, "sampler importance-weight cap", low=0.0, low_open=True)
    is_min: float | None = option(None, "sampler importance-weight floor", low=0.0)
    off_policy_mask_threshold: float | None = option(None, "drop negative-advantage sequences this far off-policy")
    entropy_coef: float = option(0.0, "entropy bonus coefficient")
    max_completion_length: int | None = option(None, "normaliser of dr_grpo and seq-mean-token-sum-norm (default: "
                                               "L padded, the longest sequence packed)", integer=True, low=1)
    sapo_tau_pos: float = option(1.0, "sapo temperature where A > 0", low=0.0, low_open=True)
    sapo_tau_neg: float = option(1.05, "sapo temperature where A <= 0", low=0.0, low_open=True)
    vespo_k: tuple[float, float] = option((2.0, 3.0), "vespo k: a number or a (positive, negative advantage) pair",
                                          many=True, length=2)
    vespo_lambda: tuple[float, float] = option((3.0, 2.0), "vespo λ: a number or a (positive, negative advantage) "
                                               "pair", many=True, length=2)
    loss_agg_mode: str | None = option(None, "verl aggregation name (overrides the loss type's)",
                                       choices=LOSS_AGG_MODES)

    def __post_init__(self) -> None:
        # the wording of three refusals, more specific than the generic field checks' (which follow)
        if not isinstance(self.loss_type, str):
            raise TypeError(f"loss_type must be a str, got {type(self.loss_type).__name__}")
        if isinstance(self.kl, str) and self.kl.removesuffix("+") not in KL_NAMES:
            raise ValueError(f"kl must be one of {', '.join(KL_NAMES)} (optionally with a trailing '+'); "
                             f"got {self.kl!r}")
        for name in ("vespo_k", "vespo_lambda"):
            value = getattr(self, name)
            if isinstance(value, (tuple, list)) and len(value) != 2:
                raise ValueError(f"{name} must be a number or a (positive, negative advantage) pair, got {value!r}")
        super().__post_init__()

    def check(self) -> None:
        if self.is_cap is not None and self.is_min is not None and self.is_min >= self.is_cap:
            raise ValueError(f"is_min ({self.is_min}) must be less than is_cap ({self.is_cap})")
        if self.loss_type == "vespo" and self.is_mode.startswith("sequence"):
            raise ValueError(f"is_mode must be token_truncate or token_mask with loss_type='vespo' (TRL); "
                             f"got {self.is_mode!r}")

    # ---- what the implementations read

    @property
    def agg(self) -> str:
        """The loss's aggregation: ``loss_agg_mode``, else the loss type's (:data:`DEFAULT_AGG`)."""
        return self.loss_agg_mode or DEFAULT_AGG[self.loss_type]

    @property
    def entropy_agg(self) -> str:
        """The entropy bonus's aggregation: the batch's token mean (TRL), or ``loss_agg_mode`` (verl)."""
        return self.loss_agg_mode or "bnpo"

    @property
    def policy(self) -> str:
        """The per-token policy term: clip, cispo, sapo or vespo."""
        return POLICY[self.loss_type]

    @property
    def level(self) -> str:
        return self.importance_sampling_level

    @property
    def eps_low(self) -> float:
        return self.epsilon

    @property
    def eps_high(self) -> float:
        """``epsilon_high``, ``epsilon`` when not given."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def kl_estimator(self) -> str:
        """The canonical name of ``kl`` (:data:`KL_ESTIMATORS`): aliases resolved, ``+`` dropped."""
        name = self.kl.rstrip("+")
        return KL_ALIASES.get(name, name)

    @property
    def kl_straight_through(self) -> bool:
        """verl's ``"k3+"`` etc.: the value of the estimator with the gradient of k2 (k2 is its own)."""
        return self.kl.endswith("+") and self.kl_estimator != "k2"


# ------------------------------------------------------------------------------------------------
# Layout: every per-token tensor is read as a flat list of positions, each with its sequence


def num_sequences(shape, cu_seqlens: torch.Tensor | None) -> int:
    """The number of sequences B of a batch in either layout.

    Args:
        shape: the logps shape, ``(B, L)`` padded or ``(T,)`` packed.
        cu_seqlens: ``[B+1]`` int32 or int64 offsets (packed), or None (padded).

    Returns:
        B, an int.
    """
    return cu_seqlens.shape[0] - 1 if cu_seqlens is not None else shape[0]


def advantages_per_token(advantages: torch.Tensor, shape, cu_seqlens: torch.Tensor | None) -> bool:
    """Whether ``advantages`` holds one value per token (the logps shape) rather than one per sequence.

    Per sequence is ``[B]`` or ``[B, 1]``. Packed with T == B, a 1-D ``advantages`` is read per sequence.

    Args:
        advantages: ``[B]``, ``[B, 1]`` or the logps shape; any floating dtype (only the shape is read).
        shape: the logps shape, ``(B, L)`` or ``(T,)``.
        cu_seqlens: ``[B+1]`` int32 or int64 (packed), or None.

    Returns:
        True for per-token advantages.
    """
    b = num_sequences(shape, cu_seqlens)
    return tuple(advantages.shape) not in ((b,), (b, 1))


def _layout(shape, mask, cu_seqlens, device):
    """(B, seq [P] int64, valid [P] bool) over the P = prod(shape) positions: the sequence of each
    position, and whether it is one of that sequence's tokens."""
    if cu_seqlens is not None:
        b, total = cu_seqlens.shape[0] - 1, shape[0]
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq = torch.repeat_interleave(torch.arange(b, device=device), lengths, output_size=total)
        return b, seq, torch.ones(total, dtype=torch.bool, device=device)
    b, length = shape
    seq = torch.arange(b, device=device).repeat_interleave(length)
    return b, seq, (mask != 0).reshape(-1)


def aggregation_weights(counts: torch.Tensor, agg: str, *, num_items_in_batch=None,
                        max_completion_length=None) -> torch.Tensor:
    """The weight ``c_i`` of each sequence's summed per-token loss in the aggregated loss.

    ``loss = sum_i c_i * sum_{t in i} l_t``. With B sequences of n_i tokens each, N = sum n_i and
    B' = the sequences with n_i > 0:

    - ``grpo`` (loss types grpo, sapo): 1 / (B * max(n_i, 1)) (TRL: empty sequences count in the mean)
    - ``bnpo``: 1 / max(N, 1)
    - ``dr_grpo``: 1 / (B * max_completion_length)
    - ``dapo`` (dapo, cispo, vespo) and ``token-mean``: 1 / max(num_items_in_batch, 1), default N
    - ``luspo``: 1 / B
    - ``seq-mean-token-mean``: 1 / (B' * n_i) for n_i > 0 (verl)
    - ``seq-mean-token-sum``: 1 / B' (verl)
    - ``seq-mean-token-sum-norm``: 1 / max_completion_length (verl: no division by B)
    - ``token-sum``: 1

    Every weight is finite: an empty batch aggregates to 0.

    Args:
        counts: ``[B]`` floating (fp32 or fp64), the sequences' token counts.
        agg: the aggregation, one of the names above.
        num_items_in_batch: a number or a 0-d tensor (default N).
        max_completion_length: a number or a 0-d tensor (default: the longest sequence).

    Returns:
        ``[B]`` in the dtype of ``counts``.

    Raises:
        ValueError: an unknown ``agg``.
    """
    b = counts.shape[0]

    def constant(norm):  # 1 / max(norm, 1) for every sequence; a Python number stays on the host (no copy)
        if isinstance(norm, torch.Tensor):
            return (1.0 / norm.to(device=counts.device, dtype=counts.dtype).clamp(min=1)).expand(b)
        return counts.new_full((b,), 1.0 / max(float(norm), 1.0))

    if agg in ("dr_grpo", "seq-mean-token-sum-norm"):
        if max_completion_length is None:
            max_completion_length = counts.max() if b else 1
        if agg == "seq-mean-token-sum-norm":
            return constant(max_completion_length)
        return constant(max_completion_length) / max(b, 1)  # max_completion_length >= 1: the clamp is moot
    if agg == "grpo":
        return 1.0 / (b * counts.clamp(min=1))
    if agg == "luspo":
        return constant(b)
    if agg in ("bnpo", "dapo", "token-mean"):
        if agg == "bnpo" or num_items_in_batch is None:
            num_items_in_batch = counts.sum()
        return constant(num_items_in_batch)
    if agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        nonempty = counts > 0
        per_seq = 1.0 / nonempty.sum().to(counts.dtype).clamp(min=1)
        if agg == "seq-mean-token-mean":
            per_seq = per_seq / counts.clamp(min=1)
        return torch.where(nonempty, per_seq, 0.0)
    if agg == "token-sum":
        return counts.new_ones(b)
    raise ValueError(f"unknown aggregation {agg!r}")


def token_counts(shape, mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                 dtype=torch.float32) -> torch.Tensor:
    """The token count of each sequence.

    Args:
        shape: the logps shape, ``(B, L)`` or ``(T,)``.
        mask: ``[B, L]`` bool or 0/1 integer (padded), or None.
        cu_seqlens: ``[B+1]`` int32 or int64 (packed), or None.
        dtype: the result's dtype (fp32 by default).

    Returns:
        ``[B]`` counts in ``dtype``.
    """
    if cu_seqlens is not None:
        return (cu_seqlens[1:] - cu_seqlens[:-1]).to(dtype)
    return (mask != 0).sum(-1).to(dtype)


def grpo_token_weights(mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None, *,
                       shape=None, agg: str = "dapo", num_items_in_batch=None, max_completion_length=None,
                       dtype=torch.float32) -> torch.Tensor:
    """Per-token aggregation weights ``w_t = c_{seq(t)}`` (0 off the sequences), in the logps layout.

    Args:
        mask: ``[B, L]`` bool or 0/1 integer (padded layout), or None.
        cu_seqlens: ``[B+1]`` int32 or int64 (packed layout), or None.
        shape: ``(T,)``, required with ``cu_seqlens``.
        agg: the aggregation (:func:`aggregation_weights`).
        num_items_in_batch: a number or a 0-d tensor, as :func:`aggregation_weights`.
        max_completion_length: a number or a 0-d tensor (default L padded).
        dtype: the result's dtype (fp32 by default).

    Returns:
        ``[B, L]`` for ``mask`` [B, L], ``[T]`` for ``cu_seqlens``, in ``dtype``.
    """
    if cu_seqlens is not None:
        shape = tuple(shape)
        device = cu_seqlens.device
    else:
        shape, device = tuple(mask.shape), mask.device
    counts = token_counts(shape, mask, cu_seqlens, dtype)
    if max_completion_length is None and cu_seqlens is None and agg in ("dr_grpo", "seq-mean-token-sum-norm"):
        max_completion_length = shape[1]
    c = aggregation_weights(counts, agg, num_items_in_batch=num_items_in_batch,
                            max_completion_length=max_completion_length)
    _, seq, valid = _layout(shape, mask, cu_seqlens, device)
    if seq.numel() == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.where(valid, c[seq], 0.0).reshape(shape)


# ------------------------------------------------------------------------------------------------
# Per-token terms


def _isw(log_ratio: torch.Tensor, s: GRPOSettings) -> torch.Tensor:
    """The sampler importance weight from log(pi_old / pi_sampler): clamped (truncate) or zeroed
    outside [is_min, is_cap] (mask)."""
    w = torch.exp(log_ratio)
    lo = -math.inf if s.is_min is None else s.is_min
    hi = math.inf if s.is_cap is None else s.is_cap
    if s.is_mode.endswith("truncate"):
        return w.clamp(min=lo, max=hi)
    return torch.where((w < lo) | (w > hi), 0.0, w)


def _kl_terms(lp: torch.Tensor, ref: torch.Tensor, s: GRPOSettings):
    """(value, d value / d lp) of the per-token KL estimator between pi (lp) and pi_ref (ref)."""
    x = lp - ref
    if s.kl_estimator == "k1":
        value, grad = x, torch.ones_like(x)
    elif s.kl_estimator == "abs":
        value, grad = x.abs(), torch.sign(x)
    elif s.kl_estimator == "k2":
        value, grad = 0.5 * x * x, x
    elif s.kl_estimator == "k3":
        value, grad = torch.exp(-x) + x - 1.0, 1.0 - torch.exp(-x)
    else:  # low_var_kl, verl's clamped k3
        d = (-x).clamp(-20.0, 20.0)
        raw = torch.exp(d) - d - 1.0
        value = raw.clamp(-10.0, 10.0)
        grad = torch.where((-x >= -20) & (-x <= 20) & (raw >= -10) & (raw <= 10), 1.0 - torch.exp(d), 0.0)
    if s.kl_straight_through:  # value of the estimator, gradient of k2
        value = 0.5 * x * x - (0.5 * x * x).detach() + value.detach()
        grad = x
    return value, grad.detach()


def _policy_terms(r: torch.Tensor, adv: torch.Tensor, lp: torch.Tensor, phi: torch.Tensor | None, s: GRPOSettings):
    """(P, dP/dr, dP/dlp, low, high, dual) of the per-token policy loss P at ratio r (the
    derivatives and indicators detached)."""
    zero = torch.zeros_like(r)
    low = high = dual = zero.bool()
    if s.policy == "clip":
        r1 = r if s.delta is None else r.clamp(max=s.delta)  # two-sided clipping (INTELLECT-2)
        r2 = r.clamp(1.0 - s.eps_low, 1.0 + s.eps_high)
        a, b = r1 * adv, r2 * adv
        loss = -torch.minimum(a, b)
        d1 = (r <= s.delta).to(r.dtype) if s.delta is not None else torch.ones_like(r)
        d2 = ((r >= 1.0 - s.eps_low) & (r <= 1.0 + s.eps_high)).to(r.dtype)
        # torch.minimum sends the gradient to the smaller input, half to each on a tie
        d_min = torch.where(a < b, d1, torch.where(b < a, d2, 0.5 * (d1 + d2)))
        d_r = -adv * d_min
        r_c = r1.detach()
        low = (r_c < 1.0 - s.eps_low) & (adv < 0)
        high = (r_c > 1.0 + s.eps_high) & (adv > 0)
        if s.clip_ratio_c is not None:  # dual clip (verl): for A < 0 the loss is at most -c * A
            bound = -s.clip_ratio_c * adv
            neg = adv < 0
            dual = neg & (loss.detach() > bound)
            factor = torch.where(loss < bound, 1.0, torch.where(loss == bound, 0.5, 0.0))
            d_r = torch.where(neg, d_r * factor, d_r)
            loss = torch.where(neg, torch.minimum(bound, loss), loss)
        return loss, d_r.detach(), zero, low, high, dual
    if s.policy == "cispo":
        weight = r.clamp(max=s.eps_high).detach()
        high = (r.detach() > s.eps_high) & (adv > 0)
        return -weight * adv * lp, zero, (-weight * adv).detach(), low, high, dual
    if s.policy == "sapo":
        tau = _pick(adv > 0, s.sapo_tau_pos, s.sapo_tau_neg, r)
        gate = torch.sigmoid(tau * (r - 1.0))
        d_r = -4.0 * gate * (1.0 - gate) * adv
        return -(4.0 / tau) * gate * adv, d_r.detach(), zero, low, high, dual
    # vespo: phi is a constant (TRL computes it under no_grad)
    return -phi * adv * lp, zero, (-phi * adv).detach(), low, high, dual


def _pick(cond: torch.Tensor, a: float, b: float, like: torch.Tensor) -> torch.Tensor:
    """``where(cond, a, b)`` in the dtype of ``like`` (a bare ``torch.where`` of two floats is fp32)."""
    return torch.where(cond, like.new_tensor(a), like.new_tensor(b))


def _vespo_phi(log_w: torch.Tensor, adv: torch.Tensor, s: GRPOSettings) -> torch.Tensor:
    """phi(w) = exp(lambda + k log w - lambda w), (k, lambda) by the sign of A (A >= 0: pos);
    NaN / inf -> 0 (TRL)."""
    nonneg = adv >= 0
    k = _pick(nonneg, *s.vespo_k, log_w)  # (pos, neg)
    lam = _pick(nonneg, *s.vespo_lambda, log_w).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return torch.where(torch.isfinite(phi), phi, 0.0)


def _token_terms(logps, old_logps, advantages, mask, cu_seqlens, ref_logps, sampler_logps, s: GRPOSettings):
    """Everything per token, in the flat layout (see :func:`_layout`); padding reads as zeros."""
    dt = torch.float64 if logps.dtype == torch.float64 else torch.float32
    b, seq, valid = _layout(tuple(logps.shape), mask, cu_seqlens, logps.device)

    def tok(x):
        return None if x is None else torch.where(valid, x.reshape(-1).to(dt), 0.0)

    def seg(x):  # per-sequence sum over the valid tokens
        return x.new_zeros(b).index_add(0, seq, torch.where(valid, x, 0.0))

    lp = tok(logps)
    old = lp.detach() if old_logps is None else tok(old_logps).detach()
    per_token = advantages_per_token(advantages, tuple(logps.shape), cu_seqlens)
    adv = tok(advantages) if per_token else advantages.reshape(-1).to(dt)[seq]
    adv = adv.detach()
    counts = seg(torch.ones_like(lp))
    n1 = counts.clamp(min=1)
    t = {"b": b, "seq": seq, "valid": valid, "seg": seg, "lp": lp, "counts": counts, "adv": adv,
         "per_token_adv": per_token}
    stats_const = {}

    log_ratio = lp - old
    if s.level == "token":
        r = torch.exp(log_ratio)
        dr = r.detach()
    else:
        seq_log_ratio = seg(log_ratio) / n1  # GSPO: s_i = exp(mean_t log(pi / pi_old))
        stats_const[LOG_RATIO] = seq_log_ratio.detach()
        if s.level == "sequence":
            r = torch.exp(seq_log_ratio)[seq]
            dr = torch.zeros_like(lp)
        else:  # sequence_token (GSPO-token, verl): value s_i, gradient s_i * d lp_t; log clamped at 10
            log_r = (lp - lp.detach() + seq_log_ratio.detach()[seq]).clamp(max=10.0)
            r = torch.exp(log_r)
            dr = torch.where(seq_log_ratio.detach()[seq] <= 10.0, r.detach(), 0.0)

    weight = torch.ones_like(lp)  # off-policy mask x sampler IS weight, on the policy term only
    if s.off_policy_mask_threshold is not None:
        src = old if sampler_logps is None else tok(sampler_logps)
        drift = seg(torch.nan_to_num(src - lp.detach(), nan=0.0)) / n1
        stats_const[OFF_POLICY_KL] = drift
        keep = (adv >= 0) | (drift[seq] <= s.off_policy_mask_threshold)
        weight = weight * keep.to(dt)
    log_isw_sum = None
    if sampler_logps is not None:
        diff = torch.nan_to_num(old - tok(sampler_logps), nan=0.0)
        if s.is_mode.startswith("sequence"):
            isw_seq = _isw(seg(diff), s)
            stats_const[IS_WEIGHT] = isw_seq
            isw = isw_seq[seq]
        else:
            isw = _isw(diff, s)
            log_isw_sum = seg(torch.log(isw).clamp(LOG_EPS, 20.0))
        if s.policy != "vespo":  # vespo folds the IS weight into phi instead
            weight = weight * isw

    phi = None
    if s.policy == "vespo":
        log_w = seg(log_ratio.detach().clamp(-20.0, 20.0))  # a sum over the tokens, not a mean
        if log_isw_sum is not None:
            log_w = log_w + log_isw_sum
        log_w = log_w.clamp(LOG_EPS, 20.0)
        stats_const[VESPO_LOG_W] = log_w
        phi = _vespo_phi(log_w[seq], adv, s)
        if per_token:
            t["phi_stat"] = seg(phi)
        else:
            t["phi_stat"] = _vespo_phi(log_w, advantages.reshape(-1).to(dt).detach(), s)

    policy, dp_dr, dp_dlp, low, high, dual = _policy_terms(r, adv, lp, phi, s)
    loss = weight * policy
    direct = weight * (dp_dr * dr + dp_dlp)
    coupling = weight * dp_dr
    kl_term = None
    if ref_logps is not None:
        k, dk = _kl_terms(lp, tok(ref_logps).detach(), s)
        if s.use_bias_correction_kl:  # TRL: KL x ratio (DeepSeek-V3.2), differentiable through the ratio
            kl_term = k * r
            dk_total = dk * r.detach() + k.detach() * dr
            k_coupling = k.detach()
        else:
            kl_term, dk_total, k_coupling = k, dk, torch.zeros_like(k)
        if s.beta != 0.0:
            loss = loss + s.beta * kl_term
            direct = direct + s.beta * dk_total
            coupling = coupling + s.beta * k_coupling
    t.update(loss=loss, direct=direct.detach(), coupling=coupling.detach(), r=r, kl=kl_term, low=low, high=high,
             dual=dual, stats_const=stats_const, dt=dt)
    return t


def grpo_sequence_stats(logps, old_logps, advantages, mask=None, cu_seqlens=None, *, ref_logps=None,
                        sampler_logps=None, entropy=None, settings: GRPOSettings) -> torch.Tensor:
    """Per-sequence sums and constants ``stats`` of the GRPO loss (columns: :mod:`fastrl.kernels.grpo_columns`).

    Differentiable with respect to ``logps`` and ``entropy`` through columns ``LOSS`` and ``ENT``
    (autograd). Computed in fp32 (fp64 for fp64 logps).

    Args:
        logps: ``[B, L]`` with ``mask``, or ``[T]`` with ``cu_seqlens``; fp32, bf16, fp16 or fp64.
        old_logps: the logps layout, floating; None is on-policy (``logps.detach()``).
        advantages: ``[B]`` (or ``[B, 1]``) per sequence or per token in the logps layout; floating.
        mask: ``[B, L]`` bool or 0/1 integer, or None.
        cu_seqlens: ``[B+1]`` int32 or int64, or None.
        ref_logps: the logps layout, floating, or None.
        sampler_logps: the logps layout, floating, or None.
        entropy: the logps layout, floating, or None.
        settings: a :class:`GRPOSettings`.

    Returns:
        ``[B, NSTATS]`` fp32 (fp64 for fp64 logps).
    """
    t = _token_terms(logps, old_logps, advantages, mask, cu_seqlens, ref_logps, sampler_logps, settings)
    seg, b, dt = t["seg"], t["b"], t["dt"]
    cols = [torch.zeros(b, dtype=dt, device=logps.device) for _ in range(NSTATS)]
    cols[LOSS] = seg(t["loss"])
    if entropy is not None:
        cols[ENT] = seg(torch.where(t["valid"], entropy.reshape(-1).to(dt), 0.0))
    cols[COUNT] = t["counts"]
    if t["kl"] is not None:
        cols[KL] = seg(t["kl"]).detach()
    cols[RATIO] = seg(t["r"]).detach()
    for col, key in ((LOW, "low"), (HIGH, "high"), (DUAL, "dual")):
        cols[col] = seg(t[key].to(dt))
    if settings.policy == "vespo":
        cols[PHI] = t["phi_stat"]
    if settings.level == "sequence":
        cols[COUPLING] = seg(t["coupling"])
    for col, value in t["stats_const"].items():
        cols[col] = value.detach()
    return torch.stack(cols, dim=1)


def grpo_sequence_stats_backward(grad_loss: torch.Tensor, grad_entropy: torch.Tensor | None, logps, old_logps,
                                 advantages, mask=None, cu_seqlens=None, *, ref_logps=None, sampler_logps=None,
                                 entropy_like: torch.Tensor | None = None, settings: GRPOSettings):
    """The gradients of ``sum_i grad_loss[i] * S_i + grad_entropy[i] * E_i``, written out by hand.

    S, E are the ``LOSS`` and ``ENT`` columns of :func:`grpo_sequence_stats`. For a token t of sequence
    i: ``d/d logp_t = grad_loss[i] * D_t (+ grad_loss[i] * C_i * s_i / n_i at
    importance_sampling_level="sequence")``, where ``D_t`` is the derivative of l_t through token t's
    own log-prob (ratio, KL, cispo / vespo log-prob factor) and ``C_i = sum_u d l_u / d s_i`` the
    coupling through the sequence ratio ``s_i = exp(mean_u log(pi_u / pi_old,u))``; and
    ``d/d entropy_t = grad_entropy[i]``. 0 at padding.

    Args:
        grad_loss: ``[B]`` floating, the weight of each ``S_i``.
        grad_entropy: ``[B]`` floating, the weight of each ``E_i``, or None.
        logps: ``[B, L]`` or ``[T]``, floating; the other arguments as :func:`grpo_sequence_stats`.
        old_logps: the logps layout, floating, or None.
        advantages: ``[B]`` / ``[B, 1]`` or per token, floating.
        mask: ``[B, L]`` bool or 0/1 integer, or None.
        cu_seqlens: ``[B+1]`` int32 or int64, or None.
        ref_logps: the logps layout, floating, or None.
        sampler_logps: the logps layout, floating, or None.
        entropy_like: ``[B, L]`` / ``[T]``, a tensor of the entropy's shape and dtype (its values unread),
            or None (no entropy gradient).
        settings: a :class:`GRPOSettings`.

    Returns:
        ``(d_logps, d_entropy)``: ``d_logps`` in the shape and dtype of ``logps``; ``d_entropy`` in
        ``entropy_like``'s shape and dtype, or None.
    """
    with torch.no_grad():
        t = _token_terms(logps, old_logps, advantages, mask, cu_seqlens, ref_logps, sampler_logps, settings)
        seq, valid, dt = t["seq"], t["valid"], t["dt"]
        g = grad_loss.to(dt)
        d = g[seq] * t["direct"] if seq.numel() else t["direct"]
        if settings.level == "sequence":
            s_i = torch.exp(t["stats_const"][LOG_RATIO])
            coupling = g * t["seg"](t["coupling"]) * s_i / t["counts"].clamp(min=1)
            d = d + coupling[seq]
        d_logps = torch.where(valid, d, 0.0).reshape(logps.shape).to(logps.dtype)
        d_entropy = None
        if entropy_like is not None and grad_entropy is not None:
            ge = grad_entropy.to(dt)[seq] if seq.numel() else torch.zeros_like(d)
            d_entropy = torch.where(valid, ge, 0.0).reshape(entropy_like.shape).to(entropy_like.dtype)
    return d_logps, d_entropy


# ------------------------------------------------------------------------------------------------
# Aggregation and metrics


def combine(stats: torch.Tensor, settings: GRPOSettings, *, per_token_adv: bool, num_items_in_batch=None,
            max_completion_length=None, has_ref: bool = False, has_entropy: bool = False):
    """The loss, the metrics and the aggregation weights from the per-sequence ``stats``.

    ``loss = sum_i c_i S_i - entropy_coef * sum_i e_i E_i``, differentiable through ``stats``.
    ``max_completion_length`` defaults to the longest sequence here (the public function passes L for
    padded input).

    Args:
        stats: ``[B, NSTATS]`` fp32 or fp64, from :func:`grpo_sequence_stats`.
        settings: a :class:`GRPOSettings`.
        per_token_adv: whether the advantages were per token (:func:`advantages_per_token`).
        num_items_in_batch: a number or a 0-d tensor, as :func:`aggregation_weights`.
        max_completion_length: a number or a 0-d tensor, or None.
        has_ref: whether ``ref_logps`` was given (the ``kl`` metric).
        has_entropy: whether ``entropy`` was given (the bonus and the ``entropy`` metric).

    Returns:
        ``(loss, metrics, c, e)``: ``loss`` 0-d in the dtype of ``stats``; ``metrics`` a dict of
        detached 0-d fp32 tensors; ``c`` and ``e`` the ``[B]`` weights (``e`` None without entropy).
    """
    counts = stats[:, COUNT].detach()
    kw = dict(num_items_in_batch=num_items_in_batch,
              max_completion_length=max_completion_length if max_completion_length is not None
              else settings.max_completion_length)
    c = aggregation_weights(counts, settings.agg, **kw)
    loss = (c * stats[:, LOSS]).sum()
    e = None
    if has_entropy:
        e = aggregation_weights(counts, settings.entropy_agg, **kw) if settings.entropy_coef != 0.0 else \
            torch.zeros_like(c)
        if settings.entropy_coef != 0.0:
            loss = loss - settings.entropy_coef * (e * stats[:, ENT]).sum()
    metrics = _metrics(stats.detach(), settings, per_token_adv, has_ref, has_entropy)
    return loss, metrics, c, e


def _metrics(stats, settings: GRPOSettings, per_token_adv: bool, has_ref: bool, has_entropy: bool) -> dict:
    """Every metric from a handful of ops on ``stats`` (each value is a view of one small tensor)."""
    b = stats.shape[0]
    counts = stats[:, COUNT]
    token_means = (stats.sum(0) / counts.sum().clamp(min=1)).float()
    if settings.level == "sequence" and not per_token_adv:  # TRL: a [B, 1] value averages over the sequences
        clip_means = ((stats / counts.clamp(min=1)[:, None]).sum(0) / max(b, 1)).float()
    else:
        clip_means = token_means
    metrics = {}
    if settings.policy == "clip":
        metrics["clip_ratio/low_mean"] = clip_means[LOW]
        metrics["clip_ratio/high_mean"] = clip_means[HIGH]
        metrics["clip_ratio/region_mean"] = clip_means[LOW] + clip_means[HIGH]  # disjoint: A < 0 vs A > 0
        if settings.clip_ratio_c is not None:
            metrics["clip_ratio/dual_mean"] = token_means[DUAL]
    elif settings.policy == "cispo":
        metrics["cispo_clip_ratio"] = clip_means[HIGH]
    elif settings.policy == "vespo":  # phi per sequence (advantages [B]), else summed over the tokens
        metrics["vespo/phi_seq_mean"] = token_means[PHI] if per_token_adv else \
            (stats[:, PHI].sum() / max(b, 1)).float()
    if has_ref:
        metrics["kl"] = token_means[KL]
    metrics["ratio/mean"] = token_means[RATIO]
    if has_entropy:
        metrics["entropy"] = token_means[ENT]
    return metrics


def grpo_loss(logps, old_logps, advantages, mask=None, cu_seqlens=None, *, ref_logps=None, sampler_logps=None,
              entropy=None, num_items_in_batch=None, settings: GRPOSettings | None = None, **options):
    """The torch implementation of :func:`fastrl.losses.grpo_loss`, differentiable by autograd.

    The settings are checked, the tensors are not. fp64 inputs compute in fp64.

    Args:
        logps: ``[B, L]`` or ``[T]``, fp32, bf16, fp16 or fp64.
        old_logps: the logps layout, floating, or None (on-policy).
        advantages: ``[B]`` / ``[B, 1]`` or per token, floating.
        mask: ``[B, L]`` bool or 0/1 integer, or None.
        cu_seqlens: ``[B+1]`` int32 or int64, or None.
        ref_logps: the logps layout, floating, or None.
        sampler_logps: the logps layout, floating, or None.
        entropy: the logps layout, floating, or None.
        num_items_in_batch: a number or a 0-d tensor, or None.
        settings: a :class:`GRPOSettings`; or pass its fields as ``**options``.
        **options: the fields of :class:`GRPOSettings`.

    Returns:
        ``(loss, metrics)`` as :func:`fastrl.losses.grpo_loss`.
    """
    settings = GRPOSettings.from_options(settings, options, where="grpo_loss")
    stats = grpo_sequence_stats(logps, old_logps, advantages, mask, cu_seqlens, ref_logps=ref_logps,
                                sampler_logps=sampler_logps, entropy=entropy, settings=settings)
    max_len = settings.max_completion_length
    if max_len is None and cu_seqlens is None:
        max_len = logps.shape[1]
    loss, metrics, _, _ = combine(stats, settings, per_token_adv=advantages_per_token(
        advantages, tuple(logps.shape), cu_seqlens), num_items_in_batch=num_items_in_batch,
        max_completion_length=max_len, has_ref=ref_logps is not None, has_entropy=entropy is not None)
    return loss, metrics
