"""Triton kernels of fastrl, installed as ``fastrl.kernels``.

This package holds only ``@triton.jit`` kernels and their launchers. Checks, autograd and the
choice of backend live in :mod:`fastrl.ops`. Importing it needs Triton; :mod:`fastrl.ops` imports
it lazily, only when a Triton kernel is about to run. The package itself does not import Triton
(:func:`launch` loads on first use), so its plain-number modules (e.g. :mod:`fastrl.kernels.grpo_columns`)
import without it.
"""

__all__ = ["launch"]


def __getattr__(name: str):
    if name == "launch":
        from .launch import launch

        globals()["launch"] = launch
        return launch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
