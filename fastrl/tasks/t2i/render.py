"""Pictures: canvases drawn as coloured shapes, decoded images, and reward curves. Needs matplotlib (imported
on call)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

from fastrl.tasks.t2i.grid import Canvas

COLOUR_RGB = {"red": "#d62728", "green": "#2ca02c", "blue": "#1f77b4", "yellow": "#f2c500"}


def _figure(width: float, height: float):
    """A matplotlib Figure with an Agg canvas, without pyplot (no global state, no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("rendering needs matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def draw_canvas(ax, canvas: Canvas) -> None:
    """Draw ``canvas`` on a matplotlib Axes: grid lines, circles, squares and triangles (row 0 at the top)."""
    from matplotlib.patches import Circle, Polygon, Rectangle

    n = canvas.size
    ax.set_xlim(0, n)
    ax.set_ylim(n, 0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for k in range(n + 1):
        ax.axhline(k, color="#dddddd", lw=0.6, zorder=0)
        ax.axvline(k, color="#dddddd", lw=0.6, zorder=0)
    for o in canvas.objects():
        x, y, colour = o.col + 0.5, o.row + 0.5, COLOUR_RGB[o.colour]
        if o.shape == "circle":
            patch = Circle((x, y), 0.36)
        elif o.shape == "square":
            patch = Rectangle((x - 0.34, y - 0.34), 0.68, 0.68)
        else:
            patch = Polygon([(x, y - 0.38), (x - 0.38, y + 0.32), (x + 0.38, y + 0.32)])
        patch.set_facecolor(colour)
        patch.set_edgecolor("black")
        patch.set_linewidth(0.6)
        ax.add_patch(patch)


def _panel_grid(path: str | Path, panels: Mapping[str, Sequence[tuple[str, object]]], draw, *, title: str | None,
                panel_size: float, dpi: int) -> Path:
    """A PNG grid, one row per method, ``draw(ax, item)`` for each ``(prompt text, item)`` with the prompt
    above it. Returns the path written."""
    rows = list(panels.items())
    if not rows or not any(items for _, items in rows):
        raise ValueError("panels: nothing to draw")
    ncols = max(len(items) for _, items in rows)
    fig = _figure(panel_size * ncols + 0.6, (panel_size + 0.45) * len(rows) + (0.4 if title else 0))
    for r, (method, items) in enumerate(rows):
        for c in range(ncols):
            ax = fig.add_subplot(len(rows), ncols, r * ncols + c + 1)
            if c < len(items):
                prompt, item = items[c]
                draw(ax, item)
                ax.set_title("\n".join(textwrap.wrap(prompt, 26)), fontsize=7)
            else:
                ax.axis("off")
            if c == 0:
                ax.set_ylabel(method, fontsize=10, fontweight="bold")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def render_canvases(path: str | Path, panels: Mapping[str, Sequence[tuple[str, Canvas]]], *,
                    title: str | None = None, panel_size: float = 1.9, dpi: int = 110) -> Path:
    """A PNG grid of canvases: one row per method (``panels[method]`` = its ``(prompt text, canvas)``
    list), the prompt above each canvas. Returns the path written."""
    return _panel_grid(path, panels, draw_canvas, title=title, panel_size=panel_size, dpi=dpi)


def render_images(path: str | Path, panels: Mapping[str, Sequence[tuple[str, object]]], *, title: str | None = None,
                  panel_size: float = 1.9, dpi: int = 110) -> Path:
    """A PNG grid of decoded images: one row per method (``panels[method]`` = its ``(prompt text, pixels)``
    list, pixels uint8 ``[H, W, 3]``, e.g. from :func:`~fastrl.tasks.t2i.pixels.decode_codes`), the
    prompt above each image, drawn pixel for pixel. Returns the path written."""
    def draw(ax, pixels):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.imshow(pixels.numpy() if hasattr(pixels, "numpy") else pixels, interpolation="nearest")

    return _panel_grid(path, panels, draw, title=title, panel_size=panel_size, dpi=dpi)


def plot_reward_curves(path: str | Path, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
                       title: str = "Training reward", xlabel: str = "step", ylabel: str = "mean reward",
                       dpi: int = 110) -> Path:
    """A PNG of ``curves[method] = (steps, values)``, one line per method. Returns the path written."""
    if not curves:
        raise ValueError("curves: nothing to plot")
    return plot_training_curves(path, {title: curves}, xlabel=xlabel, ylabel=ylabel, dpi=dpi)


def plot_training_curves(path: str | Path, panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
                         *, title: str | None = None, xlabel: str = "step", ylabel: str = "",
                         dpi: int = 110) -> Path:
    """A PNG with one panel per ``panels[panel title]``, each ``{label: (steps, values)}`` drawn as lines
    (a panel or a curve without points is left out). Returns the path written."""
    panels = {name: {label: c for label, c in curves.items() if len(c[0])} for name, curves in panels.items()}
    panels = {name: curves for name, curves in panels.items() if curves}
    if not panels:
        raise ValueError("panels: nothing to plot")
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = _figure(6.0 * ncols, 3.6 * nrows + (0.4 if title and len(panels) > 1 else 0))
    for k, (name, curves) in enumerate(panels.items()):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        for label, (steps, values) in curves.items():
            if len(steps) != len(values):
                raise ValueError(f"curves[{label!r}]: {len(steps)} steps but {len(values)} values")
            ax.plot(list(steps), list(values), label=label, marker="o" if len(steps) < 20 else None, markersize=3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title and len(panels) > 1:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
