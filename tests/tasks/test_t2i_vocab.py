"""The task's tokenizer: ids, round trips, the sequence format."""

from __future__ import annotations

import pytest

from fastrl.tasks.t2i import Canvas, Placed, Vocab
from fastrl.tasks.t2i.grid import ITEMS


def test_sizes():
    v = Vocab()
    assert v.sizes == {"special": 7, "prompt_words": 21, "plan_words": 7, "image": 13, "total": 48}
    assert len(v) == 48 and v.pad_id == 0
    assert Vocab(grid_size=4).sizes["total"] == 46


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
