"""fastrl.losses.grpo: the torch reference against an independent per-sequence fp64 implementation
(every loss type x aggregation x KL estimator x importance-sampling level), its hand-written backward
against autograd, the Triton kernels (interpreter, blocks shorter than the sequences) against the
reference, packed against padded, empty batches, grpo_loss_grad / grpo_token_weights, torch.compile,
opcheck, ahead-of-time GPU builds, every argument check, TRL's own loss where TRL is installed, and
real shapes on a GPU."""

from __future__ import annotations

import importlib
import itertools
import math

import pytest
import torch

from fastrl.losses import GRPOLoss, GRPOSettings, grpo_loss, grpo_loss_grad, grpo_token_weights
from fastrl.losses.torch_impl import grpo as R
from fastrl.ops import backend
from fastrl.ops.packing import pack_sequences
from conftest import refusal_test

OP = importlib.import_module("fastrl.losses.grpo")

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
AGG_MODES = [None, "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum"]
LEVELS = ["token", "sequence", "sequence_token"]
KLS = [None, "k1", "abs", "k2", "k3", "low_var_kl", "k3+", "kl", "mse"]
LENGTHS = [9, 0, 16, 1, 23, 5]  # an empty sequence, one of one token, ones longer than a 16-token block


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(OP, "_MAX_BLOCK", 16)


def _mask(lengths, width, seed=0) -> torch.Tensor:
    """[B, width] bool with lengths[b] set positions scattered over row b (not left-aligned)."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.rand(len(lengths), width, generator=g).argsort(1).argsort(1)
    return rank < torch.tensor(lengths)[:, None]


def _batch(lengths=LENGTHS, width=27, dtype=torch.float64, seed=0, per_token_adv=False):
    """Padded inputs: logps, old, ref, sampler (one NaN), entropy, advantages, mask."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    mask = _mask(lengths, width, seed)
    logps = -2 * torch.rand(b, width, generator=g, dtype=torch.float64)
    old = logps + 0.25 * randn(b, width)
    ref = logps + 0.3 * randn(b, width)
    sampler = old + 0.2 * randn(b, width)
    row0 = mask[0].nonzero().flatten()
    if row0.numel():
        sampler[0, row0[0]] = float("nan")  # TRL: an unscorable sampler token counts as no drift
    entropy = 3 * torch.rand(b, width, generator=g, dtype=torch.float64)
    adv = randn(b)
    adv[min(3, b - 1)] = 0.0  # A = 0: neither clipped low nor high
    if per_token_adv:
        adv = adv[:, None] + 0.5 * randn(b, width)
    out = dict(logps=logps, old=old, ref=ref, sampler=sampler, entropy=entropy, adv=adv, mask=mask)
    return {k: (v.to(dtype) if v.dtype == torch.float64 else v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------
# An independent fp64 implementation: one sequence at a time, written from docs/losses.md / TRL / verl


def _nan0(x):
    return torch.where(torch.isnan(x), torch.zeros_like(x), x)


def _kl(x, r, name):
    """KL estimator of pi (x) against pi_ref (r), verl's definitions."""
    base = name.rstrip("+")
    if base in ("k1", "kl"):
        value = x - r
    elif base == "abs":
        value = (x - r).abs()
    elif base in ("k2", "mse"):
        value = 0.5 * (x - r) ** 2
    elif base == "k3":
        q = r - x
        value = torch.exp(q) - q - 1
    else:  # low_var_kl
        q = torch.clamp(r - x, -20, 20)
        value = torch.clamp(torch.exp(q) - q - 1, -10, 10)
    if name.endswith("+") and base not in ("k2", "mse"):
        k2 = 0.5 * (x - r) ** 2
        value = k2 - k2.detach() + value.detach()
    return value


def _is_weight(log_w, mode, lo, hi):
    w = torch.exp(log_w)
    lo = -math.inf if lo is None else lo
    hi = math.inf if hi is None else hi
    if mode.endswith("truncate"):
        return torch.clamp(w, min=lo, max=hi)
    return torch.where((w < lo) | (w > hi), torch.zeros_like(w), w)


def independent_grpo_loss(logps, old, adv, mask, *, ref=None, sampler=None, entropy=None, loss_type="dapo",
                          epsilon=0.2, epsilon_high=None, delta=None, clip_ratio_c=None, beta=0.0, kl="k3",
                          use_bias_correction_kl=False, importance_sampling_level="token", is_mode="token_truncate",
                          is_cap=None, is_min=None, off_policy_mask_threshold=None, entropy_coef=0.0,
                          num_items_in_batch=None, max_completion_length=None, sapo_tau_pos=1.0, sapo_tau_neg=1.05,
                          vespo_k=(2.0, 3.0), vespo_lambda=(3.0, 2.0), loss_agg_mode=None):
    """Padded fp64 inputs; returns (loss, {"low", "high", "kl", "entropy"} token means)."""
    b, width = logps.shape
    lo_eps, hi_eps = epsilon, epsilon if epsilon_high is None else epsilon_high
    seq_loss, counts, seq_entropy = [], [], []
    low = high = kl_sum = 0.0
    for i in range(b):
        idx = mask[i].nonzero().flatten()
        n = idx.numel()
        x = logps[i, idx]
        o = x.detach() if old is None else old[i, idx]
        a = adv[i].expand(n) if adv.dim() == 1 else adv[i, idx]
        log_ratio = x - o
        mean_log_ratio = log_ratio.sum() / max(n, 1)
        if importance_sampling_level == "token":
            ratio = torch.exp(log_ratio)
        elif importance_sampling_level == "sequence":
            ratio = torch.exp(mean_log_ratio).expand(n)
        else:
            ratio = torch.exp(torch.clamp(x - x.detach() + mean_log_ratio.detach(), max=10.0))
        if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            capped = ratio if delta is None else torch.clamp(ratio, max=delta)
            clipped = torch.clamp(ratio, 1 - lo_eps, 1 + hi_eps)
            per_token = torch.maximum(-a * capped, -a * clipped)  # verl's form of -min(rA, clip(r)A)
            if clip_ratio_c is not None:
                per_token = torch.where(a < 0, torch.minimum(per_token, -clip_ratio_c * a), per_token)
            low += float(((capped < 1 - lo_eps) & (a < 0)).sum())
            high += float(((capped > 1 + hi_eps) & (a > 0)).sum())
        elif loss_type == "cispo":
            per_token = -torch.clamp(ratio, max=hi_eps).detach() * a * x
        elif loss_type == "sapo":
            tau = torch.tensor([sapo_tau_pos if v > 0 else sapo_tau_neg for v in a.tolist()], dtype=x.dtype)
            per_token = -(4 / tau) * torch.sigmoid(tau * (ratio - 1)) * a
        else:  # vespo
            log_w = torch.clamp(log_ratio.detach(), -20, 20).sum()
            if sampler is not None:
                w_tok = _is_weight(_nan0(o - sampler[i, idx]), is_mode, is_min, is_cap)
                log_w = log_w + torch.clamp(torch.log(w_tok), math.log(1e-8), 20).sum()
            log_w = torch.clamp(log_w, math.log(1e-8), 20)
            phis = []
            for v in a.tolist():
                k, lam = (vespo_k[0], vespo_lambda[0]) if v >= 0 else (vespo_k[1], vespo_lambda[1])
                lam = max(lam, 1e-4)
                phi = math.exp(lam + k * float(log_w) - lam * math.exp(float(log_w)))
                phis.append(phi if math.isfinite(phi) else 0.0)
            per_token = -torch.tensor(phis, dtype=x.dtype) * a * x
        if off_policy_mask_threshold is not None:
            src = o if sampler is None else sampler[i, idx]
            drift = _nan0(src - x.detach()).sum() / max(n, 1)
            per_token = per_token * ((a >= 0) | (drift <= off_policy_mask_threshold)).to(x.dtype)
        if sampler is not None and loss_type != "vespo":
            diff = _nan0(o - sampler[i, idx])
            if is_mode.startswith("sequence"):
                per_token = per_token * _is_weight(diff.sum(), is_mode, is_min, is_cap)
            else:
                per_token = per_token * _is_weight(diff, is_mode, is_min, is_cap)
        if ref is not None:
            kl_tok = _kl(x, ref[i, idx], kl)
            if use_bias_correction_kl:
                kl_tok = kl_tok * ratio
            kl_sum += float(kl_tok.detach().sum())
            if beta:
                per_token = per_token + beta * kl_tok
        seq_loss.append(per_token.sum())
        counts.append(n)
        seq_entropy.append(entropy[i, idx].sum() if entropy is not None else x.new_zeros(()))

    total = sum(counts)
    nonempty = [n for n in counts if n > 0]
    max_len = max_completion_length or width

    def aggregate(sums, mode):
        if mode in ("grpo", "sapo"):
            return sum(s / n for s, n in zip(sums, counts) if n) / b if b else 0.0
        if mode == "bnpo":
            return sum(sums) / max(total, 1)
        if mode == "dr_grpo":
            return sum(sums) / (b * max_len)
        if mode in ("dapo", "cispo", "vespo", "token-mean"):
            return sum(sums) / max(total if num_items_in_batch is None else num_items_in_batch, 1)
        if mode == "luspo":
            return sum(sums) / b
        if mode == "seq-mean-token-mean":
            return sum(s / n for s, n in zip(sums, counts) if n) / max(len(nonempty), 1)
        if mode == "seq-mean-token-sum":
            return sum(sums) / max(len(nonempty), 1)
        if mode == "seq-mean-token-sum-norm":
            return sum(sums) / max_len
        return sum(sums)  # token-sum

    loss = aggregate(seq_loss, loss_agg_mode or loss_type)
    if entropy_coef:
        loss = loss - entropy_coef * aggregate(seq_entropy, loss_agg_mode or "bnpo")
    metrics = {"low": low / max(total, 1), "high": high / max(total, 1), "kl": kl_sum / max(total, 1),
               "entropy": float(sum(seq_entropy).detach()) / max(total, 1) if b else 0.0}
    return loss, metrics


def _features(loss_type, level, kl, index):
    """A rotating mix of the options, so that each shows up across the parameter grid."""
    kw = dict(loss_type=loss_type, importance_sampling_level=level, epsilon_high=0.28)
    if kl is not None:
        kw.update(kl=kl, beta=0.04, use_bias_correction_kl=index % 2 == 0)
    if loss_type in ("grpo", "dapo") and index % 3 == 0:
        kw["delta"] = 1.3
    if loss_type in ("grpo", "bnpo") and index % 3 == 1:
        kw["clip_ratio_c"] = 1.5
    if loss_type == "cispo":
        kw["epsilon_high"] = 1.1
    if index % 4 == 1:
        kw["off_policy_mask_threshold"] = 0.02
    if index % 5 == 2:
        kw.update(is_cap=1.2, is_mode=["token_truncate", "token_mask"][index % 2])
    if index % 5 == 4 and loss_type != "vespo":
        kw.update(is_cap=3.0, is_min=0.5, is_mode=["sequence_truncate", "sequence_mask"][index % 2])
    if index % 3 == 2:
        kw["entropy_coef"] = 0.01
    return kw


def _call(fn, data, kw, logps=None, entropy=None, padded=True):
    uses_sampler = "is_mode" in kw or "is_cap" in kw
    return fn(data["logps"] if logps is None else logps, data["old"], data["adv"], data["mask"],
              **({"ref": data["ref"], "sampler": data["sampler"] if uses_sampler else None,
                  "entropy": data["entropy"] if entropy is None else entropy} if fn is independent_grpo_loss else
                 {"ref_logps": data["ref"], "sampler_logps": data["sampler"] if uses_sampler else None,
                  "entropy": data["entropy"] if entropy is None else entropy}), **kw)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_reference_matches_the_independent_implementation(loss_type, level, agg):
    """Loss and gradients (logps, entropy) of every KL estimator, fp64, per-sequence and per-token advantages."""
    for index, kl in enumerate(KLS):
        data = _batch(seed=index, per_token_adv=index % 4 == 3)
        kw = _features(loss_type, level, kl, index + LOSS_TYPES.index(loss_type))
        kw.update(loss_agg_mode=agg, num_items_in_batch=41 if index % 2 else None)
        results = []
        for fn in (independent_grpo_loss, R.grpo_loss):
            logps = data["logps"].clone().requires_grad_()
            entropy = data["entropy"].clone().requires_grad_()
            loss, _ = _call(fn, data, kw, logps=logps, entropy=entropy)
            grads = torch.autograd.grad(loss, (logps, entropy), allow_unused=True)
            results.append((loss, *[g if g is not None else torch.zeros_like(logps) for g in grads]))
        (want, dw, dew), (got, dg, deg) = results
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, torch.as_tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"{kl}: {m}")
        torch.testing.assert_close(dg, dw, rtol=1e-9, atol=1e-12, msg=lambda m: f"{kl} d logps: {m}")
        torch.testing.assert_close(deg, dew, rtol=1e-9, atol=1e-12, msg=lambda m: f"{kl} d entropy: {m}")


@pytest.mark.parametrize("level", LEVELS)
def test_metrics_match_the_independent_implementation(level):
    data = _batch(seed=7)
    kw = dict(loss_type="dapo", importance_sampling_level=level, kl="k3", beta=0.1, use_bias_correction_kl=True,
              epsilon=0.02)
    want = independent_grpo_loss(data["logps"], data["old"], data["adv"], data["mask"], ref=data["ref"],
                                 entropy=data["entropy"], **kw)[1]
    _, metrics = R.grpo_loss(data["logps"], data["old"], data["adv"], data["mask"], ref_logps=data["ref"],
                             entropy=data["entropy"], **kw)
    assert want["low"] + want["high"] > 0  # something was clipped
    if level == "sequence":  # TRL averages a per-sequence indicator over the sequences
        counts = data["mask"].sum(1)
        ratio = torch.exp(torch.stack([(data["logps"] - data["old"])[i][data["mask"][i]].sum() / max(int(n), 1)
                                       for i, n in enumerate(counts)]))
        adv = data["adv"]
        want["low"] = float(((ratio < 0.98) & (adv < 0)).double().mean())
        want["high"] = float(((ratio > 1.02) & (adv > 0)).double().mean())
    for name, key in (("clip_ratio/low_mean", "low"), ("clip_ratio/high_mean", "high"), ("kl", "kl"),
                      ("entropy", "entropy")):
        assert metrics[name].item() == pytest.approx(want[key], rel=1e-6, abs=1e-7), name
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(want["low"] + want["high"], rel=1e-6, abs=1e-7)
    assert all(m.dtype == torch.float32 and not m.requires_grad for m in metrics.values())


# ---------------------------------------------------------------------------------------------------
# The reference's hand-written backward against autograd; gradcheck


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_reference_backward_matches_autograd(loss_type, level):
    for index, kl in enumerate(["k3", "low_var_kl", "k1+", "abs"]):
        data = _batch(seed=20 + index, per_token_adv=index == 2)
        kw = _features(loss_type, level, kl, index)
        kw.pop("entropy_coef", None)
        settings = R.GRPOSettings(**kw)
        sampler = data["sampler"] if "is_mode" in kw else None
        logps = data["logps"].clone().requires_grad_()
        entropy = data["entropy"].clone().requires_grad_()
        stats = R.grpo_sequence_stats(logps, data["old"], data["adv"], data["mask"], ref_logps=data["ref"],
                                      sampler_logps=sampler, entropy=entropy, settings=settings)
        g_loss, g_ent = torch.linspace(-1, 2, len(LENGTHS), dtype=torch.float64), torch.arange(6.0).double()
        want = torch.autograd.grad((stats[:, R.LOSS] * g_loss + stats[:, R.ENT] * g_ent).sum(), (logps, entropy))
        got = R.grpo_sequence_stats_backward(g_loss, g_ent, data["logps"], data["old"], data["adv"], data["mask"],
                                             ref_logps=data["ref"], sampler_logps=sampler,
                                             entropy_like=data["entropy"], settings=settings)
        torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


@pytest.mark.parametrize("loss_type,level,kw", [
    ("grpo", "token", dict(kl="k3", beta=0.1, use_bias_correction_kl=True, clip_ratio_c=1.5)),
    ("dapo", "sequence", dict(kl="k2", beta=0.2, delta=1.3, entropy_coef=0.05)),
    ("sapo", "sequence_token", dict(kl="abs", beta=0.1)),
    ("bnpo", "sequence", dict(kl="k1", beta=0.3, use_bias_correction_kl=True, clip_ratio_c=1.5)),
    ("dr_grpo", "token", dict(kl="low_var_kl", beta=0.1, off_policy_mask_threshold=0.0)),
    ("luspo", "sequence", dict(loss_agg_mode="seq-mean-token-mean")),
])
def test_gradcheck_on_the_fp64_reference(loss_type, level, kw):
    """Finite differences see through stop-gradients, so cispo, vespo, GSPO-token and the "k3+"
    estimators (surrogate gradients by design) are checked against the independent autograd instead."""
    data = _batch(lengths=[4, 0, 6, 3], width=8, seed=3)

    def fn(logps, entropy):
        return R.grpo_loss(logps, data["old"], data["adv"], data["mask"], ref_logps=data["ref"], entropy=entropy,
                           loss_type=loss_type, importance_sampling_level=level, **kw)[0]

    inputs = (data["logps"].clone().requires_grad_(), data["entropy"].clone().requires_grad_())
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# The Triton kernels (interpreter) against the reference


def _run(name, data, kw, *, packed=False, grad_entropy=True):
    """(loss, metrics, d logps, d entropy) under backend ``name``, padded or packed."""
    logps = data["logps"].clone().requires_grad_()
    entropy = data["entropy"].clone().requires_grad_()
    uses_sampler = "is_mode" in kw or "is_cap" in kw
    tensors = dict(ref_logps=data["ref"], sampler_logps=data["sampler"] if uses_sampler else None,
                   entropy=entropy if grad_entropy else None)
    with backend(name):
        if packed:
            mask = data["mask"]
            flat = {k: (pack_sequences(v, mask)[0] if v is not None else None) for k, v in tensors.items()}
            adv = data["adv"] if data["adv"].dim() == 1 else pack_sequences(data["adv"], mask)[0]
            lp_flat, cu = pack_sequences(logps, mask)
            loss, metrics = grpo_loss(lp_flat, pack_sequences(data["old"], mask)[0], adv, cu_seqlens=cu, **flat, **kw)
        else:
            loss, metrics = grpo_loss(logps, data["old"], data["adv"], data["mask"], **tensors, **kw)
        grads = torch.autograd.grad(loss, (logps, entropy), allow_unused=True)
    return loss, metrics, grads[0], grads[1]


def _assert_close_runs(a, b, *, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    for x, y in zip(a[2:], b[2:]):
        if y is None:
            assert x is None
        else:
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_triton_matches_the_reference(small_blocks, loss_type, level):
    index = LOSS_TYPES.index(loss_type) + 3 * LEVELS.index(level)
    data = _batch(dtype=torch.float32, seed=index, per_token_adv=index % 4 == 3)
    kw = _features(loss_type, level, KLS[1 + index % (len(KLS) - 1)], index)
    _assert_close_runs(_run("triton", data, kw), _run("torch", data, kw))


@pytest.mark.parametrize("is_mode", R.IS_MODES)
def test_triton_sampler_weights_and_off_policy_mask(small_blocks, is_mode):
    data = _batch(dtype=torch.float32, seed=11)
    kw = dict(loss_type="grpo", is_mode=is_mode, is_cap=1.1, is_min=0.9, off_policy_mask_threshold=-0.01,
              kl="k3", beta=0.1)
    _assert_close_runs(_run("triton", data, kw), _run("torch", data, kw))


@pytest.mark.parametrize("packed", [False, True])
def test_triton_bf16_inputs(small_blocks, packed):
    data = _batch(dtype=torch.bfloat16, seed=5)
    kw = dict(loss_type="dr_grpo", kl="k3", beta=0.05, entropy_coef=0.02, max_completion_length=40)
    a, b = _run("triton", data, kw, packed=packed), _run("torch", data, kw, packed=packed)
    assert a[2].dtype == torch.bfloat16 and a[3].dtype == torch.bfloat16
    _assert_close_runs(a, b, rtol=1e-2, atol=1e-3)


def test_triton_strided_inputs_and_integer_mask(small_blocks):
    data = _batch(dtype=torch.float32, seed=13, per_token_adv=True)
    for key in ("logps", "old", "ref", "entropy", "adv"):  # [B, L] views with strides (1, B)
        data[key] = data[key].t().contiguous().t()
    data["mask"] = data["mask"].to(torch.int64)
    kw = dict(loss_type="bnpo", kl="k1", beta=0.2, entropy_coef=0.05, importance_sampling_level="sequence")
    _assert_close_runs(_run("triton", data, kw), _run("torch", data, kw))


@pytest.mark.parametrize("name", ["torch", "triton"])
@pytest.mark.parametrize("loss_type,level", [("grpo", "sequence"), ("dapo", "token"), ("vespo", "token"),
                                             ("luspo", "sequence_token")])
def test_packed_and_padded_agree(small_blocks, name, loss_type, level):
    data = _batch(dtype=torch.float32, seed=9, per_token_adv=loss_type == "dapo")
    kw = dict(loss_type=loss_type, importance_sampling_level=level, kl="k2", beta=0.1, entropy_coef=0.01,
              max_completion_length=27, off_policy_mask_threshold=0.0, is_cap=2.0)
    _assert_close_runs(_run(name, data, kw, packed=True), _run(name, data, kw), rtol=1e-6, atol=1e-7)


def test_one_launch_forward_and_one_backward(small_blocks, launches):
    calls = launches
    data = _batch(dtype=torch.float32)
    _run("triton", data, dict(loss_type="grpo", importance_sampling_level="sequence", kl="k3", beta=0.1,
                              entropy_coef=0.1))
    assert [grid for _, grid in calls] == [(len(LENGTHS),), (len(LENGTHS),)]
    calls.clear()
    _run("auto", data, dict(loss_type="grpo"))  # CPU tensors: the torch reference
    assert calls == []


def test_padding_is_ignored_even_when_it_holds_nan(small_blocks):
    data = _batch(dtype=torch.float32, seed=2, per_token_adv=True)
    pad = ~data["mask"]
    for key in ("logps", "old", "ref", "sampler", "entropy", "adv"):
        data[key] = data[key].masked_fill(pad, float("nan"))
    kw = dict(loss_type="vespo", kl="k3", beta=0.1, entropy_coef=0.1, is_cap=2.0, off_policy_mask_threshold=0.1)
    for name in ("torch", "triton"):
        loss, metrics, d_logps, d_entropy = _run(name, data, kw)
        assert torch.isfinite(loss) and all(torch.isfinite(m) for m in metrics.values()), name
        assert (d_logps[pad] == 0).all() and (d_entropy[pad] == 0).all(), name


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_empty_batches_give_zero_loss_and_zero_gradient(small_blocks, name):
    for loss_type, agg in itertools.product(LOSS_TYPES, AGG_MODES):
        kw = dict(loss_type=loss_type, loss_agg_mode=agg, kl="k3", beta=0.1, entropy_coef=0.1,
                  importance_sampling_level="sequence")
        for shape in ((3, 5), (0, 5), (3, 0)):
            logps = torch.randn(shape, requires_grad=True)
            entropy = torch.rand(shape, requires_grad=True)
            with backend(name):
                loss, metrics = grpo_loss(logps, None, torch.ones(shape[0]), torch.zeros(shape, dtype=torch.bool),
                                          ref_logps=torch.randn(shape), entropy=entropy, **kw)
                loss.backward()
            phi = metrics.pop("vespo/phi_seq_mean", None)  # TRL: phi(w = 1) = 1 for an empty sequence
            assert phi is None or phi.item() == (1.0 if shape[0] else 0.0)
            assert loss.item() == 0.0 and all(m.item() == 0.0 for m in metrics.values()), (loss_type, agg, shape)
            assert (logps.grad == 0).all() and (entropy.grad == 0).all()
        with backend(name):  # packed: no tokens at all
            logps = torch.zeros(0, requires_grad=True)
            loss, _ = grpo_loss(logps, None, torch.ones(2), cu_seqlens=torch.tensor([0, 0, 0]), **kw,
                                ref_logps=torch.zeros(0), entropy=torch.zeros(0))
            loss.backward()
        assert loss.item() == 0.0 and logps.grad.shape == (0,)
        if name == "triton":
            break  # the interpreter is slow; one loss type shows the kernels' empty rows


# ---------------------------------------------------------------------------------------------------
# grpo_loss_grad, grpo_token_weights, GRPOLoss


@pytest.mark.parametrize("name", ["torch", "triton"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_loss_grad_matches_autograd(small_blocks, name, level):
    data = _batch(dtype=torch.float32, seed=4)
    kw = dict(loss_type="grpo", importance_sampling_level=level, kl="k3", beta=0.1, use_bias_correction_kl=True,
              entropy_coef=0.03, off_policy_mask_threshold=0.01, is_cap=1.5)
    loss, metrics, d_logps, d_entropy = _run(name, data, kw)
    with backend(name):
        got = grpo_loss_grad(data["logps"], data["old"], data["adv"], data["mask"], ref_logps=data["ref"],
                             sampler_logps=data["sampler"], entropy=data["entropy"], **kw)
        no_entropy = grpo_loss_grad(data["logps"], data["old"], data["adv"], data["mask"], ref_logps=data["ref"],
                                    loss_type="grpo", kl="k3", beta=0.1)
    _assert_close_runs((got[0], got[3], got[1], got[2]), (loss, metrics, d_logps, d_entropy), rtol=1e-6, atol=1e-7)
    assert no_entropy[2] is None and not no_entropy[0].requires_grad


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_token_weights_reproduce_the_loss(loss_type, agg):
    """loss = sum_t w_t l_t - coef * sum_t wH_t H_t, and at the token level d loss/d logp = w_t d l_t/d logp_t."""
    data = _batch(seed=1)
    kw = dict(loss_type=loss_type, loss_agg_mode=agg, num_items_in_batch=33, max_completion_length=30)
    weights = grpo_token_weights(data["mask"], loss_type=loss_type, loss_agg_mode=agg, num_items_in_batch=33,
                                 max_completion_length=30)
    w_entropy = grpo_token_weights(data["mask"], loss_type=loss_type, loss_agg_mode=agg, entropy=True,
                                   num_items_in_batch=33, max_completion_length=30)
    settings = R.GRPOSettings(**{k: v for k, v in kw.items() if k != "num_items_in_batch"})
    per_token = R._token_terms(data["logps"], data["old"], data["adv"], data["mask"], None, data["ref"], None,
                               settings)["loss"].reshape(data["logps"].shape)
    loss, _ = R.grpo_loss(data["logps"], data["old"], data["adv"], data["mask"], entropy=data["entropy"],
                          entropy_coef=0.1, **kw)
    want = (weights.double() * per_token).sum() - 0.1 * (w_entropy.double() * data["entropy"]).sum()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-8)
    assert weights.dtype == torch.float32 and (weights[~data["mask"]] == 0).all()
    flat, cu = pack_sequences(weights, data["mask"])
    torch.testing.assert_close(grpo_token_weights(cu_seqlens=cu, loss_type=loss_type, loss_agg_mode=agg,
                                                  num_items_in_batch=33, max_completion_length=30), flat)


def test_module_form_and_defaults():
    data = _batch(dtype=torch.float32, seed=6)
    module = GRPOLoss(loss_type="bnpo", beta=0.1, kl="k3")
    assert "bnpo" in repr(module)
    got = module(data["logps"], data["old"], data["adv"], data["mask"], ref_logps=data["ref"])
    want = grpo_loss(data["logps"], data["old"], data["adv"], data["mask"], ref_logps=data["ref"], loss_type="bnpo",
                     beta=0.1)
    torch.testing.assert_close(got[0], want[0])
    # on-policy: old_logps=None is logps.detach(); the default loss type is dapo (sum / tokens)
    logps = data["logps"].clone().requires_grad_()
    loss, _ = grpo_loss(logps, None, data["adv"], data["mask"])
    loss.backward()
    counts = data["mask"].sum()
    torch.testing.assert_close(loss, -(data["adv"][:, None] * data["mask"]).sum() / counts)
    torch.testing.assert_close(logps.grad, -(data["adv"][:, None] * data["mask"]) / counts)
    # num_items_in_batch as TRL passes it: a tensor
    a = grpo_loss(data["logps"], data["old"], data["adv"], data["mask"], num_items_in_batch=torch.tensor(50))[0]
    b = grpo_loss(data["logps"], data["old"], data["adv"], data["mask"], num_items_in_batch=50)[0]
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------
# GRPOSettings: the options declared once, encoded for the ops, accepted as keywords


@pytest.mark.parametrize("kw", [{}, dict(loss_type="vespo", epsilon=0.1, epsilon_high=0.3, delta=1.5, clip_ratio_c=2.0,
                                      beta=0.2, kl="mse+", use_bias_correction_kl=True,
                                      importance_sampling_level="sequence_token", is_mode="token_mask", is_cap=3.0,
                                      is_min=0.5, off_policy_mask_threshold=-0.1, entropy_coef=-0.01,
                                      max_completion_length=7, sapo_tau_pos=0.5, sapo_tau_neg=2.0, vespo_k=(1.0, 4.0),
                                      vespo_lambda=2.5, loss_agg_mode="seq-mean-token-sum-norm")])
def test_settings_round_trip_through_the_op_encoding(kw):
    settings = GRPOSettings(**kw)
    ints, floats = settings.encode()
    assert GRPOSettings.decode(ints, floats) == settings
    assert GRPOSettings(**settings.options()) == settings


def test_settings_resolve_what_the_implementations_read():
    s = GRPOSettings()
    assert (s.agg, s.entropy_agg, s.policy, s.level, s.eps_low, s.eps_high) == ("dapo", "bnpo", "clip", "token", 0.2,
                                                                                0.2)
    assert (s.kl_estimator, s.kl_straight_through, s.vespo_k, s.vespo_lambda) == ("k3", False, (2.0, 3.0), (3.0, 2.0))
    s = GRPOSettings(loss_type="cispo", epsilon_high=5, kl="kl+", loss_agg_mode="token-sum", vespo_lambda=[1, 2])
    assert (s.agg, s.entropy_agg, s.policy, s.eps_high, s.kl_estimator, s.kl_straight_through) == (
        "token-sum", "token-sum", "cispo", 5.0, "k1", True)
    assert s.vespo_lambda == (1.0, 2.0) and GRPOSettings(kl="k2+").kl_straight_through is False
    assert GRPOSettings(loss_type="sapo").agg == "grpo" and GRPOSettings(loss_type="luspo").agg == "luspo"


def test_settings_or_keywords_are_the_same_call():
    data = _batch(dtype=torch.float32, seed=3)
    kw = dict(loss_type="grpo", beta=0.1, epsilon_high=0.28, importance_sampling_level="sequence")
    settings = GRPOSettings(**kw)
    args = (data["logps"], data["old"], data["adv"], data["mask"])
    by_keywords = grpo_loss(*args, ref_logps=data["ref"], **kw)
    by_settings = grpo_loss(*args, ref_logps=data["ref"], settings=settings)
    torch.testing.assert_close(by_settings[0], by_keywords[0], rtol=0, atol=0)
    assert GRPOLoss(settings).settings is settings and GRPOLoss(**kw).settings == settings
    torch.testing.assert_close(grpo_loss_grad(*args, ref_logps=data["ref"], settings=settings)[1],
                               grpo_loss_grad(*args, ref_logps=data["ref"], **kw)[1], rtol=0, atol=0)
    torch.testing.assert_close(grpo_token_weights(data["mask"], settings=settings),
                               grpo_token_weights(data["mask"], loss_type="grpo"), rtol=0, atol=0)
    with pytest.raises(TypeError, match="not both"):
        grpo_loss(*args, settings=settings, beta=0.2)
    with pytest.raises(TypeError, match=r"grpo_loss\(\) got an unexpected keyword argument 'betta' "
                                        r"\(did you mean 'beta'\?\)"):
        grpo_loss(*args, betta=0.1)
    with pytest.raises(TypeError, match="settings must be a GRPOSettings"):
        GRPOLoss(settings=dict(kw))


def test_stat_columns_are_one_module_without_triton():
    import subprocess
    import sys

    from fastrl.kernels import grpo_columns as columns

    code = ("import sys; import fastrl.kernels.grpo_columns, fastrl.losses.torch_impl.grpo; "
            "print('triton' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
    assert (R.LOSS, R.ENT, R.NSTATS, R.LOG_EPS) == (columns.LOSS, columns.ENT, columns.NSTATS, math.log(1e-8))
    pytest.importorskip("triton")
    from fastrl.kernels import grpo_loss as kernels

    for name in ("LOSS", "ENT", "COUNT", "KL", "RATIO", "LOW", "HIGH", "DUAL", "PHI", "LOG_RATIO", "COUPLING",
                 "OFF_POLICY_KL", "IS_WEIGHT", "VESPO_LOG_W", "LOG_EPS"):
        assert getattr(kernels, f"_{name}").value == getattr(columns, name) == getattr(R, name)
    assert kernels.NSTATS.value == columns.NSTATS and columns.USED <= columns.NSTATS


# ---------------------------------------------------------------------------------------------------
# torch.compile, opcheck, ahead-of-time GPU builds


def test_torch_compile_fullgraph_follows_the_backend(small_blocks):
    data = _batch(dtype=torch.float32, seed=8)
    flat = {k: pack_sequences(data[k], data["mask"])[0] for k in ("logps", "old", "ref", "entropy")}
    cu = pack_sequences(data["logps"], data["mask"])[1]

    def step(logps, old, adv, mask, ref, entropy, flat_logps, flat_old, cu):
        a, m = grpo_loss(logps, old, adv, mask, ref_logps=ref, entropy=entropy, loss_type="grpo", kl="k3", beta=0.1,
                         entropy_coef=0.01, importance_sampling_level="sequence")
        b, _ = grpo_loss(flat_logps, flat_old, adv, cu_seqlens=cu, loss_type="dapo", num_items_in_batch=30)
        return a + b, m["clip_ratio/region_mean"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = {}
    for name, fn in (("eager", step), ("torch", compiled), ("triton", compiled)):
        logps, entropy = data["logps"].clone().requires_grad_(), data["entropy"].clone().requires_grad_()
        flat_logps = flat["logps"].clone().requires_grad_()
        with backend("torch" if name == "eager" else name):
            loss, clip = fn(logps, data["old"], data["adv"], data["mask"], data["ref"], entropy, flat_logps,
                            flat["old"], cu)
            loss.backward()
        results[name] = (loss.detach(), clip, logps.grad, entropy.grad, flat_logps.grad)
    for name in ("torch", "triton"):
        for got, want in zip(results[name], results["eager"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_opcheck():
    data = _batch(dtype=torch.float32, seed=10)
    settings = OP.GRPOSettings(loss_type="grpo", importance_sampling_level="sequence", kl="k3", beta=0.1,
                               off_policy_mask_threshold=0.0, is_cap=2.0)
    tensors = OP._Tensors(logps=data["logps"].requires_grad_(), old_logps=data["old"], advantages=data["adv"],
                          ref_logps=data["ref"], sampler_logps=data["sampler"],
                          entropy=data["entropy"].requires_grad_(), mask=data["mask"], cu_seqlens=None)
    args = (*tensors, *settings.encode())
    torch.library.opcheck(torch.ops.fastrl.grpo_loss_stats.default, args)
    stats = OP._stats_op(*args)
    bwd = (torch.randn(len(LENGTHS)), torch.randn(len(LENGTHS)), stats, *tensors.for_backward().values(),
           *settings.encode(), True, torch.bfloat16)
    torch.library.opcheck(torch.ops.fastrl.grpo_loss_stats_backward.default, bwd,
                          test_utils=("test_schema", "test_faketensor"))


_SIGNATURE_TYPES = {"lp_ptr": "*bf16", "old_ptr": "*bf16", "adv_ptr": "*fp32", "ref_ptr": "*bf16", "smp_ptr": "*bf16",
                    "opsrc_ptr": "*bf16", "ent_ptr": "*bf16", "m_ptr": "*i1", "cu_ptr": "*i32", "stats_ptr": "*fp32",
                    "gs_ptr": "*fp32", "ge_ptr": "*fp32", "dlp_ptr": "*bf16", "dent_ptr": "*bf16",
                    "total": "i32", "length": "i32"}


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_kernels_compile_for_the_gpu_ahead_of_time_without_spills(direction, capability):
    from conftest import compile_for_gpu

    from fastrl.kernels import grpo_loss as kernels

    kernel = getattr(kernels, f"grpo_loss_{direction}_kernel")
    # every feature at once on sm_90 (the sequence level, the dual clip, KL with bias correction,
    # sampler weights, the off-policy mask, entropy); vespo with per-token advantages, packed, on sm_80
    full = capability == 90
    constexprs = dict(PACKED=not full, ADV_TOKEN=not full, POLICY=0 if full else 3, LEVEL=1 if full else 0,
                      KL=3 if full else 4, KL_ST=False, BIAS=full, HAS_REF=True, HAS_BETA=True, HAS_DELTA=full,
                      DUAL=full, IS_MODE=1, OFF_POLICY=True, HAS_ENT=True, SEQ_PASS=True, BLOCK=OP._MAX_BLOCK)
    signature = {name: "constexpr" if name in constexprs else _SIGNATURE_TYPES.get(name, "fp32")
                 for name in kernel.arg_names}
    aligned = tuple(n for n in kernel.arg_names if n.endswith("_ptr"))
    num_warps = max(1, min(8, OP._MAX_BLOCK // 128))
    res = compile_for_gpu(kernel, signature, constexprs, capability=capability, num_warps=num_warps, aligned=aligned)
    assert f".target sm_{capability}" in res["ptx"]
    assert res["STACK"] == 0 and res["LOCAL"] == 0 and 0 < res["REG"] < 255, res


# ---------------------------------------------------------------------------------------------------
# Argument checks


def _bad_calls():
    data = _batch(lengths=[2, 3], width=4, dtype=torch.float32)
    lp, old, adv, mask = data["logps"], data["old"], data["adv"], data["mask"]
    flat, cu = pack_sequences(lp, mask)
    meta = torch.device("meta")

    def call(**kw):
        return lambda: grpo_loss(lp, old, adv, mask, **kw)

    nan_adv = adv.clone()
    nan_adv[0] = float("nan")
    return [
        (lambda: grpo_loss(lp, old, adv), ValueError, "exactly one of cu_seqlens"),
        (lambda: grpo_loss(lp, old, adv, mask, cu), ValueError, "exactly one of cu_seqlens"),
        (lambda: grpo_loss(lp.tolist(), old, adv, mask), TypeError, "logps must be a torch.Tensor"),
        (lambda: grpo_loss(lp.double(), old, adv, mask), ValueError, "logps must have dtype"),
        (lambda: grpo_loss(flat, old, adv, mask), ValueError, "logps must be 2-D"),
        (lambda: grpo_loss(lp, old, adv, cu_seqlens=cu), ValueError, "logps must be 1-D"),
        (lambda: grpo_loss(flat, None, adv, cu_seqlens=torch.tensor([1, 2, 5])), ValueError,
         "cu_seqlens must start at 0"),
        (lambda: grpo_loss(flat, None, adv, cu_seqlens=torch.tensor([0, 2, 4])), ValueError,
         "cu_seqlens must end at the number"),
        (lambda: grpo_loss(flat, None, adv, cu_seqlens=cu.float()), ValueError, "cu_seqlens must have dtype"),
        (lambda: grpo_loss(lp, old, adv, mask[:, :3]), ValueError, "mask must have shape"),
        (lambda: grpo_loss(lp, old, adv, mask.int() * 2), ValueError, "mask must hold only 0 and 1"),
        (lambda: grpo_loss(lp, old[:, :3], adv, mask), ValueError, "old_logps must have the shape of logps"),
        (lambda: grpo_loss(lp, old.long(), adv, mask), ValueError, "old_logps must have dtype"),
        (lambda: grpo_loss(lp, old.to(meta), adv, mask), ValueError, "old_logps must be on cpu"),
        (call(ref_logps=lp[:1]), ValueError, "ref_logps must have the shape of logps"),
        (call(sampler_logps=lp.int()), ValueError, "sampler_logps must have dtype"),
        (call(entropy=[1.0]), TypeError, "entropy must be a torch.Tensor"),
        (lambda: grpo_loss(lp, old, adv[:1], mask), ValueError, r"advantages must be \[B\]"),
        (lambda: grpo_loss(lp, old, adv.long(), mask), ValueError, "advantages must have dtype"),
        (lambda: grpo_loss(lp, old, nan_adv, mask), ValueError, "advantages must be finite"),
        (lambda: grpo_loss(lp, old, adv * math.inf, mask), ValueError, "advantages must be finite"),
        (call(loss_type="ppo"), ValueError, "loss_type must be one of"),
        (call(loss_type=None), TypeError, "loss_type must be a str"),
        (call(loss_agg_mode="mean"), ValueError, "loss_agg_mode must be one of"),
        (call(epsilon=-0.1), ValueError, "epsilon must be finite and in"),
        (call(epsilon_high=-0.1), ValueError, "epsilon_high must be finite and in"),
        (call(epsilon="0.2"), TypeError, "epsilon must be a number"),
        (call(delta=1.0), ValueError, "delta must be finite and in"),
        (call(clip_ratio_c=0.5), ValueError, "clip_ratio_c must be finite and in"),
        (call(beta=-1.0), ValueError, "beta must be finite and in"),
        (call(beta=0.1), ValueError, "beta != 0 needs ref_logps"),
        (call(kl="k4", ref_logps=lp), ValueError, "kl must be one of"),
        (call(kl=3), TypeError, "kl must be a str"),
        (call(use_bias_correction_kl=1), TypeError, "use_bias_correction_kl must be a bool"),
        (call(importance_sampling_level="seq"), ValueError, "importance_sampling_level must be one of"),
        (call(is_mode="token"), ValueError, "is_mode must be one of"),
        (call(is_cap=0.0), ValueError, "is_cap must be finite and in"),
        (call(is_min=-1.0), ValueError, "is_min must be finite and in"),
        (call(is_min=2.0, is_cap=1.0), ValueError, r"is_min \(2.0\) must be less than is_cap"),
        (call(loss_type="vespo", is_mode="sequence_mask"), ValueError, "is_mode must be token_truncate"),
        (call(off_policy_mask_threshold=math.nan), ValueError, "off_policy_mask_threshold must be finite"),
        (call(entropy_coef=0.1), ValueError, "entropy_coef != 0 needs entropy"),
        (call(entropy_coef=math.inf), ValueError, "entropy_coef must be finite"),
        (call(num_items_in_batch="5"), TypeError, "num_items_in_batch must be a number or a tensor"),
        (call(num_items_in_batch=-1), ValueError, "num_items_in_batch must be finite and in"),
        (call(num_items_in_batch=torch.ones(2)), ValueError, "num_items_in_batch must be a number or a one-element"),
        (call(max_completion_length=0), ValueError, "max_completion_length must be >= 1"),
        (call(max_completion_length=2.5), TypeError, "max_completion_length must be an int"),
        (call(sapo_tau_pos=0.0), ValueError, "sapo_tau_pos must be finite and in"),
        (call(sapo_tau_neg=-1.0), ValueError, "sapo_tau_neg must be finite and in"),
        (call(vespo_k=(1.0, 2.0, 3.0)), ValueError, "vespo_k must be a number or a"),
        (call(vespo_lambda=math.nan), ValueError, "vespo_lambda must be finite"),
        (lambda: GRPOLoss(loss_type="x"), ValueError, "loss_type must be one of"),
        (lambda: grpo_token_weights(), ValueError, "exactly one of cu_seqlens"),
        (lambda: grpo_token_weights(mask, loss_agg_mode="sum"), ValueError, "loss_agg_mode must be one of"),
        (lambda: grpo_loss_grad(lp, old, adv, mask, loss_type="x"), ValueError, "loss_type must be one of"),
    ]


test_bad_arguments_are_refused = refusal_test(_bad_calls)


# ---------------------------------------------------------------------------------------------------
# TRL's own loss, where TRL is installed


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _trl_loss(trainer_cls, logps, old, adv, mask, *, ref, entropy, loss_type, level, beta, bias, entropy_coef,
              num_items, delta=None):
    """TRL's GRPOTrainer._compute_loss on a stub trainer whose model returns ``logps`` / ``entropy``."""
    import types
    from collections import defaultdict

    args = types.SimpleNamespace(delta=delta, use_bias_correction_kl=bias, sapo_temperature_pos=1.0,
                                 sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                                 vespo_lambda_neg=2.0, steps_per_generation=1, entropy_target=0.0)
    stub = types.SimpleNamespace(
        loss_type=loss_type, beta=beta, epsilon_low=0.2, epsilon_high=0.28 if loss_type != "cispo" else 1.1,
        args=args, importance_sampling_level=level, off_policy_mask_threshold=None, use_vllm=False,
        vllm_importance_sampling_correction=False, top_entropy_quantile=1.0,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        accelerator=_Accelerator(), _metrics={"train": defaultdict(list)}, _entropy_bonus_enabled=entropy_coef != 0,
        use_adaptive_entropy=False, entropy_coef=entropy_coef, aux_loss_enabled=False,
        max_completion_length=logps.shape[1], get_off_policy_mask=trainer_cls.get_off_policy_mask,
        get_gamma_weights=trainer_cls.get_gamma_weights,
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropy, None))
    inputs = {"prompt_ids": torch.zeros(logps.shape[0], 1, dtype=torch.long),
              "prompt_mask": torch.ones(logps.shape[0], 1, dtype=torch.long),
              "completion_ids": torch.zeros(logps.shape, dtype=torch.long), "completion_mask": mask.to(logps.dtype),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": torch.tensor(float(num_items))}
    loss = trainer_cls._compute_loss(stub, None, inputs)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_trl(loss_type):
    pytest.importorskip("trl")
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    trainer_cls = grpo_trainer.GRPOTrainer
    data = _batch(dtype=torch.float64, seed=12)
    for level, bias, entropy_coef in itertools.product(["token", "sequence"], [False, True], [0.0, 0.02]):
        kw = dict(loss_type=loss_type, level=level, beta=0.05, bias=bias, entropy_coef=entropy_coef, num_items=40,
                  delta=1.4 if loss_type == "dapo" else None)
        logps, entropy = data["logps"].clone().requires_grad_(), data["entropy"].clone().requires_grad_()
        want, want_metrics = _trl_loss(trainer_cls, logps, data["old"], data["adv"], data["mask"], ref=data["ref"],
                                       entropy=entropy, **kw)
        want_grads = torch.autograd.grad(want, (logps, entropy), allow_unused=True)
        logps2, entropy2 = data["logps"].clone().requires_grad_(), data["entropy"].clone().requires_grad_()
        got, metrics = R.grpo_loss(logps2, data["old"], data["adv"], data["mask"], ref_logps=data["ref"],
                                   entropy=entropy2, loss_type=loss_type, importance_sampling_level=level, beta=0.05,
                                   use_bias_correction_kl=bias, entropy_coef=entropy_coef, num_items_in_batch=40,
                                   epsilon_high=0.28 if loss_type != "cispo" else 1.1, delta=kw["delta"])
        got_grads = torch.autograd.grad(got, (logps2, entropy2), allow_unused=True)
        tol = 1e-6 if loss_type == "sapo" else 1e-9  # TRL holds sapo's temperatures in fp32
        assert got.item() == pytest.approx(want.item(), rel=tol, abs=tol)
        torch.testing.assert_close(got_grads[0], want_grads[0], rtol=tol, atol=tol)
        if entropy_coef:
            torch.testing.assert_close(got_grads[1], want_grads[1], rtol=tol, atol=tol)
        for name, value in want_metrics.items():
            if name in metrics:
                assert metrics[name].item() == pytest.approx(float(value), rel=1e-5, abs=1e-6), name


# ---------------------------------------------------------------------------------------------------
# GPU, real shapes


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["packed", "padded"])
@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "sequence"), ("vespo", "token"),
                                             ("sapo", "sequence_token")])
def test_real_shapes_on_the_gpu_match_the_reference(form, loss_type, level):
    from fastrl.ops import resolve
    from fastrl.ops.packing import unpack

    device, total, n = torch.device("cuda"), 65536, 64
    g = torch.Generator().manual_seed(0)
    cuts = torch.randint(0, total + 1, (n - 1,), generator=g).sort().values
    cu = torch.cat([torch.tensor([0]), cuts, torch.tensor([total])]).to(device=device, dtype=torch.int32)
    logps = (-4 * torch.rand(total, generator=g)).to(device)
    old = (logps + 0.1 * torch.randn(total, generator=g).to(device))
    ref = (logps + 0.1 * torch.randn(total, generator=g).to(device))
    sampler = (old + 0.05 * torch.randn(total, generator=g).to(device))
    entropy = (2 * torch.rand(total, generator=g)).to(device)
    adv = torch.randn(n, generator=g).to(device)
    tensors = [x.to(torch.bfloat16) for x in (logps, old, ref, sampler, entropy)]
    kw = dict(loss_type=loss_type, importance_sampling_level=level, kl="k3", beta=0.04, use_bias_correction_kl=True,
              entropy_coef=0.01, is_cap=2.0, off_policy_mask_threshold=0.05)
    if form == "padded":
        tensors = [unpack(x, cu)[0] for x in tensors]
        layout = dict(mask=unpack(logps, cu)[1])
    else:
        layout = dict(cu_seqlens=cu)
    assert resolve(device) == "triton"
    results = {}
    for name in ("triton", "torch"):
        lp, ent = tensors[0].clone().requires_grad_(), tensors[4].clone().requires_grad_()
        with backend(name):
            loss, metrics = grpo_loss(lp, tensors[1], adv, **layout, ref_logps=tensors[2], sampler_logps=tensors[3],
                                      entropy=ent, **kw)
            loss.backward()
        results[name] = (loss, metrics, lp.grad, ent.grad)
    (loss, metrics, d_lp, d_ent), (loss_ref, metrics_ref, d_lp_ref, d_ent_ref) = results["triton"], results["torch"]
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-5)
    for name in metrics_ref:
        torch.testing.assert_close(metrics[name], metrics_ref[name], rtol=1e-4, atol=1e-5)
    for got, want in ((d_lp, d_lp_ref), (d_ent, d_ent_ref)):
        assert float((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)) <= 1e-2
