"""The canvas: a size × size grid of cells, each empty or holding one coloured shape.

Row 0 is the top row and column 0 the leftmost column; a canvas is written row-major, one image token
per cell. :meth:`Canvas.from_ascii` / :meth:`Canvas.ascii` give a compact text form for tests and logs:
one two-letter code per cell, ``..`` for empty, else the colour's initial in upper case and the shape's
in lower case (``Rc`` red circle, ``Bs`` blue square, ``Gt`` green triangle, ``Yc`` yellow circle).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
ITEMS = tuple((colour, shape) for colour in COLOURS for shape in SHAPES)  # the 12 drawable objects

_COLOUR_CODE = {c: c[0].upper() for c in COLOURS}
_SHAPE_CODE = {s: s[0] for s in SHAPES}
_FROM_CODE = {_COLOUR_CODE[c] + _SHAPE_CODE[s]: (c, s) for c, s in ITEMS}


class Placed(NamedTuple):
    """One object on a canvas: its cell (row from the top, column from the left) and what it is."""

    row: int
    col: int
    colour: str
    shape: str


@dataclass(frozen=True)
class Canvas:
    """A ``size`` × ``size`` grid; ``cells`` is row-major, each ``None`` (empty) or ``(colour, shape)``."""

    size: int
    cells: tuple[tuple[str, str] | None, ...]

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        if len(self.cells) != self.size * self.size:
            raise ValueError(f"cells: a {self.size}x{self.size} canvas has {self.size ** 2} cells, "
                             f"got {len(self.cells)}")
        for item in self.cells:
            if item is not None and tuple(item) not in _ITEM_SET:
                raise ValueError(f"cells: {item!r} is not a (colour, shape) of {COLOURS} x {SHAPES}")

    @classmethod
    def blank(cls, size: int = 6) -> Canvas:
        return cls(size, (None,) * (size * size))

    @classmethod
    def from_objects(cls, size: int, objects: Iterable[Placed | tuple[int, int, str, str]]) -> Canvas:
        """A canvas holding ``objects``; two objects in one cell raise ``ValueError``."""
        cells: list[tuple[str, str] | None] = [None] * (size * size)
        for row, col, colour, shape in objects:
            if not (0 <= row < size and 0 <= col < size):
                raise ValueError(f"objects: cell ({row}, {col}) is outside a {size}x{size} canvas")
            if cells[row * size + col] is not None:
                raise ValueError(f"objects: two objects in cell ({row}, {col})")
            cells[row * size + col] = (colour, shape)
        return cls(size, tuple(cells))

    @classmethod
    def from_ascii(cls, text: str) -> Canvas:
        """Parse the :meth:`ascii` form (blank lines and surrounding whitespace are ignored)."""
        rows = [line.split() for line in text.strip().splitlines() if line.strip()]
        size = len(rows)
        if any(len(r) != size for r in rows):
            raise ValueError(f"text: a canvas is square; got rows of lengths {[len(r) for r in rows]}")
        cells = []
        for code in (code for r in rows for code in r):
            if code == "..":
                cells.append(None)
            elif code in _FROM_CODE:
                cells.append(_FROM_CODE[code])
            else:
                raise ValueError(f"text: unknown cell code {code!r} (use '..' or e.g. 'Rc', 'Bs', 'Gt', 'Yc')")
        return cls(size, tuple(cells))

    def at(self, row: int, col: int) -> tuple[str, str] | None:
        return self.cells[row * self.size + col]

    def with_cell(self, row: int, col: int, item: tuple[str, str] | None) -> Canvas:
        """A copy with cell (row, col) set to ``item`` (``None`` empties it)."""
        cells = list(self.cells)
        cells[row * self.size + col] = item
        return Canvas(self.size, tuple(cells))

    def objects(self) -> list[Placed]:
        """The objects on the canvas, row-major."""
        return [Placed(i // self.size, i % self.size, *item) for i, item in enumerate(self.cells) if item is not None]

    def empty_cells(self) -> list[tuple[int, int]]:
        return [(i // self.size, i % self.size) for i, item in enumerate(self.cells) if item is None]

    def ascii(self) -> str:
        return "\n".join(" ".join(_code(self.at(r, c)) for c in range(self.size)) for r in range(self.size))


_ITEM_SET = frozenset(ITEMS)


def _code(item: tuple[str, str] | None) -> str:
    return ".." if item is None else _COLOUR_CODE[item[0]] + _SHAPE_CODE[item[1]]

