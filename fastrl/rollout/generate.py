"""``generate``: G sampled completions per prompt for a Hugging Face causal LM, with sampler log-probs.

The loop, top to bottom: check the inputs; left-pad the prompts; prefill each prompt once; copy its
KV cache to its G rows; then per step sample one token per row with :func:`fastrl.sampling.sample`,
record it and its log-prob, mark rows that hit a stop token, stop when every row has, else feed the
tokens back through the decoder (see :mod:`fastrl.rollout.decoders`).
"""

from __future__ import annotations

import numbers

import torch

from fastrl import _checks
from fastrl.rollout import decoders
from fastrl.rollout.types import Rollout, prompt_list, resolve_stop_tokens
from fastrl.sampling import SampleErrors, sample

__all__ = ["generate", "release"]

ENGINES = ("auto", "fastrl", "hf", "vllm")
_CUDA_EXIT_CHECK = 4  # steps between early-exit checks on an accelerator (each is a host-device sync)


def release(model=None) -> None:
    """Free the KV cache and CUDA graph that :func:`generate` keeps for a model, e.g. before a training step.

    Args:
        model: the model whose kept decoder to free; None frees every model's.
    """
    decoders.release_kept(None if model is None else _unwrap(model))


def _unwrap(model):
    """A PEFT model's underlying transformers model when its adapter (LoRA, ...) lives inside the
    linears, which the lean decoder calls; the model itself otherwise."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and not getattr(peft_config, "is_prompt_learning", True):
        return model.get_base_model()
    return model


def generate(
    model,
    prompt_ids,
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
    stop_token_ids=None,
    generator: torch.Generator | None = None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    max_length: int | None = None,
    engine: str = "auto",
    cuda_graph: bool | None = None,
    keep_graph: bool = False,
    progress: bool = False,
) -> Rollout:
    """Sample ``num_samples`` (G) completions of each of P prompts from a causal LM.

    Each prompt is run through the model once; its KV cache is then copied to its G rows. Each step
    draws one token per row with :func:`fastrl.sampling.sample` under ``temperature``, ``top_k``,
    ``top_p`` and ``min_p``. A row ends after a token of ``stop_token_ids`` or after
    ``max_new_tokens``; the loop ends as soon as every row has.

    Args:
        model: a Hugging Face causal LM (a PEFT model's adapter inside the linears is kept), or a
            ``vllm.LLM`` with ``engine="vllm"``.
        prompt_ids: a list of P 1-D integer tensors (any lengths), or a ``[P, L]`` integer (int64 /
            int32) tensor with ``attention_mask``. Each row's tokens must be one contiguous run: left
            padding, right padding, or none (each row is re-aligned to the left internally).
        max_new_tokens: tokens to sample at most per row (>= 1).
        num_samples: G, samples per prompt (>= 1).
        temperature: 0 = greedy; a number, or a tensor of one value per row ``[P * G]`` or per prompt
            ``[P]`` (floating).
        top_k: 0 = off; a number or a ``[P * G]`` / ``[P]`` integer tensor.
        top_p: a number or a ``[P * G]`` / ``[P]`` floating tensor.
        min_p: a number or a ``[P * G]`` / ``[P]`` floating tensor.
        stop_token_ids: an int or a list (default: the model's ``generation_config.eos_token_id``;
            ``[]`` for none); see :func:`fastrl.rollout.resolve_stop_tokens`.
        generator: a ``torch.Generator`` on the model's device type; makes draws reproducible.
        pad_token_id: fills completions after their end (default: the model's pad token, else its
            first stop token, else 0).
        attention_mask: ``[P, L]`` int or bool, 1 on tokens, 0 on padding, with a padded ``prompt_ids``.
        max_length: caps prompt + completion (default: ``config.max_position_embeddings``).
        engine: ``"fastrl"`` - the lean static-KV decoder (Llama, Qwen2, Qwen3, Mistral), with the
            decode step captured in CUDA graphs on GPU, one per kv-length bucket; ``"hf"`` - the
            model's own forward and dynamic cache, any causal LM; ``"auto"`` - the first that fits;
            ``"vllm"`` - ``model`` is a ``vllm.LLM`` (needs vLLM installed).
        cuda_graph: ``False`` runs the lean decoder eagerly (default: graphs on GPU).
        keep_graph: the lean decoder's static KV cache and CUDA graphs are freed when the call returns
            (default), so that a training step after it has the memory. ``True`` keeps them for the
            next call with the same rows and cache-length bucket (capture costs a few steps' time),
            until a call with ``keep_graph=False`` or :func:`release`; the cache alone is
            ``2 * layers * rows * slots * kv_heads * head_dim * dtype bytes`` (~9 GB for a 7B Qwen2 at
            64 rows x 2560 slots in bf16), plus the graphs' memory pool.
        progress: ``True`` shows a tqdm bar over the steps when tqdm is installed.

    Returns:
        A :class:`Rollout`.

    Raises:
        ValueError: naming the argument, for an unknown ``engine``, empty prompts, prompts or
            completions that do not fit ``max_length``, out-of-vocabulary tokens or stop ids, a
            ``generator`` on another device than the model, ``num_samples`` or ``max_new_tokens`` < 1.
        TypeError: ``model`` not a causal LM, ``generator`` not a ``torch.Generator``.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    max_new_tokens = _checks.check_int("max_new_tokens", max_new_tokens, low=1)
    num_samples = _checks.check_int("num_samples", num_samples, low=1)
    if engine == "vllm":
        from fastrl.rollout import vllm_engine

        return vllm_engine.generate(model, prompt_ids, max_new_tokens=max_new_tokens, num_samples=num_samples,
                                    temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                    stop_token_ids=stop_token_ids, generator=generator, pad_token_id=pad_token_id,
                                    attention_mask=attention_mask)
    model = _unwrap(model)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a Hugging Face causal LM (torch.nn.Module with a config), "
                        f"got {type(model).__name__}")
    device = next(model.parameters()).device
    vocab = _vocab_size(model)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but the model is on {device}; "
                             f"use torch.Generator(device='{device.type}')")
    prompts = prompt_list(prompt_ids, attention_mask, vocab)
    num_prompts, rows = len(prompts), len(prompts) * num_samples
    prompt_lengths = torch.tensor([len(p) for p in prompts])
    longest = int(prompt_lengths.max())
    _check_fits(model, longest, max_new_tokens, max_length)
    stops = resolve_stop_tokens(stop_token_ids, model=model, vocab_size=vocab)
    stops = torch.tensor(stops, dtype=torch.long, device=device) if stops else None
    pad = _pad_id(model, pad_token_id, stops)
    settings = {
        "temperature": _row_setting("temperature", temperature, num_prompts, num_samples, device, integer=False),
        "top_k": _row_setting("top_k", top_k, num_prompts, num_samples, device, integer=True),
        "top_p": _row_setting("top_p", top_p, num_prompts, num_samples, device, integer=False),
        "min_p": _row_setting("min_p", min_p, num_prompts, num_samples, device, integer=False),
    }
    _checks.check_bool("progress", progress)
    _checks.check_bool("keep_graph", keep_graph)

    # left-padded prompts [P, Lp]; rotary positions count real tokens only, as in HF generate
    ids = torch.full((num_prompts, longest), pad if 0 <= pad < vocab else 0, dtype=torch.long)
    mask = torch.zeros(num_prompts, longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = p
        mask[i, longest - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)

    total = longest + max_new_tokens
    with torch.no_grad():
        decoder = _decoder(model, engine, cuda_graph, rows, total, device, keep_graph)
        bar = None
        try:  # the cache and graphs are freed whatever happens (a bad row raised at a check, an OOM)
            logits = decoder.prefill(model, ids, mask, positions, num_samples).repeat_interleave(num_samples, 0)
            out_ids = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
            out_logprobs = torch.zeros(rows, max_new_tokens, dtype=torch.float32, device=device)
            done = torch.zeros(rows, dtype=torch.bool, device=device)
            lengths = torch.zeros(rows, dtype=torch.long, device=device)
            next_pos = prompt_lengths.to(device).repeat_interleave(num_samples)
            steps = range(max_new_tokens)
            bar = _progress_bar(steps) if progress else None
            errors = SampleErrors(device)  # bad rows are recorded on the device and raised at the exit checks
            for step in steps if bar is None else bar:
                tokens, logprobs = sample(logits, generator=generator, errors=errors, **settings)
                live = ~done
                out_ids[:, step] = torch.where(live, tokens, pad)
                out_logprobs[:, step] = torch.where(live, logprobs, 0.0)
                lengths += live
                if stops is not None:
                    done |= torch.isin(tokens, stops)
                    # the early-exit test waits for the device: on GPU only every few steps
                    if device.type == "cpu" or step % _CUDA_EXIT_CHECK == _CUDA_EXIT_CHECK - 1:
                        errors.check()  # the sampler's ValueError for a bad row, if any (a sync like the next)
                        if bool(done.all()):
                            break
                if step + 1 < max_new_tokens:  # a finished row feeds whatever it drew: its logits go unused
                    # a bad row's token -1 (raised at the next check) is fed as 0, never as an index out of range
                    logits = decoder.step(tokens.clamp(min=0), next_pos + step, longest + step)
            errors.check()
        finally:
            if bar is not None:
                bar.close()
            if not keep_graph:  # a decoder kept by an earlier call goes too
                release(model)
            if decoders.kept_decoders().get(model) is not decoder:
                decoder.release()

    width = int(lengths.max())
    prompt_index = torch.arange(num_prompts, device=device).repeat_interleave(num_samples)
    return Rollout(completion_ids=out_ids[:, :width].contiguous(), lengths=lengths,
                   logprobs=out_logprobs[:, :width].contiguous(), prompt_index=prompt_index,
                   stopped=done.clone(), num_samples=num_samples,
                   engine="fastrl" if isinstance(decoder, decoders.LeanDecoder) else "hf")


# -- pieces -----------------------------------------------------------------------------------------------

def _decoder(model, engine, cuda_graph, rows, total, device, keep):
    if cuda_graph is not None:
        _checks.check_bool("cuda_graph", cuda_graph)
    use_graph = device.type == "cuda" and cuda_graph is not False
    reason = decoders.lean_unsupported_reason(model, total) if engine in ("auto", "fastrl") else "engine='hf'"
    if engine == "fastrl" and reason is not None:
        raise ValueError(f"engine='fastrl' cannot run this model: {reason}; use engine='hf' or 'auto'")
    if reason is not None:
        return decoders.HFDecoder(model, rows, total)
    if not keep:
        return decoders.LeanDecoder(model, rows, total, cuda_graph=use_graph)
    return decoders.kept_decoder(model, rows, total, cuda_graph=use_graph)  # reused by later calls that match


def _vocab_size(model) -> int:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and hasattr(embeddings, "num_embeddings"):
        return int(embeddings.num_embeddings)
    return int(model.config.get_text_config().vocab_size)


def _check_fits(model, longest: int, max_new_tokens: int, max_length) -> None:
    if max_length is None:
        max_length = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        source = "the model's max_position_embeddings"
    else:
        max_length = _checks.check_int("max_length", max_length, low=2)
        source = "max_length"
    if max_length is None:
        return
    if longest >= max_length:
        raise ValueError(f"prompt_ids: the longest prompt has {longest} tokens, which leaves no room in "
                         f"{source} ({max_length}) for a completion")
    if longest + max_new_tokens > max_length:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) + the longest prompt ({longest}) exceeds {source} "
                         f"({max_length}); lower max_new_tokens to at most {max_length - longest}")


def _pad_id(model, pad_token_id, stops) -> int:
    if pad_token_id is not None:
        return _checks.check_int("pad_token_id", pad_token_id)
    for config in (getattr(model, "generation_config", None), model.config):
        value = getattr(config, "pad_token_id", None)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    return int(stops[0]) if stops is not None else 0


def _row_setting(name, value, prompts: int, samples: int, device, *, integer: bool):
    """A number stays a number; a tensor of one value per prompt [P] or per row [P * G] becomes [P * G]."""
    if not isinstance(value, torch.Tensor):
        if integer:
            return _checks.check_int(name, value, low=0)
        return _checks.check_real(name, value, low=0.0, high=None if name == "temperature" else 1.0,
                                  low_open=name == "top_p")
    if value.dim() == 0:
        return value.to(device)
    if value.dim() != 1 or value.shape[0] not in (prompts, prompts * samples):
        raise ValueError(f"{name} must be a number or a tensor of {prompts * samples} values (one per row) or "
                         f"{prompts} (one per prompt), got shape {tuple(value.shape)}")
    value = value.to(device)
    return value.repeat_interleave(samples) if value.shape[0] == prompts and samples > 1 else value


def _progress_bar(steps):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(steps, desc="generate", unit="tok", leave=False)
