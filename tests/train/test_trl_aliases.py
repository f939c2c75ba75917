"""TRL's config names: each sets its fastrl field with TRL's meaning (Python keywords, YAML, command line);
a fastrl field given too and different is refused; GRPO's per_device_train_batch_size counts completions."""

from __future__ import annotations

import dataclasses

import pytest

from fastrl.train import DPOConfig, GRPOConfig, OnlineDPOConfig, RMConfig, SFTConfig, load_config
from fastrl.train.config import TRL_NAMES, ConfigError, trl_names

from .conftest import TINY, emits_target, toy_pairs, toy_prompts, write_jsonl


@pytest.fixture
def prompts(tmp_path):
    return str(write_jsonl(tmp_path / "prompts.jsonl", toy_prompts(8)))


@pytest.fixture
def pairs(tmp_path):
    return str(write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(8)))


def grpo(data, **fields):
    return GRPOConfig(model_config=dict(TINY["qwen2"]), train_data=data, reward_funcs=[emits_target], **fields)


def dpo(data, **fields):
    return DPOConfig(model_config=dict(TINY["qwen2"]), train_data=data, **fields)


# (TRL name, TRL value, fastrl field, fastrl value) on GRPO; the meaning of each is TRL's
GRPO_CASES = [
    ("num_train_epochs", 3.0, "num_epochs", 3),
    ("logging_steps", 10, "log_every", 10),
    ("save_steps", 500, "save_every", 500),
    ("save_total_limit", 3, "keep_checkpoints", 3),
    ("lr_scheduler_type", "cosine", "lr_scheduler", "cosine"),
    ("lr_scheduler_type", "constant_with_warmup", "lr_scheduler", "constant"),
    ("optim", "adamw_torch_fused", "optimizer", "adamw"),
    ("optim", "adamw_torch", "optimizer", "adamw"),
    ("resume_from_checkpoint", True, "resume", "auto"),
    ("shuffle_dataset", False, "shuffle", False),
    ("eval_steps", 5, "eval_every", 5),
    ("num_generations_eval", 2, "eval_num_generations", 2),
    ("scale_rewards", "batch", "advantage_scale", "batch"),
    ("scale_rewards", True, "advantage_scale", "group"),
    ("scale_rewards", False, "advantage_scale", "none"),
    ("multi_objective_aggregation", "normalize_then_sum", "multi_reward", "normalize_then_sum"),
    ("sapo_temperature_pos", 0.5, "sapo_tau_pos", 0.5),
    ("sapo_temperature_neg", 2.0, "sapo_tau_neg", 2.0),
    ("vespo_k_pos", 4.0, "vespo_k", [4.0, 3.0]),
    ("vespo_k_neg", 5.0, "vespo_k", [2.0, 5.0]),
    ("vespo_lambda_pos", 1.0, "vespo_lambda", [1.0, 2.0]),
    ("vespo_lambda_neg", 1.5, "vespo_lambda", [3.0, 1.5]),
    ("vllm_importance_sampling_mode", "sequence_mask", "is_mode", "sequence_mask"),
    ("vllm_importance_sampling_clip_max", 3.0, "is_cap", 3.0),
    ("vllm_importance_sampling_clip_min", 0.5, "is_min", 0.5),
]


@pytest.mark.parametrize("trl, value, mine, expected", GRPO_CASES, ids=[f"{c[0]}={c[1]}" for c in GRPO_CASES])
def test_each_trl_name_sets_its_field(prompts, trl, value, mine, expected):
    config = grpo(prompts, **{trl: value})
    assert getattr(config, mine) == expected
    assert getattr(config, trl) is None  # moved: only fastrl's field holds it
    assert trl not in config.to_dict() and config.to_dict()[mine] == expected


def test_every_trl_name_is_a_field_of_the_configs_that_have_its_target():
    for cls in (GRPOConfig, DPOConfig, OnlineDPOConfig, SFTConfig, RMConfig):
        names = {f.name for f in dataclasses.fields(cls)}
        for trl, mine in trl_names(cls).items():
            assert mine in names, (cls.__name__, trl, mine)
    assert set(trl_names(GRPOConfig)) | set(trl_names(DPOConfig)) | set(trl_names(OnlineDPOConfig)) == set(TRL_NAMES)


def test_per_device_train_batch_size_counts_completions_for_grpo(prompts):
    # TRL: 16 completions per device per micro-batch with 8 generations = 2 prompts (fastrl's batch_size)
    assert grpo(prompts, per_device_train_batch_size=16, num_generations=8).batch_size == 2
    assert grpo(prompts, per_device_train_batch_size=16, num_generations=4).batch_size == 4
    # TRL's online DPO counts prompts (two completions each), as fastrl's
    online = OnlineDPOConfig(model_config=dict(TINY["qwen2"]), train_data=prompts, reward_funcs=[emits_target],
                             per_device_train_batch_size=6, num_generations=2)
    assert online.batch_size == 6


def test_per_device_train_batch_size_not_a_multiple_of_the_group_is_refused(prompts):
    with pytest.raises(ConfigError, match=r"GRPOConfig\.per_device_train_batch_size: 12 completions is not a whole "
                                          r"number of prompts.*num_generations \(8\)"):
        grpo(prompts, per_device_train_batch_size=12, num_generations=8)


def test_per_device_train_batch_size_counts_pairs_for_dpo(pairs):
    assert dpo(pairs, per_device_train_batch_size=4).batch_size == 4  # TRL's DPO: pairs, as fastrl


def test_both_names_given_and_different_is_refused(prompts):
    with pytest.raises(ConfigError, match=r"GRPOConfig\.per_device_train_batch_size: TRL's name of batch_size, which "
                                          r"is given too and differs \(batch_size=3, per_device_train_batch_size=16 "
                                          r"-> batch_size=2\)"):
        grpo(prompts, batch_size=3, per_device_train_batch_size=16, num_generations=8)
    with pytest.raises(ConfigError, match=r"GRPOConfig\.logging_steps: .*log_every=5.*logging_steps=10"):
        grpo(prompts, log_every=5, logging_steps=10)
    # the same value under both names is no conflict
    assert grpo(prompts, batch_size=2, per_device_train_batch_size=16, num_generations=8).batch_size == 2
    assert grpo(prompts, log_every=5, logging_steps=5).log_every == 5


@pytest.mark.parametrize("fields, message", [
    ({"num_train_epochs": 1.5}, r"num_train_epochs: must be a whole number of epochs"),
    ({"logging_steps": 0.1}, r"logging_steps: must be a whole number of steps \(not a ratio\)"),
    ({"lr_scheduler_type": "polynomial"}, r"lr_scheduler_type: 'polynomial' has no fastrl equivalent"),
    ({"optim": "sgd"}, r"optim: 'sgd' has no fastrl equivalent"),
    ({"scale_rewards": "sometimes"}, r"scale_rewards: must be group, batch, none, true or false"),
])
def test_values_fastrl_cannot_take_are_refused(prompts, fields, message):
    with pytest.raises(ConfigError, match=r"GRPOConfig\." + message):
        grpo(prompts, **fields)


def test_dpo_names(pairs):
    config = dpo(pairs, f_divergence_type="alpha", f_alpha_divergence_coef=0.5, precompute_ref_log_probs=False,
                 precompute_ref_batch_size=16)
    assert (config.f_divergence, config.f_alpha, config.reference, config.reference_batch_size) == \
        ("alpha", 0.5, "live", 16)
    assert dpo(pairs, precompute_ref_log_probs=True).reference == "precomputed"


def test_trl_names_in_yaml_and_on_the_command_line(tmp_path, prompts):
    yaml_file = tmp_path / "grpo.yaml"
    yaml_file.write_text(f"model_config: {{model_type: qwen2, vocab_size: 64}}\ntrain_data: {prompts}\n"
                         f"reward_funcs: ['tests.train.conftest:emits_target']\nnum_generations: 4\n"
                         f"per_device_train_batch_size: 8\nscale_rewards: false\nlogging_steps: 3\n")
    config = load_config("grpo", yaml_file, ["--lr_scheduler_type", "cosine", "--num_train_epochs", "2",
                                             "--shuffle_dataset", "false"])
    assert (config.batch_size, config.advantage_scale, config.log_every, config.lr_scheduler, config.num_epochs,
            config.shuffle) == (2, "none", 3, "cosine", 2, False)
    # the command line's TRL name against the YAML's fastrl name: both given, different
    with pytest.raises(ConfigError, match=r"per_device_train_batch_size: TRL's name of batch_size"):
        load_config("grpo", yaml_file, ["--batch_size", "5"])


def test_trl_names_are_listed_in_the_help():
    from transformers import HfArgumentParser

    text = HfArgumentParser(GRPOConfig).format_help()
    assert "--per_device_train_batch_size" in text and "TRL's name of batch_size" in text


def test_max_steps_minus_one_is_trls_not_set(prompts):
    assert grpo(prompts, max_steps=-1).max_steps == 0
    with pytest.raises(ConfigError, match=r"GRPOConfig\.max_steps: must be >= 0, got -2"):
        grpo(prompts, max_steps=-2)


def test_online_dpo_names(prompts):
    config = OnlineDPOConfig(model_config=dict(TINY["qwen2"]), train_data=prompts, reward_funcs=[emits_target],
                             max_new_tokens=16, f_divergence_type="js")
    assert (config.max_completion_length, config.f_divergence) == (16, "js")
