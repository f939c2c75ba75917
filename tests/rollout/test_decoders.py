"""fastrl.rollout.decoders: the lean decoder's static-shape step (what the CUDA graph captures) run on
CPU against Hugging Face greedy decoding, a decoder reused for a second batch (as a kept graph is),
and when the lean decoder declines a model."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastrl.rollout import decoders  # noqa: E402

VOCAB = 256


def _model(kind: str, **extra):
    torch.manual_seed(5)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).eval()


def _greedy(model, decoder, prompts, repeats, new):
    """Drive a decoder by hand: left-pad, prefill, argmax each step. Returns [P * repeats, new]."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):], mask[i, longest - len(p):] = p, 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = decoder.prefill(model, ids, mask, positions, repeats).repeat_interleave(repeats, 0)
        pos = torch.tensor([len(p) for p in prompts]).repeat_interleave(repeats)
        out = []
        for step in range(new):
            tokens = logits.argmax(-1)
            out.append(tokens)
            if step + 1 < new:
                logits = decoder.step(tokens, pos + step, longest + step)
    return torch.stack(out, 1)


def _hf(model, prompt, new):
    return model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=new, eos_token_id=None, pad_token_id=0)[0, len(prompt):]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_static_shape_step_equals_hf_and_survives_reuse(kind):
    model = _model(kind)
    g = torch.Generator().manual_seed(0)
    first = [torch.randint(0, VOCAB, (n,), generator=g) for n in (7, 2, 12)]
    second = [torch.randint(0, VOCAB, (n,), generator=g) for n in (3, 30, 9)]
    decoder = decoders.LeanDecoder(model, 6, 30 + 16, cuda_graph=False, static_shapes=True)
    assert decoder.length == 128  # rounded up to the graph bucket
    for prompts in (first, second):  # the second batch runs on the first one's stale cache
        out = _greedy(model, decoder, prompts, 2, 16)
        for p, prompt in enumerate(prompts):
            ref = _hf(model, prompt, 16)
            assert torch.equal(out[2 * p], ref) and torch.equal(out[2 * p + 1], ref)


@pytest.mark.parametrize("static", [False, True])
def test_nan_in_padding_or_stale_slots_is_harmless(static, monkeypatch):
    """NaN keys/values where a row may not attend (its left padding, a previous batch's slots) must
    not reach the output: masked weights are 0, and 0 * NaN would be NaN."""
    model = _model("llama")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (3, 10)]
    prefill = decoders.hf_prefill

    def nan_padding(model, ids, mask, positions):
        logits, cache = prefill(model, ids, mask, positions)
        for layer in cache.layers:
            layer.keys.masked_fill_(mask[:, None, :, None] == 0, float("nan"))
            layer.values.masked_fill_(mask[:, None, :, None] == 0, float("nan"))
        return logits, cache

    monkeypatch.setattr(decoders, "hf_prefill", nan_padding)
    decoder = decoders.LeanDecoder(model, 2, 10 + 12, cuda_graph=False, static_shapes=static)
    for cache in (*decoder.keys, *decoder.values):
        cache.fill_(float("nan"))  # what a kept decoder could hold from an earlier batch
    out = _greedy(model, decoder, prompts, 1, 12)
    for p, prompt in enumerate(prompts):
        assert torch.equal(out[p], _hf(model, prompt, 12))


def test_eager_and_static_steps_agree():
    model = _model("qwen2")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (4, 9)]
    eager = _greedy(model, decoders.LeanDecoder(model, 4, 9 + 20, cuda_graph=False), prompts, 2, 20)
    static = _greedy(model, decoders.LeanDecoder(model, 4, 9 + 20, cuda_graph=False, static_shapes=True),
                     prompts, 2, 20)
    assert torch.equal(eager, static)


def test_lean_decoder_declines():
    model = _model("llama")
    assert decoders.lean_unsupported_reason(model, 100) is None
    handle = model.model.layers[0].register_forward_pre_hook(lambda *a: None)
    assert "hooks" in decoders.lean_unsupported_reason(model, 100)
    handle.remove()
    windowed = _model("qwen2", use_sliding_window=True, sliding_window=32, max_window_layers=0)
    assert decoders.lean_unsupported_reason(windowed, 16) is None
    assert "sliding" in decoders.lean_unsupported_reason(windowed, 64)
    dynamic = _model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert "rope" in decoders.lean_unsupported_reason(dynamic, 16)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    assert "model_type" in decoders.lean_unsupported_reason(gpt2, 16)
