"""Shared pieces of the benchmark suites: scale (CPU or GPU shapes) and timing on either device."""

from __future__ import annotations

import os

import pytest
import torch

SCALE = os.environ.get("FASTRL_BENCH_SCALE", "cpu")
DEVICE = "cuda" if SCALE == "gpu" else "cpu"

if SCALE == "gpu" and not torch.cuda.is_available():
    raise pytest.UsageError("FASTRL_BENCH_SCALE=gpu needs a CUDA device")


def synchronized(fn):
    """On CUDA, wait for the device so the wall-clock time covers the kernels."""
    if DEVICE != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _rss_peak() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_extra_bytes(step) -> int | None:
    """Memory above the starting point at the peak of one run of ``step``: the CUDA allocator's peak
    on GPU; on CPU the peak resident set size (Linux: VmHWM, reset through /proc/self/clear_refs).
    None where neither can be read."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS to the current RSS
    except OSError:
        return None
    base = _rss_peak()
    step()
    peak = _rss_peak()
    return None if base is None or peak is None else peak - base


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu_only: contender that exists only on CUDA")
