"""fastrl's losses: ``torch.nn.Module`` and functional forms built on fastrl's ops and kernels.

Every loss returns ``(loss, metrics)`` with ``metrics`` a dict of detached tensors. GRPO family:
:func:`grpo_loss` / :class:`GRPOLoss`, their settings :class:`GRPOSettings` (and
:func:`grpo_loss_grad`, :func:`grpo_token_weights` for fused losses built on it); see :mod:`fastrl.losses.grpo`. :func:`fused_linear_grpo_loss` /
:class:`FusedLinearGRPOLoss` take the last hidden states and the lm-head weight instead of log-probs
(:mod:`fastrl.losses.fused_linear_grpo`). DPO family: :func:`dpo_loss` / :class:`DPOLoss` (every
pairwise type, :mod:`fastrl.losses.dpo`), their settings :class:`DPOSettings`, :class:`FusedLinearDPOLoss` from hidden states
(:mod:`fastrl.losses.fused_linear_dpo`, with :func:`precompute_reference_logps`); listwise, unpaired and reward-model losses in
:mod:`fastrl.losses.preference`. Liger-Kernel's fused-linear GRPO and DPO losses, same calls (an import change
to switch): :mod:`fastrl.losses.liger`.
"""

from fastrl.losses import torch_impl
from fastrl.losses.dpo import DPOLoss, DPOSettings, dpo_loss, dynamic_beta, wpo_weights
from fastrl.losses.fused_linear_dpo import FusedLinearDPOLoss, fused_linear_dpo_loss, precompute_reference_logps
from fastrl.losses.fused_linear_grpo import FusedLinearGRPOLoss, fused_linear_grpo_loss
from fastrl.losses.grpo import GRPOLoss, GRPOSettings, grpo_loss, grpo_loss_grad, grpo_token_weights
from fastrl.losses.preference import (BCOLoss, BradleyTerryLoss, KTOLoss, LiPOLoss, PlackettLuceLoss, RunningMean,
                                      bco_loss, bradley_terry_loss, kto_loss, lipo_loss, plackett_luce_loss)

__all__ = ["BCOLoss", "BradleyTerryLoss", "DPOLoss", "DPOSettings", "FusedLinearDPOLoss", "FusedLinearGRPOLoss", "GRPOLoss",
           "GRPOSettings",
           "KTOLoss", "LiPOLoss", "PlackettLuceLoss", "RunningMean", "bco_loss", "bradley_terry_loss", "dpo_loss",
           "dynamic_beta", "fused_linear_dpo_loss", "fused_linear_grpo_loss", "precompute_reference_logps", "grpo_loss", "grpo_loss_grad", "grpo_token_weights", "kto_loss", "lipo_loss",
           "plackett_luce_loss", "torch_impl", "wpo_weights"]
