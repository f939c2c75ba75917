"""GRPO family: group advantages, the per-token loss, and the loss from hidden states.

- ``group_advantages``: fastrl (one launch) beside the torch code trainers run (TRL's
  view/mean/std/repeat_interleave) eager and compiled, B samples in groups of G.
- ``grpo_loss`` forward + backward (dapo, clipped ratio) beside the same maths in eager torch and
  ``torch.compile``; bytes_moved = the four per-token fp32 inputs read and the gradient written.
- ``fused_linear_grpo`` forward + backward from hidden states [B*T, H] and the lm-head [V, H] beside
  Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (no reference model, same dapo loss) and the
  materialised-logits torch path; flops = the three GEMMs of a linear layer's forward and backward.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import DEVICE, SCALE, measure

from fastrl.losses import fused_linear_grpo_loss, grpo_loss
from fastrl.ops.group_advantages import group_advantages

ADV = {"cpu": [(8192, 8), (8192, 16)], "gpu": [(8192, 8), (8192, 16)]}[SCALE]
LOSS = {"cpu": [(16, 1024)], "gpu": [(64, 1024)]}[SCALE]  # (sequences, tokens each): 16k / 64k tokens
FUSED = {"cpu": [(4, 256, 256, 8192)], "gpu": [(16, 1024, 4096, 128256)]}[SCALE]  # B, T, H, V
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
ROUNDS = 5 if DEVICE == "cpu" else 20
_compiled = {}


def _compile(fn):
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


def torch_advantages(rewards, group_size, eps=1e-4):
    """TRL 1.16's inline advantage code: group mean and std, repeated back to the samples."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(1).repeat_interleave(group_size)
    std = grouped.std(1).repeat_interleave(group_size)
    return (rewards - mean) / (std + eps)


ADV_CASES = [(s, c) for s in ADV for c in ("fastrl", "torch", "torch.compile")]


@pytest.mark.parametrize("shape,contender", ADV_CASES, ids=[f"B{s[0]}-G{s[1]}-{c}" for s, c in ADV_CASES])
def test_group_advantages(benchmark, shape, contender):
    batch, group = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    rewards = torch.rand(batch, device=DEVICE, generator=g)
    fn = {"fastrl": lambda: group_advantages(rewards, group),
          "torch": lambda: torch_advantages(rewards, group),
          "torch.compile": lambda: _compile(torch_advantages)(rewards, group)}[contender]
    measure(benchmark, fn, group=f"group_advantages B={batch} G={group}", rounds=ROUNDS * 4, memory=False,
            info={"op": "group_advantages", "contender": contender, "batch": batch, "group_size": group},
            bytes_moved=2 * rewards.numel() * 4)


def torch_grpo_loss(logps, old, advantages, mask, eps=0.2):
    """dapo in eager torch, as trainers write it: clipped ratio, masked token sum / token count."""
    ratio = torch.exp(logps - old)
    adv = advantages[:, None]
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


LOSS_CASES = [(s, c) for s in LOSS for c in ("fastrl", "torch", "torch.compile")]


@pytest.mark.parametrize("shape,contender", LOSS_CASES, ids=[f"B{s[0]}-T{s[1]}-{c}" for s, c in LOSS_CASES])
def test_grpo_loss(benchmark, shape, contender):
    batch, length = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logps = (-torch.rand(batch, length, device=DEVICE, generator=g) * 3).requires_grad_(True)
    old = logps.detach() + 0.1 * torch.randn(batch, length, device=DEVICE, generator=g)
    advantages = torch.randn(batch, device=DEVICE, generator=g)
    mask = torch.rand(batch, length, device=DEVICE, generator=g) < 0.9
    fmask = mask.float()
    loss_fn = {"fastrl": lambda: grpo_loss(logps, old, advantages, mask)[0],
               "torch": lambda: torch_grpo_loss(logps, old, advantages, fmask),
               "torch.compile": lambda: _compile(torch_grpo_loss)(logps, old, advantages, fmask)}[contender]

    def step():
        logps.grad = None
        loss_fn().backward()

    tokens = batch * length
    measure(benchmark, step, group=f"grpo_loss fwd+bwd tokens={tokens}", rounds=ROUNDS * 4,
            info={"op": "grpo_loss", "contender": contender, "tokens": tokens},
            bytes_moved=tokens * (4 * 3 + 1 + 4 * 2))


def _liger_grpo():
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return None
    loss = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo", compiled=DEVICE == "cuda")

    def run(hidden, weight, labels, old, advantages, mask):
        out = loss(hidden, weight, labels, mask, advantages, old_per_token_logps=old)
        return out[0] if isinstance(out, tuple) else out

    return run


def torch_linear_grpo(hidden, weight, labels, old, advantages, mask):
    logits = hidden @ weight.T  # [B, T, V] materialised
    logps = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    return torch_grpo_loss(logps, old, advantages, mask.float())


FUSED_CASES = [(s, c) for s in FUSED
               for c in ("fastrl", "fastrl single_pass", "fastrl two_pass", "torch", "liger")]


@pytest.mark.parametrize("shape,contender", FUSED_CASES,
                         ids=[f"B{s[0]}-T{s[1]}-H{s[2]}-V{s[3]}-{c.replace(' ', '-')}" for s, c in FUSED_CASES])
def test_fused_linear_grpo(benchmark, shape, contender):
    batch, length, hidden_size, vocab = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(batch, length, hidden_size, device=DEVICE, generator=g).to(DTYPE).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, device=DEVICE, generator=g) * 0.02).to(DTYPE).requires_grad_(True)
    labels = torch.randint(0, vocab, (batch, length), device=DEVICE, generator=g)
    mask = torch.ones(batch, length, dtype=torch.long, device=DEVICE)
    mask[:, int(length * 0.8):] = 0
    advantages = torch.randn(batch, device=DEVICE, generator=g)
    with torch.no_grad():
        old = torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, labels[..., None]).squeeze(-1)
        old = old + 0.05 * torch.randn(batch, length, device=DEVICE, generator=g)
    if contender == "liger":
        fn = _liger_grpo()
        if fn is None:
            pytest.skip("liger-kernel is not installed")
    elif contender == "torch":
        fn = torch_linear_grpo
    else:
        mode = contender.split(" ")[1] if " " in contender else "auto"

        def fn(h, w, y, o, a, m):
            return fused_linear_grpo_loss(h, w, y, o, a, m, mode=mode)[0]

    def step():
        hidden.grad = weight.grad = None
        fn(hidden, weight, labels, old, advantages, mask).backward()

    tokens = batch * length
    measure(benchmark, step, group=f"fused_linear_grpo fwd+bwd B={batch} T={length} H={hidden_size} V={vocab} {DTYPE}",
            rounds=ROUNDS, info={"op": "fused_linear_grpo", "contender": contender, "tokens": tokens,
                                 "hidden": hidden_size, "vocab": vocab},
            flops=3 * 2 * tokens * hidden_size * vocab)
