"""Loads ``fastrl._C``, the C++ extension that registers the ``torch.ops.fastrl`` operators."""

from __future__ import annotations

import torch  # noqa: F401  (libtorch must be loaded before the extension)

try:
    from fastrl import _C
except ImportError as exc:  # a source tree that was not built, or a broken build
    _C = None
    _import_error: ImportError | None = exc
else:
    _import_error = None


def available() -> bool:
    """True when the C++ extension is importable."""
    return _C is not None


def cuda_enabled() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return _C is not None and bool(_C.cuda_enabled())


def cpu_isa() -> str | None:
    """Instruction set the CPU kernels dispatch to on this machine, or None without the extension."""
    return None if _C is None else str(_C.cpu_isa())


def require(what: str) -> None:
    """Raise a RuntimeError that says how to build the extension when it is missing."""
    if _C is None:
        raise RuntimeError(
            f"{what} needs the fastrl C++ extension, which failed to import ({_import_error}). "
            "Build it with `make install` or `pip install -e . --no-build-isolation`."
        )
