"""fastrl.train.grpo: GRPO learns a toy verifiable task; accumulation, resume and normalisation are exact."""

from __future__ import annotations

import json

import pytest
import torch

from fastrl.train import ConfigError, GRPOConfig, RewardError, train, train_grpo
from fastrl.train.grpo import loss_scales

from .conftest import emits_target, online_fields, state

pytestmark = pytest.mark.usefixtures("one_thread")


def test_grpo_raises_mean_reward(prompts_file, tmp_path):
    result = train_grpo(GRPOConfig(**online_fields(prompts_file, tmp_path / "run", max_steps=14)))
    rewards = [h["reward/mean"] for h in result.history]
    assert len(rewards) == 14
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.4, rewards
    last = result.history[-1]
    for key in ("time/rollout", "time/reward", "time/train", "tokens_per_s", "reward/std", "reward/emits_target/mean",
                "clip_ratio/region_mean", "completions/mean_length", "grad_norm", "loss", "packing_efficiency"):
        assert key in last, key
    assert "time/reference" in last and "kl" not in last  # beta = 0: no reference model
    samples = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert len(samples) == 14 and {"prompt", "completion", "rewards", "advantage"} <= set(samples[0])
    assert (tmp_path / "run" / "checkpoints" / "step-00000014" / "model.safetensors").is_file()


@pytest.mark.parametrize("options", [
    {"loss_type": "dapo"},
    {"loss_type": "grpo", "beta": 0.04, "num_iterations": 2},
    {"loss_type": "bnpo", "mask_truncated_completions": True, "stop_token_ids": [5, 9, 11, 13]},
    {"loss_type": "dr_grpo", "old_logps": "sampler", "num_iterations": 2},
])
def test_gradient_accumulation_matches_one_micro_batch(prompts_file, tmp_path, options):
    """4 prompts in 1 micro-batch and in 2 micro-batches of 2: the same rollouts, the same update."""
    common = dict(max_steps=2, shuffle=False, learning_rate=1e-3, **options)  # Adam scales noise by lr
    one = train_grpo(GRPOConfig(**online_fields(prompts_file, tmp_path / "a", batch_size=4, **common)))
    two = train_grpo(GRPOConfig(**online_fields(prompts_file, tmp_path / "b", batch_size=2,
                                                gradient_accumulation_steps=2, **common)))
    for a, b in zip(one.history, two.history):
        assert a["reward/mean"] == b["reward/mean"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["train_tokens"] == b["train_tokens"]
    if options.get("beta"):
        assert one.history[-1]["kl"] > 0
    if options.get("mask_truncated_completions"):
        assert one.history[0]["train_tokens"] < one.history[0]["completions/mean_length"] * 32
    for name, value in state(one.policy).items():
        torch.testing.assert_close(value, state(two.policy)[name], rtol=1e-4, atol=2e-5, msg=name)


def test_resume_continues_bit_exactly(prompts_file, tmp_path):
    # linear decay: the schedule's state matters; beta > 0: the reference (the initial model) too;
    # 4 prompts per step over 32: the data order's position; per-step sampling seeds: the rollouts
    fields = dict(max_steps=4, beta=0.04, lr_scheduler="linear", save_every=2)
    straight = train_grpo(GRPOConfig(**online_fields(prompts_file, tmp_path / "a", **fields)))
    middle = tmp_path / "a" / "checkpoints" / "step-00000002"
    resumed = train_grpo(GRPOConfig(**online_fields(prompts_file, tmp_path / "b", resume=str(middle), **fields)))
    assert resumed.steps == 2
    for key in ("reward/mean", "loss", "kl", "lr"):
        assert [h[key] for h in straight.history[2:]] == [h[key] for h in resumed.history], key
    for name, value in state(straight.policy).items():
        assert torch.equal(value, state(resumed.policy)[name]), name


def test_loss_scales_make_the_step_one_batch():
    # two micro-batches: (tokens, kept sequences, all sequences)
    micro = [(30, 3, 4), (10, 1, 4)]
    totals = (40.0, 4.0, 8.0)
    assert loss_scales("dapo", micro, totals, 1) == ([1.0, 1.0], 40.0)
    assert loss_scales("dapo", micro, (80.0, 8.0, 16.0), 2) == ([1.0, 1.0], 40.0)  # FSDP averages: N / world
    assert loss_scales("bnpo", micro, totals, 1)[0] == [0.75, 0.25]
    assert loss_scales("grpo", micro, totals, 1)[0] == [3 / 8, 1 / 8]  # masked sequences count (TRL)
    assert loss_scales("seq-mean-token-mean", micro, totals, 1)[0] == [0.75, 0.25]
    assert loss_scales("token-sum", micro, totals, 2)[0] == [2.0, 2.0]


def test_python_rewards_weights_and_errors(prompts_file, tmp_path):
    async def shorter(prompt_ids, completion_ids):  # async, no **kwargs: gets only what it names
        return None if completion_ids[0] == 3 else -len(completion_ids) / 8

    def batched(prompt_ids: list, completion_ids, target):
        return [float(target[0] == 7)] * len(completion_ids)

    config = GRPOConfig(**online_fields(prompts_file, tmp_path / "a", max_steps=1, reward_weights=[1.0, 0.5, 2.0],
                                        reward_funcs=[emits_target] * 3, advantage_estimator="rloo",
                                        multi_reward="normalize_then_sum"))
    with pytest.raises(ConfigError, match=r"GRPOConfig\.reward_weights: needs one weight per reward \(1\)"):
        train_grpo(config, reward_funcs=[emits_target])
    result = train(config, reward_funcs=[emits_target, shorter, batched])
    last = result.history[-1]
    assert {"reward/emits_target/mean", "reward/shorter/mean", "reward/batched/mean"} <= set(last)
    assert last["reward/batched/mean"] == 1.0

    def wrong_length(prompt_ids: list, completion_ids):
        return [0.0]

    with pytest.raises(RewardError, match=r"reward_funcs\[0\] \(wrong_length\): returned 1 values for 32"):
        train_grpo(GRPOConfig(**online_fields(prompts_file, tmp_path / "b", max_steps=1)), reward_funcs=[wrong_length])
    with pytest.raises(ConfigError, match=r"GRPOConfig\.reward_funcs\[0\] \(no_such_module:f\): no module named"):
        train_grpo(GRPOConfig(**online_fields(prompts_file, tmp_path / "c", reward_funcs=["no_such_module:f"])))
    with pytest.raises(ConfigError, match=r"GRPOConfig\.reward_funcs\[0\] .*has no attribute 'nope'"):
        train_grpo(GRPOConfig(**online_fields(prompts_file, tmp_path / "c", reward_funcs=["examples/rewards.py:nope"])))
    with pytest.raises(ConfigError, match=r"GRPOConfig\.max_completion_length: .* exceeds the model's"):
        train_grpo(GRPOConfig(**online_fields(prompts_file, tmp_path / "c", max_completion_length=126)))


def test_reward_model_module_and_remax(prompts_file, tmp_path):
    class Scorer(torch.nn.Module):  # any module returning one score per row
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, input_ids, attention_mask):
            self.calls += 1
            return ((input_ids == 7) * attention_mask).sum(1).float()

    scorer = Scorer()
    result = train_grpo(GRPOConfig(**online_fields(prompts_file, tmp_path / "a", max_steps=1, reward_funcs=[],
                                                   reward_model=scorer, reward_batch_size=10,
                                                   advantage_estimator="remax")))
    assert "reward/reward_model/mean" in result.history[0]
    assert scorer.calls == 4 + 1  # 32 completions in forwards of 10, then the 4 greedy ones


def test_two_gloo_processes(prompts_file, tmp_path):
    """FSDP2 on 2 CPU processes: the rollout gathers the sharded weights, rewards and token counts
    cover both processes, and a reference model (beta > 0) with μ = 2 runs sharded too."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from .conftest import TINY

    repo = Path(__file__).resolve().parents[2]
    config = {"model_config": TINY["qwen2"], "train_data": str(prompts_file), "output_dir": str(tmp_path / "two"),
              "batch_size": 2, "num_generations": 4, "max_completion_length": 6, "max_steps": 2, "beta": 0.04,
              "num_iterations": 2, "reward_funcs": ["tests/train/conftest.py:emits_target"], "progress": False}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "fastrl", "train", "grpo", "--config", str(tmp_path / "two.yaml")],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    assert all(r["kl"] >= 0 and "reward/mean" in r for r in records)
    assert records[0]["completions/mean_length"] > 0
    assert (tmp_path / "two" / "checkpoints" / "step-00000002" / "model.safetensors").is_file()


class _Decoders:
    """Every lean decoder a run builds, and what ``generate`` keeps between calls."""

    def __init__(self, monkeypatch):
        import importlib

        from fastrl.rollout import decoders

        self.built = []
        self.kept = importlib.import_module("fastrl.rollout.decoders").kept_decoders()
        built, real = self.built, decoders.LeanDecoder

        class Counting(real):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                built.append(self)

        monkeypatch.setattr(decoders, "LeanDecoder", Counting)


@pytest.mark.parametrize("keep", [False, True])
def test_rollout_cache_released_unless_kept(prompts_file, tmp_path, monkeypatch, keep):
    """By default each rollout frees its static KV cache (and, on GPU, CUDA graphs) before the training
    step; rollout_keep_cuda_graph keeps one decoder across the steps; nothing outlives the run."""
    spy = _Decoders(monkeypatch)
    seen = []
    real_step = __import__("fastrl.train.grpo", fromlist=["grpo_step"]).grpo_step

    def grpo_step(policy, *args, **kwargs):  # what is kept while the policy trains
        seen.append(policy.model in spy.kept and bool(spy.kept[policy.model].keys))
        return real_step(policy, *args, **kwargs)

    monkeypatch.setattr("fastrl.train.grpo.grpo_step", grpo_step)
    result = train_grpo(GRPOConfig(**online_fields(prompts_file, tmp_path / "run", max_steps=3, batch_size=2,
                                                   num_generations=4, max_completion_length=4,
                                                   rollout_engine="fastrl", rollout_keep_cuda_graph=keep)))
    assert len(result.history) == 3 and seen == [keep] * 3
    assert len(spy.built) == (1 if keep else 3)  # kept: built once, reused by the next rollouts
    assert all(d.keys == [] for d in spy.built) and result.policy.model not in spy.kept


def test_rollout_keep_cuda_graph_must_be_a_bool(prompts_file, tmp_path):
    with pytest.raises(ConfigError, match="rollout_keep_cuda_graph"):
        GRPOConfig(**online_fields(prompts_file, tmp_path / "run", rollout_keep_cuda_graph="yes"))
