"""The rollout worker process (fastrl.train.async_rollout): weights, staleness, faults, close.

Each AsyncRollout starts a worker process (about 3 s on the 2-core machine: spawn, import torch and
fastrl.train), so each test starts one (the restart test two) and checks several things with it.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from fastrl.train.async_rollout import AsyncRollout, AsyncSetupError, SharedWeights, WorkerFailed

from .async_producers import broken_producer, weights_producer

SPAWN = torch.multiprocessing.get_context("spawn")


def tiny(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).to(dtype)
    model.register_buffer("counter", torch.zeros(2))
    return model


def train_step(model: torch.nn.Module, step: int) -> dict[str, torch.Tensor]:
    """A stand-in for an optimiser step: every parameter changes. Returns the new weights."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1 + step)
    return snapshot(model)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_weights(payload: dict, expected: dict[str, torch.Tensor]) -> None:
    assert payload["weights"].keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(payload["weights"][name], value), name


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------------------------- no process

def test_setup_errors_name_the_field():
    model = tiny()
    for bad in (-1, 1.5, True):
        with pytest.raises(AsyncSetupError, match="max_staleness") as e:
            AsyncRollout(model, weights_producer, (), max_staleness=bad)
        assert e.value.field == "async_rollout.max_staleness"
    with pytest.raises(AsyncSetupError) as e:
        AsyncRollout(model, weights_producer, (), max_staleness=1, on_failure="retry")
    assert e.value.field == "async_rollout.on_failure"
    with pytest.raises(AsyncSetupError) as e:
        AsyncRollout(model, weights_producer, (), max_staleness=1, threads=0)
    assert e.value.field == "async_rollout.threads"
    # an argument that cannot be pickled: named by its position, before any process starts
    with pytest.raises(AsyncSetupError, match=r"args\[1\]") as e:
        AsyncRollout(model, weights_producer, (0.0, lambda x: x), max_staleness=1)
    assert e.value.field == "args[1]" and isinstance(e.value, ValueError)

    def local(m):
        return m

    with pytest.raises(AsyncSetupError) as e:
        AsyncRollout(model, local, (), max_staleness=1)
    assert e.value.field == "make_producer"
    odd = tiny()
    odd.hook = lambda: None  # a model that carries something unpicklable
    with pytest.raises(AsyncSetupError) as e:
        AsyncRollout(odd, weights_producer, (), max_staleness=1)
    assert e.value.field == "model"
    with pytest.raises(AsyncSetupError) as e:
        AsyncRollout(model, weights_producer, (), max_staleness=1, trainable=["nope.weight"])
    assert e.value.field == "trainable"


def test_shared_weights_push_pull_in_one_process():
    """bf16 stays bf16 (bytes = numel * 2); only the trainable tensors move; the private copy owns its memory."""
    model = tiny(torch.bfloat16)
    model[0].bias.requires_grad_(False)  # frozen: not pushed
    shared = SharedWeights(model, ctx=SPAWN, version=3)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert shared.names == trainable and shared.version == 3
    assert all(p.is_shared() for p in shared.shadow.parameters())
    private, version = shared.private_copy()
    assert version == 3 and not any(p.is_shared() for p in private.parameters())
    assert all(p.dtype == torch.bfloat16 for p in private.parameters())

    frozen_before = model[0].bias.detach().clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    seconds, nbytes = shared.push(model, 4)
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert nbytes == numel * 2 == shared.nbytes and seconds >= 0 and shared.version == 4
    assert shared.wait_for(4, timeout=0.1) >= 0
    version, _, pulled = shared.pull(private, 3)
    assert version == 4 and pulled == nbytes
    for name, p in private.named_parameters():
        want = model.get_parameter(name) if name in trainable else frozen_before
        assert p.dtype == torch.bfloat16 and torch.equal(p, want), name
    assert shared.pull(private, 4)[1:] == (0.0, 0)  # nothing newer: nothing copied
    with pytest.raises(TimeoutError):
        shared.wait_for(5, timeout=0.05)

    # a lock held elsewhere: push gives up after its timeout (the caller then checks the worker)
    held, release = threading.Event(), threading.Event()

    def holder():
        shared._lock.acquire()
        held.set()
        release.wait(5)
        shared._lock.release()

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    with pytest.raises(TimeoutError):
        shared.push(model, 5, timeout=0.05)
    release.set()
    thread.join()
    assert shared.push(model, 5, timeout=1.0)[1] == nbytes and shared.version == 5
    with pytest.raises(ValueError, match="push"):
        shared.push(torch.nn.Linear(2, 2).to(torch.bfloat16), 6)


# ---------------------------------------------------------------------------------------------- a worker

def test_zero_staleness_samples_with_the_pushed_weights_and_a_slow_worker_makes_the_trainer_wait():
    model = tiny()
    versions = {0: snapshot(model)}
    rollout = AsyncRollout(model, weights_producer, (0.15, None, 20_000), max_staleness=0, threads=1)
    spill = rollout._worker.spill_dir
    pids = set()
    try:
        for step in range(4):
            rollout.request(step, [step, step + 10])
            delivery = rollout.receive(step)
            payload = delivery.payload
            assert delivery.step == payload["step"] == step and payload["indices"] == [step, step + 10]
            assert delivery.version == step  # k = 0: exactly the synchronous run's weights
            assert_weights(payload, versions[step])
            assert payload["threads"] == 1 and len(payload["blob"]) == 20_000  # a large message (via a file)
            assert not any(payload["shared"])  # the worker samples from its private copy
            assert delivery.trainer_wait_s >= 0.1  # the worker is the slow side
            assert delivery.produce_s >= 0.1 and delivery.restarts == 0
            if step > 0:
                assert delivery.pull_bytes == rollout.shared.nbytes and delivery.pull_s > 0
            pids.add(payload["pid"])
            versions[step + 1] = train_step(model, step)
            seconds, nbytes = rollout.push(model, step + 1)
            assert nbytes == sum(p.numel() * 4 for p in model.parameters()) and seconds >= 0
        assert rollout.version == 4 and rollout.startup_s > 0
        with pytest.raises(ValueError, match="not requested"):
            rollout.receive(9)
        rollout.request(4, [1])
        with pytest.raises(ValueError, match="requested already"):
            rollout.request(4, [1])
    finally:
        pid = rollout.worker_pid
        rollout.close()
    assert pids == {pid} and pid != os.getpid()
    assert not alive(pid) and not os.path.exists(spill)
    rollout.close()  # twice: nothing happens
    with pytest.raises(RuntimeError, match="closed"):
        rollout.request(5, [1])


def test_staleness_is_bounded_when_the_trainer_is_the_slow_side():
    """k = 2, every step requested up front, a fast worker: each batch by a version in [s - 2, s], and the
    worker runs ahead until it waits for weights."""
    k, steps = 2, 7
    model = tiny()
    versions = {0: snapshot(model)}
    rollout = AsyncRollout(model, weights_producer, (), max_staleness=k, threads=1)
    try:
        for step in range(steps):
            rollout.request(step, [step])
        seen = []
        for step in range(steps):
            delivery = rollout.receive(step)
            assert step - k <= delivery.version <= step, (step, delivery.version)
            assert_weights(delivery.payload, versions[delivery.version])
            seen.append((step - delivery.version, delivery.worker_wait_s))
            time.sleep(0.2)  # the slow trainer
            versions[step + 1] = train_step(model, step)
            rollout.push(model, step + 1)
    finally:
        rollout.close()
    assert [s for s, _ in seen[:k + 1]] == [0, 1, 2]  # steps 0..k need no update: version 0
    assert max(s for s, _ in seen) == k
    assert any(wait > 0.05 for _, wait in seen[k + 1:])  # the worker waited for the trainer's weights


def test_a_killed_worker_is_restarted_with_the_current_weights_then_fails_past_max_restarts():
    model = tiny()
    versions = {0: snapshot(model)}
    rollout = AsyncRollout(model, weights_producer, (0.1,), max_staleness=1, max_restarts=1, threads=1)
    try:
        first = rollout.worker_pid
        got = []
        for step in range(6):
            if step == 0:
                rollout.request(0, [0])
            if step + 1 < 6:
                rollout.request(step + 1, [step + 1])
            if step == 3:  # steps 3 and 4 outstanding, the worker busy: it dies
                os.kill(rollout.worker_pid, signal.SIGKILL)
            delivery = rollout.receive(step)
            assert delivery.payload["step"] == step and delivery.payload["indices"] == [step]
            assert step - 1 <= delivery.version <= step
            assert_weights(delivery.payload, versions[delivery.version])
            got.append((delivery.payload["pid"], delivery.restarts))
            versions[step + 1] = train_step(model, step)
            rollout.push(model, step + 1)
        assert rollout.restarts == 1 and rollout.worker_pid != first and not alive(first)
        assert got[0] == (first, 0) and got[-1] == (rollout.worker_pid, 1)
        rollout.request(6, [6])
        pid = rollout.kill_worker_for_test()
        with pytest.raises(WorkerFailed, match=r"died \(exit code -9, SIGKILL\).*max_restarts 1") as e:
            rollout.receive(6)
        assert e.value.exitcode == -9 and e.value.step == 6 and e.value.restarts == 1
        assert not alive(pid)
    finally:
        rollout.close()


def test_on_failure_stop_raises_worker_failed():
    model = tiny()
    rollout = AsyncRollout(model, weights_producer, (), max_staleness=1, on_failure="stop", threads=1)
    try:
        rollout.request(0, [0])
        rollout.receive(0)
        rollout.request(1, [1])
        os.kill(rollout.worker_pid, signal.SIGKILL)
        with pytest.raises(WorkerFailed, match=r"rollout worker .* died .*step 1.*on_failure is 'stop'") as e:
            rollout.receive(1)
        assert e.value.exitcode == -9 and e.value.step == 1 and rollout.restarts == 0
    finally:
        rollout.close()


def test_producer_errors_come_back_to_the_trainer_and_a_silent_worker_times_out():
    model = tiny()
    plan = {1: "value_error", 2: "unpicklable_error", 3: ("sleep", 30.0)}
    rollout = AsyncRollout(model, weights_producer, (0.0, plan), max_staleness=0, threads=1)
    try:
        rollout.request(0, [0])
        rollout.receive(0)
        rollout.push(model, 1)
        rollout.request(1, [1])
        with pytest.raises(ValueError, match="bad batch at step 1") as e:
            rollout.receive(1)
        assert "Traceback" in str(e.value.__cause__) and "weights_producer" not in str(e.value)
        rollout.push(model, 2)
        rollout.request(2, [2])
        with pytest.raises(RuntimeError, match=r"NeedsTwoArgs while producing step 2: needs 2 and more") as e:
            rollout.receive(2)
        assert "Traceback" in str(e.value) and "async_producers.py" in str(e.value)
        rollout.push(model, 3)
        rollout.request(3, [3])
        rollout.timeout_s = 1.0
        start = time.perf_counter()
        with pytest.raises(WorkerFailed, match="no batch for step 3 after 1 s") as e:
            rollout.receive(3)
        assert 1.0 <= time.perf_counter() - start < 10 and e.value.exitcode is None and e.value.step == 3
    finally:
        pid = rollout.worker_pid
        rollout.close_grace_s = 0.5
        start = time.perf_counter()
        rollout.close()  # the worker sleeps in its producer: terminated after the grace period
        assert time.perf_counter() - start < 10
    assert not alive(pid)


def test_a_producer_that_fails_to_build_raises_in_the_trainer():
    rollout = AsyncRollout(tiny(), broken_producer, (), max_staleness=1, threads=1)
    try:
        rollout.request(0, [0])
        with pytest.raises(LookupError, match="no producer today"):
            rollout.receive(0)
        assert rollout.restarts == 0
    finally:
        rollout.close()


ORPHAN = """
import sys, time, torch
from fastrl.train.async_rollout import AsyncRollout
from tests.train.async_producers import weights_producer
if __name__ == "__main__":
    rollout = AsyncRollout(torch.nn.Linear(2, 2), weights_producer, (), max_staleness=0, threads=1)
    rollout.request(0, [0]); rollout.receive(0)
    rollout.request(1, [1])  # the worker waits for version 1, which never comes
    print(rollout.worker_pid, rollout._worker.spill_dir, flush=True)
    time.sleep(120)
"""


def test_the_worker_exits_when_its_trainer_is_killed(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "trainer.py"
    script.write_text(ORPHAN)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    trainer = subprocess.Popen([sys.executable, str(script)], cwd=repo, env=env, stdout=subprocess.PIPE, text=True)
    try:
        pid, spill = trainer.stdout.readline().split()
        pid = int(pid)
        assert alive(pid)
    finally:
        trainer.kill()
        trainer.wait()
    deadline = time.monotonic() + 20
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid), "the rollout worker outlived its trainer"
    assert not os.path.exists(spill)
