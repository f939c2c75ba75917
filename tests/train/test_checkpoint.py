"""fastrl.train.checkpoint: resume is bit-exact; a crash mid-write never loses a checkpoint."""

from __future__ import annotations

import os

import pytest
import torch

from fastrl.train import train_dpo
from fastrl.train import checkpoint as checkpoint_module

from .conftest import dpo_config, state


def test_resume_is_bit_exact(pairs_file, tmp_path):
    # 16 pairs per step over 64 pairs: the run crosses an epoch (and a reshuffle) after step 4;
    # warm-up then linear decay: the schedule's state matters; live reference: its weights too
    common = dict(max_steps=6, batch_size=4, gradient_accumulation_steps=4, lr_scheduler="linear", warmup_steps=2,
                  weight_decay=0.01, reference="live")
    straight = train_dpo(dpo_config(pairs_file, tmp_path / "straight", save_every=3, **common))
    middle = tmp_path / "straight" / "checkpoints" / "step-00000003"
    assert middle.is_dir()
    resumed = train_dpo(dpo_config(pairs_file, tmp_path / "resumed", resume=str(middle), **common))
    assert resumed.steps == 3
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[3:]]
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in straight.history[3:]]
    a, b = state(straight.policy), state(resumed.policy)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_is_a_model_directory(pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM

    result = train_dpo(dpo_config(pairs_file, tmp_path / "run", max_steps=2))
    assert result.checkpoint.name == "step-00000002"
    assert {p.name for p in result.checkpoint.iterdir()} >= {"model.safetensors", "config.json", "optimizer.pt",
                                                              "trainer_state.pt", "trainer_state.json"}
    loaded = AutoModelForCausalLM.from_pretrained(result.checkpoint, local_files_only=True)
    trained = state(result.policy)
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())


def test_crash_mid_write_keeps_the_previous_checkpoint(pairs_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def crashing_save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # optimizer.pt of the second checkpoint (step 4)
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        train_dpo(dpo_config(pairs_file, out, max_steps=6, save_every=2, batch_size=4))
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    root = out / "checkpoints"
    assert (root / "latest").read_text() == "step-00000002"
    assert (root / "step-00000004.tmp").is_dir() and not (root / "step-00000004").exists()
    assert checkpoint_module.find_checkpoint(out, "auto") == root / "step-00000002"
    # resume="auto" continues from step 2; the debris of the crash goes with the next save
    resumed = train_dpo(dpo_config(pairs_file, out, max_steps=6, save_every=2, batch_size=4, resume="auto"))
    assert resumed.steps == 4 and resumed.history[0]["step"] == 3
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000004", "step-00000006"]
    straight = train_dpo(dpo_config(pairs_file, tmp_path / "straight", max_steps=6, batch_size=4))
    a, b = state(straight.policy), state(resumed.policy)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_auto_without_checkpoint_starts_fresh(pairs_file, tmp_path):
    result = train_dpo(dpo_config(pairs_file, tmp_path / "run", max_steps=1, resume="auto"))
    assert result.steps == 1


def test_reference_file_round_trip_with_tied_weights(tmp_path):
    """Online DPO's previous-iterate reference: written beside a checkpoint with JSON tie metadata, read
    back into a model (tied weights restored), and pruned with its checkpoint; a file of the older
    Python-literal metadata still loads."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fastrl.train.distributed import World
    from fastrl.train.model import Policy

    def policy(seed):
        torch.manual_seed(seed)
        config = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
        return Policy(Qwen2ForCausalLM(config))

    world = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    source, target = policy(0), policy(1)
    checkpoint_module.save_reference(source, tmp_path, 3, world)
    path = tmp_path / "checkpoints" / "reference-step-00000003.safetensors"
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["tied"]) == {"lm_head.weight": "model.embed_tokens.weight"}
    (tmp_path / "checkpoints" / "step-00000003").mkdir()
    checkpoint_module.load_reference(target, tmp_path / "checkpoints" / "step-00000003")
    a, b = state(source), state(target)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert target.model.lm_head.weight.data_ptr() == target.model.model.embed_tokens.weight.data_ptr()

    old = tmp_path / "checkpoints" / "reference-step-00000005.safetensors"  # metadata written with repr()
    tensors = {k.removeprefix("model."): v.contiguous() for k, v in policy(2).state_dict().items()
               if k != "model.lm_head.weight"}
    save_file(tensors, str(old), metadata={"tied": repr({"lm_head.weight": "model.embed_tokens.weight"})})
    (tmp_path / "checkpoints" / "step-00000005").mkdir()
    checkpoint_module.load_reference(target, tmp_path / "checkpoints" / "step-00000005")
    assert torch.equal(target.model.lm_head.weight, tensors["model.embed_tokens.weight"])

    (tmp_path / "checkpoints" / "step-00000003").rmdir()
    checkpoint_module.prune_reference_files(tmp_path)
    assert not path.exists() and old.exists()
    with pytest.raises(FileNotFoundError, match="previous-iterate reference"):
        checkpoint_module.load_reference(target, tmp_path / "checkpoints" / "step-00000003")


def test_a_resumed_run_drops_the_records_it_redoes(tmp_path):
    from fastrl.train.telemetry import drop_records_after

    path = tmp_path / "metrics.jsonl"
    records = "".join(f'{{"step": {s}, "loss": 0.5}}\n' for s in (1, 2, 3, 4))
    path.write_text(records + '{"step": 5, "lo')  # the last line cut short by a crash
    assert drop_records_after(path, 2) == 3
    assert path.read_text() == '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.5}\n'
    assert drop_records_after(path, 2) == 0 and drop_records_after(tmp_path / "none.jsonl", 0) == 0
    assert not (tmp_path / "none.jsonl").exists()


def test_save_puts_back_the_old_copy_a_crash_left(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fastrl.train.distributed import World
    from fastrl.train.model import Policy

    torch.manual_seed(0)
    policy = Policy(Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)))
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    world = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

    def save(step):
        return checkpoint_module.save_checkpoint(tmp_path, step, policy=policy, optimizer=optimizer,
                                                 scheduler=scheduler, trainer_state={"step": step}, config={},
                                                 world=world, keep=3)

    root = tmp_path / "checkpoints"
    os.rename(save(1), root / "step-00000001.old")  # a crash between the two renames of saving step 1 again
    assert checkpoint_module.find_checkpoint(tmp_path, "auto") is None
    save(2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001", "step-00000002"]
    assert (root / "step-00000001" / "trainer_state.pt").is_file()
