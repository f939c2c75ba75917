"""``generate(..., engine="vllm")``: the same :class:`~fastrl.rollout.Rollout` from a ``vllm.LLM``.

vLLM is optional and not a dependency of fastrl. The ``model`` is a ``vllm.LLM`` the caller built (and
keeps in sync with the policy's weights). Differences from the built-in engines: settings are numbers
only (no per-row tensors); ``generator`` only seeds vLLM's own sampler (reproducible within one vLLM
version, not equal to fastrl's draws); log-probs are what vLLM reports for the sampled token, which
depends on the ``logprobs_mode`` the ``LLM`` was built with (vLLM's default is the raw model
distribution, before temperature).
"""

from __future__ import annotations

import torch

from fastrl import _checks
from fastrl.rollout.types import Rollout, prompt_list, resolve_stop_tokens

__all__ = ["generate"]


def _require_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise ImportError("engine='vllm' needs vLLM (pip install vllm); the built-in engines "
                          "(engine='auto', 'fastrl' or 'hf') need nothing more") from exc
    return vllm


def generate(llm, prompt_ids, *, max_new_tokens, num_samples, temperature, top_k, top_p, min_p, stop_token_ids,
             generator, pad_token_id, attention_mask):
    """``generate(..., engine="vllm")``: a :class:`~fastrl.rollout.Rollout` sampled by a ``vllm.LLM``.

    Called by :func:`fastrl.rollout.generate`, which passes its own arguments on (see there); the
    differences are the module docstring's.

    Args:
        llm: a ``vllm.LLM`` the caller built and keeps in sync with the policy's weights.
        prompt_ids: a list of 1-D integer tensors or a ``[P, L]`` integer tensor (:func:`prompt_list`).
        max_new_tokens: tokens to sample at most per row.
        num_samples: G, samples per prompt.
        temperature: one number >= 0 (not a tensor).
        top_k: one int >= 0 (0: off).
        top_p: one number in (0, 1].
        min_p: one number in [0, 1].
        stop_token_ids: the ids that end a row (:func:`resolve_stop_tokens`), or None for vLLM's own.
        generator: a ``torch.Generator`` that seeds vLLM's sampler, or None.
        pad_token_id: the id after a row's end (default 0).
        attention_mask: ``[P, L]`` 0 / 1 with a padded ``prompt_ids``, or None.

    Returns:
        The :class:`~fastrl.rollout.Rollout` (``engine="vllm"``), on the CPU.

    Raises:
        ImportError: vLLM is not installed.
        TypeError: ``llm`` is not a ``vllm.LLM``.
        ValueError: a sampling setting given as a tensor or out of range, bad prompts.
    """
    vllm = _require_vllm()
    if not isinstance(llm, vllm.LLM):
        raise TypeError(f"with engine='vllm', model must be a vllm.LLM, got {type(llm).__name__}")
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p)):
        if isinstance(value, torch.Tensor):
            raise ValueError(f"{name}: engine='vllm' takes one number for all rows, not a tensor")
    prompts = prompt_list(prompt_ids, attention_mask, vocab=2**62)  # vLLM checks the ids against its vocabulary
    extra = {}
    if stop_token_ids is not None:
        extra = {"stop_token_ids": resolve_stop_tokens(stop_token_ids), "ignore_eos": True}
    seed = None
    if generator is not None:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
    params = vllm.SamplingParams(n=num_samples, max_tokens=max_new_tokens,
                                 temperature=_checks.check_real("temperature", temperature, low=0.0),
                                 top_k=_checks.check_int("top_k", top_k, low=0) or -1,
                                 top_p=_checks.check_real("top_p", top_p, low=0.0, high=1.0, low_open=True),
                                 min_p=_checks.check_real("min_p", min_p, low=0.0, high=1.0),
                                 logprobs=0, seed=seed, **extra)
    from vllm.inputs import TokensPrompt

    outputs = llm.generate([TokensPrompt(prompt_token_ids=p.tolist()) for p in prompts], params, use_tqdm=False)
    rows = [c for out in outputs for c in out.outputs]
    width = max(len(c.token_ids) for c in rows)
    pad = 0 if pad_token_id is None else _checks.check_int("pad_token_id", pad_token_id)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    logprobs = torch.zeros(len(rows), width, dtype=torch.float32)
    for r, c in enumerate(rows):
        ids[r, : len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long)
        if c.logprobs:
            chosen = [step[t].logprob for step, t in zip(c.logprobs, c.token_ids)]
            logprobs[r, : len(chosen)] = torch.tensor(chosen)
    return Rollout(completion_ids=ids, lengths=torch.tensor([len(c.token_ids) for c in rows]), logprobs=logprobs,
                   prompt_index=torch.arange(len(prompts)).repeat_interleave(num_samples),
                   stopped=torch.tensor([c.finish_reason == "stop" for c in rows]), num_samples=num_samples,
                   engine="vllm")
