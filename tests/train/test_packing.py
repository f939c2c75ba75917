"""fastrl.train.packing and the Policy forward: packed and padded batches give the same loss and
gradients; sequence_layout picks the cheaper of the two; the reference pass agrees with
fastrl.losses.precompute_reference_logps."""

from __future__ import annotations

import pytest
import torch

from fastrl.losses import FusedLinearDPOLoss, precompute_reference_logps
from fastrl.train.model import Policy, load_model, packing_works, sequence_layout
from fastrl.train.packing import pack, pad
from fastrl.train.model import pair_logps

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


# ------------------------------------------------------------------ the attention switch (flash | xformers | sdpa)
def _stand_in(monkeypatch, **present: bool):
    """Make ``flash_attn`` / ``xformers`` look installed (an empty stand-in module) or missing (None)."""
    import sys
    import types

    for name, there in present.items():
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name) if there else None)


def test_attention_auto_prefers_flash_then_xformers_then_sdpa(monkeypatch):
    from fastrl.train import attention
    from fastrl.train.model import attention_implementation

    cuda = torch.device("cuda")
    _stand_in(monkeypatch, flash_attn=True, xformers=True)
    assert attention.select("auto", cuda) == "flash"
    assert attention_implementation("auto", cuda, "auto") == "flash_attention_2"
    assert attention.select("xformers", cuda) == "xformers"  # asked for: taken even with flash-attn there
    assert attention.select("auto", "cpu") == "sdpa"  # the fused kernels need a GPU ...
    assert attention.select("auto", cuda, half=False) == "xformers"  # ... flash-attn also bf16/fp16 compute
    _stand_in(monkeypatch, xformers=False)
    assert attention.select("auto", cuda, half=False) == "sdpa"
    _stand_in(monkeypatch, flash_attn=False, xformers=True)
    assert attention.select("auto", cuda) == "xformers"
    assert attention_implementation("auto", cuda, "auto") == attention.XFORMERS
    sliding = load_model(None, dict(TINY["qwen2"], use_sliding_window=True, sliding_window=4, max_window_layers=1),
                         dtype=torch.float32, attn_implementation="sdpa", seed=0).config
    assert attention.sliding_window_layers(sliding)
    assert not attention.sliding_window_layers(_policy("qwen2").model.config)
    assert attention.select("auto", cuda, model_config=sliding) == "sdpa"
    _stand_in(monkeypatch, xformers=False)
    assert attention.select("auto", cuda) == "sdpa"
    assert attention_implementation("auto", cuda, "auto") == "sdpa"
    assert attention_implementation("eager", cuda, "auto") == "eager"  # an explicit HF implementation wins


@pytest.mark.parametrize("option, package", [("flash", "flash-attn"), ("xformers", "xformers")])
def test_attention_asked_for_but_missing_is_an_error_naming_the_option(monkeypatch, option, package, pairs_file,
                                                                       tmp_path):
    from fastrl.train import attention
    from fastrl.train.config import ConfigError
    from fastrl.train.model import attention_implementation

    from .conftest import dpo_config

    _stand_in(monkeypatch, flash_attn=False, xformers=False)
    with pytest.raises(ValueError, match=rf"attention='{option}' needs the {package} package.*pip install"):
        attention.select(option, "cuda")
    with pytest.raises(ValueError, match=rf"attention='{option}' needs the {package} package"):
        attention_implementation("auto", torch.device("cuda"), option)
    with pytest.raises(ConfigError, match=rf"^DPOConfig\.attention: '{option}' needs the {package} package.*pip"):
        dpo_config(pairs_file, tmp_path, attention=option)
    _stand_in(monkeypatch, **{"flash_attn" if option == "flash" else "xformers": True})
    assert dpo_config(pairs_file, tmp_path, attention=option).attention == option


def test_attention_option_is_validated_on_construction(pairs_file, tmp_path):
    from fastrl.train import attention
    from fastrl.train.config import ConfigError

    from .conftest import dpo_config

    with pytest.raises(ConfigError, match=r"^DPOConfig\.attention: must be one of auto, flash, xformers, sdpa"):
        dpo_config(pairs_file, tmp_path, attention="fast")
    with pytest.raises(ConfigError, match=r"^DPOConfig\.attention: 'sdpa' contradicts attn_implementation='eager'"):
        dpo_config(pairs_file, tmp_path, attention="sdpa", attn_implementation="eager")
    with pytest.raises(ValueError, match="attention must be one of"):
        attention.select(None, "cpu")
    assert dpo_config(pairs_file, tmp_path, attention="sdpa", attn_implementation="sdpa").attention == "sdpa"


def test_packed_seqlens_follow_the_position_id_restarts():
    from fastrl.train.attention import packed_seqlens

    batch = pack([[5, 6], [7], [1, 2, 3]], [[1, 2, 3], [4], [9]])
    assert packed_seqlens(batch.position_ids, 1, batch.slots) == batch.lengths.tolist() == [5, 2, 4]
    assert packed_seqlens(None, 3, 4) == [4, 4, 4]
    # rows of a [B, L] batch never run into each other, even when a row ends mid-count
    assert packed_seqlens(torch.tensor([[0, 1, 2], [3, 4, 0]]), 2, 3) == [3, 2, 1]
    assert packed_seqlens(torch.arange(3)[None], 2, 3) == [3, 3]  # unexpanded position ids


class _FakeXformers:
    """A stand-in ``xformers.ops`` whose memory_efficient_attention is SDPA under the dense mask of
    the attention bias it is given; it records what fastrl hands it."""

    def __init__(self):
        import types

        self.calls = []
        fake = self

        class BlockDiagonalCausalMask:
            def __init__(self, seqlens, device):
                self.seqlens, self.device = list(seqlens), device

            @classmethod
            def from_seqlens(cls, seqlens, *, device=None):
                assert all(isinstance(n, int) and n > 0 for n in seqlens)
                return cls(seqlens, device)

            def materialize(self, total):
                assert sum(self.seqlens) == total
                seq = torch.repeat_interleave(torch.arange(len(self.seqlens)), torch.tensor(self.seqlens))
                pos = torch.arange(total)
                return (seq[:, None] == seq[None, :]) & (pos[:, None] >= pos[None, :])

        def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
            assert query.dim() == key.dim() == value.dim() == 4 and query.shape[0] == 1  # [1, M, H, K]
            assert query.shape[:3] == key.shape[:3] == value.shape[:3]
            fake.calls.append({"shape": tuple(query.shape), "seqlens": attn_bias.seqlens, "scale": scale, "p": p})
            mask = attn_bias.materialize(query.shape[1]).to(query.device)
            out = torch.nn.functional.scaled_dot_product_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask, dropout_p=p,
                scale=scale)
            return out.transpose(1, 2)

        self.modules = {"xformers": types.ModuleType("xformers"), "xformers.ops": types.ModuleType("xformers.ops"),
                        "xformers.ops.fmha": types.ModuleType("xformers.ops.fmha"),
                        "xformers.ops.fmha.attn_bias": types.ModuleType("xformers.ops.fmha.attn_bias")}
        self.modules["xformers.ops"].memory_efficient_attention = memory_efficient_attention
        self.modules["xformers.ops.fmha.attn_bias"].BlockDiagonalCausalMask = BlockDiagonalCausalMask
        self.modules["xformers"].ops = self.modules["xformers.ops"]
        self.modules["xformers.ops"].fmha = self.modules["xformers.ops.fmha"]
        self.modules["xformers.ops.fmha"].attn_bias = self.modules["xformers.ops.fmha.attn_bias"]

    def install(self, monkeypatch):
        import sys

        for name, module in self.modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        return self


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_xformers_path_packed_matches_padded_sdpa(monkeypatch, kind):
    """The xformers path against a fake xformers (SDPA under the mask it is handed): a packed batch
    through it gives the loss and gradients of the padded batch through SDPA, with one
    [1, T, H, D] call per layer under the sequences' own lengths and the model's scale."""
    from fastrl.train import attention
    from fastrl.train.model import attention_implementation

    fake = _FakeXformers().install(monkeypatch)
    _stand_in(monkeypatch, flash_attn=False)
    impl = attention_implementation("auto", torch.device("cpu"), "xformers")
    assert impl == attention.XFORMERS
    prompts, completions = _pairs()
    loss_fn = FusedLinearDPOLoss(beta=0.1, loss_type=["sigmoid", "ipo"])
    ref = torch.linspace(-20, -10, 6), torch.linspace(-25, -15, 6)
    results = []
    for attn, layout in ((impl, pack), ("sdpa", pad)):
        policy = _policy(kind, attn)
        batch = layout(prompts, completions)
        loss, metrics = policy(batch, lambda h, w, b: loss_fn(h, w, batch.labels, *ref, cu_seqlens=batch.cu_seqlens))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters()}))
        if attn == impl:
            packed = batch
    (loss_a, grad_a), (loss_b, grad_b) = results
    text = TINY[kind]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert len(fake.calls) == text["num_hidden_layers"]
    for call in fake.calls:
        assert call["shape"] == (1, packed.slots, text["num_attention_heads"], head_dim)
        assert call["seqlens"] == packed.lengths.tolist()
        assert call["scale"] == pytest.approx(head_dim ** -0.5) and call["p"] == 0.0
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for name in grad_a:
        torch.testing.assert_close(grad_a[name], grad_b[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for g in grad_a.values())


def test_config_attention_reaches_the_model(monkeypatch, pairs_file, tmp_path):
    """The trainer config's ``attention`` decides the model's attention implementation
    (build_model), and a DPO run on the xformers path trains through it."""
    from fastrl.train import attention, train_dpo
    from fastrl.train.model import build_model

    from .conftest import dpo_config

    fake = _FakeXformers().install(monkeypatch)
    cpu = torch.device("cpu")
    assert build_model(dpo_config(pairs_file, tmp_path, attention="xformers"), cpu).config._attn_implementation \
        == attention.XFORMERS
    assert build_model(dpo_config(pairs_file, tmp_path, attention="sdpa"), cpu).config._attn_implementation == "sdpa"
    assert build_model(dpo_config(pairs_file, tmp_path), cpu).config._attn_implementation == "sdpa"  # auto, CPU
    result = train_dpo(dpo_config(pairs_file, tmp_path / "run", attention="xformers", max_steps=2))
    assert fake.calls and all(c["shape"][0] == 1 for c in fake.calls)
    assert result is not None


def test_xformers_model_falls_back_to_sdpa_for_padding_and_decoding(monkeypatch):
    """A model built with the xformers path still runs padded batches (the packing probe pads) and
    cached generation: those go to SDPA with SDPA's mask, with SDPA's results; xformers gets only
    the unpadded causal forwards (a packed row, a prefill), and the layout is always packed."""
    from fastrl.train import attention

    fake = _FakeXformers().install(monkeypatch)
    xf = _policy("qwen2", attention.hf_implementation("xformers")).eval()
    sd = _policy("qwen2", "sdpa").eval()
    assert packing_works(xf, 64, torch.device("cpu"))
    fake.calls.clear()
    prompts, completions = _pairs()
    padded = pad(prompts, completions)
    with torch.no_grad():
        torch.testing.assert_close(xf(padded, lambda h, w, b: h), sd(padded, lambda h, w, b: h), rtol=1e-5, atol=1e-5)
    assert not fake.calls  # the padding mask sends every layer to SDPA
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    outs = [m.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True) for m in (xf, sd)]
    assert outs[0].sequences.tolist() == outs[1].sequences.tolist()
    torch.testing.assert_close(torch.stack(outs[0].logits), torch.stack(outs[1].logits), rtol=1e-4, atol=1e-5)
    fake.calls.clear()
    with torch.no_grad():
        out = xf.model(input_ids=ids[1:], use_cache=True)  # an unpadded prefill goes to xformers
    assert len(fake.calls) == 2 and fake.calls[0]["seqlens"] == [5]
    torch.testing.assert_close(out.logits, sd.model(input_ids=ids[1:]).logits, rtol=1e-5, atol=1e-5)
    layout = sequence_layout(xf.model, packing_ok=True)
    assert layout([[5] * 4] * 16, [[6] * 8] * 16).position_ids is not None  # packed, where SDPA would pad


def test_info_reports_the_attention_path(monkeypatch):
    from fastrl import info

    fake = _FakeXformers().install(monkeypatch)
    assert fake is not None
    _stand_in(monkeypatch, flash_attn=False)
    assert info._attention(True) == "xformers" and info._attention(False) == "sdpa"
    _stand_in(monkeypatch, flash_attn=True)
    assert info._attention(True) == "flash"
    report = info.collect()
    assert report["backends"]["attention"] == ("flash" if torch.cuda.is_available() else "sdpa")
    assert f"attention       {report['backends']['attention']}" in info.format_report(report)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 5e-2), (torch.float32, 1e-3)])
def test_xformers_packed_matches_padded_sdpa(monkeypatch, dtype, tol):
    """On a GPU with xformers: a packed batch through xformers' memory_efficient_attention
    (block-diagonal causal mask from the sequence lengths) gives the loss and gradients of the
    padded batch through SDPA, and xformers really ran once per layer. bf16 goes to a flash
    kernel, fp32 to the memory-efficient (cutlass) one."""
    xformers_ops = pytest.importorskip("xformers.ops")
    from fastrl.train import attention

    impl = attention.hf_implementation(attention.select("xformers", "cuda"))
    calls = []
    real = xformers_ops.memory_efficient_attention

    def counted(*args, **kwargs):
        calls.append(kwargs["attn_bias"])
        return real(*args, **kwargs)

    monkeypatch.setattr(xformers_ops, "memory_efficient_attention", counted)
    prompts, completions = _pairs()
    loss_fn = FusedLinearDPOLoss(beta=0.1)
    ref = torch.linspace(-20, -10, 6).cuda(), torch.linspace(-25, -15, 6).cuda()
    results = []
    for attn, layout in ((impl, pack), ("sdpa", pad)):
        model = load_model(None, dict(TINY["qwen2"], hidden_size=64), dtype=dtype, attn_implementation=attn, seed=0)
        policy = Policy(model.cuda().train())
        batch = layout(prompts, completions).to("cuda")
        loss, _ = policy(batch, lambda h, w, b: loss_fn(h, w, batch.labels, *ref, cu_seqlens=batch.cu_seqlens))
        loss.backward()
        results.append((loss.detach().float(), {n: p.grad.float() for n, p in policy.named_parameters()}))
    assert len(calls) == TINY["qwen2"]["num_hidden_layers"]
    (loss_a, grad_a), (loss_b, grad_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=tol / 2, atol=tol / 2)
    for name in grad_a:
        rel = (grad_a[name] - grad_b[name]).norm() / grad_b[name].norm().clamp_min(1e-12)
        assert rel < tol, name
