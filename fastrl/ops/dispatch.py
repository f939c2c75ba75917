"""Which implementation an op runs: the Triton kernel or the plain torch reference.

``auto`` (the default) runs Triton on CUDA tensors when Triton is installed and the torch
reference otherwise. ``triton`` forces the kernels, on CPU tensors through Triton's interpreter
(slow: meant for tests, which is how CI checks the real kernels without a GPU). ``torch`` forces
the reference. Choose with the ``FASTRL_BACKEND`` environment variable or, for a block of code,
with :func:`backend`, which wins over the variable::

    with fastrl.ops.backend("torch"):
        logp = fastrl.ops.selective_logprobs(logits, labels)

Ops resolve the backend inside their registered implementation, at run time, so a
``torch.compile``d graph follows the setting in force when it runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch

__all__ = ["BACKENDS", "ENV_VAR", "backend", "requested_backend", "resolve", "triton_available"]

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "FASTRL_BACKEND"

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastrl_backend", default=None)


def _check_name(name: object, source: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name.strip().lower()


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (looked up once, not imported).

    Returns:
        True when the ``triton`` package is installed.
    """
    return importlib.util.find_spec("triton") is not None


def requested_backend() -> str:
    """The backend asked for: the innermost :func:`backend` block, else ``FASTRL_BACKEND``, else auto.

    Returns:
        ``"auto"``, ``"torch"`` or ``"triton"``.

    Raises:
        ValueError: ``FASTRL_BACKEND`` is set to something else (the message names the variable).
    """
    name = _override.get()
    if name is not None:
        return name
    value = os.environ.get(ENV_VAR, "")
    return _check_name(value, ENV_VAR) if value.strip() else "auto"


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force ``"torch"`` or ``"triton"`` (or restore ``"auto"``) for the ops run inside the block.

    Blocks nest (the innermost wins) and win over ``FASTRL_BACKEND``. The setting is a
    :mod:`contextvars` variable: a block in one thread does not affect the others.

    Args:
        name: ``"auto"``, ``"torch"`` or ``"triton"`` (case and surrounding spaces ignored).

    Yields:
        Nothing; the setting holds until the block exits.

    Raises:
        ValueError: ``name`` is not a backend.
    """
    token = _override.set(_check_name(name, "backend"))
    try:
        yield
    finally:
        _override.reset(token)


def resolve(device: torch.device) -> str:
    """The backend, ``"torch"`` or ``"triton"``, that an op on tensors of ``device`` runs now.

    ``auto`` gives Triton on CUDA tensors when Triton is installed, the torch reference otherwise.

    Args:
        device: the device of the op's tensors.

    Returns:
        ``"torch"`` or ``"triton"``.

    Raises:
        RuntimeError: ``triton`` is asked for but Triton is not installed.
        ValueError: ``triton`` is asked for on a device other than cuda or cpu, or
            ``FASTRL_BACKEND`` holds no backend name.
    """
    name = requested_backend()
    if name == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}/backend asks for triton, but Triton is not installed")
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"the triton backend runs on cuda or cpu tensors, got {device.type}")
        return "triton"
    if name == "torch":
        return "torch"
    return "triton" if device.type == "cuda" and triton_available() else "torch"
