"""fastrl.train.rm: a Bradley–Terry reward model learns a separable preference, resumes exactly, names bad
config fields and data rows, and its checkpoint is a reward model the online trainers load."""

from __future__ import annotations

import random

import pytest
import torch

from fastrl.train import ConfigError, DataError, GRPOConfig, RewardModel, RMConfig, train, train_rm
from fastrl.train.model import Policy
from fastrl.train.packing import pad
from fastrl.train.rm import last_token_batch, sequence_scores

from .conftest import TINY, state, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

EOS, PAD = 2, 0
MODEL = {**TINY["qwen2"], "pad_token_id": PAD}


def preference_rows(n: int, seed: int) -> list[dict]:
    """Chosen completions draw their tokens from 8..35, rejected ones from 36..63; both end with <eos>, so the
    score at the last token must read the completion through attention."""
    rng = random.Random(seed)

    def completion(low: int) -> list[int]:
        return [rng.randrange(low, low + 28) for _ in range(rng.randint(2, 5))] + [EOS]

    return [{"prompt": [rng.randrange(8, 64) for _ in range(rng.randint(2, 6))], "chosen": completion(8),
             "rejected": completion(36)} for _ in range(n)]


def rm_config(data, out, **overrides) -> RMConfig:
    fields = dict(model_config=dict(MODEL), train_data=str(data), output_dir=str(out), batch_size=8, max_steps=16,
                  learning_rate=3e-3, lr_scheduler="constant", progress=False, seed=0)
    fields.update(overrides)
    return RMConfig(**fields)


def accuracy(reward_model: RewardModel, rows: list[dict]) -> float:
    prompts = [r["prompt"] for r in rows]
    chosen, rejected = reward_model(prompts, [r["chosen"] for r in rows]), reward_model(prompts,
                                                                                        [r["rejected"] for r in rows])
    return sum(c > r for c, r in zip(chosen, rejected)) / len(rows)


def test_rm_learns_a_separable_preference_and_loads_as_a_reward_model(tmp_path):
    from transformers import AutoModelForSequenceClassification

    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(64, seed=0))
    held_out = preference_rows(64, seed=1)
    torch.manual_seed(0)
    untrained = RewardModel(AutoModelForSequenceClassification.from_config(_config(num_labels=1)))
    result = train_rm(rm_config(data, tmp_path / "run"))
    assert result.checkpoint == tmp_path / "run" / "checkpoints" / "step-00000016"
    history = result.history
    assert {"loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"} <= set(history[-1])
    assert history[-1]["loss"] < history[0]["loss"] - 0.3, [h["loss"] for h in history]
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"] + 0.5
    assert history[-1]["rewards/margins"] == pytest.approx(
        history[-1]["rewards/chosen"] - history[-1]["rewards/rejected"], abs=1e-5)
    # the checkpoint is a reward model: loaded as GRPO / online DPO load `reward_model:`, it orders
    # unseen pairs as the preference does (an untrained classifier: about half)
    loaded = RewardModel(str(result.checkpoint), batch_size=16)
    assert accuracy(loaded, held_out) >= 0.9
    assert 0.25 <= accuracy(untrained, held_out) <= 0.75
    # and it scores as the trainer did: right-padded batches at the last token (not the pad id)
    rows = held_out[:6]
    prompts = [r["prompt"] for r in rows]
    trained = Policy(result.policy.model.eval())
    with torch.no_grad():
        ours = sequence_scores(trained, last_token_batch(prompts, [r["chosen"] for r in rows], layout=pad))
        packed = sequence_scores(trained, last_token_batch(prompts, [r["chosen"] for r in rows]))
    torch.testing.assert_close(torch.tensor(loaded(prompts, [r["chosen"] for r in rows])), ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, ours, atol=1e-4, rtol=1e-4)
    # a GRPO config accepts it as its reward model
    prompts_file = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in rows])
    assert GRPOConfig(model_config=dict(TINY["qwen2"]), train_data=str(prompts_file),
                      reward_model=str(result.checkpoint)).reward_model == str(result.checkpoint)


def _config(**changes):
    from transformers import AutoConfig

    fields = {**MODEL, **changes}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def test_rm_resume_matches_an_uninterrupted_run(tmp_path):
    # 16 pairs per step over 40 pairs: the run crosses an epoch (a reshuffle); warm-up then decay, and
    # a margin column and reward centring in the loss
    rows = [{**r, "margin": (i % 3) * 0.5} for i, r in enumerate(preference_rows(40, seed=2))]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    common = dict(max_steps=6, batch_size=4, gradient_accumulation_steps=4, lr_scheduler="linear", warmup_steps=2,
                  weight_decay=0.01, margin_column="margin", center_rewards_coefficient=0.01)
    straight = train_rm(rm_config(data, tmp_path / "straight", save_every=3, **common))
    middle = tmp_path / "straight" / "checkpoints" / "step-00000003"
    resumed = train(rm_config(data, tmp_path / "resumed", resume=str(middle), **common))
    assert resumed.steps == 3
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[3:]]
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in straight.history[3:]]
    a, b = state(straight.policy), state(resumed.policy)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the margin and the centring are in the loss: without them the same run logs another loss
    plain = train_rm(rm_config(data, tmp_path / "plain", **{**common, "margin_column": None,
                                                             "center_rewards_coefficient": None}))
    assert plain.history[0]["loss"] < straight.history[0]["loss"]


def test_rm_from_a_causal_lm_directory(tmp_path):
    """A `model` directory of a causal LM (an SFT checkpoint) gives the body; the score head is new."""
    from transformers import AutoModelForCausalLM

    lm_dir = tmp_path / "lm"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config()).save_pretrained(lm_dir)
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(16, seed=3))
    result = train_rm(rm_config(data, tmp_path / "run", model=str(lm_dir), model_config=None, max_steps=1))
    assert type(result.policy.model).__name__ == "Qwen2ForSequenceClassification"
    assert result.policy.model.score.weight.shape == (1, MODEL["hidden_size"])


@pytest.mark.parametrize("fields, message", [
    ({"center_rewards_coefficient": -0.1}, r"RMConfig\.center_rewards_coefficient: must be >= 0"),
    ({"center_rewards_coefficient": "x"}, r"RMConfig\.center_rewards_coefficient: must be a number"),
    ({"chosen_column": ""}, r"RMConfig\.chosen_column: must be a column name"),
    ({"margin_column": 3}, r"RMConfig\.margin_column: must be a column name"),
    ({"batch_size": 0}, r"RMConfig\.batch_size: must be >= 1"),
    ({"model_config": None}, r"RMConfig\.model: give exactly one of model"),
])
def test_bad_rm_fields_are_named(tmp_path, fields, message):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(4, seed=0))
    with pytest.raises(ConfigError, match=message):
        rm_config(data, tmp_path / "run", **fields)


def test_bad_rm_rows_are_named(tmp_path):
    rows = preference_rows(8, seed=0)
    bad = write_jsonl(tmp_path / "bad.jsonl", rows[:5] + [{**rows[5], "rejected": []}] + rows[6:])
    with pytest.raises(DataError, match=r"bad\.jsonl\) line 6, column 'rejected': the completion is empty"):
        train_rm(rm_config(bad, tmp_path / "a"))
    margins = write_jsonl(tmp_path / "margins.jsonl", [{**r, "margin": 1.0} for r in rows[:2]]
                          + [{**rows[2], "margin": None}])
    with pytest.raises(DataError, match=r"margins\.jsonl\) line 3, column 'margin': the margin must be a finite "
                                        r"number, got None"):
        train_rm(rm_config(margins, tmp_path / "b", margin_column="margin"))
    with pytest.raises(DataError, match=r"column 'score' is missing"):
        train_rm(rm_config(margins, tmp_path / "c", margin_column="score"))
    with pytest.raises(ConfigError, match=r"RMConfig\.batch_size: train_data has 8 pairs"):
        train_rm(rm_config(write_jsonl(tmp_path / "few.jsonl", rows), tmp_path / "d", batch_size=16))
