"""fastrl.losses.dpo: every loss type and modifier against fp64 formulas written here from
docs/losses.md#pairwise-dpo-family (with autograd gradients), the Triton kernels (in the interpreter, several blocks)
against the torch reference, TRL 1.16's DPO / CPO / ORPO code paths and Liger-Kernel's losses where
they are installed, torch.compile, opcheck, ahead-of-time GPU builds, and the argument checks."""

from __future__ import annotations

import importlib
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fastrl.losses.dpo import LOSS_TYPES, DPOLoss, dpo_loss, dynamic_beta, wpo_weights
from fastrl.ops import backend
from conftest import refusal_test

OP = importlib.import_module("fastrl.losses.dpo")
B = 13


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(OP, "_MAX_BLOCK", 16)


def _pairs(n=B, dtype=torch.float64, seed=0, spread=3.0):
    """π_c, π_r, ρ_c, ρ_r [n] and lengths: log-probs of completions of 3-30 tokens, references
    within a few nats (``spread``) of the policy, so that both signs of every margin occur."""
    g = torch.Generator().manual_seed(seed)
    lc = torch.randint(3, 31, (n,), generator=g)
    lr = torch.randint(3, 31, (n,), generator=g)
    pc = -lc * (0.2 + 1.5 * torch.rand(n, generator=g, dtype=torch.float64))
    pr = -lr * (0.2 + 1.5 * torch.rand(n, generator=g, dtype=torch.float64))
    qc = pc + spread * torch.randn(n, generator=g, dtype=torch.float64)
    qr = pr + spread * torch.randn(n, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (pc, pr, qc, qr)] + [lc, lr]


# ---------------------------------------------------------------------------------------------------
# Independent fp64 formulas, from the docs/losses.md table (and its #peer-conventions for TRL's)


def ls(x):
    return -F.softplus(-x)


def cdpo(z, eps):
    return -(1 - eps) * ls(z) - eps * ls(-z)


def score(r, f="reverse_kl", alpha=1.0):
    if f == "forward_kl":
        return 1 - torch.exp(-r)
    if f == "js":
        return math.log(2) + ls(r)
    if f == "alpha" and alpha != 1.0:
        return (torch.exp(torch.clamp((alpha - 1) * r, max=80.0)) - 1) / (alpha - 1)
    return r


def formula(name, pc, pr, qc, qr, lc, lr, *, beta, eps=0.0, f="reverse_kl", alpha=1.0, ratio=0.5, tau=0.05,
            cpo_alpha=1.0, lam=50.0, delta=0.0, s=1.0, weights=None, rpo=None):
    """The loss of one type: mean over pairs of the per-pair formula (times the pair weights), plus
    the batch-level chosen NLL Σ(−π_c)/Σ|y_c| for sft, cpo, orpo (times the mean weight)."""
    lc, lr = lc.double(), lr.double()
    rc, rr = pc - qc, pr - qr
    sc, sr = score(rc, f, alpha), score(rr, f, alpha)
    h, hbar = sc - sr, sc / lc - sr / lr
    nll = (-pc).sum() / lc.sum()
    batch = 0.0
    if name == "sigmoid":
        per = -ls(beta * s * h)
    elif name == "cdpo":
        per = cdpo(beta * s * h, eps)
    elif name == "robust":
        per = (-(1 - eps) * ls(beta * s * h) + eps * ls(-beta * s * h)) / (1 - 2 * eps)
    elif name == "hinge":
        per = torch.clamp(1 - beta * s * h, min=0)
    elif name == "ipo":
        per = (hbar - 1 / (2 * beta)) ** 2
    elif name == "sigmoid_norm":
        per = -ls(beta * s * hbar)
    elif name == "exo_pair":
        z = beta * s * h
        per = torch.sigmoid(z) * (ls(z) - math.log(1 - eps)) + torch.sigmoid(-z) * (ls(-z) - math.log(eps))
    elif name == "nca_pair":
        per = -ls(beta * rc) - ls(-beta * rc) / 2 - ls(-beta * rr) / 2
    elif name == "bco_pair":
        per = -ls(beta * rc - delta) - ls(-(beta * rr - delta))
    elif name == "sppo_hard":
        per = (rc - 1 / (2 * beta)) ** 2 + (rr + 1 / (2 * beta)) ** 2
    elif name == "aot":
        per = cdpo(beta * (torch.sort(pc - pr).values - torch.sort(qc - qr).values), eps)
    elif name == "aot_unpaired":
        per = cdpo(beta * (torch.sort(rc).values - torch.sort(rr).values), eps)
    elif name == "apo_zero":
        per = (1 - torch.sigmoid(beta * rc)) + torch.sigmoid(beta * rr)
    elif name == "apo_down":
        per = torch.sigmoid(beta * rc) + (1 - torch.sigmoid(beta * h))
    elif name == "discopop":
        z = beta * s * h
        m = torch.sigmoid(z / tau)
        per = (1 - m) * -ls(z) + m * torch.exp(-z)
    elif name == "sft":
        per, batch = torch.zeros_like(pc), nll
    elif name == "simpo":
        per = cdpo(beta * (pc / lc) - beta * (pr / lr) - ratio * beta, eps)
    elif name == "orpo":
        p_c, p_r = torch.exp(pc / lc), torch.exp(pr / lr)
        per, batch = -beta * ls(torch.log(p_c / (1 - p_c)) - torch.log(p_r / (1 - p_r))), nll
    elif name == "cpo":
        per, batch = cdpo(beta * (pc - pr), eps), cpo_alpha * nll
    elif name == "dpop":
        per = -ls(beta * (h - lam * torch.clamp(qc - pc, min=0)))
    else:
        raise AssertionError(name)
    if rpo is not None:
        per = per + rpo * (-pc) / lc
    w = torch.ones_like(pc) if weights is None else weights
    return (w * per).mean() + w.mean() * batch


TYPE_KWARGS = {"cdpo": dict(label_smoothing=0.1), "robust": dict(label_smoothing=0.2),
               "exo_pair": dict(label_smoothing=1e-3), "aot": dict(label_smoothing=0.1),
               "aot_unpaired": dict(label_smoothing=0.05), "simpo": dict(beta=2.0, gamma_beta_ratio=0.3),
               "cpo": dict(cpo_alpha=0.7), "bco_pair": dict(bco_delta=0.3), "dpop": dict(dpop_lambda=5.0)}


def _formula_kwargs(kw):
    names = dict(label_smoothing="eps", gamma_beta_ratio="ratio", cpo_alpha="cpo_alpha", bco_delta="delta",
                 dpop_lambda="lam", beta="beta", rpo_alpha="rpo", discopop_tau="tau")
    return {names[k]: v for k, v in kw.items() if k in names}


def _grads(loss, *xs):
    xs = [x for x in xs if x is not None]
    grads = torch.autograd.grad(loss, xs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads)]


def _check_against_formula(name, kw, *, pair_inputs=None, extra=None, dtype=torch.float64, rtol=1e-10):
    pc, pr, qc, qr, lc, lr = pair_inputs or _pairs()
    kw = {"beta": 0.3, **kw}
    xs = [t.clone().requires_grad_() for t in (pc, pr)]
    want = formula(name, *xs, qc, qr, lc, lr, **_formula_kwargs(kw), **(extra or {}))
    want_grads = _grads(want, *xs)
    ys = [t.detach().to(dtype).requires_grad_() for t in (pc, pr)]
    ref = None if name in ("sft", "simpo", "orpo", "cpo") and kw.pop("no_ref", False) else (qc.to(dtype), qr.to(dtype))
    loss, metrics = dpo_loss(*ys, *(ref or (None, None)), loss_type=name, chosen_lengths=lc, rejected_lengths=lr,
                             **kw)
    got_grads = _grads(loss, *ys)
    torch.testing.assert_close(loss.double(), want.detach(), rtol=rtol, atol=rtol)
    for got, exp in zip(got_grads, want_grads):
        torch.testing.assert_close(got.double(), exp, rtol=rtol * 10, atol=rtol)
    return loss, metrics


@pytest.mark.parametrize("name", LOSS_TYPES)
def test_every_loss_type_matches_its_formula_fp64(name):
    _check_against_formula(name, dict(TYPE_KWARGS.get(name, {})))


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "orpo", "discopop", "aot"])
def test_fp32_inputs_match_the_fp64_formula(name):
    loss, _ = _check_against_formula(name, dict(TYPE_KWARGS.get(name, {})), dtype=torch.float32, rtol=1e-5)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("name", ["sft", "simpo", "orpo", "cpo"])
def test_reference_free_types_need_no_reference(name):
    kw = dict(TYPE_KWARGS.get(name, {}), no_ref=True)
    _, metrics = _check_against_formula(name, kw)
    pc, pr, _, _, lc, lr = _pairs()
    beta = kw.get("beta", 0.3)
    if name in ("simpo", "orpo"):  # TRL's CPO / ORPO log β × the mean token log-prob
        want = beta * pc / lc
    else:
        want = beta * pc
    torch.testing.assert_close(metrics["rewards/chosen"], want.mean())


@pytest.mark.parametrize("f", ["forward_kl", "js", "alpha", "alpha_divergence", "js_divergence"])
@pytest.mark.parametrize("name", ["sigmoid", "cdpo", "robust", "hinge", "ipo", "sigmoid_norm", "exo_pair", "discopop",
                                  "sft"])
def test_f_divergences(f, name):
    alpha = 0.5 if f.startswith("alpha") else 1.0
    kw = dict(TYPE_KWARGS.get(name, {}), f_divergence=f, f_alpha=alpha)
    base = {"alpha_divergence": "alpha", "js_divergence": "js"}.get(f, f)
    # the f-scores are exponential in the log-ratios: keep those within a few nats
    _check_against_formula(name, kw, pair_inputs=_pairs(spread=1.0), extra=dict(f=base, alpha=alpha))


def test_alpha_divergence_limit_and_clamp():
    # α = 1 is reverse KL (TRL's fallback); α = 3 with log-ratios past 40 hits the clamp of (α−1)r at 80
    _check_against_formula("sigmoid", dict(f_divergence="alpha", f_alpha=1.0), extra=dict(f="reverse_kl"))
    pc, pr, qc, qr, lc, lr = _pairs()
    qc = pc - torch.linspace(-5, 60, B, dtype=torch.float64)
    _check_against_formula("ipo", dict(f_divergence="alpha", f_alpha=3.0), pair_inputs=(pc, pr, qc, qr, lc, lr),
                           extra=dict(f="alpha", alpha=3.0))


def test_rpo_adds_the_mean_chosen_nll_per_pair():
    _check_against_formula("sigmoid", dict(rpo_alpha=0.5))  # formula(rpo=0.5)
    _check_against_formula("ipo", dict(rpo_alpha=1.0))


@pytest.mark.parametrize("name", ["sigmoid", "sft", "ipo", "cpo", "nca_pair"])
def test_pair_weights_wpo(name):
    w = torch.linspace(0.1, 2.0, B, dtype=torch.float64)
    kw = dict(TYPE_KWARGS.get(name, {}), pair_weights=w)
    _check_against_formula(name, kw, extra=dict(weights=w))


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "sppo_hard", "simpo", "apo_down", "discopop"])
def test_dynamic_beta_per_pair(name):
    pc, pr, qc, qr, lc, lr = _pairs()
    betas = torch.linspace(0.05, 0.5, B, dtype=torch.float64)
    xs = [t.clone().requires_grad_() for t in (pc, pr)]
    want = formula(name, *xs, qc, qr, lc, lr, **_formula_kwargs(TYPE_KWARGS.get(name, {})) | {"beta": betas})
    want_grads = _grads(want, *xs)
    ys = [t.clone().requires_grad_() for t in (pc, pr)]
    kw = {k: v for k, v in TYPE_KWARGS.get(name, {}).items() if k != "beta"}
    loss, metrics = dpo_loss(*ys, qc, qr, loss_type=name, chosen_lengths=lc, rejected_lengths=lr, pair_beta=betas,
                             **kw)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-10, atol=1e-10)
    for got, exp in zip(_grads(loss, *ys), want_grads):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(metrics["rewards/chosen"], (betas * (pc - qc)).mean())


def test_dynamic_beta_helper():
    margins = torch.tensor([0.0, 1.0, 10.0])
    torch.testing.assert_close(dynamic_beta(margins, 0.1, w=0.5, k=0.5),
                               0.1 * (1 + 0.5 * (1 - torch.exp(-0.5 * margins))))


@pytest.mark.parametrize("name", ["sigmoid", "cdpo", "hinge", "sigmoid_norm", "discopop"])
def test_soft_labels_scale_the_margin(name):
    p = torch.linspace(0.0, 1.0, B, dtype=torch.float64)
    kw = dict(TYPE_KWARGS.get(name, {}), soft_labels=p)
    _check_against_formula(name, kw, extra=dict(s=2 * p - 1))


def test_weighted_combination_of_types():
    pc, pr, qc, qr, lc, lr = _pairs()
    types, weights = ["sigmoid", "bco_pair", "sft", "ipo"], [0.8, 0.2, 1.0, 0.5]  # MPO-style mix
    xs = [t.clone().requires_grad_() for t in (pc, pr)]
    want = sum(w * formula(t, *xs, qc, qr, lc, lr, beta=0.2) for t, w in zip(types, weights))
    ys = [t.clone().requires_grad_() for t in (pc, pr)]
    loss, metrics = dpo_loss(*ys, qc, qr, loss_type=types, loss_weights=weights, beta=0.2, chosen_lengths=lc,
                             rejected_lengths=lr)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-10, atol=1e-10)
    for got, exp in zip(_grads(loss, *ys), _grads(want, *xs)):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(metrics["nll_loss"], (-pc).sum() / lc.sum())


def test_chosen_nll_gets_the_nll_gradient():
    pc, pr, qc, qr, lc, lr = _pairs()
    nll = (-pc + 0.5).requires_grad_()
    x = pc.clone().requires_grad_()
    loss, _ = dpo_loss(x, pr, qc, qr, loss_type=["sigmoid", "sft"], chosen_lengths=lc, chosen_nll=nll, rpo_alpha=0.3)
    dx, dnll = torch.autograd.grad(loss, [x, nll])
    want = formula("sigmoid", x, pr, qc, qr, lc, lr, beta=0.1) + nll.sum() / lc.sum() + (0.3 * nll / lc).mean()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dnll, 1 / lc.sum() + 0.3 / lc.double() / B)
    torch.testing.assert_close(dx, torch.autograd.grad(formula("sigmoid", x, pr, qc, qr, lc, lr, beta=0.1), x)[0])


def test_metrics_follow_trl_naming_and_values():
    pc, pr, qc, qr, lc, lr = _pairs()
    _, m = dpo_loss(pc, pr, qc, qr, beta=0.25)
    rc, rr = 0.25 * (pc - qc), 0.25 * (pr - qr)
    assert set(m) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                      "logps/rejected"}
    torch.testing.assert_close(m["rewards/chosen"], rc.mean())
    torch.testing.assert_close(m["rewards/rejected"], rr.mean())
    torch.testing.assert_close(m["rewards/margins"], (rc - rr).mean())
    torch.testing.assert_close(m["rewards/accuracies"], (rc > rr).double().mean())
    torch.testing.assert_close(m["logps/chosen"], pc.mean())
    assert not any(v.requires_grad for v in m.values())


def test_references_get_no_gradient():
    pc, pr, qc, qr, lc, lr = _pairs()
    qc, qr = qc.clone().requires_grad_(), qr.clone().requires_grad_()
    x = pc.clone().requires_grad_()
    loss, _ = dpo_loss(x, pr, qc, qr, loss_type="dpop")
    loss.backward()
    assert qc.grad is None and qr.grad is None and x.grad is not None


def test_wpo_weights_helper():
    g = torch.Generator().manual_seed(0)
    logps, lss = -3 * torch.rand(2, 4, 5, generator=g), -2 * torch.rand(2, 4, 5, generator=g)
    mask = torch.rand(2, 4, 5, generator=g) > 0.3
    w = wpo_weights(logps[0], lss[0], mask[0], logps[1], lss[1], mask[1])
    want = torch.ones(4)
    for k in range(2):
        want *= torch.exp(((logps[k] - lss[k]) * mask[k]).sum(1) / mask[k].sum(1).clamp(min=1))
    torch.testing.assert_close(w, want)


def test_module_form_matches_the_function_and_keeps_bco_running_mean():
    pc, pr, qc, qr, lc, lr = _pairs()
    module = DPOLoss(["sigmoid", "ipo"], beta=0.2, loss_weights=[1.0, 0.1])
    torch.testing.assert_close(module(pc, pr, qc, qr, chosen_lengths=lc, rejected_lengths=lr)[0],
                               dpo_loss(pc, pr, qc, qr, loss_type=["sigmoid", "ipo"], beta=0.2, loss_weights=[1.0, 0.1],
                                        chosen_lengths=lc, rejected_lengths=lr)[0])
    bco = DPOLoss("bco_pair", beta=0.2, bco_running_mean=True)
    seen = []
    for k in range(3):
        a, b_, c, d, _, _ = _pairs(seed=k)
        seen.append(torch.cat([0.2 * (a - c), 0.2 * (b_ - d)]))
        loss, _ = bco(a, b_, c, d)
        delta = torch.cat(seen).mean()
        torch.testing.assert_close(loss, formula("bco_pair", a, b_, c, d, lc, lr, beta=0.2, delta=delta))
    bco.eval()
    before = bco.running.mean.clone()
    bco(pc, pr, qc, qr)
    assert torch.equal(bco.running.mean, before)
    assert "running.mean" in dict(bco.named_buffers())


# ---------------------------------------------------------------------------------------------------
# Triton kernels in the interpreter against the torch reference


def _run(name, fn, inputs):
    xs = [t.clone().requires_grad_() if t is not None and t.is_floating_point() and k < 2 else t
          for k, t in enumerate(inputs)]
    with backend(name):
        loss, metrics = fn(*xs)
        grads = torch.autograd.grad(loss, xs[:2])
    return loss.detach(), grads, metrics


def _compare(fn, inputs, *, rtol=1e-5, atol=1e-6):
    want = _run("torch", fn, inputs)
    got = _run("triton", fn, inputs)
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=rtol * 10, atol=atol)
    assert got[2].keys() == want[2].keys()
    for k in want[2]:
        torch.testing.assert_close(got[2][k], want[2][k], rtol=rtol, atol=atol)
    return got


@pytest.mark.parametrize("name", LOSS_TYPES)
def test_triton_matches_the_reference_for_every_type(small_blocks, name):
    pc, pr, qc, qr, lc, lr = _pairs(37, torch.float32)  # 3 blocks of 16, the last one partial
    kw = dict(TYPE_KWARGS.get(name, {}), loss_type=name, chosen_lengths=lc, rejected_lengths=lr)
    _compare(lambda a, b, c, d: dpo_loss(a, b, c, d, **kw), (pc, pr, qc, qr))


@pytest.mark.parametrize("config", [
    dict(loss_type="sigmoid", f_divergence="forward_kl"),
    dict(loss_type="ipo", f_divergence="js"),
    dict(loss_type=["sigmoid_norm", "robust"], f_divergence="alpha", f_alpha=0.5, label_smoothing=0.1),
    dict(loss_type="discopop", f_divergence="alpha", f_alpha=1.5),
    dict(loss_type=["sigmoid", "sft", "hinge"], loss_weights=[1.0, 0.3, 0.5], rpo_alpha=0.2, pair_weights=True,
         pair_beta=True, soft_labels=True),
    dict(loss_type=["cpo", "simpo", "orpo"], cpo_alpha=0.5, chosen_nll=True, pair_beta=True),
    dict(loss_type=["nca_pair", "bco_pair", "apo_zero", "dpop"], bco_delta=torch.tensor(0.4), rpo_alpha=1.0),
    dict(loss_type=["aot", "aot_unpaired", "sft"], label_smoothing=0.2),
])
def test_triton_matches_the_reference_for_modifiers(small_blocks, config):
    pc, pr, qc, qr, lc, lr = _pairs(37, torch.float32, seed=1, spread=1.0)
    kw = dict(config, chosen_lengths=lc, rejected_lengths=lr)
    g = torch.Generator().manual_seed(2)
    extras = dict(pair_weights=0.1 + torch.rand(37, generator=g), pair_beta=0.05 + 0.3 * torch.rand(37, generator=g),
                  soft_labels=torch.rand(37, generator=g), chosen_nll=-pc + torch.rand(37, generator=g))
    for k, v in extras.items():
        if kw.get(k) is True:
            kw[k] = v
    _compare(lambda a, b, c, d: dpo_loss(a, b, c, d, **kw), (pc, pr, qc, qr))


def test_triton_bf16_and_fp64_inputs(small_blocks):
    pc, pr, qc, qr, lc, lr = _pairs(37, torch.float64, seed=3)
    kw = dict(loss_type=["sigmoid", "ipo", "sft"], chosen_lengths=lc, rejected_lengths=lr.int())
    loss64, _, _ = _compare(lambda a, b, c, d: dpo_loss(a, b, c, d, **kw), (pc, pr, qc, qr))
    assert loss64.dtype == torch.float64
    bf = [t.to(torch.bfloat16) for t in (pc, pr, qc, qr)]
    loss, grads, _ = _compare(lambda a, b, c, d: dpo_loss(a, b, c, d, **kw), bf, rtol=1e-5, atol=1e-5)
    assert loss.dtype == torch.float32 and grads[0].dtype == torch.bfloat16


def test_two_launches_forward_and_one_backward(small_blocks, launches):
    calls = launches
    pc, pr, qc, qr, lc, lr = _pairs(37, torch.float32)
    x = pc.clone().requires_grad_()
    with backend("triton"):
        loss, _ = dpo_loss(x, pr, qc, qr, loss_type=["sigmoid", "ipo"], chosen_lengths=lc, rejected_lengths=lr)
        loss.backward()
    assert [grid for _, grid in calls] == [(3,), (1,), (3,)]
    calls.clear()
    dpo_loss(pc, pr, qc, qr)  # auto on a CPU tensor: the torch reference
    assert calls == []


# ---------------------------------------------------------------------------------------------------
# torch.compile, opcheck, ahead-of-time GPU builds


def test_torch_compile_fullgraph(small_blocks):
    pc, pr, qc, qr, lc, lr = _pairs(37, torch.float32)

    def step(pc, pr, qc, qr, lc, lr):
        loss, metrics = dpo_loss(pc, pr, qc, qr, loss_type=["sigmoid", "sft", "aot", "bco_pair"],
                                 loss_weights=[1.0, 0.1, 0.5, 0.2], chosen_lengths=lc, rejected_lengths=lr,
                                 label_smoothing=0.1, bco_delta=0.1)
        return loss + 0 * metrics["rewards/margins"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = {}
    for name, fn, be in (("eager", step, "torch"), ("torch", compiled, "torch"), ("triton", compiled, "triton")):
        xs = [pc.clone().requires_grad_(), pr.clone().requires_grad_()]
        with backend(be):
            loss = fn(*xs, qc, qr, lc, lr)
            loss.backward()
        results[name] = (loss.detach(), xs[0].grad, xs[1].grad)
    for name in ("torch", "triton"):
        for got, want in zip(results[name], results["eager"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _op_args(pc, pr, qc, qr, lc, lr):
    pairs = OP.PairTensors(pc, pr, qc, qr, lc, lr, None, None, None, None, None, None, None)
    return (*pairs, *OP.DPOSettings(loss_type=("sigmoid", "ipo", "sft")).encode())


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_opcheck(small_blocks, name):
    pc, pr, qc, qr, lc, lr = _pairs(20, torch.float32)
    args = _op_args(pc.requires_grad_(), pr.requires_grad_(), qc, qr, lc, lr)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    with backend(name):
        torch.library.opcheck(torch.ops.fastrl.dpo_loss.default, args,
                              test_utils=utils + (("test_aot_dispatch_dynamic",) if name == "torch" else ()))
        if name == "triton":  # the torch backward runs torch.func.vjp, which opcheck's modes cannot see into
            stats = torch.ops.fastrl.dpo_loss.default(*args)
            torch.library.opcheck(torch.ops.fastrl.dpo_loss_backward.default,
                                  (torch.ones(10), stats.detach(), *args),
                                  test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("kernel_name", ["dpo_loss_fwd_kernel", "dpo_loss_bwd_kernel", "dpo_loss_finish_kernel"])
def test_kernels_compile_for_the_gpu_ahead_of_time_without_spills(kernel_name, capability):
    from conftest import compile_for_gpu

    from fastrl.kernels import dpo_loss as kernels

    kernel = getattr(kernels, kernel_name)
    names = kernel.arg_names
    signature = {}
    for a in names:
        if a.isupper():
            signature[a] = "constexpr"
        elif a.endswith("_ptr"):
            signature[a] = "*bf16" if a in ("pc_ptr", "pr_ptr", "qc_ptr", "qr_ptr") else \
                "*i64" if a in ("lc_ptr", "lr_ptr") else "*fp32"
        else:
            signature[a] = "i32" if a in ("n", "n_blocks") else "fp32"
    # every loss type and every optional input at once: the largest specialisation
    constexprs = {a: True for a in names if a.startswith("HAS_")}
    constexprs.update({k: v for k, v in dict(TYPES=(1 << len(LOSS_TYPES)) - 1, F_DIV=3, NORM_REWARDS=False,
                                             BATCH_NLL=True, NSTAT=kernels.NSTAT, NSTAT_PAD=16, RBLOCK=32,
                                             BLOCK=OP._MAX_BLOCK).items() if k in names})
    num_warps = 1 if kernel_name == "dpo_loss_finish_kernel" else 4
    res = compile_for_gpu(kernel, signature, constexprs, capability=capability, num_warps=num_warps,
                          aligned=tuple(a for a in names if a.endswith("_ptr")))
    assert f".target sm_{capability}" in res["ptx"]
    assert res["STACK"] == 0 and res["LOCAL"] == 0 and 0 < res["REG"] < 255, res


# ---------------------------------------------------------------------------------------------------
# TRL 1.16 and Liger-Kernel, where installed


def _token_inputs(seed=0, n=6, width=12):
    """Per-token log-probs of chosen and rejected completions [n, width] (0 off the completion) with
    their masks, and reference sums: what TRL's fused LM head hands its DPO loss."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, width + 1, (2, n), generator=g)
    mask = torch.arange(width)[None, None, :] < lengths[:, :, None]
    tok = -(0.05 + 2 * torch.rand(2, n, width, generator=g, dtype=torch.float64)) * mask
    ref = tok.sum(2) + 2 * torch.randn(2, n, generator=g, dtype=torch.float64)
    lss = -(0.5 + torch.rand(2, n, width, generator=g, dtype=torch.float64))
    return tok, mask, ref, lss


def _trl_dpo(tok, mask, ref, lss, *, loss_type, loss_weights=None, beta, label_smoothing=0.0,
             f_divergence_type="reverse_kl", f_alpha=0.5, use_weighting=False, discopop_tau=0.05):
    """The loss and d loss / d token log-probs of TRL's ``DPOTrainer._compute_loss``, driven with a
    stand-in model that returns these per-token log-probs (precomputed reference log-probs)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    n, width = tok.shape[1:]
    per_token = torch.cat([tok[0], tok[1]]).clone().requires_grad_()
    completion_mask = torch.zeros(2 * n, width + 1, dtype=torch.long)
    completion_mask[:, 1:] = torch.cat([mask[0], mask[1]])
    zeros = torch.zeros(2 * n, width)
    outputs = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                              log_sum_sq_probs=torch.cat([lss[0], lss[1]]))
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha,
        loss_types=list(loss_type), loss_weights=loss_weights or [1.0] * len(loss_type), beta=beta,
        label_smoothing=label_smoothing, use_weighting=use_weighting, args=SimpleNamespace(discopop_tau=discopop_tau),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * n, width + 1, dtype=torch.long),
              "attention_mask": torch.ones(2 * n, width + 1, dtype=torch.long), "completion_mask": completion_mask,
              "ref_chosen_logps": ref[0], "ref_rejected_logps": ref[1]}
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, return_outputs=False)
    (grad,) = torch.autograd.grad(loss, per_token)
    return loss.detach(), grad.reshape(2, n, width), trainer._metrics["train"]


TRL_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
             "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


@pytest.mark.parametrize("config", [dict(loss_type=[t]) for t in TRL_TYPES] + [
    dict(loss_type=["sigmoid"], label_smoothing=0.3),  # TRL's sigmoid ignores ε
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    dict(loss_type=["sigmoid", "ipo"], use_weighting=True),  # (TRL's sft fails with use_weighting: in-place on
                                                             # an expanded tensor)
    dict(loss_type=["sigmoid"], f_divergence_type="forward_kl"),
    dict(loss_type=["ipo"], f_divergence_type="js_divergence"),
    dict(loss_type=["sigmoid_norm", "hinge"], f_divergence_type="alpha_divergence", f_alpha=0.5),
    dict(loss_type=["robust", "exo_pair"], f_divergence_type="alpha_divergence", f_alpha=2.0, label_smoothing=0.1),
])
def test_matches_trl_dpo_trainer(config):
    pytest.importorskip("trl")
    config = dict(config)
    if config["loss_type"] in (["exo_pair"], ["robust"], ["aot"], ["aot_unpaired"]):
        config.setdefault("label_smoothing", 1e-3 if config["loss_type"] == ["exo_pair"] else 0.2)
    # TRL's alpha-divergence clamp knows fp32 / bf16 / fp16 only
    fp32 = config.get("f_divergence_type") == "alpha_divergence"
    tol = dict(rtol=1e-5, atol=1e-7) if fp32 else dict(rtol=1e-7, atol=1e-9)
    tok, mask, ref, lss = (t.float() if fp32 and t.is_floating_point() else t for t in _token_inputs())
    want, want_grad, trl_metrics = _trl_dpo(tok, mask, ref, lss, beta=0.2, **config)
    kw = dict(loss_type=config["loss_type"], loss_weights=config.get("loss_weights"), beta=0.2,
              label_smoothing=config.get("label_smoothing", 0.0), f_divergence=config.get("f_divergence_type",
                                                                                          "reverse_kl"),
              f_alpha=config.get("f_alpha", 0.5))
    if config.get("use_weighting"):
        kw["pair_weights"] = wpo_weights(tok[0], lss[0], mask[0], tok[1], lss[1], mask[1])
    xs = [t.clone().requires_grad_() for t in tok.sum(2)]
    loss, metrics = dpo_loss(*xs, ref[0], ref[1], chosen_lengths=mask[0].sum(1), rejected_lengths=mask[1].sum(1), **kw)
    grads = torch.autograd.grad(loss, xs)
    # fp64 throughout, except the few constants TRL builds as fp32 tensors (EXO's ε, accuracies)
    torch.testing.assert_close(loss, want, **tol)
    # d loss / d token = d loss / d sequence sum, on the completion's tokens (TRL sums whole rows)
    for k in range(2):
        torch.testing.assert_close(grads[k][:, None] * mask[k], want_grad[k] * mask[k], **tol)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[name].item() == pytest.approx(trl_metrics[name][0], rel=tol["rtol"], abs=tol["atol"])


@pytest.mark.parametrize("trl_type,eps,cpo_alpha", [("sigmoid", 0.0, 1.0), ("sigmoid", 0.2, 0.5), ("simpo", 0.0, 0.0),
                                                    ("simpo", 0.1, 1.0)])
def test_matches_trl_cpo_trainer(trl_type, eps, cpo_alpha):
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    tok, mask, _, _ = _token_inputs(seed=1)
    sums, lengths = tok.sum(2), mask.sum(2)
    beta, gamma = (2.0, 1.4) if trl_type == "simpo" else (0.3, 0.5)
    trainer = SimpleNamespace(alpha=0.0, loss_type=trl_type, beta=beta, simpo_gamma=gamma, label_smoothing=eps,
                              accelerator=SimpleNamespace(device=torch.device("cpu")))
    xs = [t.clone().requires_grad_() for t in sums]
    logps = [x / n for x, n in zip(xs, lengths)] if trl_type == "simpo" else xs
    losses, chosen_rewards, _ = CPOTrainer.cpo_loss(trainer, *logps)
    want = losses.mean() + cpo_alpha * (-xs[0].sum() / lengths[0].sum())  # TRL's cross-entropy mean over chosen tokens
    want_grads = torch.autograd.grad(want, xs)
    ys = [t.clone().requires_grad_() for t in sums]
    if trl_type == "simpo":
        loss, metrics = dpo_loss(*ys, loss_type=["simpo", "sft"], loss_weights=[1.0, cpo_alpha], beta=beta,
                                 gamma_beta_ratio=gamma / beta, label_smoothing=eps, chosen_lengths=lengths[0],
                                 rejected_lengths=lengths[1])
    else:
        loss, metrics = dpo_loss(*ys, loss_type="cpo", cpo_alpha=cpo_alpha, beta=beta, label_smoothing=eps,
                                 chosen_lengths=lengths[0])
    torch.testing.assert_close(loss, want.detach(), rtol=1e-10, atol=1e-12)
    for got, exp in zip(torch.autograd.grad(loss, ys), want_grads):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards.mean())


def test_matches_trl_orpo_trainer():
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    tok, mask, _, _ = _token_inputs(seed=2)
    sums, lengths = tok.sum(2), mask.sum(2)
    trainer = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device=torch.device("cpu")))
    xs = [t.clone().requires_grad_() for t in sums]
    losses, chosen_rewards, *_ = ORPOTrainer.odds_ratio_loss(trainer, xs[0] / lengths[0], xs[1] / lengths[1])
    want = -xs[0].sum() / lengths[0].sum() - losses.mean()  # ORPOTrainer: policy_nll_loss - losses.mean()
    want_grads = torch.autograd.grad(want, xs)
    ys = [t.clone().requires_grad_() for t in sums]
    loss, metrics = dpo_loss(*ys, loss_type="orpo", beta=0.25, chosen_lengths=lengths[0], rejected_lengths=lengths[1])
    # TRL's odds_ratio_loss runs in fp32
    torch.testing.assert_close(loss, want.detach(), rtol=1e-6, atol=1e-7)
    for got, exp in zip(torch.autograd.grad(loss, ys), want_grads):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards.double().mean())


LIGER_TYPES = ["sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
               "discopop"]


@pytest.mark.parametrize("name", LIGER_TYPES)
def test_matches_liger_dpo_loss_function(name):
    pytest.importorskip("liger_kernel")
    from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction

    pc, pr, qc, qr, lc, lr = _pairs()
    eps = {"exo_pair": 1e-3, "robust": 0.2}.get(name, 0.0)
    xs = [t.clone().requires_grad_() for t in (pc, pr)]
    want, chosen_rewards, _ = LigerFusedLinearDPOFunction.preference_loss_fn(
        *xs, torch.zeros(2 * B), qc, qr, beta=0.3, loss_type=name, label_smoothing=eps)
    ys = [t.clone().requires_grad_() for t in (pc, pr)]
    loss, metrics = dpo_loss(*ys, qc, qr, loss_type=name, beta=0.3, label_smoothing=eps)
    # (Liger builds ε as an fp32 tensor)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-7, atol=1e-9)
    for got, exp in zip(torch.autograd.grad(loss, ys), torch.autograd.grad(want, xs)):
        torch.testing.assert_close(got, exp, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards.mean())


def _liger_batch(seed=0, n=3, width=7, hidden=16, vocab=29):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, width, hidden, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) / 4
    target = torch.randint(0, vocab, (2 * n, width), generator=g)
    lengths = torch.randint(2, width + 1, (2 * n,), generator=g)
    target[torch.arange(width)[None, :] >= lengths[:, None]] = -100
    return x, weight, target


def _our_sums(x, weight, target):
    """Per-sequence log-prob sums and lengths, chosen rows first: plain torch from the logits."""
    logp = torch.log_softmax(x @ weight.T, dim=-1)
    mask = target != -100
    tok = torch.gather(logp, 2, target.clamp(min=0)[..., None])[..., 0] * mask
    sums, lengths = tok.sum(1), mask.sum(1)
    n = x.shape[0] // 2
    return sums[:n], sums[n:], lengths[:n], lengths[n:]


@pytest.mark.parametrize("kind", ["dpo", "cpo", "simpo", "orpo"])
def test_matches_liger_fused_linear_losses_end_to_end(kind):
    pytest.importorskip("liger_kernel")
    import liger_kernel.chunked_loss as chunked

    x, weight, target = _liger_batch()
    ref_x, ref_weight = x + 0.1, weight * 0.9
    xs = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    if kind == "dpo":
        module = chunked.LigerFusedLinearDPOLoss(beta=0.2, compiled=False, use_ref_model=True)
        want = module(xs[1], xs[0], target, ref_input=ref_x, ref_weight=ref_weight)
    elif kind == "cpo":
        module = chunked.LigerFusedLinearCPOLoss(beta=0.2, alpha=0.7, label_smoothing=0.1, compiled=False)
        want = module(xs[1], xs[0], target)
    elif kind == "simpo":
        module = chunked.LigerFusedLinearSimPOLoss(beta=2.0, gamma=0.6, alpha=0.5, compiled=False)
        want = module(xs[1], xs[0], target)
    else:
        module = chunked.LigerFusedLinearORPOLoss(beta=0.2, compiled=False)
        want = module(xs[1], xs[0], target)
    want = want[0] if isinstance(want, tuple) else want
    want_grads = torch.autograd.grad(want, xs)
    ys = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    pc, pr, lc, lr = _our_sums(ys[0], ys[1], target)
    if kind == "dpo":
        with torch.no_grad():
            qc, qr, _, _ = _our_sums(ref_x, ref_weight, target)
        loss, _ = dpo_loss(pc, pr, qc, qr, beta=0.2)
    elif kind == "cpo":
        loss, _ = dpo_loss(pc, pr, loss_type="cpo", beta=0.2, cpo_alpha=0.7, label_smoothing=0.1, chosen_lengths=lc)
    elif kind == "simpo":
        loss, _ = dpo_loss(pc, pr, loss_type=["simpo", "sft"], loss_weights=[1.0, 0.5], beta=2.0,
                           gamma_beta_ratio=0.3, chosen_lengths=lc, rejected_lengths=lr)
    else:
        loss, _ = dpo_loss(pc, pr, loss_type="orpo", beta=0.2, chosen_lengths=lc, rejected_lengths=lr)
    torch.testing.assert_close(loss, want.detach().double(), rtol=1e-6, atol=1e-8)
    for got, exp in zip(torch.autograd.grad(loss, ys), want_grads):
        torch.testing.assert_close(got, exp.double(), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# Argument checks


def _bad_calls():
    pc, pr, qc, qr, lc, lr = _pairs(4)
    meta = torch.device("meta")
    nan = pc.clone()
    nan[1] = float("nan")
    return [
        (lambda: dpo_loss(pc, pr[:3], qc, qr), ValueError, "rejected_logps must hold one value per pair"),
        (lambda: dpo_loss(pc, pr, qc[:3], qr), ValueError, "ref_chosen_logps must hold one value per pair"),
        (lambda: dpo_loss(pc, pr, qc, qr, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr[:2]), ValueError,
         "rejected_lengths must hold one value per pair"),
        (lambda: dpo_loss(pc[None], pr, qc, qr), ValueError, "chosen_logps must be 1-D"),
        (lambda: dpo_loss(pc[:0], pr[:0], qc[:0], qr[:0]), ValueError, "chosen_logps must hold at least one pair"),
        (lambda: dpo_loss([1.0], pr, qc, qr), TypeError, "chosen_logps must be a torch.Tensor"),
        (lambda: dpo_loss(pc.long(), pr, qc, qr), ValueError, "chosen_logps must have dtype"),
        (lambda: dpo_loss(pc, pr.to(meta), qc, qr), ValueError, "rejected_logps must be on cpu"),
        (lambda: dpo_loss(pc, pr, loss_type="ipo"), ValueError, "ref_chosen_logps and ref_rejected_logps are required"),
        (lambda: dpo_loss(pc, pr, qc, None), ValueError, "pass both ref_chosen_logps and ref_rejected_logps"),
        (lambda: dpo_loss(pc, pr, qc, qr, loss_type="ipo"), ValueError, "chosen_lengths is required"),
        (lambda: dpo_loss(pc, pr, qc, qr, loss_type="ipo", chosen_lengths=lc), ValueError,
         "rejected_lengths is required"),
        (lambda: dpo_loss(pc, pr, loss_type="simpo", chosen_lengths=lc), ValueError, "rejected_lengths is required"),
        (lambda: dpo_loss(pc, pr, loss_type="sft"), ValueError, "chosen_lengths is required"),
        (lambda: dpo_loss(pc, pr, qc, qr, rpo_alpha=0.5), ValueError, "chosen_lengths is required"),
        (lambda: dpo_loss(pc, pr, qc, qr, loss_type="sft", chosen_lengths=-lc), ValueError,
         "chosen_lengths must be >= 0"),
        (lambda: dpo_loss(pc, pr, qc, qr, label_smoothing=0.5), ValueError, "label_smoothing must be finite and in"),
        (lambda: dpo_loss(pc, pr, qc, qr, label_smoothing=-0.1), ValueError, "label_smoothing must be finite and in"),
        (lambda: dpo_loss(pc, pr, qc, qr, loss_type="exo_pair"), ValueError, "label_smoothing must be > 0"),
        (lambda: dpo_loss(pc, pr, qc, qr, loss_type="kto"), ValueError, "loss_type 'kto' is unknown"),
        (lambda: dpo_loss(pc, pr, qc, qr, loss_type=[]), ValueError, "loss_type must name at least one"),
        (lambda: dpo_loss(pc, pr, qc, qr, loss_type=["sigmoid", "sigmoid"]), ValueError, "names a type twice"),
        (lambda: dpo_loss(pc, pr, qc, qr, loss_type=3), TypeError, "loss_type must be a str"),
        (lambda: dpo_loss(pc, pr, qc, qr, loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), ValueError,
         "loss_weights must hold one weight per loss type"),
        (lambda: dpo_loss(pc, pr, qc, qr, loss_weights=[math.nan]), ValueError, "loss_weights must be finite"),
        (lambda: dpo_loss(pc, pr, qc, qr, f_divergence="kl"), ValueError, "f_divergence must be one of"),
        (lambda: dpo_loss(pc, pr, qc, qr, loss_type="nca_pair", f_divergence="js"), ValueError,
         "f_divergence 'js' applies only to"),
        (lambda: dpo_loss(pc, pr, qc, qr, beta=0.0), ValueError, "beta must be finite and in"),
        (lambda: dpo_loss(pc, pr, qc, qr, beta="0.1"), TypeError, "beta must be a number"),
        (lambda: dpo_loss(pc, pr, qc, qr, discopop_tau=0.0), ValueError, "discopop_tau must be finite"),
        (lambda: dpo_loss(pc, pr, qc, qr, rpo_alpha=-1.0, chosen_lengths=lc), ValueError, "rpo_alpha must be finite"),
        (lambda: dpo_loss(nan, pr, qc, qr), ValueError, "chosen_logps must be finite"),
        (lambda: dpo_loss(pc, pr, qc, nan), ValueError, "ref_rejected_logps must be finite"),
        (lambda: dpo_loss(pc, pr, qc, qr, pair_beta=-torch.ones(4)), ValueError, "pair_beta must be > 0"),
        (lambda: dpo_loss(pc, pr, qc, qr, pair_beta=nan.abs()), ValueError, "pair_beta must be finite"),
        (lambda: dpo_loss(pc, pr, qc, qr, soft_labels=torch.full((4,), 1.5)), ValueError, "soft_labels must be in"),
        (lambda: dpo_loss(pc, pr, qc, qr, loss_type="ipo", soft_labels=torch.ones(4), chosen_lengths=lc,
                          rejected_lengths=lr), ValueError, "soft_labels apply only to"),
        (lambda: dpo_loss(pc, pr, qc, qr, pair_weights=-torch.ones(4)), ValueError, "pair_weights must be >= 0"),
        (lambda: dpo_loss(pc, pr, qc, qr, loss_type="aot", pair_weights=torch.ones(4)), ValueError,
         "pair_weights cannot be used with loss type aot"),
        (lambda: dpo_loss(pc, pr, qc, qr, chosen_nll=torch.ones(3)), ValueError, "chosen_nll must hold one value"),
        (lambda: dpo_loss(pc, pr, qc, qr, loss_type="bco_pair", bco_delta=torch.ones(2)), ValueError,
         "bco_delta must be a number or a one-element tensor"),
        (lambda: DPOLoss("sigmoid", bco_running_mean=True), ValueError, "bco_running_mean needs loss_type 'bco_pair'"),
        (lambda: DPOLoss("nope"), ValueError, "loss_type 'nope' is unknown"),
    ]


test_bad_arguments_are_refused = refusal_test(_bad_calls)


# ---------------------------------------------------------------------------------------------------
# DPOSettings: the options as one value


def test_settings_normalise_check_and_encode():
    from fastrl.losses import DPOSettings

    assert DPOSettings(f_divergence="js_divergence").f_divergence == "js"
    assert DPOSettings(f_divergence="alpha_divergence", f_alpha=0.5) == DPOSettings(f_divergence="alpha", f_alpha=0.5)
    assert DPOSettings(loss_type="ipo", f_divergence="js_divergence").f_div_id == 2
    s = DPOSettings(loss_type=["sigmoid", "sft", "cpo"], loss_weights=[1.0, 0.3, 0.5], cpo_alpha=0.4, rpo_alpha=0.2)
    assert s.loss_type == ("sigmoid", "sft", "cpo") and s.loss_weights == (1.0, 0.3, 0.5)
    assert DPOSettings.decode(*s.encode()) == s
    assert s.mask == sum(1 << LOSS_TYPES.index(t) for t in ("sigmoid", "sft", "cpo"))
    assert s.type_weights[LOSS_TYPES.index("sft")] == 0.3 and s.type_weights[LOSS_TYPES.index("ipo")] == 0.0
    assert s.nll_coef == pytest.approx(0.3 + 0.5 * 0.4) and s.reports_nll and s.needs_chosen_lengths
    assert s.needs_reference and not s.needs_rejected_lengths and s.f_div_id == 0
    assert not DPOSettings(loss_type=["simpo", "orpo"]).needs_reference
    assert DPOSettings(loss_type=["aot", "sigmoid"]).sorted_types == ("aot",)
    assert DPOSettings(f_divergence="alpha", f_alpha=1.0).f_div_id == 0  # the α → 1 limit
    with pytest.raises(ValueError, match="loss_type 'kto' is unknown"):
        DPOSettings(loss_type="kto")
    with pytest.raises(ValueError, match="loss_weights must hold one weight per loss type"):
        DPOSettings(loss_type=["sigmoid", "ipo"], loss_weights=[1.0])


def test_settings_and_keywords_are_the_same_call():
    from fastrl.losses import DPOSettings

    pc, pr, qc, qr, lc, lr = _pairs()
    kw = dict(loss_type=["sigmoid", "ipo", "bco_pair"], loss_weights=[1.0, 0.2, 0.5], beta=0.2, bco_delta=0.3)
    want, want_metrics = dpo_loss(pc, pr, qc, qr, chosen_lengths=lc, rejected_lengths=lr, **kw)
    s = DPOSettings(**kw)
    got, metrics = dpo_loss(pc, pr, qc, qr, chosen_lengths=lc, rejected_lengths=lr, settings=s)
    assert torch.equal(got, want) and metrics.keys() == want_metrics.keys()
    # bco_delta as a one-element tensor replaces the setting
    tensor_delta = dpo_loss(pc, pr, qc, qr, chosen_lengths=lc, rejected_lengths=lr, settings=s.replace(bco_delta=0.0),
                            bco_delta=torch.tensor(0.3, dtype=torch.float64))[0]
    torch.testing.assert_close(tensor_delta, want)
    for module in (DPOLoss(settings=s), DPOLoss(kw["loss_type"], **{k: v for k, v in kw.items() if k != "loss_type"})):
        assert module.settings == s
        assert torch.equal(module(pc, pr, qc, qr, chosen_lengths=lc, rejected_lengths=lr)[0], want)
    with pytest.raises(TypeError, match=r"dpo_loss\(\) got an unexpected keyword argument 'bta' \(did you mean 'beta'"):
        dpo_loss(pc, pr, qc, qr, bta=0.2)
    with pytest.raises(TypeError, match="not both"):
        dpo_loss(pc, pr, qc, qr, settings=s, beta=0.2)
    with pytest.raises(TypeError, match="settings must be a DPOSettings"):
        DPOLoss(settings=dict(beta=0.2))


def test_one_torch_backward_path_eager_and_compiled(monkeypatch):
    """The torch path's gradient, eager or compiled, is the vjp of torch_impl.dpo.dpo_loss_stats taken in the
    operator's backward (one path, no second autograd.Function)."""
    calls = []
    real = OP._torch_grads

    def counting(grad, pairs, settings):
        calls.append(settings.loss_type)
        return real(grad, pairs, settings)

    monkeypatch.setattr(OP, "_torch_grads", counting)
    pc, pr, qc, qr, lc, lr = _pairs()

    def step(a, b):
        return dpo_loss(a, b, qc, qr, loss_type=["sigmoid", "aot"], loss_weights=[1.0, 0.5], label_smoothing=0.1)[0]

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        xs = [pc.clone().requires_grad_(), pr.clone().requires_grad_()]
        with backend("torch"):
            fn(*xs).backward()
        grads.append([x.grad for x in xs])
    assert calls == [("sigmoid", "aot")] * 2
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want)


def test_stat_layout_is_shared_and_needs_no_triton():
    import subprocess
    import sys

    from fastrl.kernels import dpo_columns
    from fastrl.kernels import dpo_loss as kernels
    from fastrl.losses.torch_impl import dpo as torch_dpo

    assert torch_dpo.DPO_STATS is dpo_columns.DPO_STATS and OP.LOSS_TYPES is dpo_columns.LOSS_TYPES
    assert kernels.NSTAT == len(dpo_columns.PARTIALS) <= dpo_columns.NSTAT_PAD
    assert set(dpo_columns.GRAD_ROWS) <= set(OP.PairTensors._fields) and OP.DIFFERENTIABLE == dpo_columns.GRAD_ROWS
    code = ("import sys; sys.modules['triton'] = None; import fastrl.kernels.dpo_columns, "
            "fastrl.losses.torch_impl.dpo; assert 'fastrl.kernels.launch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_op_schema_is_made_from_the_pair_tensors():
    schema = str(torch.ops.fastrl.dpo_loss.default._schema)
    for name in OP.PairTensors._fields:
        assert f" {name}," in schema
    assert "int[] ints, float[] floats" in schema
