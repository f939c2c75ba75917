"""Image rollouts with classifier-free guidance: fastrl.rollout.generate(image=..., cfg_weight=5) beside
Hugging Face's Janus ``generate(generation_mode="image", guidance_scale=5)`` and the per-token loop
T2I-R1 writes, on a random Janus model, in images per second.

Shapes: on CPU a tiny Janus (fastrl.rollout.image.tiny_janus: vocab 64, hidden 64, 2 layers, codebook
32) writing images of Janus-Pro's length, 24 x 24 = 576 tokens, fp32; on GPU (FASTRL_BENCH_SCALE=gpu) a Janus-Pro-1B-shaped one (Llama
trunk: hidden 2048, 24 layers, 16 heads, intermediate 5632, vocab 102400; codebook 16384; 576 image
tokens, i.e. 384 x 384) in bf16, random weights. The GRPO shape: P prompts x G samples (T2I-R1: G = 8).

Contenders (every one samples at temperature 1, no top-k / top-p, CFG weight 5, and writes P * G
images of N tokens):

- ``fastrl``: the lean static-KV decoder; conditional and unconditional rows in one batch, each prompt
  (and its unconditional prompt) prefilled once for its G samples; the CFG mix and the draw inside
  the sampler op; CUDA graphs on GPU (``fastrl (no CUDA graph)`` too there).
- ``hf``: ``JanusForConditionalGeneration.generate(generation_mode="image", guidance_scale=5,
  do_sample=True, num_return_sequences=G)`` (its static cache; every copy of a prompt prefilled).
- ``t2i-r1 loop``: the loop of T2I-R1 / Janus's reference generation: (cond, uncond) row pairs per
  sample, ``language_model(inputs_embeds, DynamicCache)`` -> ``generation_head`` -> mix -> softmax ->
  multinomial -> ``prepare_embeddings_for_image_generation`` per token.

``extra_info["images_per_s"]`` = P * G / the median time of one call (CUDA-event median on GPU).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import DEVICE, SCALE, measure

transformers = pytest.importorskip("transformers")

import fastrl.rollout  # noqa: E402
from fastrl.rollout.image import image_model, tiny_janus, tiny_janus_config  # noqa: E402

# tiny_janus_config arguments, then the Llama intermediate size (None: tiny_janus_config's 2 x hidden)
MODEL = {
    "cpu": dict(config=dict(vocab_size=64, codebook=32, image_side=24, hidden_size=64, layers=2, heads=4, kv_heads=2,
                            max_positions=1024), intermediate=None),
    # Janus-Pro-1B's language model and generation head / embedding (deepseek-ai/Janus-Pro-1B config.json)
    "gpu": dict(config=dict(vocab_size=102400, codebook=16384, image_side=24, hidden_size=2048, layers=24, heads=16,
                            kv_heads=16, max_positions=16384), intermediate=5632),
}[SCALE]
# case: (prompts, samples per prompt, prompt length)
CASES = {"cpu": {"group": (2, 4, 16)}, "gpu": {"group": (2, 8, 64)}}[SCALE]
CFG_WEIGHT = 5.0
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
CONTENDERS = ["fastrl", "fastrl (no CUDA graph)", "hf", "t2i-r1 loop"]

_model = None


def _get_model():
    global _model
    if _model is None:
        if SCALE == "cpu":
            _model = tiny_janus(seed=0, **MODEL["config"])
        else:
            config, boi, eoi = tiny_janus_config(**MODEL["config"])
            config.text_config.intermediate_size = MODEL["intermediate"]
            config.vq_config.num_hidden_layers = 2  # Janus-Pro's generation aligner: 8 -> 2048 -> GELU -> 2048
            torch.manual_seed(0)
            with torch.device(DEVICE):
                model = transformers.JanusForConditionalGeneration(config)
            gen = model.generation_config
            gen.generation_kwargs = {**(getattr(gen, "generation_kwargs", None) or {}), "boi_token_id": boi,
                                     "eoi_token_id": eoi}
            gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = 0, 1, 2
            _model = model.to(DTYPE).eval()
    return _model


def _prompts(prompts: int, length: int, boi: int):
    """[P, L] prompts: BOS, random text, BOI last (as Janus's processor writes them)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, MODEL["config"]["vocab_size"] - 3, (prompts, length), generator=g)
    ids[:, 0], ids[:, -1] = 1, boi
    return ids.to(DEVICE)


def t2i_r1_loop(model, ids, samples: int, cfg_weight: float, temperature: float = 1.0):
    """T2I-R1's image sampling loop (as in Janus's reference ``generate``), on the HF modules: rows
    2i / 2i + 1 are sample i's conditional / unconditional prompt (every token but BOS and BOI
    padded), one ``language_model`` call per token with a ``DynamicCache``, the generation head, the
    CFG mix, softmax and multinomial in Python.

    Returns:
        ``[P * G, N]`` int64 codes.
    """
    from transformers import DynamicCache

    inner = model.model
    lm = inner.language_model
    n = inner.vision_model.config.num_image_tokens
    boi = model.generation_config.generation_kwargs["boi_token_id"]
    tokens = ids.repeat_interleave(samples, 0).repeat_interleave(2, 0)
    uncond = tokens[1::2]
    uncond.masked_fill_((uncond != 1) & (uncond != boi), 0)
    embeds = model.get_input_embeddings()(tokens)
    cache = DynamicCache(config=lm.config)
    cache_kwarg = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    out = torch.zeros(tokens.shape[0] // 2, n, dtype=torch.long, device=ids.device)
    for i in range(n):
        hidden = lm(inputs_embeds=embeds, use_cache=True, **{cache_kwarg: cache}).last_hidden_state[:, -1]
        logits = inner.generation_head(hidden)
        cond, unc = logits[0::2], logits[1::2]
        mixed = unc + cfg_weight * (cond - unc)
        probs = torch.softmax(mixed / temperature, dim=-1)
        code = torch.multinomial(probs, num_samples=1)
        out[:, i] = code[:, 0]
        embeds = model.prepare_embeddings_for_image_generation(torch.cat([code, code], 1).view(-1))[:, None]
    return out


def _contender(name, model, im, ids, samples):
    if name in ("fastrl", "fastrl (no CUDA graph)"):
        g = torch.Generator(device=DEVICE).manual_seed(0)
        return lambda: fastrl.rollout.generate(model, ids, image=im, cfg_weight=CFG_WEIGHT, num_samples=samples,
                                               temperature=1.0, generator=g, cuda_graph=name == "fastrl")
    if name == "hf":
        mask = torch.ones_like(ids)
        return lambda: model.generate(ids, attention_mask=mask, generation_mode="image", guidance_scale=CFG_WEIGHT,
                                      do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                      num_return_sequences=samples)
    if name == "t2i-r1 loop":
        return lambda: t2i_r1_loop(model, ids, samples, CFG_WEIGHT)
    raise ValueError(name)


PARAMS = [(case, c) for case in CASES for c in CONTENDERS]


@pytest.mark.parametrize("case,contender", PARAMS, ids=[f"{case}-{c.replace(' ', '_')}" for case, c in PARAMS])
def test_image_rollout(benchmark, case, contender):
    if contender == "fastrl (no CUDA graph)" and DEVICE != "cuda":
        pytest.skip("the same as fastrl without CUDA")
    prompts, samples, prompt_len = CASES[case]
    model = _get_model()
    im = image_model(model)
    ids = _prompts(prompts, prompt_len, im.boi_id)
    fn = _contender(contender, model, im, ids, samples)
    images = prompts * samples
    shape = {**MODEL["config"], "intermediate": MODEL["intermediate"]}
    info = {"op": "image_rollout", "contender": contender, "case": case, "prompts": prompts, "samples": samples,
            "prompt_len": prompt_len, "image_tokens": im.image_tokens, "cfg_weight": CFG_WEIGHT,
            "dtype": str(DTYPE), "model": shape, "threads": torch.get_num_threads()}
    with torch.no_grad():
        measure(benchmark, fn, group=f"image_rollout {case} P={prompts} G={samples} L={prompt_len} "
                                     f"N={im.image_tokens} w={CFG_WEIGHT:g} {DTYPE}",
                info=info, rounds=10 if DEVICE == "cpu" else 3)
    seconds = benchmark.extra_info.get("cuda_median_s") or benchmark.extra_info.get("median_s")
    if seconds:
        benchmark.extra_info["images_per_s"] = images / seconds
        benchmark.extra_info["tokens_per_s"] = images * im.image_tokens / seconds
