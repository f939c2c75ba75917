"""Supervised fine-tuning: next-token NLL on the completion tokens, the prompt masked. The recipe,
top to bottom.

    from fastrl.train import SFTConfig, train_sft
    result = train_sft(SFTConfig(model_config={...}, train_data="sft.jsonl", max_steps=100))
    # result.checkpoint: a from_pretrained-loadable directory (model.safetensors + config.json)

Data: columns ``prompt`` and ``completion`` (text, chat messages or token-id lists; see
:mod:`fastrl.train.data`). Each step packs every micro-batch's prompt + completion sequences
(:func:`fastrl.train.packing.pack`), runs the policy to the hidden states that predict completion
tokens and takes their log-probs with :func:`fastrl.ops.fused_linear_logprobs` (no ``[tokens, V]``
logits; the backward recomputes them slice by slice). The loss is the mean NLL over every
completion token of the step — every micro-batch and process: each micro-batch's token sum is
divided by the step's global token count (× processes, as FSDP averages gradients), so
accumulation and process count do not change the update. The run ends with a checkpoint.
"""

from __future__ import annotations

import math
import time

import torch

from fastrl.train import distributed
from fastrl.train.config import SFTConfig
from fastrl.train.data import DataError, Encoder, fingerprint, fit_prompt, load_table
from fastrl.train.model import (Policy, check_image_completions, check_offline_image_lengths, image_layout,
                                image_prompts, logprob_head, packing_works, prepare_for_training, sequence_layout)
from fastrl.train.packing import SequenceBatch
from fastrl.train.run import (TrainResult, data_fingerprint, end_step, finish, guarded, open_telemetry,
                              plan_steps, resume, start_run)
from fastrl.train.telemetry import Telemetry

__all__ = ["SFTExamples", "load_sft_examples", "sft_step", "train_sft"]


class SFTExamples:
    """Tokenised ``prompts[i]`` / ``completions[i]`` token-id lists.

    Made empty; :func:`load_sft_examples` fills ``prompts``, ``completions``, the count
    ``truncated_completions`` and ``lines`` (each example's data row named, for messages).
    """

    def __init__(self):
        self.prompts: list[list[int]] = []
        self.completions: list[list[int]] = []
        self.truncated_completions = 0
        self.lines: list[str] = []

    def __len__(self) -> int:
        return len(self.prompts)

    def fingerprint(self) -> str:
        return fingerprint(self.prompts, self.completions)


def load_sft_examples(config: SFTConfig, tokenizer, vocab_size: int, table=None) -> SFTExamples:
    """The examples of ``config.train_data`` (or ``table``), tokenised; completions cut to ``max_completion_length``.

    Args:
        config: the :class:`~fastrl.train.config.SFTConfig` (``train_data``, ``prompt_column``,
            ``completion_column``, lengths, truncation, chat template).
        tokenizer: the policy's tokenizer.
        vocab_size: token ids must lie below it.
        table: a ``datasets.Dataset`` or a list of dicts to read instead of ``config.train_data``,
            or None.

    Returns:
        The :class:`SFTExamples`.

    Raises:
        DataError: a bad row, naming the file, row and column (an empty completion, a prompt too long).
    """
    columns = [config.prompt_column, config.completion_column]
    table = load_table(config.train_data if table is None else table, columns)
    enc = Encoder(tokenizer, vocab_size, use_template=config.chat_template, source=table)
    out = SFTExamples()
    out.lines = [table.where(i) for i in range(len(table))]
    for i, row in enumerate(table):
        prompt_value = row[config.prompt_column]
        full_prompt = enc.prompt(prompt_value, i, config.prompt_column)
        prompt = fit_prompt(full_prompt, config.max_prompt_length, config.prompt_truncation,
                             enc.where(i, config.prompt_column))
        ids = enc.completion(prompt_value, full_prompt, row[config.completion_column], i, config.completion_column)
        if not ids:
            raise DataError(f"{enc.where(i, config.completion_column)}: the completion is empty")
        if len(ids) > config.max_completion_length:
            ids = ids[:config.max_completion_length]
            out.truncated_completions += 1
        out.prompts.append(prompt)
        out.completions.append(ids)
    return out


def sft_step(policy: Policy, batches: list[SequenceBatch], *, world: distributed.World, autocast,
             telemetry: Telemetry) -> dict[str, float]:
    """Forward and backward of one optimiser step's micro-batches (gradients accumulate).

    The loss is the mean NLL over all completion tokens of the step, every process included.

    Args:
        policy: the :class:`~fastrl.train.model.Policy`.
        batches: the step's micro-batches (:class:`~fastrl.train.packing.SequenceBatch`).
        world: the processes.
        autocast: a context-manager factory for the forward.
        telemetry: the run's :class:`~fastrl.train.telemetry.Telemetry`.

    Returns:
        The step's loss (global) and this process's token counts.
    """
    local_tokens = float(sum(b.labels.numel() for b in batches))
    global_tokens = float(distributed.all_reduce(torch.tensor([local_tokens], dtype=torch.float64,
                                                              device=world.device))[0])
    norm = global_tokens / world.world_size
    nll_sum = 0.0
    for k, batch in enumerate(batches):
        distributed.gradient_sync(policy, k == len(batches) - 1)
        with telemetry.phase("train"):
            with autocast():
                token_logps = policy(batch, logprob_head())
            loss = -token_logps.float().sum() / norm
            loss.backward()
        nll_sum -= float(token_logps.detach().float().sum())
    total_nll = float(distributed.all_reduce(torch.tensor([nll_sum], dtype=torch.float64, device=world.device))[0])
    return {"loss": total_nll / max(global_tokens, 1.0), "completion_tokens": global_tokens,
            "tokens": float(sum(b.tokens for b in batches)), "slots": float(sum(b.slots for b in batches)),
            "padded_slots": float(sum(b.padded_slots for b in batches))}


def train_sft(config: SFTConfig, *, callbacks=None) -> TrainResult:
    """Run SFT as ``config`` says; see the module docstring.

    Args:
        config: the :class:`~fastrl.train.config.SFTConfig`.
        callbacks: objects added to ``run.callbacks`` (:mod:`fastrl.train.run`), or None.

    Returns:
        The run's :class:`~fastrl.train.run.TrainResult`.

    Raises:
        ConfigError: a bad config field, naming it.
    """
    run = start_run(config)
    run.callbacks.extend(callbacks or ())
    policy, world = run.policy, run.world
    check_offline_image_lengths(run.image, config)
    examples = load_sft_examples(config, run.tokenizer, run.vocab_size)
    examples.prompts = image_prompts(run.image, config, examples.prompts)
    if run.image is not None:  # image examples: each completion ends with a whole image
        try:
            check_image_completions(run.image, examples.completions,
                                    lambda i: f"{examples.lines[i]}, column {config.completion_column!r}")
        except ValueError as e:
            raise DataError(str(e)) from None
    layout = sequence_layout(run.model, config.packing and packing_works(policy, run.vocab_size, world.device))
    layout = image_layout(policy, layout, config)

    def make_batch(indices: list[int]) -> SequenceBatch:
        return layout([examples.prompts[i] for i in indices], [examples.completions[i] for i in indices]).to(
            world.device)

    prepare_for_training(policy, config, world)
    policy.train()
    plan_steps(run, len(examples), "examples", fingerprint=data_fingerprint(examples))
    resume(run)
    open_telemetry(run)
    telemetry = run.telemetry

    with guarded(run):
        for step in range(run.start_step, run.total_steps):
            started = time.perf_counter()
            with telemetry.phase("data"):
                batches = [make_batch(run.order.next()) for _ in range(config.gradient_accumulation_steps)]
            local = sft_step(policy, batches, world=world, autocast=run.autocast, telemetry=telemetry)
            counts = distributed.all_reduce(torch.tensor([local["tokens"], local["slots"], local["padded_slots"]],
                                                         dtype=torch.float64, device=world.device)).tolist()
            end_step(run, step + 1, started=started, loss=local["loss"], tokens=counts[0],
                     flops=counts[0] * (3 * run.forward_flops), layout=counts,
                     record=lambda: {"loss": local["loss"], "ppl": math.exp(min(local["loss"], 50.0)),
                                     "completion_tokens": local["completion_tokens"]})
        return finish(run)
