"""GRPO-family policy loss from per-token log-probs: grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo,
GSPO (sequence-level importance sampling), KL to a reference, sampler IS correction, entropy bonus.

>>> import torch
>>> from fastrl.losses import grpo_loss
>>> logps = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -0.7, 0.0]], requires_grad=True)
>>> mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
>>> advantages = torch.tensor([1.0, -0.5])
>>> loss, metrics = grpo_loss(logps, None, advantages, mask)  # on-policy, dapo: sum / 5 tokens
>>> round(loss.item(), 4)  # (-3 * 1.0 + 2 * 0.5) / 5
-0.4
>>> loss.backward()
>>> logps.grad
tensor([[-0.2000, -0.2000, -0.2000],
        [ 0.1000,  0.1000,  0.0000]])
>>> flat, cu_seqlens = torch.tensor([-1.0, -0.5, -2.0, -0.3, -0.7]), torch.tensor([0, 3, 5])
>>> loss, metrics = grpo_loss(flat, flat - 0.3, advantages, cu_seqlens=cu_seqlens, loss_type="grpo")
>>> round(loss.item(), 4)  # ratio e^0.3 = 1.35: clipped to 1.2 where A > 0, not where A < 0
-0.2625
>>> {name: round(value.item(), 3) for name, value in metrics.items()}
{'clip_ratio/low_mean': 0.0, 'clip_ratio/high_mean': 0.6, 'clip_ratio/region_mean': 0.6, 'ratio/mean': 1.35}
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch

from fastrl import _checks
from fastrl._checks import check_cu_seqlens, check_mask, cu_seqlens_checks, mask_checks, raise_first
from fastrl.losses.torch_impl import grpo as torch_grpo
from fastrl.losses.torch_impl.grpo import ENT, IS_LEVELS, IS_MODES, KL_ESTIMATORS, LOSS, NSTATS, GRPOSettings
from fastrl.ops.dispatch import resolve

__all__ = ["GRPOLoss", "GRPOSettings", "grpo_loss", "grpo_loss_grad", "grpo_token_weights"]

_MAX_BLOCK = 1024  # tokens per block of the kernels (tests lower it to exercise the block loop)
_ADV_DTYPES = (*_checks.FLOAT_DTYPES, torch.float64)
_POLICIES = ("clip", "cispo", "sapo", "vespo")  # the kernels' POLICY codes


# ------------------------------------------------------------------------------------------------
# Public functions


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    *,
    ref_logps: torch.Tensor | None = None,
    sampler_logps: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    settings: GRPOSettings | None = None,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO-family policy loss of a batch of completions, with its metrics.

    Two layouts (pass exactly one of ``mask`` and ``cu_seqlens``): padded, ``logps`` [B, L] with
    ``mask`` [B, L] (sequence i is row i's masked positions), or packed, ``logps`` [T] with
    ``cu_seqlens`` [B+1]. The settings are ``settings``, a :class:`GRPOSettings`, or its fields as
    keyword ``options`` (not both; the defaults are the fields'). What each does:

    **Per-token loss** (``docs/losses.md``, TRL 1.16 ``GRPOTrainer._compute_loss``), with ratio
    ``r = exp(logps - old_logps)`` per token (``importance_sampling_level="token"``), or the GSPO
    sequence ratio ``s_i = exp(mean_t(logps - old_logps))`` on every token of sequence i
    (``"sequence"``, TRL), or verl's GSPO-token ratio of value ``s_i`` and gradient ``s_i * d logp_t``
    with ``log s_i`` capped at 10 (``"sequence_token"``)::

        grpo, bnpo, dr_grpo, dapo, luspo:  -min(r' A, clip(r, 1 - epsilon, 1 + epsilon_high) A)
                                           r' = min(r, delta) with ``delta`` (two-sided clipping);
                                           with ``clip_ratio_c`` (verl dual clip) a token with
                                           A < 0 loses at most -clip_ratio_c * A
        cispo:  -sg(min(r, epsilon_high)) * A * logp          (epsilon_high: TRL's cap, e.g. 5)
        sapo:   -(4 / tau) * sigmoid(tau (r - 1)) * A         tau = sapo_tau_pos if A > 0 else _neg
        vespo:  -sg(phi(w)) * A * logp, phi(w) = exp(lambda + k log w - lambda w), log w = the
                sum over the sequence of clamp(logp - old, -20, 20) (+ log sampler weights),
                clamped to [log 1e-8, 20]; (k, lambda) = vespo_k / vespo_lambda (pos, neg) by A >= 0

    then ``l_t = m_i * c_t * policy_t + beta * KL_t``: ``m_i`` is the off-policy sequence mask
    (``off_policy_mask_threshold``: drop sequence i when A < 0 and the mean over its tokens of
    ``sampler_logps - logps`` (``old_logps`` without a sampler; NaN -> 0) exceeds the threshold),
    ``c_t`` the sampler importance weight from ``sampler_logps`` (the rollout engine's log-probs):
    ``exp(old - sampler)`` (NaN -> 0) per token, or ``exp(sum over the sequence)`` for the
    ``sequence_*`` ``is_mode``, clamped to ``[is_min, is_cap]`` (``*_truncate``) or zeroed outside it
    (``*_mask``) as TRL's ``vllm_importance_sampling_mode`` (vespo puts it into ``w`` instead).
    ``KL_t`` with ``ref_logps`` (required when ``beta != 0``), ``x = logp - ref``: ``k1`` (``kl``)
    ``x``; ``abs`` ``|x|``; ``k2`` (``mse``) ``x^2 / 2``; ``k3`` ``e^-x + x - 1``; ``low_var_kl``
    verl's k3 with ``x`` clamped to [-20, 20] and the value to [-10, 10]; a trailing ``+`` (verl,
    e.g. ``"k3+"``) keeps the value with the gradient of k2. ``use_bias_correction_kl`` (TRL's
    default is True) multiplies ``KL_t`` by the ratio, gradient included. The reference is never
    differentiated (TRL detaches it).

    **Aggregation** ``loss = sum_t w_t l_t - entropy_coef * sum_t w^H_t entropy_t`` with the
    weights of :func:`grpo_token_weights`: by loss_type (TRL) grpo/sapo the mean over each
    sequence's tokens then over all B sequences; bnpo sum / tokens in the batch; dr_grpo sum /
    (B * ``max_completion_length``, default L padded, the longest sequence packed);
    dapo/cispo/vespo sum / ``num_items_in_batch`` (default the tokens in the batch; pass the
    global count / processes for TRL's numbers); luspo the mean over sequences of their token
    sums. ``loss_agg_mode`` (verl) overrides: ``token-mean`` (as dapo), ``seq-mean-token-mean``
    and ``seq-mean-token-sum`` (means over the non-empty sequences), ``seq-mean-token-sum-norm``
    (sum / ``max_completion_length``), ``token-sum``. The entropy bonus uses the token mean of the
    batch (TRL), or ``loss_agg_mode`` when given (verl); ``entropy_coef != 0`` needs ``entropy``,
    which then receives the gradient ``-entropy_coef * w^H_t``. An empty batch or sequence
    contributes 0 (never NaN).

    Gradients flow to ``logps`` and ``entropy`` only. On CUDA one Triton launch computes every
    token's terms and their per-sequence sums (one program per sequence; a first pass over the
    sequence only when a sequence-level quantity is needed), and one launch computes the
    gradients; the aggregation of the B sums is a few torch ops on [B] vectors.

    Args:
        logps: ``[B, L]`` padded or ``[T]`` packed, fp32, bf16 or fp16 (maths in fp32): the policy's
            log-probs, with gradient.
        old_logps: ``[B, L]`` / ``[T]`` as ``logps``, fp32, bf16 or fp16: the log-probs at sampling time; None is
            on-policy (``logps.detach()``).
        advantages: ``[B]`` (or ``[B, 1]``) per sequence, or per token in the logps shape (packed with
            T == B a 1-D tensor is read per sequence); fp32, bf16, fp16 or fp64; must be finite.
        mask: ``[B, L]`` bool or 0/1 integer, the padded layout's valid positions.
        cu_seqlens: ``[B+1]`` int32 or int64 offsets of the packed layout.
        ref_logps: ``[B, L]`` / ``[T]`` as ``logps``, fp32, bf16 or fp16: the reference model's
            log-probs (required when ``beta != 0``; never differentiated).
        sampler_logps: ``[B, L]`` / ``[T]`` as ``logps``, fp32, bf16 or fp16: the rollout engine's
            log-probs (the sampler importance weight and the off-policy mask).
        entropy: ``[B, L]`` / ``[T]`` as ``logps``, fp32, bf16 or fp16: per-token entropies with
            gradient (required when ``entropy_coef != 0``).
        num_items_in_batch: a number or a one-element (``[]`` or ``[1]``) integer or floating tensor,
            the divisor of the dapo/cispo/vespo aggregation (default the tokens in the batch);
            ignored by aggregations that do not use it (as TRL).
        settings: a :class:`GRPOSettings`; or pass its fields as ``**options``.
        **options: the fields of :class:`GRPOSettings` (not together with ``settings``).

    Returns:
        ``(loss, metrics)``: ``loss`` a 0-d fp32 tensor; ``metrics`` a dict of detached 0-d fp32
        tensors: ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (clip
        family; TRL: token means, per-sequence means at the sequence level), ``clip_ratio/dual_mean``
        (with ``clip_ratio_c``), ``cispo_clip_ratio`` (cispo), ``vespo/phi_seq_mean`` (vespo), ``kl``
        (with ``ref_logps``: token mean of ``KL_t`` as it enters the loss), ``ratio/mean`` (token mean
        of the ratio), ``entropy`` (with ``entropy``).

    Raises:
        TypeError: an argument of the wrong type or dtype, naming it.
        ValueError: bad shapes, both or neither of ``mask`` / ``cu_seqlens``, ``beta != 0`` without
            ``ref_logps``, ``entropy_coef != 0`` without ``entropy``, bad settings; the value checks
            (``cu_seqlens`` offsets, a 0/1 ``mask``, finite ``advantages``) cost one device sync and
            are skipped under ``torch.compile``.
    """
    settings = GRPOSettings.from_options(settings, options, where="grpo_loss")
    prepared = _prepare(settings, logps, old_logps, advantages, mask, cu_seqlens, ref_logps=ref_logps,
                        sampler_logps=sampler_logps, entropy=entropy, num_items_in_batch=num_items_in_batch)
    stats = _stats_op(**prepared.tensors._asdict(), ints=prepared.ints, floats=prepared.floats)
    loss, metrics, _, _ = _combine(stats, settings, prepared)
    return loss, metrics


def grpo_loss_grad(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    *,
    ref_logps: torch.Tensor | None = None,
    sampler_logps: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    settings: GRPOSettings | None = None,
    **options,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """:func:`grpo_loss` and its gradients, computed without autograd.

    One forward and one backward launch on CUDA. Meant for fused losses that backpropagate further by
    hand (e.g. through the LM head), where the loss is terminal.

    Args:
        logps: ``[B, L]`` padded or ``[T]`` packed, fp32, bf16 or fp16; as in :func:`grpo_loss`.
        old_logps: ``[B, L]`` / ``[T]`` as ``logps``, fp32, bf16 or fp16, or None (on-policy).
        advantages: ``[B]`` per sequence or the logps shape per token; fp32, bf16, fp16 or fp64.
        mask: ``[B, L]`` bool or 0/1 integer (padded layout).
        cu_seqlens: ``[B+1]`` int32 or int64 (packed layout).
        ref_logps: ``[B, L]`` / ``[T]`` as ``logps``, fp32, bf16 or fp16, or None.
        sampler_logps: ``[B, L]`` / ``[T]`` as ``logps``, fp32, bf16 or fp16, or None.
        entropy: ``[B, L]`` / ``[T]`` as ``logps``, fp32, bf16 or fp16, or None.
        num_items_in_batch: a number or a one-element (``[]`` or ``[1]``) integer or floating tensor, as
            in :func:`grpo_loss`.
        settings: a :class:`GRPOSettings`; or pass its fields as ``**options``.
        **options: the fields of :class:`GRPOSettings`.

    Returns:
        ``(loss, d_logps, d_entropy, metrics)``: ``loss`` 0-d fp32; ``d_logps`` the shape and dtype of
        ``logps`` (0 at padding); ``d_entropy`` those of ``entropy`` (None without ``entropy``);
        ``metrics`` as :func:`grpo_loss`'s.

    Raises:
        TypeError: as :func:`grpo_loss`.
        ValueError: as :func:`grpo_loss`.
    """
    settings = GRPOSettings.from_options(settings, options, where="grpo_loss_grad")
    with torch.no_grad():
        prepared = _prepare(settings, logps, old_logps, advantages, mask, cu_seqlens, ref_logps=ref_logps,
                            sampler_logps=sampler_logps, entropy=entropy, num_items_in_batch=num_items_in_batch)
        stats = _stats_op(**prepared.tensors._asdict(), ints=prepared.ints, floats=prepared.floats)
        loss, metrics, c, e = _combine(stats, settings, prepared)
        grad_entropy = None if entropy is None else -settings.entropy_coef * e
        d_logps, d_entropy = _stats_backward_op(
            c.float(), grad_entropy, stats, **prepared.tensors.for_backward(), ints=prepared.ints,
            floats=prepared.floats, has_entropy=entropy is not None,
            entropy_dtype=entropy.dtype if entropy is not None else logps.dtype)
    return loss, d_logps, d_entropy if entropy is not None else None, metrics


def grpo_token_weights(
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    *,
    num_tokens: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    entropy: bool = False,
    settings: GRPOSettings | None = None,
    **options,
) -> torch.Tensor:
    """The aggregation weight ``w_t`` of every token, with which ``loss = sum_t w_t * l_t``.

    In full ``loss = sum_t w_t * l_t - entropy_coef * sum_t w^H_t * entropy_t`` (``entropy=True``
    returns ``w^H``), with ``l_t`` the per-token loss of :func:`grpo_loss`. ``w_t`` is constant over a
    sequence and depends on the token counts only; the weights read the settings' ``loss_type``,
    ``loss_agg_mode`` and ``max_completion_length``.

    Hence, at ``importance_sampling_level="token"`` the gradient is per token:
    ``d loss / d logp_t = w_t * d l_t / d logp_t``, where ``d l_t / d logp_t`` needs only token t's
    inputs (logp, old, ref, sampler, advantage) and per-sequence constants that carry no gradient
    (the off-policy mask, vespo's ``phi``, a sequence-level sampler weight). At
    ``"sequence"`` every token of sequence i also gets ``w_i * s_i / n_i * sum_u d l_u / d s_i``
    (``s_i`` the sequence ratio, ``n_i`` its token count). :func:`grpo_loss_grad` computes both.

    Args:
        mask: ``[B, L]`` bool or 0/1 integer (padded layout; pass exactly one of ``mask`` and
            ``cu_seqlens``).
        cu_seqlens: ``[B+1]`` int32 or int64 (packed layout).
        num_tokens: T, the packed length, when it cannot be read from ``cu_seqlens[-1]`` without a
            sync you want to avoid.
        num_items_in_batch: a number or a one-element (``[]`` or ``[1]``) integer or floating tensor, as
            in :func:`grpo_loss`.
        entropy: return the entropy bonus's weights ``w^H`` instead of ``w``.
        settings: a :class:`GRPOSettings`; or pass its fields as ``**options``.
        **options: the fields of :class:`GRPOSettings`.

    Returns:
        fp32 weights in the logps layout: ``[B, L]`` for ``mask`` [B, L], ``[T]`` for ``cu_seqlens``;
        0 at padding.

    Raises:
        ValueError: both or neither of ``mask`` and ``cu_seqlens``, bad offsets or mask, bad settings.
        TypeError: an argument of the wrong type.
    """
    if (mask is None) == (cu_seqlens is None):
        raise ValueError("pass exactly one of cu_seqlens (packed [T]) and mask (padded [B, L])")
    settings = GRPOSettings.from_options(settings, options, where="grpo_token_weights")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, cu_seqlens.device)
        total = int(cu_seqlens[-1]) if num_tokens is None else _checks.check_int("num_tokens", num_tokens, low=0)
        raise_first(cu_seqlens_checks(cu_seqlens, total))
        shape = (total,)
    else:
        _checks.check_tensor("mask", mask, ndim=2)
        check_mask(mask, tuple(mask.shape), mask.device)
        raise_first(mask_checks(mask))
        shape = tuple(mask.shape)
    num_items_in_batch = _check_num_items(num_items_in_batch)
    return torch_grpo.grpo_token_weights(mask, cu_seqlens, shape=shape,
                                        agg=settings.entropy_agg if entropy else settings.agg,
                                        num_items_in_batch=num_items_in_batch,
                                        max_completion_length=settings.max_completion_length)


class GRPOLoss(torch.nn.Module):
    """:func:`grpo_loss` as a module, its settings checked once when it is made.

    ``forward(logps, old_logps, advantages, mask=None, cu_seqlens=None, *, ref_logps=None,
    sampler_logps=None, entropy=None, num_items_in_batch=None)`` returns ``(loss, metrics)``.

    Args:
        settings: a :class:`GRPOSettings`; or pass its fields as ``**options``.
        **options: the fields of :class:`GRPOSettings`.

    Raises:
        TypeError: bad settings, naming the field.
        ValueError: bad settings, naming the field.
    """

    def __init__(self, settings: GRPOSettings | None = None, **options):
        super().__init__()
        self.settings = GRPOSettings.from_options(settings, options, where="GRPOLoss")

    def forward(self, logps, old_logps, advantages, mask=None, cu_seqlens=None, *, ref_logps=None,
                sampler_logps=None, entropy=None, num_items_in_batch=None):
        """The loss of one batch: :func:`grpo_loss` with this module's settings.

        Args:
            logps: ``[B, L]`` padded or ``[T]`` packed, fp32, bf16 or fp16.
            old_logps: ``[B, L]`` / ``[T]`` as ``logps``, fp32, bf16 or fp16, or None (on-policy).
            advantages: ``[B]`` per sequence or the logps shape per token; fp32, bf16, fp16 or fp64.
            mask: ``[B, L]`` bool or 0/1 integer (padded layout).
            cu_seqlens: ``[B+1]`` int32 or int64 (packed layout).
            ref_logps: ``[B, L]`` / ``[T]`` as ``logps``, fp32, bf16 or fp16, or None.
            sampler_logps: ``[B, L]`` / ``[T]`` as ``logps``, fp32, bf16 or fp16, or None.
            entropy: ``[B, L]`` / ``[T]`` as ``logps``, fp32, bf16 or fp16, or None.
            num_items_in_batch: a number or a one-element (``[]`` or ``[1]``) integer or floating tensor.

        Returns:
            ``(loss, metrics)`` as :func:`grpo_loss`: a 0-d fp32 loss and a dict of 0-d fp32 metrics.
        """
        return grpo_loss(logps, old_logps, advantages, mask, cu_seqlens, ref_logps=ref_logps,
                         sampler_logps=sampler_logps, entropy=entropy, num_items_in_batch=num_items_in_batch,
                         settings=self.settings)

    def extra_repr(self) -> str:
        s = self.settings
        return f"loss_type={s.loss_type!r}, agg={s.agg!r}, level={s.level!r}, beta={s.beta}"


# ------------------------------------------------------------------------------------------------
# Checks


def _check_num_items(value):
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a number or a one-element tensor, got shape "
                             f"{tuple(value.shape)}")
        if value.dtype == torch.bool or value.dtype.is_complex:
            raise TypeError(f"num_items_in_batch must be a real tensor, got {value.dtype}")
        return value.reshape(())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"num_items_in_batch must be a number or a tensor, got {type(value).__name__}")
    return _checks.check_real("num_items_in_batch", value, low=0.0)


class _Tensors(NamedTuple):
    """The tensor arguments of the forward op, by name and in the op's order (checked, contiguous)."""

    logps: torch.Tensor
    old_logps: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    sampler_logps: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None

    def for_backward(self) -> dict[str, torch.Tensor | None]:
        """The tensors the backward op reads: all but ``entropy`` (its gradient needs only its dtype)."""
        tensors = self._asdict()
        del tensors["entropy"]
        return tensors


class _Prepared(NamedTuple):
    """Checked tensors in the form the custom ops take, the encoded settings, and what aggregation needs."""

    tensors: _Tensors
    ints: list[int]
    floats: list[float]
    num_items: float | torch.Tensor | None
    max_len: int | None
    per_token_adv: bool


def _prepare(settings: GRPOSettings, logps, old_logps, advantages, mask, cu_seqlens, *, ref_logps=None,
             sampler_logps=None, entropy=None, num_items_in_batch=None) -> _Prepared:
    _checks.check_tensor("logps", logps, dtypes=_checks.FLOAT_DTYPES)
    device = logps.device
    if (cu_seqlens is None) == (mask is None):
        raise ValueError("pass exactly one of cu_seqlens (packed logps [T]) and mask (padded logps [B, L])")
    value_checks = []
    if cu_seqlens is not None:
        if logps.dim() != 1:
            raise ValueError(f"logps must be 1-D [T] with cu_seqlens, got shape {tuple(logps.shape)}")
        check_cu_seqlens(cu_seqlens, device)
        value_checks += cu_seqlens_checks(cu_seqlens, logps.shape[0])
        b = cu_seqlens.shape[0] - 1
    else:
        if logps.dim() != 2:
            raise ValueError(f"logps must be 2-D [B, L] with mask, got shape {tuple(logps.shape)}")
        check_mask(mask, tuple(logps.shape), device)
        value_checks += mask_checks(mask)
        b = logps.shape[0]
    shape = tuple(logps.shape)
    for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps), ("sampler_logps", sampler_logps),
                    ("entropy", entropy)):
        if t is not None:
            _checks.check_tensor(name, t, dtypes=_checks.FLOAT_DTYPES, device=device)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have the shape of logps {shape}, got {tuple(t.shape)}")
    _checks.check_tensor("advantages", advantages, dtypes=_ADV_DTYPES, device=device)
    per_token = torch_grpo.advantages_per_token(advantages, shape, cu_seqlens)
    if per_token and tuple(advantages.shape) != shape:
        raise ValueError(f"advantages must be [B] = ({b},) per sequence or the shape of logps {shape} per token, "
                         f"got {tuple(advantages.shape)}")
    finite = torch.isfinite(advantages)
    if per_token and mask is not None:
        finite = finite | (mask == 0)  # padding may hold anything
    value_checks.append((~finite.all(), "advantages must be finite (no NaN or inf)"))
    if settings.beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps (the reference model's log-probs)")
    if settings.entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy (per-token entropies, with gradient)")
    num_items = _check_num_items(num_items_in_batch)
    raise_first(value_checks)

    def flat(t):
        return None if t is None else t.contiguous()

    adv = advantages.reshape(b).contiguous() if not per_token else advantages.contiguous()
    tensors = _Tensors(logps=logps.contiguous(), old_logps=flat(old_logps), advantages=adv, ref_logps=flat(ref_logps),
                       sampler_logps=flat(sampler_logps), entropy=flat(entropy), mask=flat(mask),
                       cu_seqlens=flat(cu_seqlens))
    max_len = settings.max_completion_length
    if max_len is None and cu_seqlens is None:
        max_len = shape[1]
    ints, floats = settings.encoded
    return _Prepared(tensors, ints, floats, num_items, max_len, per_token)


def _combine(stats, settings, prepared: _Prepared):
    loss, metrics, c, e = torch_grpo.combine(
        stats, settings, per_token_adv=prepared.per_token_adv, num_items_in_batch=prepared.num_items,
        max_completion_length=prepared.max_len, has_ref=prepared.tensors.ref_logps is not None,
        has_entropy=prepared.tensors.entropy is not None)
    return loss.float(), metrics, c, e


# ------------------------------------------------------------------------------------------------
# Custom ops: per-sequence stats forward, gradients backward. The settings travel as
# ``GRPOSettings.encode()``'s ``(ints, floats)``; each op reads them back with ``GRPOSettings.decode``
# (cached: a step's ops see the same few settings, checked once).

_decode = functools.lru_cache(maxsize=256)(GRPOSettings.decode)


def _launch(kernel, pointers, logps, mask, cu_seqlens, s: GRPOSettings, *, per_token_adv: bool, has_ref: bool,
            has_entropy: bool, sampler: bool) -> None:
    """One launch of ``kernel`` over the B sequences (one program each): the kernels' scalar and
    constexpr arguments, all from the settings ``s``, are written here only."""
    import triton

    from fastrl.kernels import launch

    packed = cu_seqlens is not None
    b = cu_seqlens.shape[0] - 1 if packed else logps.shape[0]
    length = 0 if packed else logps.shape[1]
    span = logps.shape[0] // max(b, 1) if packed else length
    block = max(16, min(_MAX_BLOCK, triton.next_power_of_2(max(span, 1))))
    policy = _POLICIES.index(s.policy)
    level = IS_LEVELS.index(s.level)
    is_mode = IS_MODES.index(s.is_mode) + 1 if sampler else 0
    off_policy = s.off_policy_mask_threshold is not None
    inf = float("inf")
    launch(kernel, (b,), *pointers, logps.shape[0], length,
           1.0 - s.eps_low, 1.0 + s.eps_high, s.eps_high, s.delta or 0.0, s.clip_ratio_c or 0.0, s.beta,
           0.0 if s.is_min is None else s.is_min, inf if s.is_cap is None else s.is_cap,
           s.off_policy_mask_threshold or 0.0, s.sapo_tau_pos, s.sapo_tau_neg,
           *s.vespo_k, *s.vespo_lambda,  # each (pos, neg)
           PACKED=packed, ADV_TOKEN=per_token_adv, POLICY=policy, LEVEL=level, KL=KL_ESTIMATORS.index(s.kl_estimator),
           KL_ST=s.kl_straight_through, BIAS=s.use_bias_correction_kl, HAS_REF=has_ref,
           HAS_BETA=has_ref and s.beta != 0.0, HAS_DELTA=s.delta is not None, DUAL=s.clip_ratio_c is not None,
           IS_MODE=is_mode, OFF_POLICY=off_policy, HAS_ENT=has_entropy,
           SEQ_PASS=level != 0 or s.policy == "vespo" or off_policy or is_mode >= 3, BLOCK=block,
           num_warps=max(1, min(8, block // 128)))


@torch.library.custom_op("fastrl::grpo_loss_stats", mutates_args=())
def _stats_op(logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor,
              ref_logps: torch.Tensor | None, sampler_logps: torch.Tensor | None, entropy: torch.Tensor | None,
              mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None, ints: Sequence[int],
              floats: Sequence[float]) -> torch.Tensor:
    """The operator under :func:`grpo_loss` (arguments checked there; per-token tensors contiguous; the
    tensors are those of :class:`_Tensors`, in its order): per-sequence ``stats`` [B, NSTATS] fp32
    (columns: :mod:`fastrl.kernels.grpo_columns`)."""
    s = _decode(tuple(ints), tuple(floats))
    b = torch_grpo.num_sequences(logps.shape, cu_seqlens)
    per_token = torch_grpo.advantages_per_token(advantages, tuple(logps.shape), cu_seqlens)
    if resolve(logps.device) == "torch" or b == 0:
        return torch_grpo.grpo_sequence_stats(logps, old_logps, advantages, mask, cu_seqlens, ref_logps=ref_logps,
                                             sampler_logps=sampler_logps, entropy=entropy, settings=s).float()
    from fastrl.kernels.grpo_loss import grpo_loss_fwd_kernel

    stats = torch.empty(b, NSTATS, dtype=torch.float32, device=logps.device)
    old = logps if old_logps is None else old_logps
    sampler = sampler_logps if sampler_logps is not None else old
    opsrc = sampler  # the off-policy mask measures the drift from the sampler (TRL), else from old
    pointers = (logps, old, advantages, logps if ref_logps is None else ref_logps, sampler, opsrc,
                logps if entropy is None else entropy, logps if mask is None else mask,
                logps if cu_seqlens is None else cu_seqlens, stats)
    _launch(grpo_loss_fwd_kernel, pointers, logps, mask, cu_seqlens, s, per_token_adv=per_token,
            has_ref=ref_logps is not None, has_entropy=entropy is not None, sampler=sampler_logps is not None)
    return stats


@_stats_op.register_fake
def _(logps, old_logps, advantages, ref_logps, sampler_logps, entropy, mask, cu_seqlens, ints, floats):
    b = torch_grpo.num_sequences(logps.shape, cu_seqlens)
    return logps.new_empty(b, NSTATS, dtype=torch.float32)


@torch.library.custom_op("fastrl::grpo_loss_stats_backward", mutates_args=())
def _stats_backward_op(grad_loss: torch.Tensor, grad_entropy: torch.Tensor | None, stats: torch.Tensor,
                       logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor,
                       ref_logps: torch.Tensor | None, sampler_logps: torch.Tensor | None, mask: torch.Tensor | None,
                       cu_seqlens: torch.Tensor | None, ints: Sequence[int], floats: Sequence[float],
                       has_entropy: bool, entropy_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d logps, d entropy)`` of ``sum_i grad_loss[i] * stats[i, LOSS] + grad_entropy[i] *
    stats[i, ENT]``; the tensors after ``stats`` are :meth:`_Tensors.for_backward`'s. ``d entropy`` is
    an empty tensor without entropy (``has_entropy`` False)."""
    s = _decode(tuple(ints), tuple(floats))
    b = torch_grpo.num_sequences(logps.shape, cu_seqlens)
    per_token = torch_grpo.advantages_per_token(advantages, tuple(logps.shape), cu_seqlens)
    empty = logps.new_empty(0, dtype=entropy_dtype)
    if grad_entropy is None and has_entropy:
        grad_entropy = torch.zeros_like(grad_loss)
    if resolve(logps.device) == "torch" or b == 0 or logps.numel() == 0:
        entropy_like = logps.new_empty(logps.shape, dtype=entropy_dtype) if has_entropy else None
        d_logps, d_entropy = torch_grpo.grpo_sequence_stats_backward(
            grad_loss, grad_entropy, logps, old_logps, advantages, mask, cu_seqlens, ref_logps=ref_logps,
            sampler_logps=sampler_logps, entropy_like=entropy_like, settings=s)
        return d_logps, d_entropy if has_entropy else empty
    from fastrl.kernels.grpo_loss import grpo_loss_bwd_kernel

    # packed: positions outside every span (only reachable with unchecked offsets) stay 0
    alloc = torch.zeros if cu_seqlens is not None else torch.empty
    d_logps = alloc(logps.shape, dtype=logps.dtype, device=logps.device)
    d_entropy = alloc(logps.shape, dtype=entropy_dtype, device=logps.device) if has_entropy else empty
    old = logps if old_logps is None else old_logps
    sampler = sampler_logps if sampler_logps is not None else old
    grad_loss = grad_loss.float().contiguous()
    ge = grad_entropy.float().contiguous() if has_entropy else grad_loss
    pointers = (logps, old, advantages, logps if ref_logps is None else ref_logps, sampler,
                logps if mask is None else mask, logps if cu_seqlens is None else cu_seqlens, stats.contiguous(),
                grad_loss, ge, d_logps, d_entropy if has_entropy else d_logps)
    _launch(grpo_loss_bwd_kernel, pointers, logps, mask, cu_seqlens, s, per_token_adv=per_token,
            has_ref=ref_logps is not None, has_entropy=has_entropy, sampler=sampler_logps is not None)
    return d_logps, d_entropy


@_stats_backward_op.register_fake
def _(grad_loss, grad_entropy, stats, logps, old_logps, advantages, ref_logps, sampler_logps, mask, cu_seqlens,
      ints, floats, has_entropy, entropy_dtype):
    d_entropy = logps.new_empty(logps.shape if has_entropy else (0,), dtype=entropy_dtype)
    return torch.empty_like(logps), d_entropy


def _setup_context(ctx, inputs, output):
    n = len(_Tensors._fields)
    tensors = _Tensors._make(inputs[:n])  # the op's arguments: the tensors, then ints and floats
    ctx.ints, ctx.floats = inputs[n:]
    backward = tensors.for_backward()
    ctx.backward_names = tuple(backward)
    ctx.save_for_backward(*backward.values(), output)
    ctx.has_entropy = tensors.entropy is not None
    ctx.entropy_dtype = tensors.entropy.dtype if tensors.entropy is not None else tensors.logps.dtype


def _backward(ctx, grad_stats):
    *saved, stats = ctx.saved_tensors
    grad_entropy = grad_stats[:, ENT] if ctx.has_entropy else None
    d_logps, d_entropy = _stats_backward_op(grad_stats[:, LOSS], grad_entropy, stats,
                                            **dict(zip(ctx.backward_names, saved)), ints=ctx.ints,
                                            floats=ctx.floats, has_entropy=ctx.has_entropy,
                                            entropy_dtype=ctx.entropy_dtype)
    grads = _Tensors(logps=d_logps, entropy=d_entropy if ctx.has_entropy else None)
    return (*grads, None, None)  # nothing for ints, floats


_stats_op.register_autograd(_backward, setup_context=_setup_context)
