"""Two processes (torchrun, gloo, FSDP2 ``fully_shard``) train exactly as one process on the same data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from fastrl.train import train_dpo

from .conftest import TINY, dpo_config, state

REPO = Path(__file__).resolve().parents[2]


def test_two_gloo_processes_match_one(pairs_file, tmp_path):
    common = dict(max_steps=4, gradient_accumulation_steps=2, learning_rate=3e-3, lr_scheduler="linear", warmup_steps=1)
    single = train_dpo(dpo_config(pairs_file, tmp_path / "one", batch_size=4, **common))

    config = {"model_config": TINY["qwen2"], "train_data": str(pairs_file), "output_dir": str(tmp_path / "two"),
              "batch_size": 2, "progress": False, **common}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "fastrl", "train", "dpo", "--config", str(tmp_path / "two.yaml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]

    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4
    for a, b in zip(single.history, records):
        for key in ("loss", "rewards/margins", "grad_norm", "tokens"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])

    from safetensors.torch import load_file

    sharded = load_file(str(tmp_path / "two" / "checkpoints" / "step-00000004" / "model.safetensors"))
    for name, value in state(single.policy).items():
        torch.testing.assert_close(sharded[name], value, rtol=1e-4, atol=1e-5, msg=name)
