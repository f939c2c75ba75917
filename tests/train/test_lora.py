"""LoRA (peft_config): adapters train and the base stays frozen; the reference is the base (adapters
disabled, no copy); the rollout, the fused head and the saved adapter see the same model; resume is exact."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

from fastrl.rollout import generate
from fastrl.train import (ConfigError, GRPOConfig, OnlineDPOConfig, RMConfig, SFTConfig, train_dpo, train_grpo,
                          train_online_dpo, train_rm, train_sft)
from fastrl.train.adapters import AdapterReference, apply_adapters, config_dict, is_peft
from fastrl.train.config import load_config
from fastrl.train.distributed import World
from fastrl.train.model import Policy, build_model, completion_logps, frozen_copy, logprob_head
from fastrl.train.packing import pack

from .conftest import TINY, dpo_config, online_fields, state, toy_pairs, write_jsonl

peft = pytest.importorskip("peft")

CPU = torch.device("cpu")
WORLD = World(rank=0, world_size=1, local_rank=0, device=CPU)
LORA = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}
PROMPTS = [[9, 10, 11], [12, 13, 14, 15]]
COMPLETIONS = [[3, 4, 5], [6, 7]]


def low_tokens(prompt_ids, completion_ids, **columns) -> float:
    """A token-count reward: the fraction of completion tokens with an id below 16."""
    return sum(t < 16 for t in completion_ids) / len(completion_ids)


def grpo_config(data, out, **overrides) -> GRPOConfig:
    fields = online_fields(data, out, reward_funcs=[low_tokens], peft_config=dict(LORA), learning_rate=0.1,
                           beta=0.04)
    fields.update(overrides)
    return GRPOConfig(**fields)


def base_of(config):
    """The run's model built afresh without adapters."""
    return build_model(dataclasses.replace(config, peft_config=None), CPU)


def base_weights(model) -> dict[str, torch.Tensor]:
    """A PEFT model's base weights under the plain model's names."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.get_base_model().state_dict().items()
            if ".lora_" not in k}


def randomize_adapters(model, seed: int = 1) -> None:
    """Give every trainable (adapter) tensor random values, so that the adapters change the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def test_lora_grpo_raises_reward_and_trains_only_the_adapters(prompts_file, tmp_path, one_thread):
    config = grpo_config(prompts_file, tmp_path / "run", max_steps=20)
    base = base_of(config)
    result = train_grpo(config)
    model = result.policy.model
    assert is_peft(model)
    rewards = [h["reward/mean"] for h in result.history]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:3]) / 3 + 0.05, rewards
    assert result.history[0]["kl"] == 0.0 < result.history[-1]["kl"]  # the reference: the base the policy leaves
    trained = base_weights(model)
    assert trained.keys() == base.state_dict().keys()
    for name, value in base.state_dict().items():
        assert torch.equal(trained[name], value), name  # the base is frozen
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all(".lora_" in n for n in adapters)
    assert not any("lm_head" in n for n in adapters)  # all-linear leaves the lm-head out
    assert all(float(p.detach().abs().max()) > 0 for n, p in adapters.items() if "lora_B" in n)  # B starts at zero
    saved = result.checkpoint / "adapter"
    assert (saved / "adapter_config.json").is_file() and (saved / "adapter_model.safetensors").is_file()
    assert not (result.checkpoint / "model.safetensors").exists()  # the adapter, not a copy of the base
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 8


def test_the_reference_is_the_base_model_with_adapters_disabled(prompts_file, tmp_path, one_thread):
    config = grpo_config(prompts_file, tmp_path / "run")
    model = build_model(config, CPU)
    randomize_adapters(model)
    policy = Policy(model).train()
    reference = frozen_copy(policy, config, WORLD)
    assert isinstance(reference, AdapterReference) and reference.policy is policy  # no second copy
    assert not reference.training
    batch = pack(PROMPTS, COMPLETIONS)
    ref = completion_logps(reference, batch)
    assert torch.equal(ref, completion_logps(Policy(base_of(config)).eval(), batch))
    assert (completion_logps(policy, batch) - ref).abs().max() > 1e-2  # with the adapters: another model
    assert policy.training  # the policy's mode is restored
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)
    # a reference that follows the policy (online DPO's previous iterate) is still a copy
    online = OnlineDPOConfig(**online_fields(prompts_file, tmp_path / "o", peft_config=dict(LORA),
                                             reference_update="previous_iterate"))
    copied = frozen_copy(policy, online, WORLD)
    assert isinstance(copied, Policy) and copied.model is not model
    assert torch.equal(completion_logps(copied, batch), completion_logps(policy, batch))


@pytest.mark.parametrize("engine", ["fastrl", "hf"])
def test_the_rollout_runs_the_adapters(prompts_file, tmp_path, engine, one_thread):
    config = grpo_config(prompts_file, tmp_path / "run")
    model = build_model(config, CPU)
    randomize_adapters(model)
    policy = Policy(model).eval()
    out = generate(model, [torch.tensor(p) for p in PROMPTS], max_new_tokens=5, num_samples=2, engine=engine,
                   generator=torch.Generator().manual_seed(0))
    assert out.engine == engine
    completions = [row[:n].tolist() for row, n in zip(out.completion_ids, out.lengths)]
    batch = pack([p for p in PROMPTS for _ in range(2)], completions)
    sampled = torch.cat([row[:n] for row, n in zip(out.logprobs, out.lengths)])
    trained = completion_logps(policy, batch)
    torch.testing.assert_close(sampled, trained, rtol=1e-5, atol=1e-5)  # what was sampled is what trains
    with model.disable_adapter():
        assert (completion_logps(policy, batch) - trained).abs().max() > 1e-2  # the adapters count


@pytest.mark.parametrize("fields", [{"target_modules": ["q_proj", "v_proj", "lm_head"]},
                                    {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}],
                         ids=["lora_lm_head", "modules_to_save"])
def test_an_adapted_lm_head_is_what_the_fused_head_computes(prompts_file, tmp_path, fields, one_thread):
    config = grpo_config(prompts_file, tmp_path / "run", peft_config={"r": 4, **fields})
    model = build_model(config, CPU)
    randomize_adapters(model)
    policy = Policy(model).eval()
    logps = policy(pack(PROMPTS, COMPLETIONS), logprob_head())
    expected = []
    with torch.no_grad():
        for p, c in zip(PROMPTS, COMPLETIONS):  # the PEFT model's own forward, logits and all
            logits = model(input_ids=torch.tensor([p + c])).logits[0].float().log_softmax(-1)
            expected.append(logits[len(p) - 1:-1].gather(1, torch.tensor(c)[:, None]).squeeze(1))
    torch.testing.assert_close(logps, torch.cat(expected), rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        assert (policy(pack(PROMPTS, COMPLETIONS), logprob_head()) - logps).abs().max() > 1e-2
    logps.sum().backward()
    head = [(n, p) for n, p in model.named_parameters() if p.requires_grad and "lm_head" in n]
    assert head and all(p.grad is not None and float(p.grad.abs().max()) > 0 for _, p in head)


def test_lora_resume_continues_bit_exactly(prompts_file, tmp_path, one_thread):
    # lora_dropout: the training forward draws random numbers (the RNG state is restored too)
    fields = dict(max_steps=4, save_every=2, lr_scheduler="linear", peft_config={**LORA, "lora_dropout": 0.1})
    straight = train_grpo(grpo_config(prompts_file, tmp_path / "a", **fields))
    middle = tmp_path / "a" / "checkpoints" / "step-00000002"
    resumed = train_grpo(grpo_config(prompts_file, tmp_path / "b", resume=str(middle), **fields))
    assert resumed.steps == 2
    for key in ("reward/mean", "loss", "kl", "lr", "grad_norm"):
        assert [h[key] for h in straight.history[2:]] == [h[key] for h in resumed.history], key
    a, b = state(straight.policy), state(resumed.policy)
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name
    changed = [n for n in a if "lora_B" in n and not torch.equal(a[n], torch.zeros_like(a[n]))]
    assert changed


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft reads it
def test_the_saved_adapter_loads_with_peft(prompts_file, tmp_path, one_thread):
    config = grpo_config(prompts_file, tmp_path / "run", max_steps=3)
    result = train_grpo(config)
    loaded = peft.PeftModel.from_pretrained(base_of(config), str(result.checkpoint / "adapter"))
    batch = pack(PROMPTS, COMPLETIONS)
    mine = completion_logps(result.policy.eval(), batch)
    assert torch.equal(completion_logps(Policy(loaded).eval(), batch), mine)
    with loaded.disable_adapter():
        assert (completion_logps(Policy(loaded).eval(), batch) - mine).abs().max() > 0


def test_lora_dpo_trains_the_adapters_against_the_base(pairs_file, tmp_path, one_thread):
    config = dpo_config(pairs_file, tmp_path / "pre", max_steps=12, learning_rate=1e-2, peft_config=dict(LORA))
    base = base_of(config)
    result = train_dpo(config)
    history = result.history
    assert history[0]["rewards/accuracies"] == 0.0  # the policy starts as the reference (B = 0)
    # a tiny random model's frozen lm-head bounds what the adapters can move: a modest but clear gain
    assert history[-1]["loss"] < history[0]["loss"] - 0.05, [h["loss"] for h in history]
    assert min(h["rewards/accuracies"] for h in history[-4:]) == 1.0
    trained = base_weights(result.policy.model)
    assert all(torch.equal(trained[n], v) for n, v in base.state_dict().items())
    assert (result.checkpoint / "adapter" / "adapter_model.safetensors").is_file()
    live = train_dpo(dpo_config(pairs_file, tmp_path / "live", max_steps=3, learning_rate=1e-2,
                                peft_config=dict(LORA), reference="live"))
    for a, b in zip(history[:3], live.history):  # the live reference (adapters disabled) = the precomputed one
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)


def test_peft_config_errors_name_the_key(prompts_file, tmp_path, monkeypatch):
    def make(**fields):
        return grpo_config(prompts_file, tmp_path / "run", **fields)

    with pytest.raises(ConfigError, match=r"GRPOConfig\.peft_config\.rr: not a field of peft\.LoraConfig.*'r'"):
        make(peft_config={"rr": 8})
    with pytest.raises(ConfigError, match=r"GRPOConfig\.peft_config\.init_lora_weights: 'pissa'"):
        make(peft_config={"init_lora_weights": "pissa"})
    with pytest.raises(ConfigError, match=r"GRPOConfig\.peft_config\.task_type"):
        make(peft_config={"task_type": "SEQ_2_SEQ_LM"})
    with pytest.raises(ConfigError, match=r"GRPOConfig\.peft_config: must be a mapping"):
        make(peft_config=[1, 2])
    with pytest.raises(ConfigError, match=r"GRPOConfig\.peft_config: is not valid JSON"):
        make(peft_config="{r: 8")
    with pytest.raises(ConfigError, match=r"GRPOConfig\.peft_config: LoRA adapters are for text runs"):
        make(image_generation={"image_token_range": [32, 64]})
    with pytest.raises(ConfigError, match=r"GRPOConfig\.peft_config: .*no_such_module"):
        build_model(make(peft_config={"target_modules": ["no_such_module"]}), CPU)
    assert make(peft_config='{"r": 4}').peft_config == {"r": 4}  # a JSON string (the command line)
    given = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    assert config_dict(given) == {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    assert make(peft_config=given).peft_config == {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    base = base_of(make())
    with monkeypatch.context() as m:  # under torchrun with several processes
        m.setattr(torch.distributed, "is_initialized", lambda: True)
        m.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
        with pytest.raises(ValueError, match=r"peft_config: LoRA training runs in one process"):
            apply_adapters(base, dict(LORA), seed=0)
    assert not is_peft(base)
    monkeypatch.setitem(sys.modules, "peft", None)  # peft not installed
    with pytest.raises(ConfigError, match=r"GRPOConfig\.peft_config: .*pip install peft"):
        make()


def test_peft_config_from_yaml_and_the_command_line(prompts_file, tmp_path):
    fields = online_fields(prompts_file, tmp_path / "run")
    fields.pop("reward_funcs")
    text = "\n".join(f"{k}: {json.dumps(v)}" for k, v in fields.items())
    yaml_file = tmp_path / "lora.yaml"
    yaml_file.write_text(text + "\nreward_funcs: ['examples/rewards.py:count_token']\n"
                                "peft_config:\n  r: 16\n  lora_alpha: 32\n  target_modules: all-linear\n")
    config = load_config("grpo", yaml_file)
    assert config.peft_config == {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}
    config = load_config("grpo", yaml_file, ["--peft_config", '{"r": 2, "target_modules": ["q_proj"]}'])
    assert config.peft_config == {"r": 2, "target_modules": ["q_proj"]}


def test_lora_in_online_dpo_sft_and_rm(prompts_file, pairs_file, tmp_path, one_thread):
    online = train_online_dpo(OnlineDPOConfig(**online_fields(prompts_file, tmp_path / "online", max_steps=3,
                                                              reward_funcs=[low_tokens], learning_rate=1e-2,
                                                              peft_config=dict(LORA))))
    assert online.history[0]["loss"] == pytest.approx(0.6931, abs=1e-4)  # the reference (the base) = the policy
    assert online.history[-1]["loss"] != online.history[0]["loss"]
    sft_data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": p["prompt"], "completion": p["chosen"]}
                                                     for p in toy_pairs()])
    common = dict(model_config=dict(TINY["qwen2"]), max_steps=4, learning_rate=1e-2, progress=False,
                  peft_config=dict(LORA))
    sft = train_sft(SFTConfig(train_data=str(sft_data), output_dir=str(tmp_path / "sft"), **common))
    rm = train_rm(RMConfig(train_data=str(pairs_file), output_dir=str(tmp_path / "rm"), **common))
    for result in (online, sft, rm):
        assert (result.checkpoint / "adapter" / "adapter_model.safetensors").is_file()
        trainable = [n for n, p in result.policy.model.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_" in n or ".score." in n for n in trainable), trainable
    assert sft.history[-1]["loss"] < sft.history[0]["loss"] and rm.history[-1]["loss"] < rm.history[0]["loss"]
    assert any(".score.modules_to_save." in n for n, p in rm.policy.model.named_parameters() if p.requires_grad)
