"""DPO from hidden states: ``FusedLinearDPOLoss`` beside Liger-Kernel's ``LigerFusedLinearDPOLoss`` and
the materialised-logits torch path (logits, fp32 log_softmax, gather, masked sums, sigmoid DPO).

Every contender gets the policy's hidden states of B chosen and B rejected completions ([2B, T, H],
chosen first) and the lm-head; the reference log-probs are precomputed (fastrl, torch) or absent
(Liger runs without a reference model, which is the same work: its reference pass would be an extra
forward). flops = the three GEMMs of a linear layer's forward and backward over 2B*T tokens.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, SCALE, measure

from fastrl.losses import FusedLinearDPOLoss

FUSED = {"cpu": [(2, 256, 256, 8192)], "gpu": [(8, 1024, 4096, 128256)]}[SCALE]  # pairs, T, H, V
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
ROUNDS = 5 if DEVICE == "cpu" else 20


def torch_linear_dpo(hidden, weight, labels, ref_c, ref_r, beta=0.1):
    logits = hidden @ weight.T  # [2B, T, V] materialised
    keep = labels != -100
    logps = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    seq = (logps * keep).sum(-1)
    pairs = seq.shape[0] // 2
    h = (seq[:pairs] - ref_c) - (seq[pairs:] - ref_r)
    return -F.logsigmoid(beta * h).mean()


def _liger_dpo():
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except ImportError:
        return None
    loss = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=False, compiled=DEVICE == "cuda")

    def run(hidden, weight, labels, ref_c, ref_r):
        out = loss(weight, hidden, labels)
        return out[0] if isinstance(out, tuple) else out

    return run


CASES = [(s, c) for s in FUSED for c in ("fastrl", "torch", "liger")]


@pytest.mark.parametrize("shape,contender", CASES,
                         ids=[f"P{s[0]}-T{s[1]}-H{s[2]}-V{s[3]}-{c}" for s, c in CASES])
def test_fused_linear_dpo(benchmark, shape, contender):
    pairs, length, hidden_size, vocab = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(2 * pairs, length, hidden_size, device=DEVICE, generator=g).to(DTYPE).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, device=DEVICE, generator=g) * 0.02).to(DTYPE).requires_grad_(True)
    labels = torch.randint(0, vocab, (2 * pairs, length), device=DEVICE, generator=g)
    labels[:, : length // 4] = -100  # the prompt
    mask = labels != -100
    ref_c = torch.randn(pairs, device=DEVICE, generator=g) - 10 * length
    ref_r = torch.randn(pairs, device=DEVICE, generator=g) - 10 * length
    if contender == "liger":
        fn = _liger_dpo()
        if fn is None:
            pytest.skip("liger-kernel is not installed")
    elif contender == "torch":
        fn = torch_linear_dpo
    else:
        module = FusedLinearDPOLoss(beta=0.1)

        def fn(h, w, y, rc, rr):
            return module(h, w, y, rc, rr, mask=mask)[0]

    def step():
        hidden.grad = weight.grad = None
        fn(hidden, weight, labels, ref_c, ref_r).backward()

    tokens = 2 * pairs * length
    measure(benchmark, step, group=f"fused_linear_dpo fwd+bwd pairs={pairs} T={length} H={hidden_size} V={vocab} {DTYPE}",
            rounds=ROUNDS, info={"op": "fused_linear_dpo", "contender": contender, "tokens": tokens,
                                 "hidden": hidden_size, "vocab": vocab},
            flops=3 * 2 * tokens * hidden_size * vocab)
