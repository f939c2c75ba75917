"""``generate``: G sampled completions per prompt for a Hugging Face causal LM, with sampler log-probs.

The loop, top to bottom: check the inputs; left-pad the prompts; prefill each prompt once; copy its
KV cache to its G rows; then per step sample one token per row with :func:`fastrl.sampling.sample`,
record it and its log-prob, mark rows that hit a stop token, stop when every row has, else feed the
tokens back through the decoder (see :mod:`fastrl.rollout.decoders`).

With ``image=`` (an :class:`fastrl.rollout.image.ImageModel`) each completion is an image: an optional
text plan, then the fixed number of image codes, with classifier-free guidance (CFG). The layout:

- Rows. ``P * G`` conditional rows and, when ``cfg_weight != 1``, ``P * G`` unconditional rows after
  them in the same decoder batch; both kinds of prompt are prefilled once per prompt (one left-padded
  batch of ``2P``) and their caches copied to the G rows. Each image step is one trunk step for all
  rows, then the image head, then :func:`fastrl.sampling.sample` with the conditional logits, the
  unconditional ones and the weight: the op mixes ``u + w (c - u)`` and draws (no mixed logits in
  Python). The drawn code is fed to both halves.
- Unconditional prompt: ``uncond_prompt_ids`` if given, else the image model's
  (:meth:`~fastrl.rollout.image.ImageModel.uncond_prompt`: Janus's pad-masked prompt), with BOI
  appended when it does not end with it. It only ever sees image codes after its BOI: with a plan,
  the unconditional branch has no plan (it is prefilled with its prompt + BOI and decodes the image
  only, at its own positions).
- Plain (``plan_max_tokens == 0``): a prompt must end with the begin-of-image token (BOI), as Hugging
  Face's Janus processor writes it; BOI is appended to a prompt that does not. The completion is the
  N codes.
- BiCoT plan (``plan_max_tokens > 0``): the conditional rows first sample a text plan through the
  lm-head, without CFG (as T2I-R1 samples its semantic plan), until a token of
  ``plan_stop_token_ids`` (default: BOI) or ``plan_max_tokens`` tokens; BOI is then forced (unless it
  was the stop token; a forced BOI is recorded with its log-prob under the model), then the N codes. Rows finish their plans at
  different steps: the plan steps run the conditional rows only, and a row whose plan has ended
  feeds nothing more (its cache slot at that step stays masked and its position does not advance),
  so every row's image starts right after its own BOI. The image steps start once every row is
  ready.
- Ids are unified (see :mod:`fastrl.rollout.image`): an image code ``c`` is the id ``offset + c``.
  A range model's image logits are its lm-head's over the whole vocabulary, drawn from inside
  ``[lo, hi)`` by the sampler's ``token_range``.
"""

from __future__ import annotations

import numbers

import torch

from fastrl import _checks
from fastrl.rollout import decoders
from fastrl.rollout.image import ImageModel, image_model
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
    max_new_tokens: int | None = None,
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
    image: ImageModel | bool | None = None,
    cfg_weight: float = 1.0,
    uncond_prompt_ids=None,
    plan_max_tokens: int = 0,
    plan_stop_token_ids=None,
) -> Rollout:
    """Sample ``num_samples`` (G) completions of each of P prompts from a causal LM.

    Each prompt is run through the model once; its KV cache is then copied to its G rows. Each step
    draws one token per row with :func:`fastrl.sampling.sample` under ``temperature``, ``top_k``,
    ``top_p`` and ``min_p``. A row ends after a token of ``stop_token_ids`` or after
    ``max_new_tokens``; the loop ends as soon as every row has.

    With ``image`` the completions are images, with classifier-free guidance and an optional text
    plan: see the module docstring (rows, unconditional prompts, BOI, the plan).

    Args:
        model: a Hugging Face causal LM (a PEFT model's adapter inside the linears is kept), or a
            ``vllm.LLM`` with ``engine="vllm"``.
        prompt_ids: a list of P 1-D integer tensors (any lengths), or a ``[P, L]`` integer (int64 /
            int32) tensor with ``attention_mask``. Each row's tokens must be one contiguous run: left
            padding, right padding, or none (each row is re-aligned to the left internally).
        max_new_tokens: tokens to sample at most per row (>= 1); required without ``image``. With
            ``image`` the length is fixed (``[plan_max_tokens + 1] + image_tokens`` at most): None,
            or a number at least that.
        num_samples: G, samples per prompt (>= 1).
        temperature: 0 = greedy; a number, or a tensor of one value per row ``[P * G]`` or per prompt
            ``[P]`` (floating).
        top_k: 0 = off; a number or a ``[P * G]`` / ``[P]`` integer tensor.
        top_p: a number or a ``[P * G]`` / ``[P]`` floating tensor.
        min_p: a number or a ``[P * G]`` / ``[P]`` floating tensor.
        stop_token_ids: an int or a list (default: the model's ``generation_config.eos_token_id``;
            ``[]`` for none); see :func:`fastrl.rollout.resolve_stop_tokens`. Unused with ``image``
            (the plan ends on ``plan_stop_token_ids``).
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
        image: generate images: an :class:`~fastrl.rollout.image.ImageModel` of ``model``, or True
            for ``image_model(model)``; None (default) for text.
        cfg_weight: the CFG weight w >= 0 (image only): codes are drawn from ``softmax((u + w (c -
            u)) / T)``; 1 runs no unconditional rows (plain conditional sampling).
        uncond_prompt_ids: the unconditional prompt: one id sequence (list or 1-D integer tensor)
            for every prompt, or a list of P of them (default: the image model's
            ``uncond_prompt(prompt)``); BOI is appended when it does not end with it.
        plan_max_tokens: > 0 samples a text plan of at most this many tokens before the image
            (BiCoT); 0 (default) none.
        plan_stop_token_ids: the tokens that end a plan (an int, a list, ``[]`` for none; default:
            the image model's BOI).

    Returns:
        A :class:`Rollout`. With ``image``: each row is ``[plan tokens][BOI] + N codes`` (unified
        ids), ``image_start`` marks the codes, ``logprobs`` are the sampler's (under the CFG-mixed
        distribution for codes) and ``cond_logprobs`` the conditional branch's; ``stopped`` is True
        (every completion ends with a whole image).

    Raises:
        ValueError: naming the argument, for an unknown ``engine``, empty prompts, prompts or
            completions that do not fit ``max_length``, out-of-vocabulary tokens or stop ids, a
            ``generator`` on another device than the model, ``num_samples`` or ``max_new_tokens`` < 1,
            ``cfg_weight < 0`` (or != 1 without ``image``), ``plan_max_tokens < 0``, a model with no
            image head (``model``), ``uncond_prompt_ids`` of the wrong count, ``keep_graph`` or
            ``engine="vllm"`` with ``image``.
        TypeError: ``model`` not a causal LM, ``generator`` not a ``torch.Generator``, ``image`` not
            an ImageModel / True / None.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if image is not None and image is not False:
        if stop_token_ids is not None:
            raise ValueError("stop_token_ids: an image completion ends with its last code; the tokens that end a "
                             "text plan are plan_stop_token_ids")
        return _generate_image(
            model, prompt_ids, image=image, cfg_weight=cfg_weight, uncond_prompt_ids=uncond_prompt_ids,
            plan_max_tokens=plan_max_tokens, plan_stop_token_ids=plan_stop_token_ids, max_new_tokens=max_new_tokens,
            num_samples=num_samples, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            generator=generator, pad_token_id=pad_token_id, attention_mask=attention_mask, max_length=max_length,
            engine=engine, cuda_graph=cuda_graph, keep_graph=keep_graph, progress=progress)
    cfg_weight = _checks.check_real("cfg_weight", cfg_weight, low=0.0)
    if cfg_weight != 1.0:
        raise ValueError(f"cfg_weight ({cfg_weight}) applies to image generation only: pass image=... "
                         "(text generation samples with cfg_weight=1)")
    for name, given in (("uncond_prompt_ids", uncond_prompt_ids is not None),
                        ("plan_max_tokens", not (isinstance(plan_max_tokens, int) and plan_max_tokens == 0)),
                        ("plan_stop_token_ids", plan_stop_token_ids is not None)):
        if given:
            raise ValueError(f"{name} applies to image generation only (pass image=...)")
    if max_new_tokens is None:
        raise ValueError("max_new_tokens: give the number of tokens to sample per row (required without image)")
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
    _check_generator(generator, device)
    prompts = prompt_list(prompt_ids, attention_mask, vocab)
    num_prompts, rows = len(prompts), len(prompts) * num_samples
    prompt_lengths = torch.tensor([len(p) for p in prompts])
    longest = int(prompt_lengths.max())
    _check_fits(model, longest, max_new_tokens, max_length)
    stops = resolve_stop_tokens(stop_token_ids, model=model, vocab_size=vocab)
    stops = torch.tensor(stops, dtype=torch.long, device=device) if stops else None
    pad = _pad_id(model, pad_token_id, stops)
    settings = _row_settings(temperature, top_k, top_p, min_p, num_prompts, num_samples, device)
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


# -- images ----------------------------------------------------------------------------------------------

def _generate_image(model, prompt_ids, *, image, cfg_weight, uncond_prompt_ids, plan_max_tokens, plan_stop_token_ids,
                    max_new_tokens, num_samples, temperature, top_k, top_p, min_p, generator, pad_token_id,
                    attention_mask, max_length, engine, cuda_graph, keep_graph, progress) -> Rollout:
    """:func:`generate` with ``image``: see the module docstring for the layout."""
    if engine == "vllm":
        raise ValueError("engine='vllm' does not generate images; use engine='auto', 'fastrl' or 'hf'")
    model = _unwrap(model)
    if image is True:
        im = image_model(model)
    elif isinstance(image, ImageModel):
        im = image
        if im.model is not model and _unwrap(im.model) is not model:
            raise ValueError("image: this ImageModel wraps another model than the one given")
    else:
        raise TypeError(f"image must be an ImageModel (fastrl.rollout.image.image_model(model)), True or None, "
                        f"got {type(image).__name__}")
    cfg_weight = _checks.check_real("cfg_weight", cfg_weight, low=0.0)
    plan_max_tokens = _checks.check_int("plan_max_tokens", plan_max_tokens, low=0)
    num_samples = _checks.check_int("num_samples", num_samples, low=1)
    _checks.check_bool("progress", progress)
    _checks.check_bool("keep_graph", keep_graph)
    if keep_graph:
        raise ValueError("keep_graph: image generation frees its decoder after each call (keep_graph=False)")
    if im.boi_id is None:
        raise ValueError("image: the image model has no begin-of-image token (image_model(..., boi_id=...))")
    boi, n_codes, plan = im.boi_id, im.image_tokens, plan_max_tokens > 0
    completion_max = (plan_max_tokens + 1 if plan else 0) + n_codes
    if max_new_tokens is not None:
        max_new_tokens = _checks.check_int("max_new_tokens", max_new_tokens, low=1)
        if max_new_tokens < completion_max:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) is shorter than an image completion ({completion_max} "
                             "tokens: the plan, BOI and image_tokens); leave it None with image")
    device = next(model.parameters()).device
    _check_generator(generator, device)
    # prompts may hold image codes too (unified ids); plan tokens and stop ids are text ids
    vocab = max(im.text_vocab, im.offset + im.codebook)
    prompts = [p.tolist() for p in prompt_list(prompt_ids, attention_mask, vocab)]
    if not plan:
        prompts = [p if p[-1] == boi else p + [boi] for p in prompts]
    num_prompts, rows = len(prompts), len(prompts) * num_samples
    guided = cfg_weight != 1.0
    uncond = _uncond_prompts(im, uncond_prompt_ids, prompts, vocab) if guided else []
    every = prompts + uncond
    longest = max(len(p) for p in every)
    _check_image_fits(model, longest, completion_max, max_length)
    try:
        plan_stops = resolve_stop_tokens([boi] if plan_stop_token_ids is None else plan_stop_token_ids,
                                         vocab_size=im.text_vocab) if plan else []
    except ValueError as e:
        raise ValueError(f"plan_{e} (text ids)") from None
    plan_stops = torch.tensor(plan_stops, dtype=torch.long, device=device) if plan_stops else None
    pad = _pad_id(model, pad_token_id, None)
    settings = _row_settings(temperature, top_k, top_p, min_p, num_prompts, num_samples, device)

    # the conditional prompts then the unconditional ones, left-padded [Q, Lp]; positions count real tokens
    ids = torch.full((len(every), longest), pad if 0 <= pad < im.text_vocab else 0, dtype=torch.long)
    mask = torch.zeros(len(every), longest, dtype=torch.long)
    for i, p in enumerate(every):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)

    if im.kind == "janus":  # codes through the generation embedding and head; the sampler's token is the code
        offset = im.offset
        modes = {"image": (lambda unified: im.embed_codes(unified - offset), im.image_logits)}
        image_mode, first_head, token_range, low, high = "image", im.image_logits, None, 0, im.codebook - 1
    else:  # codes are vocabulary ids: the text step, the whole lm-head, the sampler keeps to [lo, hi)
        offset, modes = 0, {}
        image_mode, first_head, token_range = "text", im.text_logits, (im.offset, im.offset + im.codebook)
        low, high = token_range[0], token_range[1] - 1
    modes["hidden"] = (im.trunk.embed_tokens, None)  # plan steps: the trunk's hidden states, heads applied here
    decoder_rows = len(every) * num_samples
    total = longest + completion_max

    with torch.no_grad():
        decoder = _image_decoder(im, engine, cuda_graph, decoder_rows, total, device, modes)
        bar = None
        try:
            hidden = decoder.prefill(im.model, ids, mask, positions, num_samples, embed=im.embed)  # [Q, H]
            pos = torch.tensor([len(p) for p in every], device=device).repeat_interleave(num_samples)
            out_ids = torch.full((rows, completion_max), pad, dtype=torch.long, device=device)
            out_logprobs = torch.zeros(rows, completion_max, dtype=torch.float32, device=device)
            out_cond = torch.zeros_like(out_logprobs) if guided else out_logprobs
            start = torch.zeros(rows, dtype=torch.long, device=device)  # where each row's image begins
            errors = SampleErrors(device)
            bar = _progress_bar(range(completion_max)) if progress else None
            slot = longest
            if plan:
                boi_hidden, slot = _plan(decoder, im, hidden[:num_prompts], num_samples, pos, slot, start, out_ids,
                                         out_logprobs, plan_stops, plan_max_tokens, boi, pad, settings, generator,
                                         errors, bar)
                if guided:  # a plan token's conditional log-prob is its log-prob (no CFG on the plan)
                    out_cond.copy_(out_logprobs)
                image_hidden = torch.cat([boi_hidden, hidden[num_prompts:].repeat_interleave(num_samples, 0)])
                logits = first_head(image_hidden)
            else:
                logits = first_head(hidden).repeat_interleave(num_samples, 0)
            for k in range(n_codes):
                if guided:
                    tokens, logprobs, cond_logprobs = sample(
                        logits[:rows], uncond_logits=logits[rows:], cfg_weight=cfg_weight, token_range=token_range,
                        return_cond_logprobs=True, generator=generator, errors=errors, **settings)
                elif token_range is not None:
                    tokens, logprobs = sample(logits, token_range=token_range, generator=generator, errors=errors,
                                              **settings)
                    cond_logprobs = logprobs
                else:
                    tokens, logprobs = sample(logits, generator=generator, errors=errors, **settings)
                    cond_logprobs = logprobs
                # a bad row's token -1 (raised at the check below) is fed as a valid code, never out of range
                fed = tokens.clamp(min=low, max=high) + offset
                where = (start + k)[:, None]
                out_ids.scatter_(1, where, (tokens + offset)[:, None])
                out_logprobs.scatter_(1, where, logprobs[:, None])
                if guided:
                    out_cond.scatter_(1, where, cond_logprobs[:, None])
                if bar is not None:
                    bar.update(1)
                if k + 1 < n_codes:
                    logits = decoder.step(torch.cat([fed, fed]) if guided else fed, pos, slot, mode=image_mode)
                    pos += 1
                    slot += 1
            errors.check()
        finally:
            if bar is not None:
                bar.close()
            release(model)  # a text decoder kept by an earlier call goes too: this one needs the memory
            decoder.release()

    lengths = start + n_codes
    width = int(lengths.max())
    prompt_index = torch.arange(num_prompts, device=device).repeat_interleave(num_samples)
    logprobs = out_logprobs[:, :width].contiguous()
    return Rollout(completion_ids=out_ids[:, :width].contiguous(), lengths=lengths, logprobs=logprobs,
                   prompt_index=prompt_index, stopped=torch.ones(rows, dtype=torch.bool, device=device),
                   num_samples=num_samples, engine="fastrl" if isinstance(decoder, decoders.LeanDecoder) else "hf",
                   cond_logprobs=out_cond[:, :width].contiguous() if guided else logprobs, image_start=start)


def _plan(decoder, im, prompt_hidden, samples, pos, slot, start, out_ids, out_logprobs, stops, max_tokens, boi, pad,
          settings, generator, errors, bar):
    """The BiCoT plan of every conditional row (the first ``rows`` decoder rows), through the lm-head.

    A row samples until a stop token or ``max_tokens`` tokens, then BOI is fed (forced, unless BOI was
    the stop token; its log-prob under the model is recorded, so that training's ratios start at 1). Rows that are done feed nothing: their slot stays masked and their
    position ``pos`` does not advance. Writes the plan into ``out_ids`` / ``out_logprobs`` from column 0,
    advances ``start`` (each row's plan + BOI length) and ``pos`` in place.

    Returns:
        ``(hidden [rows, H] at each row's BOI, the next free slot)``.
    """
    rows = start.shape[0]
    device = start.device
    planning = torch.ones(rows, dtype=torch.bool, device=device)
    need_boi = torch.zeros_like(planning)
    ready = torch.zeros_like(planning)
    boi_hidden = prompt_hidden.repeat_interleave(samples, 0)  # overwritten at each row's BOI
    logits = im.text_logits(prompt_hidden).repeat_interleave(samples, 0)
    boi_t = torch.tensor(boi, device=device)
    idle = pad if 0 <= pad < im.text_vocab else 0  # what a row that is done feeds (its slot stays masked)
    for step in range(max_tokens + 1):  # at most max_tokens plan tokens and one forced BOI
        tokens, logprobs = sample(logits, generator=generator, errors=errors, **settings)
        fed = planning | need_boi
        tokens = torch.where(planning, tokens.clamp(min=0), torch.where(need_boi, boi_t, idle))
        where = start[:, None]  # a row that feeds nothing writes pad / 0 at its image's first column
        out_ids.scatter_(1, where, torch.where(fed, tokens, pad)[:, None])
        # a forced BOI is recorded with its log-prob under the model (what training's ratios compare with)
        forced = _token_logprobs(logits, boi, settings["temperature"])
        out_logprobs.scatter_(1, where, torch.where(planning, logprobs, torch.where(need_boi, forced, 0.0))[:, None])
        start += fed
        ended = planning & (start >= max_tokens)
        if stops is not None:
            ended |= planning & torch.isin(tokens, stops)
        now_ready = need_boi | (ended & (tokens == boi))
        need_boi = ended & (tokens != boi)
        planning = planning & ~ended
        hidden = decoder.step(tokens, pos[:rows], slot, mode="hidden", live=fed)
        pos[:rows] += fed
        slot += 1
        boi_hidden = torch.where(now_ready[:, None], hidden, boi_hidden)
        ready |= now_ready
        if bar is not None:
            bar.update(1)
        # the early-exit test waits for the device: on GPU only every few steps
        if step == max_tokens or ((device.type == "cpu" or step % _CUDA_EXIT_CHECK == _CUDA_EXIT_CHECK - 1)
                                  and bool(ready.all())):
            break
        logits = im.text_logits(hidden)
    return boi_hidden, slot


def _token_logprobs(logits: torch.Tensor, token: int, temperature) -> torch.Tensor:
    """``[rows]`` fp32 log-prob of ``token`` under ``softmax(logits / T)`` per row, the sampler's convention
    (``T = 0``, greedy: ``-log(#tied maxima)`` when the token is one of the maxima, else ``-inf``)."""
    x = logits.float()
    t = temperature.float().to(x.device) if isinstance(temperature, torch.Tensor) else torch.tensor(
        float(temperature), device=x.device)
    t = t.expand(x.shape[0])
    greedy = t == 0
    scaled = x / torch.where(greedy, 1.0, t)[:, None]
    sampled = scaled[:, token] - torch.logsumexp(scaled, dim=-1)
    top = x.max(dim=-1).values
    ties = (x == top[:, None]).sum(-1).float()
    at_max = x[:, token] == top
    greedy_lp = torch.where(at_max, -torch.log(ties), float("-inf"))
    return torch.where(greedy, greedy_lp, sampled)


def _uncond_prompts(im, given, prompts, vocab: int) -> list[list[int]]:
    """One unconditional prompt per prompt, each ending with BOI."""
    boi = im.boi_id
    if given is None:
        # Janus's pad-masked prompt: with a plan the prompt does not end with BOI, which is appended
        out = [im.uncond_prompt(p) for p in prompts]
    else:
        single = isinstance(given, torch.Tensor) and given.dim() == 1 or (
            isinstance(given, (list, tuple)) and all(isinstance(t, numbers.Integral) for t in given))
        if single:
            given = [given] * len(prompts)
        elif isinstance(given, torch.Tensor) or not isinstance(given, (list, tuple)):
            raise ValueError("uncond_prompt_ids must be one id sequence (a list of ints or a 1-D integer tensor) "
                             "or a list of one per prompt")
        if len(given) != len(prompts):
            raise ValueError(f"uncond_prompt_ids has {len(given)} prompts for {len(prompts)} prompts: give one "
                             "sequence for all or one per prompt")
        out = []
        for i, p in enumerate(given):
            p = torch.as_tensor(p)
            if p.dim() != 1 or p.dtype.is_floating_point or p.dtype == torch.bool:
                raise ValueError(f"uncond_prompt_ids[{i}] must be a 1-D sequence of token ids")
            if p.numel() and (int(p.min()) < 0 or int(p.max()) >= vocab):
                raise ValueError(f"uncond_prompt_ids[{i}] holds token ids outside [0, {vocab})")
            out.append([int(t) for t in p])
    return [p if p and p[-1] == boi else p + [boi] for p in out]


def _check_generator(generator, device: torch.device) -> None:
    """A ``generator`` must be None or a ``torch.Generator`` on the model's device type."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the model is on {device}; "
                         f"use torch.Generator(device='{device.type}')")


def _length_cap(model, max_length) -> tuple[int | None, str]:
    """``(cap on prompt + completion, what it is called)``: ``max_length``, else the model's positions."""
    if max_length is None:
        return (getattr(model.config.get_text_config(), "max_position_embeddings", None),
                "the model's max_position_embeddings")
    return _checks.check_int("max_length", max_length, low=2), "max_length"


def _check_image_fits(model, longest: int, completion: int, max_length) -> None:
    max_length, source = _length_cap(model, max_length)
    if max_length is not None and longest + completion > max_length:
        raise ValueError(f"prompt_ids: the longest prompt ({longest} tokens, BOI included) + an image completion "
                         f"(up to {completion} tokens) exceeds {source} ({max_length})")


def _image_decoder(im, engine, cuda_graph, rows, total, device, modes):
    if cuda_graph is not None:
        _checks.check_bool("cuda_graph", cuda_graph)
    use_graph = device.type == "cuda" and cuda_graph is not False
    reason = decoders.lean_unsupported_reason(im.model, total, trunk=im.trunk) if engine in ("auto", "fastrl") \
        else "engine='hf'"
    if engine == "fastrl" and reason is not None:
        raise ValueError(f"engine='fastrl' cannot run this model: {reason}; use engine='hf' or 'auto'")
    if reason is not None:
        return decoders.HFDecoder(im.model, rows, total, trunk=im.trunk, modes=modes)
    return decoders.LeanDecoder(im.model, rows, total, cuda_graph=use_graph, trunk=im.trunk, modes=modes)


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
    max_length, source = _length_cap(model, max_length)
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


def _row_settings(temperature, top_k, top_p, min_p, prompts: int, samples: int, device) -> dict:
    """The sampler's four settings, each a number or a [P * G] tensor (see :func:`_row_setting`)."""
    return {"temperature": _row_setting("temperature", temperature, prompts, samples, device, integer=False),
            "top_k": _row_setting("top_k", top_k, prompts, samples, device, integer=True),
            "top_p": _row_setting("top_p", top_p, prompts, samples, device, integer=False),
            "min_p": _row_setting("min_p", min_p, prompts, samples, device, integer=False)}


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
