"""Reward functions written for TRL's ``GRPOTrainer``, used by fastrl unchanged.

In a fastrl config::

    reward_funcs: [examples/trl_rewards.py:format_reward, examples/trl_rewards.py:accuracy_reward]

TRL calls every reward as ``f(prompts=..., completions=..., completion_ids=..., **kwargs)``: the
prompts as the dataset holds them, the completions as text (for a chat prompt, the list
``[{"role": "assistant", "content": text}]``), the completions' token ids, and every other dataset
column as a keyword list (here ``solution``), plus ``trainer_state``, ``log_extra`` and
``log_metric``. fastrl calls a function whose signature names ``prompts`` / ``completions`` the same
way (see :mod:`fastrl.train.rewards`). Each returns one float per completion, or None where the
reward does not apply.

The toy task: a prompt such as ``"the question is"`` and a ``solution`` word (``"good"``); a
completion should say ``answer is <solution>``.
"""

import re

ANSWER = re.compile(r"\banswer is (\w+)")


def _text(completion):
    """The text of a completion: plain text, or the content of a chat completion's last message."""
    return completion[-1]["content"] if isinstance(completion, list) else completion


def format_reward(completions, **kwargs):
    """1.0 where the completion states an answer (``answer is <word>``), else 0.0."""
    return [1.0 if ANSWER.search(_text(c)) else 0.0 for c in completions]


def accuracy_reward(completions, solution, **kwargs):
    """1.0 where the stated answer is the row's ``solution``, 0.0 where it is another; None (unscorable)
    where the completion states no answer."""
    rewards = []
    for completion, answer in zip(completions, solution):
        found = ANSWER.search(_text(completion))
        rewards.append(None if found is None else float(found.group(1) == answer))
    return rewards


def solution_mentions(prompts, completions, completion_ids, solution, **kwargs):
    """Partial credit: how often the solution word occurs in the completion's text, per word."""
    rewards = []
    for completion, answer in zip(completions, solution):
        text = _text(completion)
        rewards.append(text.count(answer) / max(len(text.split()), 1))
    return rewards
