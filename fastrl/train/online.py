"""What the online recipes (GRPO, online DPO) share: rollout, rewards, gathering, logging.

A step of either recipe: :func:`rollout` draws G completions of each of this process's prompts from
the policy (:func:`fastrl.rollout.generate`, FSDP2 units gathered by
:func:`fastrl.train.distributed.full_weights`, the draws seeded by :func:`step_generator`) into
:class:`Completions`; :func:`score_completions` runs every reward on them; :func:`gather_rows`
collects the rows of every process; :func:`reward_metrics` and :func:`sample_records` are what the
step logs. :func:`online_setup` prepares a run: prompts (lengths checked against the model), rewards
(:func:`load_run_rewards`), batch layout, stop tokens
(:func:`fastrl.rollout.resolve_stop_tokens`) and group size.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from fastrl.rollout import generate, resolve_stop_tokens
from fastrl.train import distributed, rewards as rewards_lib, vllm_rollout
from fastrl.train.config import ConfigError, TrainConfig
from fastrl.train.data import Prompts, load_prompts
from fastrl.train.model import (DTYPES, Policy, image_completion_length, image_layout, image_prompts, packing_works,
                                sequence_layout)
from fastrl.train.run import Run

__all__ = ["Completions", "OnlineSetup", "decode_weights", "gather_rows", "load_run_rewards", "logged_metrics",
           "online_setup", "reward_columns", "reward_metrics", "rollout", "sample_records", "score_completions",
           "step_generator"]


# ---------------------------------------------------------------------------------------------- rollout

@dataclass
class Completions:
    """The N = P × G completions of one step on this process, prompt-major.

    Rows ``[p G, (p+1) G)`` continue prompt p. Token lists are on the CPU.

    Args:
        prompts: the prompt token ids of each completion (each prompt repeated G times).
        completions: the completion token ids of each row.
        sampler_logps: per row a ``[len(completions[i])]`` fp32 CPU tensor, the sampler's log-probs.
        stopped: ``[N]`` bool, True where the row ended on a stop token.
        rows: the data row of each completion's prompt.
        group_size: G, completions per prompt.
        engine: the rollout engine that ran (:attr:`fastrl.rollout.Rollout.engine`).
        cond_logps: on an image run, per row a ``[len(completions[i])]`` fp32 CPU tensor, the
            conditional branch's log-probs (:attr:`fastrl.rollout.Rollout.cond_logprobs`), else None.
    """

    prompts: list[list[int]]       # the prompt of each completion (repeated G times)
    completions: list[list[int]]
    sampler_logps: list[torch.Tensor]
    stopped: torch.Tensor          # [N] bool: ended on a stop token
    rows: list[int]                # data row of each completion's prompt
    group_size: int
    engine: str = "fastrl"         # the rollout engine that ran (fastrl.rollout.Rollout.engine)
    cond_logps: list[torch.Tensor] | None = None  # image runs: the conditional branch's log-probs

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(c) for c in self.completions], dtype=torch.long)


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """The sampling generator of one step on one process, a function of (seed, rank, step).

    So a resumed run draws exactly what the uninterrupted one would.

    Args:
        seed: the run's seed.
        rank: the process's rank.
        step: the optimiser step.
        device: the device whose type the generator is made for.

    Returns:
        A seeded ``torch.Generator``.
    """
    mixed = (seed * 1_000_003 + rank * 7_919 + step * 104_729 + 12_345) % (2**63 - 1)
    return torch.Generator(device=device.type).manual_seed(mixed)


def rollout(policy: Policy, prompts: list[list[int]], rows: list[int], *, config, world: distributed.World,
            stop_ids: list[int], generator: torch.Generator, num_samples: int | None = None,
            temperature: float | None = None) -> Completions:
    """G completions of each prompt from the policy (eval mode, no grad; one prefill per prompt).

    Under FSDP the weights are gathered for the rollout (:func:`fastrl.train.distributed.full_weights`);
    the sampling settings are the config's (``max_completion_length``, ``temperature``, ``top_k``,
    ``top_p``, ``min_p``, ``rollout_engine``, ``rollout_keep_cuda_graph``). On an image run (the
    policy has an :class:`~fastrl.rollout.image.ImageModel`) each completion is an image, after a
    text plan with ``plan: text``: ``image_generation``'s ``cfg_weight``, ``uncond_prompt`` and
    ``plan_max_tokens`` go to :func:`fastrl.rollout.generate`, whose rows then keep the
    conditional branch's log-probs too (:attr:`Completions.cond_logps`).

    Args:
        policy: the :class:`~fastrl.train.model.Policy`.
        prompts: P prompts' token ids.
        rows: the data row of each prompt.
        config: the trainer config.
        world: the processes (:class:`~fastrl.train.distributed.World`).
        stop_ids: the ids that end a completion.
        generator: the step's generator (:func:`step_generator`).
        num_samples: G (default ``config.num_generations``).
        temperature: overrides ``config.temperature`` when given.

    Returns:
        The step's :class:`Completions`.
    """
    g = num_samples or config.num_generations
    image = policy.image
    if image is None:
        extra = {"max_new_tokens": config.max_completion_length, "stop_token_ids": stop_ids}
    else:
        options = config.image_options()
        extra = {"image": image, "cfg_weight": options["cfg_weight"], "uncond_prompt_ids": options["uncond_prompt"],
                 "plan_max_tokens": options["plan_max_tokens"]}
        if options["plan_max_tokens"]:  # a plan ends on BOI or on one of the run's stop tokens (EOS), unless told
            stops = options["plan_stop_token_ids"]
            extra["plan_stop_token_ids"] = stops if stops is not None else list(dict.fromkeys(
                [image.boi_id, *(t for t in stop_ids if t < image.text_vocab)]))
    was_training = policy.training
    policy.eval()
    try:
        sampling = dict(num_samples=g, temperature=config.temperature if temperature is None else temperature,
                        top_k=config.top_k, top_p=config.top_p, min_p=config.min_p, generator=generator, **extra)
        with distributed.full_weights(policy, world):
            if config.rollout_engine == "vllm":  # the colocated engine, its weights synced first (vllm_rollout)
                out = vllm_rollout.engine_of(policy).generate(policy.model, prompts, **sampling)
            else:
                out = generate(policy.model, [torch.tensor(p) for p in prompts], engine=config.rollout_engine,
                               keep_graph=config.rollout_keep_cuda_graph, **sampling)
    finally:
        policy.train(was_training)
    ids, logps, lengths = out.completion_ids.cpu(), out.logprobs.cpu(), out.lengths.cpu().tolist()
    cond = getattr(out, "cond_logprobs", None)
    cond = None if image is None or cond is None else cond.cpu()
    return Completions(prompts=[prompts[i // g] for i in range(len(lengths))],
                       completions=[ids[i, :n].tolist() for i, n in enumerate(lengths)],
                       sampler_logps=[logps[i, :n].clone() for i, n in enumerate(lengths)],
                       stopped=out.stopped.cpu(), rows=[rows[i // g] for i in range(len(lengths))], group_size=g,
                       engine=out.engine,
                       cond_logps=None if cond is None else [cond[i, :n].clone() for i, n in enumerate(lengths)])


def decode_weights(run: Run, rewards: list[rewards_lib.RewardFunction]):
    """The context the step's rewards run in: the model's weights gathered where they decode images.

    That is under FSDP2, on an image run whose rewards read pixels decoded by the model's own VQ-VAE
    (as for the rollout); otherwise the context does nothing.

    Args:
        run: the :class:`~fastrl.train.run.Run`.
        rewards: the run's reward functions.

    Returns:
        A context manager.
    """
    options = run.config.image_options() if run.image is not None else None
    if options is None or options["decode"] is not None or not run.world.distributed or \
            not any(r.image_args for r in rewards):
        return contextlib.nullcontext()
    return distributed.full_weights(run.policy, run.world)


# ---------------------------------------------------------------------------------------------- rewards

def reward_columns(data: Prompts, completions: Completions, tokenizer, image=None) -> list[dict[str, Any]]:
    """The keyword arguments of each completion's reward call.

    Its data row (without ``prompt_ids`` / ``completion_ids``), ``completion`` (text, with a
    tokenizer) and ``finish_reason``. A column of the table the row lacks (a JSON line without the
    key) is there as :data:`fastrl.train.rewards.MISSING`, for :func:`fastrl.train.rewards.score`
    to name (or to pass as None under ``allow_missing_columns``).

    Args:
        data: the run's :class:`~fastrl.train.data.Prompts`.
        completions: the step's :class:`Completions`.
        tokenizer: decodes the completions, or None (no ``completion`` text).
        image: on an image run its :class:`~fastrl.rollout.image.ImageModel`: ``completion`` is then
            the text before the image (the plan, or empty), the image codes are not decoded as text.

    Returns:
        One dict per completion.
    """
    texts = None
    if tokenizer is not None:  # one call for the batch (a fast tokenizer decodes it in Rust)
        text_parts = completions.completions if image is None else \
            [c[:max(0, len(c) - image.image_tokens)] for c in completions.completions]
        texts = tokenizer.batch_decode(text_parts, skip_special_tokens=True)
    stopped = completions.stopped.tolist()
    table_columns = [k for k in data.columns if k not in ("prompt_ids", "completion_ids")]
    out = []
    for i, row in enumerate(completions.rows):
        columns = {k: v for k, v in data.rows[row].items() if k not in ("prompt_ids", "completion_ids")}
        for k in table_columns:
            columns.setdefault(k, rewards_lib.MISSING)
        if texts is not None:
            columns["completion"] = texts[i]
        columns["finish_reason"] = "stop" if stopped[i] else "length"
        out.append(columns)
    return out


def _prompt_values(data: Prompts, completions: Completions, tokenizer) -> list:
    """Each completion's prompt as a TRL-form reward gets it: the data cell (text or chat messages);
    a token-id cell decoded (special tokens dropped)."""
    out, decoded = [], {}
    for row in completions.rows:
        value = data.rows[row].get(data.prompt_column)
        if isinstance(value, list) and value and all(isinstance(t, int) for t in value):
            if row not in decoded:
                decoded[row] = tokenizer.decode(value, skip_special_tokens=True) if tokenizer is not None else value
            value = decoded[row]
        out.append(value)
    return out


def score_completions(rewards: list[rewards_lib.RewardFunction], data: Prompts, completions: Completions,
                      tokenizer, *, image=None, step: int | None = None, max_steps: int | None = None) -> torch.Tensor:
    """The rewards of this process's completions (NaN = unscorable).

    The rewards get each completion's data row named (``train_data (path) line 7``) in their
    errors; the TRL-form ones get the prompts as the data holds them, the completions' text and
    ``trainer_state`` (:class:`~fastrl.train.rewards.RewardState`: ``global_step`` = ``step``,
    ``max_steps``). A row lacking a column a reward asks for is an error unless the data allows it
    (:attr:`~fastrl.train.data.Prompts.allow_missing_columns`).

    Args:
        rewards: the run's reward functions.
        data: the run's :class:`~fastrl.train.data.Prompts`.
        completions: the step's :class:`Completions`.
        tokenizer: decodes the completions for text rewards, or None.
        image: the run's :class:`~fastrl.rollout.image.ImageModel` on an image-generation run (its
            completions' images are decoded once for the rewards that ask for ``images``), else None.
        step: the optimiser steps done before this one (for ``trainer_state``), or None (0).
        max_steps: the run's total steps, or None (0).

    Returns:
        ``[N, R]`` fp32, one column per reward.

    Raises:
        RewardError: a reward that fails (:func:`fastrl.train.rewards.score`), naming it and the data row.
    """
    columns = reward_columns(data, completions, tokenizer, image)
    trl = any(r.form == "trl" for r in rewards)
    return rewards_lib.score(rewards, completions.prompts, completions.completions, columns, image=image,
                             group_size=completions.group_size,
                             prompts=_prompt_values(data, completions, tokenizer) if trl else None,
                             row_names=[data.lines[r] for r in completions.rows]
                             if len(data.lines) == len(data.rows) else None,
                             allow_missing_columns=data.allow_missing_columns,
                             state=rewards_lib.RewardState(global_step=step or 0, max_steps=max_steps or 0))


def logged_metrics(rewards: list[rewards_lib.RewardFunction], world: distributed.World) -> dict[str, float]:
    """What the TRL-form rewards logged through ``log_metric`` in the last scoring, for the step's record.

    Each name's values are averaged over the calls of every process, as TRL does; a name is logged
    as the reward gave it.

    Args:
        rewards: the run's reward functions, after :func:`score_completions`.
        world: the processes.

    Returns:
        ``{name: mean}`` (empty when no reward logged anything).
    """
    local: dict[str, list[float]] = {}
    for reward in rewards:
        for name, values in reward.logged.get("metrics", {}).items():
            local.setdefault(name, []).extend(float(v) for v in values)
    parts = distributed.all_gather_object(local) if world.distributed else [local]
    merged: dict[str, list[float]] = {}
    for part in parts:
        for name, values in part.items():
            merged.setdefault(name, []).extend(values)
    return {name: sum(values) / len(values) for name, values in merged.items() if values}


def reward_metrics(rewards: torch.Tensor, combined: torch.Tensor, names: list[str], group_size: int) -> dict:
    """Mean / std of the combined reward and of each reward over the global batch.

    Scorable completions only; also the unscorable fraction and the fraction of groups with one
    reward value.

    Args:
        rewards: ``[N, R]`` floating (fp32), each reward; NaN = unscorable.
        combined: ``[N]`` floating (fp32), the combined reward; NaN = unscorable.
        names: the R rewards' names.
        group_size: G, completions per prompt.

    Returns:
        ``{"reward/mean", "reward/std", "reward/unscorable", "reward/frac_zero_std_groups",
        "reward/<name>/mean": float}``.
    """
    finite = ~torch.isnan(combined)
    values = combined[finite]
    out = {"reward/mean": float(values.mean()) if values.numel() else math.nan,
           "reward/std": float(values.std()) if values.numel() > 1 else 0.0,
           "reward/unscorable": float((~finite).float().mean())}
    groups = combined.view(-1, group_size)
    spread = torch.nan_to_num(groups.amax(1) - groups.amin(1), nan=0.0)
    out["reward/frac_zero_std_groups"] = float((spread == 0).float().mean())
    for j, name in enumerate(names):
        col = rewards[:, j][~torch.isnan(rewards[:, j])]
        out[f"reward/{name}/mean"] = float(col.mean()) if col.numel() else math.nan
    return out


# ---------------------------------------------------------------------------------------------- processes, logs

def gather_rows(local: torch.Tensor, world: distributed.World) -> torch.Tensor:
    """Every process's rows of ``local`` (same row count on each), in rank order (CPU).

    Args:
        local: ``[n, ...]`` any dtype, this process's rows.
        world: the processes.

    Returns:
        ``[world_size * n, ...]`` in the dtype of ``local`` (``local`` itself on one process).
    """
    if not world.distributed:
        return local
    return torch.cat(distributed.all_gather_object(local.cpu()))


def sample_records(completions: Completions, rewards: torch.Tensor, advantages: torch.Tensor | None, tokenizer,
                   count: int) -> list[dict[str, Any]]:
    """The first ``count`` completions of the step, for ``completions.jsonl``.

    Args:
        completions: the step's :class:`Completions`.
        rewards: ``[N, R]`` floating (fp32), NaN = unscorable (written as None).
        advantages: ``[N]`` floating (fp32), or None.
        tokenizer: adds ``prompt_text`` / ``completion_text`` when given.
        count: how many.

    Returns:
        One dict per completion: ``prompt``, ``completion``, ``rewards``, ``finish_reason`` and, when
        known, ``advantage``, ``prompt_text``, ``completion_text``.
    """
    out = []
    for i in range(min(count, len(completions))):
        record = {"prompt": completions.prompts[i], "completion": completions.completions[i],
                  "rewards": [None if math.isnan(r) else r for r in rewards[i].tolist()],
                  "finish_reason": "stop" if bool(completions.stopped[i]) else "length"}
        if advantages is not None:
            record["advantage"] = float(advantages[i])
        if tokenizer is not None:
            record["prompt_text"] = tokenizer.decode(completions.prompts[i])
            record["completion_text"] = tokenizer.decode(completions.completions[i])
        out.append(record)
    return out


# ---------------------------------------------------------------------------------------------- setup

def _check_lengths(config: TrainConfig, data: Prompts, model, image=None) -> None:
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    longest = max(len(p) for p in data.prompts)
    name = type(config).__name__
    if image is not None:  # the completion: the plan (with its begin-of-image token), then the image
        completion = image_completion_length(image, config)
        if limit is not None and longest + completion > limit:
            raise ConfigError(f"{name}.image_generation: the longest prompt ({longest} tokens) + the completion "
                              f"({completion}: the plan, its begin-of-image token, image_tokens "
                              f"{image.image_tokens}) exceeds the model's max_position_embeddings ({limit})")
        return
    if limit is not None and longest + config.max_completion_length > limit:
        raise ConfigError(f"{name}.max_completion_length: the longest prompt ({longest} tokens) + "
                          f"max_completion_length ({config.max_completion_length}) exceeds the model's "
                          f"max_position_embeddings ({limit})")


def load_run_rewards(config, reward_funcs, tokenizer, device: torch.device) -> list[rewards_lib.RewardFunction]:
    """The run's rewards: ``reward_funcs`` (Python objects) when given, else the config's; then the reward model.

    Args:
        config: the trainer config (``reward_funcs``, ``reward_model``, ``reward_weights``,
            ``reward_batch_size``, ``dtype``).
        reward_funcs: Python reward objects replacing the config's, or None.
        tokenizer: the policy's tokenizer.
        device: where the reward model runs.

    Returns:
        The reward functions, the reward model last.

    Raises:
        ConfigError: no reward, a ``reward_weights`` not one per reward, or an import problem, naming
            the field.
    """
    name = type(config).__name__
    funcs = list(reward_funcs) if reward_funcs is not None else list(config.reward_funcs)
    if not funcs and config.reward_model is None:
        raise ConfigError(f"{name}.reward_funcs: give at least one reward: reward_funcs and/or reward_model")
    n = len(funcs) + (config.reward_model is not None)
    if config.reward_weights is not None and len(config.reward_weights) != n:
        raise ConfigError(f"{name}.reward_weights: needs one weight per reward ({n}), got {len(config.reward_weights)}")
    try:
        return rewards_lib.load_rewards(funcs, config.reward_model, field_name=f"{name}.reward_funcs",
                                        tokenizer=tokenizer, batch_size=config.reward_batch_size, device=device,
                                        dtype=DTYPES[config.dtype], text_available=tokenizer is not None)
    except rewards_lib.RewardError as e:
        raise ConfigError(str(e)) from None


class OnlineSetup(NamedTuple):
    """What the online recipes (GRPO, online DPO) set up alike.

    Fields: ``data`` (the prompts, lengths checked), ``rewards``, ``names`` (the rewards' names, the
    metric keys), ``layout`` (packed or padded batches, :func:`~fastrl.train.model.sequence_layout`),
    ``stop_ids``, ``group`` (completions per prompt).
    """

    data: Prompts                                  # the prompts, lengths checked
    rewards: list[rewards_lib.RewardFunction]
    names: list[str]                               # the rewards' names (metric keys)
    layout: Any                                    # packed or padded batches (sequence_layout)
    stop_ids: list[int]
    group: int                                     # completions per prompt


def online_setup(run: Run, reward_funcs=None) -> OnlineSetup:
    """The prompts, rewards, batch layout, stop tokens and group size of an online run.

    Args:
        run: the :class:`~fastrl.train.run.Run`.
        reward_funcs: Python reward objects replacing the config's, or None.

    Returns:
        An :class:`OnlineSetup` (prompt lengths checked against the model).

    Raises:
        ConfigError: a prompt + ``max_completion_length`` longer than the model allows, or a reward
            problem, naming the field.
        RewardError: a data row without a column a reward asks for (unless ``allow_missing_columns``),
            naming the reward, the column and the row's line.
    """
    config, tokenizer, device = run.config, run.tokenizer, run.world.device
    if config.rollout_engine == "vllm":  # first: a missing vLLM stops the run before its data are read
        vllm_rollout.attach(run)
    data = load_prompts(config, tokenizer, run.vocab_size)
    data.prompts = image_prompts(run.image, config, data.prompts)
    _check_lengths(config, data, run.model, run.image)
    rewards = load_run_rewards(config, reward_funcs, tokenizer, device)
    rewards_lib.check_columns(rewards, data.rows, data.columns, data.lines,  # a row lacking a reward's column: now
                              allow_missing_columns=data.allow_missing_columns)
    layout = sequence_layout(run.model, config.packing and packing_works(run.policy, run.vocab_size, device))
    layout = image_layout(run.policy, layout, config)
    stop_ids = resolve_stop_tokens(config.stop_token_ids, model=run.model, tokenizer=tokenizer)
    return OnlineSetup(data, rewards, [r.name for r in rewards], layout, stop_ids, config.num_generations)
