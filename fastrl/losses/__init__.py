"""fastrl's losses: ``torch.nn.Module`` and functional forms built on fastrl's ops and kernels.

Every loss returns ``(loss, metrics)`` with ``metrics`` a dict of detached tensors. GRPO family:
:func:`grpo_loss` / :class:`GRPOLoss` (and :func:`grpo_loss_grad`, :func:`grpo_token_weights` for
fused losses built on it); see :mod:`fastrl.losses.grpo`. :func:`fused_linear_grpo_loss` /
:class:`FusedLinearGRPOLoss` take the last hidden states and the lm-head weight instead of log-probs
(:mod:`fastrl.losses.fused_linear_grpo`).
"""

from fastrl.losses import reference
from fastrl.losses.fused_linear_grpo import FusedLinearGRPOLoss, fused_linear_grpo_loss
from fastrl.losses.grpo import GRPOLoss, grpo_loss, grpo_loss_grad, grpo_token_weights

__all__ = ["FusedLinearGRPOLoss", "GRPOLoss", "fused_linear_grpo_loss", "grpo_loss", "grpo_loss_grad",
           "grpo_token_weights", "reference"]
