"""fastrl.train.online (what GRPO and online DPO share) and fastrl.train.run.end_step (the end of every
recipe's step): the optimiser step, counters, log record, samples and checkpoint, in that order."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastrl.train.distributed import World
from fastrl.train.distributed import reduce_metrics
from fastrl.train.online import Completions, gather_rows, sample_records, step_generator
from fastrl.train.optim import NonFiniteSteps
from fastrl.train.run import Run, end_step

ONE = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class _Telemetry:
    def __init__(self):
        self.phases, self.advanced, self.samples = [], 0, []

    @contextlib.contextmanager
    def phase(self, name):
        self.phases.append(name)
        yield

    def advance(self):
        self.advanced += 1

    def log(self, step, record):
        return {"step": step, **record}

    def log_completions(self, step, samples):
        self.samples.append((step, samples))


def _run(tmp_path, *, total_steps=3, log_every=2, save_every=0, log_completions=1) -> Run:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    config = SimpleNamespace(log_every=log_every, save_every=save_every, log_completions=log_completions,
                             max_grad_norm=0.0)
    run = Run(config=config, world=ONE, out=Path(tmp_path), tokenizer=None, model=model, vocab_size=2, policy=model)
    run.order, run.total_steps = SimpleNamespace(epoch=0, state_dict=lambda: {"epoch": 0}), total_steps
    run.optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda k: 1.0 / (k + 1))
    run.guard, run.telemetry = NonFiniteSteps(3), _Telemetry()
    return run


def _backward(run):
    run.policy(torch.ones(1, 3)).sum().backward()


def test_end_step_steps_the_optimiser_then_logs_on_log_steps(tmp_path):
    run = _run(tmp_path)
    calls = []
    before = run.policy.weight.detach().clone()
    _backward(run)
    end_step(run, 1, started=time.perf_counter(), loss=0.25, tokens=10, flops=1e6,
             record=lambda: calls.append(1) or {"loss": 0.25})
    assert not calls and not run.history  # step 1 of 3 with log_every 2: not a log step
    assert not torch.equal(run.policy.weight, before) and run.policy.weight.grad is None
    assert run.tokens_seen == 10 and run.telemetry.advanced == 1 and run.telemetry.phases == ["optimizer"]
    _backward(run)
    end_step(run, 2, started=time.perf_counter(), loss=0.5, tokens=6, flops=1e6, layout=(6.0, 8.0, 12.0),
             record=lambda: {"loss": 0.5}, samples=lambda: ["a sample"])
    (record,) = run.history
    assert record["step"] == 2 and record["loss"] == 0.5 and record["lr"] == pytest.approx(0.25)  # lr before the step
    assert record["skipped"] == 0.0 and record["grad_norm"] > 0 and record["tokens_seen"] == 16
    assert record["packing_efficiency"] == 0.5 and record["batch_fill"] == 0.75
    assert run.telemetry.samples == [(2, ["a sample"])]


def test_end_step_without_anything_to_learn_skips_the_optimiser(tmp_path):
    run = _run(tmp_path, log_every=1)
    before = run.policy.weight.detach().clone()
    _backward(run)
    end_step(run, 1, started=time.perf_counter(), loss=math.nan, empty=True, tokens=4, flops=1.0,
             record=lambda: {"pairs": 0.0})
    assert torch.equal(run.policy.weight, before) and run.policy.weight.grad is None  # gradients dropped
    assert run.scheduler.last_epoch == 1 and run.guard.total == 0  # the schedule moved; not a bad step
    (record,) = run.history
    assert record["grad_norm"] == 0.0 and record["skipped"] == 1.0 and record["lr"] == 0.5


def test_end_step_after_the_recipes_own_updates_reads_them_from_the_record(tmp_path):
    run = _run(tmp_path, log_every=1, log_completions=0)
    saved = []
    end_step(run, 1, started=time.perf_counter(), tokens=4, flops=1.0,
             record=lambda: {"grad_norm": 3.0, "skipped": 1.0}, samples=lambda: pytest.fail("log_completions is 0"),
             save=lambda r, s: saved.append(s) or Path("x"))
    assert run.scheduler.last_epoch == 0 and run.telemetry.phases == []  # nothing stepped here
    assert run.history[0]["grad_norm"] == 3.0 and run.history[0]["skipped"] == 1.0 and saved == []


def test_end_step_checkpoints_when_due(tmp_path):
    run = _run(tmp_path, save_every=2, log_every=5)
    saved = []
    for step in (1, 2, 3):
        _backward(run)
        end_step(run, step, started=time.perf_counter(), loss=0.1, tokens=1, flops=1.0, record=dict,
                 save=lambda r, s: saved.append(s) or Path(f"step-{s}"))
    assert saved == [2] and run.last_saved == Path("step-2")
    assert len(run.history) == 1  # the last step is always logged


def test_one_process_helpers_are_identities():
    rows = torch.arange(6.0).view(3, 2)
    assert gather_rows(rows, ONE) is rows
    metrics = {"loss": 1.5, "kl": 0.25}
    assert reduce_metrics(metrics, ONE.device) == metrics


def test_step_generator_is_a_function_of_seed_rank_and_step():
    cpu = torch.device("cpu")
    draw = [torch.rand(3, generator=step_generator(1, r, s, cpu)) for r, s in ((0, 4), (0, 4), (1, 4), (0, 5))]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2]) and not torch.equal(draw[0], draw[3])


def test_sample_records():
    completions = Completions(prompts=[[1, 2], [1, 2]], completions=[[3], [4, 5]],
                              sampler_logps=[torch.zeros(1), torch.zeros(2)], stopped=torch.tensor([True, False]),
                              rows=[0, 0], group_size=2)
    rewards = torch.tensor([[1.0], [float("nan")]])
    out = sample_records(completions, rewards, torch.tensor([0.5, -0.5]), None, 5)
    assert out == [{"prompt": [1, 2], "completion": [3], "rewards": [1.0], "finish_reason": "stop", "advantage": 0.5},
                   {"prompt": [1, 2], "completion": [4, 5], "rewards": [None], "finish_reason": "length",
                    "advantage": -0.5}]
    assert len(sample_records(completions, rewards, None, None, 1)) == 1
    assert completions.lengths.tolist() == [1, 2]
