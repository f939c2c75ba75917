"""fastrl.losses.fused_linear_grpo against fp64 maths (logits materialised in fp64, the fp64 GRPO
reference, autograd), both passes, both backends, padded and packed."""

from __future__ import annotations

import pytest
import torch

from fastrl.losses import FusedLinearGRPOLoss, GRPOSettings, fused_linear_grpo_loss, grpo_loss
from fastrl.losses.torch_impl import grpo as loss_reference
from fastrl.ops import backend, fused_linear_logprobs
from conftest import gemm_counter

B, L, H, V = 3, 7, 32, 101


def _case(dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, 2:] = False
    labels[~mask] = -1  # padding labels are never read
    with torch.no_grad():
        logp = torch.log_softmax((hidden.double() @ weight.double().T + (0 if b is None else b.double())), -1)
        exact = logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    old = (exact + 0.3 * torch.randn(B, L, generator=g, dtype=torch.float64)).float()
    ref = (exact + 0.2 * torch.randn(B, L, generator=g, dtype=torch.float64)).float()
    sampler = (old.double() + 0.1 * torch.randn(B, L, generator=g, dtype=torch.float64)).float()
    advantages = torch.tensor([1.0, -0.7, 0.4])
    return hidden, weight, b, labels, mask, old, ref, sampler, advantages


def _fp64_loss(hidden, weight, bias, labels, mask, old, advantages, temperature, options, ref=None, sampler=None):
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    log_p = torch.log_softmax(logits / temperature, -1)
    logps = log_p.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    need_entropy = options.get("entropy_coef", 0.0) != 0.0
    return loss_reference.grpo_loss(logps, old.double(), advantages.double(), mask, None,
                                    ref_logps=None if ref is None else ref.double(),
                                    sampler_logps=None if sampler is None else sampler.double(),
                                    entropy=entropy if need_entropy else None, **options)


SETTINGS = {
    "dapo": {},
    "grpo+k3+entropy": {"loss_type": "grpo", "beta": 0.05, "entropy_coef": 0.01},
    "bnpo+two-sided+dual": {"loss_type": "bnpo", "delta": 1.5, "clip_ratio_c": 3.0, "epsilon_high": 0.28},
    "cispo+sampler": {"loss_type": "cispo", "epsilon_high": 5.0, "is_cap": 2.0},
    "gspo": {"loss_type": "grpo", "importance_sampling_level": "sequence"},
    "vespo": {"loss_type": "vespo"},
    "dr_grpo+off-policy": {"loss_type": "dr_grpo", "off_policy_mask_threshold": 0.05},
}
SEPARABLE = {"dapo", "grpo+k3+entropy", "bnpo+two-sided+dual", "cispo+sampler"}
CASES = [(name, mode) for name in SETTINGS for mode in ("single_pass", "two_pass")
         if mode == "two_pass" or name in SEPARABLE]


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("name,mode", CASES)
@pytest.mark.parametrize("slices", ["several", "one"])
def test_loss_and_gradients_match_fp64(path, name, mode, slices):
    hidden, weight, bias, labels, mask, old, ref, sampler, advantages = _case(seed=len(name))
    options = SETTINGS[name]
    extra = {"ref_logps": ref} if options.get("beta") else {}
    if "sampler" in name or "off-policy" in name:
        extra["sampler_logps"] = sampler
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    # a workspace of 5 token rows / 5 vocabulary columns: several slices; or the default: one slice
    workspace = 4 * 5 * V if slices == "several" else None
    with backend(path):
        loss, metrics = fused_linear_grpo_loss(leaves[0], leaves[1], labels, old, advantages, mask, bias=leaves[2],
                                               temperature=0.9, mode=mode, workspace_bytes=workspace, **extra,
                                               **options)
        loss.backward()
    refs = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    ref_loss, ref_metrics = _fp64_loss(*refs, labels, mask, old, advantages, 0.9, options,
                                       ref=extra.get("ref_logps"), sampler=extra.get("sampler_logps"))
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    assert metrics.keys() == ref_metrics.keys()
    for key in metrics:
        torch.testing.assert_close(metrics[key].double(), ref_metrics[key].double(), rtol=1e-4, atol=1e-5)
    for got, want in zip(leaves, refs):
        assert got.grad.dtype == got.dtype
        assert _rel(got.grad, want.grad) < 1e-5, name


@pytest.mark.parametrize("mode", ["single_pass", "two_pass"])
def test_packed_layout_and_bf16(mode):
    hidden, weight, _, labels, mask, old, _, _, advantages = _case(dtype=torch.bfloat16, bias=False)
    lengths = mask.sum(1)
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    h_packed = hidden[mask].clone().requires_grad_(True)
    w1, w2 = weight.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, _ = fused_linear_grpo_loss(h_packed, w1, labels[mask], old[mask], advantages, cu_seqlens=cu_seqlens,
                                     loss_type="grpo", mode=mode)
    loss.backward()
    h_padded = hidden.clone().requires_grad_(True)
    loss2, _ = fused_linear_grpo_loss(h_padded, w2, labels, old, advantages, mask, loss_type="grpo", mode=mode)
    loss2.backward()
    torch.testing.assert_close(loss, loss2, rtol=1e-5, atol=1e-6)
    assert _rel(h_packed.grad.float(), h_padded.grad[mask].double()) < 1e-2
    assert _rel(w1.grad.float(), w2.grad.double()) < 1e-2
    assert (h_padded.grad[~mask] == 0).all()


def test_same_loss_as_grpo_loss_on_the_op_and_no_gradient_work_without_grad():
    hidden, weight, bias, labels, mask, old, _, _, advantages = _case()
    safe_labels = torch.where(mask, labels, -100)
    logps = fused_linear_logprobs(hidden, weight, safe_labels, bias)
    want, _ = grpo_loss(logps, old, advantages, mask, loss_type="bnpo")
    got, _ = fused_linear_grpo_loss(hidden, weight, labels, old, advantages, mask, bias=bias, loss_type="bnpo")
    assert not got.requires_grad
    torch.testing.assert_close(got, want)


def test_backward_scales_by_the_incoming_gradient_and_runs_once():
    hidden, weight, bias, labels, mask, old, _, _, advantages = _case()
    grads = []
    for scale in (1.0, 3.0):
        w = weight.clone().requires_grad_(True)
        loss, _ = fused_linear_grpo_loss(hidden, w, labels, old, advantages, mask, mode="single_pass")
        (scale * loss).backward(retain_graph=True)
        grads.append(w.grad.clone())
        if scale == 3.0:
            with pytest.raises(RuntimeError, match="once"):
                loss.backward()
    torch.testing.assert_close(grads[1], 3 * grads[0])


def test_all_masked_batch_gives_zero_loss_and_zero_gradient():
    hidden, weight, bias, labels, mask, old, _, _, advantages = _case()
    mask = torch.zeros_like(mask)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    for mode in ("single_pass", "two_pass"):
        h.grad = w.grad = None
        loss, _ = fused_linear_grpo_loss(h, w, labels, old, advantages, mask, mode=mode)
        loss.backward()
        assert loss.item() == 0.0
        assert (h.grad == 0).all() and (w.grad == 0).all()


def test_module_form():
    hidden, weight, bias, labels, mask, old, _, _, advantages = _case()
    module = FusedLinearGRPOLoss(loss_type="dr_grpo", temperature=0.7)
    got, _ = module(hidden, weight, labels, old, advantages, mask, bias=bias)
    want, _ = fused_linear_grpo_loss(hidden, weight, labels, old, advantages, mask, bias=bias, loss_type="dr_grpo",
                                     temperature=0.7)
    torch.testing.assert_close(got, want)
    assert "dr_grpo" in repr(module)


def test_settings_object_or_keywords():
    hidden, weight, bias, labels, mask, old, ref, _, advantages = _case()
    settings = GRPOSettings(loss_type="grpo", beta=0.1, epsilon_high=0.28)
    module = FusedLinearGRPOLoss(settings, temperature=0.7)
    assert module.settings is settings and "beta=0.1" in repr(module) and "temperature=0.7" in repr(module)
    got, _ = module(hidden, weight, labels, old, advantages, mask, bias=bias, ref_logps=ref)
    want, _ = fused_linear_grpo_loss(hidden, weight, labels, old, advantages, mask, bias=bias, ref_logps=ref,
                                     temperature=0.7, loss_type="grpo", beta=0.1, epsilon_high=0.28)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="not both"):
        fused_linear_grpo_loss(hidden, weight, labels, old, advantages, mask, settings=settings, beta=0.2)
    with pytest.raises(TypeError, match=r"FusedLinearGRPOLoss\(\) got an unexpected keyword argument 'epsilon_hi'"):
        FusedLinearGRPOLoss(epsilon_hi=0.3)


def _bad(**over):
    hidden, weight, bias, labels, mask, old, _, _, advantages = _case()
    args = dict(hidden=hidden, weight=weight, labels=labels, old_logps=old, advantages=advantages, mask=mask)
    args.update(over)
    return lambda: fused_linear_grpo_loss(**args)


BAD = [
    (lambda: _bad(mode="fast")(), ValueError, "mode"),
    (lambda: _bad(mask=torch.ones(3, 6, dtype=torch.bool))(), ValueError, "mask"),
    (lambda: _bad(hidden=torch.randn(3 * 7, 32))(), ValueError, "hidden"),
    (lambda: _bad(weight=torch.randn(101, 16))(), ValueError, "weight"),
    (lambda: _bad(labels=torch.full((3, 7), 101))(), ValueError, "labels"),
    (lambda: _bad(loss_type="ppo")(), ValueError, "loss_type"),
    (lambda: _bad(temperature=0.0)(), ValueError, "temperature"),
    (lambda: _bad(mode="single_pass", importance_sampling_level="sequence")(), ValueError, "single_pass"),
    (lambda: FusedLinearGRPOLoss(mode="x"), ValueError, "mode"),
    (lambda: FusedLinearGRPOLoss(epsilon=-1.0), ValueError, "epsilon"),
]


@pytest.mark.parametrize("call,exc,name", BAD)
def test_bad_arguments_name_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["single_pass", "two_pass"])
def test_real_shapes_on_the_gpu_match_the_composed_ops(mode):
    g = torch.Generator(device="cuda").manual_seed(0)
    b, length, h, v = 4, 1024, 4096, 128256
    hidden = (torch.randn(b, length, h, device="cuda", generator=g) * 0.5).bfloat16()
    weight = (torch.randn(v, h, device="cuda", generator=g) * 0.02).bfloat16()
    labels = torch.randint(0, v, (b, length), device="cuda", generator=g)
    mask = torch.ones(b, length, dtype=torch.bool, device="cuda")
    mask[1, 700:] = False
    advantages = torch.randn(b, device="cuda", generator=g)
    with torch.no_grad():
        old = fused_linear_logprobs(hidden, weight, torch.where(mask, labels, -100)) + 0.05
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, _ = fused_linear_grpo_loss(h1, w1, labels, old, advantages, mask, loss_type="grpo", beta=0.0, mode=mode)
    loss.backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logps = fused_linear_logprobs(h2, w2, torch.where(mask, labels, -100))
    want, _ = grpo_loss(logps, old, advantages, mask, loss_type="grpo")
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)
    assert _rel(h1.grad.float(), h2.grad.double()) < 1e-2
    assert _rel(w1.grad.float(), w2.grad.double()) < 1e-2




@pytest.mark.parametrize("name", ["dapo", "grpo+k3+entropy", "gspo"])
@pytest.mark.parametrize("workspace", ["one chunk", "accumulator fits", "accumulator too big"])
def test_gemm_passes_and_only_unmasked_positions(monkeypatch, name, workspace):
    b, length, h, v = 4, 16, 16, 101
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(b, length, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.3
    labels = torch.randint(0, v, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[:, :3] = False  # prompt positions
    mask[1, 10:] = mask[3, 7:] = False  # padding
    scored = int(mask.sum())  # 37 of 64 positions; fewer than V
    old = torch.randn(b, length, generator=g) - 4.0
    ref = old + 0.1 * torch.randn(b, length, generator=g)
    advantages = torch.tensor([1.0, -0.5, 0.3, -1.2])
    options = dict(SETTINGS[name], **({"ref_logps": ref} if SETTINGS[name].get("beta") else {}))
    # the whole logits in one chunk; several chunks with the fp32 [V, H] accumulator inside the
    # workspace; several chunks with a workspace smaller than the accumulator
    ws = {"one chunk": None, "accumulator fits": v * h * 4, "accumulator too big": v * h * 2}[workspace]
    record = gemm_counter(monkeypatch)
    leaves = [hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)]
    loss, _ = fused_linear_grpo_loss(*leaves, labels, old, advantages, mask, workspace_bytes=ws, **options)
    loss.backward()
    monkeypatch.undo()
    # one chunk: its logits kept between log-probs and gradients (any setting); several: one pass for a
    # token-separable loss whenever the accumulator fits, else the two-pass backward
    passes = 3 if workspace == "one chunk" or (name != "gspo" and workspace != "accumulator too big") else 4
    assert sum(m * k * n for m, k, n in record) == passes * scored * v * h  # padding and prompt: no GEMM
    refs = [t.double().requires_grad_(True) for t in (hidden, weight)]
    want, _ = _fp64_loss(refs[0], refs[1], None, labels, mask, old, advantages, 1.0, SETTINGS[name],
                         ref=options.get("ref_logps"))
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    for got, exp in zip(leaves, refs):
        assert _rel(got.grad, exp.grad) < 1e-5
    assert (leaves[0].grad[~mask] == 0).all()
