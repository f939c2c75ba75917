"""Synthetic SFT data: perfect and flawed canvases, plans, sequences, reward-model inputs, pairs."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from fastrl.tasks.t2i import (CORRUPTIONS, Vocab, make_prompt_sets, parse_prompt, perfect_canvas, plan_for,
                              plan_matches_canvas, preference_pair, reward_model_ids, score_canvas, score_completion,
                              sft_examples)

VOCAB = Vocab()


@pytest.fixture(scope="module")
def sets():
    return make_prompt_sets(seed=0)


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.7, 1.0])
def test_perfect_fraction_and_scores(sets, rate):
    examples = sft_examples(sets.train, VOCAB, perfect_rate=rate, samples_per_prompt=3, seed=1)
    assert len(examples) == 3 * len(sets.train)
    fraction = sum(e.perfect for e in examples) / len(examples)
    assert abs(fraction - rate) < 0.05
    for e in examples:
        s = score_canvas(e.prompt, e.canvas)
        assert (s.reward == 1.0 and s.passed) if e.perfect else (s.reward < 1.0 and not s.passed)
        assert score_completion(e.prompt, e.completion_ids, VOCAB).reward == s.reward


def test_every_corruption_occurs(sets):
    examples = sft_examples(sets.train + sets.ood, VOCAB, perfect_rate=0.0, samples_per_prompt=2, seed=0)
    assert set(Counter(e.corruption for e in examples)) == set(CORRUPTIONS)


def test_ood_prompts_get_canvases_too(sets):
    for e in sft_examples(sets.ood, VOCAB, perfect_rate=0.5, seed=0):
        assert score_canvas(e.prompt, e.canvas).passed is e.perfect


def test_sequences(sets):
    for e in sft_examples(sets.train[:50], VOCAB, seed=0):
        tokens = e.tokens
        assert tokens[0] == VOCAB.bos_id and tokens[e.completion_start - 1] == VOCAB.sep_id
        assert tokens[-1] == VOCAB.eos_id
        assert VOCAB.decode_prompt(tokens) == e.prompt.text
        completion = tokens[e.completion_start:]
        assert len(completion) == 36 + 1 and all(VOCAB.is_image(t) for t in completion[:-1])


def test_cot_plans_are_consistent_with_their_canvases(sets):
    for e in sft_examples(sets.train + sets.ood, VOCAB, perfect_rate=0.5, cot=True, seed=2):
        assert e.completion_ids[0] == VOCAB.plan_id
        read = VOCAB.decode_completion(e.completion_ids)
        assert not read.malformed and read.canvas == e.canvas
        assert read.plan == plan_for(e.prompt, e.canvas)
        assert plan_matches_canvas(read.plan, e.canvas)


def test_plan_order_follows_the_prompt():
    spec = parse_prompt("a blue square left of a red circle")
    canvas = perfect_canvas(spec, random.Random(0))
    plan = plan_for(spec, canvas)
    assert [(p.colour, p.shape) for p in plan] == [("blue", "square"), ("red", "circle")]
    assert not plan_matches_canvas(plan[:1], canvas)


def test_deterministic_for_a_seed(sets):
    a = sft_examples(sets.train[:40], VOCAB, cot=True, seed=5)
    b = sft_examples(sets.train[:40], VOCAB, cot=True, seed=5)
    assert [e.tokens for e in a] == [e.tokens for e in b]
    assert [e.tokens for e in sft_examples(sets.train[:40], VOCAB, cot=True, seed=6)] != [e.tokens for e in a]


def test_reward_model_ids_have_a_fixed_canvas_length(sets):
    e = sft_examples(sets.train[:1], VOCAB, cot=True, seed=0)[0]
    ids = reward_model_ids(VOCAB, e.prompt_ids, e.completion_ids)
    assert ids == [*e.prompt_ids, *VOCAB.encode_completion(e.canvas)]  # the plan is dropped
    junk = reward_model_ids(VOCAB, e.prompt_ids, [VOCAB.id("red")] * 3)
    assert len(junk) == len(ids) and junk[-1] == VOCAB.eos_id


def test_preference_pair():
    assert preference_pair([0.2, 0.9, 0.1, 0.9]) == (1, 2)
    assert preference_pair([0.5, 0.5]) is None
    assert preference_pair([0.5, 0.6], min_gap=0.2) is None
    assert preference_pair([1.0]) is None
