"""benchmarks/bench_trainer.py stays runnable: its fastrl side trains a few steps of each method at the
CPU shapes, in this process and in a worker process, and the table reads its results; the TRL side
runs too where TRL is installed (not in CI)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from conftest import load_benchmark_script  # noqa: E402

bt = load_benchmark_script("bench_trainer")


@pytest.fixture(scope="module")
def workspace():
    with bt.workspace("cpu", list(bt.CASES["cpu"]), rows=16) as root:
        yield root


@pytest.fixture
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case_name", ["grpo beta=0.04", "dpo precomputed"])
def test_fastrl_side_measures_steps(workspace, tmp_path, case_name, one_thread):
    case = bt.CASES["cpu"][case_name]
    result = bt.run_fastrl(case, workspace, workspace / f"{bt._slug(case_name)}.jsonl", tmp_path, total=3,
                           warmup=1, cuda=False)
    assert len(result["periods_s"]) == 2 and all(p > 0 for p in result["periods_s"])
    assert result["tokens_per_step"] == bt.tokens_per_step(case)
    assert result["tokens_per_s"] == pytest.approx(2 * result["tokens_per_step"] / sum(result["periods_s"]))
    assert {"train", "optimizer", "reference", "other"} <= set(result["phases_s"])
    if case["method"] == "grpo":
        assert result["phases_s"]["rollout"] > 0 and result["phases_s"]["reference"] > 0


def _table_of(results: dict[str, dict], case_name: str, path: Path) -> str:
    runs = {c: r["runs"] for c, r in results.items() if "runs" in r}
    benchmarks = [{"extra_info": {"case": case_name, "contender": c, **bt.aggregate(mine),
                                  **bt.ratios(mine, {o: theirs for o, theirs in runs.items() if o != c})}}
                  for c, mine in runs.items()]
    path.write_text(json.dumps({"benchmarks": benchmarks}))
    return bt.table(str(path))


def test_worker_processes_and_table(workspace, tmp_path):
    results = bt.measure_case("cpu", "grpo beta=0", contenders=["fastrl"], warmup=1, steps=2, rounds=1, threads=1,
                              workdir=workspace, log=lambda *a: None)
    run = results["fastrl"]["runs"][0]
    assert run["peak_rss_bytes"] >= run["base_rss_bytes"] > 0
    text = _table_of(results, "grpo beta=0", tmp_path / "bench.json")
    assert "| grpo beta=0 | fastrl |" in text


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed")
def test_trl_side_measures_steps(workspace, tmp_path):
    results = bt.measure_case("cpu", "dpo live", contenders=["fastrl", "trl"], warmup=1, steps=2, rounds=1, threads=1,
                              workdir=workspace, log=lambda *a: None)
    for contender in ("fastrl", "trl"):
        run = results[contender]["runs"][0]
        assert run["tokens_per_step"] == bt.tokens_per_step(bt.CASES["cpu"]["dpo live"])
        assert run["phases_s"]["reference"] > 0
    assert "fastrl / TRL" in _table_of(results, "dpo live", tmp_path / "bench.json")
