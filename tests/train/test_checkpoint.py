"""fastrl.train.checkpoint: resume is bit-exact; a crash mid-write never loses a checkpoint."""

from __future__ import annotations

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
