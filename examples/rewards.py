"""Toy verifiable rewards for the example configs (token-id tasks on tiny random models).

Referenced from a config as ``reward_funcs: [examples/rewards.py:count_token]`` (a file path,
relative to the working directory) or imported from Python. They take fastrl's form
``f(prompt_ids, completion_ids, **columns)``, on token ids; rewards written for TRL (on text) work
too, unchanged: see ``examples/trl_rewards.py``.
"""

from __future__ import annotations


def count_token(prompt_ids, completion_ids, target=7, **columns):
    """The fraction of completion tokens equal to ``target`` (a data column, default 7): 0 for a
    completion without it, 1 for one made only of it."""
    if not completion_ids:
        return None  # nothing to score
    return sum(t == target for t in completion_ids) / len(completion_ids)


def contains_pattern(prompt_ids, completion_ids, pattern=(1, 2, 3), **columns):
    """1.0 when the completion contains ``pattern`` as a contiguous run, else 0.0."""
    pattern, n = list(pattern), len(pattern)
    return float(any(completion_ids[i:i + n] == pattern for i in range(len(completion_ids) - n + 1)))


def shorter_is_better(prompt_ids, completion_ids, **columns):
    """Batched: 1 / length of each completion."""
    return [1.0 / max(len(c), 1) for c in completion_ids]


shorter_is_better.batched = True
