"""Online (iterative) DPO: pairs sampled from the current policy, scored by the rewards, trained with
any DPO-family loss. The whole recipe, top to bottom.

    from fastrl.train import OnlineDPOConfig, train_online_dpo
    result = train_online_dpo(OnlineDPOConfig(model="path/to/model", train_data="prompts.jsonl",
                                              reward_funcs=["my_rewards:exact_match"], num_generations=4))

Setup as in :mod:`fastrl.train.grpo`. Each step:

1. **rollout** — G = ``num_generations`` (≥ 2) completions of each of this process's
   ``batch_size × gradient_accumulation_steps`` prompts from the current policy
   (:func:`fastrl.train.grpo.rollout`: one prefill per prompt, eval mode, no grad).
2. **reward** — every reward, combined into one number per completion (the weighted sum of its
   scorable rewards; a completion with none is never paired).
3. **pairs** — per prompt, best vs worst (``pairing: best_worst``) or every pair with different
   rewards, the higher one chosen (``all_pairs``); pairs whose reward gap is below
   ``min_reward_gap`` are dropped (a curriculum by gap).
4. **reference** — summed completion log-probs of the reference for every pair (a live, frozen
   model: the initial policy with ``reference_update: fixed``; with ``previous_iterate`` the policy
   itself, copied into the reference every ``reference_update_every`` steps: iterative / DNO-style
   DPO); skipped for reference-free losses.
5. **train** — the pairs in ``gradient_accumulation_steps`` micro-batches through the policy with
   :class:`fastrl.losses.FusedLinearDPOLoss` as the head; each micro-batch's loss weighs its share
   of the step's pairs over every process, so the step's loss is the mean over all its pairs; one
   optimiser step. A step without a single pair (every group tied) skips the optimiser (the
   schedule still advances).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from fastrl.losses import FusedLinearDPOLoss
from fastrl.train import distributed, rewards as rewards_lib
from fastrl.train.checkpoint import _model_tensors, find_checkpoint, load_checkpoint, save_checkpoint
from fastrl.train.config import ConfigError, OnlineDPOConfig
from fastrl.train.data import BatchOrder, load_prompts
from fastrl.train.dpo import TrainResult
from fastrl.train.grpo import (Completions, _check_lengths, _mean_over_processes, gather_rows, load_run_rewards,
                               reward_metrics, rollout, sample_records, score_completions, step_generator,
                               stop_tokens)
from fastrl.train.model import (Policy, build_model, frozen_copy, load_tokenizer, packing_works, prepare_for_training,
                                sequence_layout)
from fastrl.train.optim import NonFiniteSteps, build_optimizer, build_scheduler, optimizer_step
from fastrl.train.packing import SequenceBatch
from fastrl.train.reference import pair_logps
from fastrl.train.telemetry import Telemetry, flops_per_token, peak_flops

__all__ = ["make_pairs", "online_dpo_step", "train_online_dpo"]


def make_pairs(rewards: torch.Tensor, group_size: int, *, pairing: str, min_gap: float) -> list[tuple[int, int]]:
    """``(chosen, rejected)`` completion indices from the combined rewards ``[N]`` (NaN = unscorable)
    of groups of ``group_size``: best vs worst of each group, or every pair of different rewards;
    only pairs whose gap is > 0 and >= ``min_gap``.

    >>> make_pairs(torch.tensor([0.1, 0.9, 0.5, 0.5, float("nan"), 0.5]), 3, pairing="best_worst", min_gap=0.0)
    [(1, 0)]
    >>> make_pairs(torch.tensor([0.1, 0.9, 0.5]), 3, pairing="all_pairs", min_gap=0.3)
    [(1, 0), (1, 2), (2, 0)]
    """
    pairs = []
    for start in range(0, rewards.numel(), group_size):
        scored = [(float(rewards[i]), i) for i in range(start, start + group_size) if not math.isnan(rewards[i])]
        if len(scored) < 2:
            continue
        if pairing == "best_worst":
            best = max(scored, key=lambda x: (x[0], -x[1]))
            worst = min(scored, key=lambda x: (x[0], x[1]))
            candidates = [(best, worst)]
        else:
            candidates = [(a, b) for a in scored for b in scored if a[0] > b[0]]
        pairs += [(a[1], b[1]) for a, b in candidates if a[0] - b[0] > 0 and a[0] - b[0] >= min_gap]
    return pairs


def pair_micro_batches(completions: Completions, pairs: list[tuple[int, int]], count: int, *, layout,
                       device: torch.device) -> list[tuple[SequenceBatch, int]]:
    """``count`` micro-batches of this process's pairs (B chosen sequences, then their B rejected
    ones), as even as possible; a micro-batch without pairs holds a placeholder pair and the pair
    count 0 (its loss is multiplied by 0: every process must run the same forwards under FSDP)."""
    out = []
    per = -(-len(pairs) // count) if pairs else 0
    for k in range(count):
        chunk = pairs[k * per:(k + 1) * per] if per else []
        real = len(chunk)
        if not chunk:
            chunk = [(0, 1)]
        prompts = [completions.prompts[c] for c, _ in chunk] * 2
        seqs = [completions.completions[c] for c, _ in chunk] + [completions.completions[r] for _, r in chunk]
        out.append((layout(prompts, seqs).to(device), real))
    return out


def online_dpo_step(policy: Policy, micros: list[tuple[SequenceBatch, int]], *, loss_fn: FusedLinearDPOLoss,
                    reference, world: distributed.World, autocast, telemetry: Telemetry) -> dict[str, float]:
    """Forward and backward of the step's pair micro-batches (gradients accumulate); each loss is
    weighted by its share of the step's pairs over all processes. ``reference(batch)`` gives the
    reference ``(chosen [B], rejected [B])`` or ``(None, None)``. Returns this process's metrics
    (the loss's, pair-weighted) and ``pairs`` (global)."""
    total = float(distributed.all_reduce(torch.tensor([float(sum(n for _, n in micros))], dtype=torch.float64,
                                                      device=world.device))[0])
    sums: dict[str, float] = defaultdict(float)
    for k, (batch, n) in enumerate(micros):
        distributed.gradient_sync(policy, k == len(micros) - 1)
        with telemetry.phase("reference"):
            ref_chosen, ref_rejected = reference(batch)
        with telemetry.phase("train"):
            with autocast():
                loss, metrics = policy(batch, lambda hidden, weight, bias: loss_fn(
                    hidden, weight, batch.labels, ref_chosen, ref_rejected, cu_seqlens=batch.cu_seqlens, bias=bias))
            share = n * world.world_size / total if total else 0.0
            (loss * share).backward()
        sums["loss"] += float(loss.detach()) * share
        for name, value in metrics.items():
            sums[name] += float(value) * share
    sums["pairs"] = total
    return dict(sums)


# ---------------------------------------------------------------------------------------------- reference

def _reference_file(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"reference-step-{step:08d}.safetensors"


def save_reference(reference: Policy, out: Path, step: int, world: distributed.World) -> None:
    """The previous-iterate reference of a checkpoint at ``step`` (written before the checkpoint,
    atomically; files of checkpoints no longer kept are removed)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(reference, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if world.is_main:
        path = _reference_file(out, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors, tied = _model_tensors(state)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"tied": repr(tied)})
        os.replace(tmp, path)
    distributed.barrier()


def load_reference(reference: Policy, checkpoint: Path) -> None:
    """Restore the previous-iterate reference saved beside ``checkpoint`` by :func:`save_reference`."""
    import ast

    from safetensors import safe_open
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    path = checkpoint.parent / f"reference-{checkpoint.name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"resume: {path} is missing; it holds the previous-iterate reference of "
                                f"{checkpoint.name}")
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        tied = ast.literal_eval((f.metadata() or {}).get("tied", "{}"))
    for name, source in tied.items():
        tensors[name] = tensors[source]
    set_model_state_dict(reference, {"model." + k: v for k, v in tensors.items()},
                         options=StateDictOptions(full_state_dict=True))


def _prune_reference_files(out: Path) -> None:
    root = out / "checkpoints"
    kept = {p.name for p in root.glob("step-*") if p.is_dir()}
    for f in root.glob("reference-step-*.safetensors"):
        if f.name.removeprefix("reference-").removesuffix(".safetensors") not in kept:
            f.unlink(missing_ok=True)


@torch.no_grad()
def copy_weights(target: Policy, source: Policy) -> None:
    """``target`` ← ``source`` parameter by parameter (same sharding, so local shards copy)."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.copy_(s.detach())


# ---------------------------------------------------------------------------------------------- recipe

def train_online_dpo(config: OnlineDPOConfig, reward_funcs=None) -> TrainResult:
    """Run online DPO as ``config`` says; see the module docstring. ``reward_funcs`` (optional)
    replaces ``config.reward_funcs`` with Python callables."""
    world = distributed.init_world(config.device)
    torch.manual_seed(config.seed)
    out = Path(config.output_dir)

    tokenizer = load_tokenizer(config.tokenizer or config.model)
    model = build_model(config, world.device)
    vocab_size = model.get_output_embeddings().weight.shape[0]
    data = load_prompts(config, tokenizer, vocab_size)
    _check_lengths(config, data, model)
    rewards = load_run_rewards(config, reward_funcs, tokenizer, world.device)
    names = [r.name for r in rewards]
    policy = Policy(model, compute_dtype=torch.bfloat16 if config.bf16 else None)
    layout = sequence_layout(model, config.packing and packing_works(policy, vocab_size, world.device))
    stop_ids = stop_tokens(config, tokenizer, model)
    group = config.num_generations

    def autocast():
        if config.bf16:
            return torch.autocast(world.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    reference_model = frozen_copy(policy, config, world) if config.needs_reference else None
    iterate = reference_model is not None and config.reference_update == "previous_iterate"
    prepare_for_training(policy, config, world)
    policy.train()

    order = BatchOrder(len(data), batch_size=config.batch_size, world_size=world.world_size, rank=world.rank,
                       seed=config.seed, shuffle=config.shuffle)
    steps_per_epoch = order.micro_batches_per_epoch() // config.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ConfigError(f"OnlineDPOConfig.batch_size: train_data has {len(data)} prompts, fewer than one step "
                          f"takes (batch_size {config.batch_size} × gradient_accumulation_steps "
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
        if iterate and start_step % config.reference_update_every:
            load_reference(reference_model, Path(checkpoint_path))
    telemetry = Telemetry(config, total_steps=total_steps, device=world.device, is_main=world.is_main,
                          start_step=start_step)

    loss_fn = FusedLinearDPOLoss(**config.loss_options())  # log-probs of the model itself (temperature: sampling only)
    forward_flops = flops_per_token(model)
    peak = peak_flops(world.device, config.peak_tflops)
    history: list[dict[str, Any]] = []
    last_saved = None

    def reference(batch: SequenceBatch):
        if reference_model is None:
            return None, None
        with autocast():
            return pair_logps(reference_model, batch, ld_alpha=config.ld_alpha)

    def save(step: int) -> Path:
        if iterate and step % config.reference_update_every:
            save_reference(reference_model, out, step, world)
        trainer_state = {"step": step, "tokens_seen": tokens_seen, "data": order.state_dict(),
                         "non_finite": guard.state_dict()}
        path = save_checkpoint(out, step, policy=policy, optimizer=optimizer, scheduler=scheduler,
                               trainer_state=trainer_state, config=config.to_dict(), world=world,
                               keep=config.keep_checkpoints, tokenizer=tokenizer)
        if world.is_main:
            _prune_reference_files(out)
        return path

    try:
        for step in range(start_step, total_steps):
            started = time.perf_counter()
            if iterate and step % config.reference_update_every == 0:
                copy_weights(reference_model, policy)  # the reference becomes the current iterate
            indices = [i for _ in range(config.gradient_accumulation_steps) for i in order.next()]
            prompts = [data.prompts[i] for i in indices]

            with telemetry.phase("rollout"):
                completions = rollout(policy, prompts, indices, config=config, world=world, stop_ids=stop_ids,
                                      generator=step_generator(config.seed, world.rank, step, world.device))
            with telemetry.phase("reward"):
                local_rewards = score_completions(rewards, data, completions, tokenizer)
                combined = rewards_lib.combine(local_rewards, config.reward_weights)
                pairs = make_pairs(combined, group, pairing=config.pairing, min_gap=config.min_reward_gap)
                all_rewards = gather_rows(local_rewards, world)
                record = reward_metrics(all_rewards, rewards_lib.combine(all_rewards, config.reward_weights), names,
                                        group)
                gaps = [float(combined[c] - combined[r]) for c, r in pairs]

            micros = pair_micro_batches(completions, pairs, config.gradient_accumulation_steps, layout=layout,
                                        device=world.device)
            local = online_dpo_step(policy, micros, loss_fn=loss_fn, reference=reference, world=world,
                                    autocast=autocast, telemetry=telemetry)
            with telemetry.phase("optimizer"):
                lr = scheduler.get_last_lr()[0]
                metrics = _mean_over_processes({k: v for k, v in local.items() if k != "pairs"}, world.device, world)
                if local["pairs"] > 0:
                    grad_norm, stepped = optimizer_step(policy, optimizer, scheduler,
                                                        max_grad_norm=config.max_grad_norm,
                                                        loss=torch.tensor(metrics["loss"]), guard=guard, step=step + 1)
                else:  # nothing to learn from: no optimiser step (Adam's moments would still move the weights)
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    grad_norm, stepped = 0.0, False

            elapsed = time.perf_counter() - started
            counts = distributed.all_reduce(torch.tensor(
                [float(sum(len(p) + len(c) for p, c in zip(completions.prompts, completions.completions))),
                 float(sum(b.tokens for b, n in micros if n)), float(sum(gaps)), float(completions.stopped.sum())],
                dtype=torch.float64, device=world.device)).tolist()
            tokens_seen += int(counts[0])
            telemetry.advance()
            if (step + 1) % config.log_every == 0 or step + 1 == total_steps:
                lengths = gather_rows(completions.lengths, world).float()
                flops = forward_flops * (counts[0] + counts[1] * (3 + (reference_model is not None)))
                record.update({
                    **metrics, "pairs": local["pairs"], "pairs/reward_gap": counts[2] / max(local["pairs"], 1),
                    "grad_norm": grad_norm, "lr": lr, "skipped": float(not stepped), "skipped_total": guard.total,
                    "epoch": order.epoch, "completions/mean_length": float(lengths.mean()),
                    "completions/clipped_ratio": 1.0 - counts[3] / lengths.numel(),
                    "tokens": counts[0], "train_tokens": counts[1], "tokens_seen": tokens_seen,
                    "tokens_per_s": counts[0] / elapsed, "step_s": elapsed, "tflops": flops / elapsed / 1e12,
                    **({"mfu": flops / elapsed / (peak * world.world_size)} if peak else {}),
                })
                history.append(telemetry.log(step + 1, record))
                if config.log_completions:
                    telemetry.log_completions(step + 1, sample_records(completions, local_rewards, None, tokenizer,
                                                                       config.log_completions))
            if config.save_every and (step + 1) % config.save_every == 0:
                last_saved = save(step + 1)
        if total_steps > start_step and (last_saved is None or last_saved.name != f"step-{total_steps:08d}"):
            last_saved = save(total_steps)
    finally:
        telemetry.close()
    return TrainResult(history, last_saved, policy, total_steps - start_step)
