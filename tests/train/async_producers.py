"""Producers for the rollout-worker tests (module level: the worker process imports them)."""

from __future__ import annotations

import os
import time

import torch


class NeedsTwoArgs(Exception):
    """An exception that pickles but does not unpickle (its __init__ takes two arguments)."""

    def __init__(self, a, b):
        super().__init__(f"needs {a} and {b}")


def weights_producer(model: torch.nn.Module, delay: float = 0.0, plan: dict | None = None, extra_bytes: int = 0):
    """``produce(step, indices)`` -> the worker's weights (clones), its pid and thread count.

    Args:
        model: the worker's private model.
        delay: seconds each batch takes.
        plan: step -> "value_error" | "unpicklable_error" | ("sleep", seconds).
        extra_bytes: that many bytes more in each payload (a large message).
    """
    plan = plan or {}

    def produce(step: int, indices: list[int]) -> dict:
        what = plan.get(step)
        if what == "value_error":
            raise ValueError(f"bad batch at step {step}")
        if what == "unpicklable_error":
            raise NeedsTwoArgs(step, "more")
        if isinstance(what, tuple) and what[0] == "sleep":
            time.sleep(what[1])
        time.sleep(delay)
        return {"step": step, "indices": list(indices), "pid": os.getpid(), "threads": torch.get_num_threads(),
                "weights": {name: t.detach().clone() for name, t in model.state_dict().items()},
                "shared": [p.is_shared() for p in model.parameters()], "blob": b"x" * extra_bytes}

    return produce


def broken_producer(model: torch.nn.Module):
    """make_producer that fails in the worker."""
    raise LookupError("no producer today")
