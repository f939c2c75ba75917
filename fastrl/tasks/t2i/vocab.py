"""The tokenizer of the text-to-image-token task: prompt words, plan words, image marks, image tokens.

Two sequence formats share the ids. The image-model format (the demo's Janus policy,
:meth:`Vocab.encode_image_completion`): the prompt ``<bos> prompt words <sep>`` then, without a plan,
``<boi>`` (begin of image; the prompt ends with it, as Janus's processor writes it); the completion is
``[<plan> plan </plan> <boi>] image tokens``: an optional plan through the text head, then exactly
size × size image tokens, row-major, one per cell (``<empty>`` or ``<red-circle>`` etc.), no end token
(the image has a fixed length). The text format (:meth:`Vocab.encode_completion`, a causal LM writing
the cells as words): ``[<plan> plan </plan>] image tokens <eos>`` after ``<bos> words <sep>``. The plan
(chain of thought, ``--cot``) lists objects as ``<obj> red circle at 2 3`` (row, column).

Ids are plain ints: special tokens first (``<pad>`` is 0), then prompt words, plan words, the image marks
``<boi>`` / ``<eoi>`` (the text vocabulary ends here: ``Vocab.text_size`` ids, a Janus model's lm-head
rows), and the image tokens as one contiguous block (``Vocab.image_ids``) in code order: image code
``c`` (0 = empty, then the 12 colour-shape objects of :data:`~fastrl.tasks.t2i.grid.ITEMS`) has id
``text_size + c``, the "unified" id of the image model's code ``c``. For the default 6 × 6 canvas: 7
special tokens, 21 prompt words, 7 plan words (``at`` and the coordinates 0-5), 2 image marks (37 text
tokens), 13 image tokens; 50 in all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from fastrl.tasks.t2i.grid import COLOURS, ITEMS, SHAPES, Canvas, Placed

PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<sep>", "<plan>", "</plan>", "<obj>")
IMAGE_MARKS = ("<boi>", "<eoi>")  # begin / end of image: the last two text tokens
PROMPT_WORDS = ("a", "and", *NUMBER_WORDS.values(), *COLOURS, *SHAPES, *PLURALS.values(),
                "left", "right", "of", "above", "below")
EMPTY_TOKEN = "<empty>"
CODE_ITEMS: tuple[tuple[str, str] | None, ...] = (None, *ITEMS)
"""What image code ``c`` draws: ``CODE_ITEMS[c]`` (code 0 the empty cell); 13 codes."""


def image_token(item: tuple[str, str] | None) -> str:
    """The image token of a cell: ``<empty>`` or ``<colour-shape>``."""
    return EMPTY_TOKEN if item is None else f"<{item[0]}-{item[1]}>"


class Completion(NamedTuple):
    """What a completion says, read leniently (see :meth:`Vocab.decode_completion`)."""

    canvas: Canvas  # always size × size; cells that could not be read are empty
    plan: tuple[Placed, ...] | None  # None when no plan section was written
    problems: tuple[str, ...]  # empty when the completion is well formed

    @property
    def malformed(self) -> bool:
        return bool(self.problems)


class Vocab:
    """Token ids of the task for a ``grid_size`` × ``grid_size`` canvas (the plan's coordinates depend on it)."""

    def __init__(self, grid_size: int = 6):
        if not 1 <= grid_size <= 16:
            raise ValueError(f"grid_size must be in [1, 16], got {grid_size}")
        self.grid_size = grid_size
        self.plan_words = ("at", *(str(i) for i in range(grid_size)))
        self.tokens: tuple[str, ...] = (*SPECIAL_TOKENS, *PROMPT_WORDS, *self.plan_words, *IMAGE_MARKS,
                                        *(image_token(item) for item in CODE_ITEMS))
        self._ids = {t: i for i, t in enumerate(self.tokens)}
        self.pad_id, self.bos_id, self.eos_id, self.sep_id, self.plan_id, self.plan_end_id, self.obj_id = (
            self._ids[t] for t in SPECIAL_TOKENS)
        self.boi_id, self.eoi_id = (self._ids[t] for t in IMAGE_MARKS)
        self.empty_id = self._ids[EMPTY_TOKEN]
        self.image_ids = range(self.empty_id, len(self.tokens))
        self.text_size = self.empty_id  # ids below are text (an image model's lm-head rows); code c is text_size + c
        self.codebook = len(CODE_ITEMS)
        self._items: dict[int, tuple[str, str] | None] = {self._ids[image_token(it)]: it for it in (None, *ITEMS)}

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"Vocab(grid_size={self.grid_size}, size={len(self)})"

    @property
    def sizes(self) -> dict[str, int]:
        """Token counts by kind: special, prompt words, plan words, image marks, text (all of those), image,
        total."""
        return {"special": len(SPECIAL_TOKENS), "prompt_words": len(PROMPT_WORDS), "plan_words": len(self.plan_words),
                "image_marks": len(IMAGE_MARKS), "text": self.text_size, "image": len(self.image_ids),
                "total": len(self)}

    def id(self, token: str) -> int:
        try:
            return self._ids[token]
        except KeyError:
            raise ValueError(f"token {token!r} is not in the vocabulary") from None

    # -- plain text --------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ids of whitespace-separated tokens (words, special or image tokens); an unknown one raises ``ValueError``."""
        return [self.id(t) for t in text.split()]

    def decode(self, ids: Iterable[int]) -> str:
        """Tokens joined by spaces; an id outside the vocabulary shows as ``<unk:ID>``."""
        return " ".join(self.tokens[i] if 0 <= i < len(self.tokens) else f"<unk:{i}>" for i in _ints(ids))

    def hf_tokenizer(self):
        """This vocabulary as a Hugging Face fast tokenizer (whitespace-split words, one id per token, the same
        ids), so that a model trained on it saves and loads like any other: ``tok.save_pretrained(dir)``,
        ``tok.decode(ids)`` gives :meth:`decode`'s text. Needs ``transformers`` (and its ``tokenizers``)."""
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        backend = Tokenizer(models.WordLevel(dict(self._ids), unk_token=SPECIAL_TOKENS[0]))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                       pad_token="<pad>", sep_token="<sep>")

    # -- image tokens ------------------------------------------------------------------------------------

    def is_image(self, token_id: int) -> bool:
        return token_id in self._items

    def image_id(self, item: tuple[str, str] | None) -> int:
        """The id of a cell's image token (``None`` = empty)."""
        return self._ids[image_token(item)]

    def code(self, token_id: int) -> int:
        """The image code (``0 <= c < codebook``) of an image token's id; a non-image id raises ``ValueError``."""
        if token_id not in self._items:
            raise ValueError(f"token id {token_id} is not an image token")
        return token_id - self.text_size

    def image_item(self, token_id: int) -> tuple[str, str] | None:
        """The cell an image token draws (``None`` = empty); a non-image id raises ``ValueError``."""
        if token_id not in self._items:
            raise ValueError(f"token id {token_id} is not an image token")
        return self._items[token_id]

    # -- sequences ---------------------------------------------------------------------------------------

    def encode_prompt(self, text: str, *, boi: bool = False) -> list[int]:
        """``<bos> words <sep>``: the prompt the model continues; with ``boi`` then ``<boi>`` (the image
        model's prompt when no plan comes first)."""
        return [self.bos_id, *self.encode(text), self.sep_id, *([self.boi_id] if boi else [])]

    def decode_prompt(self, ids: Iterable[int]) -> str:
        """The prompt's words (padding, ``<bos>`` and everything from ``<sep>`` on are dropped)."""
        words = []
        for i in _ints(ids):
            if i == self.sep_id:
                break
            if i not in (self.pad_id, self.bos_id):
                words.append(self.tokens[i] if 0 <= i < len(self.tokens) else f"<unk:{i}>")
        return " ".join(words)

    def encode_plan(self, plan: Sequence[Placed]) -> list[int]:
        """``<plan> <obj> red circle at 2 3 ... </plan>``."""
        ids = [self.plan_id]
        for p in plan:
            ids += [self.obj_id, self._ids[p.colour], self._ids[p.shape], self._ids["at"], self._ids[str(p.row)],
                    self._ids[str(p.col)]]
        return ids + [self.plan_end_id]

    def encode_completion(self, canvas: Canvas, plan: Sequence[Placed] | None = None) -> list[int]:
        """``[plan] image tokens <eos>``: what the model should write after the prompt."""
        if canvas.size != self.grid_size:
            raise ValueError(f"canvas: this vocabulary is for {self.grid_size}x{self.grid_size} canvases, "
                             f"got {canvas.size}x{canvas.size}")
        head = self.encode_plan(plan) if plan is not None else []
        return head + [self.image_id(item) for item in canvas.cells] + [self.eos_id]

    def encode_image_completion(self, canvas: Canvas, plan: Sequence[Placed] | None = None) -> list[int]:
        """``[plan <boi>] image tokens``: what the image model writes after its prompt (the prompt ends with
        ``<boi>`` when there is no plan: :meth:`encode_prompt` with ``boi=True``)."""
        cells = self.encode_completion(canvas)[:-1]
        return cells if plan is None else self.encode_plan(plan) + [self.boi_id] + cells

    def read_completion(self, ids: Iterable[int]) -> tuple[list[int], tuple[Placed, ...] | None, tuple[str, ...]]:
        """``(codes, plan, problems)`` of a completion in either format, read leniently (never raises on bad
        content): exactly size × size image codes (a cell that could not be read is code 0, empty), the
        plan (None when none was written) and what was wrong.

        Trailing ``<pad>`` are dropped. When the completion ends with size × size image tokens (the
        image model's format: the image is its last tokens, by position), those are the codes and what
        comes before them must be nothing or a plan section ``<plan> ... </plan>``, then optionally
        ``<boi>`` (a plan's tokens may be anything the text head drew). Otherwise it is read as text:
        reading stops at the first ``<eos>`` or ``<eoi>`` (a missing one is accepted: generation may
        stop at its token budget); an optional plan section comes first, then an optional ``<boi>``,
        then the image tokens: any other token is a problem and its cell stays empty; fewer or more
        than size × size tokens is a problem (the canvas is cut or filled with empty cells).
        """
        seq = _ints(ids)
        while seq and seq[-1] == self.pad_id:
            seq.pop()
        n = self.grid_size * self.grid_size
        if len(seq) >= n and all(t in self._items for t in seq[len(seq) - n:]):
            head, codes = seq[:len(seq) - n], [t - self.text_size for t in seq[len(seq) - n:]]
            if head and head[-1] == self.boi_id:
                head = head[:-1]
            if not head:
                return codes, None, ()
            if head[0] == self.plan_id and head[-1] == self.plan_end_id and len(head) >= 2:
                plan, problems = self._read_plan(head[1:-1])
                return codes, plan, tuple(problems)
            return codes, None, (f"{len(head)} token(s) before the image are not a plan section",)
        for end_id in (self.eos_id, self.eoi_id):
            if end_id in seq:
                seq = seq[:seq.index(end_id)]
        while seq and seq[-1] == self.pad_id:
            seq.pop()
        problems = []
        plan = None
        if seq and seq[0] == self.plan_id:
            if self.plan_end_id in seq:
                end = seq.index(self.plan_end_id)
                plan, plan_problems = self._read_plan(seq[1:end])
                problems += plan_problems
                seq = seq[end + 1:]
            else:
                problems.append("plan section without </plan>")
                seq = []
        if seq and seq[0] == self.boi_id:
            seq = seq[1:]
        bad = sum(1 for t in seq if t not in self._items)
        if bad:
            problems.append(f"{bad} non-image token(s) among the image tokens")
        if len(seq) != n:
            problems.append(f"{len(seq)} image tokens, expected {n}")
        codes = [t - self.text_size if t in self._items else 0 for t in seq[:n]] + [0] * max(0, n - len(seq))
        return codes, plan, tuple(problems)

    def decode_completion(self, ids: Iterable[int]) -> Completion:
        """Read a generated completion leniently (:meth:`read_completion`); never raises on bad content.
        ``problems`` lists what was wrong; the scorer treats any problem as a malformed completion."""
        codes, plan, problems = self.read_completion(ids)
        return Completion(Canvas(self.grid_size, tuple(CODE_ITEMS[c] for c in codes)), plan, problems)

    def _read_plan(self, body: list[int]) -> tuple[tuple[Placed, ...], list[str]]:
        """Plan entries ``<obj> colour shape at row col``; entries that do not parse are problems."""
        entries: list[list[int]] = []
        for t in body:
            if t == self.obj_id:
                entries.append([])
            elif entries:
                entries[-1].append(t)
            else:
                return (), ["plan does not start with <obj>"]
        plan, problems = [], []
        coords = {self._ids[w]: int(w) for w in self.plan_words[1:]}
        for e in entries:
            words = [self.tokens[t] if 0 <= t < len(self.tokens) else "" for t in e]
            if (len(e) == 5 and words[0] in COLOURS and words[1] in SHAPES and words[2] == "at"
                    and e[3] in coords and e[4] in coords):
                plan.append(Placed(coords[e[3]], coords[e[4]], words[0], words[1]))
            else:
                problems.append(f"bad plan entry {' '.join(words)!r}")
        return tuple(plan), problems


def _ints(ids: Iterable[int]) -> list[int]:
    """A list of Python ints from a list, tuple or 1-D tensor."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]
