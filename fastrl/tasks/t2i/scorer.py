"""The programmatic scorer (the task's "detector"): per-constraint checks of a canvas against a prompt.

Rules, for a prompt spec and a canvas (row 0 at the top, column 0 at the left):

1. **present** — each phrase: at least one object matches it (same shape, and same colour when the
   phrase names one: "a red circle" is not met by a blue circle; "a circle" is met by any circle).
2. **count** — each phrase with a number word ("three green triangles"): exactly that many objects
   match it, no more and no fewer. A phrase with "a" has no count check (two red circles satisfy
   "a red circle").
3. **relation** — each relation: some object matching the subject and some object matching the
   object stand in it, by cell coordinates: "left of" = smaller column, "right of" = larger column,
   "above" = smaller row, "below" = larger row (strictly; the other axis is free).
4. **clutter** — an object that matches no phrase is clutter; it is not a check but costs
   ``clutter_penalty`` each.

``reward = clip(satisfied checks / all checks - clutter_penalty * clutter, 0, 1)``; ``passed`` when
every check holds and there is no clutter (so ``passed`` iff ``reward == 1``). A completion that is not
exactly ``[plan] size*size image tokens [<eos>]`` (see :meth:`Vocab.decode_completion`) is malformed: it
is scored on what could be read, its reward is multiplied by ``malformed_scale`` and it never passes.

>>> from fastrl.tasks.t2i import Canvas, parse_prompt, score_canvas
>>> spec = parse_prompt("a red circle left of a blue square")
>>> score_canvas(spec, Canvas.from_ascii('''
... Rc .. Bs
... .. .. ..
... .. .. ..''')).reward
1.0
>>> score_canvas(spec, Canvas.from_ascii('''
... Bs .. Rc
... .. .. ..
... .. .. ..''')).reward  # both objects present, the relation reversed: 2 of 3 checks
0.6666666666666666
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fastrl.tasks.t2i.grid import Canvas, Placed
from fastrl.tasks.t2i.prompts import PromptSpec, parse_prompt
from fastrl.tasks.t2i.vocab import Vocab

CLUTTER_PENALTY = 0.1
MALFORMED_SCALE = 0.25


@dataclass(frozen=True)
class Check:
    """One constraint: ``kind`` is present, count or relation; ``what`` says it in words."""

    kind: str
    what: str
    passed: bool


@dataclass(frozen=True)
class Score:
    reward: float  # in [0, 1]
    passed: bool
    checks: tuple[Check, ...]
    clutter: int  # objects matching no phrase
    problems: tuple[str, ...] = ()  # why the completion was malformed (empty if it was not)

    @property
    def malformed(self) -> bool:
        return bool(self.problems)


def holds(relation: str, a: Placed, b: Placed) -> bool:
    """Whether object ``a`` is ``relation`` object ``b`` on the canvas."""
    if relation == "left of":
        return a.col < b.col
    if relation == "right of":
        return a.col > b.col
    if relation == "above":
        return a.row < b.row
    if relation == "below":
        return a.row > b.row
    raise ValueError(f"unknown relation {relation!r}")


def score_canvas(spec: PromptSpec, canvas: Canvas, *, clutter_penalty: float = CLUTTER_PENALTY) -> Score:
    """Check ``canvas`` against ``spec`` (rules in the module docstring)."""
    objects = canvas.objects()
    found = [[o for o in objects if phrase.matches(o.colour, o.shape)] for phrase in spec.objects]
    checks = []
    for phrase, hits in zip(spec.objects, found):
        checks.append(Check("present", f"{phrase.text}: present ({len(hits)} found)", len(hits) >= 1))
        if phrase.count is not None:
            checks.append(Check("count", f"{phrase.text}: exactly {phrase.count} ({len(hits)} found)",
                                len(hits) == phrase.count))
    for r in spec.relations:
        ok = any(holds(r.relation, a, b) for a in found[r.subject] for b in found[r.object])
        what = f"{spec.objects[r.subject].text} {r.relation} {spec.objects[r.object].text}"
        checks.append(Check("relation", what, ok))
    clutter = sum(1 for o in objects if not any(p.matches(o.colour, o.shape) for p in spec.objects))
    satisfied = sum(c.passed for c in checks)
    reward = min(1.0, max(0.0, satisfied / len(checks) - clutter_penalty * clutter))
    return Score(reward, satisfied == len(checks) and clutter == 0, tuple(checks), clutter)


def score_completion(spec: PromptSpec, completion_ids: Iterable[int], vocab: Vocab, *,
                     clutter_penalty: float = CLUTTER_PENALTY, malformed_scale: float = MALFORMED_SCALE,
                     canvas: Canvas | None = None) -> Score:
    """Score the tokens a model wrote after the prompt (any ints; never raises on bad content).

    ``canvas``: the canvas to check, when it was read another way (the pixel detector of
    :mod:`~fastrl.tasks.t2i.pixels`); the tokens then only say whether the completion is well formed.
    """
    completion = vocab.decode_completion(completion_ids)
    score = score_canvas(spec, completion.canvas if canvas is None else canvas, clutter_penalty=clutter_penalty)
    if not completion.malformed:
        return score
    return Score(score.reward * malformed_scale, False, score.checks, score.clutter, completion.problems)


def prompt_reader(vocab: Vocab) -> Callable[[Iterable[int]], PromptSpec | None]:
    """``spec_of(prompt_ids)``: the parsed spec of a prompt's ids (None when it does not parse), each
    distinct prompt parsed once."""
    specs: dict[str, PromptSpec | None] = {}

    def spec_of(prompt_ids: Iterable[int]) -> PromptSpec | None:
        text = vocab.decode_prompt(prompt_ids)
        if text not in specs:
            try:
                specs[text] = parse_prompt(text)
            except ValueError:
                specs[text] = None
        return specs[text]

    return spec_of


def make_reward_fn(vocab: Vocab | None = None, *, clutter_penalty: float = CLUTTER_PENALTY,
                   malformed_scale: float = MALFORMED_SCALE,
                   pass_weight: float = 0.0) -> Callable[[Iterable[int], Iterable[int]], float]:
    """A reward callable ``(prompt_ids, completion_ids) -> float`` for a trainer:
    ``(1 - pass_weight) * reward + pass_weight * passed`` of :func:`score_completion`.

    The prompt spec is read back from the prompt's words (padding, ``<bos>`` and ``<sep>`` are
    ignored), so the callable needs nothing but token ids; a prompt that does not parse scores 0.
    """
    if not 0.0 <= pass_weight <= 1.0:
        raise ValueError(f"pass_weight must be in [0, 1], got {pass_weight}")
    vocab = vocab or Vocab()
    spec_of = prompt_reader(vocab)

    def reward(prompt_ids: Iterable[int], completion_ids: Iterable[int]) -> float:
        spec = spec_of(prompt_ids)
        if spec is None:
            return 0.0
        score = score_completion(spec, completion_ids, vocab, clutter_penalty=clutter_penalty,
                                 malformed_scale=malformed_scale)
        if not pass_weight:
            return score.reward
        return (1.0 - pass_weight) * score.reward + pass_weight * float(score.passed)

    return reward


canvas_reward = make_reward_fn()
"""The scorer's reward on the default 6 × 6 vocabulary: ``canvas_reward(prompt_ids, completion_ids)``."""
