"""fastrl.train.data: local files through datasets, tokenisation, errors naming the row and column."""

from __future__ import annotations

import pytest

from fastrl.train import DataError
from fastrl.train.data import load_preference_pairs, load_prompts
from fastrl.train.run import BatchOrder

from .conftest import dpo_config, make_tokenizer, toy_pairs, write_jsonl


def _load(tmp_path, rows, tokenizer=None, **overrides):
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    return load_preference_pairs(dpo_config(data, tmp_path / "out", **overrides), tokenizer, 64)


def test_token_id_pairs_load_as_given(tmp_path):
    rows = toy_pairs(5)
    pairs = _load(tmp_path, rows)
    assert len(pairs) == 5
    assert pairs.prompts == [r["prompt"] for r in rows] and pairs.rejected == [r["rejected"] for r in rows]


def test_parquet(tmp_path):
    import datasets

    rows = toy_pairs(4)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    pairs = load_preference_pairs(dpo_config(tmp_path / "d.parquet", tmp_path / "out"), None, 64)
    assert pairs.chosen == [r["chosen"] for r in rows]


def test_missing_column_is_named(tmp_path):
    rows = [{"prompt": [5], "chosen": [1]}]
    with pytest.raises(DataError, match="column 'rejected' is missing"):
        _load(tmp_path, rows)
    with pytest.raises(DataError, match="column 'better' is missing"):
        _load(tmp_path, rows, chosen_column="better")


def test_empty_completion_names_row_and_column(tmp_path):
    rows = toy_pairs(4)
    rows[2]["rejected"] = []
    with pytest.raises(DataError, match=r"row 2, column 'rejected': the completion is empty"):
        _load(tmp_path, rows)


def test_long_prompt_is_an_error_or_cut_from_the_left(tmp_path):
    rows = toy_pairs(4)
    rows[3]["prompt"] = list(range(10, 30))
    with pytest.raises(DataError, match=r"row 3, column 'prompt': the prompt has 20 tokens, more than "
                                        r"max_prompt_length=8"):
        _load(tmp_path, rows, max_prompt_length=8)
    pairs = _load(tmp_path, rows, max_prompt_length=8, prompt_truncation="left")
    assert pairs.prompts[3] == list(range(22, 30))


def test_long_completions_are_cut_and_counted(tmp_path):
    rows = toy_pairs(4)
    rows[0]["rejected"] = list(range(10, 40))
    pairs = _load(tmp_path, rows, max_completion_length=6)  # the other completions hold <= 6 tokens
    assert pairs.rejected[0] == list(range(10, 16)) and pairs.truncated_completions == 1


def test_bad_cells_name_row_and_column(tmp_path):
    rows = toy_pairs(3)
    rows[1]["chosen"] = [1, 99]
    with pytest.raises(DataError, match=r"row 1, column 'chosen': token id 99 is outside the vocabulary \[0, 64\)"):
        _load(tmp_path, rows)
    rows = toy_pairs(3)
    rows[0]["prompt"] = "text without a tokenizer"
    with pytest.raises(DataError, match=r"row 0, column 'prompt': text needs a tokenizer"):
        _load(tmp_path, rows)
    rows = toy_pairs(3)
    rows[2]["prompt"] = []
    with pytest.raises(DataError, match=r"row 2, column 'prompt': the prompt is empty"):
        _load(tmp_path, rows)


def test_text_with_chat_template(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok"), local_files_only=True)
    vocab = {w: tok.convert_tokens_to_ids(w) for w in ("<|user|>", "<|assistant|>", "<|end|>", "hello", "world",
                                                       "good", "bad", "answer")}
    rows = [{"prompt": "hello world", "chosen": "good answer", "rejected": "bad"},
            {"prompt": [{"role": "user", "content": "hello"}],
             "chosen": [{"role": "assistant", "content": "good"}], "rejected": "bad answer"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    pairs = load_preference_pairs(dpo_config(data, tmp_path / "out"), tok, len(tok))
    v = vocab
    assert pairs.prompts[0] == [v["<|user|>"], v["hello"], v["world"], v["<|end|>"], v["<|assistant|>"]]
    # the template ends the assistant turn with <|end|>
    assert pairs.chosen[0] == [v["good"], v["answer"], v["<|end|>"]]
    assert pairs.rejected[1] == [v["bad"], v["answer"], v["<|end|>"]]
    assert pairs.prompts[1] == [v["<|user|>"], v["hello"], v["<|end|>"], v["<|assistant|>"]]
    # without the template: plain text, completions end with EOS; chat messages need the template
    config = dpo_config(data, tmp_path / "out", chat_template=False)
    with pytest.raises(DataError, match=r"row 1, column 'prompt': chat messages need a tokenizer with a chat template"):
        load_preference_pairs(config, tok, len(tok))
    write_jsonl(data, rows[:1])
    plain = load_preference_pairs(config, tok, len(tok))
    assert plain.prompts[0] == [v["hello"], v["world"]]
    assert plain.chosen[0] == [v["good"], v["answer"], tok.eos_token_id]


def test_prompts_keep_their_other_columns(tmp_path):
    from fastrl.train import GRPOConfig

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": [5, 6], "answer": "7"}, {"prompt": [8], "answer": "9"}])
    config = GRPOConfig(model_config={"model_type": "qwen2"}, train_data=str(data), reward_funcs=["m:f"])
    prompts = load_prompts(config, None, 64)
    assert prompts.prompts == [[5, 6], [8]] and prompts.rows[1]["answer"] == "9"


def test_batch_order_splits_processes_and_reshuffles_each_epoch():
    one = BatchOrder(10, batch_size=4, world_size=1, rank=0, seed=3, shuffle=True)
    ranks = [BatchOrder(10, batch_size=2, world_size=2, rank=r, seed=3, shuffle=True) for r in range(2)]
    for _ in range(5):  # two per epoch, the tail of 2 dropped
        assert one.next() == ranks[0].next() + ranks[1].next()
    assert one.epoch == 2
    first = BatchOrder(10, batch_size=4, world_size=1, rank=0, seed=3, shuffle=True)
    epoch0 = first.next() + first.next()
    epoch1 = first.next() + first.next()
    assert sorted(epoch0) != sorted(epoch1) or epoch0 != epoch1
    resumed = BatchOrder(10, batch_size=4, world_size=1, rank=0, seed=3, shuffle=True)
    resumed.load_state_dict(first.state_dict())
    assert resumed.next() == first.next()
