"""Chosen-token log-probs (+ entropy): fastrl beside torch eager, torch.compile, TRL and Liger-Kernel.

`selective` cases start from logits [tokens, V]; `fused_linear` cases from hidden [tokens, H] and the
lm-head weight [V, H]. Each runs forward only and forward + backward (gradient of logp + 0.1 *
entropy). The peak memory above the inputs (CUDA allocator, or peak RSS on CPU) is recorded in
extra_info["peak_extra_bytes"]; the rest of what a result records is listed in conftest.py.

Limits: `selective` is bound by memory traffic: bytes_moved = the logits read once forward, and read
once more and the gradient written once backward (3x with backward). `fused_linear` is bound by the
matmuls: flops = 2 T H V forward, 6 T H V with backward (the two gradient GEMMs; a recompute of the
logits is extra work, not counted). Contenders that compute less (Liger's cross-entropy: no entropy)
are marked so in their name.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import DEVICE, SCALE, measure

from fastrl.ops import fused_linear_logprobs, selective_logprobs

SELECTIVE = {"cpu": [(2048, 32000)], "gpu": [(8192, 32000), (8192, 151936)]}[SCALE]
FUSED = {"cpu": [(2048, 256, 32000)], "gpu": [(16384, 4096, 151936)]}[SCALE]
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32

if DEVICE == "cpu":
    # A fixed glibc mmap threshold (no dynamic raising) returns every freed large block to the OS,
    # so the peak-RSS memory figures measure what each contender allocates. `make bench` runs each
    # suite in its own process, so this does not touch the other suites' timings.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def eager_logprobs(logits, labels):
    """The common torch way: fp32 log_softmax over the full logits, gather, then the entropy."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    logp = log_p.gather(-1, labels[:, None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logp, entropy


def eager_linear_logprobs(hidden, weight, labels):
    return eager_logprobs(hidden @ weight.T, labels)


_compiled = {}


def _compiled_fn(fn):
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


def _selective_contenders():
    out = {
        "fastrl": lambda x, y: selective_logprobs(x, y, return_entropy=True),
        "torch": eager_logprobs,
        "torch.compile": lambda x, y: _compiled_fn(eager_logprobs)(x, y),
    }
    if DEVICE == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy

            # per-token NLL = -logp, no entropy; with grad, Liger writes the gradient over the logits in forward
            # (summed then: its backward scales by a scalar upstream gradient)
            out["liger (CE)"] = lambda x, y: (
                -liger_cross_entropy(x, y, reduction="sum" if x.requires_grad else "none"),
                torch.zeros((), device=x.device))
        except ImportError:
            pass
    if importlib.util.find_spec("trl") is not None:
        try:
            from trl.trainer.utils import entropy_from_logits, selective_log_softmax

            out["trl"] = lambda x, y: (selective_log_softmax(x, y), entropy_from_logits(x))
        except ImportError:
            pass
        try:
            if DEVICE != "cuda":  # a Triton kernel with no CPU path
                raise ImportError
            from trl.kernels import selective_log_softmax_and_entropy

            out["trl.kernels"] = lambda x, y: selective_log_softmax_and_entropy(x, y)
        except ImportError:
            pass
    return out


def _fused_contenders():
    out = {
        "fastrl": lambda h, w, y: fused_linear_logprobs(h, w, y, return_entropy=True),
        "torch": eager_linear_logprobs,
        "torch.compile": lambda h, w, y: _compiled_fn(eager_linear_logprobs)(h, w, y),
    }
    if importlib.util.find_spec("trl") is not None:
        try:
            from trl.kernels import ChunkedLogProbFunction

            # what trl.trainer.utils.add_fused_lm_head runs: 4096-token tiles x 32768-wide vocabulary chunks
            out["trl.kernels"] = lambda h, w, y: ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 32768, None, 1.0,
                                                                             ("entropy",))[:2]
        except ImportError:
            pass
    if DEVICE == "cuda" and importlib.util.find_spec("liger_kernel") is not None:  # Triton only
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            ce = LigerFusedLinearCrossEntropyLoss(reduction="sum")
            # the same matmul + softmax work; its output is the summed NLL rather than per-token logps
            out["liger (CE)"] = lambda h, w, y: (-ce(w, h, y), torch.zeros((), device=h.device))
        except ImportError:
            pass
    return out


def _run(benchmark, fn, inputs, backward, group, info, **limits):
    def step():
        for t in inputs:
            if t.requires_grad:
                t.grad = None
        logp, entropy = fn(*inputs)
        if backward:
            (logp.sum() + 0.1 * entropy.sum()).backward()
        return logp

    measure(benchmark, step, group=group, info=info, rounds=5 if DEVICE == "cpu" else 20, **limits)


SEL_CASES = [(s, b, c) for s in SELECTIVE for b in (False, True)
             for c in ("fastrl", "torch", "torch.compile", "trl", "trl.kernels", "liger (CE)")]


@pytest.mark.parametrize("shape,backward,contender", SEL_CASES,
                         ids=[f"T{s[0]}-V{s[1]}-{'fwdbwd' if b else 'fwd'}-{c}" for s, b, c in SEL_CASES])
def test_selective_logprobs(benchmark, shape, backward, contender):
    fns = _selective_contenders()
    if contender not in fns:
        pytest.skip(f"{contender} is not installed or has no {DEVICE} path")
    tokens, vocab = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logits = (torch.randn(tokens, vocab, device=DEVICE, generator=g) * 2).to(DTYPE).requires_grad_(backward)
    labels = torch.randint(0, vocab, (tokens,), device=DEVICE, generator=g)
    group = f"selective_logprobs {'fwd+bwd' if backward else 'fwd'} T={tokens} V={vocab} {DTYPE}"
    logits_bytes = logits.numel() * logits.element_size()
    info = {"op": "selective_logprobs", "contender": contender, "tokens": tokens, "vocab": vocab,
            "backward": backward, "dtype": str(DTYPE), "bytes_read": logits_bytes}
    _run(benchmark, fns[contender], (logits, labels), backward, group, info,
         bytes_moved=logits_bytes * (3 if backward else 1))


FUSED_CASES = [(s, b, c) for s in FUSED for b in (False, True)
               for c in ("fastrl", "torch", "torch.compile", "trl.kernels", "liger (CE)")]


@pytest.mark.parametrize("shape,backward,contender", FUSED_CASES,
                         ids=[f"T{s[0]}-H{s[1]}-V{s[2]}-{'fwdbwd' if b else 'fwd'}-{c}" for s, b, c in FUSED_CASES])
def test_fused_linear_logprobs(benchmark, shape, backward, contender):
    fns = _fused_contenders()
    if contender not in fns:
        pytest.skip(f"{contender} is not installed or has no {DEVICE} path")
    tokens, hidden_size, vocab = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device=DEVICE, generator=g).to(DTYPE).requires_grad_(backward)
    weight = (torch.randn(vocab, hidden_size, device=DEVICE, generator=g) * 0.02).to(DTYPE).requires_grad_(backward)
    labels = torch.randint(0, vocab, (tokens,), device=DEVICE, generator=g)
    group = f"fused_linear_logprobs {'fwd+bwd' if backward else 'fwd'} T={tokens} H={hidden_size} V={vocab} {DTYPE}"
    info = {"op": "fused_linear_logprobs", "contender": contender, "tokens": tokens, "hidden": hidden_size,
            "vocab": vocab, "backward": backward, "dtype": str(DTYPE)}
    _run(benchmark, fns[contender], (hidden, weight, labels), backward, group, info,
         flops=2 * tokens * hidden_size * vocab * (3 if backward else 1))
