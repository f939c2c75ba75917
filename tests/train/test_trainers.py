"""The TRL-shaped trainers (fastrl.train.trainers): in-memory models, tokenizers and tables, args as a dict or
a trl config, callbacks, peft_config, and the held-out evaluation of the online methods."""

from __future__ import annotations

import json

import pytest
import torch

from fastrl.train import DPOTrainer, GRPOTrainer, OnlineDPOTrainer, TrainerCallback, TrainResult
from fastrl.train.config import ConfigError

from .conftest import TINY, emits_target, make_tokenizer, toy_pairs, toy_prompts


def tiny_model(seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(TINY["qwen2"])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


@pytest.fixture
def tokenizer(tmp_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tokenizer"))


def says_good(prompts, completions, completion_ids, answer, **kwargs):
    """A TRL-form reward: text in, one float per completion; ``answer`` is a dataset column. (Plus a
    small term of the first token, so that a random model's groups differ.)"""
    assert all(isinstance(c, str) for c in completions) and len(answer) == len(completions)
    assert all(isinstance(p, str) for p in prompts)
    return [float(a in c) + 0.01 * ids[0] for a, c, ids in zip(answer, completions, completion_ids)]


TEXT_ROWS = [{"prompt": "hello world", "answer": "good"}, {"prompt": "the question is", "answer": "good"},
             {"prompt": "a bad answer", "answer": "bad"}, {"prompt": "the world is good", "answer": "good"}]

ONLINE = dict(num_generations=4, max_completion_length=4, max_steps=3, learning_rate=2e-2, lr_scheduler="constant",
              progress=False, log_completions=0)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- GRPO

def test_grpo_trainer_from_objects_in_memory(tmp_path, tokenizer, one_thread):
    model = tiny_model()
    before = weights(model)
    trainer = GRPOTrainer(model=model, reward_funcs=says_good, train_dataset=TEXT_ROWS, processing_class=tokenizer,
                          args=dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, **ONLINE))
    assert trainer.config.batch_size == 2  # TRL's 8 completions per device / 4 generations
    assert trainer.config.model is model and trainer.config.tokenizer is tokenizer
    result = trainer.train()
    assert isinstance(result, TrainResult) and result.steps == 3
    assert trainer.model is model  # trained in place, as TRL does
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [r["step"] for r in result.history] == [1, 2, 3]
    assert all("reward/says_good/mean" in r for r in result.history)
    saved = json.loads((result.checkpoint / "trainer_state.json").read_text())["config"]
    assert saved["model"] == "<Qwen2ForCausalLM>" and saved["train_data"] == "<list of 4 rows>"
    trainer.save_model(tmp_path / "saved")
    assert (tmp_path / "saved" / "config.json").is_file() and (tmp_path / "saved" / "tokenizer_config.json").is_file()


def test_grpo_trainer_from_paths_and_a_datasets_table(tmp_path, one_thread):
    datasets = pytest.importorskip("datasets")
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    table = datasets.Dataset.from_list(toy_prompts(8))
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[emits_target], train_dataset=table,
                          args=dict(output_dir=str(tmp_path / "out"), batch_size=2, **ONLINE))
    assert trainer.config.dtype == "float32" and trainer.config.model == str(model_dir)
    result = trainer.train()
    assert result.steps == 3 and isinstance(trainer.model, torch.nn.Module)


def test_a_model_in_memory_keeps_its_dtype(tmp_path):
    model = tiny_model().to(torch.bfloat16)
    trainer = GRPOTrainer(model=model, reward_funcs=emits_target, train_dataset=toy_prompts(4),
                          args=dict(output_dir=str(tmp_path / "out"), bf16=True, **ONLINE))
    assert trainer.config.dtype == "bfloat16" and trainer.config.bf16 is False  # no autocast over bf16 weights


class Recorder(TrainerCallback):
    def __init__(self):
        self.calls = []

    def on_step_end(self, run, step):
        self.calls.append(("step", step))

    def on_log(self, run, step, record):
        self.calls.append(("log", step, record["step"]))

    def on_save(self, run, step, path):
        self.calls.append(("save", step, path.name))

    def on_train_end(self, run, result):
        self.calls.append(("end", result.steps))


def test_callbacks_are_called_with_the_right_steps(tmp_path, one_thread):
    from transformers import TrainerCallback as HFCallback

    class HF(HFCallback):
        seen: list = []

        def on_step_end(self, args, state, control, **kwargs):
            HF.seen.append(("step", state.global_step, state.max_steps))

        def on_log(self, args, state, control, logs=None, **kwargs):
            HF.seen.append(("log", state.global_step, logs["step"]))

        def on_save(self, args, state, control, **kwargs):
            HF.seen.append(("save", state.global_step))

    mine = Recorder()
    trainer = GRPOTrainer(model=tiny_model(), reward_funcs=emits_target, train_dataset=toy_prompts(8),
                          args=dict(output_dir=str(tmp_path / "out"), batch_size=2, logging_steps=2, save_steps=2,
                                    **{**ONLINE, "max_steps": 4}),
                          callbacks=[mine, HF])
    trainer.train()
    assert mine.calls == [("step", 1), ("step", 2), ("log", 2, 2), ("save", 2, "step-00000002"), ("step", 3),
                          ("step", 4), ("log", 4, 4), ("save", 4, "step-00000004"), ("end", 4)]
    assert HF.seen == [("step", 1, 4), ("step", 2, 4), ("log", 2, 2), ("save", 2), ("step", 3, 4), ("step", 4, 4),
                       ("log", 4, 4), ("save", 4)]


def test_a_step_end_callback_adds_metrics_and_logs_its_step(tmp_path, one_thread):
    class Extra(TrainerCallback):
        def on_step_end(self, run, step):
            return {"custom/step_squared": float(step * step)} if step == 3 else None

    trainer = GRPOTrainer(model=tiny_model(), reward_funcs=emits_target, train_dataset=toy_prompts(8),
                          args=dict(output_dir=str(tmp_path / "out"), batch_size=2, logging_steps=10, **ONLINE),
                          callbacks=[Extra()])
    history = trainer.train().history
    assert [r["step"] for r in history] == [3] and history[0]["custom/step_squared"] == 9.0


# ---------------------------------------------------------------------------------------------- evaluation

def verifier(prompt_ids, completion_ids, ok=None, **columns) -> float:
    """1 on the held-out rows marked ok, 0 elsewhere: the pass rate is known in advance."""
    return 1.0 if ok else 0.0


def test_evaluation_metrics_are_logged_at_the_right_steps(tmp_path, one_thread):
    held_out = [{"prompt": [9, 10, 11], "ok": True}, {"prompt": [12, 13], "ok": False},
                {"prompt": [14, 15, 16], "ok": True}]
    trainer = GRPOTrainer(model=tiny_model(), reward_funcs=verifier, train_dataset=toy_prompts(8),
                          eval_dataset=held_out,
                          args=dict(output_dir=str(tmp_path / "out"), batch_size=2, eval_steps=2, logging_steps=1,
                                    eval_num_generations=2, **{**ONLINE, "max_steps": 5}))
    history = trainer.train().history
    evaluated = [r["step"] for r in history if "eval/pass_rate" in r]
    assert evaluated == [2, 4, 5]  # every eval_steps, and the last step
    for r in history:
        if "eval/pass_rate" in r:
            assert r["eval/pass_rate"] == pytest.approx(2 / 3) and r["eval/reward_mean"] == pytest.approx(2 / 3)
            assert r["eval/prompts"] == 3.0 and r["eval/reward/verifier/mean"] == pytest.approx(2 / 3)
            assert 1 <= r["eval/mean_length"] <= 4


def test_evaluation_does_not_change_the_training_run(tmp_path, one_thread):
    def run(eval_dataset, out):
        model = tiny_model()
        GRPOTrainer(model=model, reward_funcs=emits_target, train_dataset=toy_prompts(8), eval_dataset=eval_dataset,
                    args=dict(output_dir=str(tmp_path / out), batch_size=2, eval_every=1, **ONLINE)).train()
        return weights(model)

    plain, evaluated = run(None, "plain"), run(toy_prompts(3, seed=5), "evaluated")
    assert all(torch.equal(plain[k], evaluated[k]) for k in plain)


def test_online_dpo_trainer_evaluates_too(tmp_path, one_thread):
    trainer = OnlineDPOTrainer(model=tiny_model(), reward_funcs=emits_target, train_dataset=toy_prompts(8),
                               eval_dataset=toy_prompts(2, seed=3),
                               args=dict(output_dir=str(tmp_path / "out"), batch_size=2, **{**ONLINE,
                                                                                            "max_steps": 2}))
    history = trainer.train().history
    assert "eval/reward_mean" not in history[0] and "eval/reward_mean" in history[-1]


# ---------------------------------------------------------------------------------------------- DPO

def test_dpo_trainer_from_a_datasets_table(tmp_path, one_thread):
    datasets = pytest.importorskip("datasets")
    model = tiny_model()
    table = datasets.Dataset.from_list(toy_pairs(16))
    trainer = DPOTrainer(model=model, train_dataset=table,
                         args=dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=4,
                                   learning_rate=3e-3, lr_scheduler_type="constant", progress=False))
    assert trainer.config.batch_size == 8  # TRL's DPO batch counts pairs, as fastrl's
    history = trainer.train().history
    assert len(history) == 4 and history[-1]["loss"] < history[0]["loss"]


def test_dpo_trainer_with_a_reference_model_in_memory(tmp_path, one_thread):
    model, reference = tiny_model(0), tiny_model(1)
    trainer = DPOTrainer(model=model, ref_model=reference, train_dataset=toy_pairs(8),
                         args=dict(output_dir=str(tmp_path / "out"), batch_size=4, max_steps=1, progress=False,
                                   precompute_ref_log_probs=False))
    assert trainer.config.reference_model is reference and trainer.config.reference == "live"
    assert trainer.train().steps == 1


def test_dpo_trainer_refuses_an_eval_dataset(tmp_path):
    with pytest.raises(ConfigError, match=r"DPOConfig\.eval_data: fastrl's offline DPO has no held-out evaluation"):
        DPOTrainer(model=tiny_model(), train_dataset=toy_pairs(4), eval_dataset=toy_pairs(2),
                   args=dict(output_dir=str(tmp_path / "out")))


# ---------------------------------------------------------------------------------------------- args

def test_args_dict_with_an_unknown_name_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"GRPOConfig: unknown field 'num_generation' \(did you mean "
                                          r"'num_generations'\?\)"):
        GRPOTrainer(model=tiny_model(), reward_funcs=emits_target, train_dataset=toy_prompts(4),
                    args=dict(output_dir=str(tmp_path / "out"), num_generation=4))


def test_a_hub_id_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"GRPOConfig\.model: 'Qwen/Qwen2-0.5B' is not a local directory \(models "
                                          r"are never downloaded\)"):
        GRPOTrainer(model="Qwen/Qwen2-0.5B", reward_funcs=emits_target, train_dataset=toy_prompts(4),
                    args=dict(output_dir=str(tmp_path / "out")))


def test_a_fastrl_config_as_args(tmp_path, one_thread):
    from fastrl.train import GRPOConfig

    args = GRPOConfig(model_config=dict(TINY["qwen2"]), train_data=toy_prompts(8), reward_funcs=[emits_target],
                      output_dir=str(tmp_path / "out"), batch_size=2, **{**ONLINE, "max_steps": 1})
    model = tiny_model()
    trainer = GRPOTrainer(model=model, reward_funcs=None, args=args)
    assert trainer.config.model is model and trainer.config.model_config is None  # the trainer's model wins
    assert trainer.train().steps == 1
    with pytest.raises(TypeError, match="DPOTrainer: args is a GRPOConfig; give a DPOConfig"):
        DPOTrainer(model=model, args=args)


def test_args_as_a_trl_grpo_config(tmp_path, one_thread):
    trl = pytest.importorskip("trl")
    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                          max_completion_length=4, max_steps=2, bf16=False, gradient_checkpointing=False,
                          learning_rate=1e-2, report_to="none", disable_tqdm=True, logging_steps=1, beta=0.04)
    trainer = GRPOTrainer(model=tiny_model(), reward_funcs=emits_target, args=args, train_dataset=toy_prompts(8))
    c = trainer.config
    # TRL's values, its defaults included, with TRL's meaning
    assert (c.batch_size, c.num_generations, c.learning_rate, c.seed, c.beta, c.loss_type, c.epsilon) == \
        (2, 4, 1e-2, 42, 0.04, "dapo", 0.2)
    assert (c.use_bias_correction_kl, c.advantage_scale, c.log_completions, c.num_epochs, c.progress) == \
        (True, "group", 0, 3, False)
    assert (c.lr_scheduler, c.optimizer, c.max_steps, c.log_every, c.save_every, c.output_dir) == \
        ("linear", "adamw", 2, 1, 500, str(tmp_path / "out"))
    assert trainer.train().steps == 2


def test_a_trl_config_with_settings_fastrl_lacks_is_refused(tmp_path):
    trl = pytest.importorskip("trl")
    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), bf16=False, repetition_penalty=1.1, sync_ref_model=True)
    with pytest.raises(ConfigError, match=r"GRPOConfig \(from trl\.GRPOConfig\): fastrl has no equivalent of "
                                          r"repetition_penalty=1\.1, sync_ref_model=True"):
        GRPOTrainer(model=tiny_model(), reward_funcs=emits_target, args=args, train_dataset=toy_prompts(4))
    per_device = trl.GRPOConfig(output_dir=str(tmp_path / "out"), bf16=False, per_device_train_batch_size=4,
                                num_generations=4, gradient_accumulation_steps=2)
    assert GRPOTrainer(model=tiny_model(), reward_funcs=emits_target, args=per_device,
                       train_dataset=toy_prompts(4)).config.batch_size == 1


def test_args_as_a_trl_dpo_config(tmp_path):
    trl = pytest.importorskip("trl")
    args = trl.DPOConfig(output_dir=str(tmp_path / "out"), bf16=False, beta=0.2, loss_type=["ipo"],
                         per_device_train_batch_size=4)
    c = DPOTrainer(model=tiny_model(), args=args, train_dataset=toy_pairs(8)).config
    assert (c.beta, c.loss_type, c.batch_size, c.reference, c.f_alpha) == (0.2, ["ipo"], 4, "live", 0.5)


def test_peft_config_from_a_lora_config(tmp_path, one_thread):
    peft = pytest.importorskip("peft")
    model = tiny_model()
    base = weights(model)
    trainer = GRPOTrainer(model=model, reward_funcs=emits_target, train_dataset=toy_prompts(8),
                          peft_config=peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                          args=dict(output_dir=str(tmp_path / "out"), batch_size=2, **{**ONLINE, "max_steps": 2}))
    fields = trainer.config.peft_config
    assert fields["r"] == 4 and fields["lora_alpha"] == 16 and sorted(fields["target_modules"]) == ["q_proj", "v_proj"]
    json.dumps(trainer.config.to_dict())  # plain data: it goes to the checkpoint as JSON
    trainer.train()
    assert isinstance(trainer.model, peft.PeftModel)
    for name, value in trainer.model.get_base_model().state_dict().items():  # the base stays frozen
        if "lora_" not in name:
            assert torch.equal(value, base[name.replace(".base_layer", "")]), name
    assert any(v.abs().sum() > 0 for k, v in trainer.model.state_dict().items() if "lora_B" in k)  # trained
    trainer.save_model(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_bad_held_out_data_names_eval_data(tmp_path):
    from fastrl.train import DataError

    trainer = GRPOTrainer(model=tiny_model(), reward_funcs=emits_target, train_dataset=toy_prompts(4),
                          eval_dataset=[{"prompt": [9, 10]}, {"question": [9]}],
                          args=dict(output_dir=str(tmp_path / "out"), batch_size=2, **ONLINE))
    with pytest.raises(DataError, match=r"eval_data \(a list of 2 rows\).*row 2 \(1-based\)"):
        trainer.train()


def test_a_trl_config_with_vllm_selects_fastrls_vllm_engine():
    trl = pytest.importorskip("trl")
    from fastrl.train import GRPOConfig
    from fastrl.train.trainers import config_from_trl

    fields = config_from_trl(trl.GRPOConfig(output_dir="out", bf16=False, use_vllm=True,
                                            vllm_gpu_memory_utilization=0.5), GRPOConfig)
    assert fields["rollout_engine"] == "vllm" and fields["vllm_gpu_memory_utilization"] == 0.5
    assert (fields["vllm_importance_sampling_mode"], fields["vllm_importance_sampling_clip_max"]) == \
        ("sequence_mask", 3.0)  # TRL's correction of vLLM's sampling, as TRL applies it
    assert "vllm_importance_sampling_mode" not in config_from_trl(trl.GRPOConfig(output_dir="out", bf16=False),
                                                                  GRPOConfig)
    with pytest.raises(ConfigError, match=r"vllm_mode: 'server': fastrl runs vLLM colocated only"):
        config_from_trl(trl.GRPOConfig(output_dir="out", bf16=False, use_vllm=True, vllm_mode="server"), GRPOConfig)


def test_train_takes_callbacks_for_every_method(tmp_path, one_thread):
    from fastrl.train import SFTConfig, train

    rows = [{"prompt": [10 + i, 11], "completion": [1, 2, 3]} for i in range(8)]
    recorder = Recorder()
    train(SFTConfig(model=tiny_model(), train_data=rows, output_dir=str(tmp_path / "out"), batch_size=4,
                    max_steps=2, progress=False), callbacks=[recorder])
    assert recorder.calls == [("step", 1), ("log", 1, 1), ("step", 2), ("log", 2, 2), ("save", 2, "step-00000002"),
                              ("end", 2)]


def test_args_as_trls_online_dpo_config(tmp_path):
    online = pytest.importorskip("trl.experimental.online_dpo")
    args = online.OnlineDPOConfig(output_dir=str(tmp_path / "out"), bf16=False, per_device_train_batch_size=4,
                                  max_new_tokens=6, beta=[0.2], loss_type="ipo")
    c = OnlineDPOTrainer(model=tiny_model(), reward_funcs=emits_target, args=args,
                         train_dataset=toy_prompts(8)).config
    # TRL's online DPO counts prompts, generates max_new_tokens, and takes one beta per epoch (one here)
    assert (c.batch_size, c.max_completion_length, c.beta, c.loss_type, c.temperature) == (4, 6, 0.2, ["ipo"], 0.9)
    with pytest.raises(ConfigError, match=r"fastrl has no equivalent of beta=\[0\.1, 0\.2\]"):
        OnlineDPOTrainer(model=tiny_model(), reward_funcs=emits_target, train_dataset=toy_prompts(8),
                         args=online.OnlineDPOConfig(output_dir=str(tmp_path / "out"), bf16=False, beta=[0.1, 0.2]))
