"""Helpers of the trainer tests: tiny random models, toy preference data, a local tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from fastrl.train import DPOConfig

TINY = {
    "qwen2": {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 128},
    "llama": {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 128},
}
PATTERN = [1, 2, 3, 4]  # every chosen completion; rejected ones are random tokens


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toy_pairs(n: int = 64, seed: int = 0, vocab: int = 64) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": [rng.randrange(8, vocab) for _ in range(rng.randint(3, 8))],
             "chosen": PATTERN[:rng.randint(3, 4)],
             "rejected": [rng.randrange(8, vocab) for _ in range(rng.randint(2, 6))]} for _ in range(n)]


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", toy_pairs())


def dpo_config(data: Path, out: Path, *, model: str = "qwen2", **overrides) -> DPOConfig:
    fields = dict(model_config=dict(TINY[model]), train_data=str(data), output_dir=str(out), batch_size=8,
                  max_steps=4, learning_rate=3e-3, lr_scheduler="constant", progress=False, seed=0)
    fields.update(overrides)
    return DPOConfig(**fields)


def state(policy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.model.state_dict().items()}


def make_tokenizer(path: Path, *, chat_template: bool = True) -> Path:
    """A word-level tokenizer saved as a local Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<eos>", "<bos>", "<|user|>", "<|assistant|>", "<|end|>"]
    words = special + ["hello", "world", "good", "bad", "answer", "the", "is", "a", "question"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>")
    if chat_template:
        fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                              "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    fast.save_pretrained(path)
    return path


# ---- online methods (GRPO, online DPO) and SFT

TARGET = 7  # the toy verifiable task: emit token 7


def toy_prompts(n: int = 32, seed: int = 0, vocab: int = 64) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": [rng.randrange(8, vocab) for _ in range(rng.randint(3, 6))], "target": TARGET}
            for _ in range(n)]


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", toy_prompts())


def emits_target(prompt_ids, completion_ids, target=TARGET, **columns) -> float:
    """Fraction of completion tokens equal to the row's target."""
    return sum(t == target for t in completion_ids) / len(completion_ids)


def online_fields(data: Path, out: Path, *, model: str = "qwen2", **overrides) -> dict:
    fields = dict(model_config=dict(TINY[model]), train_data=str(data), output_dir=str(out), batch_size=4,
                  num_generations=8, max_completion_length=8, max_steps=4, learning_rate=2e-2,
                  lr_scheduler="constant", progress=False, seed=0, reward_funcs=[emits_target], log_completions=1)
    fields.update(overrides)
    return fields


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP's waiting threads
    slow them by 10x: the online-method tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
