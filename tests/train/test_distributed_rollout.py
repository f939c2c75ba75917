"""The rollout of an FSDP2-sharded policy on 2 gloo processes takes the lean decoder (not the HF
fallback that ``fully_shard``'s forward hooks used to force) and draws what one process draws."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [20]]

WORKER = r'''
import json, sys
import torch
from fastrl.train import distributed
from fastrl.train.online import rollout
from tests.train.test_distributed_rollout import config, policy_and_model

torch.set_num_threads(1)
world = distributed.init_world("cpu")
policy, model = policy_and_model()
distributed.shard(policy, list(model.model.layers), world)
layers = model.model.layers
before = [g.post_forward_mesh_info is None for l in layers for g in l._get_fsdp_state()._fsdp_param_groups]
runs = []
for step in range(2):  # twice: the units are resharded and restored between rollouts
    out = rollout(policy, PROMPTS, [0, 1, 2], config=config(), world=world, stop_ids=[],
                  generator=torch.Generator().manual_seed(step))
    runs.append({"engine": out.engine, "completions": out.completions,
                 "logps": [t.tolist() for t in out.sampler_logps]})
after = [g.post_forward_mesh_info is None for l in layers for g in l._get_fsdp_state()._fsdp_param_groups]
sharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
with open(sys.argv[1] + f"/rank{world.rank}.json", "w") as f:
    json.dump({"runs": runs, "before": before, "after": after, "sharded": sharded}, f)
distributed.close_world()
'''.replace("PROMPTS", repr(PROMPTS))


def policy_and_model():
    from fastrl.train.model import Policy

    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128))
    return Policy(model), model


def config():
    return SimpleNamespace(num_generations=3, max_completion_length=10, temperature=1.0, top_k=0, top_p=1.0,
                           min_p=0.0, rollout_engine="auto", rollout_keep_cuda_graph=False)


def test_fsdp2_rollout_takes_the_lean_decoder_and_matches_one_process(tmp_path):
    from fastrl.train.distributed import World
    from fastrl.train.online import rollout

    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "worker.py"), str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]

    policy, _ = policy_and_model()
    world = World(0, 1, 0, torch.device("cpu"))
    single = [rollout(policy, PROMPTS, [0, 1, 2], config=config(), world=world, stop_ids=[],
                      generator=torch.Generator().manual_seed(step)) for step in range(2)]
    assert all(out.engine == "fastrl" for out in single)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [r["engine"] for r in result["runs"]] == ["fastrl", "fastrl"], rank
        for got, want in zip(result["runs"], single):
            assert got["completions"] == want.completions, rank
            for a, b in zip(got["logps"], want.sampler_logps):
                torch.testing.assert_close(torch.tensor(a), b, atol=1e-5, rtol=1e-5)
        # the layers reshard after forward again (as before the rollout) and hold their shards only
        assert result["after"] == result["before"] and not any(result["before"])
        assert result["sharded"]
