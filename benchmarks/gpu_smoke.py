"""`make gpu-smoke`: the first minutes of a GPU visit — every op once at a real shape against its torch
reference, then the headline speed ratios — each result written to disk the moment it is known.

    python benchmarks/gpu_smoke.py                 # on a GPU: real shapes (the default when CUDA is there)
    python benchmarks/gpu_smoke.py --scale cpu     # anywhere: tiny shapes, the Triton kernels interpreted
    python benchmarks/gpu_smoke.py --only sampler,rollout --budget-s 120

Checks run in order of value (``CHECKS``); each writes ``<out>/<NN>-<name>.json`` (``status`` ok | fail |
error | skipped, the errors it measured against the reference with their tolerances, the timings and
ratios, ``seconds`` it took) and one line of ``<out>/smoke.jsonl`` as soon as it ends, so a time-out or
a crash of a later check loses nothing already measured. ``<out>`` defaults to
``benchmarks/results/<device>/smoke/``; when ``$OUT`` is set (the device machine's return folder, which
brings back at most 8 files) ``smoke.jsonl`` is copied to ``$OUT/smoke/`` after every check. A check that would start after ``--budget-s`` seconds is recorded as
skipped. The exit status is 1 when any check failed or raised.

Correctness first: each op is compared with fastrl's torch implementation (``fastrl.ops.torch_impl``,
``fastrl.losses.torch_impl``; fp64 where it is the maths, fp32 where the bf16 input is the same) at the
tolerances of the test suite (DESIGN: bf16 <= 1e-2 on log-probs and losses, gradients by relative
norm <= 1e-2). Timing second: on CUDA ``triton.testing.do_bench`` medians (CUDA events) of fastrl and
of the plain torch way, in the same process on the same inputs; ``ratio`` = torch time / fastrl time
(> 1: fastrl faster). On the CPU the kernels run in Triton's interpreter, so the CPU timings only say
how long the script's own parts take, not how fast anything is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from unittest import mock
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import device as _device  # noqa: E402

import fastrl  # noqa: E402
from fastrl import _extension  # noqa: E402
from fastrl.ops import backend  # noqa: E402

# Shapes per scale. GPU: the real shapes (Qwen2 vocabulary 151936, Qwen2-0.5B's hidden 896,
# 8192 GRPO samples, 64k GRPO tokens). CPU: small enough for the Triton interpreter in seconds.
SHAPES = {
    "gpu": dict(sel=(8192, 151936), fused=(8192, 896, 151936), adv=(8192, 8), grpo=(256, 256), dpo=4096,
                sampler=(64, 151936), draws=(4096, 151936), rollout=(8, 8, 128, 128)),
    "cpu": dict(sel=(24, 515), fused=(32, 16, 515), adv=(256, 8), grpo=(8, 16), dpo=64,
                sampler=(8, 1031), draws=(4096, 257), rollout=(2, 2, 8, 8)),
}
ROLLOUT_MODEL = {
    # Qwen2-0.5B's shape (its config.json), random weights
    "gpu": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True),
    "cpu": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256),
}


class Context:
    def __init__(self, scale: str):
        self.scale = scale
        self.device = torch.device("cuda" if scale == "gpu" else "cpu")
        self.dtype = torch.bfloat16 if scale == "gpu" else torch.float32
        self.shapes = SHAPES[scale]

    def gen(self, seed: int = 0) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time(self, fn, *, reps: int = 2) -> float:
        """Median seconds of one call: CUDA-event medians on GPU, wall-clock medians of ``reps`` calls after one
        warm-up on CPU (where the kernels are interpreted: the time of the script, not of the op)."""
        if self.device.type == "cuda":
            import triton.testing

            return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median") / 1e3
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def peak(self, fn) -> int | None:
        """CUDA allocator bytes above the start at the peak of one call (None on CPU)."""
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base


def _fast():
    """The Triton path: automatic on CUDA tensors, forced (interpreter) on CPU tensors."""
    return backend("triton")


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def rel_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm()) / max(float(b.norm()), 1e-30)


def verdict(errors: dict) -> str:
    """``ok`` when every measured error is within its tolerance; errors are ``{name: (value, tol)}``."""
    bad = [k for k, (v, tol) in errors.items() if not (v <= tol)]  # NaN fails
    return "fail" if bad else "ok"


def ratio(torch_s: float, fastrl_s: float) -> float:
    return torch_s / fastrl_s if fastrl_s > 0 else math.inf


# ---------------------------------------------------------------------------------------------------
# The checks, in order of value

CHECKS: list = []


def check(fn):
    CHECKS.append(fn)
    return fn


@check
def build(ctx: Context) -> dict:
    """The extension imports, with its CUDA sampler on a GPU; versions of what runs."""
    import triton

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "python": platform.python_version(), "extension": _extension.available(),
            "cuda_sampler": _extension.cuda_enabled(), "device_name": _device.device_name()}
    if ctx.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["capability"] = list(torch.cuda.get_device_capability(0))
    ok = info["extension"] and (ctx.device.type != "cuda" or info["cuda_sampler"])
    return {"status": "ok" if ok else "fail", **info}


def _eager_logprobs(logits, labels):
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return log_p.gather(-1, labels[:, None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


def _fwd_bwd(fn, *inputs):
    def step():
        for t in inputs:
            t.grad = None
        logp, ent = fn()
        (logp.sum() + 0.1 * ent.sum()).backward()
    return step


@check
def selective_logprobs(ctx: Context) -> dict:
    """Chosen-token log-probs + entropy from logits [T, V], forward and backward, vs fp32 torch."""
    from fastrl.ops import selective_logprobs as op

    tokens, vocab = ctx.shapes["sel"]
    g = ctx.gen()
    logits = (torch.randn(tokens, vocab, device=ctx.device, generator=g) * 2).to(ctx.dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=ctx.device, generator=g)
    labels[::7] = -100  # ignored rows: exactly 0, no gradient
    with _fast():
        logp, ent = op(logits, labels, return_entropy=True)
        (logp.sum() + 0.1 * ent.sum()).backward()
    grad = logits.grad.clone()
    ref = logits.detach().float().requires_grad_()
    keep = labels != -100
    rl, re = _eager_logprobs(ref, torch.where(keep, labels, 0))
    rl, re = torch.where(keep, rl, 0.0), torch.where(keep, re, 0.0)
    (rl.sum() + 0.1 * re.sum()).backward()
    errors = {"logp_max_abs": (max_err(logp, rl), 1e-2 if ctx.dtype != torch.float32 else 1e-4),
              "entropy_max_abs": (max_err(ent, re), 2e-2 if ctx.dtype != torch.float32 else 1e-4),
              "grad_rel_norm": (rel_norm(grad.float(), ref.grad), 1e-2),
              "ignored_rows_grad_max": (float(grad[~keep].float().abs().max()), 0.0)}
    labels_all = torch.where(keep, labels, 0)
    with _fast():
        t_fast = ctx.time(_fwd_bwd(lambda: op(logits, labels_all, return_entropy=True), logits))
    t_torch = ctx.time(_fwd_bwd(lambda: _eager_logprobs(logits, labels_all), logits))
    return {"status": verdict(errors), "shape": [tokens, vocab], "dtype": str(ctx.dtype), "errors": errors,
            "fwd_bwd_s": {"fastrl": t_fast, "torch": t_torch}, "ratio_vs_torch": ratio(t_torch, t_fast),
            "bytes_moved": 3 * logits.numel() * logits.element_size()}


@check
def fused_linear_logprobs(ctx: Context) -> dict:
    """Log-probs + entropy from hidden [T, H] x weight [V, H] without [T, V] logits, vs fp32 torch."""
    from fastrl.ops import fused_linear_logprobs as op

    tokens, hid, vocab = ctx.shapes["fused"]
    g = ctx.gen(1)
    hidden = torch.randn(tokens, hid, device=ctx.device, generator=g).to(ctx.dtype).requires_grad_()
    weight = (torch.randn(vocab, hid, device=ctx.device, generator=g) * 0.05).to(ctx.dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=ctx.device, generator=g)
    with _fast():
        logp, ent = op(hidden, weight, labels, return_entropy=True)
        (logp.sum() + 0.1 * ent.sum()).backward()
    dh, dw = hidden.grad.clone(), weight.grad.clone()
    rh = hidden.detach().float().requires_grad_()
    rw = weight.detach().float().requires_grad_()
    rl, re = _eager_logprobs(rh @ rw.T, labels)
    (rl.sum() + 0.1 * re.sum()).backward()
    low = ctx.dtype != torch.float32
    errors = {"logp_max_abs": (max_err(logp, rl), 2e-2 if low else 1e-4),
              "entropy_max_abs": (max_err(ent, re), 2e-2 if low else 1e-4),
              "d_hidden_rel_norm": (rel_norm(dh.float(), rh.grad), 1e-2),
              "d_weight_rel_norm": (rel_norm(dw.float(), rw.grad), 1e-2)}
    del rh, rw, rl, re
    with _fast():
        step = _fwd_bwd(lambda: op(hidden, weight, labels, return_entropy=True), hidden, weight)
        t_fast = ctx.time(step)
        peak_fast = ctx.peak(step)
    step = _fwd_bwd(lambda: _eager_logprobs(hidden @ weight.T, labels), hidden, weight)
    t_torch = ctx.time(step)
    peak_torch = ctx.peak(step)
    return {"status": verdict(errors), "shape": [tokens, hid, vocab], "dtype": str(ctx.dtype), "errors": errors,
            "fwd_bwd_s": {"fastrl": t_fast, "torch": t_torch}, "ratio_vs_torch": ratio(t_torch, t_fast),
            "peak_bytes": {"fastrl": peak_fast, "torch": peak_torch}, "flops": 6 * tokens * hid * vocab}


@check
def group_advantages(ctx: Context) -> dict:
    """GRPO advantages of B rewards in groups of G (one launch), vs the fp64 reference."""
    from fastrl.ops import group_advantages as op
    from fastrl.ops import torch_impl

    batch, size = ctx.shapes["adv"]
    g = ctx.gen(2)
    rewards = torch.rand(batch, device=ctx.device, generator=g)
    rewards[5] = float("nan")  # unscorable: advantage 0
    ids = torch.randperm(batch, device=ctx.device, generator=g) // size  # shuffled group ids
    errors = {}
    for estimator, scale in (("grpo", "group"), ("grpo", "batch"), ("dr_grpo", "none"), ("rloo", "none")):
        with _fast():
            out = op(rewards, ids, estimator=estimator, scale=scale)
        ref = torch_impl.group_advantages(rewards, ids, estimator=estimator, scale=scale)
        errors[f"{estimator}/{scale}_max_abs"] = (max_err(out, ref), 1e-5)
    with _fast():
        t_fast = ctx.time(lambda: op(rewards, ids))
    t_torch = ctx.time(lambda: torch_impl.group_advantages(rewards, ids))
    return {"status": verdict(errors), "batch": batch, "group_size": size, "errors": errors,
            "seconds": {"fastrl": t_fast, "torch reference": t_torch}, "ratio_vs_torch": ratio(t_torch, t_fast)}


@check
def grpo_loss(ctx: Context) -> dict:
    """The GRPO (DAPO aggregation, clipped, k3 KL) loss and its gradient over [B, L] tokens, vs fp64."""
    from fastrl.losses import grpo_loss as op
    from fastrl.losses.torch_impl import grpo as torch_grpo

    rows, length = ctx.shapes["grpo"]
    g = ctx.gen(3)
    shape = (rows, length)
    old = -torch.rand(shape, device=ctx.device, generator=g) * 3
    logps = (old + 0.1 * torch.randn(shape, device=ctx.device, generator=g)).requires_grad_()
    ref_logps = old + 0.05 * torch.randn(shape, device=ctx.device, generator=g)
    adv = torch.randn(rows, device=ctx.device, generator=g)
    lengths = torch.randint(1, length + 1, (rows,), device=ctx.device, generator=g)
    mask = torch.arange(length, device=ctx.device)[None] < lengths[:, None]
    kw = dict(beta=0.04, epsilon=0.2, loss_type="dapo")
    with _fast():
        loss, _ = op(logps, old, adv, mask, ref_logps=ref_logps, **kw)
        loss.backward()
    grad = logps.grad.clone()
    r64 = logps.detach().double().requires_grad_()
    rloss, _ = torch_grpo.grpo_loss(r64, old.double(), adv.double(), mask, ref_logps=ref_logps.double(), **kw)
    rloss.backward()
    errors = {"loss_abs": (abs(float(loss.detach()) - float(rloss.detach())), 1e-5 * max(1.0, abs(float(rloss.detach())))),
              "grad_rel_norm": (rel_norm(grad, r64.grad), 1e-5)}

    def run():
        logps.grad = None
        op(logps, old, adv, mask, ref_logps=ref_logps, **kw)[0].backward()

    with _fast():
        t_fast = ctx.time(run)
    with backend("torch"):
        t_torch = ctx.time(run)
    return {"status": verdict(errors), "tokens": rows * length, "errors": errors,
            "fwd_bwd_s": {"fastrl": t_fast, "torch": t_torch}, "ratio_vs_torch": ratio(t_torch, t_fast)}


@check
def dpo_loss(ctx: Context) -> dict:
    """The sigmoid DPO loss (and IPO, a sum of types) and its gradient over B pairs, vs the fp64 torch path."""
    from fastrl.losses import dpo_loss as op

    pairs = ctx.shapes["dpo"]
    g = ctx.gen(4)
    pc, pr, qc, qr = (-torch.rand(pairs, device=ctx.device, generator=g) * 100 for _ in range(4))
    lc, lr = (torch.randint(1, 512, (pairs,), device=ctx.device, generator=g) for _ in range(2))
    lengths = dict(chosen_lengths=lc, rejected_lengths=lr)
    errors = {}
    for loss_type in ("sigmoid", "ipo", ["sigmoid", "sft"]):
        name = "+".join(loss_type) if isinstance(loss_type, list) else loss_type
        a, b = pc.clone().requires_grad_(), pr.clone().requires_grad_()
        with _fast():
            loss, _ = op(a, b, qc, qr, loss_type=loss_type, beta=0.1, **lengths)
            loss.backward()
        a64, b64 = pc.double().requires_grad_(), pr.double().requires_grad_()
        with backend("torch"):
            rloss, _ = op(a64, b64, qc.double(), qr.double(), loss_type=loss_type, beta=0.1, **lengths)
            rloss.backward()
        errors[f"{name}_loss_abs"] = (abs(float(loss.detach()) - float(rloss.detach())), 1e-5 * max(1.0, abs(float(rloss.detach()))))
        errors[f"{name}_grad_rel_norm"] = (rel_norm(torch.cat([a.grad, b.grad]), torch.cat([a64.grad, b64.grad])), 1e-5)
    a, b = pc.clone().requires_grad_(), pr.clone().requires_grad_()

    def run():
        a.grad = b.grad = None
        op(a, b, qc, qr, beta=0.1)[0].backward()

    with _fast():
        t_fast = ctx.time(run)
    with backend("torch"):
        t_torch = ctx.time(run)
    return {"status": verdict(errors), "pairs": pairs, "errors": errors,
            "fwd_bwd_s": {"fastrl": t_fast, "torch": t_torch}, "ratio_vs_torch": ratio(t_torch, t_fast)}


def _torch_top_p_sample(logits, temperature, top_p, generator):
    """The common torch way (Hugging Face's warpers): sort, cumulative mass, mask, softmax, multinomial."""
    x = logits.float() / temperature
    sorted_x, order = torch.sort(x, descending=True, dim=-1)
    mass = torch.softmax(sorted_x, dim=-1).cumsum(-1)
    drop = mass - torch.softmax(sorted_x, dim=-1) >= top_p
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)
    return torch.multinomial(torch.softmax(x, dim=-1), 1, generator=generator).squeeze(-1)


@check
def sampler(ctx: Context) -> dict:
    """The sampler at V = 151936: the same tokens as the CPU sampler for the same seed, the right
    distribution (chi-square over the most probable tokens), then its speed beside torch."""
    from fastrl.ops import torch_impl
    from fastrl.sampling import sample

    rows, vocab = ctx.shapes["sampler"]
    g = ctx.gen(5)
    logits = (torch.randn(rows, vocab, device=ctx.device, generator=g) * 3).to(ctx.dtype)
    settings = dict(temperature=0.8, top_k=0, top_p=0.9, min_p=0.0)
    # the same seed on both devices: the CUDA kernel and the CPU sampler draw the same uniforms per row,
    # so they pick the same tokens except where a uniform lands within fp32 rounding of a CDF boundary
    import fastrl.sampling as sampling_module

    def with_seed(x):  # sample() with the per-call seed fixed instead of drawn from a generator
        fixed = torch.tensor([123456789], dtype=torch.int64, device=x.device)
        with mock.patch.object(sampling_module, "_draw_seed", lambda generator, device: fixed):
            return sample(x, **settings)

    tokens, logprobs = with_seed(logits)
    again = with_seed(logits)[0]
    cpu_tokens, cpu_logprobs = with_seed(logits.cpu())
    info = {"rows": rows, "vocab": vocab, "settings": settings, "deterministic": bool(torch.equal(tokens, again))}
    # distribution: many draws of one row; the top 30 tokens' counts against their probabilities
    draws, dvocab = ctx.shapes["draws"]
    row = (torch.randn(1, dvocab, device=ctx.device, generator=g) * 2).float()
    many = row.expand(draws, dvocab).contiguous()
    drawn, _ = sample(many, generator=torch.Generator(device=ctx.device).manual_seed(8), temperature=1.0, top_p=0.95)
    probs = torch_impl.sampling_distribution(row.cpu(), temperature=1.0, top_p=0.95)[0]
    top = torch.argsort(probs, descending=True)[:30]
    counts = torch.bincount(drawn.cpu(), minlength=dvocab).double()
    expected = probs * draws
    observed_top, expected_top = counts[top], expected[top]
    rest_obs, rest_exp = draws - observed_top.sum(), draws - expected_top.sum()
    chi2 = float(((observed_top - expected_top) ** 2 / expected_top).sum())
    if rest_exp > 5:
        chi2 += float((rest_obs - rest_exp) ** 2 / rest_exp)
    dof = len(top) - (0 if rest_exp > 5 else 1)
    # 99.9% quantile of chi-square (Wilson-Hilferty), so a correct sampler fails once in a thousand runs
    z = 3.09
    bound = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    outside = float(counts[probs == 0].sum())  # draws of tokens top-p removed: must be none
    same = tokens.cpu() == cpu_tokens
    errors = {"chi2_over_bound": (chi2 / bound, 1.0), "draws_outside_support": (outside, 0.0),
              "tokens_unequal_to_cpu_fraction": (1.0 - float(same.double().mean()), 0.02),
              "logprob_vs_cpu_max_abs": (max_err(logprobs.cpu()[same], cpu_logprobs[same]), 1e-3)}
    status = verdict(errors) if info["deterministic"] else "fail"
    t_fast = ctx.time(lambda: sample(logits, generator=g, **settings))
    t_torch = ctx.time(lambda: _torch_top_p_sample(logits, 0.8, 0.9, g))
    return {"status": status, **info, "chi2": chi2, "chi2_bound_99.9": bound, "errors": errors,
            "seconds": {"fastrl": t_fast, "torch (sort + multinomial)": t_torch},
            "ratio_vs_torch": ratio(t_torch, t_fast), "cuda_kernel": _extension.cuda_enabled()}


@check
def rollout(ctx: Context) -> dict:
    """One rollout of a random Qwen2-0.5B-shaped model through fastrl.rollout.generate (CUDA-graph decode
    on GPU): greedy equals HF generate token for token (fp32), then sampled tokens/s beside HF generate."""
    import transformers

    import fastrl.rollout

    prompts, samples, prompt_len, new = ctx.shapes["rollout"]
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**ROLLOUT_MODEL[ctx.scale])).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    g = ctx.gen(6)
    ids = torch.randint(1, model.config.vocab_size, (prompts, prompt_len), device=ctx.device, generator=g)
    mask = torch.ones_like(ids)
    greedy_new = min(new, 32)
    with torch.no_grad():
        ours = fastrl.rollout.generate(model, ids, attention_mask=mask, max_new_tokens=greedy_new,
                                       temperature=0.0, stop_token_ids=[])
        hf = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=greedy_new,
                            min_new_tokens=greedy_new)[:, prompt_len:]
    # rows whose greedy tokens all equal HF's (a random model's top logits can sit within fp32 rounding of
    # each other, so a different but correct summation order may flip a near-tie: 90% of rows must agree)
    equal = float((ours.completion_ids == hf).all(dim=1).double().mean())
    model = model.to(ctx.dtype)
    rows = prompts * samples
    gen = torch.Generator(device=ctx.device).manual_seed(0)

    def ours_fn():
        return fastrl.rollout.generate(model, ids, attention_mask=mask, max_new_tokens=new, num_samples=samples,
                                       temperature=1.0, stop_token_ids=[], generator=gen)

    def hf_fn():
        return model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=new, min_new_tokens=new, num_return_sequences=samples)

    with torch.no_grad():
        t0 = time.perf_counter()
        out = ours_fn()
        ctx.sync()
        first_s = time.perf_counter() - t0  # capture included
        t_fast = _wall(ctx, ours_fn, 3 if ctx.device.type == "cuda" else 1)
        t_hf = _wall(ctx, hf_fn, 2 if ctx.device.type == "cuda" else 1)
    with contextlib.suppress(Exception):
        fastrl.rollout.release(model)
    errors = {"greedy_rows_unequal_to_hf": (1.0 - equal, 0.1),
              "sampled_tokens_out_of_range": (float(((out.completion_ids < 0) |
                                                     (out.completion_ids >= model.config.vocab_size)).sum()), 0.0)}
    return {"status": verdict(errors), "model": ROLLOUT_MODEL[ctx.scale], "prompts": prompts, "samples": samples,
            "prompt_len": prompt_len, "new_tokens": new, "dtype": str(ctx.dtype), "errors": errors,
            "first_call_s": first_s, "seconds": {"fastrl": t_fast, "hf generate": t_hf},
            "tokens_per_s": {"fastrl": rows * new / t_fast, "hf generate": rows * new / t_hf},
            "ratio_vs_hf": ratio(t_hf, t_fast)}


def _wall(ctx: Context, fn, reps: int) -> float:
    """Median wall seconds of ``reps`` synchronised calls (for work with host syncs inside, like a rollout)."""
    times = []
    for _ in range(reps):
        ctx.sync()
        t0 = time.perf_counter()
        fn()
        ctx.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------
# The runner


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (torch.dtype, torch.device)):
        return str(x)
    return x


def _write(path: Path, text: str, mirror: Path | None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    if mirror is not None:
        mirror.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, mirror / path.name)


def run(scale: str, out: Path, only: list[str] | None = None, budget_s: float = math.inf,
        mirror: Path | None = None) -> list[dict]:
    ctx = Context(scale)
    names = [fn.__name__ for fn in CHECKS]
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"--only: unknown check(s) {', '.join(unknown)}; the checks are {', '.join(names)}")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "smoke.jsonl"
    log.write_text("")
    start = time.perf_counter()
    results = []
    for i, fn in enumerate(CHECKS):
        name = fn.__name__
        if only and name not in only:
            continue
        elapsed = time.perf_counter() - start
        t0 = time.perf_counter()
        if elapsed > budget_s:
            result = {"status": "skipped", "reason": f"budget of {budget_s:.0f} s spent ({elapsed:.0f} s)"}
        else:
            try:
                result = fn(ctx)
            except Exception as exc:  # recorded, and the next checks still run
                result = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc(limit=8)}
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
        result = {"check": name, **result, "seconds": round(time.perf_counter() - t0, 3),
                  "elapsed_s": round(time.perf_counter() - start, 3), "scale": scale}
        result = _jsonable(result)
        text = json.dumps(result, indent=1)
        _write(out / f"{i:02d}-{name}.json", text + "\n", None)
        with open(log, "a") as f:
            f.write(json.dumps(result) + "\n")
        if mirror is not None:
            mirror.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, mirror / log.name)
        ratio_key = next((k for k in result if k.startswith("ratio_vs")), None)
        extra = f"  {ratio_key} {result[ratio_key]:.2f}" if ratio_key and isinstance(result[ratio_key], float) else ""
        print(f"gpu-smoke: {name:<24} {result['status']:<7} {result['seconds']:7.1f} s{extra}"
              + (f"  {result.get('error', '')}" if result["status"] == "error" else ""), flush=True)
        if result["status"] == "fail":
            bad = {k: v for k, v in result.get("errors", {}).items() if not (v[0] <= v[1])}
            print(f"gpu-smoke:   over tolerance: {bad}", flush=True)
        results.append(result)
    print(f"gpu-smoke: {len(results)} checks in {time.perf_counter() - start:.1f} s; results in {out}", flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=("auto", "gpu", "cpu"), default="auto",
                        help="gpu: real shapes on CUDA; cpu: tiny shapes, kernels interpreted (default: gpu when CUDA is there)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<device>/smoke)")
    parser.add_argument("--only", default="", help="comma-separated check names: " + ", ".join(f.__name__ for f in CHECKS))
    parser.add_argument("--budget-s", type=float, default=math.inf, help="checks that would start later are skipped")
    args = parser.parse_args(argv)
    scale = args.scale if args.scale != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    if scale == "gpu" and not torch.cuda.is_available():
        parser.error("--scale gpu needs a CUDA device")
    out = args.out or Path(_device.results_dir()) / "smoke"
    mirror = Path(os.environ["OUT"]) / "smoke" if os.environ.get("OUT") else None
    if mirror is not None and mirror.resolve() == out.resolve():
        mirror = None
    only = [s.strip() for s in args.only.split(",") if s.strip()] or None
    try:
        results = run(scale, out, only, args.budget_s, mirror)
    except ValueError as exc:
        parser.error(str(exc))
    return 0 if all(r["status"] in ("ok", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
