"""Shared test helpers and the ``gpu`` marker (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (make gpu-test)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of ``counts`` against ``probs`` (zero-probability bins
    must be empty: a draw there is an outright failure, reported as p = 0)."""
    counts = counts.double()
    probs = probs.double()
    if (counts[probs == 0] > 0).any():
        return 0.0
    support = probs > 0
    if int(support.sum()) < 2:
        return 1.0
    expected = probs[support] * counts.sum()
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(support.sum() - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, stat / 2))


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)
