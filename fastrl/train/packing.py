"""Sequences (prompt + completion) into one model batch: packed (the default) or padded.

Packed: every sequence back to back in one row ``input_ids [1, T]`` with ``position_ids`` that
restart at 0 for each sequence and no attention mask. Transformers (5.x) reads the restarts: with
flash-attn it runs the varlen kernel on the ``cu_seqlens`` it derives from them; with SDPA / eager
it builds a block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``), so no
token attends outside its own sequence. Padded (the fallback): ``[N, L]`` rows, right-padded,
with an ``attention_mask``.

Either way the loss sees one layout: the hidden states that predict completion tokens, gathered
flat ``[T_c, H]`` by ``score_index``, with ``labels [T_c]`` and ``cu_seqlens [N+1]`` over the
completions — the packed input of the fused-linear losses. Padding never reaches the lm-head.

>>> b = pack([[5, 6], [7]], [[1, 2, 3], [4]])
>>> b.input_ids.tolist(), b.position_ids.tolist()
([[5, 6, 1, 2, 3, 7, 4]], [[0, 1, 2, 3, 4, 0, 1]])
>>> b.score_index.tolist(), b.labels.tolist(), b.cu_seqlens.tolist()
([1, 2, 3, 5], [1, 2, 3, 4], [0, 3, 4])
>>> p = pad([[5, 6], [7]], [[1, 2, 3], [4]])
>>> p.input_ids.tolist(), p.score_index.tolist()
([[5, 6, 1, 2, 3], [7, 4, 0, 0, 0]], [1, 2, 3, 5])
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["COUNTS", "SequenceBatch", "pack", "pad", "with_unconditional"]

# The batch counters a step sums over its micro-batches and processes (every other step metric is a mean).
COUNTS = ("tokens", "slots", "padded_slots")


@dataclasses.dataclass
class SequenceBatch:
    """One forward's worth of sequences, laid out for the model and for the fused-linear losses.

    Built by :func:`pack` or :func:`pad`. ``tokens`` counts prompt + completion tokens, ``slots``
    the positions the forward processes (T packed, N·L padded).

    Args:
        input_ids: ``[1, T]`` (packed) or ``[N, L]`` (padded) int64.
        position_ids: ``[1, T]`` int64, restarting at 0 for each sequence (packed), or None (padded).
        attention_mask: ``[N, L]`` int64, 1 on the sequences' positions (padded), or None (packed).
        score_index: ``[T_c]`` int64, indexes the flattened ``[*, H]`` hidden states: entry j is the
            position whose hidden state predicts ``labels[j]``.
        labels: ``[T_c]`` int64, the completion tokens, completion after completion.
        cu_seqlens: ``[N+1]`` int32, bounds each completion in ``labels``.
        lengths: ``[N]`` int64, each whole sequence's length (prompt + completion); with
            ``uncond_index`` the unconditional sequences' lengths follow (``[2N]``).
        uncond_index: ``[T_i]`` int64 or None: for a CFG-mixed image log-prob
            (:func:`with_unconditional`), entry j indexes the position whose hidden state predicts the
            j-th image label (the j-th True of the image rows, last N labels of each completion) under
            the unconditional prompt; those sequences follow the conditional ones in the same forward.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    score_index: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    lengths: torch.Tensor
    uncond_index: torch.Tensor | None = None

    @property
    def num_sequences(self) -> int:
        """The scored (conditional) sequences."""
        return self.cu_seqlens.numel() - 1

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def slots(self) -> int:
        return self.input_ids.numel()

    @property
    def padded_slots(self) -> int:
        """Positions a padded batch of these sequences would process (N · longest)."""
        return self.lengths.numel() * int(self.lengths.max())

    @property
    def completion_lengths(self) -> torch.Tensor:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of the decoder's forward."""
        if self.position_ids is not None:
            return {"input_ids": self.input_ids, "position_ids": self.position_ids}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def to(self, device: torch.device | str) -> SequenceBatch:
        return dataclasses.replace(self, **{f.name: None if getattr(self, f.name) is None else
                                            getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def _check(prompts: list[list[int]], completions: list[list[int]]) -> None:
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"need one completion per prompt and at least one sequence; got {len(prompts)} prompts "
                         f"and {len(completions)} completions")
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if not p or not c:
            raise ValueError(f"sequence {i}: prompt and completion must each hold at least one token")


def _scoring(prompt_lens: list[int], completions: list[list[int]], starts: list[int]):
    index, labels = [], []
    for start, p, c in zip(starts, prompt_lens, completions):
        # position start + p - 1 + j predicts completion token j (at start + p + j)
        index.append(torch.arange(start + p - 1, start + p - 1 + len(c)))
        labels.extend(c)
    cu = torch.zeros(len(completions) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor([len(c) for c in completions]).cumsum(0)
    return torch.cat(index), torch.tensor(labels, dtype=torch.int64), cu


def pack(prompts: list[list[int]], completions: list[list[int]]) -> SequenceBatch:
    """Sequence i = ``prompts[i] + completions[i]``, all in one row (see the module docstring).

    Args:
        prompts: the prompts' token ids, each at least one token.
        completions: the completions' token ids, one per prompt, each at least one token.

    Returns:
        A packed :class:`SequenceBatch` (``input_ids`` and ``position_ids`` ``[1, T]``, no attention
        mask), on the CPU.

    Raises:
        ValueError: no sequence, unequal numbers of prompts and completions, or an empty prompt or
            completion (naming the sequence).
    """
    _check(prompts, completions)
    seqs = [p + c for p, c in zip(prompts, completions)]
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    starts = (lengths.cumsum(0) - lengths).tolist()
    index, labels, cu = _scoring([len(p) for p in prompts], completions, starts)
    input_ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths.tolist()])[None]
    return SequenceBatch(input_ids, position_ids, None, index, labels, cu, lengths)


def pad(prompts: list[list[int]], completions: list[list[int]], pad_id: int = 0) -> SequenceBatch:
    """Sequence i = ``prompts[i] + completions[i]`` in row i, right-padded with ``pad_id``.

    Args:
        prompts: the prompts' token ids, each at least one token.
        completions: the completions' token ids, one per prompt, each at least one token.
        pad_id: the token id written past each sequence (masked out: it is never attended to nor
            scored).

    Returns:
        A padded :class:`SequenceBatch` (``input_ids`` and ``attention_mask`` ``[N, L]``, L the
        longest sequence; no position ids), on the CPU.

    Raises:
        ValueError: no sequence, unequal numbers of prompts and completions, or an empty prompt or
            completion (naming the sequence).
    """
    _check(prompts, completions)
    seqs = [p + c for p, c in zip(prompts, completions)]
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    width = int(lengths.max())
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.int64)
    for i, s in enumerate(seqs):
        input_ids[i, :len(s)] = torch.tensor(s)
        attention_mask[i, :len(s)] = 1
    index, labels, cu = _scoring([len(p) for p in prompts], completions, [i * width for i in range(len(seqs))])
    return SequenceBatch(input_ids, None, attention_mask, index, labels, cu, lengths)


def with_unconditional(layout, prompts: list[list[int]], completions: list[list[int]],
                       uncond_prompts: list[list[int]], image_tokens: int) -> SequenceBatch:
    """A batch of conditional sequences and, in the same forward, their unconditional ones.

    Sequence i is ``prompts[i] + completions[i]``; its unconditional sequence
    ``uncond_prompts[i] + completions[i][-image_tokens:]`` (the image codes only).

    The returned batch scores the conditional completions as ``layout`` would (``labels``,
    ``cu_seqlens``, ``score_index`` of those sequences); its ``uncond_index`` gives, for each image
    label in order, the hidden state that predicts the same code under the unconditional prompt (the
    unconditional branch of classifier-free guidance, which sees no text plan).

    Args:
        layout: :func:`pack`, :func:`pad` or a :func:`~fastrl.train.model.sequence_layout`.
        prompts: the conditional prompts.
        completions: their completions, each ending with ``image_tokens`` image codes.
        uncond_prompts: one unconditional prompt per sequence (it ends where the image starts, e.g.
            with the begin-of-image token).
        image_tokens: N, the codes per image.

    Returns:
        A :class:`SequenceBatch` with ``uncond_index`` set.

    Raises:
        ValueError: unequal lists, or a completion shorter than ``image_tokens`` (naming it).
    """
    if not len(prompts) == len(completions) == len(uncond_prompts):
        raise ValueError(f"need one unconditional prompt per sequence; got {len(uncond_prompts)} for "
                         f"{len(prompts)} prompts and {len(completions)} completions")
    for i, c in enumerate(completions):
        if len(c) < image_tokens:
            raise ValueError(f"completion {i} has {len(c)} tokens, fewer than image_tokens ({image_tokens})")
    n = len(prompts)
    both = layout(list(prompts) + list(uncond_prompts), list(completions) + [c[len(c) - image_tokens:]
                                                                              for c in completions])
    cond_tokens = int(both.cu_seqlens[n])
    cu = both.cu_seqlens[:n + 1].clone()
    return dataclasses.replace(both, score_index=both.score_index[:cond_tokens], labels=both.labels[:cond_tokens],
                               cu_seqlens=cu, uncond_index=both.score_index[cond_tokens:])
