"""Prompts: a structured spec per prompt, its text, and the in-domain / out-of-domain prompt sets.

Grammar of a prompt (words of :data:`~fastrl.tasks.t2i.vocab.PROMPT_WORDS`)::

    prompt    := phrase (connector phrase)*
    phrase    := ("a" | "one" | "two" | "three" | "four") [colour] shape     (plural after two..four)
    connector := "and" | "left of" | "right of" | "above" | "below"

A relation connector relates the phrase before it (subject) to the phrase after it (object):
"a red circle and a blue square left of a green triangle" asks the blue square to be left of the
triangle. "a" asks for at least one matching object; a number word for exactly that many. A phrase
without a colour is matched by an object of any colour.

Categories. In-domain, T2I-CompBench-style (every object coloured; what training sees):

- ``color``: colour binding, "a red circle and a blue square" (different colours);
- ``shape``: shape binding, "a green circle and a green triangle [and a green square]" (one colour);
- ``spatial``: "a red circle left of a blue square" (left of, right of, above, below);
- ``complex``: counts, relations and a third object combined: "two red circles and a blue square",
  "a red circle above a blue square and a green triangle", "three yellow squares right of a red circle".

Out-of-domain, GenEval-style, each prompt new in template or combination:

- ``single_object``: "a circle" (no colour: training never leaves the colour out);
- ``two_object``: "a circle and a square";
- ``counting``: "three green triangles" (held-out count-object combinations, every count ``four``),
  "four circles";
- ``colors``: "a blue triangle" (a lone object: training prompts always have two or more);
- ``position``: "a red circle below a blue square" (held-out spatial facts), "a circle above a square";
- ``color_attr``: "a red circle and a blue square" for object pairs that never meet in training.

Held out of the in-domain set (:class:`HeldOut`): a fraction of the object pairs (different colour and
shape), of the spatial facts (a fact and its mirror, "A left of B" = "B right of A", go together) and
of the (count, colour, shape) combinations, plus the counts in ``ood_only_counts`` altogether; colour-
free phrases never appear in-domain. So no out-of-domain prompt is an in-domain prompt.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations, permutations

from fastrl.tasks.t2i.grid import COLOURS, ITEMS, SHAPES
from fastrl.tasks.t2i.vocab import NUMBER_WORDS, PLURALS, RELATIONS

IN_DOMAIN_CATEGORIES = ("color", "shape", "spatial", "complex")
OOD_CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SPLITS = ("train", "test", "ood")

_NUMBER_VALUES = {w: n for n, w in NUMBER_WORDS.items()}
_SINGULAR = {p: s for s, p in PLURALS.items()}


@dataclass(frozen=True)
class ObjectSpec:
    """One phrase: a shape, an optional colour, and ``count`` (``None`` for "a": at least one; an int:
    exactly that many, written as a number word)."""

    shape: str
    colour: str | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.colour is not None and self.colour not in COLOURS:
            raise ValueError(f"colour must be one of {COLOURS} or None, got {self.colour!r}")
        if self.count is not None and self.count not in NUMBER_WORDS:
            raise ValueError(f"count must be None or one of {tuple(NUMBER_WORDS)}, got {self.count!r}")

    @property
    def key(self) -> tuple[str | None, str]:
        return (self.colour, self.shape)

    def matches(self, colour: str, shape: str) -> bool:
        """Whether an object of this colour and shape counts for the phrase."""
        return shape == self.shape and (self.colour is None or colour == self.colour)

    @property
    def text(self) -> str:
        det = "a" if self.count is None else NUMBER_WORDS[self.count]
        noun = PLURALS[self.shape] if (self.count or 1) > 1 else self.shape
        return f"{det} {self.colour} {noun}" if self.colour else f"{det} {noun}"


@dataclass(frozen=True)
class Relation:
    """``objects[subject]`` is ``relation`` (one of :data:`RELATIONS`) ``objects[object]``."""

    subject: int
    relation: str
    object: int

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"relation must be one of {RELATIONS}, got {self.relation!r}")


@dataclass(frozen=True)
class PromptSpec:
    """A prompt as data: its phrases, the relations between consecutive phrases, and where it belongs.

    ``category`` is one of :data:`IN_DOMAIN_CATEGORIES` / :data:`OOD_CATEGORIES` (empty for a parsed
    prompt); ``split`` is ``train``, ``test`` (in-domain evaluation) or ``ood``.
    """

    objects: tuple[ObjectSpec, ...]
    relations: tuple[Relation, ...] = ()
    category: str = field(default="", compare=False)
    split: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        object.__setattr__(self, "relations", tuple(self.relations))
        if not self.objects:
            raise ValueError("objects: a prompt names at least one object")
        gaps = [r.subject for r in self.relations]
        for r in self.relations:
            if not (0 <= r.subject and r.object == r.subject + 1 < len(self.objects)):
                raise ValueError(f"relations: {r} must relate consecutive objects i, i + 1 of the "
                                 f"{len(self.objects)} objects")
        if len(set(gaps)) != len(gaps):
            raise ValueError("relations: at most one relation between two consecutive objects")

    @property
    def text(self) -> str:
        relation_after = {r.subject: r.relation for r in self.relations}
        words = [self.objects[0].text]
        for i in range(1, len(self.objects)):
            words += [relation_after.get(i - 1, "and"), self.objects[i].text]
        return " ".join(words)

    def __str__(self) -> str:
        return self.text


def parse_prompt(text: str, *, category: str = "", split: str = "") -> PromptSpec:
    """The spec of a prompt's text (the inverse of :attr:`PromptSpec.text`); bad grammar raises ``ValueError``."""
    words = text.split()
    pos = 0

    def take(what: str) -> str:
        nonlocal pos
        if pos >= len(words):
            raise ValueError(f"prompt {text!r}: ends where {what} was expected")
        pos += 1
        return words[pos - 1]

    objects: list[ObjectSpec] = []
    relations: list[Relation] = []
    while True:
        det = take("'a' or a number")
        if det != "a" and det not in _NUMBER_VALUES:
            raise ValueError(f"prompt {text!r}: expected 'a' or a number word, got {det!r}")
        count = None if det == "a" else _NUMBER_VALUES[det]
        colour = None
        noun = take("a shape")
        if noun in COLOURS:
            colour, noun = noun, take("a shape")
        plural = (count or 1) > 1
        if (noun not in _SINGULAR) if plural else (noun not in SHAPES):
            raise ValueError(f"prompt {text!r}: expected a {'plural' if plural else 'singular'} shape after "
                             f"{det!r}, got {noun!r}")
        objects.append(ObjectSpec(_SINGULAR[noun] if plural else noun, colour, count))
        if pos == len(words):
            break
        word = take("a connector")
        if word in ("left", "right"):
            if take("'of'") != "of":
                raise ValueError(f"prompt {text!r}: expected 'of' after {word!r}")
            word += " of"
        if word in RELATIONS:
            relations.append(Relation(len(objects) - 1, word, len(objects)))
        elif word != "and":
            raise ValueError(f"prompt {text!r}: expected 'and' or a relation, got {word!r}")
    return PromptSpec(tuple(objects), tuple(relations), category, split)


def canonical_fact(subject: tuple, relation: str, obj: tuple) -> tuple:
    """A spatial fact with its mirror folded in: "B right of A" -> (A, "left of", B), "B below A" -> (A, "above", B)."""
    if relation == "right of":
        return (obj, "left of", subject)
    if relation == "below":
        return (obj, "above", subject)
    return (subject, relation, obj)


@dataclass(frozen=True)
class HeldOut:
    """The combinations no in-domain prompt uses (see the module docstring)."""

    pairs: frozenset  # of frozenset({(colour, shape), (colour, shape)})
    facts: frozenset  # of canonical_fact(...) over (colour, shape) keys
    counts: frozenset  # of (count, colour, shape)
    ood_only_counts: tuple[int, ...] = (4,)

    def violations(self, spec: PromptSpec) -> list[str]:
        """Why ``spec`` could not be an in-domain prompt (empty: it could)."""
        out = []
        for o in spec.objects:
            if o.colour is None:
                out.append(f"colour-free phrase {o.text!r}")
            if o.count in self.ood_only_counts:
                out.append(f"count {o.count} is out-of-domain only")
            elif (o.count, o.colour, o.shape) in self.counts:
                out.append(f"held-out count {o.text!r}")
        for a, b in combinations(spec.objects, 2):
            if frozenset((a.key, b.key)) in self.pairs:
                out.append(f"held-out pair {a.colour} {a.shape} + {b.colour} {b.shape}")
        for r in spec.relations:
            if canonical_fact(spec.objects[r.subject].key, r.relation, spec.objects[r.object].key) in self.facts:
                out.append(f"held-out fact {spec.objects[r.subject].text} {r.relation} {spec.objects[r.object].text}")
        return out

    def admits(self, spec: PromptSpec) -> bool:
        return not self.violations(spec)


@dataclass(frozen=True)
class PromptSets:
    """``train`` and ``test`` (in-domain, disjoint prompts of the same templates), ``ood``, and what was held out."""

    train: tuple[PromptSpec, ...]
    test: tuple[PromptSpec, ...]
    ood: tuple[PromptSpec, ...]
    held_out: HeldOut

    @property
    def in_domain(self) -> tuple[PromptSpec, ...]:
        return self.train + self.test

    def split(self, name: str) -> tuple[PromptSpec, ...]:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)

    def counts(self) -> dict[str, dict[str, int]]:
        """Prompts per category of each split."""
        return {name: dict(Counter(p.category for p in self.split(name))) for name in SPLITS}


def make_prompt_sets(seed: int = 0, *, in_domain_per_category: int = 100, test_fraction: float = 0.2,
                     ood_per_category: int = 24, held_out_pairs: float = 0.25, held_out_facts: float = 0.15,
                     held_out_counts: float = 0.25, train_counts: Sequence[int] = (2, 3),
                     ood_only_counts: Sequence[int] = (4,)) -> PromptSets:
    """Deterministic prompt sets for ``seed``.

    Each in-domain category gets ``in_domain_per_category`` distinct prompts (fewer where the category
    has fewer admissible ones: ``shape`` has 48, ``color`` about 90), of which ``test_fraction`` go to
    ``test``; each out-of-domain category gets up to ``ood_per_category`` (``single_object`` has 3,
    ``two_object`` 6, ``colors`` 12). Templates of a category are drawn in turn, so each is represented.
    ``held_out_*`` are the fractions of object pairs, spatial facts and (count, colour, shape)
    combinations kept out of the in-domain set; ``train_counts`` are the counts in-domain prompts use,
    ``ood_only_counts`` those only out-of-domain counting prompts use.
    """
    for name, value in (("test_fraction", test_fraction), ("held_out_pairs", held_out_pairs),
                        ("held_out_facts", held_out_facts), ("held_out_counts", held_out_counts)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    for name, value in (("in_domain_per_category", in_domain_per_category), ("ood_per_category", ood_per_category)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    train_counts, ood_only_counts = tuple(train_counts), tuple(ood_only_counts)
    if not set(train_counts) | set(ood_only_counts) <= set(NUMBER_WORDS) - {1}:
        raise ValueError(f"train_counts and ood_only_counts must be in 2..{max(NUMBER_WORDS)}")
    if set(train_counts) & set(ood_only_counts):
        raise ValueError("train_counts and ood_only_counts must not overlap")

    held = _choose_held_out(random.Random(f"{seed}:held_out"), held_out_pairs, held_out_facts, held_out_counts,
                            train_counts, ood_only_counts)
    train: list[PromptSpec] = []
    test: list[PromptSpec] = []
    for category in IN_DOMAIN_CATEGORIES:
        rng = random.Random(f"{seed}:{category}")
        templates = [[p for p in t if held.admits(p)] for t in _in_domain_templates(category, train_counts)]
        chosen = _draw(templates, in_domain_per_category, rng)
        rng.shuffle(chosen)
        n_test = round(len(chosen) * test_fraction)
        test += [_tag(p, category, "test") for p in chosen[:n_test]]
        train += [_tag(p, category, "train") for p in chosen[n_test:]]
    in_domain_texts = {p.text for p in train + test}
    ood: list[PromptSpec] = []
    for category in OOD_CATEGORIES:
        rng = random.Random(f"{seed}:{category}")
        templates = [[p for p in t if p.text not in in_domain_texts]
                     for t in _ood_templates(category, held, train_counts + ood_only_counts)]
        ood += [_tag(p, category, "ood") for p in _draw(templates, ood_per_category, rng)]
    return PromptSets(tuple(train), tuple(test), tuple(ood), held)


def _tag(spec: PromptSpec, category: str, split: str) -> PromptSpec:
    return PromptSpec(spec.objects, spec.relations, category, split)


def _draw(templates: list[list[PromptSpec]], n: int, rng: random.Random) -> list[PromptSpec]:
    """Up to ``n`` prompts of distinct text, taking from each (shuffled) template in turn."""
    pools = [rng.sample(t, len(t)) for t in templates]
    out, seen = [], set()
    for j in range(max((len(p) for p in pools), default=0)):
        for pool in pools:
            if len(out) == n:
                return out
            if j < len(pool) and pool[j].text not in seen:
                seen.add(pool[j].text)
                out.append(pool[j])
    return out


def _choose_held_out(rng: random.Random, pair_fraction: float, fact_fraction: float, count_fraction: float,
                     train_counts: tuple[int, ...], ood_only_counts: tuple[int, ...]) -> HeldOut:
    # candidates in a fixed order (never from iterating a set: its order changes between processes)
    pairs = [frozenset((a, b)) for a, b in combinations(ITEMS, 2) if a[0] != b[0] and a[1] != b[1]]
    facts = [(a, rel, b) for rel in ("left of", "above") for a, b in permutations(ITEMS, 2)]
    counts = [(n, c, s) for n in train_counts for c, s in ITEMS]
    pick = lambda xs, f: frozenset(rng.sample(xs, round(f * len(xs))))  # noqa: E731
    return HeldOut(pick(pairs, pair_fraction), pick(facts, fact_fraction), pick(counts, count_fraction),
                   ood_only_counts)


def _a(item: tuple[str | None, str], count: int | None = None) -> ObjectSpec:
    return ObjectSpec(item[1], item[0], count)


def _in_domain_templates(category: str, counts: tuple[int, ...]) -> list[list[PromptSpec]]:
    """Every candidate prompt of an in-domain category, one list per template (before holding out)."""
    two = list(permutations(ITEMS, 2))
    three = list(permutations(ITEMS, 3))
    if category == "color":
        return [[PromptSpec((_a(a), _a(b))) for a, b in two if a[0] != b[0]]]
    if category == "shape":
        return [[PromptSpec(tuple(_a((c, s)) for s in shapes)) for c in COLOURS for shapes in permutations(SHAPES, k)]
                for k in (2, 3)]
    if category == "spatial":
        return [[PromptSpec((_a(a), _a(b)), (Relation(0, rel, 1),)) for a, b in two for rel in RELATIONS]]
    if category == "complex":
        return [
            [PromptSpec((_a(a, n), _a(b))) for n in counts for a, b in two],
            [PromptSpec((_a(a), _a(b), _a(c)), (Relation(0, rel, 1),)) for a, b, c in three for rel in RELATIONS],
            [PromptSpec((_a(a), _a(b), _a(c)), (Relation(1, rel, 2),)) for a, b, c in three for rel in RELATIONS],
            [PromptSpec((_a(a, n), _a(b)), (Relation(0, rel, 1),))
             for n in counts for a, b in two for rel in RELATIONS],
        ]
    raise ValueError(f"unknown in-domain category {category!r}")


def _ood_templates(category: str, held: HeldOut, counts: tuple[int, ...]) -> list[list[PromptSpec]]:
    """Every candidate prompt of an out-of-domain category, one list per template."""
    plain = [(None, s) for s in SHAPES]
    if category == "single_object":
        return [[PromptSpec((_a(s),)) for s in plain]]
    if category == "two_object":
        return [[PromptSpec((_a(a), _a(b))) for a, b in permutations(plain, 2)]]
    if category == "counting":
        return [[PromptSpec((_a(item, n),)) for n in counts for item in ITEMS
                 if n in held.ood_only_counts or (n, *item) in held.counts],
                [PromptSpec((_a(s, n),)) for n in counts for s in plain]]
    if category == "colors":
        return [[PromptSpec((_a(item),)) for item in ITEMS]]
    if category == "position":
        return [[PromptSpec((_a(a), _a(b)), (Relation(0, rel, 1),)) for a, b in permutations(ITEMS, 2)
                 for rel in RELATIONS if canonical_fact(a, rel, b) in held.facts],
                [PromptSpec((_a(a), _a(b)), (Relation(0, rel, 1),)) for a, b in permutations(plain, 2)
                 for rel in RELATIONS]]
    if category == "color_attr":
        return [[PromptSpec((_a(a), _a(b))) for a, b in permutations(ITEMS, 2) if frozenset((a, b)) in held.pairs]]
    raise ValueError(f"unknown out-of-domain category {category!r}")
