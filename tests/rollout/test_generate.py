"""fastrl.rollout.generate on tiny random Hugging Face models (built from configs, nothing downloaded):
greedy equals HF generate, stop tokens and early exit, one prefill shared by the G samples, seeded
draws, sampler log-probs against a full forward, input errors. The CUDA-graph path is @gpu."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastrl.rollout import generate  # noqa: E402

VOCAB = 256
MAX_POS = 64


def _build(kind: str, dtype=torch.float32):
    torch.manual_seed({"llama": 0, "qwen2": 1, "qwen3": 2, "mistral": 3, "gpt2": 4}[kind])
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=16))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=None))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POS, bos_token_id=1, eos_token_id=2))
    return model.to(dtype).eval()


_MODELS: dict = {}


def model_of(kind: str):
    if kind not in _MODELS:
        _MODELS[kind] = _build(kind)
    return _MODELS[kind]


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]


def _hf_greedy(model, prompt, max_new_tokens):
    """HF generate on the prompt alone (no padding): the completion, stopping at EOS like ours."""
    mask = torch.ones(1, len(prompt), dtype=torch.long, device=prompt.device)
    out = model.generate(prompt[None], attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt):]


def _rows(out, i):
    return out.completion_ids[i, : int(out.lengths[i])]


class EmbeddingCalls:
    """Counts forward calls of the input embedding and records their input shapes (prefill = first)."""

    def __init__(self, model):
        self.shapes = []
        self.handle = model.get_input_embeddings().register_forward_hook(
            lambda module, args, output: self.shapes.append(tuple(args[0].shape)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# -- greedy == Hugging Face ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind,engine", [("llama", "fastrl"), ("qwen2", "fastrl"), ("llama", "hf"), ("qwen2", "hf"),
                                         ("qwen3", "fastrl"), ("mistral", "fastrl"), ("gpt2", "auto")])
def test_greedy_equals_hf_generate(kind, engine):
    model = model_of(kind)
    prompts = _prompts([5, 11, 1, 8])
    out = generate(model, prompts, max_new_tokens=20, temperature=0.0, num_samples=2, engine=engine)
    assert out.completion_ids.shape[0] == 8 and out.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for p, prompt in enumerate(prompts):
        ref = _hf_greedy(model, prompt, 20)
        for row in (2 * p, 2 * p + 1):
            assert torch.equal(_rows(out, row), ref), (kind, engine, p)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_top_k_one_is_greedy(kind):
    model = model_of(kind)
    prompts = _prompts([4, 9], seed=1)
    out = generate(model, prompts, max_new_tokens=12, top_k=1, generator=torch.Generator().manual_seed(0))
    for p, prompt in enumerate(prompts):
        assert torch.equal(_rows(out, p), _hf_greedy(model, prompt, 12))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_tensor_input_equals_list(side):
    model = model_of("qwen2")
    prompts = _prompts([3, 7, 5], seed=2)
    width = 7
    ids = torch.full((3, width), 0, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        cols = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, cols], mask[i, cols] = p, 1
    a = generate(model, prompts, max_new_tokens=10, temperature=0.0)
    b = generate(model, ids, attention_mask=mask, max_new_tokens=10, temperature=0.0)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.lengths, b.lengths)


# -- stop tokens and early exit -----------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["fastrl", "hf"])
def test_stop_tokens_end_rows(engine):
    model = model_of("llama")
    prompts = _prompts([6, 3, 10], seed=3)
    free = generate(model, prompts, max_new_tokens=16, temperature=0.0, stop_token_ids=[], engine=engine)
    assert free.lengths.tolist() == [16, 16, 16] and not free.stopped.any()
    stop = int(free.completion_ids[0, 4])
    out = generate(model, prompts, max_new_tokens=16, temperature=0.0, stop_token_ids=[stop], pad_token_id=-1,
                   engine=engine)
    for i in range(3):
        row = free.completion_ids[i]
        hits = (row == stop).nonzero()
        length = int(hits[0]) + 1 if len(hits) else 16
        assert int(out.lengths[i]) == length
        assert bool(out.stopped[i]) == bool(len(hits))
        assert torch.equal(out.completion_ids[i, :length], row[:length])
        assert (out.completion_ids[i, length:] == -1).all()
        assert (out.logprobs[i, length:] == 0).all()
    assert out.completion_ids.shape[1] == int(out.lengths.max())
    assert out.finish_reasons[0] == "stop"
    assert torch.equal(out.completion_mask, out.completion_ids != -1)


@pytest.mark.parametrize("engine", ["fastrl", "hf"])
def test_early_exit_when_every_row_stopped(engine):
    model = model_of("qwen2")
    prompts = _prompts([4, 7, 2, 9], seed=4)
    free = generate(model, prompts, max_new_tokens=24, temperature=0.0, stop_token_ids=[], engine=engine)
    stops = free.completion_ids[:, 2].unique().tolist()  # every row stops by its 3rd token
    with EmbeddingCalls(model) as calls:
        out = generate(model, prompts, max_new_tokens=24, temperature=0.0, stop_token_ids=stops, engine=engine)
    assert out.stopped.all() and int(out.lengths.max()) <= 3
    # one prefill, then one step per token fed back: the last sampled token is never fed
    assert len(calls.shapes) == int(out.lengths.max())


def test_one_new_token_needs_only_the_prefill():
    model = model_of("llama")
    prompt = _prompts([6], seed=14)
    with EmbeddingCalls(model) as calls:
        out = generate(model, prompt, max_new_tokens=1, num_samples=3, temperature=0.0)
    assert len(calls.shapes) == 1 and out.completion_ids.shape == (3, 1)
    assert (out.completion_ids[:, 0] == _hf_greedy(model, prompt[0], 1)).all()


# -- prefill sharing -----------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["fastrl", "hf"])
def test_samples_share_one_prefill(engine):
    model = model_of("llama")
    prompts = _prompts([5, 9], seed=5)
    with EmbeddingCalls(model) as calls:
        out = generate(model, prompts, max_new_tokens=6, num_samples=4, stop_token_ids=[], engine=engine,
                       generator=torch.Generator().manual_seed(0))
    prefill, *steps = calls.shapes
    assert prefill == (2, 9)  # each prompt once, left-padded to the longest: not P * G rows
    assert len(steps) == 5 and all(s[0] == 8 and (len(s) == 1 or s[1] == 1) for s in steps)
    assert out.completion_ids.shape == (8, 6)
    assert out.prompt_index.tolist() == [0] * 4 + [1] * 4


def test_shared_prefill_equals_separate_prompts():
    """The G copies of one prompt's cache behave as G separate prefills: same greedy continuation
    from each copy, and the same first-step log-probs as a single-sample run."""
    model = model_of("qwen2")
    prompts = _prompts([6, 3], seed=6)
    one = generate(model, prompts, max_new_tokens=8, temperature=0.0, stop_token_ids=[])
    many = generate(model, prompts, max_new_tokens=8, temperature=0.0, stop_token_ids=[], num_samples=3)
    assert torch.equal(many.completion_ids, one.completion_ids.repeat_interleave(3, 0))


# -- randomness and log-probs ---------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["fastrl", "hf"])
def test_seeded_draws_are_reproducible(engine):
    model = model_of("llama")
    prompts = _prompts([5, 8], seed=7)

    def run(seed):
        return generate(model, prompts, max_new_tokens=12, num_samples=3, temperature=1.0, top_p=0.95,
                        stop_token_ids=[], engine=engine, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    assert len({tuple(r) for r in a.completion_ids[:3].tolist()}) > 1  # the G samples differ


def test_engines_draw_the_same_tokens():
    model = model_of("qwen2")
    prompts = _prompts([5, 8], seed=8)
    kw = dict(max_new_tokens=10, num_samples=2, temperature=0.9, stop_token_ids=[])
    a = generate(model, prompts, engine="fastrl", generator=torch.Generator().manual_seed(3), **kw)
    b = generate(model, prompts, engine="hf", generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a.completion_ids, b.completion_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("settings", [{"temperature": 0.7}, {"temperature": 1.3, "top_k": 20, "top_p": 0.9}])
def test_logprobs_equal_full_forward(kind, settings):
    model = model_of(kind)
    prompts = _prompts([4, 10, 7], seed=9)
    out = generate(model, prompts, max_new_tokens=12, num_samples=2, stop_token_ids=[5, 6, 7],
                   generator=torch.Generator().manual_seed(11), **settings)
    t = settings["temperature"]
    for row in range(out.completion_ids.shape[0]):
        prompt, n = prompts[int(out.prompt_index[row])], int(out.lengths[row])
        completion = out.completion_ids[row, :n]
        with torch.no_grad():
            logits = model(torch.cat([prompt, completion])[None]).logits[0, len(prompt) - 1: len(prompt) + n - 1]
        expected = torch.log_softmax(logits.float() / t, -1).gather(-1, completion[:, None])[:, 0]
        torch.testing.assert_close(out.logprobs[row, :n], expected, atol=2e-5, rtol=1e-5)
        assert (out.logprobs[row, n:] == 0).all()


def test_per_row_settings():
    """Temperature 0 for prompt 0 (greedy), sampled for prompt 1; given per prompt or per row."""
    model = model_of("llama")
    prompts = _prompts([5, 6], seed=10)
    ref = _hf_greedy(model, prompts[0], 10)
    for temperature in (torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0, 1.0, 1.0])):
        out = generate(model, prompts, max_new_tokens=10, num_samples=2, temperature=temperature,
                       generator=torch.Generator().manual_seed(0))
        assert torch.equal(_rows(out, 0), ref) and torch.equal(_rows(out, 1), ref)


def test_bf16_model_runs():
    model = copy.deepcopy(model_of("qwen2")).to(torch.bfloat16)
    prompts = _prompts([5, 9], seed=12)
    out = generate(model, prompts, max_new_tokens=8, num_samples=2, stop_token_ids=[],
                   generator=torch.Generator().manual_seed(0))
    assert out.completion_ids.shape == (4, 8) and out.logprobs.dtype == torch.float32
    assert torch.isfinite(out.logprobs).all() and (out.logprobs <= 0).all()


def test_progress_bar_runs():
    pytest.importorskip("tqdm")
    out = generate(model_of("llama"), _prompts([3]), max_new_tokens=4, temperature=0.0, progress=True)
    assert out.completion_ids.shape[0] == 1


def test_bf16_sampler_logprobs_within_hf_bf16_error():
    """A bf16 rollout's sampler log-probs are as close to an fp32 forward of the same tokens (same
    weights) as HF's own bf16 forward is. Queries and keys scaled up so that scores reach ~|20|, where
    bf16-rounded scores (step 0.125) put the rollout ~10% further off than HF."""
    torch.manual_seed(1)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=MAX_POS, initializer_range=0.1)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10.0)
            layer.self_attn.k_proj.weight.mul_(10.0)
    bf16 = model.to(torch.bfloat16)
    fp32 = copy.deepcopy(bf16).float()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g) for n in (5, 9, 14, 3)]
    out = generate(bf16, prompts, max_new_tokens=40, num_samples=4, stop_token_ids=[], engine="fastrl",
                   generator=torch.Generator().manual_seed(0))
    ours, hf = [], []
    for row in range(out.completion_ids.shape[0]):
        prompt, completion = prompts[int(out.prompt_index[row])], out.completion_ids[row]
        tokens = torch.cat([prompt, completion])[None]
        with torch.no_grad():
            exact, rounded = (torch.log_softmax(m(tokens).logits[0, len(prompt) - 1: -1].float(), -1)
                              .gather(-1, completion[:, None])[:, 0] for m in (fp32, bf16))
        ours.append((out.logprobs[row] - exact).abs())
        hf.append((rounded - exact).abs())
    ours, hf = torch.cat(ours).mean(), torch.cat(hf).mean()
    assert hf > 1e-3  # bf16 does cost accuracy here
    assert ours <= 1.05 * hf, (float(ours), float(hf))


# -- what a call keeps, which engine ran ------------------------------------------------------------------

class _Constructed:
    """Every LeanDecoder built while installed."""

    def __init__(self, monkeypatch):
        from fastrl.rollout import decoders

        self.built = []
        real = decoders.LeanDecoder
        built = self.built

        class Counting(real):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                built.append(self)

        monkeypatch.setattr(decoders, "LeanDecoder", Counting)


def test_decoder_is_released_unless_kept(monkeypatch):
    import importlib

    model = copy.deepcopy(model_of("llama"))
    kept = importlib.import_module("fastrl.rollout.decoders").kept_decoders()
    made = _Constructed(monkeypatch)
    kw = dict(max_new_tokens=6, num_samples=2, temperature=0.0, stop_token_ids=[])
    plain = generate(model, _prompts([5, 8]), **kw)
    assert model not in kept and made.built[-1].keys == []  # the KV cache is gone when generate returns
    first = generate(model, _prompts([5, 8]), keep_graph=True, **kw)
    decoder = kept[model]
    assert decoder is made.built[-1] and len(decoder.keys) == 2 and decoder.length == 128
    again = generate(model, _prompts([9, 3], seed=1), keep_graph=True, **kw)  # same rows, same length bucket
    assert kept[model] is decoder and len(made.built) == 2  # reused: nothing new allocated
    assert torch.equal(first.completion_ids, plain.completion_ids)
    assert torch.equal(again.completion_ids, generate(model, _prompts([9, 3], seed=1), **kw).completion_ids)
    assert model not in kept and decoder.keys == []  # a call without keep_graph frees the kept one
    generate(model, _prompts([5, 8]), keep_graph=True, **kw)
    generate(model, _prompts([5]), keep_graph=True, **kw)  # other rows: the old one is freed, a new one kept
    assert made.built[-2].keys == [] and kept[model] is made.built[-1]
    from fastrl.rollout import release

    release(model)
    assert model not in kept and made.built[-1].keys == []
    with pytest.raises(TypeError, match="keep_graph"):
        generate(model, _prompts([5]), keep_graph=1, **kw)


def test_decoder_is_released_when_a_check_raises(monkeypatch):
    """A bad row raised at one of the rollout's checks (or an error inside a step) still frees the KV
    cache and graphs: nothing is held through a caller that catches the error and goes on."""
    import importlib

    model = copy.deepcopy(model_of("llama"))
    kept = importlib.import_module("fastrl.rollout.decoders").kept_decoders()
    made = _Constructed(monkeypatch)
    top_p = torch.tensor([0.9, 1.5])  # row 1 out of range: deferred, raised at the end
    with pytest.raises(ValueError, match="top_p"):
        generate(model, _prompts([5, 8]), max_new_tokens=4, top_p=top_p, stop_token_ids=[])
    assert made.built[-1].keys == [] and model not in kept
    with pytest.raises(ValueError, match="top_p"):  # kept when asked to keep it, error or not: reusable
        generate(model, _prompts([5, 8]), max_new_tokens=4, top_p=top_p, stop_token_ids=[], keep_graph=True)
    assert kept[model] is made.built[-1] and len(made.built[-1].keys) > 0
    generate(model, _prompts([5, 8]), max_new_tokens=4, stop_token_ids=[])  # the next plain call frees it
    assert model not in kept and all(d.keys == [] for d in made.built)


@pytest.mark.parametrize("kind,engine,ran", [("llama", "auto", "fastrl"), ("llama", "hf", "hf"),
                                             ("gpt2", "auto", "hf")])
def test_rollout_reports_the_engine_that_ran(kind, engine, ran):
    out = generate(model_of(kind), _prompts([4]), max_new_tokens=3, temperature=0.0, engine=engine)
    assert out.engine == ran


# -- errors ---------------------------------------------------------------------------------------------

def _bad_generator_model():
    return copy.deepcopy(model_of("llama")).to("meta")


@pytest.mark.parametrize("kwargs,name", [
    ({"prompt_ids": []}, "prompt_ids"),
    ({"prompt_ids": [torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)]}, r"prompt_ids\[1\]"),
    ({"prompt_ids": [torch.arange(MAX_POS) % VOCAB]}, "prompt_ids"),  # no room left in the cache
    ({"prompt_ids": [torch.tensor([1, VOCAB])]}, r"prompt_ids\[0\]"),
    ({"prompt_ids": [torch.tensor([1.0, 2.0])]}, r"prompt_ids\[0\]"),
    ({"max_new_tokens": MAX_POS}, "max_new_tokens"),  # prompt + completion longer than the cache
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_length": 3}, "prompt_ids"),
    ({"max_length": 5, "max_new_tokens": 3}, "max_new_tokens"),
    ({"num_samples": 0}, "num_samples"),
    ({"stop_token_ids": [VOCAB]}, "stop_token_ids"),
    ({"stop_token_ids": -1}, "stop_token_ids"),
    ({"stop_token_ids": [1.5]}, "stop_token_ids"),
    ({"stop_token_ids": "2"}, "stop_token_ids"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"temperature": torch.ones(3)}, "temperature"),
    ({"engine": "tgi"}, "engine"),
    ({"prompt_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.tensor([[1, 0, 1]])}, "attention_mask"),
    ({"prompt_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.tensor([[0, 0, 0]])}, "attention_mask"),
    ({"prompt_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.tensor([[1, 2, 1]])}, "attention_mask"),
    ({"prompt_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 2)}, "attention_mask"),
    ({"attention_mask": torch.ones(1, 3)}, "attention_mask"),  # with a list of prompts
])
def test_bad_inputs_raise_value_error_naming_the_argument(kwargs, name):
    args = {"prompt_ids": [torch.tensor([1, 2, 3])], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        generate(model_of("llama"), args.pop("prompt_ids"), **args)


def test_generator_on_another_device():
    with pytest.raises(ValueError, match="generator"):
        generate(_bad_generator_model(), [torch.tensor([1, 2])], max_new_tokens=2, generator=torch.Generator())


def test_lean_engine_refuses_unsupported_models():
    with pytest.raises(ValueError, match="engine='fastrl'"):
        generate(model_of("gpt2"), [torch.tensor([1, 2])], max_new_tokens=2, engine="fastrl")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_engine_without_vllm_says_so():
    with pytest.raises(ImportError, match="vllm"):
        generate(model_of("llama"), [torch.tensor([1, 2])], max_new_tokens=2, engine="vllm")


# -- GPU: the CUDA-graph decode step ----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_cuda_graph_decode_equals_eager_and_hf(kind, monkeypatch):
    """One graph per kv-length bucket (16 slots here: prompts up to 11 + 20 tokens use the 16 and 32
    buckets), equal to eager and HF; a kept decoder is reused, a plain call frees its graphs."""
    import importlib

    from fastrl.rollout import decoders, release

    monkeypatch.setattr(decoders, "KV_BUCKET", 16)
    kept = importlib.import_module("fastrl.rollout.decoders").kept_decoders()
    model = copy.deepcopy(model_of(kind)).cuda()
    prompts = [p.cuda() for p in _prompts([5, 11, 1, 8], seed=13)]
    graphed = generate(model, prompts, max_new_tokens=20, temperature=0.0, num_samples=2, keep_graph=True)
    decoder = kept[model]
    assert decoder.cuda_graph and sorted(decoder._graphs) == [16, 32]
    again = generate(model, prompts[::-1], max_new_tokens=20, temperature=0.0, num_samples=2, keep_graph=True)
    assert kept[model] is decoder  # graphs reused
    eager = generate(model, prompts, max_new_tokens=20, temperature=0.0, num_samples=2, cuda_graph=False)
    assert model not in kept and decoder._graphs == {}  # released by the plain call
    assert torch.equal(graphed.completion_ids, eager.completion_ids)
    assert torch.equal(again.completion_ids.view(4, 2, -1).flip(0).reshape(8, -1), eager.completion_ids)
    for p, prompt in enumerate(prompts):
        assert torch.equal(_rows(graphed, 2 * p), _hf_greedy(model, prompt, 20))
    sampled = [generate(model, prompts, max_new_tokens=16, num_samples=4, stop_token_ids=[],
                        generator=torch.Generator("cuda").manual_seed(0)) for _ in range(2)]
    assert torch.equal(sampled[0].completion_ids, sampled[1].completion_ids)
    assert model not in kept
    release(model)
