"""fastrl.train.dpo: the DPO recipe learns a toy preference, and its parts compose as they should."""

from __future__ import annotations

import pytest
import torch

from fastrl.train import train_dpo
from fastrl.train.data import load_preference_pairs
from fastrl.train.model import Policy, load_model
from fastrl.train.optim import NonFiniteSteps, optimizer_step
from fastrl.train.packing import pack
from fastrl.train.model import pair_logps

from .conftest import dpo_config, state


@torch.no_grad()
def _accuracy(policy, reference, pairs) -> float:
    """Implicit-reward accuracy over every pair: (π_c − ρ_c) > (π_r − ρ_r)."""
    idx = range(len(pairs))
    batch = pack([pairs.prompts[i] for i in idx] * 2, [pairs.chosen[i] for i in idx] + [pairs.rejected[i] for i in idx])
    pc, pr = pair_logps(policy, batch)
    rc, rr = pair_logps(reference, batch)
    return float(((pc - rc) > (pr - rr)).float().mean())


def test_dpo_raises_reward_accuracy(pairs_file, tmp_path):
    config = dpo_config(pairs_file, tmp_path / "run", max_steps=24)
    initial = Policy(load_model(None, config.model_config, dtype=torch.float32, attn_implementation="sdpa", seed=0))
    result = train_dpo(config)
    history = result.history
    assert len(history) == 24 and result.steps == 24
    assert history[0]["rewards/accuracies"] == 0.0  # policy == reference: every margin is 0
    assert history[-1]["loss"] < history[0]["loss"] - 0.3
    assert min(h["rewards/accuracies"] for h in history[-5:]) == 1.0
    assert history[-1]["rewards/margins"] > history[5]["rewards/margins"] > 0
    pairs = load_preference_pairs(config, None, 64)
    assert _accuracy(result.policy, initial, pairs) == 1.0
    for key in ("tokens_per_s", "packing_efficiency", "time/train", "time/reference", "grad_norm", "lr", "tflops"):
        assert key in history[-1]
    assert history[0]["reference/cache_hit"] == 0.0 and history[0]["reference/precompute_s"] > 0
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 24


def test_live_and_precomputed_references_agree(pairs_file, tmp_path):
    runs = {}
    for name, reference in (("pre", "precomputed"), ("live", "live")):
        runs[name] = train_dpo(dpo_config(pairs_file, tmp_path / name, reference=reference, max_steps=3))
    for a, b in zip(runs["pre"].history, runs["live"].history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    assert runs["live"].history[0]["time/reference"] > 0
    # the second precomputed run reads the cache of the first (same data, model and settings)
    again = train_dpo(dpo_config(pairs_file, tmp_path / "pre2", max_steps=1,
                                 reference_cache_dir=str(tmp_path / "pre" / "reference_cache")))
    assert again.history[0]["reference/cache_hit"] == 1.0
    assert again.history[0]["loss"] == runs["pre"].history[0]["loss"]
    changed = train_dpo(dpo_config(pairs_file, tmp_path / "pre3", max_steps=1, ld_alpha=0.5,
                                   reference_cache_dir=str(tmp_path / "pre" / "reference_cache")))
    assert changed.history[0]["reference/cache_hit"] == 0.0  # another setting, another key


def test_gradient_accumulation_matches_one_large_batch(pairs_file, tmp_path):
    one = train_dpo(dpo_config(pairs_file, tmp_path / "a", batch_size=8, max_steps=2, shuffle=False))
    four = train_dpo(dpo_config(pairs_file, tmp_path / "b", batch_size=2, gradient_accumulation_steps=4, max_steps=2,
                                shuffle=False))
    for a, b in zip(one.history, four.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for name, value in state(one.policy).items():
        torch.testing.assert_close(value, state(four.policy)[name], rtol=1e-4, atol=1e-5, msg=name)


def test_padding_gradient_checkpointing_and_llama_train_the_same(pairs_file, tmp_path):
    base = train_dpo(dpo_config(pairs_file, tmp_path / "a", max_steps=2))
    for name, fields in {"pad": {"packing": False}, "ckpt": {"gradient_checkpointing": True}}.items():
        other = train_dpo(dpo_config(pairs_file, tmp_path / name, max_steps=2, **fields))
        for a, b in zip(base.history, other.history):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), name
        # padded: every slot of the padded rows counts; ckpt lays out its batches as the base run does
        expected = base.history[0]["batch_fill"] if name == "ckpt" else other.history[0]["packing_efficiency"]
        assert other.history[0]["batch_fill"] == expected
    llama = train_dpo(dpo_config(pairs_file, tmp_path / "llama", model="llama", max_steps=6))
    assert llama.history[-1]["loss"] < llama.history[0]["loss"]


def test_bf16_autocast_and_reference_free_losses(pairs_file, tmp_path):
    bf16 = train_dpo(dpo_config(pairs_file, tmp_path / "bf16", bf16=True, max_steps=6))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in bf16.history)
    assert bf16.history[-1]["loss"] < bf16.history[0]["loss"]
    simpo = train_dpo(dpo_config(pairs_file, tmp_path / "simpo", loss_type="simpo", beta=2.0, max_steps=3))
    assert "reference/precompute_s" not in simpo.history[0]
    assert not (tmp_path / "simpo" / "reference_cache").exists()


def test_non_finite_steps_are_skipped_then_stop_the_run():
    layer = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    guard = NonFiniteSteps(limit=2)
    before = layer.weight.detach().clone()
    layer(torch.randn(3, 4)).sum().backward()
    layer.weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="step 1: non-finite loss or gradient"):
        norm, stepped = optimizer_step(layer, optimizer, scheduler, max_grad_norm=1.0, loss=torch.tensor(0.5),
                                       guard=guard, step=1)
    assert not stepped and torch.equal(layer.weight, before) and layer.weight.grad is None
    assert scheduler.last_epoch == 0 and guard.consecutive == 1
    layer(torch.randn(3, 4)).sum().backward()
    norm, stepped = optimizer_step(layer, optimizer, scheduler, max_grad_norm=1.0, loss=torch.tensor(0.5),
                                   guard=guard, step=2)
    assert stepped and guard.consecutive == 0 and guard.total == 1 and scheduler.last_epoch == 1
    for step in (3, 4):
        layer(torch.randn(3, 4)).sum().backward()
        with pytest.warns(RuntimeWarning), pytest.raises(FloatingPointError, match="max_bad_steps=2") if step == 4 \
                else _nothing():
            optimizer_step(layer, optimizer, scheduler, max_grad_norm=0.0, loss=torch.tensor(float("inf")),
                           guard=guard, step=step)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_too_little_data_for_one_step_names_batch_size(pairs_file, tmp_path):
    from fastrl.train import ConfigError

    with pytest.raises(ConfigError, match=r"DPOConfig\.batch_size: train_data has 64 pairs, fewer than one step"):
        train_dpo(dpo_config(pairs_file, tmp_path / "run", batch_size=40, gradient_accumulation_steps=2))


def test_local_model_directory_with_a_tokenizer_and_text(tmp_path):
    from fastrl.train import DPOConfig

    from .conftest import TINY, make_tokenizer, write_jsonl

    model_dir = tmp_path / "model"
    load_model(None, TINY["llama"], dtype=torch.float32, attn_implementation="sdpa", seed=3).save_pretrained(model_dir)
    make_tokenizer(model_dir)
    rows = [{"prompt": "the question is", "chosen": "good answer", "rejected": "bad answer"},
            {"prompt": [{"role": "user", "content": "hello world"}], "chosen": "good", "rejected": "bad"}] * 8
    data = write_jsonl(tmp_path / "text.jsonl", rows)
    config = DPOConfig(model=str(model_dir), train_data=str(data), output_dir=str(tmp_path / "run"), batch_size=4,
                       max_steps=6, learning_rate=3e-3, progress=False, lr_scheduler="constant")
    result = train_dpo(config)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    # the checkpoint carries the tokenizer: it is a complete model directory
    assert (result.checkpoint / "tokenizer.json").is_file() and (result.checkpoint / "tokenizer_config.json").is_file()
