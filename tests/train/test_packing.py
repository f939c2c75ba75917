"""fastrl.train.packing and the Policy forward: packed and padded batches give the same loss and
gradients; sequence_layout picks the cheaper of the two; the reference pass agrees with
fastrl.losses.precompute_reference_logps."""

from __future__ import annotations

import pytest
import torch

from fastrl.losses import FusedLinearDPOLoss, precompute_reference_logps
from fastrl.train.model import Policy, load_model, packing_works, sequence_layout
from fastrl.train.packing import pack, pad
from fastrl.train.reference import pair_logps

from .conftest import TINY, toy_pairs


def _policy(kind: str, attn: str = "sdpa") -> Policy:
    return Policy(load_model(None, TINY[kind], dtype=torch.float32, attn_implementation=attn, seed=0).train())


def _pairs(n=6):
    rows = toy_pairs(n, seed=1)
    prompts = [r["prompt"] for r in rows] * 2
    completions = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    return prompts, completions


@pytest.mark.parametrize("kind, attn", [("qwen2", "sdpa"), ("llama", "sdpa"), ("qwen2", "eager")])
def test_packed_and_padded_give_the_same_loss_and_gradients(kind, attn):
    policy = _policy(kind, attn)
    prompts, completions = _pairs()
    loss_fn = FusedLinearDPOLoss(beta=0.1, loss_type=["sigmoid", "ipo"])
    ref = torch.linspace(-20, -10, 6), torch.linspace(-25, -15, 6)
    results = []
    for layout in (pack, pad):
        batch = layout(prompts, completions)
        policy.zero_grad()
        loss, metrics = policy(batch, lambda h, w, b: loss_fn(h, w, batch.labels, *ref, cu_seqlens=batch.cu_seqlens))
        loss.backward()
        results.append((loss.detach(), metrics, {n: p.grad.clone() for n, p in policy.named_parameters()}))
    (loss_a, met_a, grad_a), (loss_b, met_b, grad_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(met_a["rewards/margins"], met_b["rewards/margins"], rtol=1e-5, atol=1e-6)
    for name in grad_a:
        torch.testing.assert_close(grad_a[name], grad_b[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for g in grad_a.values())


def test_packed_batches_waste_nothing():
    prompts, completions = _pairs()
    packed, padded = pack(prompts, completions), pad(prompts, completions)
    assert packed.slots == packed.tokens == padded.tokens
    assert padded.slots == padded.padded_slots == packed.padded_slots > packed.tokens
    assert packed.labels.tolist() == padded.labels.tolist() == [t for c in completions for t in c]


def test_sequence_layout_picks_the_cheaper_layout():
    """With SDPA a packed row's block-diagonal mask is dense: many short sequences run cheaper padded
    (16 x 12 tokens: 192² positions packed, 16 x 12² padded), a long and a short one packed."""
    model = _policy("qwen2").model
    layout = sequence_layout(model, packing_ok=True)
    assert layout([[5] * 4] * 16, [[6] * 8] * 16).position_ids is None  # padded
    assert layout([[5] * 60, [5]], [[6] * 4, [6]]).position_ids is not None  # packed
    assert sequence_layout(model, packing_ok=False) is pad


def test_reference_pass_matches_the_library_precompute():
    policy = _policy("qwen2").eval()
    prompts, completions = _pairs()
    chosen, rejected = pair_logps(policy, pack(prompts, completions))
    padded = pad(prompts, completions)
    completion_mask = torch.zeros_like(padded.input_ids)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        completion_mask[i, len(p):len(p) + len(c)] = 1
    decoder = policy.model.get_decoder()
    expected = precompute_reference_logps(
        lambda ids, am: decoder(input_ids=ids, attention_mask=am).last_hidden_state,
        policy.model.get_output_embeddings().weight,
        [{"input_ids": padded.input_ids, "attention_mask": padded.attention_mask, "completion_mask": completion_mask}],
        progress=False)
    torch.testing.assert_close(torch.cat([chosen, rejected]), expected, rtol=1e-5, atol=1e-4)


def test_ld_alpha_reference_weights_tokens_past_the_shorter_completion():
    policy = _policy("qwen2").eval()
    prompts, completions = _pairs(3)
    full = pair_logps(policy, pack(prompts, completions))
    cut = pair_logps(policy, pack(prompts, completions), ld_alpha=0.0)
    shorter = [min(len(completions[i]), len(completions[i + 3])) for i in range(3)]
    short_only = [c[:s] for c, s in zip(completions, shorter * 2)]
    torch.testing.assert_close(torch.cat(cut), torch.cat(pair_logps(policy, pack(prompts, short_only))),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(torch.cat(full), torch.cat(cut))


class _LeakyPolicy(Policy):
    """A model whose attention ignores the position-id restarts (packed sequences see each other)."""

    def forward(self, batch, head):
        if batch.position_ids is not None:
            batch.position_ids = None
            batch.attention_mask = torch.ones_like(batch.input_ids)
        return super().forward(batch, head)


def test_packing_probe_detects_a_model_that_leaks():
    assert packing_works(_policy("qwen2"), 64, torch.device("cpu"))
    leaky = _LeakyPolicy(_policy("qwen2").model)
    with pytest.warns(UserWarning, match="does not separate packed sequences"):
        assert not packing_works(leaky, 64, torch.device("cpu"))


@pytest.mark.gpu
def test_flash_attention_varlen_packed_matches_padded_sdpa():
    """On a GPU with flash-attn: a packed batch through flash-attn's varlen path (position-id restarts)
    gives the loss and gradients of the padded batch through SDPA (bf16 tolerance)."""
    pytest.importorskip("flash_attn")
    prompts, completions = _pairs()
    loss_fn = FusedLinearDPOLoss(beta=0.1)
    ref = torch.linspace(-20, -10, 6).cuda(), torch.linspace(-25, -15, 6).cuda()
    results = []
    for attn, layout in (("flash_attention_2", pack), ("sdpa", pad)):
        model = load_model(None, dict(TINY["qwen2"], hidden_size=64), dtype=torch.bfloat16, attn_implementation=attn,
                           seed=0)
        policy = Policy(model.cuda().train())
        batch = layout(prompts, completions).to("cuda")
        loss, _ = policy(batch, lambda h, w, b: loss_fn(h, w, batch.labels, *ref, cu_seqlens=batch.cu_seqlens))
        loss.backward()
        results.append((loss.detach().float(), {n: p.grad.float() for n, p in policy.named_parameters()}))
    (loss_a, grad_a), (loss_b, grad_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=2e-2, atol=2e-2)
    for name in grad_a:
        rel = (grad_a[name] - grad_b[name]).norm() / grad_b[name].norm().clamp_min(1e-12)
        assert rel < 5e-2, name
