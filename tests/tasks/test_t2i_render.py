"""Rendering writes PNGs (skipped without matplotlib) and says clearly when matplotlib is missing."""

from __future__ import annotations

import sys

import pytest

from fastrl.tasks.t2i import Canvas, plot_reward_curves, render_canvases
from fastrl.tasks.t2i.render import render_images

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CANVAS = Canvas.from_ascii("Rc .. Bs\n.. Gt ..\nYc .. Ys")


def test_render_canvases_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = render_canvases(tmp_path / "out" / "canvases.png",
                           {"SFT": [("a red circle left of a blue square", CANVAS)] * 3,
                            "GRPO": [("three green triangles", Canvas.blank(3))]}, title="demo")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_render_images_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    import torch

    from fastrl.tasks.t2i.pixels import decode_codes

    images = decode_codes(torch.arange(36).remainder(13)[None].repeat(2, 1))
    path = render_images(tmp_path / "images.png", {"SFT": [("a red circle", images[0]), ("a square", images[1])]})
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="panels"):
        render_images(tmp_path / "none.png", {})


def test_reward_curves_write_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_reward_curves(tmp_path / "curves.png", {"DPO": ([0, 1, 2], [0.2, 0.4, 0.5]),
                                                        "GRPO": ([0, 1, 2], [0.2, 0.3, 0.6])})
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="steps"):
        plot_reward_curves(tmp_path / "bad.png", {"DPO": ([0, 1], [0.1])})


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        render_canvases(tmp_path / "x.png", {"SFT": [("a red circle", CANVAS)]})
