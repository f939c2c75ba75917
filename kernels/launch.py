"""Launch a Triton kernel on CUDA tensors, or on CPU tensors in Triton's interpreter.

``TRITON_INTERPRET=1`` is read when ``@triton.jit`` decorates a function, so a process that did not
set it at import cannot interpret the already-decorated kernel. :func:`launch` wraps the kernel's
Python function in an ``InterpretedFunction`` when its tensors live on the CPU; that is how the
real kernels run in CI, which has no GPU. During such a launch, calls to other ``@triton.jit``
functions (``tl.zeros``, ``tl.sum``, ``tl.max`` and our own helpers are such functions) are routed to
their interpreted form as well. Launchers must pass block sizes explicitly (no ``triton.autotune``
on the CPU path). Interpreted launches are serialised by a lock; the interpreter patches
``triton.language`` for the whole process while one runs, so compiling a GPU kernel on another
thread at that moment is not safe.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
from triton.runtime.interpreter import InterpretedFunction, _patch_lang
from triton.runtime.jit import JITFunction

_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _interpreted(fn) -> InterpretedFunction:
    return InterpretedFunction(fn)


def _on_cpu(args, kwargs) -> bool:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device.type == "cpu"
    return False


@contextlib.contextmanager
def _jit_calls_interpreted():
    """Route device-function calls of ``@triton.jit`` functions to the interpreter."""
    original = JITFunction.__call__

    def call(self, *args, **kwargs):
        # What InterpretedFunction.__call__ does for a device function, except that the language
        # patch it needs (for the modules the callee sees) is undone afterwards, so that compiling
        # kernels for a GPU later in the process sees the real triton.language.
        scope = _patch_lang(self.fn)
        try:
            return _interpreted(self.fn).rewrite()(*args, **kwargs)
        finally:
            if scope is not None:
                scope.restore()

    with _lock:  # the interpreter's patches and grid index are process-wide: one launch at a time
        JITFunction.__call__ = call
        try:
            yield
        finally:
            JITFunction.__call__ = original


def launch(kernel, grid, *args, **kwargs):
    """Run ``kernel[grid](*args, **kwargs)``; in the interpreter when the first tensor is on CPU.

    ``kernel`` is a ``@triton.jit`` function (or one already interpreted because
    ``TRITON_INTERPRET=1`` was set at import). ``grid`` is a tuple or a callable of the meta-params.
    """
    if isinstance(kernel, InterpretedFunction):  # TRITON_INTERPRET=1 was set at import
        with _lock:
            return kernel[grid](*args, **kwargs)
    if _on_cpu(args, kwargs):
        # The interpreter runs the kernel on host memory; num_warps etc. mean nothing there.
        kwargs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages", "num_ctas")}
        with _jit_calls_interpreted():
            return _interpreted(kernel.fn)[grid](*args, **kwargs)
    return kernel[grid](*args, **kwargs)
