"""The columns of the GRPO loss's per-sequence ``stats`` [B, NSTATS] tensor, and the constants both of its
implementations clamp with.

The Triton kernels (:mod:`fastrl.kernels.grpo_loss`, which wraps each number in ``tl.constexpr``) and the
torch implementation (:mod:`fastrl.losses.torch_impl.grpo`) write and read the same columns; both import
them from here. Plain Python numbers: importing this module needs neither Triton nor torch.
"""

from __future__ import annotations

import math

LOSS = 0  # sum over the sequence's tokens of the per-token loss l_t (policy + beta * KL)
ENT = 1  # sum of the entropy
COUNT = 2  # number of tokens
KL = 3  # sum of the per-token KL term (times the ratio when bias-corrected)
RATIO = 4  # sum of the importance ratio applied at each token
LOW = 5  # tokens clipped low: ratio < 1 - eps_low and A < 0
HIGH = 6  # tokens clipped high: ratio > 1 + eps_high and A > 0 (cispo: ratio > eps_high and A > 0)
DUAL = 7  # tokens where the dual clip bounds the loss (A < 0)
PHI = 8  # vespo: phi of the sequence (advantages [B]) or the sum of the tokens' phi (per-token advantages)
LOG_RATIO = 9  # sequence levels: mean over the sequence of log(pi / pi_old)
COUPLING = 10  # sequence level: sum over tokens of d l_t / d s (s = the sequence ratio)
OFF_POLICY_KL = 11  # off-policy mask: mean over the sequence of log pi_sampler - log pi (NaN -> 0)
IS_WEIGHT = 12  # sequence-level sampler IS modes: the sequence's weight
VESPO_LOG_W = 13  # vespo: clamped log of the sequence importance weight w
USED = 14  # columns 0 .. USED - 1 carry values; the rest are padding (written as 0)
NSTATS = 16  # columns in all: rows of 64 bytes

LOG_EPS = math.log(1e-8)  # the lower clamp of TRL's vespo log-weights
