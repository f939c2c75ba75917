"""fastrl.train.rewards: every call form of a reward (fastrl's on token ids, TRL's on text), unscorable
samples, missing columns, errors that name the reward and the data row, learned reward models scored
in batches."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from fastrl.ops import group_advantages
from fastrl.train.rewards import (MISSING, RewardError, RewardModel, RewardState, check_columns, combine, load_rewards,
                                  score)

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[1, 2], [3], [4, 5, 6]]
COMPLETIONS = [[7, 7, 1], [2], [7]]
COLUMNS = [{"target": 7, "answer": "a"}, {"target": 2, "answer": "b"}, {"target": 9, "answer": "c"}]
TEXTS = ["good good hello", "world", "good"]  # the completions' text, for the TRL-form rewards
PROMPT_TEXTS = ["the question", "a question", "question"]
ROWS = ["train_data (p.jsonl) line 1", "train_data (p.jsonl) line 3", "train_data (p.jsonl) line 4"]


def per_sample(prompt_ids, completion_ids, target, **columns):
    return completion_ids.count(target) / len(completion_ids)


def batched_by_flag(prompt_ids, completion_ids, **columns):
    return [len(c) for c in completion_ids]


batched_by_flag.batched = True


def batched_by_annotation(prompt_ids: list[list[int]], completion_ids: list[list[int]], answer: list[str]):
    return [float(a == "a") for a in answer]


def trl_style(prompts, completions, **kwargs):
    return torch.tensor([1.0, 2.0, 3.0])


async def async_per_sample(prompt_ids, completion_ids, **columns):
    await asyncio.sleep(0)
    return None if len(completion_ids) == 1 else 1.0


async def async_batched(prompts, completions, **columns):  # TRL's form, async
    await asyncio.sleep(0)
    return [float("nan"), 0.5, 0.25]


def _score(rewards, columns=COLUMNS, **kw):
    return score(rewards, PROMPTS, COMPLETIONS, columns, prompts=PROMPT_TEXTS, completions=TEXTS, **kw)


def test_every_call_form():
    rewards = load_rewards([per_sample, batched_by_flag, batched_by_annotation, trl_style, async_per_sample,
                            async_batched])
    assert [r.batched for r in rewards] == [False, True, True, True, False, True]
    assert [r.is_async for r in rewards] == [False, False, False, False, True, True]
    assert [r.form for r in rewards] == ["fastrl"] * 3 + ["trl", "fastrl", "trl"]
    table = _score(rewards)
    expected = [[2 / 3, 3, 1, 1, 1, math.nan], [1, 1, 0, 2, math.nan, 0.5], [0, 1, 0, 3, math.nan, 0.25]]
    torch.testing.assert_close(table, torch.tensor(expected), equal_nan=True)


def test_trl_form_gets_text_columns_and_trainer_state_as_trl_passes_them():
    got = {}

    def count_good(prompts, completions, completion_ids, **kwargs):  # as a TRL user writes it
        got.update(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        kwargs["log_metric"]("good_words", 1.5)
        kwargs["log_extra"]("note", ["x"] * len(completions))
        return [c.count("good") for c in completions]

    def accuracy(completions, answer, **kwargs):  # TRL's own rewards take completions first
        return [float(a in c) for c, a in zip(completions, answer)]

    rewards = load_rewards([count_good, accuracy])
    table = _score(rewards, state=RewardState(global_step=3, max_steps=10))
    assert table[:, 0].tolist() == [2.0, 0.0, 1.0]  # on token ids this counted nothing
    assert table[:, 1].tolist() == [0.0, 0.0, 0.0]
    assert got["prompts"] == PROMPT_TEXTS and got["completions"] == TEXTS and got["completion_ids"] == COMPLETIONS
    assert got["target"] == [7, 2, 9] and got["answer"] == ["a", "b", "c"]  # the data columns, as lists
    assert got["trainer_state"].global_step == 3 and got["trainer_state"].max_steps == 10
    assert rewards[0].logged == {"metrics": {"good_words": [1.5]}, "extra": {"note": ["x"] * 3}}
    # a chat prompt: the completion comes as TRL's assistant message
    chat = [[{"role": "user", "content": "hello"}]] * 3
    score(rewards, PROMPTS, COMPLETIONS, COLUMNS, prompts=chat, completions=TEXTS)
    assert got["prompts"] == chat and got["completions"][0] == [{"role": "assistant", "content": TEXTS[0]}]
    # without prompts= / completions=, the rows' prompt and completion columns
    columns = [{**c, "prompt": p, "completion": t} for c, p, t in zip(COLUMNS, PROMPT_TEXTS, TEXTS)]
    assert score(rewards[:1], PROMPTS, COMPLETIONS, columns)[:, 0].tolist() == [2.0, 0.0, 1.0]
    assert "prompt" not in got and "completion" not in got and got["prompts"] == PROMPT_TEXTS


def test_trl_form_needs_text():
    def trl_reward(prompts, completions, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"reward_funcs\[0\] \(trl_reward\): takes TRL's form .*no tokenizer"):
        load_rewards([trl_reward], text_available=False)
    with pytest.raises(RewardError, match=r"reward_funcs\[0\] \(trl_reward\): takes TRL's form .*not known"):
        score(load_rewards([trl_reward]), PROMPTS, COMPLETIONS, COLUMNS)


def test_a_signature_of_neither_form_is_refused_showing_both():
    for fn in (lambda x: 1.0, lambda p, c: 1.0, lambda *args, **kwargs: 1.0):
        with pytest.raises(RewardError, match=r"reward_funcs\[0\] \(<lambda>\): a reward takes TRL's form "
                                              r"f\(prompts, completions, completion_ids, \*\*kwargs\).* or "
                                              r"fastrl's form f\(prompt_ids, completion_ids, \*\*columns\).*"
                                              r"its signature is \("):
            load_rewards([fn])


def test_missing_columns_are_named_unless_allowed():
    columns = [dict(COLUMNS[0]), {"target": 2}, {"target": 9, "answer": MISSING}]  # row 2 lacks answer, so does 3

    def trl_answer(completions, answer, **kwargs):
        return [float(a is None) for a in answer]

    def anything(prompt_ids, completion_ids, **columns):
        return float(columns["answer"] is None)

    def with_default(prompt_ids, completion_ids, answer="z"):
        return float(answer == "z")

    rows = [{k: v for k, v in c.items() if v is not MISSING} for c in columns]
    for fn in (trl_answer, batched_by_annotation, anything):
        message = (rf"reward_funcs\[0\] \({fn.__name__}\): train_data \(p\.jsonl\) line 3 has no column 'answer', "
                   rf"which this reward asks for \((its signature names it|it takes \*\*kwargs.*)\).*"
                   rf"allow_missing_columns")
        with pytest.raises(RewardError, match=message):
            _score(load_rewards([fn]), columns, row_names=ROWS)
        with pytest.raises(RewardError, match=message):  # the same check before a run's first step
            check_columns(load_rewards([fn]), rows, ["target", "answer"], ROWS)
    check_columns(load_rewards([with_default]), rows, ["target", "answer"], ROWS)  # its default stands in
    check_columns(load_rewards([anything]), rows, ["target", "answer"], ROWS, allow_missing_columns=True)
    assert _score(load_rewards([with_default]), columns).tolist() == [[0.0], [1.0], [1.0]]
    table = _score(load_rewards([trl_answer, anything, with_default]), columns, allow_missing_columns=True)
    assert table.tolist() == [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]  # None, or the default
    # a reward naming a column the data does not have at all
    with pytest.raises(RewardError, match=r"\(needs_solution\): its signature names 'solution', which is no column"):
        def needs_solution(completions, solution, **kwargs):
            return [0.0] * len(completions)
        _score(load_rewards([needs_solution]))


def test_a_reward_that_raises_names_the_completion_and_its_row():
    def per_sample_fails(prompt_ids, completion_ids, **columns):
        return 1.0 / (len(completion_ids) - 1)

    def batched_fails(completions, **kwargs):
        return [1.0 / (len(c.split()) - 1) for c in completions]

    async def async_fails(prompts, completions, **kwargs):
        await asyncio.sleep(0)
        return [1.0 / (len(c.split()) - 1) for c in completions]

    def needs_the_whole_batch(completions, **kwargs):
        if len(completions) < 3:
            return [0.0] * len(completions)
        raise RuntimeError("judge unavailable")

    for fn in (per_sample_fails, batched_fails, async_fails):
        with pytest.raises(RewardError, match=rf"reward_funcs\[0\] \({fn.__name__}\): raised ZeroDivisionError: "
                                              rf".* on completion 1 \(train_data \(p\.jsonl\) line 3\): "):
            _score(load_rewards([fn]), row_names=ROWS)
    with pytest.raises(RewardError, match=r"raised RuntimeError: judge unavailable on a batch of 3 completions "
                                          r"\(data rows train_data \(p\.jsonl\) line 1, .*line 4\)"):
        _score(load_rewards([needs_the_whole_batch]), row_names=ROWS)


def test_async_rewards_run_inside_a_running_event_loop():
    rewards = load_rewards([async_per_sample, async_batched])

    async def main():  # e.g. a notebook: the caller already runs a loop
        return _score(rewards)

    table = asyncio.run(main())
    assert table[0, 0] == 1.0 and math.isnan(table[1, 0]) and table[2, 1] == 0.25


def test_async_calls_run_concurrently():
    started = []

    async def slow(prompt_ids, completion_ids, **columns):
        started.append(len(started))
        await asyncio.sleep(0.2)
        return 1.0

    import time

    t = time.perf_counter()
    score(load_rewards([slow, slow]), PROMPTS * 3, COMPLETIONS * 3, COLUMNS * 3)
    assert time.perf_counter() - t < 1.0  # 18 calls of 0.2 s, all at once
    assert len(started) == 18


def test_weights_and_unscorable_samples():
    table = torch.tensor([[1.0, math.nan], [math.nan, math.nan], [0.0, 2.0]])
    combined = combine(table, [1.0, 0.5])
    assert combined[0] == 1.0 and math.isnan(combined[1]) and combined[2] == 1.0
    # the same weights in group_advantages: NaN samples get 0, both multi-reward modes run
    for mode in ("sum_then_normalize", "normalize_then_sum"):
        adv = group_advantages(table, 3, reward_weights=torch.tensor([1.0, 0.5]), multi_reward=mode)
        assert adv[1] == 0.0 and torch.isfinite(adv).all()


def test_errors_name_the_reward(tmp_path, monkeypatch):
    def wrong_length(prompt_ids: list, completion_ids):
        return [1.0]

    def not_a_number(prompt_ids, completion_ids):
        return "high"

    def infinite(prompt_ids, completion_ids):
        return math.inf

    for fn, message in ((wrong_length, r"reward_funcs\[0\] \(wrong_length\): returned 1 values for 3 completions"),
                        (not_a_number, r"reward_funcs\[0\] \(not_a_number\): returned str 'high' for completion 0"),
                        (infinite, r"reward_funcs\[0\] \(infinite\): returned inf for completion 0")):
        with pytest.raises(RewardError, match=message):
            score(load_rewards([fn]), PROMPTS, COMPLETIONS, COLUMNS)
    with pytest.raises(RewardError, match=r"returned inf for completion 0 \(train_data \(p\.jsonl\) line 1\)"):
        score(load_rewards([infinite]), PROMPTS, COMPLETIONS, COLUMNS, row_names=ROWS)
    with pytest.raises(RewardError, match=r"X\.reward_funcs\[1\] \(missing_module_xyz:f\): no module named"):
        load_rewards([per_sample, "missing_module_xyz:f"], field_name="X.reward_funcs")
    with pytest.raises(RewardError, match=r"reward_funcs\[0\] \(nowhere/r\.py:f\): file 'nowhere/r\.py' does not"):
        load_rewards(["nowhere/r.py:f"])
    # a file path and a module importable from the working directory
    (tmp_path / "my_rewards.py").write_text("def one(prompt_ids, completion_ids, **kw):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    for spec in ("my_rewards.py:one", "my_rewards:one"):
        assert score(load_rewards([spec]), PROMPTS, COMPLETIONS, COLUMNS).tolist() == [[1.0]] * 3


def _tiny_classifier(path):
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    Qwen2ForSequenceClassification(config).save_pretrained(path)
    return path


def test_reward_model_scores_in_batches(tmp_path):
    path = _tiny_classifier(tmp_path / "rm")
    prompts = [[5, 6, 7], [8, 9], [10], [11, 12, 13, 14], [15, 16], [17], [18, 19, 20]]
    completions = [[21, 22], [23], [24, 25, 26, 27], [28], [29, 30, 31], [32, 33], [34]]
    model = RewardModel(str(path), batch_size=3)
    calls = []
    model.model.register_forward_hook(lambda module, args, kwargs_out=None: calls.append(1))
    batched = model(prompts, completions)
    assert len(calls) == 3  # 7 sequences, 3 per forward
    one_by_one = RewardModel(str(path), batch_size=1)
    alone = one_by_one(prompts, completions)
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(alone), rtol=1e-4, atol=1e-5)
    # through load_rewards / score, as the trainers use it
    rewards = load_rewards([], str(path), batch_size=4)
    assert rewards[0].name == "reward_model" and rewards[0].batched
    table = score(rewards, prompts, completions, [{}] * 7)
    torch.testing.assert_close(table[:, 0], torch.tensor(alone), rtol=1e-4, atol=1e-5)


def test_reward_model_errors(tmp_path):
    with pytest.raises(RewardError, match=r"reward_model: 'nowhere' is not a local model directory"):
        RewardModel("nowhere")

    class TwoScores(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return torch.zeros(input_ids.shape[0], 2)

    with pytest.raises(RewardError, match=r"reward_model: expected one score per sequence"):
        RewardModel(TwoScores())(PROMPTS, COMPLETIONS)
