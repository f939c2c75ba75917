"""Held-out evaluation of the online methods (GRPO, online DPO): roll out held-out prompts, score them.

With ``eval_data`` set (a file, a ``datasets.Dataset`` or a list of dicts; the trainers'
``eval_dataset``), the recipe installs an :class:`Evaluation` among the run's callbacks
(:func:`attach_evaluation`). Every ``eval_every`` steps (TRL's ``eval_steps``), and at the last step,
its ``on_step_end`` samples ``eval_num_generations`` completions (default ``num_generations``) of
every held-out prompt from the current policy with the run's sampling settings
(:func:`fastrl.train.online.rollout`), scores them with the run's rewards and weights
(:func:`fastrl.train.online.score_completions`) and returns, merged into that step's logged record:

- ``eval/reward_mean``, ``eval/reward_std``: the combined reward over the scorable completions;
- ``eval/pass_rate``: the fraction of completions whose combined reward is above
  ``eval_pass_threshold`` (default 0: a 0/1 verifier's pass rate; unscorable completions fail);
- ``eval/reward/<name>/mean``: each reward's mean;
- ``eval/mean_length``: the completions' mean length in tokens; ``eval/prompts``: the prompt count.

The held-out prompts are split evenly over the processes (each rolls out the same count, the last
prompts repeated where the count does not divide, the repeats left out of the metrics) in chunks of
one training rollout (``batch_size × gradient_accumulation_steps`` prompts). The draws are seeded
by the step, apart from the training draws: evaluating does not change the training run.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fastrl.train import distributed, rewards as rewards_lib
from fastrl.train.data import Prompts, load_prompts
from fastrl.train.model import image_prompts
from fastrl.train.online import gather_rows, rollout, score_completions, step_generator
from fastrl.train.run import Run

__all__ = ["EVAL_SEED_OFFSET", "Evaluation", "attach_evaluation", "evaluate"]

#: added to the run's seed for the evaluation draws, so they are not the training draws
EVAL_SEED_OFFSET = 1_000_003


def evaluate(run: Run, data: Prompts, rewards: list[rewards_lib.RewardFunction], *, stop_ids: list[int],
             step: int) -> dict[str, float]:
    """Roll out every prompt of ``data`` with the policy and score the completions; every process calls it.

    Args:
        run: the :class:`~fastrl.train.run.Run` (policy, config, world, tokenizer).
        data: the held-out :class:`~fastrl.train.data.Prompts`.
        rewards: the run's reward functions.
        stop_ids: the ids that end a completion.
        step: the step just ended (1-based), which seeds the draws.

    Returns:
        ``{"eval/reward_mean", "eval/reward_std", "eval/pass_rate", "eval/reward/<name>/mean",
        "eval/mean_length", "eval/prompts": float}`` (see the module docstring).
    """
    config, world = run.config, run.world
    g = config.eval_num_generations or config.num_generations
    n = len(data)
    per_rank = math.ceil(n / world.world_size)
    first = world.rank * per_rank
    mine = [(first + j) % n for j in range(per_rank)]
    valid = [first + j < n for j in range(per_rank)]
    chunk = config.batch_size * config.gradient_accumulation_steps
    generator = step_generator(config.seed + EVAL_SEED_OFFSET, world.rank, step, world.device)
    scores, lengths = [], []
    devices = [world.device] if world.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the global RNG as it was: training continues unchanged
        for start in range(0, per_rank, chunk):
            rows = mine[start:start + chunk]
            completions = rollout(run.policy, [data.prompts[i] for i in rows], rows, config=config, world=world,
                                  stop_ids=stop_ids, generator=generator, num_samples=g)
            scores.append(score_completions(rewards, data, completions, run.tokenizer, image=run.image,
                                            step=step - 1, max_steps=run.total_steps))
            lengths.append(completions.lengths.float())
    keep = torch.tensor(valid).repeat_interleave(g)
    all_rewards = gather_rows(torch.cat(scores), world)[gather_rows(keep, world)]
    all_lengths = gather_rows(torch.cat(lengths), world)[gather_rows(keep, world)]
    combined = rewards_lib.combine(all_rewards, config.reward_weights)
    finite = ~torch.isnan(combined)
    values = combined[finite]
    out = {"eval/reward_mean": float(values.mean()) if values.numel() else math.nan,
           "eval/reward_std": float(values.std()) if values.numel() > 1 else 0.0,
           "eval/pass_rate": float((finite & (torch.nan_to_num(combined) > config.eval_pass_threshold)).float().mean()),
           "eval/mean_length": float(all_lengths.mean()), "eval/prompts": float(n)}
    for j, reward in enumerate(rewards):
        col = all_rewards[:, j][~torch.isnan(all_rewards[:, j])]
        out[f"eval/reward/{reward.name}/mean"] = float(col.mean()) if col.numel() else math.nan
    return out


class Evaluation:
    """A run callback (``run.callbacks``) that evaluates the policy on held-out prompts on its steps.

    Args:
        data: the held-out :class:`~fastrl.train.data.Prompts`.
        rewards: the run's reward functions.
        stop_ids: the ids that end a completion.
        every: evaluate every this many steps (0: at the last step only).
    """

    def __init__(self, data: Prompts, rewards: list[rewards_lib.RewardFunction], *, stop_ids: list[int],
                 every: int):
        self.data, self.rewards, self.stop_ids, self.every = data, rewards, stop_ids, every

    def due(self, run: Run, step: int) -> bool:
        """Whether step ``step`` (1-based) is evaluated: every ``every`` steps and the last step."""
        return (self.every > 0 and step % self.every == 0) or step == run.total_steps

    def on_step_end(self, run: Run, step: int) -> dict[str, Any] | None:
        """The evaluation's metrics on a due step (merged into the step's record), else None."""
        if not self.due(run, step):
            return None
        return evaluate(run, self.data, self.rewards, stop_ids=self.stop_ids, step=step)


def attach_evaluation(run: Run, rewards: list[rewards_lib.RewardFunction], stop_ids: list[int]) -> Evaluation | None:
    """Load ``config.eval_data`` and add an :class:`Evaluation` to ``run.callbacks``; nothing without eval_data.

    Args:
        run: the :class:`~fastrl.train.run.Run` of an online method.
        rewards: the run's reward functions.
        stop_ids: the ids that end a completion.

    Returns:
        The :class:`Evaluation` added, or None.

    Raises:
        DataError: unreadable held-out data, naming ``eval_data`` and the row.
    """
    config = run.config
    if getattr(config, "eval_data", None) is None:
        return None
    data = load_prompts(config, run.tokenizer, run.vocab_size, table=config.eval_data, field="eval_data")
    data.prompts = image_prompts(run.image, config, data.prompts)
    evaluation = Evaluation(data, rewards, stop_ids=stop_ids, every=config.eval_every)
    run.callbacks.append(evaluation)
    return evaluation
