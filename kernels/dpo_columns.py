"""The layout the DPO-family kernels (:mod:`fastrl.kernels.dpo_loss`) and the torch implementation
(:mod:`fastrl.losses.torch_impl.dpo`) share: which bit of the ``TYPES`` mask is which loss type, which
``F_DIV`` id is which f-divergence, the columns of the per-block partial sums, the order of the stats
vector the loss returns, and the rows of the backward's gradient.

Plain Python (no Triton), so the torch path imports it on a machine without Triton.
"""

from __future__ import annotations

__all__ = ["DPO_STATS", "F_DIVERGENCES", "GRAD_ROWS", "LOSS_TYPES", "METRICS", "NSTAT", "NSTAT_PAD", "PARTIALS",
           "STAT"]

# Bit k of the kernels' constexpr TYPES mask is LOSS_TYPES[k]; appending keeps old masks valid.
LOSS_TYPES = ("sigmoid", "cdpo", "robust", "hinge", "ipo", "sigmoid_norm", "exo_pair", "nca_pair", "bco_pair",
              "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "simpo", "orpo", "cpo",
              "dpop")

# The kernels' constexpr F_DIV: the f-divergence of id k is F_DIVERGENCES[k].
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")

# What the forward kernel writes per block of pairs (the finishing kernel adds them up), in this order:
# Σ w·P, Σ NLL_c, Σ |y_c|, Σ w, Σ reward_c, Σ reward_r, Σ accuracy, Σ π_c, Σ π_r.
PARTIALS = ("weighted_loss", "nll", "chosen_tokens", "weight", "reward_chosen", "reward_rejected", "accuracy",
            "logps_chosen", "logps_rejected")
NSTAT = len(PARTIALS)
NSTAT_PAD = 16  # NSTAT rounded up to a power of two (the finishing kernel's tile width)

# The stats vector of the loss (torch path and finishing kernel alike), element 0 the loss.
DPO_STATS = ("loss", "nll_loss", "weight_mean", "rewards/chosen", "rewards/rejected", "rewards/margins",
             "rewards/accuracies", "logps/chosen", "logps/rejected", "chosen_tokens")
STAT = {name: k for k, name in enumerate(DPO_STATS)}
METRICS = DPO_STATS[STAT["rewards/chosen"]:STAT["logps/rejected"] + 1]  # always among dpo_loss's metrics

# Rows of the backward's [5, B] output: d loss / d π_c, π_r, NLL_c, Δ_aot, Δ_aot_unpaired (the names of
# the differentiable inputs in fastrl.losses.dpo.PairTensors).
GRAD_ROWS = ("pc", "pr", "nll", "d1", "d2")
