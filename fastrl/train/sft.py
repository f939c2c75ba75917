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

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch

from fastrl.ops import fused_linear_logprobs
from fastrl.train import distributed
from fastrl.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from fastrl.train.config import ConfigError, SFTConfig
from fastrl.train.data import BatchOrder, DataError, _Encoder, _fingerprint, _fit_prompt, load_table
from fastrl.train.dpo import TrainResult
from fastrl.train.model import Policy, build_model, load_tokenizer, packing_works, prepare_for_training, sequence_layout
from fastrl.train.optim import NonFiniteSteps, build_optimizer, build_scheduler, optimizer_step
from fastrl.train.packing import SequenceBatch
from fastrl.train.telemetry import Telemetry, flops_per_token, peak_flops

__all__ = ["SFTExamples", "load_sft_examples", "sft_step", "train_sft"]


class SFTExamples:
    """Tokenised ``prompts[i]`` / ``completions[i]`` token-id lists."""

    def __init__(self):
        self.prompts: list[list[int]] = []
        self.completions: list[list[int]] = []
        self.truncated_completions = 0

    def __len__(self) -> int:
        return len(self.prompts)

    def fingerprint(self) -> str:
        return _fingerprint(self.prompts, self.completions)


def load_sft_examples(config: SFTConfig, tokenizer, vocab_size: int) -> SFTExamples:
    """The examples of ``config.train_data`` (columns ``prompt_column``, ``completion_column``),
    tokenised; completions cut to ``max_completion_length``; errors name the file, row and column."""
    columns = [config.prompt_column, config.completion_column]
    table = load_table(config.train_data, columns)
    enc = _Encoder(tokenizer, vocab_size, use_template=config.chat_template, source=f"train_data ({config.train_data})")
    out = SFTExamples()
    for i, row in enumerate(table.select_columns(columns)):
        prompt_value = row[config.prompt_column]
        full_prompt = enc.prompt(prompt_value, i, config.prompt_column)
        prompt = _fit_prompt(full_prompt, config.max_prompt_length, config.prompt_truncation,
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
    """Forward and backward of one optimiser step's micro-batches (gradients accumulate): the mean
    NLL over all completion tokens of the step, every process included. Returns the step's loss
    (global) and this process's token counts."""
    local_tokens = float(sum(b.labels.numel() for b in batches))
    global_tokens = float(distributed.all_reduce(torch.tensor([local_tokens], dtype=torch.float64,
                                                              device=world.device))[0])
    norm = global_tokens / world.world_size
    nll_sum = 0.0
    for k, batch in enumerate(batches):
        distributed.gradient_sync(policy, k == len(batches) - 1)
        with telemetry.phase("train"):
            with autocast():
                token_logps = policy(batch, lambda hidden, weight, bias: fused_linear_logprobs(
                    hidden, weight, batch.labels, bias))
            loss = -token_logps.float().sum() / norm
            loss.backward()
        nll_sum -= float(token_logps.detach().float().sum())
    total_nll = float(distributed.all_reduce(torch.tensor([nll_sum], dtype=torch.float64, device=world.device))[0])
    return {"loss": total_nll / max(global_tokens, 1.0), "completion_tokens": global_tokens,
            "tokens": float(sum(b.tokens for b in batches)), "slots": float(sum(b.slots for b in batches)),
            "padded_slots": float(sum(b.padded_slots for b in batches))}


def train_sft(config: SFTConfig) -> TrainResult:
    """Run SFT as ``config`` says; see the module docstring."""
    world = distributed.init_world(config.device)
    torch.manual_seed(config.seed)
    out = Path(config.output_dir)

    tokenizer = load_tokenizer(config.tokenizer or config.model)
    model = build_model(config, world.device)
    vocab_size = model.get_output_embeddings().weight.shape[0]
    examples = load_sft_examples(config, tokenizer, vocab_size)
    policy = Policy(model, compute_dtype=torch.bfloat16 if config.bf16 else None)
    layout = sequence_layout(model, config.packing and packing_works(policy, vocab_size, world.device))

    def make_batch(indices: list[int]) -> SequenceBatch:
        return layout([examples.prompts[i] for i in indices], [examples.completions[i] for i in indices]).to(
            world.device)

    def autocast():
        if config.bf16:
            return torch.autocast(world.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    prepare_for_training(policy, config, world)
    policy.train()
    order = BatchOrder(len(examples), batch_size=config.batch_size, world_size=world.world_size, rank=world.rank,
                       seed=config.seed, shuffle=config.shuffle)
    steps_per_epoch = order.micro_batches_per_epoch() // config.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ConfigError(f"SFTConfig.batch_size: train_data has {len(examples)} examples, fewer than one step takes "
                          f"(batch_size {config.batch_size} × gradient_accumulation_steps "
                          f"{config.gradient_accumulation_steps} × {world.world_size} processes)")
    total_steps = config.max_steps or steps_per_epoch * config.num_epochs

    optimizer = build_optimizer(policy, config, world.device)
    scheduler = build_scheduler(optimizer, config, total_steps)
    guard = NonFiniteSteps(config.max_bad_steps)
    start_step = tokens_seen = 0
    checkpoint_path = find_checkpoint(out, config.resume)
    if checkpoint_path is not None:
        state = load_checkpoint(checkpoint_path, policy=policy, optimizer=optimizer, scheduler=scheduler, world=world)
        start_step, tokens_seen = state["step"], state["tokens_seen"]
        order.load_state_dict(state["data"])
        guard.load_state_dict(state["non_finite"])
    telemetry = Telemetry(config, total_steps=total_steps, device=world.device, is_main=world.is_main,
                          start_step=start_step)
    train_flops_per_token = 3 * flops_per_token(model)
    peak = peak_flops(world.device, config.peak_tflops)
    history: list[dict[str, Any]] = []
    last_saved = None

    def save(step: int) -> Path:
        trainer_state = {"step": step, "tokens_seen": tokens_seen, "data": order.state_dict(),
                         "non_finite": guard.state_dict()}
        return save_checkpoint(out, step, policy=policy, optimizer=optimizer, scheduler=scheduler,
                               trainer_state=trainer_state, config=config.to_dict(), world=world,
                               keep=config.keep_checkpoints, tokenizer=tokenizer)

    try:
        for step in range(start_step, total_steps):
            started = time.perf_counter()
            with telemetry.phase("data"):
                batches = [make_batch(order.next()) for _ in range(config.gradient_accumulation_steps)]
            local = sft_step(policy, batches, world=world, autocast=autocast, telemetry=telemetry)
            counts = distributed.all_reduce(torch.tensor([local["tokens"], local["slots"], local["padded_slots"]],
                                                         dtype=torch.float64, device=world.device)).tolist()
            with telemetry.phase("optimizer"):
                lr = scheduler.get_last_lr()[0]
                grad_norm, stepped = optimizer_step(policy, optimizer, scheduler, max_grad_norm=config.max_grad_norm,
                                                    loss=torch.tensor(local["loss"]), guard=guard, step=step + 1)
            elapsed = time.perf_counter() - started
            tokens_seen += int(counts[0])
            telemetry.advance()
            if (step + 1) % config.log_every == 0 or step + 1 == total_steps:
                flops = counts[0] * train_flops_per_token
                history.append(telemetry.log(step + 1, {
                    "loss": local["loss"], "ppl": math.exp(min(local["loss"], 50.0)), "grad_norm": grad_norm,
                    "lr": lr, "skipped": float(not stepped), "skipped_total": guard.total, "epoch": order.epoch,
                    "tokens": counts[0], "completion_tokens": local["completion_tokens"], "tokens_seen": tokens_seen,
                    "tokens_per_s": counts[0] / elapsed, "step_s": elapsed,
                    "packing_efficiency": counts[0] / counts[2], "batch_fill": counts[0] / counts[1],
                    "tflops": flops / elapsed / 1e12,
                    **({"mfu": flops / elapsed / (peak * world.world_size)} if peak else {}),
                }))
            if config.save_every and (step + 1) % config.save_every == 0:
                last_saved = save(step + 1)
        if total_steps > start_step and (last_saved is None or last_saved.name != f"step-{total_steps:08d}"):
            last_saved = save(total_steps)
    finally:
        telemetry.close()
    return TrainResult(history, last_saved, policy, total_steps - start_step)
