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


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu_only: contender that exists only on CUDA")
