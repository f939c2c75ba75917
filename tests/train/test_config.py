"""fastrl.train.config: YAML + command-line overrides, validation errors that name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastrl.train import ConfigError, DPOConfig, GRPOConfig, OnlineDPOConfig, load_config

from conftest import expect_error

from .conftest import TINY, toy_pairs, write_jsonl

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(8))


def test_yaml_then_overrides(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(f"model_config: {json.dumps(TINY['qwen2'])}\ntrain_data: {data}\nbeta: 0.5\n"
                    f"learning_rate: 1e-3\nloss_type: ipo\npacking: true\n")
    config = load_config("dpo", path)
    assert isinstance(config, DPOConfig)
    assert config.beta == 0.5 and config.loss_type == ["ipo"] and config.packing
    assert config.learning_rate == 1e-3  # PyYAML reads 1e-3 as a string; the parser converts it
    bigger = json.dumps({**TINY["qwen2"], "hidden_size": 64})
    config = load_config("dpo", path, ["--beta", "0.2", "--loss_type", "sigmoid", "ipo", "--loss_weights", "1", "0.5",
                                       "--no_packing", "--model_config", bigger])
    assert config.beta == 0.2 and config.loss_type == ["sigmoid", "ipo"] and config.loss_weights == [1.0, 0.5]
    assert not config.packing and config.model_config["hidden_size"] == 64


def test_unknown_keys_and_options_are_named(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(f"model_config: {{model_type: qwen2}}\ntrain_data: {data}\nbetta: 0.5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'betta'.*did you mean 'beta'"):
        load_config("dpo", path)
    path.write_text(f"model_config: {{model_type: qwen2}}\ntrain_data: {data}\n")
    with pytest.raises(ConfigError, match=r"unknown option '--lr'"):
        load_config("dpo", path, ["--lr", "1"])
    with pytest.raises(ConfigError, match=r"argument --batch_size.*: invalid int value: 'x'"):
        load_config("dpo", path, ["--batch_size", "x"])
    with pytest.raises(ConfigError, match=r"argument --dtype: invalid choice"):
        load_config("dpo", path, ["--dtype", "fp8"])


@pytest.mark.parametrize("fields, message", [
    ({"model_config": None}, r"DPOConfig\.model: give exactly one of model"),
    ({"model": "/tmp"}, r"DPOConfig\.model: give exactly one of model"),
    ({"model": "/nonexistent", "model_config": None}, r"DPOConfig\.model: '/nonexistent' is not a local directory"),
    ({"model": "/tmp", "model_config": None}, r"DPOConfig\.model: '/tmp' has no config.json"),
    ({"model_config": {"hidden_size": 8}}, r"DPOConfig\.model_config: needs model_type"),
    ({"model_config": "{not json"}, r"DPOConfig\.model_config: is not valid JSON"),
    ({"train_data": None}, r"DPOConfig\.train_data: is required"),
    ({"train_data": "/nonexistent.jsonl"}, r"DPOConfig\.train_data: '/nonexistent.jsonl' does not exist"),
    ({"batch_size": 0}, r"DPOConfig\.batch_size: must be >= 1, got 0"),
    ({"gradient_accumulation_steps": -1}, r"DPOConfig\.gradient_accumulation_steps: must be >= 1"),
    ({"learning_rate": 0.0}, r"DPOConfig\.learning_rate: must be > 0"),
    ({"adam_beta2": 1.5}, r"DPOConfig\.adam_beta2: must be >= 0.0 and <= 1.0"),
    ({"max_grad_norm": -1.0}, r"DPOConfig\.max_grad_norm: must be >= 0"),
    ({"report_to": ["mlflow"]}, r"DPOConfig\.report_to: 'mlflow' is not one of tensorboard, wandb"),
    ({"resume": "/nonexistent"}, r"DPOConfig\.resume:"),
    ({"dtype": "bfloat16", "bf16": True}, r"DPOConfig\.bf16: autocast is for float32 parameters"),
    ({"beta": 0.0}, r"DPOConfig\.beta: beta must be finite and in \(0\.0, inf\]"),
    ({"loss_type": ["sigmoid", "nope"]}, r"DPOConfig\.loss_type: loss_type 'nope' is unknown"),
    ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, r"DPOConfig\.loss_weights: loss_weights must hold one"),
    ({"loss_type": "exo_pair"}, r"DPOConfig\.label_smoothing: label_smoothing must be > 0"),
    ({"ld_alpha": 2.0}, r"DPOConfig\.ld_alpha: must be >= 0.0 and <= 1.0"),
    ({"reference": "sometimes"}, r"DPOConfig\.reference: must be one of precomputed, live"),
    ({"reference_model": "/nonexistent"}, r"DPOConfig\.reference_model:"),
])
def test_bad_dpo_fields_are_named(data, fields, message):
    base = {"model_config": dict(TINY["qwen2"]), "train_data": str(data)}
    expect_error(DPOConfig, ConfigError, message, **{**base, **fields})


@pytest.mark.parametrize("fields, message", [
    ({"reward_funcs": []}, r"GRPOConfig\.reward_funcs: give at least one reward"),
    ({"reward_funcs": ["not a spec"]}, r"GRPOConfig\.reward_funcs: 'not a spec' is not 'module:function'"),
    ({"reward_weights": [1.0, 2.0]}, r"GRPOConfig\.reward_weights: needs one weight per reward \(1\)"),
    ({"num_generations": 1}, r"GRPOConfig\.num_generations: must be >= 2"),
    ({"temperature": 0.0}, r"GRPOConfig\.temperature: must be > 0"),
    ({"top_p": 1.5}, r"GRPOConfig\.top_p:"),
    ({"loss_type": "ppo"}, r"GRPOConfig\.loss_type: loss_type must be one of"),
    ({"epsilon": -0.1}, r"GRPOConfig\.epsilon:"),
    ({"kl": "k9"}, r"GRPOConfig\.kl: kl must be one of"),
    ({"advantage_estimator": "vtrace"}, r"GRPOConfig\.advantage_estimator:"),
    ({"advantage_scale": "global"}, r"GRPOConfig\.advantage_scale:"),
    ({"num_iterations": 0}, r"GRPOConfig\.num_iterations: must be >= 1"),
])
def test_bad_grpo_fields_are_named(data, fields, message):
    base = {"model_config": dict(TINY["qwen2"]), "train_data": str(data), "reward_funcs": ["my_rewards:exact_match"]}
    expect_error(GRPOConfig, ConfigError, message, **{**base, **fields})


def test_grpo_config_embeds_the_loss_settings(tmp_path, data):
    import dataclasses

    from fastrl.losses import GRPOSettings

    base = {"model_config": dict(TINY["qwen2"]), "train_data": str(data), "reward_funcs": ["my_rewards:exact_match"]}
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert {f.name for f in dataclasses.fields(GRPOSettings)} <= names  # max_completion_length: TrainConfig's
    config = GRPOConfig(**base, loss_type="vespo", vespo_k=[1.0, 4.0], is_min=0.5, max_completion_length=64)
    assert config.loss_settings() == GRPOSettings(loss_type="vespo", vespo_k=(1.0, 4.0), is_min=0.5,
                                                  max_completion_length=64)
    assert config.loss_options() == config.loss_settings().options()
    path = tmp_path / "g.yaml"
    path.write_text(f"model_config: {json.dumps(TINY['qwen2'])}\ntrain_data: {data}\n"
                    f"reward_funcs: [my_rewards:exact_match]\nvespo_lambda: [2.0, 1.0]\n")
    loaded = load_config("grpo", path, ["--sapo_tau_neg", "1.5", "--loss_agg_mode", "token-sum"])
    assert loaded.loss_settings() == GRPOSettings(vespo_lambda=(2.0, 1.0), sapo_tau_neg=1.5, loss_agg_mode="token-sum",
                                                  max_completion_length=loaded.max_completion_length)
    with pytest.raises(ConfigError, match=r"GRPOConfig\.is_min: is_min \(2\.0\) must be less than is_cap"):
        GRPOConfig(**base, is_min=2.0, is_cap=1.0)
    with pytest.raises(ConfigError, match=r"GRPOConfig\.vespo_k: vespo_k must be a number or"):
        GRPOConfig(**base, vespo_k=[1.0, 2.0, 3.0])


def test_grpo_and_online_dpo_configs(data):
    base = {"model_config": dict(TINY["qwen2"]), "train_data": str(data), "reward_funcs": ["my_rewards:exact_match"]}
    grpo = GRPOConfig(**base, loss_type="grpo", beta=0.04, num_generations=4)
    assert grpo.loss_options()["beta"] == 0.04 and grpo.advantage_options()["estimator"] == "grpo"
    online = OnlineDPOConfig(**base, loss_type="ipo", pairing="all_pairs")
    assert online.num_generations == 2 and online.loss_options()["loss_type"] == ["ipo"]
    with pytest.raises(ConfigError, match=r"OnlineDPOConfig\.num_generations: must be >= 2"):
        OnlineDPOConfig(**base, num_generations=1)
    with pytest.raises(ConfigError, match=r"OnlineDPOConfig\.beta:"):
        OnlineDPOConfig(**base, beta=-1.0)
    with pytest.raises(ConfigError, match=r"OnlineDPOConfig\.reference_update: must be one of"):
        OnlineDPOConfig(**base, reference_update="sometimes")


def test_example_configs_load():
    configs = sorted(EXAMPLES.glob("*.yaml"))
    assert configs
    import os

    cwd = os.getcwd()
    os.chdir(EXAMPLES.parent)  # example paths are relative to the repository root
    try:
        for path in configs:
            method = path.stem.split("_")[0].replace("online", "online-dpo")
            assert load_config(method, path).to_dict()
    finally:
        os.chdir(cwd)
