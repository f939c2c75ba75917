"""Launch a Triton kernel on CUDA tensors, or on CPU tensors in Triton's interpreter.

``TRITON_INTERPRET=1`` is read when ``@triton.jit`` decorates a function, so a process that did not
set it at import cannot interpret the already-decorated kernel. :func:`launch` wraps the kernel's
Python function in an ``InterpretedFunction`` when its tensors live on the CPU; that is how the
real kernels run in CI, which has no GPU. Launchers must pass block sizes and ``num_warps``
explicitly (no ``triton.autotune`` on the CPU path).
"""

from __future__ import annotations

import functools

import torch
from triton.runtime.interpreter import InterpretedFunction


@functools.lru_cache(maxsize=None)
def _interpreted(fn) -> InterpretedFunction:
    return InterpretedFunction(fn)


def _on_cpu(args, kwargs) -> bool:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device.type == "cpu"
    return False


def launch(kernel, grid, *args, **kwargs):
    """Run ``kernel[grid](*args, **kwargs)``; in the interpreter when the first tensor is on CPU.

    ``kernel`` is a ``@triton.jit`` function (or one already interpreted because
    ``TRITON_INTERPRET=1`` was set at import). ``grid`` is a tuple or a callable of the meta-params.
    """
    if _on_cpu(args, kwargs) and not isinstance(kernel, InterpretedFunction):
        # The interpreter runs the kernel on host memory; num_warps etc. mean nothing there.
        kwargs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages", "num_ctas")}
        kernel = _interpreted(kernel.fn)
    return kernel[grid](*args, **kwargs)
