"""TRL reward functions used unchanged: examples/trl_rewards.py (written as for trl.GRPOTrainer) trains a
tiny GRPO run through ``reward_funcs: [examples/trl_rewards.py:...]``, the rewards reading text (and chat
messages for chat prompts) and the dataset's columns as TRL passes them; missing columns and rewards
that raise are named with the data row's file line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastrl.train import ConfigError, GRPOConfig, RewardError, load_config, train

from .conftest import TINY, make_tokenizer, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "trl_rewards.py"
PROMPTS = ["the question is", "a question is", "the answer is", "hello world"]


def _model() -> dict:
    return {**TINY["qwen2"], "vocab_size": 16, "num_hidden_layers": 1}  # the word-level tokenizer's 15 words


def _fields(tmp_path: Path, rows: list[dict], out: str = "run", **overrides) -> dict:
    tokenizer = make_tokenizer(tmp_path / "tok")
    fields = dict(model_config=_model(), tokenizer=str(tokenizer), train_data=str(write_jsonl(tmp_path / "p.jsonl",
                                                                                          rows)),
                  output_dir=str(tmp_path / out), batch_size=2, num_generations=4, max_completion_length=6,
                  max_steps=2, learning_rate=1e-2, lr_scheduler="constant", progress=False, seed=0, log_completions=8,
                  chat_template=False, reward_funcs=[f"{EXAMPLE}:solution_mentions"])
    fields.update(overrides)
    return fields


class Recorder:
    """A TRL-style reward that keeps what each call got."""

    def __init__(self):
        self.calls = []
        self.__name__ = "recorder"

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.calls.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids,
                           **kwargs})
        kwargs["log_metric"]("recorded", float(len(completions)))  # TRL's log_metric: a metric of the step
        return [0.0] * len(completions)


def test_trl_reward_file_trains_unchanged_on_text(tmp_path):
    rows = [{"prompt": p, "solution": "good"} for p in PROMPTS]
    import yaml

    fields = _fields(tmp_path, rows, reward_funcs=[f"{EXAMPLE}:{name}" for name in
                                                   ("format_reward", "accuracy_reward", "solution_mentions")])
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(fields))  # reward_funcs: [.../examples/trl_rewards.py:...]
    config = load_config("grpo", tmp_path / "grpo.yaml")
    recorder = Recorder()
    result = train(config, reward_funcs=[*config.reward_funcs, recorder])
    assert len(result.history) == 2
    # the rewards got text: prompts as the data holds them, completions decoded, the columns as lists
    call = recorder.calls[0]
    assert len(recorder.calls) == 2 and len(call["completions"]) == 8
    assert all(isinstance(c, str) for c in call["completions"]) and set(call["prompts"]) <= set(PROMPTS)
    assert all(isinstance(ids, list) and all(isinstance(t, int) for t in ids) for ids in call["completion_ids"])
    assert call["solution"] == ["good"] * 8 and not {"prompt", "completion", "finish_reason"} & set(call)
    assert [c["trainer_state"].global_step for c in recorder.calls] == [0, 1]
    assert call["trainer_state"].max_steps == 2 and callable(call["log_metric"]) and callable(call["log_extra"])
    words = {"<|user|>", "<|assistant|>", "<|end|>", "hello", "world", "good", "bad", "answer", "the", "is", "a",
             "question"}  # the tokenizer's, special tokens skipped
    assert all(set(c.split()) <= words for c in call["completions"]) and any(call["completions"])
    # counting a substring of the text scores (on token ids, as fastrl passed them before, it counted 0)
    assert any(c.count("good") for call in recorder.calls for c in call["completions"])
    assert sum(r["reward/solution_mentions/mean"] for r in result.history) > 0
    assert [r["recorded"] for r in result.history] == [8.0, 8.0]
    samples = [json.loads(line) for line in (Path(fields["output_dir"]) / "completions.jsonl").read_text().splitlines()]
    for sample in samples:  # its value is the count of "good" per word of the completion's text
        text = " ".join(w for w in sample["completion_text"].split() if w not in ("<pad>", "<eos>", "<bos>"))
        assert sample["rewards"][2] == pytest.approx(text.count("good") / max(len(text.split()), 1))
        assert sample["rewards"][0] == float("answer is" in text)


def test_chat_prompts_give_trl_message_completions(tmp_path):
    chat = [[{"role": "user", "content": p}] for p in PROMPTS]
    recorder = Recorder()
    train(GRPOConfig(**_fields(tmp_path, [{"prompt": c, "solution": "good"} for c in chat], chat_template=True,
                               max_steps=1, reward_funcs=[f"{EXAMPLE}:accuracy_reward", recorder])))
    call = recorder.calls[0]
    assert all(p in chat for p in call["prompts"])
    assert all(isinstance(c, list) and len(c) == 1 and c[0]["role"] == "assistant" and isinstance(c[0]["content"], str)
               for c in call["completions"])


def test_missing_columns_and_raising_rewards_name_the_line(tmp_path):
    rows = [{"prompt": p, "solution": "good"} for p in PROMPTS]
    rows[2] = {"prompt": PROMPTS[2]}  # line 3 has no solution
    with pytest.raises(RewardError, match=r"reward_funcs\[0\] \(.*trl_rewards\.py:solution_mentions\): train_data "
                                          r"\(.*p\.jsonl\) line 3 has no column 'solution', which this reward asks "
                                          r"for \(its signature names it\).*allow_missing_columns"):
        train(GRPOConfig(**_fields(tmp_path, rows, batch_size=4, max_steps=1, out="missing")))
    recorder = Recorder()
    train(GRPOConfig(**_fields(tmp_path, rows, batch_size=4, max_steps=1, out="allowed", allow_missing_columns=True,
                               reward_funcs=[recorder])))
    solution = recorder.calls[0]["solution"]
    assert len(solution) == 16 and solution.count(None) == 4 and solution.count("good") == 12

    def strict(completions, solution, **kwargs):
        return [1.0 / len(s) for s in solution]  # None has no len()

    with pytest.raises(RewardError, match=r"reward_funcs\[0\] \(strict\): raised TypeError: .* on completion \d+ "
                                          r"\(train_data \(.*p\.jsonl\) line 3\): "):
        train(GRPOConfig(**_fields(tmp_path, rows, batch_size=4, max_steps=1, out="raises",
                                   allow_missing_columns=True, reward_funcs=[strict])))


def test_trl_form_needs_a_tokenizer_and_other_forms_are_refused(tmp_path):
    fields = _fields(tmp_path, [{"prompt": [5, 6, 7], "solution": "good"}] * 4, tokenizer=None, out="ids")
    with pytest.raises(ConfigError, match=r"GRPOConfig\.reward_funcs\[0\] \(.*solution_mentions\): takes TRL's form "
                                          r".*no tokenizer"):
        train(GRPOConfig(**fields))
    with pytest.raises(ConfigError, match=r"GRPOConfig\.reward_funcs\[0\] \(<lambda>\): a reward takes TRL's form "
                                          r".*or fastrl's form .*its signature is \(p, c\)"):
        train(GRPOConfig(**{**fields, "reward_funcs": [lambda p, c: 1.0]}))


def test_called_as_trl_calls_it():
    """The same reward, called by TRL 1.16's GRPOTrainer._calculate_rewards and by fastrl, gets the same arguments."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    from types import SimpleNamespace

    from fastrl.train.rewards import load_rewards, score

    rows = [{"prompt": "the question is", "solution": "good", "level": 1},
            {"prompt": [{"role": "user", "content": "hello"}], "solution": "bad", "level": 2}]
    for row in rows:
        inputs = [row] * 3  # G = 3 completions of the prompt, as TRL repeats the row
        texts = ["answer is good", "good good", ""]
        completions = [[{"role": "assistant", "content": t}] for t in texts] if isinstance(row["prompt"], list) \
            else texts
        ids = [[10, 7, 8], [8, 8], []]
        got = {}

        def reward(prompts, completions, completion_ids, **kwargs):
            got[len(got)] = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids,
                             **kwargs}
            return [float(len(c)) for c in completion_ids]

        trainer = SimpleNamespace(
            accelerator=SimpleNamespace(device="cpu", is_main_process=True), args=SimpleNamespace(report_to=[]),
            state=SimpleNamespace(global_step=4, max_steps=9), reward_funcs=[reward], reward_processing_classes=[None],
            reward_func_names=["reward"], environments=None, _log_completion_extra=lambda *a: None,
            _log_metric=lambda *a: None)
        trl_table = trl_grpo.GRPOTrainer._calculate_rewards(trainer, inputs, [row["prompt"]] * 3, completions, ids)
        columns = [{k: v for k, v in row.items()} for _ in range(3)]
        columns = [{**c, "completion": t, "finish_reason": "stop"} for c, t in zip(columns, texts)]  # as a run's
        ours = score(load_rewards([reward]), [[1, 2]] * 3, ids, columns, prompts=[row["prompt"]] * 3, completions=texts)
        assert trl_table[:, 0].tolist() == ours[:, 0].tolist() == [3.0, 2.0, 0.0]
        trl_call, our_call = got[0], got[1]
        assert set(our_call) == set(trl_call)
        for key in set(trl_call) - {"trainer_state", "log_extra", "log_metric"}:
            assert our_call[key] == trl_call[key], key
        assert callable(our_call["log_extra"]) and callable(our_call["log_metric"])
