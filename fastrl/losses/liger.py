"""Liger-Kernel's fused-linear GRPO and DPO losses, same calls, computed by fastrl's ops.

Switching from Liger-Kernel 0.8.5 is an import change::

    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss, LigerFusedLinearDPOLoss   # before
    from fastrl.losses.liger import LigerFusedLinearGRPOLoss, LigerFusedLinearDPOLoss         # after

The classes take Liger's constructor keywords with Liger's defaults (``beta=0.04``, ``loss_type="dapo"``
for GRPO; ``beta=0.1``, ``loss_type="sigmoid"`` for DPO), the forward arguments in Liger's order (the DPO
loss takes the lm-head weight first, the GRPO loss the hidden states first, as Liger's do) and return
Liger's tuples: GRPO ``(loss, (kl, clip_ratio))`` (``kl`` only when ``beta != 0``), DPO ``(loss,
(chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards,
rejected_rewards))``. The numbers are Liger's (``tests/losses/test_liger_dropin.py`` compares loss,
metrics and gradients with Liger's own classes where it is installed).

>>> import torch
>>> from fastrl.losses.liger import LigerFusedLinearGRPOLoss
>>> hidden = torch.randn(2, 5, 32, requires_grad=True)      # [B, T, H]
>>> lm_head = torch.randn(300, 32, requires_grad=True)      # [V, H]
>>> tokens = torch.randint(0, 300, (2, 5))
>>> mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
>>> loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False)
>>> loss, (clip_ratio,) = loss_fn(hidden, lm_head, tokens, mask, torch.tensor([1.0, -1.0]))
>>> loss.backward()
>>> hidden.grad.shape, float(clip_ratio)
(torch.Size([2, 5, 32]), 0.0)

The GRPO loss is :func:`fastrl.losses.fused_linear_grpo_loss` (its gradients made in the forward, no
logits tensor); the DPO loss takes the token log-probs with :func:`fastrl.ops.fused_linear_logprobs`
and the loss with :func:`fastrl.losses.dpo_loss`. How Liger's keywords map to fastrl's settings is
:data:`GRPO_KEYWORDS` / :data:`DPO_KEYWORDS` (also ``docs/migration.md``). What differs:

- ``compiled`` and ``chunk_size`` are accepted and change nothing (fastrl's ops need no ``torch.compile``;
  their chunking follows a workspace budget, not a batch count).
- GRPO ``loss_type="luspo"`` is TRL 1.16's (the mean over sequences of their masked token sums); Liger
  0.8.5 weighs each sequence's sum by its length over the padded length and also sums the padding
  positions, so the two agree on batches without padding only.
- GRPO ``delta`` must be > 1 (fastrl's check; Liger takes any positive value).
- GRPO ``vllm_is_ratio`` of shape ``[B, T]`` with ``loss_type="vespo"``: the log-ratios are summed over the
  masked tokens (Liger sums every position, padding included); equal when padding carries ratio 1.
- Hidden sizes that are not a multiple of 16 work, as in Liger (fastrl pads them, a slower path).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from fastrl.losses.dpo import DPOSettings, dpo_loss
from fastrl.losses.fused_linear_grpo import fused_linear_grpo_loss
from fastrl.losses.grpo import GRPOSettings
from fastrl.ops.fused_linear_logprobs import fused_linear_logprobs

__all__ = ["DPO_KEYWORDS", "GRPO_KEYWORDS", "LigerFusedLinearDPOLoss", "LigerFusedLinearGRPOLoss"]

# Liger's constructor keyword -> what fastrl does with it (a GRPOSettings field, or how it is used).
GRPO_KEYWORDS = {
    "beta": "beta (0 when use_ref_model=False: Liger's KL is then 0)",
    "compiled": "ignored (fastrl's ops need no torch.compile)",
    "use_ref_model": "beta > 0 with ref_logps (else beta is 0)",
    "chunk_size": "ignored (fastrl chunks by its workspace_bytes budget)",
    "epsilon_low": "epsilon",
    "epsilon_high": "epsilon_high",
    "loss_type": "loss_type",
    "max_completion_length": "max_completion_length",
    "importance_sampling_level": "importance_sampling_level",
    "sapo_temperature_pos": "sapo_tau_pos",
    "sapo_temperature_neg": "sapo_tau_neg",
    "temperature": "temperature (a keyword of FusedLinearGRPOLoss)",
    "delta": "delta",
    "use_bias_correction_kl": "use_bias_correction_kl",
    "vespo_k_pos": "vespo_k[0]",
    "vespo_lambda_pos": "vespo_lambda[0]",
    "vespo_k_neg": "vespo_k[1]",
    "vespo_lambda_neg": "vespo_lambda[1]",
}

# Liger's constructor keyword -> what fastrl does with it (a DPOSettings field, or how it is used).
DPO_KEYWORDS = {
    "ignore_index": "ignore_index of fastrl.ops.fused_linear_logprobs (FusedLinearDPOLoss takes a mask)",
    "beta": "beta",
    "alpha": "the weight of an 'sft' entry: loss_type=[type, 'sft'], loss_weights=[1, alpha]",
    "compute_nll_loss": "adds the 'sft' entry (Liger's NLL is the mean token NLL of the chosen completions)",
    "compiled": "ignored (fastrl's ops need no torch.compile)",
    "use_ref_model": "pass ref_chosen_logps / ref_rejected_logps (else the reference log-probs are 0)",
    "average_log_prob": "sequence log-probs as token means (FusedLinearDPOLoss: loss types sigmoid_norm / ipo)",
    "chunk_size": "ignored (fastrl chunks by its workspace_bytes budget)",
    "loss_type": "loss_type",
    "label_smoothing": "label_smoothing (read by robust and exo_pair only, as Liger)",
    "discopop_tau": "discopop_tau",
}

_LIGER_DPO_TYPES = ("sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
                    "apo_down", "discopop")
_SMOOTHED = ("robust", "exo_pair")  # the types that read label_smoothing
_NO_SEQUENCE_LEVEL = ("cispo", "sapo", "vespo")


def _mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Liger's 0/1 attention mask (any dtype) as bool; a floating mask must hold 0 and 1 only."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError("attention_mask must be a [B, T] tensor")
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if attention_mask.is_floating_point() and not torch.compiler.is_compiling():
        if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask must hold 0 and 1 only (token weights are not supported)")
    return attention_mask != 0


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class LigerFusedLinearGRPOLoss(torch.nn.Module):
    """Liger-Kernel 0.8.5's ``LigerFusedLinearGRPOLoss``: same keywords, defaults, forward and return.

    Computed by :func:`fastrl.losses.fused_linear_grpo_loss` with the settings in :attr:`settings`
    (the mapping is :data:`GRPO_KEYWORDS`).

    Args:
        beta: the KL coefficient (Liger's default 0.04).
        compiled: accepted, no effect.
        use_ref_model: whether the KL term uses a reference (``ref_per_token_logps`` or ``ref_input``);
            without one Liger's KL is 0, and so is this one's.
        chunk_size: accepted, no effect.
        epsilon_low: the lower clip ε (fastrl's ``epsilon``).
        epsilon_high: the upper clip ε (cispo: the ratio's cap).
        loss_type: grpo, bnpo, dr_grpo, dapo (default), cispo, sapo, luspo or vespo.
        max_completion_length: the dr_grpo normaliser (required for dr_grpo).
        importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO).
        sapo_temperature_pos: sapo's temperature where A > 0 (fastrl's ``sapo_tau_pos``).
        sapo_temperature_neg: sapo's temperature where A <= 0 (fastrl's ``sapo_tau_neg``).
        temperature: the logits are divided by it.
        delta: two-sided clipping bound (> 1), or None.
        use_bias_correction_kl: KL times the importance ratio.
        vespo_k_pos: vespo's k where A >= 0.
        vespo_lambda_pos: vespo's λ where A >= 0.
        vespo_k_neg: vespo's k where A < 0.
        vespo_lambda_neg: vespo's λ where A < 0.

    Raises:
        ValueError: a non-positive sapo temperature or ``delta`` (Liger's checks), dr_grpo without
            ``max_completion_length``, a sequence level with cispo / sapo / vespo, and the checks of
            :class:`~fastrl.losses.GRPOSettings` (an unknown ``loss_type``, ``delta <= 1``, ...).
        TypeError: a value of the wrong type, naming the field.
    """

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: Optional[int] = None,
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: Optional[float] = None,
        use_bias_correction_kl: bool = False,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
    ):
        super().__init__()
        if sapo_temperature_pos <= 0:
            raise ValueError(f"sapo_temperature_pos must be positive, got {sapo_temperature_pos}")
        if sapo_temperature_neg <= 0:
            raise ValueError(f"sapo_temperature_neg must be positive, got {sapo_temperature_neg}")
        if delta is not None and delta <= 0:
            raise ValueError(f"delta must be positive, got {delta}")
        if loss_type == "dr_grpo" and max_completion_length is None:
            raise ValueError("max_completion_length must be provided for loss_type 'dr_grpo'")
        if importance_sampling_level == "sequence" and loss_type in _NO_SEQUENCE_LEVEL:
            raise ValueError(f"Sequence-level importance sampling is not supported for loss_type='{loss_type}'. "
                             f"Use importance_sampling_level='token' instead.")
        if importance_sampling_level not in ("token", "sequence"):
            raise ValueError(f"Unknown importance sampling level: {importance_sampling_level}. Possible values are "
                             f"'token' and 'sequence'.")
        # Liger's attributes, under Liger's names
        self.beta = beta
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.chunk_size = chunk_size
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.sapo_temperature_pos = sapo_temperature_pos
        self.sapo_temperature_neg = sapo_temperature_neg
        self.temperature = temperature
        self.delta = delta
        self.use_bias_correction_kl = use_bias_correction_kl
        self.vespo_k_pos = vespo_k_pos
        self.vespo_lambda_pos = vespo_lambda_pos
        self.vespo_k_neg = vespo_k_neg
        self.vespo_lambda_neg = vespo_lambda_neg
        #: the fastrl settings these keywords make (beta as given; forward drops it without a reference)
        self.settings = GRPOSettings(
            loss_type=loss_type, epsilon=epsilon_low, epsilon_high=epsilon_high, delta=delta, beta=beta, kl="k3",
            use_bias_correction_kl=use_bias_correction_kl, importance_sampling_level=importance_sampling_level,
            max_completion_length=max_completion_length, sapo_tau_pos=sapo_temperature_pos,
            sapo_tau_neg=sapo_temperature_neg, vespo_k=(vespo_k_pos, vespo_k_neg),
            vespo_lambda=(vespo_lambda_pos, vespo_lambda_neg))
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature <= 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")

    def forward(
        self,
        _input,
        lin_weight,
        selected_token_ids,
        attention_mask,
        advantages,
        bias=None,
        ref_per_token_logps=None,
        old_per_token_logps=None,
        ref_input=None,
        ref_weight=None,
        ref_bias=None,
        vllm_is_ratio=None,
        num_items_in_batch=None,
    ):
        """The loss of one batch, Liger's arguments in Liger's order.

        Args:
            _input: the policy's last hidden states ``[B, T, H]``, fp32, bf16 or fp16 (any H).
            lin_weight: the lm-head ``[V, H]``, ``_input``'s dtype.
            selected_token_ids: the completion tokens ``[B, T]`` int64 or int32 (padding may hold anything).
            attention_mask: ``[B, T]`` 0/1 (bool, integer or floating) over the completion tokens.
            advantages: ``[B]`` floating.
            bias: the lm-head bias ``[V]``, or None.
            ref_per_token_logps: ``[B, T]`` the reference's token log-probs, or None.
            old_per_token_logps: ``[B, T]`` the log-probs at sampling time, or None (on-policy).
            ref_input: the reference's hidden states ``[B, T, H]`` (used when ``ref_per_token_logps`` is
                None), or None.
            ref_weight: the reference's lm-head ``[V, H]`` (with ``ref_input``), or None.
            ref_bias: the reference's lm-head bias ``[V]``, or None.
            vllm_is_ratio: the rollout engine's importance ratio ``[B, T]``, ``[B, 1]`` or ``[B]``, or None.
            num_items_in_batch: the dapo / cispo / vespo normaliser over every process (divided by the
                world size, as Liger), or None (this batch's tokens, summed over the processes).

        Returns:
            ``(loss, metrics)``: a 0-d fp32 loss (``loss.backward()`` hands the gradients of ``_input``,
            ``lin_weight`` and ``bias`` on) and Liger's metrics tuple: ``(kl, clip_ratio)`` with
            ``beta != 0``, else ``(clip_ratio,)``; each a detached 0-d fp32 token mean (``clip_ratio``
            the clipped fraction where the clip counts, cispo's capped fraction, 0 for sapo / vespo).

        Raises:
            ValueError: ``use_ref_model`` with ``beta != 0`` but no ``ref_per_token_logps`` /
                ``ref_input``, ``ref_input`` without ``ref_weight``, a badly shaped ``vllm_is_ratio``
                or ``attention_mask``; and as :func:`fastrl.losses.fused_linear_grpo_loss`.
        """
        mask = _mask(attention_mask)
        settings = self.settings
        with_kl = self.beta != 0.0
        ref = None
        if with_kl and self.use_ref_model:
            if ref_per_token_logps is None and ref_input is None:
                raise ValueError("If use_ref_model is True, ref_per_token_logps or ref_input must be provided")
            if ref_per_token_logps is not None and ref_input is not None:
                warnings.warn("Both ref_per_token_logps and ref_input are provided. Using ref_per_token_logps.")
            ref = ref_per_token_logps.float() if ref_per_token_logps is not None else \
                self._ref_logps(ref_input, ref_weight, ref_bias, selected_token_ids, mask)
        elif with_kl:
            settings = settings.replace(beta=0.0)  # Liger's reference is then the policy itself: KL 0
        old = old_per_token_logps.float() if old_per_token_logps is not None else None
        sampler = None
        if vllm_is_ratio is not None:
            if old is None:  # on-policy: old is the policy's log-probs (no gradient), needed to place the ratio
                with torch.no_grad():
                    old = fused_linear_logprobs(_input.detach(), lin_weight.detach(),
                                                self._labels(selected_token_ids, mask),
                                                None if bias is None else bias.detach(), temperature=self.temperature)
            sampler, is_mode = self._sampler_logps(vllm_is_ratio, old, mask)
            if settings.loss_type == "vespo":
                is_mode = "token_truncate"  # vespo's weight sums the log-ratios over the sequence
            settings = settings.replace(is_mode=is_mode)
        if settings.level == "sequence" and advantages.dim() == 1:
            # per token: the clip fraction is then a token mean, as Liger's (a [B] advantage gives TRL's
            # per-sequence mean); the loss is the same
            advantages = advantages[:, None].expand(mask.shape)
        if settings.agg == "dapo":
            num_items_in_batch = self._dapo_normalizer(mask, num_items_in_batch)
        loss, metrics = fused_linear_grpo_loss(
            _input, lin_weight, selected_token_ids, old, advantages, mask, bias=bias, ref_logps=ref,
            sampler_logps=sampler, num_items_in_batch=num_items_in_batch, temperature=self.temperature,
            settings=settings)
        zero = torch.zeros((), dtype=torch.float32, device=loss.device)
        if settings.policy == "clip":
            clip = metrics["clip_ratio/region_mean"]
        elif settings.policy == "cispo":
            clip = metrics["cispo_clip_ratio"]
        else:  # sapo, vespo: Liger reports no clipping
            clip = zero
        out = (metrics.get("kl", zero), clip) if with_kl else (clip,)
        return loss, tuple(m.float() for m in out)

    @staticmethod
    def _labels(selected_token_ids, mask):
        return torch.where(mask, selected_token_ids, -100)

    def _ref_logps(self, ref_input, ref_weight, ref_bias, selected_token_ids, mask):
        if ref_weight is None:
            raise ValueError("ref_input needs ref_weight (the reference's lm-head [V, H])")
        with torch.no_grad():
            return fused_linear_logprobs(ref_input, ref_weight, self._labels(selected_token_ids, mask), ref_bias,
                                         temperature=self.temperature)

    @staticmethod
    def _sampler_logps(ratio, old, mask):
        """Liger's ``vllm_is_ratio`` as fastrl's ``sampler_logps`` (``old - log ratio``) and ``is_mode``: per
        token for ``[B, T]``; a ``[B, 1]`` / ``[B]`` ratio as the log on each sequence's first token with
        the sequence mode (its product over the sequence, on every token), or the token mode for vespo
        (whose weight sums the logs over the sequence)."""
        b, t = mask.shape
        if ratio.dim() == 1:
            if ratio.shape[0] != b:
                raise ValueError(f"vllm_is_ratio shape must be ({b},), got {tuple(ratio.shape)}")
            ratio = ratio[:, None]
        if ratio.dim() != 2 or ratio.shape[0] != b or ratio.shape[1] not in (1, t):
            raise ValueError(f"vllm_is_ratio shape must be ({b}, 1) or ({b}, {t}), got {tuple(ratio.shape)}")
        log_ratio = torch.log(ratio.float())
        if ratio.shape[1] == t:
            return old - log_ratio, "token_truncate"
        first = torch.zeros(b, t, dtype=torch.bool, device=mask.device)
        first[torch.arange(b, device=mask.device), mask.int().argmax(1)] = True
        offsets = torch.where(first & mask, log_ratio, 0.0)
        return old - offsets, "sequence_truncate"

    def _dapo_normalizer(self, mask, num_items_in_batch):
        """Liger's dapo / cispo / vespo normaliser: ``num_items_in_batch`` (or this batch's tokens summed
        over the processes) over the world size."""
        world = _world_size()
        if num_items_in_batch is not None:
            if isinstance(num_items_in_batch, torch.Tensor):
                return num_items_in_batch.to(device=mask.device, dtype=torch.float32) / world
            return float(num_items_in_batch) / world
        if world == 1:
            return None  # fastrl's default: the tokens of this batch
        tokens = mask.sum().to(torch.float32)
        torch.distributed.all_reduce(tokens, op=torch.distributed.ReduceOp.SUM)
        return tokens / world

    def extra_repr(self) -> str:
        return f"loss_type={self.loss_type!r}, beta={self.beta}, use_ref_model={self.use_ref_model}"


class LigerFusedLinearDPOLoss(torch.nn.Module):
    """Liger-Kernel 0.8.5's ``LigerFusedLinearDPOLoss``: same keywords, defaults, forward and return.

    The token log-probs come from :func:`fastrl.ops.fused_linear_logprobs` (no logits tensor; its
    backward recomputes the logits slice by slice), the loss from :func:`fastrl.losses.dpo_loss` with
    the settings in :attr:`settings` (the mapping is :data:`DPO_KEYWORDS`).

    Args:
        ignore_index: the target value of positions that are not scored.
        beta: β.
        alpha: the weight of the NLL term (with ``compute_nll_loss``).
        compute_nll_loss: add ``alpha`` times the mean token NLL of the chosen completions.
        compiled: accepted, no effect.
        use_ref_model: whether a reference (``ref_input`` / ``ref_weight``) is used; without one the
            reference log-probs are 0, as Liger's.
        average_log_prob: sequence log-probs as token means rather than sums.
        chunk_size: accepted, no effect.
        loss_type: sigmoid, hinge, exo_pair, nca_pair, robust, bco_pair, sppo_hard, apo_zero, apo_down or
            discopop (Liger's types).
        label_smoothing: ε of robust / exo_pair.
        discopop_tau: DiscoPOP's τ.

    Raises:
        ValueError: a loss type Liger does not have, exo_pair without ``label_smoothing``, robust with
            ``label_smoothing`` outside [0, 0.5) (Liger's checks), and the checks of
            :class:`~fastrl.losses.DPOSettings` (``beta <= 0``, ...).
    """

    _SUPPORTED_LOSS_TYPES = set(_LIGER_DPO_TYPES)

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
    ):
        super().__init__()
        if loss_type not in self._SUPPORTED_LOSS_TYPES:
            raise ValueError(f"Unsupported loss_type: {loss_type}. Supported types are: "
                             f"{', '.join(_LIGER_DPO_TYPES)}")
        if loss_type == "exo_pair" and label_smoothing <= 0.0:
            raise ValueError("label_smoothing must be > 0 for loss_type='exo_pair'. The EXO paper recommends 1e-3.")
        if loss_type == "robust" and not (0.0 <= label_smoothing < 0.5):
            raise ValueError(f"label_smoothing must lie in [0.0, 0.5) for loss_type='robust'. Got {label_smoothing}.")
        self.ignore_index = ignore_index
        self.beta = beta
        self.alpha = alpha
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.average_log_prob = average_log_prob
        self.chunk_size = chunk_size
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.discopop_tau = discopop_tau
        types, weights = (loss_type, "sft"), (1.0, float(alpha))
        if not compute_nll_loss:
            types, weights = (loss_type,), None
        #: the fastrl settings these keywords make
        self.settings = DPOSettings(loss_type=types, loss_weights=weights, beta=beta,
                                    label_smoothing=label_smoothing if loss_type in _SMOOTHED else 0.0,
                                    discopop_tau=discopop_tau)

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None):
        """The loss of one batch of pairs, Liger's arguments in Liger's order (the weight first).

        Args:
            lin_weight: the lm-head ``[V, H]``, ``_input``'s dtype.
            _input: hidden states ``[2B, T, H]``: the B chosen completions, then the B rejected ones; fp32,
                bf16 or fp16 (any H).
            target: ``[2B, T]`` int64 or int32 token ids, ``ignore_index`` where not scored.
            bias: the lm-head bias ``[V]``, or None.
            ref_input: the reference's hidden states ``[2B, T, H]`` (with ``use_ref_model``), or None.
            ref_weight: the reference's lm-head ``[V, H]``, or None.
            ref_bias: the reference's lm-head bias ``[V]``, or None.

        Returns:
            ``(loss, (chosen_logps [B], rejected_logps [B], chosen_logits_mean, rejected_logits_mean,
            nll_loss, chosen_rewards [B], rejected_rewards [B]))`` as Liger: a 0-d loss with gradients to
            ``_input``, ``lin_weight`` and ``bias``; the rest detached (the logits means over every
            position and vocabulary entry, ``nll_loss`` 0 without ``compute_nll_loss``, the rewards
            ``beta * (logps - ref_logps)``).

        Raises:
            ValueError: an odd batch, ``use_ref_model`` without ``ref_input`` / ``ref_weight``; and as
                :func:`fastrl.ops.fused_linear_logprobs` and :func:`fastrl.losses.dpo_loss`.
        """
        if target.dim() != 2 or target.shape[0] % 2:
            raise ValueError(f"target must be [2B, T] (B chosen rows, then B rejected ones), got {tuple(target.shape)}")
        pairs = target.shape[0] // 2
        mask = target != self.ignore_index
        counts = mask.sum(-1)
        token_logps = fused_linear_logprobs(_input, lin_weight, target, bias, ignore_index=self.ignore_index)
        sums = token_logps.sum(-1)
        logps = sums / counts if self.average_log_prob else sums
        if self.use_ref_model:
            if ref_input is None or ref_weight is None:
                raise ValueError("use_ref_model=True needs ref_input and ref_weight (the reference's hidden states "
                                 "and lm-head)")
            with torch.no_grad():
                ref_tokens = fused_linear_logprobs(ref_input, ref_weight, target, ref_bias,
                                                   ignore_index=self.ignore_index)
                ref = ref_tokens.sum(-1) / counts if self.average_log_prob else ref_tokens.sum(-1)
        else:
            ref = torch.zeros_like(logps)
        chosen, rejected = logps[:pairs], logps[pairs:]
        extra = {}
        if self.compute_nll_loss:
            extra = dict(chosen_lengths=counts[:pairs], chosen_nll=-sums[:pairs])
        loss, _ = dpo_loss(chosen, rejected, ref[:pairs], ref[pairs:], settings=self.settings, **extra)
        with torch.no_grad():
            total_chosen = counts[:pairs].sum().clamp(min=1)
            nll = -sums[:pairs].sum() / total_chosen if self.compute_nll_loss else torch.zeros((), device=loss.device)
            # sum over the vocabulary of h @ w_v + b_v = h @ (sum_v w_v) + sum_v b_v: Liger's logits means
            # without the logits
            row_sums = _input.detach().float().sum(1) @ lin_weight.detach().float().sum(0)
            if bias is not None:
                row_sums = row_sums + target.shape[1] * bias.detach().float().sum()
            denominator = pairs * target.shape[1] * lin_weight.shape[0]
            chosen_logits_mean = row_sums[:pairs].sum() / denominator
            rejected_logits_mean = row_sums[pairs:].sum() / denominator
            chosen_rewards = self.beta * (chosen - ref[:pairs])
            rejected_rewards = self.beta * (rejected - ref[pairs:])
        return loss, (chosen.detach(), rejected.detach(), chosen_logits_mean, rejected_logits_mean, nll.float(),
                      chosen_rewards, rejected_rewards)

    def extra_repr(self) -> str:
        return f"loss_type={self.loss_type!r}, beta={self.beta}, use_ref_model={self.use_ref_model}"
