"""Asynchronous GRPO / online DPO (async_rollout) and dynamic sampling (filter_groups) in the trainer.

Each async run starts a rollout worker process (a few seconds on the 2-core machine), so the runs are
short and each test checks several things of one run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastrl.train import ConfigError, GRPOConfig, OnlineDPOConfig, train_grpo, train_online_dpo
from fastrl.train import grpo as grpo_module

from .conftest import TINY, emits_target, online_fields, state, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

ASYNC0 = {"enabled": True, "max_staleness": 0, "threads": 1}
ASYNC1 = {"enabled": True, "max_staleness": 1, "threads": 1}


def records(out: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def test_max_staleness_zero_is_the_synchronous_run_bit_for_bit(prompts_file, tmp_path):
    sync = train_grpo(GRPOConfig(**online_fields(prompts_file, tmp_path / "sync", max_steps=3)))
    other = train_grpo(GRPOConfig(**online_fields(prompts_file, tmp_path / "async", max_steps=3,
                                                  async_rollout=ASYNC0)))
    assert len(sync.history) == len(other.history) == 3
    for a, b in zip(sync.history, other.history):
        for key in ("loss", "grad_norm", "reward/mean", "reward/std", "completions/mean_length", "train_tokens"):
            assert a[key] == b[key], (key, a[key], b[key])
        assert b["async/staleness"] == 0.0 and b["async/version"] == a["step"] - 1
        assert b["async/push_bytes"] > 0 or b["step"] == 1  # the push after step s is reported with step s + 1
    mine, theirs = state(sync.policy), state(other.policy)
    for name, value in mine.items():
        assert torch.equal(value, theirs[name]), name
    # the same completions were sampled and logged
    assert (tmp_path / "sync" / "completions.jsonl").read_text() == (tmp_path / "async" / "completions.jsonl").read_text()


def test_one_step_stale_batches_use_the_sampler_correction(prompts_file, tmp_path, monkeypatch):
    """max_staleness 1: staleness in [0, 1] (1 once the worker runs ahead); the loss gets the worker's
    sampler log-probs, and its value is grpo_loss called directly on the same rows with them."""
    from fastrl.losses import grpo_loss

    seen = []
    real = grpo_module.grpo_head

    def spy(loss_fn, m, *, sampler_logps, num_items):
        head = real(loss_fn, m, sampler_logps=sampler_logps, num_items=num_items)
        fused = head.fused

        def checked(hidden, weight, bias, labels):
            loss, metrics = fused(hidden, weight, bias, labels)
            with torch.no_grad():  # the log-probs of the labels, in fp64, and the loss from them directly
                logits = (hidden.double() @ weight.double().T) / loss_fn.options["temperature"]
                logps = torch.log_softmax(logits, -1).gather(1, labels.view(-1, 1)).view(-1).float()
                direct = grpo_loss(logps, m.old_logps, m.advantages, cu_seqlens=m.batch.cu_seqlens,
                                   ref_logps=m.ref_logps, sampler_logps=sampler_logps,
                                   num_items_in_batch=num_items, settings=loss_fn.settings)[0]
                uncorrected = grpo_loss(logps, m.old_logps, m.advantages, cu_seqlens=m.batch.cu_seqlens,
                                        num_items_in_batch=num_items, settings=loss_fn.settings)[0]
            seen.append((sampler_logps is m.sampler_logps, float(loss), float(direct), float(uncorrected),
                         float((logps - sampler_logps).abs().max())))
            return loss, metrics

        head.fused = checked
        return head

    monkeypatch.setattr(grpo_module, "grpo_head", spy)
    config = GRPOConfig(**online_fields(prompts_file, tmp_path / "run", max_steps=4, async_rollout=ASYNC1))
    assert config.is_cap == 3.0  # max_staleness > 0 without an is_cap: truncated at TRL's default cap
    result = train_grpo(config)
    staleness = [h["async/staleness"] for h in result.history]
    assert staleness[0] == 0.0 and set(staleness) <= {0.0, 1.0} and 1.0 in staleness, staleness
    for h in result.history:
        assert h["async/version"] == h["step"] - 1 - h["async/staleness"]
        for key in ("async/trainer_wait_s", "async/worker_wait_s", "async/pull_s", "worker/rollout_s",
                    "worker/reward_s", "time/wait"):
            assert key in h and h[key] >= 0.0, key
    assert len(seen) == 4
    for same, loss, direct, uncorrected, gap in seen:
        assert same  # the sampler's own log-probs reach the loss
        assert abs(loss - direct) <= 1e-5 * max(1.0, abs(direct)), (loss, direct)
    # a stale step's sampler log-probs differ from the trained policy's, and the correction changes the loss
    stale = [s for s, h in zip(seen, result.history) if h["async/staleness"] == 1.0]
    assert any(gap > 1e-4 for *_, gap in stale)
    assert any(abs(direct - uncorrected) > 1e-7 for _, _, direct, uncorrected, _ in stale)


def test_online_dpo_async(prompts_file, tmp_path):
    fields = online_fields(prompts_file, tmp_path / "run", max_steps=3, num_generations=4, async_rollout=ASYNC1)
    fields.pop("log_completions")
    result = train_online_dpo(OnlineDPOConfig(**fields, beta=0.1))
    assert len(result.history) == 3
    assert all(0.0 <= h["async/staleness"] <= 1.0 for h in result.history)
    assert all("pairs" in h for h in result.history)


def test_bad_async_settings_name_the_field(prompts_file, tmp_path):
    base = online_fields(prompts_file, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"async_rollout\.max_staleness"):
        GRPOConfig(**{**base, "async_rollout": {"enabled": True, "max_staleness": -1}})
    with pytest.raises(ConfigError, match=r"async_rollout\.on_failure"):
        GRPOConfig(**{**base, "async_rollout": {"enabled": True, "on_failure": "retry"}})
    with pytest.raises(ConfigError, match=r"did you mean 'max_staleness'"):
        GRPOConfig(**{**base, "async_rollout": {"enabled": True, "max_stalenes": 2}})
    with pytest.raises(ConfigError, match=r"async_rollout.*rollout_engine"):
        GRPOConfig(**{**base, "async_rollout": True, "rollout_engine": "vllm"})
    with pytest.raises(ConfigError, match=r"filter_groups\.max_tries"):
        GRPOConfig(**{**base, "filter_groups": {"max_tries": 0}})
    with pytest.raises(ConfigError, match=r"filter_groups.*remax"):
        GRPOConfig(**{**base, "filter_groups": {}, "advantage_estimator": "remax"})
    # a reward the worker process cannot receive (a lambda does not pickle)
    config = GRPOConfig(**{**base, "reward_funcs": [lambda prompt_ids, completion_ids, **kw: 1.0],
                           "async_rollout": ASYNC1})
    with pytest.raises(ConfigError, match=r"async_rollout: reward_funcs"):
        train_grpo(config)


# ---------------------------------------------------------------------------------------------- dynamic sampling

def half_constant(prompt_ids, completion_ids, row_kind, target=7, **columns) -> float:
    """All-equal on the 'flat' rows (every completion scores 0.5), the toy task on the others."""
    if row_kind == "flat":
        return 0.5
    return sum(t == target for t in completion_ids) / len(completion_ids)


def _mixed_prompts(path: Path, n: int = 32) -> Path:
    from .conftest import toy_prompts

    rows = toy_prompts(n)
    for i, row in enumerate(rows):
        row["row_kind"] = "flat" if i % 2 else "task"
    return write_jsonl(path, rows)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_filter_groups_never_trains_on_an_all_equal_group(tmp_path, monkeypatch, mode):
    data = _mixed_prompts(tmp_path / "prompts.jsonl")
    trained = []
    real = grpo_module.micro_batches

    def spy(completions, advantages, **kwargs):
        trained.append(len(completions) // completions.group_size)
        rows = [r for r in completions.rows]
        flat = [r for r in rows if r % 2]
        assert not flat, f"a flat row was trained on: {flat}"
        return real(completions, advantages, **kwargs)

    monkeypatch.setattr(grpo_module, "micro_batches", spy)
    extra = {"async_rollout": ASYNC1} if mode == "async" else {}
    result = train_grpo(GRPOConfig(**online_fields(data, tmp_path / "run", max_steps=3, reward_funcs=[half_constant],
                                                   filter_groups={"metric": "reward", "max_tries": 6}, **extra)))
    assert len(result.history) == 3
    for h in result.history:
        assert h["filter/dropped_groups"] >= 1 and h["filter/tries"] >= 2  # half the prompts are flat
        assert h["filter/kept_groups"] + h["filter/short_groups"] == 4
        assert h["filter/extra_generated_tokens"] > 0
    assert trained and all(0 < n <= 4 for n in trained)


def test_filter_groups_short_after_max_tries_trains_on_what_it_has(tmp_path):
    data = _mixed_prompts(tmp_path / "prompts.jsonl")
    result = train_grpo(GRPOConfig(**online_fields(data, tmp_path / "run", max_steps=2, reward_funcs=[half_constant],
                                                   filter_groups={"max_tries": 1})))
    for h in result.history:
        assert h["filter/tries"] == 1.0 and h["filter/short_groups"] >= 1.0


# ---------------------------------------------------------------------------------------------- faults

class _KillWorker:
    """A callback that kills the rollout worker (SIGKILL) at the end of step ``at``."""

    def __init__(self, at: int):
        self.at, self.killed = at, None

    def on_step_end(self, run, step):
        if step == self.at:
            pid = run.source.client.worker_pid
            os.kill(pid, signal.SIGKILL)
            self.killed = pid


def test_a_killed_worker_is_restarted_and_the_run_finishes(prompts_file, tmp_path):
    kill = _KillWorker(2)
    result = train_grpo(GRPOConfig(**online_fields(prompts_file, tmp_path / "run", max_steps=5,
                                                   async_rollout={**ASYNC1, "max_restarts": 1})), callbacks=[kill])
    assert kill.killed is not None
    assert len(result.history) == 5
    assert result.history[-1]["async/restarts"] == 1.0
    assert all(0.0 <= h["async/staleness"] <= 1.0 for h in result.history)


def test_a_killed_worker_stops_the_run_with_a_checkpoint_when_told(prompts_file, tmp_path):
    from fastrl.train.async_rollout import WorkerFailed

    import re

    kill = _KillWorker(2)
    with pytest.raises(WorkerFailed, match=r"^step \d+: .*worker") as info:
        train_grpo(GRPOConfig(**online_fields(prompts_file, tmp_path / "run", max_steps=5,
                                              async_rollout={**ASYNC1, "on_failure": "stop"})), callbacks=[kill])
    # the trainer's state of the last step done is on disk: step 2, or 3 when the worker had sampled
    # step 3 before it was killed (it runs one step ahead)
    failed = int(re.match(r"step (\d+):", str(info.value)).group(1))
    assert failed in (3, 4) and info.value.exitcode == -signal.SIGKILL
    assert (tmp_path / "run" / "checkpoints" / f"step-{failed - 1:08d}" / "model.safetensors").is_file()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_killed_trainer_resumes_and_its_worker_does_not_outlive_it(prompts_file, tmp_path):
    """SIGKILL the trainer after its second checkpoint: the worker exits by itself; --resume auto
    finishes the run from that checkpoint (the batches in flight are sampled again)."""
    import yaml

    out = tmp_path / "run"
    fields = {k: v for k, v in online_fields(prompts_file, out, max_steps=6, save_steps=1).items()
              if k != "reward_funcs"}
    fields.update(reward_funcs=["tests.train.conftest:emits_target"], async_rollout=ASYNC1, threads=1)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(fields))
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "fastrl", "train", "grpo", "--config", str(tmp_path / "run.yaml")]
    proc = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = out / "checkpoints" / "step-00000002" / "model.safetensors"
    deadline = time.monotonic() + 240
    while not checkpoint.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.is_file(), proc.communicate()[1][-3000:] if proc.poll() is not None else "no checkpoint"
    children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(c) for c in children), "the rollout worker outlived its trainer"
    done = subprocess.run(command + ["--resume", "auto"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r["step"] for r in records(out)]
    assert steps == sorted(set(steps)) and steps[-1] == 6, steps
    assert (out / "checkpoints" / "step-00000006" / "model.safetensors").is_file()
