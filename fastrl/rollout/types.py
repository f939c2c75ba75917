"""What every rollout engine shares: the :class:`Rollout` it returns and the checks of its inputs
(:func:`prompt_list` for the prompts, :func:`resolve_stop_tokens` for the ids that end a row).

:func:`fastrl.rollout.generate` (the built-in engines) and :mod:`fastrl.rollout.vllm_engine` both
import this module; neither imports the other's internals.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from fastrl import _checks

__all__ = ["Rollout", "prompt_list", "resolve_stop_tokens"]


@dataclass
class Rollout:
    """What :func:`fastrl.rollout.generate` returns: the completions of every prompt, with their log-probs.

    ``N = P * num_samples`` rows, prompt-major: rows ``[p * G, (p + 1) * G)`` are the samples of
    prompt ``p``. ``T`` is the longest completion.

    Args:
        completion_ids: ``[N, T]`` int64: sampled tokens, a row's stop token included, then
            ``pad_token_id``.
        lengths: ``[N]`` int64: tokens per row (stop token included).
        logprobs: ``[N, T]`` fp32: each token's log-prob under ``softmax(logits / temperature)`` of the
            model that sampled it, as :func:`fastrl.sampling.sample` returns it (the behaviour-policy
            log-prob for importance-sampling corrections; 0 on padding; for greedy rows the sampler's
            0, or -log of the number of tied maxima).
        prompt_index: ``[N]`` int64: the prompt each row continues.
        stopped: ``[N]`` bool: True where the row ended on a stop token, False where it ran out of
            ``max_new_tokens``.
        num_samples: G, the samples per prompt.
        engine: the decoder that ran: ``"fastrl"`` (the lean static-KV decoder), ``"hf"`` (the
            model's own forward) or ``"vllm"``.
        cond_logprobs: ``[N, T]`` fp32: an image rollout's per-token log-prob under the conditional
            branch alone, ``softmax(c / temperature)`` (what T2I-R1 trains on); the same as
            ``logprobs`` without classifier-free guidance and for plan tokens. Not given: the
            ``logprobs`` tensor itself.
        image_start: ``[N]`` int64 or None: in an image rollout, the column where each row's
            ``image_tokens`` codes begin (after its plan and BOI; 0 without a plan); None for text.
    """

    completion_ids: torch.Tensor
    lengths: torch.Tensor
    logprobs: torch.Tensor
    prompt_index: torch.Tensor
    stopped: torch.Tensor
    num_samples: int
    engine: str = "fastrl"
    cond_logprobs: torch.Tensor | None = None
    image_start: torch.Tensor | None = None

    def __post_init__(self):
        if self.cond_logprobs is None:
            self.cond_logprobs = self.logprobs

    @property
    def completion_mask(self) -> torch.Tensor:
        """[N, T] bool, True on generated tokens."""
        steps = torch.arange(self.completion_ids.shape[1], device=self.lengths.device)
        return steps[None] < self.lengths[:, None]

    @property
    def completions(self) -> list[torch.Tensor]:
        """Each row's generated tokens without the padding after them: N 1-D int64 tensors (what
        :meth:`fastrl.rollout.image.ImageModel.codes` takes: ``image.codes(rollout.completions)``)."""
        return [row[:n] for row, n in zip(self.completion_ids, self.lengths.tolist())]

    @property
    def finish_reasons(self) -> list[str]:
        """Per row ``"stop"`` (a stop token) or ``"length"`` (``max_new_tokens``)."""
        return ["stop" if s else "length" for s in self.stopped.tolist()]


def prompt_list(prompt_ids, attention_mask, vocab: int) -> list[torch.Tensor]:
    """The prompts as a list of 1-D int64 CPU tensors, checked.

    Args:
        prompt_ids: a list of P 1-D integer tensors (or sequences), or a ``[P, L]`` integer (int64,
            int32, ...) tensor. Every token id must lie in ``[0, vocab)``.
        attention_mask: with a ``[P, L]`` ``prompt_ids`` only, an optional ``[P, L]`` 0 / 1 (bool or
            integer) mask whose ones are one contiguous run per row (left or right padding).
        vocab: the vocabulary size.

    Returns:
        P 1-D int64 CPU tensors, each prompt without its padding.

    Raises:
        ValueError: naming the argument (and the row): not integer ids, empty, an id out of range, a
            mask of another shape, not 0 / 1, all padding or with holes, a mask with a list.
    """
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


def resolve_stop_tokens(stop_token_ids=None, *, model=None, tokenizer=None, vocab_size: int | None = None) -> list[int]:
    """The token ids that end a completion: sorted, each once, possibly none (``[]``).

    ``None`` takes the EOS ids of ``tokenizer`` (its ``eos_token_id``) and of ``model`` (its
    ``generation_config.eos_token_id``, an int or a list), leaving out, when ``vocab_size`` is
    given, those outside the vocabulary (they can never be sampled).

    Args:
        stop_token_ids: an int, a list / tuple / set of ints or a 1-D integer tensor, each id in
            ``[0, vocab_size)`` (``>= 0`` when ``vocab_size`` is None); ``[]`` for no stop token;
            None for the EOS ids.
        model: a model with a ``generation_config``, read when ``stop_token_ids`` is None.
        tokenizer: a tokenizer with an ``eos_token_id``, read when ``stop_token_ids`` is None.
        vocab_size: the vocabulary size the ids must lie below, or None.

    Returns:
        The sorted list of distinct ids.

    Raises:
        ValueError: naming ``stop_token_ids`` for any other value.

    >>> resolve_stop_tokens([9, 2, 9])
    [2, 9]
    >>> resolve_stop_tokens(None, model=None)
    []
    """
    if stop_token_ids is None:
        eos = []
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            eos.append(tokenizer.eos_token_id)
        model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos += [model_eos] if isinstance(model_eos, numbers.Integral) else list(model_eos or [])
        stop_token_ids = [int(i) for i in eos if vocab_size is None or 0 <= int(i) < vocab_size]
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
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0 or (
                vocab_size is not None and v >= vocab_size):
            where = f"in [0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise ValueError(f"stop_token_ids must be token ids {where}, got {v!r}")
    return sorted(set(int(v) for v in values))
