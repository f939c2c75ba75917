"""fastrl.rollout.generate with an image model (fastrl.rollout.image): classifier-free guidance, the
BiCoT text plan, range models, on tiny random models built from configs.

References: greedy CFG equals Hugging Face's Janus ``generate(generation_mode="image")`` token for
token; sampled log-probs equal the fp64 ``log_softmax`` of the CFG mix of logits recomputed with HF's
forward of the whole sequence (+ ``generation_head``); the plan equals HF's greedy text generation;
the lean decoder (eager and static-shape) equals the HF decoder."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from fastrl.rollout import decoders, generate  # noqa: E402
from fastrl.rollout.image import image_model, tiny_janus  # noqa: E402

_MODELS: dict = {}


def _janus():
    """tiny_janus with its language model's layers redrawn (std 0.2): with the default init the trunk
    barely moves the hidden state and greedy codes hardly depend on the prompt."""
    if "janus" not in _MODELS:
        model = tiny_janus(seed=0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            for p in model.model.language_model.layers.parameters():
                if p.dim() > 1:
                    nn.init.normal_(p, std=0.2)
        _MODELS["janus"] = model
    return _MODELS["janus"]


def _llama(vocab=96):
    key = ("llama", vocab)
    if key not in _MODELS:
        torch.manual_seed(5)
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = transformers.LlamaForCausalLM(config)
        with torch.no_grad():
            for p in model.model.layers.parameters():
                if p.dim() > 1:
                    p.normal_(std=0.1)
        _MODELS[key] = model.eval()
    return _MODELS[key]


def _range_image(model=None):
    """A Llama whose ids [64, 96) are image codes, 6 codes per image, BOI 60."""
    return image_model(model or _llama(), image_token_range=(64, 96), image_tokens=6, boi_id=60, eoi_id=61)


PROMPTS = [[1, 5, 6, 7], [1, 9], [1, 30, 31, 32, 33, 34]]


def _codes(out, im):
    """[rows, N] codes of a rollout: the N columns from each row's image_start."""
    index = out.image_start[:, None] + torch.arange(im.image_tokens)
    return out.completion_ids.gather(1, index) - im.offset


def _hf_image(model, prompt, w):
    ids = torch.tensor([prompt])
    return model.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", guidance_scale=w,
                          do_sample=False)[0]


# -- greedy CFG equals HF's Janus generate -----------------------------------------------------------------

@pytest.mark.parametrize("engine", ["fastrl", "hf"])
@pytest.mark.parametrize("w", [2.0, 5.0])
def test_greedy_cfg_equals_hf_janus_generate(w, engine):
    """Several prompts of different lengths (left-padded here, unpadded in HF), BOI appended (HF's
    processor ends the prompt with it): the same codes token for token, and the layout."""
    model = _janus()
    im = image_model(model)
    out = generate(model, [torch.tensor(p) for p in PROMPTS], image=im, cfg_weight=w, temperature=0.0,
                   num_samples=2, engine=engine)
    assert out.engine == engine
    n = im.image_tokens
    assert out.completion_ids.shape == (6, n) and out.lengths.tolist() == [n] * 6
    assert out.image_start.tolist() == [0] * 6 and bool(out.stopped.all())
    assert out.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    codes = im.codes(out.completion_ids)
    for p, prompt in enumerate(PROMPTS):
        ref = _hf_image(model, prompt + [im.boi_id], w)
        assert torch.equal(codes[2 * p], ref) and torch.equal(codes[2 * p + 1], ref)
    # a prompt already ending with BOI is taken as it is; a padded [P, L] batch with HF's left padding
    longest = max(len(p) for p in PROMPTS) + 1
    ids = torch.zeros(3, longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        ids[i, longest - len(p) - 1:] = torch.tensor(p + [im.boi_id])
        mask[i, longest - len(p) - 1:] = 1
    padded = generate(model, ids, attention_mask=mask, image=True, cfg_weight=w, temperature=0.0, engine=engine)
    hf = model.generate(ids, attention_mask=mask, generation_mode="image", guidance_scale=w, do_sample=False)
    assert torch.equal(im.codes(padded.completion_ids), hf)
    assert torch.equal(padded.completion_ids, out.completion_ids[::2])


def test_text_model_with_cfg_weight_one_is_todays_output():
    model = _llama()
    prompts = [torch.tensor(p) for p in PROMPTS]
    kwargs = dict(max_new_tokens=12, num_samples=3, temperature=0.9, top_k=20, stop_token_ids=[2])
    plain = generate(model, prompts, generator=torch.Generator().manual_seed(3), **kwargs)
    same = generate(model, prompts, generator=torch.Generator().manual_seed(3), image=None, cfg_weight=1.0,
                    uncond_prompt_ids=None, plan_max_tokens=0, plan_stop_token_ids=None, **kwargs)
    assert torch.equal(plain.completion_ids, same.completion_ids)
    assert torch.equal(plain.logprobs, same.logprobs) and torch.equal(plain.lengths, same.lengths)
    assert same.cond_logprobs is same.logprobs and same.image_start is None


@pytest.mark.parametrize("w", [1.0, 2.0])
def test_one_prefill_per_prompt_and_none_unconditional_at_w_one(w, monkeypatch):
    """The prefill runs once: the P prompts (and at w != 1 their P unconditional prompts), shared by
    the G samples. At w = 1 the codes equal HF's (its generate skips its CFG processor at w <= 1)."""
    model = _janus()
    im = image_model(model)
    seen, prefill = [], decoders.trunk_prefill

    def spy(trunk, embeds, *args):
        seen.append(embeds.shape[0])
        return prefill(trunk, embeds, *args)

    monkeypatch.setattr(decoders, "trunk_prefill", spy)
    out = generate(model, [torch.tensor(p) for p in PROMPTS], image=im, temperature=0.0, num_samples=2,
                   cfg_weight=w, engine="fastrl")
    assert seen == [3 if w == 1 else 6]
    if w != 1:
        return
    assert out.cond_logprobs is out.logprobs
    for p, prompt in enumerate(PROMPTS):  # HF's generate fails at w = 1: a full forward per code instead
        codes = torch.zeros(0, dtype=torch.long)
        for _ in range(im.image_tokens):
            logits = _janus_logits(model, im, prompt + [im.boi_id], torch.cat([codes, codes.new_zeros(1)]))
            codes = torch.cat([codes, logits[-1].argmax()[None]])
        assert torch.equal(im.codes(out.completion_ids[2 * p: 2 * p + 1])[0], codes)


# -- sampled log-probs against a recompute -------------------------------------------------------------------

def _janus_logits(model, im, prompt, codes):
    """[N, C] image logits at each code of ``prompt + codes`` (the last position of the prompt then each
    code but the last), from HF's language-model forward of the whole sequence + generation_head."""
    with torch.no_grad():
        text = model.get_input_embeddings()(torch.tensor(prompt))
        image = model.prepare_embeddings_for_image_generation(codes[:-1])
        hidden = model.model.language_model(inputs_embeds=torch.cat([text, image])[None]).last_hidden_state[0]
        return model.model.generation_head(hidden[len(prompt) - 1:]).double()


def _check_logprobs(logprobs, cond_logprobs, cond, uncond, tokens, w, temperature):
    mixed = uncond + w * (cond - uncond)
    ref = torch.log_softmax(mixed / temperature, -1).gather(1, tokens[:, None])[:, 0]
    ref_cond = torch.log_softmax(cond / temperature, -1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprobs.double(), ref, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(cond_logprobs.double(), ref_cond, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("uncond", ["default", "one", "per_prompt"])
def test_sampled_logprobs_equal_fp64_cfg_mix_of_hf_forward(uncond):
    model = _janus()
    im = image_model(model)
    w, temperature = 3.0, 0.9
    given = {"default": None, "one": [1, 0, 0], "per_prompt": [[1, 0], [1, 0, 0, 0, 0, 0, 0, 0], [1, 8, 9, im.boi_id]]}
    out = generate(model, [torch.tensor(p) for p in PROMPTS], image=im, cfg_weight=w, temperature=temperature,
                   num_samples=3, uncond_prompt_ids=given[uncond], generator=torch.Generator().manual_seed(4))
    codes = im.codes(out.completion_ids)
    assert not torch.equal(out.logprobs, out.cond_logprobs)
    for row in range(out.completion_ids.shape[0]):
        p = int(out.prompt_index[row])
        prompt = PROMPTS[p] + [im.boi_id]
        u_prompt = {"default": im.uncond_prompt(prompt), "one": [1, 0, 0, im.boi_id],
                    "per_prompt": given["per_prompt"][p] + ([] if p == 2 else [im.boi_id])}[uncond]
        cond = _janus_logits(model, im, prompt, codes[row])
        unc = _janus_logits(model, im, u_prompt, codes[row])
        _check_logprobs(out.logprobs[row], out.cond_logprobs[row], cond, unc, codes[row], w, temperature)


def test_draws_are_reproducible_and_follow_the_generator():
    model = _janus()
    run = functools.partial(generate, model, [torch.tensor(p) for p in PROMPTS], image=True, cfg_weight=4.0,
                            num_samples=2)
    first = run(generator=torch.Generator().manual_seed(7))
    again = run(generator=torch.Generator().manual_seed(7))
    other = run(generator=torch.Generator().manual_seed(8))
    assert torch.equal(first.completion_ids, again.completion_ids) and torch.equal(first.logprobs, again.logprobs)
    assert not torch.equal(first.completion_ids, other.completion_ids)


# -- BiCoT: a text plan, then BOI, then the image ---------------------------------------------------------

def _hf_plan(model, prompt, stops, max_tokens):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                         generation_mode="text", eos_token_id=stops, pad_token_id=0)[0, len(prompt):].tolist()
    for i, t in enumerate(out):
        if t in stops:
            return out[:i + 1]
    return out


@pytest.mark.parametrize("engine", ["fastrl", "hf"])
def test_bicot_greedy_plan_then_image_equals_hf(engine):
    """Greedy plans of different lengths (ending on a stop token or on the length: the rows start
    their images at different steps) equal HF's text generation; BOI is forced after them; the image
    equals HF's image generation on prompt + plan + BOI (its unconditional prompt given the same: the
    pad-masked prompt + plan + BOI)."""
    model = _janus()
    im = image_model(model)
    stops, max_tokens, w = [4, 19], 3, 3.0
    plans = [_hf_plan(model, p, stops, max_tokens) for p in PROMPTS]
    assert len({len(p) for p in plans}) == 3  # the rows finish their plans at different steps
    uncond = [im.uncond_prompt(p + plan + [im.boi_id]) for p, plan in zip(PROMPTS, plans)]
    out = generate(model, [torch.tensor(p) for p in PROMPTS], image=im, cfg_weight=w, temperature=0.0,
                   plan_max_tokens=max_tokens, plan_stop_token_ids=stops, uncond_prompt_ids=uncond, engine=engine)
    n = im.image_tokens
    for row, (prompt, plan) in enumerate(zip(PROMPTS, plans)):
        start = len(plan) + 1
        assert int(out.image_start[row]) == start and int(out.lengths[row]) == start + n
        ids = out.completion_ids[row]
        assert ids[:start].tolist() == plan + [im.boi_id]
        # the forced BOI carries its log-prob under the model (greedy: 0 if it is the maximum, else -inf)
        text = model(input_ids=torch.tensor([prompt + plan])).logits[0, -1].double()
        expected = 0.0 if int(text.argmax()) == im.boi_id else float("-inf")
        assert float(out.logprobs[row, start - 1]) == expected == float(out.cond_logprobs[row, start - 1])
        assert bool((ids[start + n:] == 0).all())  # padding after the image
        assert torch.equal(ids[start:start + n] - im.offset, _hf_image(model, prompt + plan + [im.boi_id], w))
    assert torch.equal(im.codes(out.completions), _codes(out, im))  # the rows without their padding
    # the default unconditional prompt (the pad-masked prompt + BOI, no plan) changes the image, not the plan
    default = generate(model, [torch.tensor(p) for p in PROMPTS], image=im, cfg_weight=w, temperature=0.0,
                       plan_max_tokens=max_tokens, plan_stop_token_ids=stops, engine=engine)
    assert torch.equal(default.image_start, out.image_start)
    for row, plan in enumerate(plans):
        assert default.completion_ids[row, :len(plan)].tolist() == plan


def test_bicot_sampled_plans_end_on_a_stop_token_or_the_length():
    model = _janus()
    im = image_model(model)
    boi, n, max_tokens = im.boi_id, im.image_tokens, 5
    stops = [boi, 4, 19, 23]
    out = generate(model, [torch.tensor(p) for p in PROMPTS], image=im, cfg_weight=2.0, temperature=1.5, num_samples=8,
                   plan_max_tokens=max_tokens, plan_stop_token_ids=stops, generator=torch.Generator().manual_seed(5))
    kinds = set()
    for row in range(out.completion_ids.shape[0]):
        ids, lp, clp = out.completion_ids[row].tolist(), out.logprobs[row], out.cond_logprobs[row]
        start = int(out.image_start[row])
        assert ids[start - 1] == boi and int(out.lengths[row]) == start + n
        assert all(im.offset <= t < im.offset + im.codebook for t in ids[start:start + n])
        assert all(t == 0 for t in ids[start + n:])
        assert torch.equal(lp[:start], clp[:start])  # no CFG on the plan
        plan = ids[:start - 1]
        if plan and plan[-1] in stops:  # ended on a stop token other than BOI: BOI forced
            kind = "stop"
        elif len(plan) == max_tokens and boi not in plan:
            kind = "length"
        else:  # ended by drawing BOI itself: no BOI added
            kind = "boi"
            plan = ids[:start]
            assert lp[start - 1] < 0
        if kind != "boi":  # forced: its log-prob under the model at T = 1.5, as a drawn token's would be
            text = model(input_ids=torch.tensor([PROMPTS[int(out.prompt_index[row])] + plan])).logits[0, -1].double()
            expected = torch.log_softmax(text / 1.5, -1)[boi]
            torch.testing.assert_close(lp[start - 1].double(), expected, rtol=1e-5, atol=1e-5)
        assert not any(t in stops for t in plan[:-1]) and len(plan) <= max_tokens
        kinds.add(kind)
    assert kinds == {"stop", "length", "boi"}
    # the image's log-probs follow the CFG mix at the right positions: check one row of each prompt
    for row in (0, 8, 16):
        p = int(out.prompt_index[row])
        start = int(out.image_start[row])
        ids = out.completion_ids[row]
        codes = ids[start:start + n] - im.offset
        cond = _janus_logits(model, im, PROMPTS[p] + ids[:start].tolist(), codes)
        unc = _janus_logits(model, im, im.uncond_prompt(PROMPTS[p]) + [boi], codes)
        _check_logprobs(out.logprobs[row, start:start + n], out.cond_logprobs[row, start:start + n], cond, unc, codes,
                        2.0, 1.5)


# -- range models ----------------------------------------------------------------------------------------

def test_range_model_draws_codes_in_its_range_with_cfg():
    model = _llama()
    im = _range_image(model)
    lo, hi = 64, 96
    w, temperature = 3.0, 1.0
    out = generate(model, [torch.tensor(p) for p in PROMPTS], image=im, cfg_weight=w, temperature=temperature,
                   num_samples=4, generator=torch.Generator().manual_seed(2))
    ids = out.completion_ids
    assert ids.shape == (12, 6) and bool(((ids >= lo) & (ids < hi)).all())
    assert torch.equal(im.codes(ids), ids - lo)
    with torch.no_grad():
        for row in range(12):
            prompt = PROMPTS[int(out.prompt_index[row])] + [60]
            logits = [model(torch.tensor([q + ids[row, :-1].tolist()])).logits[0, len(q) - 1:, lo:hi].double()
                      for q in (prompt, im.uncond_prompt(prompt))]
            _check_logprobs(out.logprobs[row], out.cond_logprobs[row], *logits, ids[row] - lo, w, temperature)
    # greedy: a range model at w = 1 equals HF's own greedy generation restricted to the range by a mask
    greedy = generate(model, [torch.tensor(PROMPTS[0])], image=im, temperature=0.0)
    seq = PROMPTS[0] + [60]
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1, lo:hi].argmax()) + lo)
    assert greedy.completion_ids[0].tolist() == seq[-6:]


def test_range_model_plan_and_image():
    model = _llama()
    im = _range_image(model)
    out = generate(model, [torch.tensor(p) for p in PROMPTS], image=im, cfg_weight=2.0, num_samples=2,
                   plan_max_tokens=4, plan_stop_token_ids=[2], generator=torch.Generator().manual_seed(1))
    for row in range(6):
        start = int(out.image_start[row])
        ids = out.completion_ids[row, :int(out.lengths[row])]
        assert ids[start - 1] == 60 and 2 <= start <= 5
        assert bool(((ids[start:] >= 64) & (ids[start:] < 96)).all())


# -- decoders ---------------------------------------------------------------------------------------------

def _static_lean(monkeypatch, kv_bucket):
    """Make generate's lean decoder run the static-shape step (what each CUDA graph captures) on CPU."""
    class Static(decoders.LeanDecoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, static_shapes=True, kv_bucket=kv_bucket, **kwargs)

    monkeypatch.setattr(decoders, "LeanDecoder", Static)


@pytest.mark.parametrize("kind", ["janus", "range"])
@pytest.mark.parametrize("lean", ["eager", "static"])
def test_lean_decoder_equals_hf_decoder_for_image_rollouts(lean, kind, monkeypatch):
    """A sampled BiCoT + CFG rollout: the same draws and log-probs from the lean decoder (eager, or
    the static-shape step over kv buckets of 8 slots) and from the HF decoder."""
    model = _janus() if kind == "janus" else _llama()
    prompts = [torch.tensor(p) for p in PROMPTS]
    stops = [4, 19, 23, 62] if kind == "janus" else [*range(3, 30), 60]
    kwargs = dict(image=True if kind == "janus" else _range_image(model), cfg_weight=3.0, num_samples=3,
                  temperature=1.2, plan_max_tokens=4, plan_stop_token_ids=stops)
    hf = generate(model, prompts, engine="hf", generator=torch.Generator().manual_seed(5), **kwargs)
    if lean == "static":
        _static_lean(monkeypatch, 8)
    out = generate(model, prompts, engine="fastrl", generator=torch.Generator().manual_seed(5), **kwargs)
    assert out.engine == "fastrl" and hf.engine == "hf"
    assert len(set(out.image_start.tolist())) > 1
    assert torch.equal(out.completion_ids, hf.completion_ids) and torch.equal(out.image_start, hf.image_start)
    torch.testing.assert_close(out.logprobs, hf.logprobs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.cond_logprobs, hf.cond_logprobs, atol=1e-4, rtol=1e-4)


def test_janus_trunk_is_lean_supported():
    model = _janus()
    im = image_model(model)
    assert decoders.lean_unsupported_reason(model, 64) is not None  # the Janus model itself is no causal LM
    assert decoders.lean_unsupported_reason(model, 64, trunk=im.trunk) is None


# -- bad input --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,name", [
    (dict(cfg_weight=-1.0), "cfg_weight"),
    (dict(plan_max_tokens=-1), "plan_max_tokens"),
    (dict(uncond_prompt_ids=[[1], [1]], cfg_weight=2.0), "uncond_prompt_ids"),
    (dict(uncond_prompt_ids=[[1], [1, 99], [1]], cfg_weight=2.0), "uncond_prompt_ids"),
    (dict(keep_graph=True), "keep_graph"),
    (dict(max_new_tokens=3), "max_new_tokens"),
    (dict(plan_max_tokens=2, plan_stop_token_ids=[64]), "plan_stop_token_ids"),
    (dict(engine="vllm"), "vllm"),
    (dict(stop_token_ids=[2]), "stop_token_ids"),
    (dict(max_length=20), "prompt_ids"),
])
def test_bad_image_input_raises_naming_it(kwargs, name):
    with pytest.raises(ValueError, match=name):
        generate(_janus(), [torch.tensor(p) for p in PROMPTS], image=True, **kwargs)


def test_prompts_that_cannot_fit_raise():
    long = torch.ones(250, dtype=torch.long)  # + BOI + 16 codes > 256 positions
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(_janus(), [long], image=True, cfg_weight=2.0)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(_janus(), [torch.ones(230, dtype=torch.long)], image=True, plan_max_tokens=20)


def test_image_on_a_model_without_an_image_head_raises():
    with pytest.raises(ValueError, match="model"):
        generate(_llama(), [torch.tensor([1, 2])], image=True, cfg_weight=2.0)
    with pytest.raises(TypeError, match="image"):
        generate(_janus(), [torch.tensor([1, 2])], image="janus")
    with pytest.raises(ValueError, match="image"):  # an ImageModel of another model
        generate(_janus(), [torch.tensor([1, 2])], image=_range_image())


def test_guidance_and_plans_need_an_image():
    for kwargs, name in ((dict(cfg_weight=2.0), "cfg_weight"), (dict(plan_max_tokens=3), "plan_max_tokens"),
                         (dict(uncond_prompt_ids=[1]), "uncond_prompt_ids")):
        with pytest.raises(ValueError, match=name):
            generate(_llama(), [torch.tensor([1, 2])], max_new_tokens=2, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(_llama(), [torch.tensor([1, 2])])


# -- GPU: the CUDA-graph image step -------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_graph_image_rollout_equals_eager():
    """Graphs per kv bucket and per mode (plan rows' hidden step, the image step of all rows): the
    same greedy BiCoT + CFG rollout as the eager lean decoder and as HF's decoder."""
    import copy

    model = copy.deepcopy(_janus()).cuda()
    prompts = [torch.tensor(p).cuda() for p in PROMPTS]
    kwargs = dict(image=True, cfg_weight=3.0, num_samples=2, temperature=0.0, plan_max_tokens=3,
                  plan_stop_token_ids=[4, 19])
    graphed = generate(model, prompts, **kwargs)
    eager = generate(model, prompts, cuda_graph=False, **kwargs)
    hf = generate(model, prompts, engine="hf", **kwargs)
    assert torch.equal(graphed.completion_ids, eager.completion_ids)
    assert torch.equal(graphed.completion_ids, hf.completion_ids)
    sampled = [generate(model, prompts, image=True, cfg_weight=5.0, num_samples=4,
                        generator=torch.Generator("cuda").manual_seed(0)) for _ in range(2)]
    assert torch.equal(sampled[0].completion_ids, sampled[1].completion_ids)
