"""The task's tokenizer: ids, round trips, the sequence format."""

from __future__ import annotations

import pytest

from fastrl.tasks.t2i import Canvas, Placed, Vocab
from fastrl.tasks.t2i.grid import ITEMS


def test_sizes():
    v = Vocab()
    # the image marks <boi> / <eoi> close the text vocabulary (37 ids: a Janus model's lm-head rows)
    assert v.sizes == {"special": 7, "prompt_words": 21, "plan_words": 7, "image_marks": 2, "text": 37, "image": 13,
                       "total": 50}
    assert len(v) == 50 and v.pad_id == 0 and v.text_size == 37 and v.codebook == 13
    assert Vocab(grid_size=4).sizes["total"] == 48


def test_every_token_round_trips():
    v = Vocab()
    text = " ".join(v.tokens)
    assert v.decode(v.encode(text)) == text
    assert v.encode(text) == list(range(len(v)))


def test_image_tokens_are_one_block():
    v = Vocab()
    assert list(v.image_ids) == list(range(len(v) - 13, len(v)))
    assert v.image_item(v.empty_id) is None
    for item in ITEMS:
        assert v.image_item(v.image_id(item)) == item and v.is_image(v.image_id(item))
    assert not v.is_image(v.id("red"))
    with pytest.raises(ValueError, match="not an image token"):
        v.image_item(v.id("red"))


def test_unknown_words_and_ids():
    v = Vocab()
    with pytest.raises(ValueError, match="'purple'"):
        v.encode("a purple circle")
    assert v.decode([v.bos_id, 999, -1]) == "<bos> <unk:999> <unk:-1>"


def test_prompt_round_trip():
    v = Vocab()
    ids = v.encode_prompt("three green triangles left of a red circle")
    assert ids[0] == v.bos_id and ids[-1] == v.sep_id
    assert v.decode_prompt([v.pad_id] + ids + [v.empty_id]) == "three green triangles left of a red circle"


def test_completion_round_trip_with_plan():
    v = Vocab()
    c = Canvas.from_objects(6, [Placed(0, 5, "red", "circle"), Placed(3, 2, "yellow", "triangle")])
    plan = c.objects()
    ids = v.encode_completion(c, plan)
    assert ids[0] == v.plan_id and ids[-1] == v.eos_id and len(ids) == 2 + 6 * 2 + 36 + 1
    assert v.decode(ids[:7]) == "<plan> <obj> red circle at 0 5"
    read = v.decode_completion(ids)
    assert read.canvas == c and read.plan == tuple(plan) and not read.malformed
    assert v.decode_completion(v.encode_completion(c)).plan is None


def test_bad_plan_entries_are_problems():
    v = Vocab()
    ids = v.encode("<plan> <obj> red circle at red 0 </plan>") + v.encode_completion(Canvas.blank(6))
    read = v.decode_completion(ids)
    assert read.malformed and "bad plan entry" in read.problems[0]


def test_canvas_size_must_match():
    with pytest.raises(ValueError, match="6x6"):
        Vocab().encode_completion(Canvas.blank(4))


def test_canvas_ascii_round_trip():
    text = "Rc .. Gt\n.. Bs ..\nYc .. .."
    c = Canvas.from_ascii(text)
    assert c.ascii() == text and c.at(1, 1) == ("blue", "square")
    assert c.objects()[0] == Placed(0, 0, "red", "circle")
    with pytest.raises(ValueError):
        Canvas.from_ascii("Rc Xx\n.. ..")
    with pytest.raises(ValueError, match="two objects"):
        Canvas.from_objects(2, [(0, 0, "red", "circle"), (0, 0, "blue", "circle")])


def test_image_codes_are_unified_ids():
    """Image code c has id text_size + c: code 0 the empty cell, then the 12 objects in ITEMS order."""
    v = Vocab()
    assert v.image_id(None) == v.text_size and v.code(v.empty_id) == 0
    for c, item in enumerate(ITEMS, start=1):
        assert v.image_id(item) == v.text_size + c and v.code(v.image_id(item)) == c
    assert v.boi_id < v.text_size and v.eoi_id < v.text_size
    with pytest.raises(ValueError, match="not an image token"):
        v.code(v.boi_id)


def test_image_completion_format():
    """The image model's format: the prompt ends with <boi> (no plan), or the plan ends with it; no <eos>."""
    v = Vocab()
    c = Canvas.from_objects(6, [Placed(0, 5, "red", "circle"), Placed(3, 2, "yellow", "triangle")])
    assert v.encode_prompt("a red circle", boi=True)[-2:] == [v.sep_id, v.boi_id]
    plain = v.encode_image_completion(c)
    assert len(plain) == 36 and all(v.is_image(t) for t in plain)
    planned = v.encode_image_completion(c, c.objects())
    assert planned[0] == v.plan_id and planned[-37] == v.boi_id and planned[-36:] == plain
    for ids in (plain, planned, planned + [v.eoi_id], plain + [v.eos_id, v.pad_id]):
        read = v.decode_completion(ids)
        assert read.canvas == c and not read.malformed
    codes, plan, problems = v.read_completion(planned)
    assert codes == [v.code(t) for t in plain] and plan == tuple(c.objects()) and problems == ()
    codes, _, problems = v.read_completion(plain[:30] + [v.id("red")])
    assert len(codes) == 36 and codes[30:] == [0] * 6 and len(problems) == 2
    # the image is the last 36 tokens by position: a drawn plan may hold any text token, <eos> and <eoi> too
    junk = [v.eos_id, v.id("red"), v.eoi_id]
    codes, plan, problems = v.read_completion(junk + [v.boi_id] + plain)
    assert codes == [v.code(t) for t in plain] and plan is None and "not a plan section" in problems[0]
    codes, plan, problems = v.read_completion([v.plan_id, *junk, v.plan_end_id, v.boi_id] + plain)
    assert codes == [v.code(t) for t in plain] and plan == () and "plan does not start" in problems[0]
