"""GRPO-family loss straight from the last hidden states and the lm-head weight, no logits tensor.

>>> import torch
>>> from fastrl.losses import FusedLinearGRPOLoss, grpo_loss
>>> from fastrl.ops import fused_linear_logprobs
>>> hidden = torch.randn(2, 5, 32, requires_grad=True)       # [B, L, H] policy hidden states
>>> lm_head = torch.randn(300, 32, requires_grad=True)       # [V, H]
>>> labels = torch.randint(0, 300, (2, 5))                   # the sampled completion tokens
>>> mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
>>> old = torch.randn(2, 5) - 6.0                            # log-probs when the rollout was sampled
>>> advantages = torch.tensor([1.0, -1.0])
>>> loss_fn = FusedLinearGRPOLoss(loss_type="dapo", epsilon=0.2)
>>> loss, metrics = loss_fn(hidden, lm_head, labels, old, advantages, mask)
>>> loss.backward()                                          # gradients were computed in the forward
>>> logps = fused_linear_logprobs(hidden.detach(), lm_head.detach(), labels)
>>> torch.allclose(loss, grpo_loss(logps, old, advantages, mask)[0])
True
"""

from __future__ import annotations

import torch

from fastrl import _checks
from fastrl.losses._fused_linear import grads_wanted, terminal, token_logprobs, two_pass
from fastrl.losses.grpo import GRPOSettings, grpo_loss, grpo_loss_grad
from fastrl.ops.fused_linear_logprobs import (check_inputs, pad_hidden_size, terminal_single_pass, token_chunks,
                                              workspace_budget)

__all__ = ["FusedLinearGRPOLoss", "fused_linear_grpo_loss"]

_MODES = ("auto", "single_pass", "two_pass")


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    sampler_logps: torch.Tensor | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    temperature: float = 1.0,
    mode: str = "auto",
    workspace_bytes: int | None = None,
    settings: GRPOSettings | None = None,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO-family loss straight from hidden states and the lm-head weight, its gradients made in the forward.

    It is :func:`fastrl.losses.grpo_loss` of the log-probs ``fused_linear_logprobs(hidden, weight,
    labels, bias, temperature=...)``.

    Args:
        hidden: padded ``[B, L, H]`` with ``mask [B, L]``, or packed ``[T, H]`` with
            ``cu_seqlens [B+1]`` (the layouts of :func:`~fastrl.losses.grpo_loss`); fp32, bf16 or
            fp16; any H (a multiple of 16 is the fast path, others are zero-padded). Position t
            holds the hidden state that predicts ``labels[t]``.
        weight: the lm-head ``[V, H]``, the dtype of ``hidden`` (fp32, bf16 or fp16).
        labels: the completion tokens, ``[B, L]`` / ``[T]`` int64 or int32 in ``[0, V)`` (padding
            positions, where ``mask`` is 0, are never read as tokens: they may hold anything in range
            or -100).
        old_logps: ``[B, L]`` / ``[T]`` fp32, bf16 or fp16, or None; as in :func:`~fastrl.losses.grpo_loss`.
        advantages: ``[B]`` per sequence or per token, floating; as in :func:`~fastrl.losses.grpo_loss`.
        mask: ``[B, L]`` bool or 0/1 integer (padded layout).
        cu_seqlens: ``[B+1]`` int32 or int64 (packed layout).
        bias: optional ``[V]``, the dtype of ``hidden``.
        ref_logps: ``[B, L]`` / ``[T]`` fp32, bf16 or fp16, or None; as in :func:`~fastrl.losses.grpo_loss`.
        sampler_logps: ``[B, L]`` / ``[T]`` fp32, bf16 or fp16, or None; as in
            :func:`~fastrl.losses.grpo_loss`.
        num_items_in_batch: a number or a one-element (``[]`` / ``[1]``) integer or floating tensor;
            as in :func:`~fastrl.losses.grpo_loss`.
        temperature: the sampling temperature the log-probs are taken at (logits / T).
        mode: ``"single_pass"`` computes each slice of tokens' logits once: log-probs, the loss's
            gradient at those tokens, the logits' gradient in place, and its products into
            ``d_hidden`` and an fp32 ``[V, H]`` ``d_weight`` accumulator: three GEMMs, what a
            linear layer's forward and backward cost. It needs a loss whose gradient at a token
            depends on that token only (``importance_sampling_level="token"``, no
            ``off_policy_mask_threshold``, not vespo). ``"two_pass"`` takes the log-probs first (one
            GEMM pass), the loss and its gradient, then recomputes the logits slice by slice for the
            gradients (the backward of :func:`fastrl.ops.fused_linear_logprobs`, whose accumulator
            is the smaller of fp32 ``[tokens, H]`` and ``[V, H]``): four GEMMs, any loss setting.
            ``"auto"``: single pass where it applies and one chunk holds every scored token (no
            accumulator), or the fp32 ``[V, H]`` accumulator fits the workspace, or it is the
            smaller one (at least as many scored tokens as vocabulary entries); else two passes.
            Either way only the scored (unmasked) positions go through the lm-head GEMMs.
        workspace_bytes: cap on the fp32 logits slice (default 1 GiB on CUDA, 64 MiB on CPU).
        settings: a :class:`~fastrl.losses.GRPOSettings`, as in :func:`~fastrl.losses.grpo_loss`
            (``entropy_coef != 0`` makes the op compute the entropy of each position too; ``entropy``
            itself is not an argument here); or pass its fields as ``**options``.
        **options: the fields of :class:`~fastrl.losses.GRPOSettings`.

    Returns:
        ``(loss, metrics)`` as :func:`~fastrl.losses.grpo_loss` (0-d fp32 tensors);
        ``loss.backward()`` hands the stored gradients of ``hidden``, ``weight`` and ``bias`` on
        (scaled by the incoming gradient) without touching the logits again. Without grad mode, or
        when no input requires a gradient, only the forward work is done.

    Raises:
        ValueError: an unknown ``mode``, both or neither of ``mask`` / ``cu_seqlens``, bad shapes,
            bad settings; and as :func:`~fastrl.losses.grpo_loss`.
        TypeError: as :func:`~fastrl.losses.grpo_loss`.
    """
    settings = GRPOSettings.from_options(settings, options, where="fused_linear_grpo_loss")
    if not isinstance(mode, str) or mode not in _MODES:
        raise ValueError(f"mode must be one of {', '.join(_MODES)}; got {mode!r}")
    if (mask is None) == (cu_seqlens is None):
        raise ValueError("pass exactly one of cu_seqlens (packed hidden [T, H]) and mask (padded hidden [B, L, H])")
    positions = 2 if mask is not None else 1
    if hidden.dim() != positions + 1:
        raise ValueError(f"hidden must be {'[B, L, H] with mask' if mask is not None else '[T, H] with cu_seqlens'}, "
                         f"got shape {tuple(hidden.shape)}")
    if mask is not None:
        _checks.check_tensor("mask", mask, ndim=2, device=hidden.device)
        if tuple(mask.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"mask must have shape {tuple(hidden.shape[:2])} (hidden's [B, L]), got {tuple(mask.shape)}")
        # padding positions score nothing, whatever their label
        labels = torch.where(mask.bool(), labels, -100) if isinstance(labels, torch.Tensor) else labels
    h_size, temperature, ignore_index = check_inputs(hidden, weight, labels, bias, temperature, -100,
                                                         workspace_bytes)
    hidden, weight, h_size = pad_hidden_size(hidden, weight)  # H % 16 != 0: zero-padded (slower, exact)
    need_entropy = settings.entropy_coef != 0.0
    separable = (settings.level == "token" and settings.off_policy_mask_threshold is None
                 and settings.loss_type != "vespo")
    if mode == "single_pass" and not separable:
        raise ValueError("mode='single_pass' needs importance_sampling_level='token', no off_policy_mask_threshold "
                         "and a loss_type other than vespo (the gradient at a token must depend on that token only)")
    loss_kwargs = dict(settings=settings, ref_logps=ref_logps, sampler_logps=sampler_logps,
                       num_items_in_batch=num_items_in_batch)
    shape = labels.shape
    flat_hidden = hidden.reshape(-1, h_size).contiguous()
    flat_labels = labels.reshape(-1).contiguous()
    weight = weight.contiguous()
    common = dict(temperature=temperature, ignore_index=ignore_index, need_entropy=need_entropy,
                  workspace_bytes=workspace_bytes or 0)

    def loss_fn(logp, entropy):
        return grpo_loss(logp.view(shape), old_logps, advantages, mask, cu_seqlens,
                         entropy=None if entropy is None else entropy.view(shape), **loss_kwargs)

    if not grads_wanted(hidden, weight, bias):
        with torch.no_grad():
            return loss_fn(*token_logprobs(flat_hidden, weight, bias, flat_labels, **common))
    # the scored (unmasked) rows, in balanced chunks that fit the workspace: padding goes through no GEMM
    chunks = token_chunks(flat_labels, ignore_index, weight.shape[0], hidden.device, workspace_bytes)
    vocab, h_bytes = weight.shape[0], h_size * 4
    tokens = sum((c.stop - c.start) if isinstance(c, slice) else c.numel() for c in chunks)
    # single pass: one chunk (no accumulator), or an fp32 [V, H] accumulator no larger than the
    # workspace or than the [tokens, H] one of the two-pass backward
    single = mode == "single_pass" or (mode == "auto" and separable and (
        len(chunks) == 1 or vocab * h_bytes <= workspace_budget(hidden.device, workspace_bytes) or tokens >= vocab))

    def single_pass():
        # The gradient at a token depends on that token alone, so the loss's gradient for a slice
        # can be read off a batch whose other entries are placeholders; the last slice's call sees
        # every real value and gives the loss and metrics.
        logp_all = torch.zeros(flat_labels.shape[0], dtype=torch.float32, device=hidden.device)
        entropy_all = torch.zeros_like(logp_all)
        result = {}

        def loss_and_grads():
            return grpo_loss_grad(logp_all.view(shape), old_logps, advantages, mask, cu_seqlens,
                                  entropy=entropy_all.view(shape) if need_entropy else None, **loss_kwargs)

        def token_grads(rows, logp, entropy):
            logp_all[rows] = logp
            if entropy is not None:
                entropy_all[rows] = entropy
            result["out"] = loss_and_grads()
            _, d_logp, d_entropy, _ = result["out"]
            return (d_logp.reshape(-1)[rows].float(),
                    None if d_entropy is None else d_entropy.reshape(-1)[rows].float())

        with torch.no_grad():
            _, _, d_hidden, d_weight, d_bias = terminal_single_pass(
                flat_hidden, weight, bias, flat_labels, token_grads, temperature=temperature,
                ignore_index=ignore_index, return_entropy=need_entropy, workspace_bytes=workspace_bytes or 0,
                chunks=chunks)
            if "out" not in result:  # no tokens at all
                result["out"] = loss_and_grads()
        loss, _, _, metrics = result["out"]
        return loss, metrics, d_hidden, d_weight, d_bias

    def compute():
        if single:
            return single_pass()
        return two_pass(flat_hidden, weight, bias, flat_labels, loss_fn, chunks=chunks, **common)

    return terminal(flat_hidden, weight, bias, compute)


class FusedLinearGRPOLoss(torch.nn.Module):
    """:func:`fused_linear_grpo_loss` as a module, its options and loss settings checked once here.

    Args:
        settings: a :class:`~fastrl.losses.GRPOSettings`; or pass its fields as ``**options``.
        temperature: the sampling temperature (> 0).
        mode: ``"auto"``, ``"single_pass"`` or ``"two_pass"`` (:func:`fused_linear_grpo_loss`).
        workspace_bytes: cap on the fp32 logits slice (>= 1), or None for the default.
        **options: the fields of :class:`~fastrl.losses.GRPOSettings`.

    Raises:
        ValueError: an unknown ``mode``, a bad ``temperature`` / ``workspace_bytes`` or bad settings.
        TypeError: an option of the wrong type.
    """

    def __init__(self, settings: GRPOSettings | None = None, *, temperature: float = 1.0, mode: str = "auto",
                 workspace_bytes: int | None = None, **options):
        super().__init__()
        self.settings = GRPOSettings.from_options(settings, options, where="FusedLinearGRPOLoss")
        _checks.check_real("temperature", temperature, low=0.0, low_open=True)
        if not isinstance(mode, str) or mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}; got {mode!r}")
        if workspace_bytes is not None:
            _checks.check_int("workspace_bytes", workspace_bytes, low=1)
        self.options = dict(temperature=temperature, mode=mode, workspace_bytes=workspace_bytes)

    def forward(self, hidden, weight, labels, old_logps, advantages, mask=None, cu_seqlens=None, *, bias=None,
                ref_logps=None, sampler_logps=None, num_items_in_batch=None):
        """The loss of one batch: :func:`fused_linear_grpo_loss` with this module's options.

        Args:
            hidden: ``[B, L, H]`` padded or ``[T, H]`` packed; fp32, bf16 or fp16.
            weight: ``[V, H]``, the dtype of ``hidden``.
            labels: ``[B, L]`` / ``[T]`` int64 or int32.
            old_logps: ``[B, L]`` / ``[T]`` fp32, bf16 or fp16, or None.
            advantages: ``[B]`` or per token, floating.
            mask: ``[B, L]`` bool or 0/1 integer, or None.
            cu_seqlens: ``[B+1]`` int32 or int64, or None.
            bias: ``[V]``, the dtype of ``hidden``, or None.
            ref_logps: ``[B, L]`` / ``[T]`` floating, or None.
            sampler_logps: ``[B, L]`` / ``[T]`` floating, or None.
            num_items_in_batch: a number or a one-element integer or floating tensor, or None.

        Returns:
            ``(loss, metrics)`` as :func:`fused_linear_grpo_loss`.
        """
        return fused_linear_grpo_loss(hidden, weight, labels, old_logps, advantages, mask, cu_seqlens, bias=bias,
                                      ref_logps=ref_logps, sampler_logps=sampler_logps,
                                      num_items_in_batch=num_items_in_batch, settings=self.settings,
                                      **self.options)

    def extra_repr(self) -> str:
        defaults = GRPOSettings().options()
        changed = {k: v for k, v in self.settings.options().items() if v != defaults[k]}  # set away from the default
        return ", ".join(f"{k}={v!r}" for k, v in {**changed, **self.options}.items() if v is not None)
