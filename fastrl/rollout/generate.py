"""``generate``: G sampled completions per prompt for a Hugging Face causal LM, with sampler log-probs.

The loop, top to bottom: check the inputs; left-pad the prompts; prefill each prompt once; copy its
KV cache to its G rows; then per step sample one token per row with :func:`fastrl.sampling.sample`,
record it and its log-prob, mark rows that hit a stop token, stop when every row has, else feed the
tokens back through the decoder (see :mod:`fastrl.rollout.decoders`).
"""

from __future__ import annotations

import numbers
import weakref
from dataclasses import dataclass

import torch

from fastrl import _checks
from fastrl.rollout import decoders
from fastrl.sampling import SampleErrors, sample

__all__ = ["Rollout", "generate", "release"]

ENGINES = ("auto", "fastrl", "hf", "vllm")

# The lean decoder (static KV cache, CUDA graphs on GPU) of each model that a ``keep_graph=True`` call
# kept for the next one: only the last one per model, reused while rows, cache length, graph use and
# parameter addresses all match. Empty unless asked for: a kept cache holds its memory through training.
_GRAPHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CUDA_EXIT_CHECK = 4  # steps between early-exit checks on an accelerator (each is a host-device sync)


@dataclass
class Rollout:
    """What :func:`generate` returns. ``N = P * num_samples`` rows, prompt-major: rows
    ``[p * G, (p + 1) * G)`` are the samples of prompt ``p``. ``T`` is the longest completion.

    - ``completion_ids`` [N, T] int64: sampled tokens, a row's stop token included, then
      ``pad_token_id``;
    - ``lengths`` [N] int64: tokens per row (stop token included);
    - ``logprobs`` [N, T] fp32: each token's log-prob under ``softmax(logits / temperature)`` of the
      model that sampled it, as :func:`fastrl.sampling.sample` returns it (the behaviour-policy
      log-prob for importance-sampling corrections; 0 on padding; for greedy rows the sampler's 0,
      or -log of the number of tied maxima);
    - ``prompt_index`` [N] int64: the prompt each row continues;
    - ``stopped`` [N] bool: True where the row ended on a stop token, False where it ran out of
      ``max_new_tokens``;
    - ``engine``: the decoder that ran: ``"fastrl"`` (the lean static-KV decoder), ``"hf"`` (the
      model's own forward) or ``"vllm"``.
    """

    completion_ids: torch.Tensor
    lengths: torch.Tensor
    logprobs: torch.Tensor
    prompt_index: torch.Tensor
    stopped: torch.Tensor
    num_samples: int
    engine: str = "fastrl"

    @property
    def completion_mask(self) -> torch.Tensor:
        """[N, T] bool, True on generated tokens."""
        steps = torch.arange(self.completion_ids.shape[1], device=self.lengths.device)
        return steps[None] < self.lengths[:, None]

    @property
    def finish_reasons(self) -> list[str]:
        """Per row ``"stop"`` (a stop token) or ``"length"`` (``max_new_tokens``)."""
        return ["stop" if s else "length" for s in self.stopped.tolist()]


def release(model=None) -> None:
    """Free the KV cache and CUDA graph that :func:`generate` keeps for ``model`` (all models if None),
    e.g. before a training step that needs the memory."""
    if model is None:
        for decoder in list(_GRAPHED.values()):
            decoder.release()
        _GRAPHED.clear()
    else:
        decoder = _GRAPHED.pop(_unwrap(model), None)
        if decoder is not None:
            decoder.release()


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

    ``prompt_ids``: a list of P 1-D integer tensors (any lengths), or a [P, L] integer tensor with
    ``attention_mask`` [P, L] (1 on tokens, 0 on padding). Each row's tokens must be one contiguous run:
    left padding, right padding, or none (each row is re-aligned to the left internally).

    Each prompt is run through the model once; its KV cache is then copied to its G rows. Each step
    draws one token per row with :func:`fastrl.sampling.sample` under ``temperature`` (0 = greedy),
    ``top_k``, ``top_p`` and ``min_p`` (numbers, or tensors of one value per row [P * G] or per
    prompt [P]). A row ends after a token of ``stop_token_ids`` (an int or a list; default: the
    model's ``generation_config.eos_token_id``; ``[]`` for none) or after ``max_new_tokens``; the loop
    ends as soon as every row has. ``generator`` (on the model's device type) makes draws
    reproducible. ``pad_token_id`` fills completions after their end (default: the model's pad
    token, else its first stop token, else 0).

    ``engine``: ``"fastrl"`` - the lean static-KV decoder (Llama, Qwen2, Qwen3, Mistral), with the
    decode step captured in CUDA graphs on GPU, one per kv-length bucket (``cuda_graph=False`` to run
    it eagerly);
    ``"hf"`` - the model's own forward and dynamic cache, any causal LM; ``"auto"`` - the first
    that fits; ``"vllm"`` - ``model`` is a ``vllm.LLM`` (needs vLLM installed).

    ``keep_graph``: the lean decoder's static KV cache and CUDA graphs are freed when the call returns
    (default), so that a training step after it has the memory. ``True`` keeps them for the next call
    with the same rows and cache-length bucket (capture costs a few steps' time), until a call with
    ``keep_graph=False`` or :func:`release`; the cache alone is ``2 * layers * rows * slots * kv_heads
    * head_dim * dtype bytes`` (~9 GB for a 7B Qwen2 at 64 rows x 2560 slots in bf16), plus the graphs'
    memory pool.

    ``max_length`` caps prompt + completion (default: ``config.max_position_embeddings``).
    ``progress=True`` shows a tqdm bar over the steps when tqdm is installed.

    Returns a :class:`Rollout`. Raises ``ValueError`` naming the argument for empty prompts, prompts
    or completions that do not fit ``max_length``, out-of-vocabulary tokens or stop ids, a
    ``generator`` on another device than the model, ``num_samples`` or ``max_new_tokens`` < 1.
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
    prompts = _prompt_list(prompt_ids, attention_mask, vocab)
    num_prompts, rows = len(prompts), len(prompts) * num_samples
    prompt_lengths = torch.tensor([len(p) for p in prompts])
    longest = int(prompt_lengths.max())
    _check_fits(model, longest, max_new_tokens, max_length)
    stops = _stop_ids(model, stop_token_ids, vocab, device)
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
            if _GRAPHED.get(model) is not decoder:
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
    # a kept decoder serves every later call whose rows and cache-length bucket match
    buckets = -(-total // decoders._GRAPH_LENGTH_BUCKET)
    signature = (rows, buckets, use_graph, tuple(p.data_ptr() for p in model.parameters()))
    cached = _GRAPHED.get(model)
    if cached is not None and cached.signature == signature:
        return cached
    release(model)  # one kept decoder per model: free the old cache before allocating the new one
    decoder = decoders.LeanDecoder(model, rows, buckets * decoders._GRAPH_LENGTH_BUCKET, cuda_graph=use_graph)
    decoder.signature = signature
    _GRAPHED[model] = decoder
    return decoder


def _vocab_size(model) -> int:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and hasattr(embeddings, "num_embeddings"):
        return int(embeddings.num_embeddings)
    return int(model.config.get_text_config().vocab_size)


def _prompt_list(prompt_ids, attention_mask, vocab: int) -> list[torch.Tensor]:
    """The prompts as a list of 1-D int64 CPU tensors, checked."""
    if isinstance(prompt_ids, torch.Tensor):
        _checks.check_tensor("prompt_ids", prompt_ids, ndim=2)
        if prompt_ids.dtype.is_floating_point or prompt_ids.dtype == torch.bool:
            raise ValueError(f"prompt_ids must hold integer token ids, got {prompt_ids.dtype}")
        if prompt_ids.shape[0] == 0 or prompt_ids.shape[1] == 0:
            raise ValueError(f"prompt_ids is empty (shape {tuple(prompt_ids.shape)})")
        ids = prompt_ids.detach().cpu().long()
        if attention_mask is None:
            prompts = list(ids)
        else:
            _checks.check_tensor("attention_mask", attention_mask)
            if attention_mask.shape != prompt_ids.shape:
                raise ValueError(f"attention_mask must have the shape of prompt_ids {tuple(prompt_ids.shape)}, "
                                 f"got {tuple(attention_mask.shape)}")
            m = attention_mask.detach().cpu()
            if not ((m == 0) | (m == 1)).all():
                raise ValueError("attention_mask must hold only 0 and 1")
            m = m.bool()
            counts = m.sum(1)
            if (counts == 0).any():
                raise ValueError(f"attention_mask row {int((counts == 0).nonzero()[0])} is all padding: "
                                 "empty prompts are not allowed")
            first = m.long().argmax(1)
            last = m.shape[1] - 1 - m.long().flip(1).argmax(1)
            holes = (last - first + 1) != counts
            if holes.any():
                raise ValueError(f"attention_mask row {int(holes.nonzero()[0])} has padding between tokens; "
                                 "each row's tokens must be one contiguous run (left or right padding)")
            prompts = [row[int(a): int(b) + 1] for row, a, b in zip(ids, first, last)]
    else:
        if attention_mask is not None:
            raise ValueError("attention_mask goes with a padded [P, L] prompt_ids tensor, not a list")
        if not isinstance(prompt_ids, (list, tuple)) or len(prompt_ids) == 0:
            raise ValueError("prompt_ids must be a non-empty list of 1-D token-id tensors or a [P, L] tensor")
        prompts = []
        for i, p in enumerate(prompt_ids):
            if not isinstance(p, torch.Tensor):
                p = torch.as_tensor(p)
            if p.dim() != 1 or p.dtype.is_floating_point or p.dtype == torch.bool:
                raise ValueError(f"prompt_ids[{i}] must be a 1-D integer tensor, got {p.dtype} of shape "
                                 f"{tuple(p.shape)}")
            prompts.append(p.detach().cpu().long())
    for i, p in enumerate(prompts):
        if p.numel() == 0:
            raise ValueError(f"prompt_ids[{i}] is empty: every prompt needs at least one token")
        if (p < 0).any() or (p >= vocab).any():
            raise ValueError(f"prompt_ids[{i}] holds token ids outside [0, {vocab})")
    return prompts


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


def _stop_ids(model, stop_token_ids, vocab: int, device) -> torch.Tensor | None:
    if stop_token_ids is None:  # the model's EOS ids (those outside the vocabulary can never be sampled)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = [eos] if isinstance(eos, numbers.Integral) else list(eos or [])
        stop_token_ids = [int(i) for i in eos if 0 <= int(i) < vocab]
    if isinstance(stop_token_ids, torch.Tensor):
        if stop_token_ids.dtype.is_floating_point or stop_token_ids.dim() > 1:
            raise ValueError("stop_token_ids must be an int, a list of ints or a 1-D integer tensor")
        values = stop_token_ids.reshape(-1).tolist()
    elif isinstance(stop_token_ids, numbers.Integral) and not isinstance(stop_token_ids, bool):
        values = [int(stop_token_ids)]
    elif isinstance(stop_token_ids, (list, tuple, set)):
        values = list(stop_token_ids)
    else:
        raise ValueError(f"stop_token_ids must be an int, a list of ints or a 1-D integer tensor, "
                         f"got {type(stop_token_ids).__name__}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v < vocab:
            raise ValueError(f"stop_token_ids must be token ids in [0, {vocab}), got {v!r}")
    if not values:
        return None
    return torch.tensor(sorted(set(int(v) for v in values)), dtype=torch.long, device=device)


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
