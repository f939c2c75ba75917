"""The scorer on hand-made canvases: each constraint type passes and fails as it should."""

from __future__ import annotations

import pytest
import torch

from fastrl.tasks.t2i import Canvas, Vocab, canvas_reward, make_reward_fn, parse_prompt, score_canvas, score_completion


def canvas(text: str) -> Canvas:
    return Canvas.from_ascii(text)


def score(prompt: str, text: str):
    return score_canvas(parse_prompt(prompt), canvas(text))


BINDING = "a red circle and a blue square"


def test_colour_binding_passes():
    s = score(BINDING, """
        Rc .. .. ..
        .. .. .. ..
        .. .. Bs ..
        .. .. .. ..""")
    assert s.passed and s.reward == 1.0 and s.clutter == 0
    assert [c.kind for c in s.checks] == ["present", "present"]


def test_colour_binding_swapped_fails():
    s = score(BINDING, """
        Bc .. .. ..
        .. .. .. ..
        .. .. Rs ..
        .. .. .. ..""")
    assert not s.passed and s.reward == 0.0  # neither phrase met, two clutter objects
    assert s.clutter == 2


def test_half_right_with_clutter():
    s = score(BINDING, """
        Rc Rs .. ..
        .. .. .. ..
        .. .. .. ..
        .. .. .. ..""")
    assert not s.passed
    assert s.reward == pytest.approx(0.5 - 0.1)  # red circle yes, blue square no, the red square is clutter


def test_missing_object_and_empty_canvas():
    assert score(BINDING, "Rc ..\n.. ..").reward == 0.5
    empty = score(BINDING, ".. ..\n.. ..")
    assert empty.reward == 0.0 and not empty.passed


def test_colour_free_phrase_matches_any_colour():
    for code in ("Rc", "Gc", "Bc", "Yc"):
        assert score("a circle", f"{code} ..\n.. ..").passed
    s = score("a circle", "Rs ..\n.. ..")
    assert not s.passed and s.clutter == 1


def test_a_phrase_has_no_count_check():
    s = score("a red circle", "Rc Rc\n.. ..")
    assert s.passed and s.reward == 1.0


@pytest.mark.parametrize("cells, passed, reward", [
    ("Gt Gt Gt ..", True, 1.0),
    ("Gt Gt .. ..", False, 0.5),   # off by one (too few): present, count wrong
    ("Gt Gt Gt Gt", False, 0.5),   # off by one (too many)
    (".. .. .. ..", False, 0.0),
    ("Gt Gt Gt Bt", False, 0.9),   # right count, a blue triangle is clutter
])
def test_counting(cells, passed, reward):
    s = score("three green triangles", cells + "\n.. .. .. ..\n.. .. .. ..\n.. .. .. ..")
    assert s.passed is passed
    assert s.reward == pytest.approx(reward)
    assert [c.kind for c in s.checks] == ["present", "count"]


def test_colour_free_count_counts_every_colour():
    assert score("two circles", "Rc Bc\n.. ..").passed
    assert not score("two circles", "Rc Bc\nGc ..").passed


LEFT = "Rc .. Bs\n.. .. ..\n.. .. .."     # red circle at (0, 0), blue square at (0, 2)
UP = "Rc .. ..\n.. .. ..\nBs .. .."       # red circle at (0, 0), blue square at (2, 0)


@pytest.mark.parametrize("relation, grid, holds", [
    ("left of", LEFT, True), ("right of", LEFT, False), ("above", LEFT, False), ("below", LEFT, False),
    ("above", UP, True), ("below", UP, False), ("left of", UP, False), ("right of", UP, False),
])
def test_relations(relation, grid, holds):
    s = score(f"a red circle {relation} a blue square", grid)
    assert [c.kind for c in s.checks] == ["present", "present", "relation"]
    assert s.checks[2].passed is holds and s.passed is holds
    assert s.reward == (1.0 if holds else pytest.approx(2 / 3))


def test_relation_reversed_fails():
    assert score("a red circle left of a blue square", LEFT).passed
    assert not score("a blue square left of a red circle", LEFT).passed
    assert score("a blue square right of a red circle", LEFT).passed


def test_relation_holds_for_some_pair():
    s = score("a red circle left of a blue square", "Rc Bs Rc\n.. .. ..\n.. .. ..")
    assert s.passed  # the left red circle stands left of the square; the right one does not matter


def test_relation_fails_without_its_objects():
    s = score("a red circle left of a blue square", "Rc .. ..\n.. .. ..\n.. .. ..")
    assert [c.passed for c in s.checks] == [True, False, False]


def test_complex_prompt():
    prompt = "two red circles left of a blue square and a green triangle"
    good = score(prompt, "Rc .. Bs\nRc .. Gt\n.. .. ..")
    assert good.passed and len(good.checks) == 5
    bad = score(prompt, "Rc .. Bs\n.. .. Gt\n.. .. ..")
    assert not bad.passed and bad.reward == pytest.approx(4 / 5)


def test_heavy_clutter_is_clipped_at_zero():
    s = score("a red circle", "Rc Bs Bs Bs\nBs Bs Bs Bs\nBs Bs Bs Bs\n.. .. .. ..")
    assert s.reward == 0.0 and s.clutter == 11


# -- completions as token ids ---------------------------------------------------------------------------

VOCAB = Vocab(grid_size=3)
SPEC = parse_prompt("a red circle left of a blue square")
GOOD = Canvas.from_ascii(LEFT)


def test_well_formed_completion_scores_like_its_canvas():
    ids = VOCAB.encode_completion(GOOD)
    s = score_completion(SPEC, ids, VOCAB)
    assert s.passed and s.reward == 1.0 and not s.malformed
    # without <eos> (generation stopped at its budget), and with padding after <eos>
    assert score_completion(SPEC, ids[:-1], VOCAB).passed
    assert score_completion(SPEC, ids + [VOCAB.pad_id] * 3, VOCAB).passed
    assert score_completion(SPEC, torch.tensor(ids), VOCAB).passed


@pytest.mark.parametrize("mangle", [
    lambda ids: ids[:5],                                # too short
    lambda ids: ids[:-1] + [VOCAB.empty_id, VOCAB.eos_id],  # one image token too many
    lambda ids: [VOCAB.id("red")] + ids[1:],            # a word among the image tokens
    lambda ids: [VOCAB.plan_id] + ids,                  # a plan that never ends
    lambda ids: [VOCAB.plan_id, VOCAB.id("red"), VOCAB.plan_end_id] + ids,  # a plan without <obj>
    lambda ids: [-3, 10_000] + ids,                     # ids outside the vocabulary
    lambda ids: [],                                     # nothing at all
    lambda ids: [VOCAB.eos_id],
])
def test_malformed_completion_low_reward_no_exception(mangle):
    s = score_completion(SPEC, mangle(VOCAB.encode_completion(GOOD)), VOCAB)
    assert s.malformed and not s.passed
    assert 0.0 <= s.reward <= 0.25


def test_completion_with_plan_is_well_formed():
    plan = GOOD.objects()
    s = score_completion(SPEC, VOCAB.encode_completion(GOOD, plan), VOCAB)
    assert s.passed and not s.malformed


def test_reward_fn_reads_the_prompt_from_its_ids():
    reward = make_reward_fn(VOCAB)
    prompt = VOCAB.encode_prompt(SPEC.text)
    assert reward(prompt, VOCAB.encode_completion(GOOD)) == 1.0
    assert reward([VOCAB.pad_id, VOCAB.pad_id] + prompt, torch.tensor(VOCAB.encode_completion(GOOD))) == 1.0
    flipped = Canvas.from_ascii("Bs .. Rc\n.. .. ..\n.. .. ..")
    assert reward(prompt, VOCAB.encode_completion(flipped)) == pytest.approx(2 / 3)
    assert reward(VOCAB.encode_prompt("red and"), VOCAB.encode_completion(GOOD)) == 0.0  # not a prompt


def test_default_reward_is_for_six_by_six():
    v = Vocab()
    c = Canvas.from_objects(6, [(0, 0, "red", "circle"), (5, 5, "blue", "square")])
    assert canvas_reward(v.encode_prompt(SPEC.text), v.encode_completion(c)) == 1.0
