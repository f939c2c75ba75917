"""fastrl.train.data: local files through datasets, tokenisation, errors naming the row and column."""

from __future__ import annotations

import json

import pytest

from fastrl.train import DataError
from fastrl.train.data import load_preference_pairs, load_prompts, load_table
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
    with pytest.raises(DataError, match=r"d\.jsonl\) line 3, column 'rejected': the completion is empty"):
        _load(tmp_path, rows)


def test_long_prompt_is_an_error_or_cut_from_the_left(tmp_path):
    rows = toy_pairs(4)
    rows[3]["prompt"] = list(range(10, 30))
    with pytest.raises(DataError, match=r"line 4, column 'prompt': the prompt has 20 tokens, more than "
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
    with pytest.raises(DataError, match=r"line 2, column 'chosen': token id 99 is outside the vocabulary \[0, 64\)"):
        _load(tmp_path, rows)
    rows = toy_pairs(3)
    rows[0]["prompt"] = "text without a tokenizer"
    with pytest.raises(DataError, match=r"line 1, column 'prompt': text needs a tokenizer"):
        _load(tmp_path, rows)
    rows = toy_pairs(3)
    rows[2]["prompt"] = []
    with pytest.raises(DataError, match=r"line 3, column 'prompt': the prompt is empty"):
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
    with pytest.raises(DataError, match=r"line 2, column 'prompt': chat messages need a tokenizer with a chat "
                                        r"template"):
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


# ---- fastrl's own JSON reading: lines named 1-based, its own messages

def test_rows_are_named_by_their_file_line(tmp_path):
    rows = toy_pairs(3)
    rows[2]["rejected"] = []
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n   \n" + json.dumps(rows[2]) + "\n")
    with pytest.raises(DataError, match=r"^train_data \(.*d\.jsonl\) line 5, column 'rejected': the completion is "
                                        r"empty$"):
        load_preference_pairs(dpo_config(data, tmp_path / "out"), None, 64)
    assert load_preference_pairs(dpo_config(data, tmp_path / "out"), None, 64, table=rows[:2]).lines == \
        ["train_data (a list of 2 rows) row 1 (1-based)", "train_data (a list of 2 rows) row 2 (1-based)"]


@pytest.mark.parametrize("text, message", [
    ("", r"d\.jsonl\): the file is empty \(no rows\)$"),
    ("\n  \n", r"d\.jsonl\): the file is empty \(no rows\)$"),
    ('{"prompt": [5], "chosen": [1], "rejected": [2]}\n{"prompt": [5], "chosen": [1] "rejected": [2]}\n',
     r"d\.jsonl\): line 2: not valid JSON \(Expecting ',' delimiter: column 31\)$"),
    ('{"prompt": [5], "chosen": [1], "rejected": [2]}\n\n[1, 2]\n',
     r"d\.jsonl\): line 3: a row must be a JSON object, got list$"),
    ('{"prompt": [5], "chosen": [1], "rejected": [2]}\n{"prompt": [5], "chosen": [1]}\n',
     r"d\.jsonl\) line 2: no column 'rejected' \(this row has \['prompt', 'chosen'\]\)$"),
])
def test_unreadable_json_lines_get_fastrls_message(tmp_path, text, message):
    data = tmp_path / "d.jsonl"
    data.write_text(text)
    with pytest.raises(DataError, match=r"^train_data \(.*" + message):
        load_preference_pairs(dpo_config(data, tmp_path / "out"), None, 64)


def test_json_arrays_columns_directories_and_parquet(tmp_path):
    import datasets

    rows = toy_pairs(4)
    rows[1]["chosen"] = [1, 99]
    array = tmp_path / "a.json"
    array.write_text(json.dumps(rows, indent=1))
    with pytest.raises(DataError, match=r"a\.json\) row 2 \(1-based\), column 'chosen': token id 99"):
        load_preference_pairs(dpo_config(array, tmp_path / "out"), None, 64)
    array.write_text("[\n" + json.dumps(rows[0]) + ",\n" + json.dumps(rows[2]) + "\n")
    with pytest.raises(DataError, match=r"a\.json\): line 4: not valid JSON \(Expecting ',' delimiter"):
        load_preference_pairs(dpo_config(array, tmp_path / "out"), None, 64)
    columns = tmp_path / "c.json"
    columns.write_text(json.dumps({k: [r[k] for r in rows[2:]] for k in rows[0]}))
    by_column = load_preference_pairs(dpo_config(columns, tmp_path / "out"), None, 64)
    assert by_column.chosen == [r["chosen"] for r in rows[2:]]
    folder = tmp_path / "dir"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", rows[2:])
    write_jsonl(folder / "b.jsonl", rows[:2])
    with pytest.raises(DataError, match=r"^train_data \(.*dir\) b\.jsonl line 2, column 'chosen': token id 99"):
        load_preference_pairs(dpo_config(folder, tmp_path / "out"), None, 64)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"d\.parquet\) row 2 \(1-based\), column 'chosen': token id 99"):
        load_preference_pairs(dpo_config(tmp_path / "d.parquet", tmp_path / "out"), None, 64)
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet\): the file cannot be read as Parquet: "):
        load_preference_pairs(dpo_config(tmp_path / "bad.parquet", tmp_path / "out"), None, 64)
    with pytest.raises(DataError, match=r"^eval_data \(.*nowhere\.jsonl\): no such file or directory"):
        load_table(str(tmp_path / "nowhere.jsonl"), ["prompt"], field="eval_data")


def test_in_memory_tables(tmp_path):
    import datasets

    from fastrl.train import GRPOConfig
    from fastrl.train.sft import load_sft_examples

    from .test_sft import sft_config

    rows = toy_pairs(3)
    config = dpo_config(write_jsonl(tmp_path / "unused.jsonl", toy_pairs(5)), tmp_path / "out")
    for table in (rows, datasets.Dataset.from_list(rows)):
        pairs = load_preference_pairs(config, None, 64, table=table)
        assert len(pairs) == 3 and pairs.chosen == [r["chosen"] for r in rows]
    bad = [dict(r) for r in rows]
    bad[1]["prompt"] = []
    with pytest.raises(DataError, match=r"^train_data \(a datasets\.Dataset\) row 2 \(1-based\), column 'prompt': "
                                        r"the prompt is empty"):
        load_preference_pairs(config, None, 64, table=datasets.Dataset.from_list(bad))
    with pytest.raises(DataError, match=r"^train_data \(a list of 2 rows\) row 2 \(1-based\): a row must be a dict"):
        load_preference_pairs(config, None, 64, table=[rows[0], "text"])
    with pytest.raises(DataError, match=r"^train_data: must be a file or directory path, a datasets\.Dataset or a "
                                        r"list of dicts, got int"):
        load_preference_pairs(config, None, 64, table=3)
    grpo = GRPOConfig(model_config={"model_type": "qwen2"}, train_data=str(tmp_path / "unused.jsonl"),
                      reward_funcs=["m:f"])
    prompts = load_prompts(grpo, None, 64, table=[{"prompt": [5, 6], "answer": "7"}, {"prompt": [8]}])
    assert prompts.rows == [{"prompt": [5, 6], "answer": "7"}, {"prompt": [8]}]  # a key absent stays absent
    assert prompts.columns == ["prompt", "answer"]
    assert prompts.where(1) == "train_data (a list of 2 rows) row 2 (1-based)"
    sft = load_sft_examples(sft_config(tmp_path / "unused.jsonl", tmp_path / "sft"), None, 64,
                            table=[{"prompt": [1, 2], "completion": [3]}])
    assert sft.completions == [[3]] and sft.lines == ["train_data (a list of 1 rows) row 1 (1-based)"]


def test_prompts_name_lines_and_keep_missing_keys_missing(tmp_path):
    from fastrl.train import GRPOConfig

    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": [5, 6], "answer": "7"}\n\n{"prompt": [8], "answer": null}\n{"prompt": [9]}\n')
    config = GRPOConfig(model_config={"model_type": "qwen2"}, train_data=str(data), reward_funcs=["m:f"],
                        allow_missing_columns=True)
    prompts = load_prompts(config, None, 64)
    assert prompts.rows[1] == {"prompt": [8], "answer": None} and prompts.rows[2] == {"prompt": [9]}
    assert prompts.where(2) == f"train_data ({data}) line 4" and prompts.allow_missing_columns
    held_out = load_prompts(config, None, 64, table=str(data), field="eval_data")
    assert held_out.where(0) == f"eval_data ({data}) line 1"


def test_line_separators_inside_json_strings_do_not_split_a_line(tmp_path):
    from fastrl.train import GRPOConfig

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": [5], "note": "a\u2028b\u0085c"}, ensure_ascii=False) + "\r\n"
                    + json.dumps({"prompt": [6]}) + "\n", encoding="utf-8")
    config = GRPOConfig(model_config={"model_type": "qwen2"}, train_data=str(data), reward_funcs=["m:f"])
    prompts = load_prompts(config, None, 64)
    assert prompts.rows[0]["note"] == "a\u2028b\u0085c" and prompts.where(1) == f"train_data ({data}) line 2"
