"""benchmarks/bench_trainer.py stays runnable: its fastrl side trains a few steps of each method at the
CPU shapes, in this process and in a worker process, and the table reads its results; the TRL side
runs too where TRL is installed (not in CI)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
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
    benchmarks = [{"extra_info": {"case": case_name, "contender": c, **bt.CASES["cpu"][case_name], **bt.aggregate(mine),
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


def test_async_case_runs_at_equal_cores():
    case = bt.CASES["cpu"]["grpo async"]
    assert {k: v for k, v in case.items() if k not in ("max_staleness", "worker_threads")} == \
        bt.CASES["cpu"]["grpo beta=0"]
    threads = dict(bt.case_contenders("cpu", "grpo async", threads=1))
    assert threads["fastrl-async"] + case["worker_threads"] == threads["fastrl"] == threads["trl"] == 2
    # the other cases keep fastrl and TRL at the run's threads
    assert bt.case_contenders("cpu", "dpo live", threads=3) == [("fastrl", 3), ("trl", 3)]
    assert bt.case_contenders("gpu", "grpo async", threads=0) == [("fastrl-async", 0), ("fastrl", 0)]


def test_gpu_async_case_arguments(workspace, tmp_path):
    """The GPU case cannot run without CUDA; its config and the command line's refusal are checked."""
    case = bt.CASES["gpu"]["grpo async"]
    config = bt.fastrl_config(case, workspace, workspace / "grpo_async.jsonl", tmp_path, total=3, cuda=True,
                              asynchronous=True)
    assert config.async_rollout["enabled"] and config.async_rollout["max_staleness"] == case["max_staleness"]
    assert config.async_rollout["threads"] is None and config.device == "cuda" and config.dtype == "bfloat16"
    assert bt.fastrl_config(case, workspace, workspace / "grpo_async.jsonl", tmp_path, total=3,
                            cuda=True).async_options() is None
    with pytest.raises(ValueError, match="fastrl-async"):
        bt.fastrl_config(bt.CASES["gpu"]["dpo live"], workspace, workspace / "dpo_live.jsonl", tmp_path, total=3,
                         cuda=True, asynchronous=True)
    import torch

    if not torch.cuda.is_available():
        assert bt.main(["--device", "gpu", "-k", "grpo_async"]) == 2


def test_children_peak_rss_sees_an_exited_child():
    subprocess.run([sys.executable, "-c", "x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096])"],
                   check=True)
    assert bt._children_peak_rss() >= 300 * 2**20


def test_async_contender_and_table(workspace, tmp_path):
    pytest.importorskip("fastrl.train.async_rollout")
    results = bt.measure_case("cpu", "grpo async", contenders=[("fastrl-async", 1), ("fastrl", 2)], warmup=1, steps=2,
                              rounds=1, threads=1, workdir=workspace, log=lambda *a: None)
    run = results["fastrl-async"]["runs"][0]
    assert run["threads"] == 1 and run["worker_threads"] == 1 and results["fastrl"]["runs"][0]["threads"] == 2
    assert run["worker_peak_rss_bytes"] > 0
    assert run["peak_rss_bytes"] == run["trainer_peak_rss_bytes"] + run["worker_peak_rss_bytes"]
    assert 0 <= run["staleness_mean"] <= 1 and run["worker_phases_s"]["rollout"] > 0
    assert run["tokens_per_step"] == bt.tokens_per_step(bt.CASES["cpu"]["grpo async"])
    text = _table_of(results, "grpo async", tmp_path / "bench.json")
    assert "| grpo async | fastrl-async | 1 + 1 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| grpo async | fastrl | 2 |"))
    assert row.split("|")[6].strip().endswith("x")  # fastrl-async / fastrl tokens/s
    assert "mean staleness" in text


def test_async_curves_writes_its_json(tmp_path):
    pytest.importorskip("fastrl.train.async_rollout")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "async_curves.py"
    proc = subprocess.run([sys.executable, str(script), "--steps", "2", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "async_curves.json").read_text())
    assert record["steps"] == 2 and record["async"]["max_staleness"] == 1
    for mode in ("sync", "async"):
        assert len(record[mode]["reward"]) == 2 and record[mode]["wall_s"] > 0
        assert record[mode]["final_mean"] == pytest.approx(sum(record[mode]["reward"]) / 2)
    assert all(0 <= s <= 1 for s in record["async"]["staleness"])
    assert record["sync"]["reward"][0] == record["async"]["reward"][0]  # step 0: the same weights, the same seed
