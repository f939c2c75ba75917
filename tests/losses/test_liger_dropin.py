"""fastrl.losses.liger: Liger-Kernel's fused-linear GRPO / DPO losses as drop-ins.

Always run: the constructor and forward signatures against Liger-Kernel 0.8.5's (written out here), the
mapping of Liger's keywords to fastrl's settings, the errors, fastrl's own classes refusing a peer's
keyword with fastrl's name for it, the values against plain-torch formulas of Liger's maths, and hidden
sizes that are not a multiple of 16. Where liger_kernel imports (``PYTHONPATH=/tmp/peers`` or an install):
loss, metrics and gradients equal to Liger's own classes across loss types, beta, reference models and
DPO variants.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

from fastrl.losses import (DPOLoss, DPOSettings, FusedLinearDPOLoss, FusedLinearGRPOLoss, GRPOLoss, GRPOSettings,
                           fused_linear_dpo_loss, fused_linear_grpo_loss, grpo_loss)
from fastrl.losses.liger import DPO_KEYWORDS, GRPO_KEYWORDS, LigerFusedLinearDPOLoss, LigerFusedLinearGRPOLoss
from fastrl.ops import fused_linear_logprobs

# Liger-Kernel 0.8.5's signatures (liger_kernel/chunked_loss/grpo_loss.py, dpo_loss.py), without self
LIGER_GRPO_INIT = [("beta", 0.04), ("compiled", True), ("use_ref_model", True), ("chunk_size", 1),
                   ("epsilon_low", 0.2), ("epsilon_high", 0.2), ("loss_type", "dapo"), ("max_completion_length", None),
                   ("importance_sampling_level", "token"), ("sapo_temperature_pos", 1.0),
                   ("sapo_temperature_neg", 1.05), ("temperature", 1.0), ("delta", None),
                   ("use_bias_correction_kl", False), ("vespo_k_pos", 2.0), ("vespo_lambda_pos", 3.0),
                   ("vespo_k_neg", 3.0), ("vespo_lambda_neg", 2.0)]
LIGER_GRPO_FORWARD = ["_input", "lin_weight", "selected_token_ids", "attention_mask", "advantages", "bias",
                      "ref_per_token_logps", "old_per_token_logps", "ref_input", "ref_weight", "ref_bias",
                      "vllm_is_ratio", "num_items_in_batch"]
LIGER_DPO_INIT = [("ignore_index", -100), ("beta", 0.1), ("alpha", 1.0), ("compute_nll_loss", False),
                  ("compiled", True), ("use_ref_model", True), ("average_log_prob", False), ("chunk_size", 1),
                  ("loss_type", "sigmoid"), ("label_smoothing", 0.0), ("discopop_tau", 0.05)]
LIGER_DPO_FORWARD = ["lin_weight", "_input", "target", "bias", "ref_input", "ref_weight", "ref_bias"]
DPO_TYPES = ["sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
             "discopop"]


def _params(fn):
    return [(p.name, p.default) for p in list(inspect.signature(fn).parameters.values())[1:]]


def _liger():
    return pytest.importorskip("liger_kernel.chunked_loss")


# ---------------------------------------------------------------------------------------------------
# batches


def _grpo_batch(seed=0, b=4, t=6, h=32, v=50, full=False, bias=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, h, generator=g)
    w = torch.randn(v, h, generator=g) / 4
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if not full:
        mask[0, 4:] = 0
        mask[2, 2:] = 0
    adv = torch.linspace(-1.2, 1.0, b)[torch.randperm(b, generator=g)]
    with torch.no_grad():
        logits = x @ w.T
        lp = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    old = lp + 0.3 * torch.randn(b, t, generator=g)
    ref = lp + 0.2 * torch.randn(b, t, generator=g)
    extra = dict(bias=torch.randn(v, generator=g) / 2) if bias else {}
    return dict(x=x, w=w, ids=ids, mask=mask, adv=adv, old=old, ref=ref, **extra)


def _dpo_batch(seed=0, n=3, t=7, h=32, v=29):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, t, h, generator=g)
    w = torch.randn(v, h, generator=g) / 4
    target = torch.randint(0, v, (2 * n, t), generator=g)
    lengths = torch.randint(2, t + 1, (2 * n,), generator=g)
    target[torch.arange(t)[None, :] >= lengths[:, None]] = -100
    return x, w, target, torch.randn(v, generator=g) / 2


def _leaves(*tensors):
    return [None if t is None else t.clone().requires_grad_(True) for t in tensors]


def _grads(loss, leaves):
    present = [t for t in leaves if t is not None]
    return torch.autograd.grad(loss, present)


def _grpo_call(module, batch, *, with_ref=True, with_old=True, ref_input=False, **kwargs):
    x, w, b = _leaves(batch["x"], batch["w"], batch.get("bias"))
    ref_kw = {}
    if ref_input:
        ref_kw = dict(ref_input=batch["x"] + 0.1, ref_weight=batch["w"] * 0.9)
    elif with_ref:
        ref_kw = dict(ref_per_token_logps=batch["ref"])
    loss, metrics = module(x, w, batch["ids"], batch["mask"], batch["adv"], b,
                           old_per_token_logps=batch["old"] if with_old else None, **ref_kw, **kwargs)
    return loss.detach(), [m.detach() for m in metrics], _grads(loss, [x, w, b])


def _assert_same(got, want, rtol=1e-4, atol=1e-5):
    (loss, metrics, grads), (want_loss, want_metrics, want_grads) = got, want
    torch.testing.assert_close(loss, want_loss.float(), rtol=rtol, atol=atol)
    assert len(metrics) == len(want_metrics)
    for m, e in zip(metrics, want_metrics):
        torch.testing.assert_close(torch.as_tensor(m).float(), torch.as_tensor(e).float(), rtol=rtol, atol=atol)
    assert len(grads) == len(want_grads)
    for g, e in zip(grads, want_grads):
        torch.testing.assert_close(g, e.to(g.dtype), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------------
# signatures and the keyword mapping (always run)


def test_signatures_are_liger_0_8_5s():
    assert _params(LigerFusedLinearGRPOLoss.__init__) == LIGER_GRPO_INIT
    assert [n for n, _ in _params(LigerFusedLinearGRPOLoss.forward)] == LIGER_GRPO_FORWARD
    assert _params(LigerFusedLinearDPOLoss.__init__) == LIGER_DPO_INIT
    assert [n for n, _ in _params(LigerFusedLinearDPOLoss.forward)] == LIGER_DPO_FORWARD
    assert set(GRPO_KEYWORDS) == {n for n, _ in LIGER_GRPO_INIT}
    assert set(DPO_KEYWORDS) == {n for n, _ in LIGER_DPO_INIT}


def test_signatures_equal_the_installed_liger():
    chunked = _liger()
    for ours, theirs in ((LigerFusedLinearGRPOLoss, chunked.LigerFusedLinearGRPOLoss),
                         (LigerFusedLinearDPOLoss, chunked.LigerFusedLinearDPOLoss)):
        assert _params(ours.__init__) == _params(theirs.__init__)
        assert [n for n, _ in _params(ours.forward)] == [n for n, _ in _params(theirs.forward)]


def test_grpo_keywords_map_to_fastrl_settings():
    assert LigerFusedLinearGRPOLoss().settings == GRPOSettings(beta=0.04, loss_type="dapo", epsilon=0.2,
                                                               epsilon_high=0.2)
    module = LigerFusedLinearGRPOLoss(beta=0.1, epsilon_low=0.1, epsilon_high=0.28, loss_type="sapo",
                                      sapo_temperature_pos=0.9, sapo_temperature_neg=1.2, delta=1.5,
                                      use_bias_correction_kl=True, vespo_k_pos=1.5, vespo_k_neg=2.5,
                                      vespo_lambda_pos=3.5, vespo_lambda_neg=1.5, max_completion_length=64,
                                      temperature=0.7, compiled=False, chunk_size=8)
    assert module.settings == GRPOSettings(beta=0.1, epsilon=0.1, epsilon_high=0.28, loss_type="sapo",
                                           sapo_tau_pos=0.9, sapo_tau_neg=1.2, delta=1.5,
                                           use_bias_correction_kl=True, vespo_k=(1.5, 2.5),
                                           vespo_lambda=(3.5, 1.5), max_completion_length=64, kl="k3")
    # Liger's attributes keep Liger's names
    assert (module.epsilon_low, module.sapo_temperature_neg, module.temperature, module.chunk_size) == \
        (0.1, 1.2, 0.7, 8)


def test_dpo_keywords_map_to_fastrl_settings():
    assert LigerFusedLinearDPOLoss().settings == DPOSettings(loss_type="sigmoid", beta=0.1)
    module = LigerFusedLinearDPOLoss(beta=0.3, compute_nll_loss=True, alpha=0.7, loss_type="robust",
                                     label_smoothing=0.2)
    assert module.settings == DPOSettings(loss_type=["robust", "sft"], loss_weights=[1.0, 0.7], beta=0.3,
                                          label_smoothing=0.2)
    # label_smoothing is read by robust / exo_pair only (Liger's sigmoid ignores it, any value)
    assert LigerFusedLinearDPOLoss(label_smoothing=0.7).settings.label_smoothing == 0.0
    assert LigerFusedLinearDPOLoss(loss_type="discopop", discopop_tau=0.2).settings.discopop_tau == 0.2


@pytest.mark.parametrize("make,match", [
    (lambda: LigerFusedLinearGRPOLoss(sapo_temperature_pos=0.0), "sapo_temperature_pos must be positive"),
    (lambda: LigerFusedLinearGRPOLoss(sapo_temperature_neg=-1.0), "sapo_temperature_neg must be positive"),
    (lambda: LigerFusedLinearGRPOLoss(delta=0.0), "delta must be positive"),
    (lambda: LigerFusedLinearGRPOLoss(delta=0.9), "delta"),  # fastrl: > 1
    (lambda: LigerFusedLinearGRPOLoss(loss_type="dr_grpo"), "max_completion_length must be provided"),
    (lambda: LigerFusedLinearGRPOLoss(loss_type="cispo", importance_sampling_level="sequence"),
     "Sequence-level importance sampling is not supported"),
    (lambda: LigerFusedLinearGRPOLoss(importance_sampling_level="batch"), "Unknown importance sampling level"),
    (lambda: LigerFusedLinearGRPOLoss(loss_type="ppo"), "loss_type must be one of"),
    (lambda: LigerFusedLinearGRPOLoss(temperature=0), "temperature must be a number > 0"),
    (lambda: LigerFusedLinearDPOLoss(loss_type="ipo"), "Unsupported loss_type: ipo"),
    (lambda: LigerFusedLinearDPOLoss(loss_type="exo_pair"), "label_smoothing must be > 0"),
    (lambda: LigerFusedLinearDPOLoss(loss_type="robust", label_smoothing=0.5), "label_smoothing must lie in"),
    (lambda: LigerFusedLinearDPOLoss(beta=0.0), "beta"),
])
def test_bad_keywords_fail_in_init(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_liger_only_keywords_refused_with_the_drop_in_names():
    # the drop-in takes Liger's keywords only: fastrl's names are a TypeError (Python's own)
    with pytest.raises(TypeError, match="epsilon"):
        LigerFusedLinearGRPOLoss(epsilon=0.2)


def test_forward_errors():
    batch = _grpo_batch()
    args = (batch["x"], batch["w"], batch["ids"], batch["mask"], batch["adv"])
    with pytest.raises(ValueError, match="ref_per_token_logps or ref_input must be provided"):
        LigerFusedLinearGRPOLoss()(*args)
    with pytest.raises(ValueError, match="ref_input needs ref_weight"):
        LigerFusedLinearGRPOLoss()(*args, ref_input=batch["x"])
    with pytest.raises(ValueError, match="vllm_is_ratio shape"):
        LigerFusedLinearGRPOLoss(beta=0.0)(*args, vllm_is_ratio=torch.ones(4, 3))
    with pytest.raises(ValueError, match="0 and 1 only"):
        LigerFusedLinearGRPOLoss(beta=0.0)(*args[:3], batch["mask"] * 0.5, args[4])
    x, w, target, _ = _dpo_batch()
    with pytest.raises(ValueError, match="needs ref_input and ref_weight"):
        LigerFusedLinearDPOLoss()(w, x, target)
    with pytest.raises(ValueError, match=r"\[2B, T\]"):
        LigerFusedLinearDPOLoss(use_ref_model=False)(w, x[:5], target[:5])
    # both references: Liger's warning, the per-token log-probs used
    with pytest.warns(UserWarning, match="Using ref_per_token_logps"):
        LigerFusedLinearGRPOLoss()(*args, ref_per_token_logps=batch["ref"], ref_input=batch["x"],
                                   ref_weight=batch["w"])


# ---------------------------------------------------------------------------------------------------
# fastrl's own classes given a peer's keyword (always run)


@pytest.mark.parametrize("make,name,equivalent", [
    (lambda: FusedLinearGRPOLoss(epsilon_low=0.1), "epsilon_low", "'epsilon'"),
    (lambda: GRPOLoss(epsilon_low=0.1), "epsilon_low", "'epsilon'"),
    (lambda: GRPOLoss(sapo_temperature_pos=1.0), "sapo_temperature_pos", "'sapo_tau_pos'"),
    (lambda: FusedLinearGRPOLoss(vespo_k_pos=2.0), "vespo_k_pos", "'vespo_k'"),
    (lambda: FusedLinearGRPOLoss(use_ref_model=True), "use_ref_model", "ref_logps"),
    (lambda: FusedLinearGRPOLoss(compiled=True), "compiled", "torch.compile"),
    (lambda: GRPOLoss(vllm_importance_sampling_mode="token_truncate"), "vllm_importance_sampling_mode", "'is_mode'"),
    (lambda: GRPOLoss(clip_ratio_low=0.2), "clip_ratio_low", "'epsilon'"),
    (lambda: GRPOLoss(temperature=0.7), "temperature", "FusedLinearGRPOLoss"),
    (lambda: FusedLinearDPOLoss(alpha=1.0), "alpha", "'sft'"),
    (lambda: FusedLinearDPOLoss(compute_nll_loss=True), "compute_nll_loss", "'sft'"),
    (lambda: DPOLoss(average_log_prob=True), "average_log_prob", "sigmoid_norm"),
    (lambda: DPOLoss(use_ref_model=False), "use_ref_model", "ref_chosen_logps"),
    (lambda: FusedLinearDPOLoss(gamma=0.5), "gamma", "'gamma_beta_ratio'"),
    (lambda: FusedLinearDPOLoss(chunk_size=1), "chunk_size", "'workspace_bytes'"),
])
def test_fastrl_classes_name_the_fastrl_equivalent_of_a_peer_keyword(make, name, equivalent):
    with pytest.raises(TypeError) as info:
        make()
    message = str(info.value)
    assert f"unexpected keyword argument {name!r}" in message and equivalent in message, message
    assert "Liger-Kernel / TRL" in message


def test_functions_name_the_equivalent_too():
    logps = torch.zeros(2, 3)
    with pytest.raises(TypeError, match=r"grpo_loss\(\) got an unexpected keyword argument 'epsilon_low'.*'epsilon'"):
        grpo_loss(logps, None, torch.zeros(2), torch.ones(2, 3), epsilon_low=0.1)
    with pytest.raises(TypeError, match="did you mean 'epsilon'"):  # a typo still gets difflib's guess
        grpo_loss(logps, None, torch.zeros(2), torch.ones(2, 3), epsilom=0.1)


# ---------------------------------------------------------------------------------------------------
# values against plain-torch formulas of Liger's maths (always run)


def _plain_grpo(x, w, ids, mask, adv, old, ref, *, beta, eps=0.2, loss_type="dapo", temperature=1.0):
    """Liger 0.8.5's clip-family GRPO (grpo_loss.ppo_loss_fn), written out on full fp64 logits."""
    logp = torch.log_softmax((x.double() @ w.double().T) / temperature, -1).gather(-1, ids[..., None])[..., 0]
    m = mask.double()
    coef = torch.exp(logp - old.double())
    clipped = coef.clamp(1 - eps, 1 + eps)
    a = adv.double()[:, None]
    per_token = -torch.min(coef * a, clipped * a)
    kl = torch.exp(ref.double() - logp) - (ref.double() - logp) - 1
    per_token = per_token + beta * kl
    if loss_type == "dapo":
        loss = (per_token * m).sum() / m.sum()
    else:  # grpo
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).sum() / m.shape[0]
    is_clipped = ((coef < 1 - eps) & (a < 0)) | ((coef > 1 + eps) & (a > 0))
    metrics = [(kl * m).sum() / m.sum(), (is_clipped * m).sum() / m.sum()]
    return loss, metrics


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_grpo_equals_liger_maths(loss_type):
    batch = _grpo_batch(seed=3)
    module = LigerFusedLinearGRPOLoss(beta=0.05, loss_type=loss_type, temperature=0.8)
    loss, metrics, grads = _grpo_call(module, batch)
    x, w = _leaves(batch["x"].double(), batch["w"].double())
    want, want_metrics = _plain_grpo(x, w, batch["ids"], batch["mask"], batch["adv"], batch["old"], batch["ref"],
                                     beta=0.05, loss_type=loss_type, temperature=0.8)
    _assert_same((loss, metrics, grads), (want.detach(), [m.detach() for m in want_metrics], _grads(want, [x, w])),
                 rtol=1e-4, atol=1e-6)
    assert metrics[1] > 0  # the batch clips somewhere: the metric is exercised


def test_dpo_equals_liger_maths():
    x, w, target, _ = _dpo_batch(seed=2)
    ref_x, ref_w = x + 0.1, w * 0.9
    module = LigerFusedLinearDPOLoss(beta=0.2, compute_nll_loss=True, alpha=0.5)
    xs, ws = _leaves(x, w)
    loss, aux = module(ws, xs, target, ref_input=ref_x, ref_weight=ref_w)
    grads = _grads(loss, [xs, ws])

    def sums(h, weight):
        logits = h.double() @ weight.double().T
        lp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0] * (target != -100)
        return lp.sum(-1), lp, logits

    xd, wd = _leaves(x.double(), w.double())
    pol, tok, logits = sums(xd, wd)
    ref = sums(ref_x, ref_w)[0]
    n = x.shape[0] // 2
    margin = 0.2 * ((pol[:n] - ref[:n]) - (pol[n:] - ref[n:]))
    nll = -tok[:n].sum() / (target[:n] != -100).sum()
    want = -torch.nn.functional.logsigmoid(margin).mean() + 0.5 * nll
    want_aux = [pol[:n], pol[n:], logits[:n].mean(), logits[n:].mean(), nll, 0.2 * (pol[:n] - ref[:n]),
                0.2 * (pol[n:] - ref[n:])]
    _assert_same((loss.detach(), aux, grads), (want.detach(), [a.detach() for a in want_aux], _grads(want, [xd, wd])),
                 rtol=1e-4, atol=1e-5)


def test_dpo_without_reference_and_with_token_means():
    x, w, target, bias = _dpo_batch(seed=4)
    mask = target != -100
    loss, aux = LigerFusedLinearDPOLoss(use_ref_model=False, average_log_prob=True, beta=0.5)(w, x, target, bias)
    lp = fused_linear_logprobs(x, w, target, bias)
    means = lp.sum(-1) / mask.sum(-1)
    n = x.shape[0] // 2
    torch.testing.assert_close(aux[0], means[:n])
    torch.testing.assert_close(aux[5], 0.5 * means[:n])  # rewards against a zero reference
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(0.5 * (means[:n] - means[n:])).mean())
    assert aux[4] == 0  # no NLL term: Liger's nll_loss is 0


def test_grpo_without_reference_has_zero_kl():
    batch = _grpo_batch(seed=5)
    loss, metrics, _ = _grpo_call(LigerFusedLinearGRPOLoss(beta=0.1, use_ref_model=False), batch)
    no_kl, no_kl_metrics, _ = _grpo_call(LigerFusedLinearGRPOLoss(beta=0.0), batch, with_ref=False)
    assert len(metrics) == 2 and metrics[0] == 0 and len(no_kl_metrics) == 1
    torch.testing.assert_close(loss, no_kl)


# ---------------------------------------------------------------------------------------------------
# H % 16 != 0: the zero-padded path (always run)


def test_fused_linear_logprobs_at_an_odd_hidden_size():
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(3, 5, 20, generator=g)
    weight = torch.randn(40, 20, generator=g) / 3
    bias = torch.randn(40, generator=g)
    labels = torch.randint(0, 40, (3, 5), generator=g)
    labels[1, 3:] = -100
    h, w, b = _leaves(hidden, weight, bias)
    lp, ent = fused_linear_logprobs(h, w, labels, b, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    # against fp64 maths on the full logits
    hd, wd, bd = _leaves(hidden.double(), weight.double(), bias.double())
    logits = hd @ wd.T + bd
    logp = torch.log_softmax(logits, -1)
    want_lp = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
    want_ent = -(logp.exp() * logp).sum(-1) * (labels != -100)
    (want_lp.sum() + want_ent.sum()).backward()
    torch.testing.assert_close(lp, want_lp.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, want_ent.float(), rtol=1e-5, atol=1e-5)
    for got, want in ((h, hd), (w, wd), (b, bd)):
        assert got.grad.shape == want.shape
        torch.testing.assert_close(got.grad, want.grad.float(), rtol=1e-4, atol=1e-5)
    # and the same numbers as zero-padding to 32 by hand
    padded = fused_linear_logprobs(torch.nn.functional.pad(hidden, (0, 12)), torch.nn.functional.pad(weight, (0, 12)),
                                   labels, bias)
    torch.testing.assert_close(lp.detach(), padded, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["single_pass", "two_pass"])
def test_fused_linear_grpo_loss_at_an_odd_hidden_size(mode):
    batch = _grpo_batch(seed=8, h=20)
    x, w = _leaves(batch["x"], batch["w"])
    loss, metrics = fused_linear_grpo_loss(x, w, batch["ids"], batch["old"], batch["adv"], batch["mask"],
                                           ref_logps=batch["ref"], beta=0.04, mode=mode)
    loss.backward()
    xd, wd = _leaves(batch["x"].double(), batch["w"].double())
    logp = torch.log_softmax(xd @ wd.T, -1).gather(-1, batch["ids"][..., None])[..., 0]
    want, want_metrics = grpo_loss(logp.float(), batch["old"], batch["adv"], batch["mask"], ref_logps=batch["ref"],
                                   beta=0.04)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    want.backward()
    assert x.grad.shape == (4, 6, 20) and w.grad.shape == (50, 20)
    torch.testing.assert_close(x.grad, xd.grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, wd.grad.float(), rtol=1e-4, atol=1e-6)


def test_fused_linear_dpo_loss_at_an_odd_hidden_size():
    x, w, target, _ = _dpo_batch(seed=9, h=20)
    mask = target != -100
    xs, ws = _leaves(x, w)
    ref_c, ref_r = torch.tensor([-20.0, -18.0, -25.0]), torch.tensor([-22.0, -19.0, -21.0])
    loss, _ = fused_linear_dpo_loss(xs, ws, target.clamp(min=0), ref_c, ref_r, mask=mask, beta=0.3)
    loss.backward()
    want, _ = LigerFusedLinearDPOLoss(use_ref_model=False, beta=0.3)(w, x, target)  # any H too
    xd, wd = _leaves(x.double(), w.double())
    lp = torch.log_softmax(xd @ wd.T, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0] * mask
    seq = lp.sum(-1)
    margin = 0.3 * ((seq[:3] - ref_c.double()) - (seq[3:] - ref_r.double()))
    plain = -torch.nn.functional.logsigmoid(margin).mean()
    plain.backward()
    torch.testing.assert_close(loss, plain.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xs.grad, xd.grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ws.grad, wd.grad.float(), rtol=1e-4, atol=1e-6)
    assert torch.isfinite(want)


# ---------------------------------------------------------------------------------------------------
# equal to Liger's own classes (where liger_kernel imports)


GRPO_CASES = [
    *[dict(loss_type=t, importance_sampling_level=lvl, max_completion_length=8)
      for t in ("grpo", "bnpo", "dr_grpo", "dapo") for lvl in ("token", "sequence")],
    dict(loss_type="cispo", epsilon_high=1.1),
    dict(loss_type="sapo", sapo_temperature_pos=0.9, sapo_temperature_neg=1.3),
    dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_neg=2.5),
    dict(beta=0.0),
    dict(beta=0.1, use_bias_correction_kl=True),
    dict(beta=0.1, use_ref_model=False),
    dict(delta=1.3, epsilon_low=0.1, epsilon_high=0.28),
    dict(temperature=0.7),
]


@pytest.mark.parametrize("kw", GRPO_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_grpo_equals_liger(kw):
    chunked = _liger()
    batch = _grpo_batch(seed=1)
    want = _grpo_call(chunked.LigerFusedLinearGRPOLoss(compiled=False, **kw), batch)
    _assert_same(_grpo_call(LigerFusedLinearGRPOLoss(**kw), batch), want)


@pytest.mark.parametrize("case", ["ref_input", "bias", "on_policy", "num_items", "chunked"])
def test_grpo_equals_liger_inputs(case):
    chunked = _liger()
    batch = _grpo_batch(seed=2, bias=case == "bias")
    kw = dict(ref_input=case == "ref_input", with_old=case != "on_policy")
    if case == "num_items":
        kw["num_items_in_batch"] = 30
    init = dict(chunk_size=2) if case == "chunked" else {}
    want = _grpo_call(chunked.LigerFusedLinearGRPOLoss(compiled=False, **init), batch, **kw)
    _assert_same(_grpo_call(LigerFusedLinearGRPOLoss(**init), batch, **kw), want)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo", "sapo", "vespo"])
@pytest.mark.parametrize("shape", ["BT", "B1", "B"])
def test_grpo_equals_liger_with_vllm_is_ratio(loss_type, shape):
    chunked = _liger()
    batch = _grpo_batch(seed=4)
    ratio = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) + 0.5
    ratio[batch["mask"] == 0] = 1.0  # vespo: Liger sums the logs over every position, fastrl over the tokens
    ratio = {"BT": ratio, "B1": ratio[:, :1], "B": ratio[:, 0]}[shape]
    init = dict(loss_type=loss_type, epsilon_high=1.1 if loss_type == "cispo" else 0.2)
    for with_old in (True, False):
        want = _grpo_call(chunked.LigerFusedLinearGRPOLoss(compiled=False, **init), batch, with_old=with_old,
                          vllm_is_ratio=ratio)
        _assert_same(_grpo_call(LigerFusedLinearGRPOLoss(**init), batch, with_old=with_old, vllm_is_ratio=ratio),
                     want)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_luspo_equals_liger_without_padding(level):
    chunked = _liger()
    batch = _grpo_batch(seed=6, full=True)
    init = dict(loss_type="luspo", importance_sampling_level=level)
    want = _grpo_call(chunked.LigerFusedLinearGRPOLoss(compiled=False, **init), batch)
    _assert_same(_grpo_call(LigerFusedLinearGRPOLoss(**init), batch), want)


def test_grpo_equals_liger_at_an_odd_hidden_size():
    chunked = _liger()
    batch = _grpo_batch(seed=7, h=20, bias=True)
    want = _grpo_call(chunked.LigerFusedLinearGRPOLoss(compiled=False), batch, ref_input=True)
    _assert_same(_grpo_call(LigerFusedLinearGRPOLoss(), batch, ref_input=True), want)


DPO_CASES = [
    *[dict(loss_type=t, beta=0.2, label_smoothing=0.1 if t in ("robust", "exo_pair") else 0.0) for t in DPO_TYPES],
    dict(compute_nll_loss=True, alpha=0.7),
    dict(average_log_prob=True),
    dict(average_log_prob=True, compute_nll_loss=True),
    dict(use_ref_model=False),
    dict(use_ref_model=False, loss_type="apo_down"),
]


def _dpo_call(module, x, w, target, bias=None):
    xs, ws, bs = _leaves(x, w, bias)
    ref = dict(ref_input=x + 0.1, ref_weight=w * 0.9, ref_bias=None if bias is None else bias * 0.5)
    loss, aux = module(ws, xs, target, bs, **ref)
    return loss.detach(), [a.detach() for a in aux], _grads(loss, [xs, ws, bs])


@pytest.mark.parametrize("kw", DPO_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_dpo_equals_liger(kw):
    chunked = _liger()
    x, w, target, _ = _dpo_batch()
    want = _dpo_call(chunked.LigerFusedLinearDPOLoss(compiled=False, **kw), x, w, target)
    _assert_same(_dpo_call(LigerFusedLinearDPOLoss(**kw), x, w, target), want)


@pytest.mark.parametrize("h", [32, 20])
def test_dpo_equals_liger_with_bias(h):
    chunked = _liger()
    x, w, target, bias = _dpo_batch(seed=1, h=h)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = _dpo_call(chunked.LigerFusedLinearDPOLoss(compiled=False, beta=0.3), x, w, target, bias)
    _assert_same(_dpo_call(LigerFusedLinearDPOLoss(beta=0.3), x, w, target, bias), want)


def test_bf16_inputs_equal_liger_to_bf16_rounding():
    chunked = _liger()
    batch = _grpo_batch(seed=1)
    batch["x"], batch["w"] = batch["x"].bfloat16(), batch["w"].bfloat16()
    want = _grpo_call(chunked.LigerFusedLinearGRPOLoss(compiled=False), batch)
    got = _grpo_call(LigerFusedLinearGRPOLoss(), batch)
    assert got[2][0].dtype == torch.bfloat16 and got[2][1].dtype == torch.bfloat16  # gradients in the inputs' dtype
    _assert_same(got, want, rtol=3e-2, atol=2e-3)
    x, w, target, _ = _dpo_batch()
    want = _dpo_call(chunked.LigerFusedLinearDPOLoss(compiled=False), x.bfloat16(), w.bfloat16(), target)
    got = _dpo_call(LigerFusedLinearDPOLoss(), x.bfloat16(), w.bfloat16(), target)
    torch.testing.assert_close(got[0], want[0].float(), rtol=1e-2, atol=1e-2)
    for g, e in zip(got[1][:2], want[1][:2]):  # the sequence log-probs (bf16 logits in Liger, fp32 in fastrl)
        torch.testing.assert_close(g.float(), e.float(), rtol=1e-2, atol=5e-2)
