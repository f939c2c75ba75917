"""The optional extras of the trainer, when they are installed: bitsandbytes' 8-bit AdamW (its state
is 8-bit, it trains, and resume stays bit-exact), TensorBoard and Weights & Biases (offline) logging.
Each test skips when its package is missing (as in CI); with them installed they run on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from fastrl.train import train_dpo

from .conftest import TINY, dpo_config, state


def test_8bit_adamw_state_trains_and_resumes_bit_exactly(pairs_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    # hidden 64: bitsandbytes keeps tensors under 4096 elements in 32 bits
    model = dict(TINY["qwen2"], hidden_size=64, intermediate_size=128)
    common = dict(max_steps=6, batch_size=8, optimizer="adamw_8bit", lr_scheduler="linear", warmup_steps=2,
                  log_every=1, model_config=model)
    straight = train_dpo(dpo_config(pairs_file, tmp_path / "straight", save_every=3, **common))
    assert straight.history[-1]["loss"] < straight.history[0]["loss"]
    saved = torch.load(straight.checkpoint / "optimizer.pt", weights_only=False)
    quantised = [v for s in saved["state"].values() for v in _tensors(s) if v.dtype == torch.uint8]
    assert quantised, "no 8-bit optimiser state in the checkpoint"
    resumed = train_dpo(dpo_config(pairs_file, tmp_path / "resumed",
                                   resume=str(tmp_path / "straight" / "checkpoints" / "step-00000003"), **common))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[3:]]
    a, b = state(straight.policy), state(resumed.policy)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)


def test_tensorboard_gets_the_logged_metrics(pairs_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train_dpo(dpo_config(pairs_file, out, max_steps=3, log_every=1, report_to=["tensorboard"]))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "loss" in r]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(losses, rel=1e-6)


def test_wandb_offline_run_is_written(pairs_file, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train_dpo(dpo_config(pairs_file, tmp_path / "run", max_steps=2, log_every=1, report_to=["wandb"]))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))  # the run's folder is the output dir
    assert len(runs) == 1
    assert sum(f.stat().st_size for f in runs[0].glob("*.wandb")) > 0


class _FakeRun:
    def __init__(self, **kwargs):
        self.init_kwargs, self.logged, self.finished = kwargs, [], False

    def log(self, record, step):
        self.logged.append((step, dict(record)))

    def finish(self):
        self.finished = True


def test_wandb_gets_every_logged_record(pairs_file, tmp_path, monkeypatch):
    """What the trainer hands to ``wandb`` (a stand-in module, so this runs without the package)."""
    import importlib.machinery
    import sys
    import types

    runs = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kwargs: runs.append(_FakeRun(**kwargs)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    train_dpo(dpo_config(pairs_file, out, max_steps=3, log_every=1, report_to=["wandb"], run_name="toy"))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(runs) == 1 and runs[0].finished
    assert runs[0].init_kwargs["name"] == "toy" and runs[0].init_kwargs["config"]["max_steps"] == 3
    assert [step for step, _ in runs[0].logged] == [1, 2, 3]
    assert [r["loss"] for _, r in runs[0].logged] == [r["loss"] for r in logged if "loss" in r]
