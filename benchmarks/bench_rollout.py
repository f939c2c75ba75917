"""Generation: fastrl.rollout.generate beside Hugging Face ``generate`` (dynamic cache, static cache,
static cache + torch.compile) on a random model, in tokens per second.

Shapes: on CPU a tiny Qwen2 (vocab 512, hidden 128, 2 layers, 4 heads, 2 KV heads); on GPU
(FASTRL_BENCH_SCALE=gpu) a Qwen2-0.5B-shaped one in bf16. Two cases each: ``batch`` (P prompts, one
sample each) and ``group`` (P prompts x G samples, the GRPO shape: HF generate repeats each prompt G
times with ``num_return_sequences`` and prefills every copy, fastrl prefills each prompt once).
Every contender samples at temperature 1 with no top-k / top-p / min-p and no stop token, so each
generates exactly ``new`` tokens per row. ``extra_info["tokens_per_s"]`` = rows x new tokens / the
median time of one call (CUDA-event median on GPU).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, SCALE, measure

transformers = pytest.importorskip("transformers")

import fastrl.rollout  # noqa: E402

MODEL = {
    "cpu": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024),
    # Qwen2-0.5B's shape (config.json of Qwen/Qwen2-0.5B), random weights
    "gpu": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True),
}[SCALE]
# case: (prompts, samples per prompt, prompt length, new tokens)
CASES = {
    "cpu": {"batch": (8, 1, 16, 32), "group": (2, 4, 16, 32)},
    "gpu": {"batch": (64, 1, 128, 256), "group": (8, 8, 128, 256)},
}[SCALE]
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
CONTENDERS = ["fastrl", "fastrl (no CUDA graph)", "hf", "hf static", "hf static+compile"]

_model = None


def _get_model():
    global _model
    if _model is None:
        torch.manual_seed(0)
        with torch.device(DEVICE):
            model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**MODEL))
        _model = model.to(DTYPE).eval()
        _model.generation_config.eos_token_id = None  # every contender runs the full length
        _model.generation_config.pad_token_id = 0
    return _model


def _contender(name, model, ids, mask, samples, new):
    hf_sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                       min_new_tokens=new, num_return_sequences=samples, attention_mask=mask)
    if name == "fastrl" or name == "fastrl (no CUDA graph)":
        graph = name == "fastrl"
        g = torch.Generator(device=DEVICE).manual_seed(0)
        return lambda: fastrl.rollout.generate(model, ids, attention_mask=mask, max_new_tokens=new,
                                               num_samples=samples, temperature=1.0, stop_token_ids=[],
                                               generator=g, cuda_graph=graph)
    if name == "hf":
        return lambda: model.generate(ids, **hf_sampling)
    if name == "hf static":
        return lambda: model.generate(ids, cache_implementation="static", disable_compile=True, **hf_sampling)
    if name == "hf static+compile":
        config = transformers.CompileConfig()
        if DEVICE == "cpu":
            config._compile_all_devices = True  # HF compiles on GPU only unless told
        return lambda: model.generate(ids, cache_implementation="static", compile_config=config, **hf_sampling)
    raise ValueError(name)


PARAMS = [(case, c) for case in CASES for c in CONTENDERS]


@pytest.mark.parametrize("case,contender", PARAMS, ids=[f"{case}-{c.replace(' ', '_')}" for case, c in PARAMS])
def test_generate(benchmark, case, contender):
    if contender == "fastrl (no CUDA graph)" and DEVICE != "cuda":
        pytest.skip("the same as fastrl without CUDA")
    prompts, samples, prompt_len, new = CASES[case]
    model = _get_model()
    g = torch.Generator(device=DEVICE).manual_seed(1)
    ids = torch.randint(1, MODEL["vocab_size"], (prompts, prompt_len), device=DEVICE, generator=g)
    mask = torch.ones_like(ids)
    fn = _contender(contender, model, ids, mask, samples, new)
    rows = prompts * samples
    info = {"op": "generate", "contender": contender, "case": case, "prompts": prompts, "samples": samples,
            "prompt_len": prompt_len, "new_tokens": new, "dtype": str(DTYPE),
            "model": {k: v for k, v in MODEL.items() if k != "max_position_embeddings"}}
    with torch.no_grad():
        measure(benchmark, fn, group=f"generate {case} P={prompts} G={samples} L={prompt_len} new={new} {DTYPE}",
                info=info, rounds=10 if DEVICE == "cpu" else 3)
    seconds = benchmark.extra_info.get("cuda_median_s") or benchmark.extra_info.get("median_s")
    if seconds:
        benchmark.extra_info["tokens_per_s"] = rows * new / seconds
