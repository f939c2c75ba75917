"""Online (iterative) DPO: pairs sampled from the current policy, scored by the rewards, trained with
any DPO-family loss. The whole recipe, top to bottom.

    from fastrl.train import OnlineDPOConfig, train_online_dpo
    result = train_online_dpo(OnlineDPOConfig(model="path/to/model", train_data="prompts.jsonl",
                                              reward_funcs=["my_rewards:exact_match"], num_generations=4))

Setup as in :mod:`fastrl.train.grpo` (:func:`fastrl.train.online.online_setup`). Each step:

1. **rollout** — G = ``num_generations`` (≥ 2) completions of each of this process's
   ``batch_size × gradient_accumulation_steps`` prompts from the current policy
   (:func:`fastrl.train.online.rollout`: one prefill per prompt, eval mode, no grad).
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

import math
import time
from collections import defaultdict
from pathlib import Path

import torch

from fastrl.losses import FusedLinearDPOLoss
from fastrl.rollout import release
from fastrl.train import distributed, rewards as rewards_lib
from fastrl.train.checkpoint import load_reference, prune_reference_files, save_reference
from fastrl.train.config import OnlineDPOConfig
from fastrl.train.evaluate import attach_evaluation
from fastrl.train.model import Policy, dpo_head, frozen_copy, pair_logps, prepare_for_training
from fastrl.train.online import Completions, decode_weights, gather_rows, online_setup, reward_metrics, sample_records
from fastrl.train.packing import SequenceBatch
from fastrl.train.run import (Run, TrainResult, data_fingerprint, end_step, finish, guarded, open_telemetry,
                              plan_steps, resume, save, start_run)
from fastrl.train.step_source import StepProducer, step_source
from fastrl.train.telemetry import Telemetry

__all__ = ["make_pairs", "online_dpo_step", "train_online_dpo"]


def make_pairs(rewards: torch.Tensor, group_size: int, *, pairing: str, min_gap: float) -> list[tuple[int, int]]:
    """``(chosen, rejected)`` completion indices from the combined rewards of groups of ``group_size``.

    Best vs worst of each group, or every pair of different rewards; only pairs whose gap is > 0 and
    >= ``min_gap``.

    Args:
        rewards: ``[N]`` floating (fp32), the combined rewards; NaN = unscorable (never paired).
        group_size: G, completions per prompt.
        pairing: ``"best_worst"`` or ``"all_pairs"``.
        min_gap: the smallest reward gap of a pair.

    Returns:
        The pairs, as ``(chosen index, rejected index)``.

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
    """Forward and backward of the step's pair micro-batches (gradients accumulate).

    Each loss is weighted by its share of the step's pairs over all processes.

    Args:
        policy: the :class:`~fastrl.train.model.Policy`.
        micros: ``(batch, pairs)`` per micro-batch: B chosen sequences then their B rejected ones, and
            the pair count (0 for a placeholder).
        loss_fn: the :class:`~fastrl.losses.FusedLinearDPOLoss` head.
        reference: ``reference(batch)`` gives the reference ``(chosen [B], rejected [B])`` or
            ``(None, None)``.
        world: the processes.
        autocast: a context-manager factory for the forward.
        telemetry: the run's :class:`~fastrl.train.telemetry.Telemetry`.

    Returns:
        This process's metrics (the loss's, pair-weighted) and ``pairs`` (global).
    """
    total = float(distributed.all_reduce(torch.tensor([float(sum(n for _, n in micros))], dtype=torch.float64,
                                                      device=world.device))[0])
    sums: dict[str, float] = defaultdict(float)
    for k, (batch, n) in enumerate(micros):
        distributed.gradient_sync(policy, k == len(micros) - 1)
        with telemetry.phase("reference"):
            ref_chosen, ref_rejected = reference(batch)
        with telemetry.phase("train"):
            with autocast():
                loss, metrics = policy(batch, dpo_head(loss_fn, batch, ref_chosen, ref_rejected))
            share = n * world.world_size / total if total else 0.0
            (loss * share).backward()
        sums["loss"] += float(loss.detach()) * share
        for name, value in metrics.items():
            sums[name] += float(value) * share
    sums["pairs"] = total
    return dict(sums)


# ---------------------------------------------------------------------------------------------- reference

@torch.no_grad()
def copy_weights(target: Policy, source: Policy) -> None:
    """``target`` ← ``source`` parameter by parameter (same sharding, so local shards copy)."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.copy_(s.detach())


# ---------------------------------------------------------------------------------------------- recipe

def train_online_dpo(config: OnlineDPOConfig, reward_funcs=None, *, callbacks=None) -> TrainResult:
    """Run online DPO as ``config`` says; see the module docstring.

    Args:
        config: the :class:`~fastrl.train.config.OnlineDPOConfig`.
        reward_funcs: Python callables replacing ``config.reward_funcs``, or None.
        callbacks: objects added to ``run.callbacks`` (:mod:`fastrl.train.run`), or None; with
            ``eval_data`` the held-out :class:`~fastrl.train.evaluate.Evaluation` follows them.

    Returns:
        The run's :class:`~fastrl.train.run.TrainResult`.

    Raises:
        ConfigError: a bad config field, naming it.
    """
    run = start_run(config)
    run.callbacks.extend(callbacks or ())
    policy, world, tokenizer = run.policy, run.world, run.tokenizer

    # ---- prompts, rewards, layout; the held-out evaluation (eval_data)
    data, rewards, names, layout, stop_ids, group = online_setup(run, reward_funcs)
    attach_evaluation(run, rewards, stop_ids)

    reference_model = frozen_copy(policy, config, world) if config.needs_reference else None
    iterate = reference_model is not None and config.reference_update == "previous_iterate"
    prepare_for_training(policy, config, world)
    policy.train()
    plan_steps(run, len(data), "prompts", fingerprint=data_fingerprint(data))
    checkpoint = resume(run)
    if iterate and checkpoint is not None and run.start_step % config.reference_update_every:
        load_reference(reference_model, checkpoint)
    open_telemetry(run)
    telemetry = run.telemetry
    loss_fn = FusedLinearDPOLoss(**config.loss_options())  # log-probs of the model itself (temperature: sampling only)

    def reference(batch: SequenceBatch):
        if reference_model is None:
            return None, None
        with run.autocast():
            return pair_logps(reference_model, batch, ld_alpha=config.ld_alpha)

    def save_with_reference(run: Run, step: int) -> Path:
        if iterate and step % config.reference_update_every:
            save_reference(reference_model, run.out, step, world)
        path = save(run, step)
        if world.is_main:
            prune_reference_files(run.out)
        return path

    # rollout and rewards: in this process, or in a rollout worker (async_rollout); a decoder kept across
    # rollouts (rollout_keep_cuda_graph) and the worker end with the run
    source = run.source = step_source(run, StepProducer(policy, config, data, rewards, tokenizer, stop_ids, world, run.total_steps,
                                           phase=telemetry.phase, decode=lambda: decode_weights(run, rewards)))

    def close():
        source.close()
        release(policy.model)

    with guarded(run, save=save_with_reference, on_exit=close):
        for step in range(run.start_step, run.total_steps):
            started = time.perf_counter()
            if iterate and step % config.reference_update_every == 0:
                copy_weights(reference_model, policy)  # the reference becomes the current iterate
            indices = [i for _ in range(config.gradient_accumulation_steps) for i in run.order.next()]
            sample = source.get(step, indices)  # the rollout and its rewards
            completions, local_rewards = sample.completions, sample.rewards
            with telemetry.phase("reward"):
                combined = rewards_lib.combine(local_rewards, config.reward_weights)
                pairs = make_pairs(combined, group, pairing=config.pairing, min_gap=config.min_reward_gap)
                all_rewards = gather_rows(local_rewards, world)
                record = {**sample.logged,  # a TRL-form reward's log_metric calls
                          **reward_metrics(all_rewards, rewards_lib.combine(all_rewards, config.reward_weights), names,
                                           group), **sample.metrics}
                gaps = [float(combined[c] - combined[r]) for c, r in pairs]

            micros = pair_micro_batches(completions, pairs, config.gradient_accumulation_steps, layout=layout,
                                        device=world.device)
            local = online_dpo_step(policy, micros, loss_fn=loss_fn, reference=reference, world=world,
                                    autocast=run.autocast, telemetry=telemetry)
            metrics = distributed.reduce_metrics({k: v for k, v in local.items() if k != "pairs"}, world.device)

            counts = distributed.all_reduce(torch.tensor(
                [float(sum(len(p) + len(c) for p, c in zip(completions.prompts, completions.completions))),
                 float(sum(b.tokens for b, n in micros if n)), float(sum(gaps)), float(completions.stopped.sum())],
                dtype=torch.float64, device=world.device)).tolist()

            def step_record():
                lengths = gather_rows(completions.lengths, world).float()
                record.update({
                    **metrics, "pairs": local["pairs"], "pairs/reward_gap": counts[2] / max(local["pairs"], 1),
                    "train_tokens": counts[1], "completions/mean_length": float(lengths.mean()),
                    "completions/clipped_ratio": 1.0 - counts[3] / lengths.numel(),
                })
                return record

            flops = run.forward_flops * (counts[0] + counts[1] * (3 + (reference_model is not None)))
            # a step without pairs has nothing to learn from: no optimiser step
            end_step(run, step + 1, started=started, loss=metrics["loss"], empty=local["pairs"] == 0,
                     tokens=counts[0], flops=flops, record=step_record, save=save_with_reference,
                     samples=lambda: sample_records(completions, local_rewards, None, tokenizer,
                                                    config.log_completions))
            with telemetry.phase("push"):
                source.after_update(policy.model, step + 1)  # the worker samples the next steps with these
        return finish(run, save=save_with_reference)
