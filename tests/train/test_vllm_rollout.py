"""rollout_engine: vllm: the weight sync, sleep and wake of a colocated engine, on a CPU stand-in engine.

The stand-in holds its own copy of the model and samples with fastrl's own decoder from the weights it
was sent, so a run whose sync is wrong samples from stale (or, after a sleep, NaN) weights. vLLM itself
is not needed: without it ``rollout_engine: vllm`` stops the run at its start naming the field.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from fastrl.rollout import generate
from fastrl.train import ConfigError, GRPOConfig, OnlineDPOConfig, train_grpo, train_online_dpo
from fastrl.train import vllm_rollout
from fastrl.train.vllm_rollout import VLLMRollout, engine_weights
from tests.train.conftest import TINY, online_fields


class StandInEngine:
    """generate / load_weights / sleep / wake_up as a colocated vLLM engine has them, on the CPU.

    ``check`` (the live policy model) is compared with the weights held at every rollout.
    """

    def __init__(self, model, dtype=torch.float32):
        model = copy.deepcopy(model)
        if hasattr(model, "merge_and_unload"):  # a LoRA policy: the engine serves the merged base model
            model = model.merge_and_unload()
        self.model = model.to(dtype)
        self.dtype = dtype
        self.check = None
        self.calls: list[str] = []
        self.loads = 0
        self.received: list[dict[str, torch.Tensor]] = []
        self.matched: list[bool] = []

    def load_weights(self, weights):
        own = self.model.state_dict()
        got = {}
        for name, tensor in weights:
            assert name in own, f"unknown weight {name}"
            assert tensor.dtype == self.dtype
            own[name].copy_(tensor)
            got[name] = tensor.clone()
        assert set(got) == set(own), "a push sends the full state dict"
        self.loads += 1
        self.received.append(got)
        self.calls.append("load")

    def sleep(self, level=1):
        self.calls.append(f"sleep{level}")
        if level == 2:  # the weights are freed: a rollout before the next push samples from garbage
            with torch.no_grad():
                for p in self.model.parameters():
                    p.fill_(float("nan"))

    def wake_up(self, tags=None):
        self.calls.append("wake:" + ",".join(tags or ["all"]))

    def reset_prefix_cache(self):
        self.calls.append("reset")

    def generate(self, prompts, **sampling):
        self.calls.append("generate")
        if self.check is not None:  # what the policy computes with now (a LoRA policy's merged weights)
            live = dict(engine_weights(self.check, self.dtype))
            self.matched.append(all(torch.allclose(live[k], v, rtol=1e-6, atol=1e-7)
                                    for k, v in self.model.state_dict().items()))
        return generate(self.model, [torch.tensor(p) for p in prompts], engine="hf", **sampling)


def _tiny_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    fields = dict(TINY["qwen2"])
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))


@pytest.fixture
def stand_in(monkeypatch):
    """build_engine replaced by a stand-in engine (the one the run built is ``made[0]``)."""
    made = []

    def build(run):
        engine = StandInEngine(run.model)
        engine.check = run.model
        made.append(engine)
        return engine

    monkeypatch.setattr(vllm_rollout, "build_engine", build)
    return made


@pytest.mark.parametrize("sleep", [True, False])
def test_grpo_run_samples_from_the_policys_weights_at_every_step(prompts_file, tmp_path, one_thread, stand_in, sleep):
    config = GRPOConfig(**online_fields(prompts_file, tmp_path / "run", rollout_engine="vllm", max_steps=3,
                                        vllm_enable_sleep_mode=sleep))
    result = train_grpo(config)
    engine = stand_in[0]
    assert result.steps == 3
    # one rollout per step, each from exactly the policy's weights of that moment
    assert engine.calls.count("generate") == 3 and engine.matched == [True, True, True]
    assert engine.loads == 3  # weights change every step: pushed before each rollout
    first, last = engine.received[0], engine.received[-1]
    assert any(not torch.equal(first[k], last[k]) for k in first), "training moved the weights pushed"
    if sleep:  # asleep from its start and after each rollout; woken (weights, then KV cache) around the push
        assert engine.calls[:4] == ["sleep2", "wake:weights", "load", "reset"]
        assert engine.calls[4:7] == ["wake:kv_cache", "generate", "sleep2"]
    else:
        assert "sleep2" not in engine.calls and not any(c.startswith("wake") for c in engine.calls)


def test_lora_run_pushes_merged_weights(prompts_file, tmp_path, one_thread, stand_in):
    pytest.importorskip("peft")
    config = GRPOConfig(**online_fields(prompts_file, tmp_path / "run", rollout_engine="vllm", max_steps=2,
                                        peft_config={"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
                                        learning_rate=0.1))
    result = train_grpo(config)
    engine = stand_in[0]
    assert engine.matched == [True, True] and engine.loads == 2
    assert not any("lora_" in name for name in engine.received[0])  # the base model's names only
    q_proj = next(k for k in engine.received[0] if "q_proj.weight" in k)
    # after a step the adapters differ from their initial zero product: the pushed q_proj moved too
    assert not torch.equal(engine.received[0][q_proj], engine.received[1][q_proj])
    assert result.steps == 2


def test_online_dpo_uses_the_engine(prompts_file, tmp_path, one_thread, stand_in):
    config = OnlineDPOConfig(**online_fields(prompts_file, tmp_path / "run", rollout_engine="vllm", max_steps=2,
                                             num_generations=2))
    train_online_dpo(config)
    assert stand_in[0].matched == [True, True]


def test_sync_pushes_only_changed_weights():
    model = _tiny_model()
    engine = StandInEngine(model, dtype=torch.bfloat16)
    engine.check = model
    sync = VLLMRollout(engine, sleep_mode=False)
    assert sync.sync(model) and not sync.sync(model)  # nothing changed: no second push
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # an in-place write
    assert sync.sync(model) and sync.pushes == 2
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # an optimiser step (it writes through .data)
    model(torch.tensor([[9, 10, 11]])).logits.sum().backward()
    optimizer.step()
    assert sync.sync(model) and sync.pushes == 3 and not sync.sync(model)
    # the engine's dtype: bf16 copies of the fp32 weights
    for name, tensor in model.state_dict().items():
        assert torch.equal(engine.received[-1][name], tensor.to(torch.bfloat16))
    out = sync.generate(model, [[9, 10, 11]], num_samples=2, max_new_tokens=3, temperature=1.0, top_k=0, top_p=1.0,
                        min_p=0.0, stop_token_ids=None, generator=torch.Generator().manual_seed(0))
    assert out.completion_ids.shape[0] == 2 and engine.loads == 3 and engine.matched == [True]


def test_sleep_mode_pushes_again_after_each_sleep():
    model = _tiny_model()
    engine = StandInEngine(model)
    sync = VLLMRollout(engine, sleep_mode=True)
    kw = dict(num_samples=1, max_new_tokens=2, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, stop_token_ids=None,
              generator=None)
    for _ in range(2):  # unchanged weights, but level 2 freed them: pushed again
        out = sync.generate(model, [[9, 10]], **kw)
        assert torch.isfinite(out.logprobs).all()
    assert engine.loads == 2 and engine.calls[-1] == "sleep2"


def test_lora_weights_are_pushed_merged():
    peft = pytest.importorskip("peft")
    model = _tiny_model()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    pushed = dict(engine_weights(lora))
    merged = copy.deepcopy(lora).merge_and_unload().state_dict()
    assert set(pushed) == set(merged)  # the base model's names, no adapter tensors
    for name, tensor in merged.items():
        torch.testing.assert_close(pushed[name], tensor, rtol=1e-6, atol=1e-6)
    assert any(not torch.equal(pushed[k], _tiny_model().state_dict()[k]) for k in pushed if "q_proj" in k)
    # computed, not written into the model: its weights are bit-for-bit what they were
    assert all(torch.equal(before[k], v) for k, v in lora.state_dict().items())


def test_missing_vllm_stops_the_run_at_its_start(prompts_file, tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    out = tmp_path / "run"
    config = GRPOConfig(**online_fields(prompts_file, out, rollout_engine="vllm"))
    with pytest.raises(ConfigError, match=r"GRPOConfig\.rollout_engine: 'vllm' needs vLLM.*pip install vllm"):
        train_grpo(config)
    assert not out.exists() or not any(out.iterdir())  # nothing written: the directory is not "used"


@pytest.mark.parametrize("field,value", [("vllm_gpu_memory_utilization", 0.0), ("vllm_gpu_memory_utilization", 1.5),
                                         ("vllm_enable_sleep_mode", "yes"), ("vllm_max_model_length", 0),
                                         ("rollout_engine", "sglang")])
def test_vllm_fields_are_checked(prompts_file, tmp_path, field, value):
    with pytest.raises(ConfigError, match=rf"GRPOConfig\.{field}"):
        GRPOConfig(**online_fields(prompts_file, tmp_path / "run", **{"rollout_engine": "vllm", field: value}))
