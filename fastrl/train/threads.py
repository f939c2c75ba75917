"""CPU intra-op threads: how many torch uses in this process, chosen once per run.

torch's default is one intra-op thread per core the machine has. On a shared CPU that collapses: an
OpenMP parallel region ends at a barrier, so when one of the threads is descheduled (another process
holds its core) every other thread spin-waits for it, and a step costs several times what losing
those cores should (GitHub issue 19: ``fastrl demo --quick`` 3.4x slower beside one busy process on 2
cores). fastrl therefore chooses the count per process, in this order:

1. the config's ``threads`` field (an int >= 1) — ``reason="config"``;
2. ``OMP_NUM_THREADS`` in the environment (a user's explicit choice) — ``reason="OMP_NUM_THREADS"``;
3. auto: the cores this process may run on (:func:`available_cores`, ``os.sched_getaffinity``, not the
   machine's count), divided by ``share`` (2 in async mode: the trainer and its rollout worker split
   them), and 1 for a model too small to gain from more (fewer than :data:`SMALL_MODEL_PARAMS`
   parameters: its matrix products are too short to amortise a barrier per op, and one thread cannot
   wait for another). On a CUDA device the CPU threads do little: auto keeps ``cores // share``.

:func:`apply` sets it (``torch.set_num_threads``; the inter-op pool only while it has not started).
The run records the choice (``Run.threads``, a :class:`ThreadChoice`) so telemetry can report it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

#: Models with fewer parameters run single-threaded under auto: the test models (a few thousand) and
#: the trainer benchmark's, whose ops take tens of microseconds, the order of an OpenMP fork/join. The
#: demo's tiny Janus (547,264) is above it: its quick demo took 121.6 s with 2 threads and 207.8 s with 1
#: on a quiet 2-core machine (but 185.1 s with 1 thread beside a busy process, where 2 threads lose ~3x);
#: its results were tuned at 2 threads. ``threads: 1`` keeps a run single-threaded on a shared machine.
SMALL_MODEL_PARAMS = 500_000


@dataclasses.dataclass(frozen=True)
class ThreadChoice:
    """The intra-op thread count chosen for this process.

    Args:
        threads: the count (>= 1).
        reason: ``"config"``, ``"OMP_NUM_THREADS"`` or ``"auto: ..."`` (what auto saw).
        cores: the cores this process may run on.
    """

    threads: int
    reason: str
    cores: int

    def metrics(self) -> dict[str, Any]:
        """``{"threads": ..., "threads_reason": ...}`` for a telemetry record."""
        return {"threads": self.threads, "threads_reason": self.reason}


def available_cores() -> int:
    """The cores this process may run on: ``len(os.sched_getaffinity(0))`` (a taskset / cgroup cpuset
    limits it), else ``os.cpu_count()``, at least 1.

    Returns:
        The core count.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores)


def count_parameters(model: Any) -> int | None:
    """The model's parameter count, or None when ``model`` has no ``parameters()``.

    Args:
        model: an ``nn.Module`` (or None).

    Returns:
        The number of parameter elements, or None.
    """
    parameters = getattr(model, "parameters", None)
    if not callable(parameters):
        return None
    return sum(p.numel() for p in parameters())


def choose_threads(*, requested: int | None = None, model: Any = None, share: int = 1,
                   device: Any = "cpu") -> ThreadChoice:
    """The intra-op thread count for this process (the module docstring gives the policy).

    Args:
        requested: the config's ``threads`` (None: not set).
        model: the model the process runs (auto gives 1 thread below :data:`SMALL_MODEL_PARAMS`
            parameters); None: size unknown.
        share: processes splitting this process's cores (2: an async trainer and its rollout worker).
        device: the run's device (``"cpu"``, ``"cuda"``, a ``torch.device``); the size rule is for CPU runs.

    Returns:
        A :class:`ThreadChoice`.

    Raises:
        ValueError: ``requested`` or ``share`` not an int >= 1, naming it.
    """
    cores = available_cores()
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"threads must be an int >= 1 or None, got {requested!r}")
        return ThreadChoice(requested, "config", cores)
    if isinstance(share, bool) or not isinstance(share, int) or share < 1:
        raise ValueError(f"share must be an int >= 1, got {share!r}")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            value = int(env.split(",")[0])  # OpenMP allows a list of nesting levels: the first counts
        except ValueError:
            value = 0
        if value >= 1:
            return ThreadChoice(value, "OMP_NUM_THREADS", cores)
    per_process = max(1, cores // share)
    parts = [f"{cores} cores" + (f" / {share} processes" if share > 1 else "")]
    params = count_parameters(model)
    on_cpu = torch.device(device).type == "cpu" if device is not None else True
    if on_cpu and params is not None and params < SMALL_MODEL_PARAMS and per_process > 1:
        parts.append(f"model of {params:,} parameters < {SMALL_MODEL_PARAMS:,}: 1 thread")
        per_process = 1
    return ThreadChoice(per_process, "auto: " + ", ".join(parts), cores)


def apply(choice: ThreadChoice) -> None:
    """Use ``choice.threads`` intra-op threads in this process (``torch.set_num_threads``) and as many
    inter-op threads when that pool has not started yet (torch allows setting it only once, before
    any inter-op work; later it stays as it is).

    Args:
        choice: from :func:`choose_threads`.
    """
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    try:
        torch.set_num_interop_threads(choice.threads)
    except RuntimeError:  # already set, or the pool already started
        pass
