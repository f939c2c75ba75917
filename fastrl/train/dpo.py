"""Offline DPO (every DPO-family loss) on a Hugging Face causal LM: the whole recipe, top to bottom.

    from fastrl.train import DPOConfig, train_dpo
    result = train_dpo(DPOConfig(model="path/to/model", train_data="pairs.jsonl", beta=0.1))

Setup: processes and device, model and tokenizer, preference pairs (tokenised once), packing
check, reference log-probs (precomputed once and cached on disk, or a live frozen model),
sharding, optimiser and schedule, resume. Then each step (:func:`dpo_step`) builds the batch of
every micro-batch — B chosen sequences then their B rejected ones, packed or padded, whichever
costs fewer FLOPs (:func:`~fastrl.train.model.sequence_layout`) — runs the policy to
its last hidden states and hands them, with the lm-head weight, to
:class:`fastrl.losses.FusedLinearDPOLoss`, which computes the loss and its gradients without a
``[tokens, V]`` logits tensor. Each micro-batch loss is weighted by its share of the step's pairs
(gradient accumulation gives the mean over the step's pairs; FSDP2 averages over processes).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import Any

import torch

from fastrl.losses import FusedLinearDPOLoss
from fastrl.train import distributed
from fastrl.train.config import DPOConfig
from fastrl.train.data import DataError, PreferencePairs, load_preference_pairs
from fastrl.train.model import (Policy, check_image_completions, check_offline_image_lengths, dpo_head, frozen_copy,
                                image_layout, image_prompts, packing_works, pair_logps, prepare_for_training,
                                sequence_layout)
from fastrl.train.packing import COUNTS, SequenceBatch, pack
from fastrl.train.reference import cache_key, model_fingerprint, precompute_pair_logps
from fastrl.train.run import (TrainResult, data_fingerprint, end_step, finish, guarded, open_telemetry,
                              plan_steps, resume, start_run)
from fastrl.train.telemetry import Telemetry

__all__ = ["TrainResult", "dpo_step", "pair_batch", "train_dpo"]


def pair_batch(pairs: PreferencePairs, indices: list[int], *, layout=pack, device: torch.device) -> SequenceBatch:
    """The 2B sequences of B pairs: prompt + chosen for each pair, then prompt + rejected.

    Args:
        pairs: the :class:`~fastrl.train.data.PreferencePairs`.
        indices: the B pairs' indices.
        layout: :func:`~fastrl.train.packing.pack`, ``pad`` or a
            :func:`~fastrl.train.model.sequence_layout`.
        device: where the batch goes.

    Returns:
        The :class:`~fastrl.train.packing.SequenceBatch` of the 2B sequences.
    """
    prompts = [pairs.prompts[i] for i in indices] * 2
    completions = [pairs.chosen[i] for i in indices] + [pairs.rejected[i] for i in indices]
    return layout(prompts, completions).to(device)


def dpo_step(policy: Policy, micro_batches: list[list[int]], *, make_batch, loss_fn: FusedLinearDPOLoss,
             reference, autocast, telemetry: Telemetry) -> dict[str, float]:
    """Forward and backward of one optimiser step's micro-batches; gradients accumulate in the parameters.

    Args:
        policy: the :class:`~fastrl.train.model.Policy`.
        micro_batches: example indices of this process, one list per micro-batch.
        make_batch: ``make_batch(indices)``, the micro-batch's :class:`~fastrl.train.packing.SequenceBatch`.
        loss_fn: the :class:`~fastrl.losses.FusedLinearDPOLoss` head.
        reference: ``reference(indices, batch)`` gives the reference log-probs ``(chosen [B],
            rejected [B])`` or ``(None, None)``.
        autocast: a context-manager factory for the forward.
        telemetry: the run's :class:`~fastrl.train.telemetry.Telemetry`.

    Returns:
        This process's metrics: the pair-weighted mean of the loss's metrics, and token counts
        (``tokens``, ``slots``, ``padded_slots``).
    """
    step_pairs = sum(len(indices) for indices in micro_batches)
    sums: dict[str, float] = defaultdict(float)
    for k, indices in enumerate(micro_batches):
        distributed.gradient_sync(policy, k == len(micro_batches) - 1)
        with telemetry.phase("data"):
            batch = make_batch(indices)
        with telemetry.phase("reference"):
            ref_chosen, ref_rejected = reference(indices, batch)
        with telemetry.phase("train"):
            with autocast():
                loss, metrics = policy(batch, dpo_head(loss_fn, batch, ref_chosen, ref_rejected))
            share = len(indices) / step_pairs
            (loss * share).backward()
        sums["loss"] += float(loss.detach()) * share
        for name, value in metrics.items():
            sums[name] += float(value) * share
        sums["tokens"] += batch.tokens
        sums["slots"] += batch.slots
        sums["padded_slots"] += batch.padded_slots
    return dict(sums)


def train_dpo(config: DPOConfig, *, callbacks=None) -> TrainResult:
    """Run offline DPO as ``config`` says; see the module docstring.

    Args:
        config: the :class:`~fastrl.train.config.DPOConfig`.
        callbacks: objects added to ``run.callbacks`` (:mod:`fastrl.train.run`), or None.

    Returns:
        The run's :class:`~fastrl.train.run.TrainResult`.

    Raises:
        ConfigError: a bad config field, naming it.
    """
    run = start_run(config)
    run.callbacks.extend(callbacks or ())
    policy, world, model = run.policy, run.world, run.model

    # ---- data and its layout
    check_offline_image_lengths(run.image, config)
    pairs = load_preference_pairs(config, run.tokenizer, run.vocab_size)
    pairs.prompts = image_prompts(run.image, config, pairs.prompts)
    if run.image is not None:  # image pairs: each completion ends with a whole image
        for column, completions in ((config.chosen_column, pairs.chosen), (config.rejected_column, pairs.rejected)):
            try:
                check_image_completions(run.image, completions, lambda i: f"{pairs.lines[i]}, column {column!r}")
            except ValueError as e:
                raise DataError(str(e)) from None
    packed = config.packing and packing_works(policy, run.vocab_size, world.device)
    layout = image_layout(policy, sequence_layout(model, packed), config)

    def make_batch(indices: list[int]) -> SequenceBatch:
        return pair_batch(pairs, indices, layout=layout, device=world.device)

    # ---- reference: the initial policy (or reference_model), precomputed once or run live
    reference_model = None
    if config.needs_reference and (config.reference == "live" or config.reference_model is not None
                                   or config.peft_config is not None):  # LoRA: the policy, adapters disabled
        reference_model = frozen_copy(policy, config, world, config.reference_model)
    if config.needs_reference and config.reference == "precomputed":
        weights_from = config.reference_model if config.reference_model is not None else config.model
        model_for_key = None
        if not isinstance(weights_from, (str, os.PathLike)):  # built or given in memory: its tensors are hashed
            model_for_key, weights_from = (weights_from if weights_from is not None else model), None
        settings = {"dtype": config.dtype, "bf16": config.bf16, "packed": packed, "ld_alpha": config.ld_alpha,
                    "attn": model.config._attn_implementation}
        if run.image is not None:  # image runs: what scores the image tokens
            settings["image"] = {"train_logps": config.train_logps, "cfg_weight": policy.cfg_weight,
                                 **{k: v for k, v in config.image_options().items() if k != "decode"}}
        key = cache_key(pairs.fingerprint(), model_fingerprint(weights_from, model_for_key), settings)
    prepare_for_training(policy, config, world)
    policy.train()
    plan_steps(run, len(pairs), "pairs", fingerprint=data_fingerprint(pairs))

    ref_table = None
    precompute_record: dict[str, Any] = {}
    if config.needs_reference and config.reference == "precomputed":
        started = time.perf_counter()
        chosen, rejected, hit = precompute_pair_logps(
            reference_model if reference_model is not None else policy, len(pairs), make_batch,
            batch_size=config.reference_batch_size or config.batch_size,
            cache_dir=config.reference_cache_dir or run.out / "reference_cache", key=key, ld_alpha=config.ld_alpha,
            world=world, progress=config.progress)
        ref_table = (chosen, rejected)
        reference_model = None  # no second model in memory while training
        precompute_record = {"reference/precompute_s": time.perf_counter() - started, "reference/cache_hit": float(hit)}

    def reference(indices: list[int], batch: SequenceBatch):
        if ref_table is not None:
            idx = torch.tensor(indices)
            return ref_table[0][idx].to(world.device), ref_table[1][idx].to(world.device)
        if reference_model is not None:
            with run.autocast():
                return pair_logps(reference_model, batch, ld_alpha=config.ld_alpha)
        return None, None

    resume(run)
    open_telemetry(run)
    telemetry = run.telemetry
    loss_fn = FusedLinearDPOLoss(**config.loss_options())
    step_flops_per_token = 3 * run.forward_flops + (run.forward_flops if reference_model is not None else 0.0)

    with guarded(run):
        for step in range(run.start_step, run.total_steps):
            started = time.perf_counter()
            micro_batches = [run.order.next() for _ in range(config.gradient_accumulation_steps)]
            local = dpo_step(policy, micro_batches, make_batch=make_batch, loss_fn=loss_fn, reference=reference,
                             autocast=run.autocast, telemetry=telemetry)
            metrics = distributed.reduce_metrics(local, world.device, summed=COUNTS)
            tokens = metrics["tokens"]

            def step_record():
                record = {**{k: v for k, v in metrics.items() if k not in COUNTS},
                          **precompute_record}
                precompute_record.clear()  # reported once, on the first logged step
                return record

            end_step(run, step + 1, started=started, loss=metrics["loss"], tokens=tokens,
                     flops=tokens * step_flops_per_token, layout=(tokens, metrics["slots"], metrics["padded_slots"]),
                     record=step_record)
        return finish(run)
