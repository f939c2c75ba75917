"""``fastrl train``: the example configs run through the command line at tiny size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastrl.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("example", sorted(p.name for p in (REPO / "examples").glob("dpo*.yaml")))
def test_example_config_trains(example, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # example paths are relative to the repository root
    rc = main(["train", "dpo", "--config", f"examples/{example}", "--output_dir", str(tmp_path), "--max_steps", "6",
               "--save_every", "3", "--log_every", "1", "--no_progress"])
    assert rc == 0
    assert "6 steps" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6 and records[-1]["loss"] < records[0]["loss"]
    assert (tmp_path / "checkpoints" / "step-00000006" / "model.safetensors").is_file()


def test_cli_errors_name_the_field(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["train", "dpo", "--config", "examples/dpo_tiny.yaml", "--beta", "-1"]) == 2
    assert "DPOConfig.beta" in capsys.readouterr().err
    assert main(["train", "dpo", "--config", "examples/dpo_tiny.yaml", "--bta", "1"]) == 2
    assert "unknown option '--bta' (did you mean --beta?)" in capsys.readouterr().err
    assert main(["train", "dpo", "--help"]) == 0
    assert "--loss_type" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["grpo", "online-dpo", "sft"])
def test_online_and_sft_examples_train(method, tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(REPO)
    example = f"examples/{method.replace('-', '_')}_tiny.yaml"
    rc = main(["train", method, "--config", example, "--output_dir", str(tmp_path), "--max_steps", "3",
               "--log_every", "1", "--no_progress"])
    assert rc == 0, capsys.readouterr().err
    assert "3 steps" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["tokens_per_s"] > 0 for r in records)
    assert (tmp_path / "checkpoints" / "step-00000003" / "model.safetensors").is_file()
    if method != "sft":
        assert "reward/count_token/mean" in records[-1]
        assert (tmp_path / "completions.jsonl").is_file()


def test_grpo_and_online_dpo_errors_name_the_field(tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": [1, 2]}\n' * 8)
    base = ["--model_config", '{"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, '
            '"num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}', "--train_data", str(data),
            "--reward_funcs", "m_missing:f", "--output_dir", str(tmp_path / "out"), "--no_progress"]
    for method, name in (("grpo", "GRPOConfig"), ("online-dpo", "OnlineDPOConfig")):
        assert main(["train", method, *base]) == 2
        assert f"{name}.reward_funcs[0] (m_missing:f): no module named 'm_missing'" in capsys.readouterr().err
    assert main(["train", "grpo", *base, "--num_generations", "1"]) == 2
    assert "GRPOConfig.num_generations" in capsys.readouterr().err
    assert main(["train", "sft", "--help"]) == 0
    assert "--completion_column" in capsys.readouterr().out


def test_other_commands_still_parse():
    from fastrl.cli import build_parser

    args, extra = build_parser().parse_known_args(["demo", "--seed", "3"])
    assert args.command == "demo" and args.seed == 3 and not extra
    with pytest.raises(SystemExit):
        main(["demo", "--bogus"])


def test_rm_example_trains_a_reward_model(tmp_path, monkeypatch, capsys, one_thread):
    from fastrl.train import RewardModel

    monkeypatch.chdir(REPO)
    rc = main(["train", "rm", "--config", "examples/rm_tiny.yaml", "--output_dir", str(tmp_path), "--max_steps", "6",
               "--log_every", "1", "--no_progress"])
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "6 steps" in out and "rewards/accuracies" in out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6 and records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["rewards/margins"] > records[0]["rewards/margins"]
    checkpoint = tmp_path / "checkpoints" / "step-00000006"
    scores = RewardModel(str(checkpoint))([[5, 6], [5, 6]], [[1, 2, 3], [7, 9, 11]])
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    assert main(["train", "rm", "--config", "examples/rm_tiny.yaml", "--center_rewards_coefficient", "-1"]) == 2
    assert "RMConfig.center_rewards_coefficient" in capsys.readouterr().err
    assert main(["train", "rm", "--help"]) == 0
    assert "--margin_column" in capsys.readouterr().out
