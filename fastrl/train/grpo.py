"""GRPO-family RL on a Hugging Face causal LM: the whole recipe, top to bottom.

    from fastrl.train import GRPOConfig, train_grpo
    result = train_grpo(GRPOConfig(model="path/to/model", train_data="prompts.jsonl",
                                   reward_funcs=["my_rewards:exact_match"], num_generations=8))

Setup as in :mod:`fastrl.train.dpo` (processes, model, tokenizer, prompts, packing check, a frozen
reference when ``beta > 0``, sharding, optimiser, resume), plus the rewards
(:func:`fastrl.train.online.online_setup`, which GRPO and online DPO share with the rollout, reward
and logging steps of :mod:`fastrl.train.online`). Then every step (one rollout, ``num_iterations`` =
μ updates):

1. **rollout** — this process's ``batch_size × gradient_accumulation_steps`` prompts go through
   :func:`fastrl.rollout.generate` in one call (:func:`fastrl.train.online.rollout`): each prompt is
   prefilled once and its KV cache shared by its G = ``num_generations`` samples; the policy is in
   eval mode without gradients; the sampler's per-token log-probs are kept.
2. **reward** — every reward on every completion (``[N, R]``, NaN = unscorable); the rewards of all
   processes are gathered so that the advantages use the statistics of the global batch.
3. **advantages** — :func:`fastrl.ops.group_advantages` with the config's estimator, scale,
   reward weights and multi-reward mode.
4. **reference** — log-probs of the frozen initial model only when ``beta > 0``, and π_old: with
   μ = 1 (``old_logps: auto``) none at all — the step is on-policy, so the loss takes the current
   log-probs detached (ratio 1, as TRL when it skips the old-log-prob forward); with μ > 1 (or
   ``old_logps: policy``) one no-grad fused-kernel forward of the policy before the first update;
   ``old_logps: sampler`` reuses the rollout's log-probs. All from
   :func:`fastrl.train.model.completion_logps` (no ``[tokens, V]`` logits).
5. **train** — μ passes over the micro-batches; each micro-batch (``batch_size`` prompts × G
   completions, packed) runs the policy to its last hidden states with
   :class:`fastrl.losses.FusedLinearGRPOLoss` as the head, and one optimiser step ends each pass.
   ``max_steps`` counts rollouts; the learning-rate schedule (``warmup_steps`` included) counts
   optimiser steps, μ per rollout.

**Normalisation across accumulation and processes**: the step's loss is the loss type's
aggregation over the whole step batch, as if it were one batch on one process (so 1 micro-batch of
4 prompts and 2 of 2 give the same update). dapo / cispo / vespo / ``token-mean`` pass
``num_items_in_batch`` = the active completion tokens of the step over every micro-batch and
process, divided by the process count (FSDP averages gradients over processes); the others scale
each micro-batch's loss by its share of the normaliser: bnpo by its tokens, grpo / sapo / dr_grpo /
luspo by its sequences (the masked ones included, as TRL), verl's ``seq-mean-*`` by its non-empty
sequences. ``mask_truncated_completions`` drops completions without a stop token from the loss
(and from the token counts).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from fastrl.losses import FusedLinearGRPOLoss, grpo_loss
from fastrl.ops import group_advantages
from fastrl.rollout import release
from fastrl.train import distributed, rewards as rewards_lib
from fastrl.train.config import GRPOConfig
from fastrl.train.evaluate import attach_evaluation
from fastrl.train.model import Head, Policy, completion_logps, frozen_copy, prepare_for_training
from fastrl.train.online import Completions, decode_weights, gather_rows, online_setup, reward_metrics, sample_records
from fastrl.train.packing import SequenceBatch
from fastrl.train.run import (TrainResult, data_fingerprint, end_step, finish, guarded, open_telemetry, optimize,
                              plan_steps, resume, start_run)
from fastrl.train.step_source import StepProducer, step_source
from fastrl.train.telemetry import Telemetry

__all__ = ["MicroBatch", "advantages_of", "grpo_head", "grpo_step", "loss_scales", "micro_batches", "train_grpo"]


# ---------------------------------------------------------------------------------------------- advantages

def advantages_of(rewards: torch.Tensor, group_size: int, config: GRPOConfig, *, weights: list[float] | None,
                  lengths: torch.Tensor, baseline: torch.Tensor | None,
                  preferences: torch.Tensor | None = None) -> torch.Tensor:
    """Advantages of the global batch from its rewards, with the config's estimator.

    The estimator's extra inputs: completion lengths for opo, the greedy completions' rewards for
    remax, and for pref_grpo the pairwise preferences of a pairwise reward model when the run has
    one (``preferences``), else those of the combined reward (a win when higher, ½ when equal).

    Args:
        rewards: ``[N, R]`` fp32, each reward of each completion.
        group_size: G, completions per prompt.
        config: the :class:`~fastrl.train.config.GRPOConfig` (estimator and its options).
        weights: the R reward weights, or None.
        lengths: ``[N]`` int64, the completion lengths (opo).
        baseline: ``[N, R]`` fp32, the greedy completions' rewards (remax), or None.
        preferences: ``[N, G]`` fp32, a pairwise reward's preference matrix
            (:func:`fastrl.train.rewards.pairwise_preferences`), or None.

    Returns:
        ``[N]`` fp32 advantages.
    """
    options = dict(config.advantage_options(),
                   reward_weights=torch.tensor(weights) if weights is not None and rewards.shape[1] > 1 else None)
    table = rewards if rewards.shape[1] > 1 else rewards[:, 0]
    if config.advantage_estimator == "opo":
        options["lengths"] = lengths.float()
    elif config.advantage_estimator == "remax":
        options["baseline_rewards"] = baseline if rewards.shape[1] > 1 else baseline[:, 0]
    elif config.advantage_estimator == "pref_grpo":
        combined = rewards_lib.combine(rewards, weights).view(-1, group_size)
        wins = (combined[:, :, None] > combined[:, None, :]).float() + 0.5 * (
            combined[:, :, None] == combined[:, None, :]).float()
        options["preferences"] = wins.reshape(-1, group_size) if preferences is None else preferences.float()
        table = combined.reshape(-1)
        options["reward_weights"] = None
    elif weights is not None and rewards.shape[1] == 1:
        table = table * weights[0]
    return group_advantages(table, group_size, **options)


# ---------------------------------------------------------------------------------------------- train

def loss_scales(agg: str, micro: list[tuple[int, int, int]], step_totals: tuple[float, float, float],
                world_size: int) -> tuple[list[float], float | None]:
    """Per micro-batch loss multipliers and the ``num_items_in_batch`` that make the step's loss one aggregation.

    The step's loss is then the aggregation ``agg`` over the whole step batch (every micro-batch of
    every process). Gradients are averaged over processes afterwards, hence the factor ``world_size``.

    Args:
        agg: the loss's aggregation (:attr:`fastrl.losses.GRPOSettings.agg`).
        micro: ``micro[k] = (tokens, sequences kept, sequences in all)`` of micro-batch k on this
            process.
        step_totals: the same summed over the step and the processes.
        world_size: the number of processes.

    Returns:
        ``(scales, num_items_in_batch)``: one float per micro-batch, and the float to pass to the loss
        (None for the aggregations that do not take it).
    """
    tokens, kept, every = step_totals
    if agg in ("dapo", "token-mean"):
        return [1.0] * len(micro), tokens / world_size
    if agg == "bnpo":
        return [t * world_size / max(tokens, 1) for t, _, _ in micro], None
    if agg in ("grpo", "dr_grpo", "luspo"):
        return [n * world_size / max(every, 1) for _, n, _ in micro], None
    if agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return [n * world_size / max(kept, 1) for _, n, _ in micro], None
    return [float(world_size)] * len(micro), None  # seq-mean-token-sum-norm, token-sum: plain sums


@dataclass
class MicroBatch:
    """One forward's worth of a step: the packed sequences and their per-token / per-sequence inputs.

    Args:
        batch: the packed :class:`~fastrl.train.packing.SequenceBatch`.
        advantages: ``[n]`` fp32, one per sequence.
        sampler_logps: ``[T_c]`` fp32, the sampler's log-probs of the completion tokens.
        every: sequences before masking (for the sequence-count normalisers).
        empty: every sequence masked: a placeholder forward (loss × 0) keeps FSDP in step.
        old_logps: ``[T_c]`` fp32, π_old's log-probs, or None (on-policy).
        ref_logps: ``[T_c]`` fp32, the reference's log-probs, or None.
        cond_logps: ``[T_c]`` fp32, an image run's conditional-branch log-probs from the rollout, or None.
    """

    batch: SequenceBatch
    advantages: torch.Tensor       # [n]
    sampler_logps: torch.Tensor    # [T_c]
    every: int                     # sequences before masking (for the sequence-count normalisers)
    empty: bool = False            # every sequence masked: a placeholder forward (loss × 0) keeps FSDP in step
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    cond_logps: torch.Tensor | None = None


def micro_batches(completions: Completions, advantages: torch.Tensor, *, prompts_per_micro: int, layout,
                  mask_truncated: bool, device: torch.device) -> list[MicroBatch]:
    """The step's completions in micro-batches of ``prompts_per_micro`` prompts × G completions.

    Args:
        completions: the step's :class:`~fastrl.train.online.Completions`.
        advantages: ``[N]`` fp32, one per completion.
        prompts_per_micro: prompts per micro-batch.
        layout: lays the sequences out (:func:`~fastrl.train.model.sequence_layout`).
        mask_truncated: leave out the completions that never hit a stop token.
        device: where the batches go.

    Returns:
        The :class:`MicroBatch` list, in order.
    """
    rows_per_micro = prompts_per_micro * completions.group_size
    out = []
    for start in range(0, len(completions), rows_per_micro):
        rows = list(range(start, min(start + rows_per_micro, len(completions))))
        keep = [i for i in rows if not mask_truncated or bool(completions.stopped[i])]
        empty = not keep
        if empty:
            keep = rows[:1]
        batch = layout([completions.prompts[i] for i in keep], [completions.completions[i] for i in keep]).to(device)
        cond = None if completions.cond_logps is None else \
            torch.cat([completions.cond_logps[i] for i in keep]).to(device)
        out.append(MicroBatch(batch=batch, advantages=advantages[keep].to(device),
                              sampler_logps=torch.cat([completions.sampler_logps[i] for i in keep]).to(device),
                              every=len(rows), empty=empty, cond_logps=cond))
    return out


def grpo_head(loss_fn: FusedLinearGRPOLoss, m: MicroBatch, *, sampler_logps, num_items) -> Head:
    """The GRPO loss of one micro-batch as a :class:`~fastrl.train.model.Head`.

    Its fused form is ``loss_fn`` on the scored rows; its log-prob form (an image batch with a text
    plan) :func:`fastrl.losses.grpo_loss` with the same settings on the per-token log-probs (and
    entropies when ``entropy_coef`` is set).

    Args:
        loss_fn: the :class:`~fastrl.losses.FusedLinearGRPOLoss`.
        m: the :class:`MicroBatch`.
        sampler_logps: ``[T_c]`` fp32 for the sampler correction, or None.
        num_items: ``num_items_in_batch`` of the loss, or None.

    Returns:
        The head; it returns ``(loss, metrics)``.
    """
    batch = m.batch

    def fused(hidden, weight, bias, labels):
        return loss_fn(hidden, weight, labels, m.old_logps, m.advantages, cu_seqlens=batch.cu_seqlens, bias=bias,
                       ref_logps=m.ref_logps, sampler_logps=sampler_logps, num_items_in_batch=num_items)

    def from_logps(logps, entropy):
        return grpo_loss(logps, m.old_logps, m.advantages, cu_seqlens=batch.cu_seqlens, ref_logps=m.ref_logps,
                         sampler_logps=sampler_logps, entropy=entropy, num_items_in_batch=num_items,
                         settings=loss_fn.settings)

    return Head(fused, from_logps, temperature=loss_fn.options["temperature"],
                entropy=loss_fn.settings.entropy_coef != 0.0)


def grpo_step(policy: Policy, micros: list[MicroBatch], *, loss_fn: FusedLinearGRPOLoss, config: GRPOConfig,
              world: distributed.World, autocast, telemetry: Telemetry, optimize,
              use_sampler: bool = False) -> dict[str, float]:
    """μ passes of forward + backward over the micro-batches, each pass ended by an optimiser step.

    Args:
        policy: the :class:`~fastrl.train.model.Policy`.
        micros: the step's :class:`MicroBatch` list.
        loss_fn: the :class:`~fastrl.losses.FusedLinearGRPOLoss` head.
        config: the :class:`~fastrl.train.config.GRPOConfig`.
        world: the processes.
        autocast: a context-manager factory for the forward.
        telemetry: the run's :class:`~fastrl.train.telemetry.Telemetry`.
        optimize: ``optimize(loss)``, the optimiser step; returns ``(grad_norm, stepped)``.
        use_sampler: hand the sampler's log-probs to the loss (its importance-sampling correction)
            even where the config's ``is_mode`` / ``is_cap`` / ``off_policy_mask_threshold`` would not
            (an asynchronous run's off-policy batches).

    Returns:
        This step's metrics: ``loss`` (the step aggregate, mean over passes), the loss's metrics
        (token-weighted), ``grad_norm``, ``skipped``, ``train_tokens``.
    """
    agg = loss_fn.settings.agg
    counts = [(0 if m.empty else m.batch.labels.numel(), 0 if m.empty else m.batch.num_sequences, m.every)
              for m in micros]
    totals = distributed.all_reduce(torch.tensor([sum(c[i] for c in counts) for i in range(3)],
                                                 dtype=torch.float64, device=world.device))
    totals = tuple(totals.tolist())
    scales, num_items = loss_scales(agg, counts, totals, world.world_size)
    use_sampler = use_sampler or config.is_cap is not None or config.is_mode != "token_truncate" \
        or config.off_policy_mask_threshold is not None
    sums: dict[str, float] = defaultdict(float)
    weight_sum = 0.0
    for _ in range(config.num_iterations):
        step_loss = 0.0
        for k, (m, scale) in enumerate(zip(micros, scales)):
            distributed.gradient_sync(policy, k == len(micros) - 1)
            batch = m.batch
            with telemetry.phase("train"):
                with autocast():
                    loss, metrics = policy(batch, grpo_head(loss_fn, m, num_items=num_items,
                                                            sampler_logps=m.sampler_logps if use_sampler else None))
                scale = 0.0 if m.empty else scale
                (loss * scale).backward()
            step_loss += float(loss.detach()) * scale / world.world_size
            w = 0.0 if m.empty else float(batch.labels.numel())
            weight_sum += w
            for name, value in metrics.items():
                sums[name] += float(value) * w
        with telemetry.phase("optimizer"):
            global_loss = float(distributed.all_reduce(torch.tensor([step_loss], dtype=torch.float64,
                                                                    device=world.device))[0])
            grad_norm, stepped = optimize(global_loss)
        sums["loss"] += global_loss / config.num_iterations
        sums["grad_norm"] += grad_norm / config.num_iterations
        sums["skipped"] += float(not stepped)
    out = {name: value / max(weight_sum, 1.0) for name, value in sums.items()
           if name not in ("loss", "grad_norm", "skipped")}
    out.update(loss=sums["loss"], grad_norm=sums["grad_norm"], skipped=sums["skipped"],
               train_tokens=totals[0])
    return out


# ---------------------------------------------------------------------------------------------- recipe

def train_grpo(config: GRPOConfig, reward_funcs=None, *, callbacks=None) -> TrainResult:
    """Run GRPO as ``config`` says; see the module docstring.

    Args:
        config: the :class:`~fastrl.train.config.GRPOConfig`.
        reward_funcs: reward callables that replace ``config.reward_funcs`` (the reward model, if any,
            is added after them), or None.
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

    reference_model = frozen_copy(policy, config, world) if config.beta > 0 else None  # the initial policy
    prepare_for_training(policy, config, world)
    policy.train()
    old_source = config.old_logps if config.old_logps != "auto" else ("policy" if config.num_iterations > 1 else None)
    plan_steps(run, len(data), "prompts", fingerprint=data_fingerprint(data))
    resume(run, updates_per_step=config.num_iterations)
    open_telemetry(run)
    telemetry = run.telemetry
    loss_fn = FusedLinearGRPOLoss(temperature=config.temperature, settings=config.loss_settings())
    forwards_per_token = 1 + (reference_model is not None) + (old_source == "policy") + 3 * config.num_iterations

    # rollout and rewards: in this process, or in a rollout worker (async_rollout); a decoder kept across
    # rollouts (rollout_keep_cuda_graph) and the worker end with the run
    producer = StepProducer(policy, config, data, rewards, tokenizer, stop_ids, world, run.total_steps,
                            phase=telemetry.phase, decode=lambda: decode_weights(run, rewards),
                            remax=config.advantage_estimator == "remax")
    source = run.source = step_source(run, producer)
    use_sampler = source.is_async and source.k > 0  # off-policy batches: the sampler correction (is_mode, is_cap)

    def close():
        source.close()
        release(policy.model)

    with guarded(run, on_exit=close):
        for step in range(run.start_step, run.total_steps):
            started = time.perf_counter()
            indices = [i for _ in range(config.gradient_accumulation_steps) for i in run.order.next()]

            # 1. rollout: G samples per prompt, one prefill each; 2. rewards of every completion (and with
            # filter_groups more prompts until no group scored all the same)
            sample = source.get(step, indices)
            completions, local_rewards = sample.completions, sample.rewards
            if len(completions) == 0:  # dynamic sampling kept no group in max_tries: nothing to learn from
                source.after_update(policy.model, step + 1)
                end_step(run, step + 1, started=started, tokens=0.0, flops=0.0, empty=True,
                         record=lambda: {**sample.logged, **sample.metrics})
                continue

            # gathered over processes; 3. advantages
            with telemetry.phase("reward"):
                logged = sample.logged
                all_rewards = gather_rows(local_rewards, world)
                baseline = None
                if sample.baseline is not None:
                    baseline = gather_rows(sample.baseline, world)
                    baseline = baseline.repeat_interleave(group, 0)
                all_lengths = gather_rows(completions.lengths, world)
                preferences = sample.preferences
                preferences = None if preferences is None else gather_rows(preferences, world)
                advantages = advantages_of(all_rewards, group, config, weights=config.reward_weights,
                                           lengths=all_lengths, baseline=baseline, preferences=preferences)
                mine = slice(world.rank * len(completions), (world.rank + 1) * len(completions))
                local_advantages = advantages[mine]
                combined = rewards_lib.combine(all_rewards, config.reward_weights)
                record = {**logged, **reward_metrics(all_rewards, combined, names, group), **sample.metrics}

            micros = micro_batches(completions, local_advantages, prompts_per_micro=config.batch_size, layout=layout,
                                   mask_truncated=config.mask_truncated_completions, device=world.device)

            # 4. reference log-probs (beta > 0) and π_old (μ > 1), no grad, fused kernels
            with telemetry.phase("reference"):
                for m in micros:
                    if reference_model is not None:
                        with run.autocast():
                            m.ref_logps = completion_logps(reference_model, m.batch, temperature=config.temperature)
                    if old_source == "policy":
                        with run.autocast():
                            m.old_logps = completion_logps(policy, m.batch, temperature=config.temperature)
                    elif old_source == "sampler":  # trained on the conditional branch: its own sampling-time log-probs
                        conditional = m.cond_logps is not None and config.train_logps == "conditional"
                        m.old_logps = m.cond_logps if conditional else m.sampler_logps

            # 5. μ updates over the micro-batches
            local = grpo_step(policy, micros, loss_fn=loss_fn, config=config, world=world, autocast=run.autocast,
                              telemetry=telemetry, optimize=lambda loss: optimize(run, loss, step + 1),
                              use_sampler=use_sampler)
            with telemetry.phase("push"):
                source.after_update(policy.model, step + 1)  # the worker samples the next steps with these

            # ---- optimiser steps taken (in grpo_step); counters, log record, checkpoint
            lengths = all_lengths.float()
            sequence_tokens = float(sum(len(p) + len(c) for p, c in zip(completions.prompts,
                                                                          completions.completions)))
            counts = distributed.all_reduce(torch.tensor(
                [sequence_tokens, sum(m.batch.tokens for m in micros), sum(m.batch.slots for m in micros),
                 sum(m.batch.padded_slots for m in micros), float(completions.stopped.sum())],
                dtype=torch.float64, device=world.device)).tolist()

            def step_record():
                record.update({
                    **distributed.reduce_metrics({k: v for k, v in local.items() if k != "train_tokens"}, world.device),
                    "train_tokens": local["train_tokens"],
                    "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
                    "completions/max_length": float(lengths.max()),
                    "completions/clipped_ratio": 1.0 - counts[4] / lengths.numel(),
                })
                return record

            end_step(run, step + 1, started=started, tokens=counts[0], layout=counts[1:4],
                     flops=counts[0] * run.forward_flops * forwards_per_token, record=step_record,
                     samples=lambda: sample_records(completions, local_rewards, local_advantages, tokenizer,
                                                    config.log_completions))
        return finish(run)
