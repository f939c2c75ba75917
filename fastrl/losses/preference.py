"""Listwise, unpaired and reward-model preference losses (plain, vectorised torch).

>>> import torch
>>> from fastrl.losses.preference import bradley_terry_loss
>>> loss, metrics = bradley_terry_loss(torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5]))
>>> round(loss.item(), 4), metrics["rewards/accuracies"].item()
(0.8133, 0.5)

- Listwise, for K completions of one prompt scored ψ (a reward model, a judge, human ranks):
  :func:`lipo_loss` (LiPO-λ, and RankDPO's weights), :func:`plackett_luce_loss` (DPO under the
  Plackett–Luce model).
- Unpaired (each completion labelled desirable or not): :func:`kto_loss`, :func:`bco_loss` (its
  running reward baseline kept by :class:`BCOLoss`).
- Reward model: :func:`bradley_terry_loss`.

Each has a module form (options in ``__init__``, tensors in ``forward``) and returns
``(loss, metrics)`` with detached metrics. No Python loop runs over rows or lists: pairs within a
list are ``[N, K, K]`` tensors (K is small). Formulas: ``docs/losses.md#listwise-unpaired-and-reward-model-losses``;
items marked ‡ there are marked here too, with whether they were checked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastrl import _checks

__all__ = ["BCOLoss", "BradleyTerryLoss", "KTOLoss", "LiPOLoss", "PlackettLuceLoss", "RunningMean", "bco_loss",
           "bradley_terry_loss", "kto_loss", "lipo_loss", "plackett_luce_loss"]

_FLOATS = (*_checks.FLOAT_DTYPES, torch.float64)
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
LIPO_WEIGHTINGS = ("lambda", "uniform")
LIPO_RANK_BY = ("policy", "scores")


def _dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_same(name: str, value, like: torch.Tensor, like_name: str, *, dtypes=_FLOATS) -> torch.Tensor:
    _checks.check_tensor(name, value, dtypes=dtypes, device=like.device)
    if value.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(value.shape)}")
    return value


def _finite(name: str, t: torch.Tensor):
    return (~torch.isfinite(t)).any(), f"{name} must be finite (no NaN or inf)"


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` where ``mask``; 0 when nothing is selected."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------
# Listwise


def _list_inputs(policy_logps, ref_logps, scores, mask, beta):
    """Checked ``s = β(π − ρ)`` [N, K], scores ψ [N, K] and the mask of valid items [N, K]."""
    _checks.check_tensor("policy_logps", policy_logps, ndim=2, dtypes=_FLOATS)
    if policy_logps.shape[1] < 2:
        raise ValueError("policy_logps must be [N, K] with K >= 2 completions per list, got "
                         f"{tuple(policy_logps.shape)}")
    _check_same("scores", scores, policy_logps, "policy_logps")
    values = [_finite("policy_logps", policy_logps), _finite("scores", scores)]
    if ref_logps is not None:
        _check_same("ref_logps", ref_logps, policy_logps, "policy_logps")
        values.append(_finite("ref_logps", ref_logps))
    if mask is None:
        mask = torch.ones_like(policy_logps, dtype=torch.bool)
    else:
        _check_same("mask", mask, policy_logps, "policy_logps", dtypes=(torch.bool,))
    beta = _checks.check_real("beta", beta, low=0.0, low_open=True)
    _checks.raise_first(values)
    dtype = _dtype(policy_logps, ref_logps, scores)
    r = policy_logps.to(dtype) - (0.0 if ref_logps is None else ref_logps.detach().to(dtype))
    return beta * r, scores.detach().to(dtype), mask


def _ordered_pairs(s, psi, mask):
    """[N, K, K] bool: i is preferred to j (ψ_i > ψ_j), both valid; and the pairwise metrics."""
    pairs = (psi[:, :, None] > psi[:, None, :]) & mask[:, :, None] & mask[:, None, :]
    diff = s[:, :, None] - s[:, None, :]
    with torch.no_grad():
        metrics = {"rewards/accuracies": _masked_mean((diff > 0).to(s.dtype), pairs),
                   "rewards/margins": _masked_mean(diff, pairs),
                   "rewards/mean": _masked_mean(s, mask)}
    return pairs, diff, metrics


def _ranks(key: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1-based rank of each valid item by ``key``, descending (ties in index order); invalid items last."""
    key = key.masked_fill(~mask, float("-inf"))
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    return torch.argsort(order, dim=1, stable=True).to(key.dtype) + 1


def lipo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor | None, scores: torch.Tensor,
              mask: torch.Tensor | None = None, *, beta: float = 0.1, weighting: str = "lambda",
              rank_by: str = "policy") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LiPO-λ ‡ (Liu et al. 2024, the LambdaLoss objective of its Sec. 4), a listwise preference loss.

    For each list of K completions with scores ψ,

        ``−Σ_{ψ_i > ψ_j} Δ_ij · ls(s_i − s_j)``, ``s = β(π − ρ)``,
        ``Δ_ij = |G_i − G_j| · |1/D(τ_i) − 1/D(τ_j)|``, ``G = 2^ψ − 1``, ``D(τ) = log(1 + τ)``,

    τ the 1-based rank of each item by ``s`` descending (``rank_by="policy"``, LambdaLoss) or by ψ
    (``rank_by="scores"``); Δ carries no gradient. ``weighting="uniform"`` sets Δ = 1 (the pairwise
    logistic loss over all ordered pairs: DPO for K = 2). RankDPO ‡ (Karthik et al. 2024) is this
    DCG-weighted form with reward-model scores as ψ. Both ‡ items are checked against a summary of
    the LiPO paper (gain 2^ψ − 1, discount log(1 + τ), τ by model score), not the paper itself;
    RankDPO's choice of τ is unchecked. The loss is the mean over lists of the per-list sums.

    Args:
        policy_logps: ``[N, K]`` fp32, bf16, fp16 or fp64, K >= 2 (differentiable).
        ref_logps: ``[N, K]`` floating, or None (reference-free).
        scores: ``[N, K]`` floating, ψ; higher is better.
        mask: ``[N, K]`` bool, the valid items (lists shorter than K); None: all valid.
        beta: β > 0.
        weighting: ``"lambda"`` (Δ as above) or ``"uniform"`` (Δ = 1).
        rank_by: ``"policy"`` or ``"scores"``, what τ ranks by.

    Returns:
        ``(loss, metrics)``: ``loss`` 0-d fp32 (fp64 for fp64 inputs); ``metrics`` detached 0-d:
        ``rewards/accuracies`` and ``rewards/margins`` (pairwise accuracy and margin of s over the
        ordered pairs), ``rewards/mean`` (mean s).

    Raises:
        ValueError: an unknown ``weighting`` / ``rank_by``, K < 2, mismatched shapes, ``beta <= 0``,
            non-finite inputs.
        TypeError: a non-tensor or a wrong dtype, naming the argument.
    """
    if weighting not in LIPO_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(LIPO_WEIGHTINGS)}; got {weighting!r}")
    if rank_by not in LIPO_RANK_BY:
        raise ValueError(f"rank_by must be one of {', '.join(LIPO_RANK_BY)}; got {rank_by!r}")
    s, psi, mask = _list_inputs(policy_logps, ref_logps, scores, mask, beta)
    pairs, diff, metrics = _ordered_pairs(s, psi, mask)
    if weighting == "lambda":
        with torch.no_grad():
            gain = torch.exp2(psi) - 1
            tau = _ranks(s if rank_by == "policy" else psi, mask)
            inv_discount = 1 / torch.log1p(tau)
            delta = (gain[:, :, None] - gain[:, None, :]).abs() * \
                (inv_discount[:, :, None] - inv_discount[:, None, :]).abs()
    else:
        delta = torch.ones_like(diff)
    per_list = -(torch.where(pairs, delta * F.logsigmoid(diff), 0.0)).sum(dim=(1, 2))
    return per_list.mean(), metrics


def plackett_luce_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor | None, scores: torch.Tensor,
                       mask: torch.Tensor | None = None, *,
                       beta: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO under the Plackett–Luce model (DPO paper, Appendix A.3, Eq. 18), a listwise preference loss.

    For each list, with ``s = β(π − ρ)`` and τ the order of the items by ``scores`` descending (ties in
    index order),

        ``−Σ_k [s_{τ(k)} − logsumexp_{j ≥ k} s_{τ(j)}]``

    over the valid items; the loss is the mean over lists. K = 2 gives the DPO sigmoid loss.

    Args:
        policy_logps: ``[N, K]`` fp32, bf16, fp16 or fp64, K >= 2 (differentiable).
        ref_logps: ``[N, K]`` floating, or None (reference-free).
        scores: ``[N, K]`` floating; higher is better.
        mask: ``[N, K]`` bool, the valid items; None: all valid.
        beta: β > 0.

    Returns:
        ``(loss, metrics)`` as :func:`lipo_loss`.

    Raises:
        ValueError: as :func:`lipo_loss`.
        TypeError: as :func:`lipo_loss`.
    """
    s, psi, mask = _list_inputs(policy_logps, ref_logps, scores, mask, beta)
    _, _, metrics = _ordered_pairs(s, psi, mask)
    order = torch.argsort(psi.masked_fill(~mask, float("-inf")), dim=1, descending=True, stable=True)
    valid = torch.gather(mask, 1, order)
    ranked = torch.gather(s, 1, order).masked_fill(~valid, float("-inf"))
    # logsumexp over each suffix j >= k: a reversed cumulative logsumexp
    tail = torch.logcumsumexp(ranked.flip(1), dim=1).flip(1)
    terms = torch.where(valid, ranked - tail, 0.0)
    return -terms.sum(1).mean(), metrics


class LiPOLoss(nn.Module):
    """Module form of :func:`lipo_loss`.

    Its ``forward`` takes ``policy_logps``, ``ref_logps``, ``scores`` and ``mask`` as
    :func:`lipo_loss` does and returns ``(loss, metrics)``.

    Args:
        beta: β > 0.
        weighting: ``"lambda"`` or ``"uniform"``.
        rank_by: ``"policy"`` or ``"scores"``.

    Raises:
        ValueError: an unknown ``weighting`` / ``rank_by``, or ``beta <= 0``.
    """

    def __init__(self, *, beta: float = 0.1, weighting: str = "lambda", rank_by: str = "policy"):
        super().__init__()
        self.beta = _checks.check_real("beta", beta, low=0.0, low_open=True)
        if weighting not in LIPO_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(LIPO_WEIGHTINGS)}; got {weighting!r}")
        if rank_by not in LIPO_RANK_BY:
            raise ValueError(f"rank_by must be one of {', '.join(LIPO_RANK_BY)}; got {rank_by!r}")
        self.weighting, self.rank_by = weighting, rank_by

    def forward(self, policy_logps, ref_logps, scores, mask=None):
        return lipo_loss(policy_logps, ref_logps, scores, mask, beta=self.beta, weighting=self.weighting,
                         rank_by=self.rank_by)


class PlackettLuceLoss(nn.Module):
    """Module form of :func:`plackett_luce_loss`.

    Its ``forward`` takes ``policy_logps``, ``ref_logps``, ``scores`` and ``mask`` as
    :func:`plackett_luce_loss` does and returns ``(loss, metrics)``.

    Args:
        beta: β > 0.

    Raises:
        ValueError: ``beta <= 0``.
    """

    def __init__(self, *, beta: float = 0.1):
        super().__init__()
        self.beta = _checks.check_real("beta", beta, low=0.0, low_open=True)

    def forward(self, policy_logps, ref_logps, scores, mask=None):
        return plackett_luce_loss(policy_logps, ref_logps, scores, mask, beta=self.beta)


# ---------------------------------------------------------------------------------------------------
# Unpaired


def _unpaired_inputs(policy_logps, ref_logps, labels):
    _checks.check_tensor("policy_logps", policy_logps, ndim=1, dtypes=_FLOATS)
    if policy_logps.shape[0] == 0:
        raise ValueError("policy_logps must hold at least one completion")
    _check_same("ref_logps", ref_logps, policy_logps, "policy_logps")
    _check_same("labels", labels, policy_logps, "policy_logps", dtypes=(torch.bool,))
    return [_finite("policy_logps", policy_logps), _finite("ref_logps", ref_logps)]


def _unpaired_metrics(rewards, policy_logps, labels) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        chosen, rejected = _masked_mean(rewards, labels), _masked_mean(rewards, ~labels)
        return {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
                "logps/chosen": _masked_mean(policy_logps.detach().to(rewards.dtype), labels),
                "logps/rejected": _masked_mean(policy_logps.detach().to(rewards.dtype), ~labels)}


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor, *,
             kl_logps: torch.Tensor | None = None, ref_kl_logps: torch.Tensor | None = None,
             kl: float | torch.Tensor | None = None, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, loss_type: str = "kto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO (Ethayarajh et al. 2024, Eq. 7) as TRL 1.16's ``KTOTrainer._compute_loss``, an unpaired loss.

    With ``r = π − ρ`` per completion and the reference point ``z₀``,

        desirable ``λ_D·(1 − σ(β(r − z₀)))``, undesirable ``λ_U·(1 − σ(β(z₀ − r)))``,

    averaged over all B completions. ``z₀`` is ``kl`` when given (a number or 0-d tensor, used as
    is: Liger-Kernel's ``kl`` argument), else ``max(0, mean(kl_logps − ref_kl_logps))`` from the
    mismatched (prompt, completion) pairs TRL builds (on one process: TRL also averages it across
    processes), else 0; it carries no gradient. ``loss_type="apo_zero_unpaired"``: desirable
    ``1 − σ(βr)``, undesirable ``σ(βr)`` (APO, TRL), no z₀.

    Args:
        policy_logps: ``[B]`` fp32, bf16, fp16 or fp64 (differentiable).
        ref_logps: ``[B]`` floating.
        labels: ``[B]`` bool, True = desirable.
        kl_logps: ``[B']`` floating, the policy's log-probs of the mismatched pairs, or None.
        ref_kl_logps: ``[B']`` floating, the reference's of the same pairs, or None.
        kl: ``z₀`` as a number or a one-element (``[]`` / ``[1]``) floating tensor, or None.
        beta: β > 0.
        desirable_weight: λ_D >= 0.
        undesirable_weight: λ_U >= 0.
        loss_type: ``"kto"`` or ``"apo_zero_unpaired"``.

    Returns:
        ``(loss, metrics)``: ``loss`` 0-d fp32 (fp64 for fp64 inputs); ``metrics`` (TRL's names),
        detached 0-d: rewards/chosen, rewards/rejected, rewards/margins (means of β·r per class, 0 for
        an empty class), logps/chosen, logps/rejected, kl (z₀).

    Raises:
        ValueError: an unknown ``loss_type``, ``kl`` together with ``kl_logps``, one of ``kl_logps`` /
            ``ref_kl_logps`` without the other, bad shapes or values.
        TypeError: a non-tensor or a wrong dtype, naming the argument.
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(KTO_LOSS_TYPES)}; got {loss_type!r}")
    values = _unpaired_inputs(policy_logps, ref_logps, labels)
    beta = _checks.check_real("beta", beta, low=0.0, low_open=True)
    desirable_weight = _checks.check_real("desirable_weight", desirable_weight, low=0.0)
    undesirable_weight = _checks.check_real("undesirable_weight", undesirable_weight, low=0.0)
    dtype = _dtype(policy_logps, ref_logps)
    if kl is not None:
        if kl_logps is not None or ref_kl_logps is not None:
            raise ValueError("pass kl or kl_logps / ref_kl_logps, not both")
        if isinstance(kl, torch.Tensor):
            _checks.check_tensor("kl", kl, dtypes=_FLOATS, device=policy_logps.device)
            if kl.numel() != 1:
                raise ValueError(f"kl must be a number or a one-element tensor, got shape {tuple(kl.shape)}")
            values.append(_finite("kl", kl))
            z0 = kl.detach().reshape(()).to(dtype)
        else:
            z0 = torch.tensor(_checks.check_real("kl", kl), dtype=dtype, device=policy_logps.device)
    elif (kl_logps is None) != (ref_kl_logps is None):
        raise ValueError("pass both kl_logps and ref_kl_logps, or neither")
    elif kl_logps is not None:
        _checks.check_tensor("kl_logps", kl_logps, ndim=1, dtypes=_FLOATS, device=policy_logps.device)
        _check_same("ref_kl_logps", ref_kl_logps, kl_logps, "kl_logps")
        values += [_finite("kl_logps", kl_logps), _finite("ref_kl_logps", ref_kl_logps)]
        z0 = (kl_logps.detach().to(dtype) - ref_kl_logps.detach().to(dtype)).mean().clamp(min=0)
    else:
        z0 = torch.zeros((), dtype=dtype, device=policy_logps.device)
    _checks.raise_first(values)
    r = policy_logps.to(dtype) - ref_logps.detach().to(dtype)
    if loss_type == "kto":
        desirable = 1 - torch.sigmoid(beta * (r - z0))
        undesirable = 1 - torch.sigmoid(beta * (z0 - r))
    else:
        desirable = 1 - torch.sigmoid(beta * r)
        undesirable = torch.sigmoid(beta * r)
    losses = torch.where(labels, desirable_weight * desirable, undesirable_weight * undesirable)
    metrics = _unpaired_metrics(beta * r.detach(), policy_logps, labels)
    metrics["kl"] = z0.detach()
    return losses.mean(), metrics


def bco_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor, *, beta: float = 0.1,
             delta: float | torch.Tensor = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BCO (Jung et al. 2024) as TRL's ``BCOTrainer.bco_loss``, an unpaired loss.

    Without TRL's optional prompt-embedding density-ratio weights: desirable ``−ls(βr − δ)``,
    undesirable ``−ls(−(βr − δ))``, ``r = π − ρ``, averaged over all B completions. :class:`BCOLoss`
    keeps δ as the running mean of the rewards.

    Args:
        policy_logps: ``[B]`` fp32, bf16, fp16 or fp64 (differentiable).
        ref_logps: ``[B]`` floating.
        labels: ``[B]`` bool, True = desirable.
        beta: β > 0.
        delta: the reward baseline δ, a number or a one-element (``[]`` / ``[1]``) floating tensor (no
            gradient).

    Returns:
        ``(loss, metrics)`` as :func:`kto_loss`, the metrics with ``delta`` in place of ``kl``.

    Raises:
        ValueError: bad shapes or values, ``beta <= 0``.
        TypeError: a non-tensor or a wrong dtype, naming the argument.
    """
    values = _unpaired_inputs(policy_logps, ref_logps, labels)
    beta = _checks.check_real("beta", beta, low=0.0, low_open=True)
    dtype = _dtype(policy_logps, ref_logps)
    if isinstance(delta, torch.Tensor):
        _checks.check_tensor("delta", delta, dtypes=_FLOATS, device=policy_logps.device)
        if delta.numel() != 1:
            raise ValueError(f"delta must be a number or a one-element tensor, got shape {tuple(delta.shape)}")
        values.append(_finite("delta", delta))
        d = delta.detach().reshape(()).to(dtype)
    else:
        d = torch.tensor(_checks.check_real("delta", delta), dtype=dtype, device=policy_logps.device)
    _checks.raise_first(values)
    rewards = beta * (policy_logps.to(dtype) - ref_logps.detach().to(dtype))
    losses = torch.where(labels, -F.logsigmoid(rewards - d), -F.logsigmoid(-(rewards - d)))
    metrics = _unpaired_metrics(rewards.detach(), policy_logps, labels)
    metrics["delta"] = d
    return losses.mean(), metrics


class RunningMean(nn.Module):
    """The running mean of every value passed to :meth:`update`, count-weighted (TRL's ``RunningMoments.mean``).

    Kept as fp64 buffers (``mean``, ``count``) so that it is checkpointed with the module. It has no
    ``forward``: call :meth:`update` with a tensor of any shape and dtype, read ``mean``.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, values: torch.Tensor) -> None:
        values = values.detach().to(device=self.mean.device, dtype=torch.float64).reshape(-1)
        n = values.numel()
        if n == 0:
            return
        total = self.count + n
        self.mean += (values.mean() - self.mean) * (n / total)
        self.count.copy_(total)


class BCOLoss(nn.Module):
    """Module form of :func:`bco_loss` with BCO's reward baseline kept as a running mean.

    In training mode each call first adds the batch's rewards β·r (desirable and undesirable alike)
    to a running mean, then uses it as δ (TRL's ``do_train=True``); in eval mode δ is read, not
    updated. Its ``forward`` takes ``policy_logps``, ``ref_logps`` and ``labels`` as :func:`bco_loss`
    does and returns ``(loss, metrics)``.

    Args:
        beta: β > 0.

    Raises:
        ValueError: ``beta <= 0``.
    """

    def __init__(self, *, beta: float = 0.1):
        super().__init__()
        self.beta = _checks.check_real("beta", beta, low=0.0, low_open=True)
        self.running = RunningMean()

    def forward(self, policy_logps, ref_logps, labels):
        if self.training:
            _unpaired_inputs(policy_logps, ref_logps, labels)
            self.running.update(self.beta * (policy_logps.detach().double() - ref_logps.detach().double()))
        return bco_loss(policy_logps, ref_logps, labels, beta=self.beta, delta=self.running.mean)


class KTOLoss(nn.Module):
    """Module form of :func:`kto_loss`.

    Its ``forward`` takes ``policy_logps``, ``ref_logps``, ``labels`` and the keywords ``kl_logps``,
    ``ref_kl_logps``, ``kl`` as :func:`kto_loss` does and returns ``(loss, metrics)``.

    Args:
        beta: β > 0.
        desirable_weight: λ_D >= 0.
        undesirable_weight: λ_U >= 0.
        loss_type: ``"kto"`` or ``"apo_zero_unpaired"``.

    Raises:
        ValueError: an unknown ``loss_type`` or an option out of range.
    """

    def __init__(self, *, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 loss_type: str = "kto"):
        super().__init__()
        if loss_type not in KTO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(KTO_LOSS_TYPES)}; got {loss_type!r}")
        self.beta = _checks.check_real("beta", beta, low=0.0, low_open=True)
        self.desirable_weight = _checks.check_real("desirable_weight", desirable_weight, low=0.0)
        self.undesirable_weight = _checks.check_real("undesirable_weight", undesirable_weight, low=0.0)
        self.loss_type = loss_type

    def forward(self, policy_logps, ref_logps, labels, *, kl_logps=None, ref_kl_logps=None, kl=None):
        return kto_loss(policy_logps, ref_logps, labels, kl_logps=kl_logps, ref_kl_logps=ref_kl_logps, kl=kl,
                        beta=self.beta, desirable_weight=self.desirable_weight,
                        undesirable_weight=self.undesirable_weight, loss_type=self.loss_type)


# ---------------------------------------------------------------------------------------------------
# Reward model


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | float | None = None, *,
                       center_rewards_coefficient: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley–Terry reward-model loss, as TRL 1.16's ``RewardTrainer``.

    ``mean(−ls(r_c − r_r − m))`` with the optional margin m, plus
    ``center_rewards_coefficient · mean((r_c + r_r)²)`` when given (TRL's reward centring).

    Args:
        chosen_rewards: ``[B]`` fp32, bf16, fp16 or fp64, r_c (differentiable).
        rejected_rewards: ``[B]`` floating, r_r (differentiable).
        margin: m, a number or a per-pair ``[B]`` floating tensor (no gradient), or None.
        center_rewards_coefficient: >= 0, or None (no centring).

    Returns:
        ``(loss, metrics)``: ``loss`` 0-d fp32 (fp64 for fp64 inputs); ``metrics`` detached 0-d:
        rewards/chosen, rewards/rejected, rewards/margins (means), rewards/accuracies (share with
        r_c > r_r).

    Raises:
        ValueError: an empty batch, mismatched shapes, non-finite values, a negative coefficient.
        TypeError: a non-tensor or a wrong dtype, naming the argument.
    """
    _checks.check_tensor("chosen_rewards", chosen_rewards, ndim=1, dtypes=_FLOATS)
    if chosen_rewards.shape[0] == 0:
        raise ValueError("chosen_rewards must hold at least one pair")
    _check_same("rejected_rewards", rejected_rewards, chosen_rewards, "chosen_rewards")
    values = [_finite("chosen_rewards", chosen_rewards), _finite("rejected_rewards", rejected_rewards)]
    dtype = _dtype(chosen_rewards, rejected_rewards)
    rc, rr = chosen_rewards.to(dtype), rejected_rewards.to(dtype)
    logits = rc - rr
    if isinstance(margin, torch.Tensor):
        _check_same("margin", margin, chosen_rewards, "chosen_rewards")
        values.append(_finite("margin", margin))
        logits = logits - margin.detach().to(dtype)
    elif margin is not None:
        logits = logits - _checks.check_real("margin", margin)
    _checks.raise_first(values)
    loss = -F.logsigmoid(logits).mean()
    if center_rewards_coefficient is not None:
        coef = _checks.check_real("center_rewards_coefficient", center_rewards_coefficient, low=0.0)
        loss = loss + coef * ((rc + rr) ** 2).mean()
    with torch.no_grad():
        metrics = {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "rewards/margins": (rc - rr).mean(),
                   "rewards/accuracies": (rc > rr).to(dtype).mean()}
    return loss, metrics


class BradleyTerryLoss(nn.Module):
    """Module form of :func:`bradley_terry_loss`.

    Its ``forward`` takes ``chosen_rewards``, ``rejected_rewards`` and ``margin`` as
    :func:`bradley_terry_loss` does and returns ``(loss, metrics)``.

    Args:
        center_rewards_coefficient: >= 0, or None (no centring).

    Raises:
        ValueError: a negative ``center_rewards_coefficient``.
    """

    def __init__(self, *, center_rewards_coefficient: float | None = None):
        super().__init__()
        if center_rewards_coefficient is not None:
            center_rewards_coefficient = _checks.check_real("center_rewards_coefficient", center_rewards_coefficient,
                                                            low=0.0)
        self.center_rewards_coefficient = center_rewards_coefficient

    def forward(self, chosen_rewards, rejected_rewards, margin=None):
        return bradley_terry_loss(chosen_rewards, rejected_rewards, margin,
                                  center_rewards_coefficient=self.center_rewards_coefficient)
