"""Triton kernels of fastrl, installed as ``fastrl.kernels``.

This package holds only ``@triton.jit`` kernels and their launchers. Checks, autograd and the
choice of backend live in :mod:`fastrl.ops`. Importing it needs Triton; :mod:`fastrl.ops` imports
it lazily, only when a Triton kernel is about to run.
"""

from .launch import launch

__all__ = ["launch"]
