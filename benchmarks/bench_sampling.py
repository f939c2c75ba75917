"""Token sampling: fastrl beside the common torch sort-based sampler, torch.compile of it, FlashInfer.

The torch contender is what most RL and serving code does: sort the vocabulary, mask past the k-th
value, softmax, cumulative sum, mask past p, softmax again, ``torch.multinomial``. FlashInfer's is its
fused online softmax (with the temperature) then its sorting-free rejection sampler from the
probabilities. Every contender samples the same filtered distribution (tested in
tests/test_sampling.py for fastrl). Liger-Kernel and TRL have no sampler. On GPU fastrl runs its CUDA
kernel (csrc/cuda/sampling.cu): the suite fails rather than time the torch fallback of a build
without it. bytes_moved = the logits read once (the limit of a one-pass sampler).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import DEVICE, SCALE, measure

import fastrl

# (rows, vocab, logits dtype); B = 256, V = 151936 (Qwen) is the GRPO rollout shape of issue 7
SHAPES = {"cpu": [(64, 32000, "fp32"), (64, 151936, "fp32")],
          "gpu": [(64, 32000, "fp32"), (64, 151936, "fp32"), (256, 151936, "fp32"), (256, 151936, "bf16")]}[SCALE]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SETTINGS = {
    "top_k=50,top_p=0.9": {"temperature": 0.8, "top_k": 50, "top_p": 0.9},
    "top_p=0.9": {"temperature": 0.8, "top_k": 0, "top_p": 0.9},
    "plain": {"temperature": 0.8, "top_k": 0, "top_p": 1.0},
}


def torch_sort_sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The usual sort-based top-k / top-p sampler (as in Hugging Face warpers and vLLM's torch path)."""
    logits = logits.float() / temperature
    if top_k > 0 or top_p < 1.0:
        values, order = logits.sort(dim=-1, descending=True)
        if top_k > 0:
            values = values.masked_fill(values < values[:, top_k - 1:top_k], float("-inf"))
        if top_p < 1.0:
            probs = values.softmax(-1)
            values = values.masked_fill(probs.cumsum(-1) - probs > top_p, float("-inf"))
        choice = torch.multinomial(values.softmax(-1), 1)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(logits.softmax(-1), 1).squeeze(-1)


_compiled_sort_sample = None


def _contenders(settings):
    global _compiled_sort_sample
    out = {
        "fastrl": lambda x: fastrl.sample(x, **settings),
        "torch": lambda x: torch_sort_sample(x, **settings),
    }
    if _compiled_sort_sample is None:
        _compiled_sort_sample = torch.compile(torch_sort_sample, dynamic=False)
    out["torch.compile"] = lambda x: _compiled_sort_sample(x, **settings)
    if DEVICE == "cuda" and importlib.util.find_spec("flashinfer") is not None:
        import flashinfer.sampling as fis

        def flashinfer_sample(x):
            if hasattr(fis, "softmax"):  # fused online softmax with temperature (FlashInfer >= 0.2.6)
                probs = fis.softmax(x.float(), temperature=settings["temperature"])
            else:
                probs = torch.softmax(x.float() / settings["temperature"], -1)
            if settings["top_k"] > 0:
                return fis.top_k_top_p_sampling_from_probs(probs, settings["top_k"], settings["top_p"])
            if settings["top_p"] < 1.0:
                return fis.top_p_sampling_from_probs(probs, settings["top_p"])
            return fis.sampling_from_probs(probs)

        out["flashinfer"] = flashinfer_sample
    return out


CASES = [(shape, name, who) for shape in SHAPES for name in SETTINGS
         for who in ("fastrl", "torch", "torch.compile", "flashinfer")]


def _fastrl_implementation() -> str:
    """What fastrl.sample runs on DEVICE: the C++ sampler, the CUDA kernel, or the torch fallback."""
    if DEVICE == "cpu":
        return "cpp"
    return "cuda" if fastrl._extension.cuda_enabled() else "torch reference"


@pytest.mark.parametrize("shape,setting,contender", CASES,
                         ids=[f"B{s[0]}-V{s[1]}{'' if s[2] == 'fp32' else '-' + s[2]}-{n}-{w}" for s, n, w in CASES])
def test_sample(benchmark, shape, setting, contender):
    fns = _contenders(SETTINGS[setting])
    if contender not in fns:
        pytest.skip(f"{contender} is not installed or has no {DEVICE} path")
    if contender == "fastrl" and _fastrl_implementation() == "torch reference":
        pytest.fail("fastrl._C was built without its CUDA kernels, so fastrl.sample would time the torch "
                    "reference: rebuild with a CUDA torch and nvcc (make install; see `fastrl info`)")
    rows, vocab, dtype = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logits = (torch.randn(rows, vocab, generator=g, device=DEVICE) * 2.0).to(DTYPES[dtype])
    info = dict(op="sample", contender=contender, rows=rows, vocab=vocab, dtype=dtype, setting=setting,
                threads=torch.get_num_threads())
    if contender == "fastrl":
        info["implementation"] = _fastrl_implementation()
    group = f"sample {setting} B={rows} V={vocab}" + ("" if dtype == "fp32" else f" {dtype}")
    measure(benchmark, lambda: fns[contender](logits), group=group, info=info,
            rounds=7 if contender == "torch" else 20, bytes_moved=logits.numel() * logits.element_size(),
            # CPU peak RSS is only meaningful with glibc's mmap threshold fixed (see bench_logprobs.py),
            # which would slow the torch contenders here: memory on CUDA only (the allocator's exact peak)
            memory=DEVICE == "cuda")
