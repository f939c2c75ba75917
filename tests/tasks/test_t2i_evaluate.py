"""Evaluation of a generator on a split, and the paper-style table."""

from __future__ import annotations

import json
import random

import pytest
import torch

from fastrl.tasks.t2i import (OOD_CATEGORIES, Vocab, evaluate, make_prompt_sets, markdown_table, parse_prompt,
                              perfect_canvas, results_table)

VOCAB = Vocab()


@pytest.fixture(scope="module")
def sets():
    return make_prompt_sets(seed=0, in_domain_per_category=12, ood_per_category=4)


def oracle(prompts):
    """A perfect generator: reads each prompt back and draws a passing canvas."""
    rng = random.Random(0)
    return [VOCAB.encode_completion(perfect_canvas(parse_prompt(VOCAB.decode_prompt(p)), rng)) for p in prompts]


def blank(prompts):
    return [torch.tensor([VOCAB.empty_id] * 36 + [VOCAB.eos_id]) for _ in prompts]


def garbage(prompts):
    return [[VOCAB.id("red"), 7, -1] for _ in prompts]


def test_oracle_blank_and_garbage(sets):
    good = evaluate(oracle, sets.ood, VOCAB, batch_size=5).summary()
    assert set(good["categories"]) == set(OOD_CATEGORIES)
    assert good["overall"] == {"reward": 1.0, "pass": 1.0, "n": len(sets.ood)}
    assert all(c["pass"] == 1.0 and c["n"] > 0 for c in good["categories"].values())
    assert evaluate(blank, sets.ood, VOCAB).summary()["overall"]["reward"] == 0.0
    bad = evaluate(garbage, sets.test, VOCAB)
    assert bad.summary()["overall"]["pass"] == 0.0
    assert all(r.score.malformed for r in bad.records)


def test_records_keep_canvases_for_rendering(sets):
    result = evaluate(oracle, sets.test, VOCAB)
    assert len(result.records) == len(sets.test)
    assert all(r.canvas.size == 6 and r.canvas.objects() for r in result.records)


def test_generate_must_answer_every_prompt(sets):
    with pytest.raises(ValueError, match="completions"):
        evaluate(lambda ps: ps[:1], sets.test, VOCAB)


def test_table_layout_and_markdown(sets):
    results = {"SFT": {"in_domain": evaluate(blank, sets.test, VOCAB), "ood": evaluate(blank, sets.ood, VOCAB)},
               "GRPO": {"in_domain": evaluate(oracle, sets.test, VOCAB).summary(),
                        "ood": evaluate(oracle, sets.ood, VOCAB).summary()}}
    table = results_table(results, metric="pass")
    json.dumps(table)
    assert [g["key"] for g in table["groups"]] == ["in_domain", "ood"]
    assert table["groups"][0]["columns"] == ["color", "shape", "spatial", "complex", "overall"]
    assert table["groups"][1]["columns"] == [*OOD_CATEGORIES, "overall"]
    assert [r["method"] for r in table["rows"]] == ["SFT", "GRPO"]
    assert table["rows"][1]["ood"]["overall"] == 1.0 and table["rows"][0]["in_domain"]["color"] == 0.0
    md = markdown_table(table)
    lines = md.strip().splitlines()
    assert lines[2].startswith("| Method | color | shape | spatial | complex | ID overall | single_object")
    assert lines[2].endswith("| OOD overall |")
    assert lines[-1].startswith("| GRPO | **1.00** |") and lines[-2].startswith("| SFT | 0.00 |")
    reward_table = results_table(results, metric="reward")
    assert reward_table["rows"][1]["in_domain"]["overall"] == 1.0


def test_table_with_a_missing_split():
    summary = {"categories": {"color": {"reward": 0.5, "pass": 0.25, "n": 4}},
               "overall": {"reward": 0.5, "pass": 0.25, "n": 4}}
    table = results_table({"SFT": {"in_domain": summary}, "DPO": {}})
    assert [g["key"] for g in table["groups"]] == ["in_domain"]
    assert table["rows"][1]["in_domain"] == {"color": None, "overall": None}
    assert "| DPO | – | – |" in markdown_table(table)
