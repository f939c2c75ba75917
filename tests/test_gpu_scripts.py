"""The GPU visit's two commands stay runnable without a GPU.

`make gpu-smoke` runs benchmarks/gpu_smoke.py; here its checks run at the CPU scale (tiny shapes, the
Triton kernels in the interpreter) against the same references and tolerances, and its runner is held
to its promises: one JSON file per check written as it ends, a failing or raising check recorded while
the next ones still run, a spent budget recorded as skipped. `make gpu-all` hands the benchmark suites a
deadline (FASTRL_BENCH_DEADLINE): past it they skip what is left and still write their JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import load_benchmark_script  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


smoke = load_benchmark_script("gpu_smoke")
# the quick checks; the log-prob and rollout checks take a minute in the interpreter and run in the test below
QUICK = ["build", "group_advantages", "grpo_loss", "dpo_loss", "sampler"]


def _read(out: Path) -> dict[str, dict]:
    results = {}
    for path in sorted(out.glob("[0-9][0-9]-*.json")):
        data = json.loads(path.read_text())
        results[data["check"]] = data
    return results


def test_every_check_is_known_and_ordered():
    names = [fn.__name__ for fn in smoke.CHECKS]
    assert names[0] == "build" and len(names) == len(set(names))
    assert {"selective_logprobs", "fused_linear_logprobs", "group_advantages", "grpo_loss", "dpo_loss", "sampler",
            "rollout"} <= set(names)


def test_quick_checks_pass_on_cpu_and_write_as_they_go(tmp_path):
    mirror = tmp_path / "mirror"
    results = smoke.run("cpu", tmp_path / "out", only=QUICK, mirror=mirror)
    assert [r["check"] for r in results] == QUICK
    bad = {r["check"]: (r.get("error") or r.get("errors")) for r in results if r["status"] != "ok"}
    assert not bad, bad
    on_disk = _read(tmp_path / "out")
    assert set(on_disk) == set(QUICK)
    assert [json.loads(line)["check"] for line in (mirror / "smoke.jsonl").read_text().splitlines()] == QUICK
    lines = (tmp_path / "out" / "smoke.jsonl").read_text().splitlines()
    assert [json.loads(line)["check"] for line in lines] == QUICK
    for r in results[1:]:  # every op check measured errors against a tolerance and timed both sides
        assert r["errors"] and all(len(v) == 2 for v in r["errors"].values())
        assert next(k for k in r if k.startswith("ratio_vs")) and r["seconds"] >= 0


def test_a_wrong_result_fails_and_the_next_checks_still_run(tmp_path, monkeypatch):
    from fastrl.ops import group_advantages as real

    def off_by_a_little(*args, **kwargs):
        return real(*args, **kwargs) + 1e-3

    monkeypatch.setattr("fastrl.ops.group_advantages", off_by_a_little)
    calls = []

    def explodes(ctx):
        calls.append(ctx.scale)
        raise RuntimeError("kernel launch failed")

    explodes.__name__ = "explodes"
    monkeypatch.setattr(smoke, "CHECKS", smoke.CHECKS[:1] + [explodes] + smoke.CHECKS[1:])
    results = {r["check"]: r for r in smoke.run("cpu", tmp_path, only=["build", "explodes", "group_advantages",
                                                                         "dpo_loss"])}
    assert results["explodes"]["status"] == "error" and "kernel launch failed" in results["explodes"]["error"]
    assert results["group_advantages"]["status"] == "fail"
    assert results["dpo_loss"]["status"] == "ok"  # ran after the error and the failure
    assert _read(tmp_path)["explodes"]["status"] == "error"


def test_spent_budget_is_recorded_as_skipped(tmp_path):
    results = smoke.run("cpu", tmp_path, only=["build", "dpo_loss"], budget_s=-1.0)
    assert [r["status"] for r in results] == ["skipped", "skipped"]
    assert "budget" in results[0]["reason"]


def test_unknown_check_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown check.*nope"):
        smoke.run("cpu", tmp_path, only=["nope"])


def test_command_line_exit_status(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "ret"))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--scale", "cpu", "--only",
                           "build,grpo_loss", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gpu-smoke: grpo_loss" in proc.stdout
    copied = (tmp_path / "ret" / "smoke" / "smoke.jsonl").read_text().splitlines()  # copied to $OUT/smoke
    assert [json.loads(line)["check"] for line in copied] == ["build", "grpo_loss"]


@pytest.mark.parametrize("script", ["gpu_smoke.sh", "gpu_all.sh"])
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], check=True)


def test_bench_deadline_skips_and_still_writes_json(tmp_path):
    """The first benchmark runs; then (a plugin moves the deadline into the past) the rest are skipped, and the
    JSON holds the one that ran."""
    (tmp_path / "deadline_after_first.py").write_text(
        "import os, time\n"
        "def pytest_runtest_teardown(item):\n"
        "    os.environ['FASTRL_BENCH_DEADLINE'] = str(time.time() - 1)\n")
    out = tmp_path / "bench.json"
    env = dict(os.environ, FASTRL_BENCH_SCALE="cpu", PYTHONPATH=str(tmp_path))
    env.pop("FASTRL_BENCH_DEADLINE", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench_grpo.py", "-q", "-p", "no:cacheprovider", "-rs",
                           "-p", "deadline_after_first", "--benchmark-only", "--benchmark-max-time=0.01",
                           f"--benchmark-json={out}", "-k", "group_advantages and fastrl"],
                          cwd=ROOT / "benchmarks", capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout and "FASTRL_BENCH_DEADLINE" in proc.stdout, proc.stdout
    assert len(json.loads(out.read_text())["benchmarks"]) == 1


def test_log_prob_and_rollout_checks_pass_on_cpu(tmp_path):
    results = smoke.run("cpu", tmp_path, only=["selective_logprobs", "fused_linear_logprobs", "rollout"])
    bad = {r["check"]: (r.get("error") or r.get("errors")) for r in results if r["status"] != "ok"}
    assert not bad, bad
