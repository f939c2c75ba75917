"""fastrl.train.threads: the intra-op thread policy (config > OMP_NUM_THREADS > auto) and start_run applying it."""

import os

import pytest
import torch

from fastrl.train import ConfigError
from fastrl.train import threads as th
from fastrl.train.run import RUN_NEUTRAL, start_run

from .conftest import dpo_config


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cores(monkeypatch):
    """Pretend the process may run on ``n`` cores; OMP_NUM_THREADS unset."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def set_cores(n: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)
    return set_cores


def big_model() -> torch.nn.Module:
    return torch.nn.Linear(1500, 1500)  # 2.25M parameters, above SMALL_MODEL_PARAMS


def test_available_cores_follows_affinity(cores):
    cores(3)
    assert th.available_cores() == 3


def test_available_cores_falls_back_to_cpu_count(monkeypatch):
    def refuse(pid):
        raise OSError("no affinity")
    monkeypatch.setattr(os, "sched_getaffinity", refuse, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 5)
    assert th.available_cores() == 5


def test_order_config_then_env_then_auto(cores, monkeypatch):
    cores(8)
    assert th.choose_threads(requested=None, model=big_model()) == th.ThreadChoice(8, "auto: 8 cores", 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert th.choose_threads(requested=None, model=big_model()) == th.ThreadChoice(3, "OMP_NUM_THREADS", 8)
    assert th.choose_threads(requested=5, model=big_model()) == th.ThreadChoice(5, "config", 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")  # not a count: ignored
    assert th.choose_threads(requested=None, model=big_model()).threads == 8


def test_small_model_gets_one_thread(cores):
    cores(4)
    choice = th.choose_threads(requested=None, model=torch.nn.Linear(64, 64))
    assert choice.threads == 1 and "parameters" in choice.reason
    assert th.choose_threads(requested=None, model=torch.nn.Linear(64, 64), device="cuda").threads == 4
    assert th.choose_threads(requested=None, model=None).threads == 4  # size unknown


def test_share_splits_cores(cores):
    cores(8)
    assert th.choose_threads(requested=None, model=big_model(), share=2).threads == 4
    cores(3)
    assert th.choose_threads(requested=None, model=big_model(), share=2).threads == 1
    cores(1)
    assert th.choose_threads(requested=None, model=big_model(), share=2).threads == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_requested(bad):
    with pytest.raises(ValueError, match="threads"):
        th.choose_threads(requested=bad)


@pytest.mark.parametrize("bad", [0, -2, 2.0, "2", True])
def test_config_rejects_bad_threads(tmp_path, pairs_file, bad):
    with pytest.raises(ConfigError, match=r"DPOConfig\.threads"):
        dpo_config(pairs_file, tmp_path / "run", threads=bad)


def test_threads_is_run_neutral():
    assert "threads" in RUN_NEUTRAL  # a resume may change it: it does not change what is trained


def test_apply_sets_torch(restore_threads):
    th.apply(th.ThreadChoice(1, "config", 2))
    assert torch.get_num_threads() == 1


def test_start_run_applies_config_threads(tmp_path, pairs_file, restore_threads):
    torch.set_num_threads(1)
    run = start_run(dpo_config(pairs_file, tmp_path / "run", threads=2, device="cpu"))
    assert run.threads == th.ThreadChoice(2, "config", th.available_cores())
    assert torch.get_num_threads() == 2


def test_start_run_auto_tiny_model_single_thread(tmp_path, pairs_file, restore_threads, cores):
    cores(4)
    torch.set_num_threads(3)
    run = start_run(dpo_config(pairs_file, tmp_path / "run", device="cpu"))
    assert run.threads.threads == 1 and run.threads.reason.startswith("auto: 4 cores")
    assert run.threads.metrics() == {"threads": 1, "threads_reason": run.threads.reason}
    assert torch.get_num_threads() == 1
