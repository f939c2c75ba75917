"""fastrl.train.online_dpo: sampled pairs scored by the rewards improve the reward; iterative DPO resumes exactly."""

from __future__ import annotations

import pytest
import torch

from fastrl.train import OnlineDPOConfig, train_online_dpo

from .conftest import online_fields, state

pytestmark = pytest.mark.usefixtures("one_thread")


def test_online_dpo_improves_reward(prompts_file, tmp_path):
    fields = online_fields(prompts_file, tmp_path / "run", max_steps=12, num_generations=4, batch_size=8,
                           learning_rate=2e-2, beta=0.1)
    result = train_online_dpo(OnlineDPOConfig(**fields))
    rewards = [h["reward/mean"] for h in result.history]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3, rewards
    last = result.history[-1]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "pairs", "pairs/reward_gap", "time/rollout",
                "time/reward", "time/reference", "time/train", "tokens_per_s"):
        assert key in last, key
    assert 0 < last["pairs"] <= 8


def test_previous_iterate_reference_all_pairs_and_resume(prompts_file, tmp_path):
    # the reference becomes the policy at steps 0, 2, 4, ...: the checkpoint of step 3 needs the
    # reference of step 2, saved beside it
    fields = dict(max_steps=5, num_generations=4, batch_size=4, pairing="all_pairs", min_reward_gap=0.1,
                  reference_update="previous_iterate", reference_update_every=2, save_every=3, lr_scheduler="linear",
                  loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.1])
    straight = train_online_dpo(OnlineDPOConfig(**online_fields(prompts_file, tmp_path / "a", **fields)))
    assert sum(h["pairs"] for h in straight.history) > 0
    assert (tmp_path / "a" / "checkpoints" / "reference-step-00000003.safetensors").is_file()
    middle = tmp_path / "a" / "checkpoints" / "step-00000003"
    resumed = train_online_dpo(OnlineDPOConfig(**online_fields(prompts_file, tmp_path / "b", resume=str(middle),
                                                               **fields)))
    assert resumed.steps == 2
    assert [h["loss"] for h in straight.history[3:]] == [h["loss"] for h in resumed.history]
    for name, value in state(straight.policy).items():
        assert torch.equal(value, state(resumed.policy)[name]), name


@pytest.mark.parametrize("keep", [False, True])
def test_rollout_cache_released_unless_kept(prompts_file, tmp_path, monkeypatch, keep):
    from .test_grpo import _Decoders

    spy = _Decoders(monkeypatch)
    seen = []
    real_step = __import__("fastrl.train.online_dpo", fromlist=["online_dpo_step"]).online_dpo_step

    def online_dpo_step(policy, *args, **kwargs):  # what is kept while the policy trains
        seen.append(policy.model in spy.kept and bool(spy.kept[policy.model].keys))
        return real_step(policy, *args, **kwargs)

    monkeypatch.setattr("fastrl.train.online_dpo.online_dpo_step", online_dpo_step)
    fields = online_fields(prompts_file, tmp_path / "run", max_steps=3, num_generations=4, batch_size=2,
                           max_completion_length=4, rollout_engine="fastrl", rollout_keep_cuda_graph=keep)
    result = train_online_dpo(OnlineDPOConfig(**fields))
    assert len(result.history) == 3 and seen == [keep] * 3
    assert len(spy.built) == (1 if keep else 3)
    assert all(d.keys == [] for d in spy.built) and result.policy.model not in spy.kept
