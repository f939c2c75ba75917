"""Synthetic data: canvases that satisfy a prompt or miss it on purpose, plans, SFT sequences, pairs.

SFT warm-up wants an imperfect teacher, so that RL has room to improve: :func:`sft_examples` draws
a perfect canvas with probability ``perfect_rate`` and otherwise a perfect one with one flaw of
:data:`CORRUPTIONS` (checked by the scorer: a flawed canvas never passes). With ``cot`` the completion
starts with a plan that lists the canvas's objects — phrase by phrase in prompt order, then any
clutter, each group row-major — so the plan always describes the canvas that follows, flaws included.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations

from fastrl.tasks.t2i.grid import COLOURS, ITEMS, SHAPES, Canvas, Placed
from fastrl.tasks.t2i.prompts import PromptSpec
from fastrl.tasks.t2i.scorer import holds, score_canvas
from fastrl.tasks.t2i.vocab import Vocab

CORRUPTIONS = ("wrong_attribute", "swapped_colours", "missing_object", "wrong_count", "wrong_relation", "clutter")


def perfect_canvas(spec: PromptSpec, rng: random.Random, *, size: int = 6, max_tries: int = 1000) -> Canvas:
    """A random canvas that passes ``spec``: one object per "a" phrase, ``count`` per counted phrase, a
    random colour where the phrase names none, random cells (redrawn until every relation holds)."""
    wanted = [(p.colour, p.shape) for p in spec.objects for _ in range(p.count or 1)]
    if len(wanted) > size * size:
        raise ValueError(f"spec: {len(wanted)} objects do not fit a {size}x{size} canvas")
    for _ in range(max_tries):
        cells = rng.sample(range(size * size), len(wanted))
        canvas = Canvas.from_objects(size, [Placed(i // size, i % size, colour or rng.choice(COLOURS), shape)
                                            for i, (colour, shape) in zip(cells, wanted)])
        if score_canvas(spec, canvas).passed:
            return canvas
    raise RuntimeError(f"no passing canvas found for {spec.text!r} in {max_tries} tries")


def flawed_canvas(spec: PromptSpec, rng: random.Random, *, size: int = 6, max_tries: int = 100) -> tuple[Canvas, str]:
    """A canvas that fails ``spec``: a perfect one with one corruption; returns it and the corruption's name."""
    for _ in range(max_tries):
        base = perfect_canvas(spec, rng, size=size)
        for name in rng.sample(CORRUPTIONS, len(CORRUPTIONS)):
            canvas = _CORRUPT[name](spec, base, rng)
            if canvas is not None and not score_canvas(spec, canvas).passed:
                return canvas, name
    raise RuntimeError(f"no failing canvas found for {spec.text!r}")


def sample_canvas(spec: PromptSpec, rng: random.Random, *, size: int = 6, perfect: bool = True) -> tuple[Canvas, str]:
    """``(canvas, corruption)``: a passing canvas and ``""``, or a failing one and what was done to it."""
    return (perfect_canvas(spec, rng, size=size), "") if perfect else flawed_canvas(spec, rng, size=size)


def plan_for(spec: PromptSpec, canvas: Canvas) -> tuple[Placed, ...]:
    """The canvas's objects in plan order: those matching phrase 1, phrase 2, ..., then the rest (row-major)."""
    objects = canvas.objects()
    order: list[Placed] = []
    for phrase in spec.objects:
        order += [o for o in objects if phrase.matches(o.colour, o.shape) and o not in order]
    return tuple(order + [o for o in objects if o not in order])


def plan_matches_canvas(plan: Iterable[Placed], canvas: Canvas) -> bool:
    """Whether the plan lists exactly the canvas's objects (in any order)."""
    return sorted(plan) == sorted(canvas.objects())


@dataclass(frozen=True)
class Example:
    """One SFT sequence: ``tokens = prompt_ids + completion_ids``; the loss goes on the completion."""

    prompt: PromptSpec
    canvas: Canvas
    corruption: str  # "" when the canvas is perfect, else one of CORRUPTIONS
    prompt_ids: tuple[int, ...]  # <bos> words <sep>
    completion_ids: tuple[int, ...]  # [<plan> ... </plan>] image tokens <eos>

    @property
    def perfect(self) -> bool:
        return not self.corruption

    @property
    def tokens(self) -> list[int]:
        return [*self.prompt_ids, *self.completion_ids]

    @property
    def completion_start(self) -> int:
        """Index in ``tokens`` of the first completion token."""
        return len(self.prompt_ids)


def sft_examples(prompts: Sequence[PromptSpec], vocab: Vocab, *, perfect_rate: float = 0.5, cot: bool = False,
                 samples_per_prompt: int = 1, seed: int = 0) -> list[Example]:
    """``samples_per_prompt`` examples per prompt, each perfect with probability ``perfect_rate``
    (deterministic for ``seed``); ``cot`` puts the canvas's plan before its image tokens."""
    if not 0.0 <= perfect_rate <= 1.0:
        raise ValueError(f"perfect_rate must be in [0, 1], got {perfect_rate}")
    rng = random.Random(seed)
    out = []
    for spec in prompts:
        prompt_ids = tuple(vocab.encode_prompt(spec.text))
        for _ in range(samples_per_prompt):
            canvas, corruption = sample_canvas(spec, rng, size=vocab.grid_size, perfect=rng.random() < perfect_rate)
            plan = plan_for(spec, canvas) if cot else None
            out.append(Example(spec, canvas, corruption, prompt_ids, tuple(vocab.encode_completion(canvas, plan))))
    return out


def reward_model_ids(vocab: Vocab, prompt_ids: Iterable[int], completion_ids: Iterable[int]) -> list[int]:
    """The sequence a learned reward model reads: ``<bos> words <sep>`` + the completion's canvas as exactly
    size × size image tokens + ``<eos>`` (any plan dropped, a malformed canvas read leniently), so every
    canvas of a prompt has the same length and the score can be read at the last token."""
    canvas = vocab.decode_completion(completion_ids).canvas
    return vocab.encode_prompt(vocab.decode_prompt(prompt_ids)) + vocab.encode_completion(canvas)


def preference_pair(rewards: Sequence[float], *, min_gap: float = 0.0) -> tuple[int, int] | None:
    """``(chosen, rejected)``: indices of the best and worst of a group's rewards (first on ties), or
    ``None`` when they differ by no more than ``min_gap`` (a pair must carry a preference)."""
    if len(rewards) < 2:
        return None
    best = max(range(len(rewards)), key=lambda i: rewards[i])
    worst = min(range(len(rewards)), key=lambda i: rewards[i])
    gap = rewards[best] - rewards[worst]
    return (best, worst) if gap > 0 and gap >= min_gap else None


# -- corruptions: (spec, passing canvas, rng) -> changed canvas, or None where it does not apply ------------

def _found(spec: PromptSpec, canvas: Canvas, i: int) -> list[Placed]:
    return [o for o in canvas.objects() if spec.objects[i].matches(o.colour, o.shape)]


def _wrong_attribute(spec: PromptSpec, canvas: Canvas, rng: random.Random) -> Canvas | None:
    """One object of a phrase gets another colour (or, if the phrase names none, another shape)."""
    i = rng.randrange(len(spec.objects))
    o = rng.choice(_found(spec, canvas, i))
    if spec.objects[i].colour is not None:
        item = (rng.choice([c for c in COLOURS if c != o.colour]), o.shape)
    else:
        item = (o.colour, rng.choice([s for s in SHAPES if s != o.shape]))
    return canvas.with_cell(o.row, o.col, item)


def _swapped_colours(spec: PromptSpec, canvas: Canvas, rng: random.Random) -> Canvas | None:
    """Two phrases of different colours and shapes swap colours (the attribute-binding error)."""
    p = spec.objects
    options = [(i, j) for i, j in combinations(range(len(p)), 2)
               if p[i].colour and p[j].colour and p[i].colour != p[j].colour and p[i].shape != p[j].shape]
    if not options:
        return None
    i, j = rng.choice(options)
    a, b = rng.choice(_found(spec, canvas, i)), rng.choice(_found(spec, canvas, j))
    return canvas.with_cell(a.row, a.col, (b.colour, a.shape)).with_cell(b.row, b.col, (a.colour, b.shape))


def _missing_object(spec: PromptSpec, canvas: Canvas, rng: random.Random) -> Canvas | None:
    """Every object of one phrase is left out."""
    for o in _found(spec, canvas, rng.randrange(len(spec.objects))):
        canvas = canvas.with_cell(o.row, o.col, None)
    return canvas


def _wrong_count(spec: PromptSpec, canvas: Canvas, rng: random.Random) -> Canvas | None:
    """A counted phrase gets one object too many or too few."""
    counted = [i for i, p in enumerate(spec.objects) if p.count is not None]
    if not counted:
        return None
    i = rng.choice(counted)
    found, empty = _found(spec, canvas, i), canvas.empty_cells()
    if (rng.random() < 0.5 and len(found) > 1) or not empty:
        o = rng.choice(found)
        return canvas.with_cell(o.row, o.col, None)
    row, col = rng.choice(empty)
    return canvas.with_cell(row, col, (spec.objects[i].colour or rng.choice(COLOURS), spec.objects[i].shape))


def _wrong_relation(spec: PromptSpec, canvas: Canvas, rng: random.Random) -> Canvas | None:
    """The subject's objects move to cells where a relation no longer holds."""
    if not spec.relations:
        return None
    r = rng.choice(spec.relations)
    movers = _found(spec, canvas, r.subject)
    base = canvas
    for o in movers:
        base = base.with_cell(o.row, o.col, None)
    for _ in range(100):
        moved = base
        for o, (row, col) in zip(movers, rng.sample(base.empty_cells(), len(movers))):
            moved = moved.with_cell(row, col, (o.colour, o.shape))
        subjects, objects = _found(spec, moved, r.subject), _found(spec, moved, r.object)
        if not any(holds(r.relation, a, b) for a in subjects for b in objects):
            return moved
    return None


def _clutter(spec: PromptSpec, canvas: Canvas, rng: random.Random) -> Canvas | None:
    """One or two objects that the prompt does not mention are added."""
    options = [item for item in ITEMS if not any(p.matches(*item) for p in spec.objects)]
    empty = canvas.empty_cells()
    if not options or not empty:
        return None
    for row, col in rng.sample(empty, min(len(empty), rng.choice((1, 2)))):
        canvas = canvas.with_cell(row, col, rng.choice(options))
    return canvas


_CORRUPT: dict[str, Callable[[PromptSpec, Canvas, random.Random], Canvas | None]] = {
    "wrong_attribute": _wrong_attribute, "swapped_colours": _swapped_colours, "missing_object": _missing_object,
    "wrong_count": _wrong_count, "wrong_relation": _wrong_relation, "clutter": _clutter}
