"""DAPO's dynamic sampling (``filter_groups``): train only on groups whose completions scored differently.

A group whose G completions all got the same score has zero advantage under every group-relative
estimator, so it contributes no gradient and only dilutes the step's normaliser. Dynamic sampling
drops such groups and samples more prompts until the step has its ``needed_groups`` groups, at
most ``max_tries`` rollouts per step (the first on the step's own prompts, the others on prompts
drawn by :func:`refill_indices`, a function of (seed, step, attempt)). A step still short after
``max_tries`` trains on what it has (:attr:`FilterStats.short_groups` says how many are missing).

- :func:`group_values` turns the ``[N, R]`` rewards into the one value per completion the filter
  compares (the combined reward, a pass / fail, or one reward's column);
- :func:`keep_groups` says which groups have two different finite values (exact equality: two
  values that differ by rounding noise count as different);
- :func:`fill_batch` runs the attempts and assembles the step's batch with :func:`select_groups`
  and :func:`concat_completions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from fastrl.train import rewards as rewards_lib
from fastrl.train.online import Completions

__all__ = ["FILTER_GROUPS", "FilterStats", "concat_completions", "fill_batch", "group_values", "keep_groups",
           "refill_indices", "select_groups"]

FILTER_GROUPS = {"metric": "reward", "max_tries": 4}  # the config's ``filter_groups`` keys and defaults


def group_values(rewards: torch.Tensor, group_size: int, *, metric: str, weights: Sequence[float] | None,
                 names: Sequence[str], pass_threshold: float = 0.0) -> torch.Tensor:
    """The value of each completion that dynamic sampling compares within its group.

    Args:
        rewards: ``[N, R]`` fp32, each reward of each completion (NaN = unscorable).
        group_size: G, completions per prompt (N must be a multiple of it).
        metric: ``"reward"`` (the combined reward, :func:`fastrl.train.rewards.combine`),
            ``"accuracy"`` (1.0 where the combined reward is above ``pass_threshold``, else 0.0, as
            ``eval/pass_rate`` counts a pass), or the name of one reward in ``names`` (its column).
        weights: the R reward weights, or None (all 1).
        names: the R rewards' names.
        pass_threshold: the pass threshold of ``"accuracy"`` (the config's ``eval_pass_threshold``).

    Returns:
        ``[N]`` fp32; NaN where the completion is unscorable under the metric.

    Raises:
        ValueError: an unknown metric (naming ``filter_groups.metric`` and the valid names), or N not
            a multiple of ``group_size``.
    """
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"filter_groups: {rewards.shape[0]} completions are not groups of {group_size}")
    if metric in ("reward", "accuracy"):
        combined = rewards_lib.combine(rewards.float(), weights)
        if metric == "reward":
            return combined
        passed = (combined > pass_threshold).float()
        return torch.where(torch.isnan(combined), combined, passed)
    if metric in names:
        return rewards[:, list(names).index(metric)].float().clone()
    valid = ", ".join(["reward", "accuracy", *names])
    raise ValueError(f"filter_groups.metric: {metric!r} is not one of {valid}")


def keep_groups(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which groups dynamic sampling keeps: those whose finite values are not all equal.

    Equality is exact (``==`` on the floats). NaN values (unscorable) are ignored; a group with fewer
    than two finite values is dropped.

    Args:
        values: ``[N]`` floating, one value per completion (:func:`group_values`).
        group_size: G, completions per prompt.

    Returns:
        ``[P]`` bool, P = N / G.
    """
    groups = values.reshape(-1, group_size)
    finite = ~torch.isnan(groups)
    high = torch.where(finite, groups, torch.full_like(groups, -math.inf)).amax(1)
    low = torch.where(finite, groups, torch.full_like(groups, math.inf)).amin(1)
    return (finite.sum(1) >= 2) & (high != low)


def refill_indices(seed: int, step: int, attempt: int, count: int, num_examples: int) -> list[int]:
    """The prompts of a refill attempt: ``count`` data rows drawn by a generator seeded from (seed, step, attempt).

    Distinct rows when ``count <= num_examples``, else drawn with replacement. A resumed run draws the
    same rows.

    Args:
        seed: the run's seed.
        step: the step (0-based).
        attempt: the attempt (1, 2, ...; 0 is the step's own prompts).
        count: how many rows.
        num_examples: the number of data rows; rows are in ``[0, num_examples)``.

    Returns:
        ``count`` ints.

    Raises:
        ValueError: ``num_examples < 1`` or ``count < 0``.
    """
    if num_examples < 1 or count < 0:
        raise ValueError(f"filter_groups: cannot draw {count} prompts from {num_examples} data rows")
    mixed = (seed * 1_000_003 + step * 104_729 + attempt * 15_485_863 + 98_765) % (2**63 - 1)
    generator = torch.Generator().manual_seed(mixed)
    if count <= num_examples:
        return torch.randperm(num_examples, generator=generator)[:count].tolist()
    return torch.randint(0, num_examples, (count,), generator=generator).tolist()


@dataclass
class FilterStats:
    """What dynamic sampling did in one step.

    Args:
        tries: rollouts run (1 .. max_tries).
        generated_groups: groups sampled over every attempt.
        dropped_groups: groups :func:`keep_groups` rejected (all equal, or fewer than two scorable).
        kept_groups: groups in the step's batch (at most ``needed_groups``; keepable groups beyond it
            are neither kept nor dropped).
        short_groups: ``needed_groups - kept_groups`` (0 unless max_tries ran out).
        generated_tokens: completion tokens sampled over every attempt.
        extra_generated_tokens: those of the attempts after the first.
    """

    tries: int = 0
    generated_groups: int = 0
    dropped_groups: int = 0
    kept_groups: int = 0
    short_groups: int = 0
    generated_tokens: int = 0
    extra_generated_tokens: int = 0

    def metrics(self) -> dict[str, float]:
        """The step record's floats: ``filter/tries``, ``filter/dropped_groups``, ``filter/kept_groups``,
        ``filter/short_groups``, ``filter/generated_groups``, ``filter/extra_generated_tokens``."""
        return {"filter/tries": float(self.tries), "filter/dropped_groups": float(self.dropped_groups),
                "filter/kept_groups": float(self.kept_groups), "filter/short_groups": float(self.short_groups),
                "filter/generated_groups": float(self.generated_groups),
                "filter/extra_generated_tokens": float(self.extra_generated_tokens)}


def select_groups(completions: Completions, rewards: torch.Tensor,
                  groups: Sequence[int]) -> tuple[Completions, torch.Tensor]:
    """The completions and rewards of some groups, in the order given.

    Args:
        completions: :class:`~fastrl.train.online.Completions` (prompt-major groups of G).
        rewards: ``[N, R]``, its rewards.
        groups: group (prompt) indices in ``[0, N / G)``.

    Returns:
        ``(Completions, [len(groups) G, R] rewards)``, every field selected (``cond_logps`` stays None
        when None).
    """
    g = completions.group_size
    rows = [p * g + j for p in groups for j in range(g)]
    index = torch.tensor(rows, dtype=torch.long)
    cond = completions.cond_logps
    picked = Completions(prompts=[completions.prompts[i] for i in rows],
                         completions=[completions.completions[i] for i in rows],
                         sampler_logps=[completions.sampler_logps[i] for i in rows],
                         stopped=completions.stopped[index], rows=[completions.rows[i] for i in rows], group_size=g,
                         engine=completions.engine, cond_logps=None if cond is None else [cond[i] for i in rows])
    return picked, rewards[index]


def concat_completions(parts: Sequence[Completions]) -> Completions:
    """Several :class:`~fastrl.train.online.Completions` one after the other.

    Args:
        parts: at least one; the same ``group_size``, and either all or none with ``cond_logps``.

    Returns:
        The rows of ``parts[0]``, then ``parts[1]``, ...; the engine of the first part.

    Raises:
        ValueError: no part, different group sizes, or ``cond_logps`` on some parts only.
    """
    if not parts:
        raise ValueError("concat_completions: no parts")
    g = parts[0].group_size
    if any(p.group_size != g for p in parts):
        raise ValueError(f"concat_completions: group sizes differ: {[p.group_size for p in parts]}")
    with_cond = [p.cond_logps is not None for p in parts]
    if any(with_cond) and not all(with_cond):
        raise ValueError("concat_completions: cond_logps on some parts only")
    return Completions(prompts=[x for p in parts for x in p.prompts],
                       completions=[x for p in parts for x in p.completions],
                       sampler_logps=[x for p in parts for x in p.sampler_logps],
                       stopped=torch.cat([p.stopped.reshape(-1) for p in parts]),
                       rows=[x for p in parts for x in p.rows], group_size=g, engine=parts[0].engine,
                       cond_logps=[x for p in parts for x in p.cond_logps] if all(with_cond) else None)


def fill_batch(sample: Callable[[int, list[int]], tuple[Completions, torch.Tensor, Any]], first_indices: list[int],
               *, needed_groups: int, max_tries: int, seed: int, step: int, num_examples: int,
               keep: Callable[[torch.Tensor], torch.Tensor]
               ) -> tuple[Completions, torch.Tensor, list[Any], FilterStats]:
    """Sample until the step has ``needed_groups`` groups that :func:`keep_groups` keeps, or ``max_tries`` attempts.

    Attempt 0 samples ``first_indices``; attempt a > 0 samples ``refill_indices(seed, step, a,
    len(first_indices), num_examples)``. Kept groups are taken in order (attempt 0's first, each
    attempt's in its own order) and the batch is cut at ``needed_groups``.

    Args:
        sample: ``sample(attempt, indices) -> (Completions, [N, R] rewards, extra)``: rolls out and
            scores the prompts ``indices`` (G completions each); ``extra`` is passed back as is.
        first_indices: the step's own prompts.
        needed_groups: the groups the step wants.
        max_tries: attempts at most (>= 1).
        seed: the run's seed.
        step: the step (0-based).
        num_examples: the number of data rows (refills draw from them).
        keep: ``keep(rewards [N, R]) -> [P]`` bool, the groups to keep.

    Returns:
        ``(completions, rewards, extras, stats)``: the kept groups (possibly none: 0 rows), their
        ``[n, R]`` rewards, each attempt's ``extra`` in order, and the :class:`FilterStats`.

    Raises:
        ValueError: ``max_tries < 1`` (naming ``filter_groups.max_tries``).
    """
    if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
        raise ValueError(f"filter_groups.max_tries: must be an int >= 1, got {max_tries!r}")
    stats = FilterStats()
    parts: list[Completions] = []
    scores: list[torch.Tensor] = []
    extras: list[Any] = []
    kept = 0
    while stats.tries < max_tries and (stats.tries == 0 or kept < needed_groups):
        attempt = stats.tries
        indices = list(first_indices) if attempt == 0 else \
            refill_indices(seed, step, attempt, len(first_indices), num_examples)
        completions, rewards, extra = sample(attempt, indices)
        extras.append(extra)
        stats.tries += 1
        tokens = int(sum(len(c) for c in completions.completions))
        stats.generated_tokens += tokens
        if attempt > 0:
            stats.extra_generated_tokens += tokens
        mask = keep(rewards).reshape(-1).bool().tolist()
        stats.generated_groups += len(mask)
        stats.dropped_groups += mask.count(False)
        chosen = [p for p, ok in enumerate(mask) if ok][:max(0, needed_groups - kept)]
        kept += len(chosen)
        if chosen or not parts:  # the first part stays (maybe empty): the batch's group size and engine
            part, part_rewards = select_groups(completions, rewards, chosen)
            parts.append(part)
            scores.append(part_rewards)
    stats.kept_groups = kept
    stats.short_groups = max(0, needed_groups - kept)
    return concat_completions(parts), torch.cat(scores), extras, stats
