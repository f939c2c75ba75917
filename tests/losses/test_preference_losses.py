"""fastrl.losses.preference: listwise (LiPO-λ, Plackett–Luce), unpaired (KTO, BCO) and reward-model
(Bradley–Terry) losses against fp64 formulas written here, one list / one completion at a time,
with gradients; against TRL 1.16 and Liger-Kernel where installed; module forms; argument checks."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from fastrl.losses.preference import (BCOLoss, BradleyTerryLoss, KTOLoss, LiPOLoss, PlackettLuceLoss, RunningMean,
                                      bco_loss, bradley_terry_loss, kto_loss, lipo_loss, plackett_luce_loss)
from conftest import refusal_test


def _lists(n=4, k=5, seed=0):
    """Policy / reference log-probs and scores [n, k]; list 1 has two tied scores, list 2 only 3
    valid items, list 3 only 2."""
    g = torch.Generator().manual_seed(seed)
    pi = -30 * torch.rand(n, k, generator=g, dtype=torch.float64)
    ref = pi + 2 * torch.randn(n, k, generator=g, dtype=torch.float64)
    psi = torch.rand(n, k, generator=g, dtype=torch.float64)
    mask = torch.ones(n, k, dtype=torch.bool)
    if k == 5:
        psi[1, 3] = psi[1, 0]
        mask[2, 3:] = False
        mask[3, [0, 2, 4]] = False
    return pi, ref, psi, mask


def _lipo_by_hand(pi, ref, psi, mask, beta, weighting="lambda", rank_by="policy"):
    """One list at a time in Python floats (the gradient comes from torch ops on the same values)."""
    total = 0
    for row in range(pi.shape[0]):
        items = [k for k in range(pi.shape[1]) if mask[row, k]]
        s = {k: beta * (pi[row, k] - ref[row, k]) for k in items}
        key = {k: float(s[k].detach()) if rank_by == "policy" else float(psi[row, k]) for k in items}
        order = sorted(items, key=lambda k: (-key[k], k))
        rank = {k: order.index(k) + 1 for k in items}
        loss = 0
        for i, j in itertools.permutations(items, 2):
            if psi[row, i] > psi[row, j]:
                if weighting == "lambda":
                    gain = abs(2 ** float(psi[row, i]) - 2 ** float(psi[row, j]))
                    delta = gain * abs(1 / math.log(1 + rank[i]) - 1 / math.log(1 + rank[j]))
                else:
                    delta = 1.0
                loss = loss - delta * torch.nn.functional.logsigmoid(s[i] - s[j])
        total = total + loss
    return total / pi.shape[0]


def _plackett_luce_by_hand(pi, ref, psi, mask, beta):
    total = 0
    for row in range(pi.shape[0]):
        items = sorted((k for k in range(pi.shape[1]) if mask[row, k]), key=lambda k: (-float(psi[row, k]), k))
        s = [beta * (pi[row, k] - ref[row, k]) for k in items]
        for k in range(len(s)):
            total = total - (s[k] - torch.logsumexp(torch.stack(s[k:]), 0))
    return total / pi.shape[0]


@pytest.mark.parametrize("weighting,rank_by", [("lambda", "policy"), ("lambda", "scores"), ("uniform", "policy")])
def test_lipo_matches_the_formula(weighting, rank_by):
    pi, ref, psi, mask = _lists()
    x = pi.clone().requires_grad_()
    want = _lipo_by_hand(x, ref, psi, mask, 0.5, weighting, rank_by)
    (want_grad,) = torch.autograd.grad(want, x)
    y = pi.clone().requires_grad_()
    loss, metrics = lipo_loss(y, ref, psi, mask, beta=0.5, weighting=weighting, rank_by=rank_by)
    (grad,) = torch.autograd.grad(loss, y)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    assert (grad[~mask] == 0).all()
    assert 0 <= metrics["rewards/accuracies"] <= 1


def test_lipo_uniform_on_two_items_is_dpo():
    pi, ref, _, _ = _lists(n=6, k=2)
    psi = torch.tensor([[1.0, 0.0]] * 6, dtype=torch.float64)
    loss, _ = lipo_loss(pi, ref, psi, beta=0.1, weighting="uniform")
    from fastrl.losses.dpo import dpo_loss

    want, _ = dpo_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], beta=0.1)
    torch.testing.assert_close(loss, want)


def test_plackett_luce_matches_the_formula_and_is_dpo_for_two():
    pi, ref, psi, mask = _lists()
    x = pi.clone().requires_grad_()
    want = _plackett_luce_by_hand(x, ref, psi, mask, 0.3)
    (want_grad,) = torch.autograd.grad(want, x)
    y = pi.clone().requires_grad_()
    loss, _ = plackett_luce_loss(y, ref, psi, mask, beta=0.3)
    (grad,) = torch.autograd.grad(loss, y)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()
    from fastrl.losses.dpo import dpo_loss

    p2, r2, _, _ = _lists(n=5, k=2, seed=1)
    psi2 = torch.tensor([[0.0, 1.0]] * 5, dtype=torch.float64)  # the second item is preferred
    torch.testing.assert_close(plackett_luce_loss(p2, r2, psi2, beta=0.2)[0],
                               dpo_loss(p2[:, 1], p2[:, 0], r2[:, 1], r2[:, 0], beta=0.2)[0])


def test_listwise_reference_free_and_modules():
    pi, ref, psi, mask = _lists()
    torch.testing.assert_close(lipo_loss(pi, None, psi, mask)[0], lipo_loss(pi, torch.zeros_like(pi), psi, mask)[0])
    torch.testing.assert_close(LiPOLoss(beta=0.2, rank_by="scores")(pi, ref, psi, mask)[0],
                               lipo_loss(pi, ref, psi, mask, beta=0.2, rank_by="scores")[0])
    torch.testing.assert_close(PlackettLuceLoss(beta=0.2)(pi, ref, psi, mask)[0],
                               plackett_luce_loss(pi, ref, psi, mask, beta=0.2)[0])


# ---------------------------------------------------------------------------------------------------
# Unpaired


def _unpaired(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    pi = -20 * torch.rand(n, generator=g, dtype=torch.float64)
    ref = pi + 3 * torch.randn(n, generator=g, dtype=torch.float64)
    labels = torch.rand(n, generator=g) > 0.4
    kl_pi = -20 * torch.rand(n, generator=g, dtype=torch.float64)
    kl_ref = kl_pi - 1 - torch.rand(n, generator=g, dtype=torch.float64)
    return pi, ref, labels, kl_pi, kl_ref


def _sigmoid(x):
    return 1 / (1 + torch.exp(-x))


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_matches_the_formula(loss_type):
    pi, ref, labels, kl_pi, kl_ref = _unpaired()
    beta, wd, wu = 0.2, 1.3, 0.7
    z0 = max(0.0, float((kl_pi - kl_ref).mean()))
    x = pi.clone().requires_grad_()
    terms = []
    for i in range(len(pi)):
        r = x[i] - ref[i]
        if loss_type == "kto":
            terms.append(wd * (1 - _sigmoid(beta * (r - z0))) if labels[i] else wu * (1 - _sigmoid(beta * (z0 - r))))
        else:
            terms.append(1 - _sigmoid(beta * r) if labels[i] else _sigmoid(beta * r))
    want = sum(terms) / len(terms)
    (want_grad,) = torch.autograd.grad(want, x)
    y = pi.clone().requires_grad_()
    kw = dict(desirable_weight=wd, undesirable_weight=wu) if loss_type == "kto" else {}
    loss, metrics = kto_loss(y, ref, labels, kl_logps=kl_pi, ref_kl_logps=kl_ref, beta=beta, loss_type=loss_type, **kw)
    (grad,) = torch.autograd.grad(loss, y)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-13)
    assert metrics["kl"].item() == pytest.approx(z0)
    torch.testing.assert_close(metrics["rewards/chosen"], (beta * (pi - ref))[labels].mean())
    torch.testing.assert_close(metrics["rewards/rejected"], (beta * (pi - ref))[~labels].mean())
    # a given kl is used as is; without either, z0 = 0
    torch.testing.assert_close(kto_loss(pi, ref, labels, kl=-0.5)[0],
                               kto_loss(pi, ref, labels, kl=torch.tensor(-0.5, dtype=torch.float64))[0])
    torch.testing.assert_close(kto_loss(pi, ref, labels)[0], kto_loss(pi, ref, labels, kl=0.0)[0])
    module = KTOLoss(beta=beta, loss_type=loss_type, **kw)
    torch.testing.assert_close(module(pi, ref, labels, kl_logps=kl_pi, ref_kl_logps=kl_ref)[0], want.detach())


def test_bco_matches_the_formula_and_keeps_a_running_mean():
    pi, ref, labels, _, _ = _unpaired()
    beta, delta = 0.2, 0.35
    x = pi.clone().requires_grad_()
    terms = []
    for i in range(len(pi)):
        r = beta * (x[i] - ref[i])
        terms.append(-torch.nn.functional.logsigmoid(r - delta) if labels[i]
                     else -torch.nn.functional.logsigmoid(-(r - delta)))
    want = sum(terms) / len(terms)
    y = pi.clone().requires_grad_()
    loss, metrics = bco_loss(y, ref, labels, beta=beta, delta=delta)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss, y)[0], torch.autograd.grad(want, x)[0], rtol=1e-10,
                               atol=1e-13)
    # TRL's RunningMoments mean: count-weighted over every reward seen, updated before the loss
    module = BCOLoss(beta=beta)
    seen = []
    for seed in range(3):
        p, r, lab, _, _ = _unpaired(n=6 + seed, seed=seed)
        seen.append(beta * (p - r))
        got, m = module(p, r, lab)
        want_delta = torch.cat(seen).mean()
        torch.testing.assert_close(m["delta"], want_delta)
        torch.testing.assert_close(got, bco_loss(p, r, lab, beta=beta, delta=want_delta)[0])
    module.eval()
    before = module.running.mean.clone()
    module(pi, ref, labels)
    assert torch.equal(module.running.mean, before)
    state = module.state_dict()
    assert set(state) == {"running.mean", "running.count"}


def test_running_mean_state():
    rm = RunningMean()
    rm.update(torch.tensor([1.0, 2.0, 3.0]))
    rm.update(torch.tensor([10.0]))
    assert rm.mean.item() == pytest.approx(4.0) and rm.count.item() == 4
    rm.update(torch.tensor([]))
    assert rm.count.item() == 4


# ---------------------------------------------------------------------------------------------------
# Bradley–Terry


def test_bradley_terry_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    rc, rr = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    margin = torch.rand(8, generator=g, dtype=torch.float64)
    x, y = rc.clone().requires_grad_(), rr.clone().requires_grad_()
    want = sum(-_log_sigmoid_t(x[i] - y[i] - margin[i]) for i in range(8)) / 8 + 0.01 * ((x + y) ** 2).mean()
    a, b = rc.clone().requires_grad_(), rr.clone().requires_grad_()
    loss, metrics = bradley_terry_loss(a, b, margin, center_rewards_coefficient=0.01)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)
    for got, exp in zip(torch.autograd.grad(loss, (a, b)), torch.autograd.grad(want, (x, y))):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-13)
    assert metrics["rewards/accuracies"].item() == pytest.approx(float((rc > rr).double().mean()))
    half = torch.full((8,), 0.5, dtype=torch.float64)
    torch.testing.assert_close(bradley_terry_loss(rc, rr, 0.5)[0], bradley_terry_loss(rc, rr, half)[0])
    torch.testing.assert_close(BradleyTerryLoss()(rc, rr)[0], bradley_terry_loss(rc, rr)[0])


def _log_sigmoid_t(x):
    return -torch.log1p(torch.exp(-x))


# ---------------------------------------------------------------------------------------------------
# TRL 1.16 and Liger-Kernel, where installed


def test_kto_matches_trl_kto_trainer():
    pytest.importorskip("trl")
    from trl.trainer.kto_trainer import KTOTrainer

    g = torch.Generator().manual_seed(3)
    n, width = 6, 9
    tok = -(0.1 + torch.rand(n, width, generator=g, dtype=torch.float64))
    kl_tok = -(0.1 + torch.rand(n, width, generator=g, dtype=torch.float64))
    labels = torch.tensor([True, False, True, True, False, False])
    ref, ref_kl = tok.sum(1) + torch.randn(n, generator=g, dtype=torch.float64), kl_tok.sum(1) - 2.0
    main = tok.clone().requires_grad_()
    ids, kl_ids = torch.zeros(n, width + 1, dtype=torch.long), torch.ones(n, width + 1, dtype=torch.long)

    def model(input_ids, **kwargs):
        return SimpleNamespace(log_probs=kl_tok if input_ids is kl_ids else main, entropy=torch.zeros(n, width),
                               mean_logits=torch.zeros(n, width))

    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator, calculate_KL=True,
                              aux_loss_enabled=False, precompute_ref_logps=True, loss_type="kto", beta=0.3,
                              desirable_weight=1.2, undesirable_weight=0.8, args=SimpleNamespace(),
                              _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    trainer._compute_kl_logps = lambda m, batch: KTOTrainer._compute_kl_logps(trainer, m, batch)
    ones = torch.ones(n, width + 1, dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": ones, "completion_mask": ones, "KL_input_ids": kl_ids,
              "KL_attention_mask": ones, "KL_completion_mask": ones, "label": labels, "ref_logps": ref,
              "ref_KL_logps": ref_kl}
    want = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    (want_grad,) = torch.autograd.grad(want, main)
    x = tok.sum(1).clone().requires_grad_()
    loss, metrics = kto_loss(x, ref, labels, kl_logps=kl_tok.sum(1), ref_kl_logps=ref_kl, beta=0.3,
                             desirable_weight=1.2, undesirable_weight=0.8)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss, x)[0][:, None].expand(n, width), want_grad, rtol=1e-9,
                               atol=1e-12)
    trl_metrics = trainer._metrics["train"]
    for name in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics[name].item() == pytest.approx(trl_metrics[name][0], rel=1e-9)


def test_bradley_terry_matches_trl_reward_trainer():
    pytest.importorskip("trl")
    from trl.trainer.reward_trainer import RewardTrainer

    g = torch.Generator().manual_seed(4)
    rewards = torch.randn(10, 1, generator=g, dtype=torch.float64).requires_grad_()
    margin = torch.rand(5, generator=g, dtype=torch.float64)
    trainer = SimpleNamespace(model=SimpleNamespace(training=True),
                              args=SimpleNamespace(center_rewards_coefficient=0.1),
                              accelerator=SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x),
                              _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"attention_mask": torch.ones(10, 3, dtype=torch.long), "margin": margin}
    want = RewardTrainer.compute_loss(trainer, lambda **kw: SimpleNamespace(logits=rewards), inputs)
    x = rewards.detach()[:, 0].clone().requires_grad_()
    loss, metrics = bradley_terry_loss(x[:5], x[5:], margin, center_rewards_coefficient=0.1)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(want, rewards)[0][:, 0])
    assert metrics["rewards/accuracies"].item() == pytest.approx(trainer._metrics["train"]["accuracy"][0])
    assert metrics["rewards/margins"].item() == pytest.approx(trainer._metrics["train"]["margin"][0])


def test_kto_matches_liger():
    pytest.importorskip("liger_kernel")
    from liger_kernel.chunked_loss import LigerFusedLinearKTOLoss
    from liger_kernel.chunked_loss.kto_loss import LigerFusedLinearKTOFunction

    pi, ref, labels, _, _ = _unpaired()
    want, *_ = LigerFusedLinearKTOFunction.preference_loss_fn(pi, labels, torch.zeros(len(pi)), ref, beta=0.2,
                                                              kl=torch.tensor(0.4, dtype=torch.float64))
    torch.testing.assert_close(kto_loss(pi, ref, labels, kl=0.4, beta=0.2)[0], want, rtol=1e-12, atol=1e-12)
    # the fused-linear module end to end, with per-sequence sums taken here from the logits
    g = torch.Generator().manual_seed(5)
    n, width, hidden, vocab = 6, 7, 12, 23
    x = torch.randn(n, width, hidden, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) / 4
    target = torch.randint(0, vocab, (n, width), generator=g)
    target[:, 5:] = -100
    ref_x, ref_w = x + 0.1, weight * 0.9
    xs = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    module = LigerFusedLinearKTOLoss(beta=0.2, compiled=False, use_ref_model=True)
    want = module(xs[0], xs[1], target, preference_labels=labels[:n], ref_input=ref_x, ref_weight=ref_w,
                  kl=torch.tensor(0.3, dtype=torch.float64))
    want = want[0] if isinstance(want, tuple) else want

    def sums(h, w):
        logp = torch.log_softmax(h @ w.T, dim=-1)
        mask = target != -100
        return (torch.gather(logp, 2, target.clamp(min=0)[..., None])[..., 0] * mask).sum(1)

    ys = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    loss, _ = kto_loss(sums(*ys), sums(ref_x, ref_w).detach(), labels[:n], kl=0.3, beta=0.2)
    torch.testing.assert_close(loss, want.detach().double(), rtol=1e-6, atol=1e-8)
    for got, exp in zip(torch.autograd.grad(loss, ys), torch.autograd.grad(want, xs)):
        torch.testing.assert_close(got, exp.double(), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# Argument checks


def _bad_calls():
    pi, ref, psi, mask = _lists()
    p, r, labels, kl_p, kl_r = _unpaired()
    nan = pi.clone()
    nan[0, 0] = float("nan")
    return [
        (lambda: lipo_loss(pi, ref, psi[:, :3]), ValueError, "scores must have the shape of policy_logps"),
        (lambda: lipo_loss(pi, ref[:2], psi), ValueError, "ref_logps must have the shape of policy_logps"),
        (lambda: lipo_loss(pi[:, :1], ref[:, :1], psi[:, :1]), ValueError, "K >= 2"),
        (lambda: lipo_loss(pi[0], ref[0], psi[0]), ValueError, "policy_logps must be 2-D"),
        (lambda: lipo_loss(pi, ref, psi, mask.int()), ValueError, "mask must have dtype bool"),
        (lambda: lipo_loss(pi, ref, psi, weighting="ndcg"), ValueError, "weighting must be one of"),
        (lambda: lipo_loss(pi, ref, psi, rank_by="reward"), ValueError, "rank_by must be one of"),
        (lambda: lipo_loss(nan, ref, psi), ValueError, "policy_logps must be finite"),
        (lambda: plackett_luce_loss(pi, ref, psi, beta=-1.0), ValueError, "beta must be finite and in"),
        (lambda: plackett_luce_loss(pi, ref, nan), ValueError, "scores must be finite"),
        (lambda: kto_loss(p, r[:3], labels), ValueError, "ref_logps must have the shape of policy_logps"),
        (lambda: kto_loss(p, r, labels.int()), ValueError, "labels must have dtype bool"),
        (lambda: kto_loss(p, r, labels, loss_type="sigmoid"), ValueError, "loss_type must be one of"),
        (lambda: kto_loss(p, r, labels, kl_logps=kl_p), ValueError, "pass both kl_logps and ref_kl_logps"),
        (lambda: kto_loss(p, r, labels, kl_logps=kl_p, ref_kl_logps=kl_r[:2]), ValueError,
         "ref_kl_logps must have the shape of kl_logps"),
        (lambda: kto_loss(p, r, labels, kl=0.1, kl_logps=kl_p, ref_kl_logps=kl_r), ValueError, "pass kl or kl_logps"),
        (lambda: kto_loss(p, r, labels, kl=torch.ones(2)), ValueError, "kl must be a number or a one-element"),
        (lambda: kto_loss(p, r, labels, desirable_weight=-1.0), ValueError, "desirable_weight must be finite"),
        (lambda: kto_loss(p * math.nan, r, labels), ValueError, "policy_logps must be finite"),
        (lambda: kto_loss(p[:0], r[:0], labels[:0]), ValueError, "at least one completion"),
        (lambda: bco_loss(p, r, labels, delta=math.inf), ValueError, "delta must be finite"),
        (lambda: bco_loss(p, r, labels[:2]), ValueError, "labels must have the shape of policy_logps"),
        (lambda: bradley_terry_loss(p, r[:2]), ValueError, "rejected_rewards must have the shape of chosen_rewards"),
        (lambda: bradley_terry_loss(p, r, torch.ones(3)), ValueError, "margin must have the shape of chosen_rewards"),
        (lambda: bradley_terry_loss(p, r * math.nan), ValueError, "rejected_rewards must be finite"),
        (lambda: bradley_terry_loss(p.long(), r), ValueError, "chosen_rewards must have dtype"),
        (lambda: bradley_terry_loss(p, r, center_rewards_coefficient=-1.0), ValueError,
         "center_rewards_coefficient must be finite"),
        (lambda: KTOLoss(loss_type="bco"), ValueError, "loss_type must be one of"),
        (lambda: LiPOLoss(weighting="x"), ValueError, "weighting must be one of"),
        (lambda: BCOLoss(beta=0.0), ValueError, "beta must be finite and in"),
    ]


test_bad_arguments_are_refused = refusal_test(_bad_calls)
