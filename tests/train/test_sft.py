"""fastrl.train.sft: completion-only NLL goes down; the checkpoint loads with from_pretrained; accumulation is exact."""

from __future__ import annotations

import pytest
import torch

from fastrl.train import DataError, SFTConfig, train_sft

from .conftest import TINY, make_tokenizer, state, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

SFT_ROWS = [{"prompt": [8 + i % 40, 9 + i % 30, 10 + i % 20], "completion": [1, 2, 3, 4, (i % 5) + 20]}
            for i in range(32)]


def sft_config(data, out, **overrides) -> SFTConfig:
    fields = dict(model_config=dict(TINY["llama"]), train_data=str(data), output_dir=str(out), batch_size=8,
                  max_steps=12, learning_rate=1e-2, lr_scheduler="constant", progress=False, seed=0)
    fields.update(overrides)
    return SFTConfig(**fields)


def test_sft_lowers_nll_and_saves_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    result = train_sft(sft_config(data, tmp_path / "run"))
    losses = [h["loss"] for h in result.history]
    assert losses[0] > 3.5 and losses[-1] < losses[0] - 1.5, losses
    assert result.checkpoint == tmp_path / "run" / "checkpoints" / "step-00000012"
    loaded = AutoModelForCausalLM.from_pretrained(result.checkpoint, local_files_only=True)
    trained = state(result.policy)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, trained[name]), name
    assert result.history[-1]["completion_tokens"] == 8 * 5  # prompt tokens are not scored


def test_sft_accumulation_matches_one_batch(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    one = train_sft(sft_config(data, tmp_path / "a", max_steps=2, shuffle=False, learning_rate=1e-3))
    two = train_sft(sft_config(data, tmp_path / "b", max_steps=2, shuffle=False, learning_rate=1e-3, batch_size=4,
                               gradient_accumulation_steps=2))
    for a, b in zip(one.history, two.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    for name, value in state(one.policy).items():
        torch.testing.assert_close(value, state(two.policy)[name], rtol=1e-4, atol=2e-6, msg=name)


def test_sft_text_data_and_bad_rows(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tok")
    data = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "hello world", "completion": "good answer"}] * 8)
    result = train_sft(sft_config(data, tmp_path / "run", tokenizer=str(tokenizer), max_steps=1))
    assert result.history[0]["completion_tokens"] > 0
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": [1, 2], "answer": [3]}] * 8)
    with pytest.raises(DataError, match=r"column 'completion' is missing"):
        train_sft(sft_config(missing, tmp_path / "x"))
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": [1, 2], "completion": [3]}] * 3
                        + [{"prompt": [1, 2], "completion": []}])
    with pytest.raises(DataError, match=r"empty\.jsonl\) line 4, column 'completion': the completion is empty"):
        train_sft(sft_config(empty, tmp_path / "x"))
