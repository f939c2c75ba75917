"""A run never loses or mixes up its data: a used output_dir refused, a resume with other settings or data
refused, Ctrl-C / SIGTERM checkpointing the step and resuming bit-exactly, a reward failing mid-step saved
first, and the callbacks' hooks (fastrl.train.run)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from fastrl import cli
from fastrl.train import ConfigError, GRPOConfig, RewardError, TrainingInterrupted, train_dpo, train_grpo
from fastrl.train.checkpoint import find_checkpoint, prunable

from .conftest import dpo_config, emits_target, online_fields, state, toy_pairs, toy_prompts, write_jsonl

# ---- a reward that sends a signal (or raises) at given calls: one completion per call, 32 a GRPO step here
CALLS = {"n": 0, "signal_at": (), "signal": signal.SIGINT, "raise_at": None}
PER_STEP = 4 * 8  # batch_size prompts x num_generations


def emits_target_or_stops(prompt_ids, completion_ids, **columns) -> float:
    CALLS["n"] += 1
    if CALLS["n"] in CALLS["signal_at"]:
        os.kill(os.getpid(), CALLS["signal"])
    if CALLS["n"] == CALLS["raise_at"]:
        raise ValueError("the verifier is down (simulated)")
    return emits_target(prompt_ids, completion_ids, **columns)


@pytest.fixture
def calls():
    CALLS.update(n=0, signal_at=(), signal=signal.SIGINT, raise_at=None)
    yield CALLS
    CALLS.update(n=0, signal_at=(), signal=signal.SIGINT, raise_at=None)


def grpo_config(data, out, **overrides) -> GRPOConfig:
    fields = dict(max_steps=4, beta=0.04, lr_scheduler="linear", reward_funcs=[emits_target_or_stops])
    fields.update(overrides)
    return GRPOConfig(**online_fields(data, out, **fields))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 4-step GRPO run: (its prompts file, its result); single-threaded, as the tests that
    compare with it (``one_thread``: the reductions' order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("straight")
        data = write_jsonl(root / "prompts.jsonl", toy_prompts())
        CALLS.update(n=0, signal_at=(), raise_at=None)
        return data, train_grpo(grpo_config(data, root / "run"))
    finally:
        torch.set_num_threads(threads)


def assert_same_weights(a, b) -> None:
    a, b = state(a.policy), state(b.policy)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def steps_in(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


# ---- a used output_dir

def test_rerun_into_a_used_output_dir_is_refused(pairs_file, tmp_path):
    out = tmp_path / "run"
    first = train_dpo(dpo_config(pairs_file, out, max_steps=2))
    assert first.checkpoint.is_dir()
    with pytest.raises(ConfigError, match=r"DPOConfig\.output_dir: .*holds a previous run \(metrics\.jsonl, "
                                          r"checkpoints\).*resume: auto.*overwrite_output_dir"):
        train_dpo(dpo_config(pairs_file, out, max_steps=2))
    assert steps_in(out / "metrics.jsonl") == [1, 2]  # nothing of the refused run was written
    assert first.checkpoint.is_dir()


def test_overwrite_output_dir_starts_afresh_and_keeps_other_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    data = write_jsonl(out / "pairs.jsonl", toy_pairs())
    train_dpo(dpo_config(data, out, max_steps=3, save_every=1, keep_checkpoints=3))
    again = train_dpo(dpo_config(data, out, max_steps=1, overwrite_output_dir=True))
    assert steps_in(out / "metrics.jsonl") == [1]  # the old run's records are gone, not appended to
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000001"]
    assert again.checkpoint == out / "checkpoints" / "step-00000001"
    assert data.is_file()  # the data (not a run output) is never removed
    assert find_checkpoint(out, "auto") == again.checkpoint


def test_unrelated_files_do_not_make_a_directory_used(pairs_file, tmp_path):
    # the tests' own habit: the data file inside output_dir
    result = train_dpo(dpo_config(pairs_file, tmp_path, max_steps=1))
    assert result.steps == 1


def test_overwrite_contradicts_resume_auto(pairs_file, tmp_path):
    with pytest.raises(ConfigError, match=r"DPOConfig\.overwrite_output_dir: contradicts resume='auto'"):
        dpo_config(pairs_file, tmp_path / "run", resume="auto", overwrite_output_dir=True)


# ---- resume with other settings or data

def test_resume_with_a_changed_loss_setting_is_refused_naming_it(pairs_file, tmp_path):
    out = tmp_path / "run"
    train_dpo(dpo_config(pairs_file, out, max_steps=2, save_every=1))
    with pytest.raises(ConfigError, match=r"DPOConfig\.resume: the checkpoint .*step-00000002 was written with "
                                          r"other run settings: loss_type: \['sigmoid'\] -> \['ipo'\]; "
                                          r"beta: 0\.1 -> 0\.2;.*force_resume"):
        train_dpo(dpo_config(pairs_file, out, max_steps=4, resume="auto", loss_type="ipo", beta=0.2))
    # run-neutral fields (length, logging, checkpointing) may change
    resumed = train_dpo(dpo_config(pairs_file, out, max_steps=3, resume="auto", log_every=2, keep_checkpoints=1))
    assert resumed.steps == 1
    with pytest.warns(UserWarning, match=r"force_resume: .*loss_type: \['sigmoid'\] -> \['ipo'\]"):
        forced = train_dpo(dpo_config(pairs_file, out, max_steps=4, resume="auto", loss_type="ipo", force_resume=True))
    assert forced.steps == 1


def test_resume_on_other_data_is_refused(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", toy_pairs(seed=0))
    b = write_jsonl(tmp_path / "b.jsonl", toy_pairs(seed=1))  # as many pairs, other tokens
    out = tmp_path / "run"
    train_dpo(dpo_config(a, out, max_steps=1))
    with pytest.raises(ConfigError, match=r"DPOConfig\.train_data: train_data changed since the checkpoint"):
        train_dpo(dpo_config(b, out, max_steps=2, resume="auto"))
    moved = tmp_path / "moved.jsonl"  # the same data under another path: resumes
    moved.write_bytes(a.read_bytes())
    assert train_dpo(dpo_config(moved, out, max_steps=2, resume="auto")).steps == 1


def test_resume_from_an_earlier_checkpoint_keeps_one_record_per_step(pairs_file, tmp_path):
    out = tmp_path / "run"
    train_dpo(dpo_config(pairs_file, out, max_steps=4, save_every=2, keep_checkpoints=3))
    root = out / "checkpoints"
    with pytest.warns(UserWarning, match=r"step-00000004.*abandoned branch"):
        resumed = train_dpo(dpo_config(pairs_file, out, max_steps=4, save_every=2, keep_checkpoints=1,
                                       resume=str(root / "step-00000002")))
    assert resumed.steps == 2
    assert steps_in(out / "metrics.jsonl") == [1, 2, 3, 4]  # steps 3, 4 once: the redone ones
    # the old step 4 set aside (keep_checkpoints=1 would otherwise have pruned the new one for it)
    assert (root / "abandoned-after-step-00000002" / "step-00000004" / "model.safetensors").is_file()
    assert (root / "latest").read_text() == "step-00000004" and resumed.checkpoint == root / "step-00000004"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000004"]
    straight = train_dpo(dpo_config(pairs_file, tmp_path / "straight", max_steps=4))
    assert_same_weights(straight, resumed)


# ---- pruning and latest

def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (1, 2, 3, 5, 6):
        (root / f"step-{s:08d}").mkdir(parents=True)
    (root / "step-00000007.tmp").mkdir()
    final = root / "step-00000004"  # a resumed run's save, below an abandoned branch (5, 6)
    final.mkdir()
    assert prunable(root, final, keep=2) == [root / "step-00000001", root / "step-00000002",
                                             root / "step-00000005", root / "step-00000006"]
    assert prunable(root, final, keep=1) == [root / f"step-{s:08d}" for s in (1, 2, 3, 5, 6)]
    assert prunable(root, root / "step-00000006", keep=2) == [root / f"step-{s:08d}" for s in (1, 2, 3, 4)]


def test_latest_always_names_a_complete_checkpoint(pairs_file, tmp_path):
    seen = []

    class Check:
        def on_save(self, run, step, path):
            latest = (run.out / "checkpoints" / "latest").read_text()
            assert latest == path.name and (path / "trainer_state.pt").is_file()
            seen.append(step)

    out = tmp_path / "run"
    result = train_dpo(dpo_config(pairs_file, out, max_steps=3, save_every=1, keep_checkpoints=1), callbacks=[Check()])
    assert seen == [1, 2, 3] and result.checkpoint == out / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000003"]


# ---- stopping: SIGINT / SIGTERM at the step boundary, resumed bit-exactly

def test_sigint_checkpoints_the_step_and_resumes_bit_exactly(straight, tmp_path, calls, capfd, one_thread):
    data, done = straight
    out = tmp_path / "run"
    previous = signal.getsignal(signal.SIGINT)
    calls["signal_at"] = (PER_STEP + 1,)  # the first reward call of step 2
    with pytest.raises(TrainingInterrupted) as caught:
        train_grpo(grpo_config(data, out))
    assert signal.getsignal(signal.SIGINT) is previous  # the handlers are restored
    stopped = caught.value
    assert (stopped.step, stopped.signal) == (2, signal.SIGINT)
    assert stopped.checkpoint == out / "checkpoints" / "step-00000002" and stopped.checkpoint.is_dir()
    assert "stopping after step 2; Ctrl-C again to stop at once" in capfd.readouterr().err
    assert steps_in(out / "metrics.jsonl") == [1, 2]
    resumed = train_grpo(grpo_config(data, out, resume="auto"))
    assert resumed.steps == 2
    assert steps_in(out / "metrics.jsonl") == [1, 2, 3, 4]
    for key in ("reward/mean", "loss", "kl", "lr"):
        assert [h[key] for h in done.history[2:]] == [h[key] for h in resumed.history], key
    assert_same_weights(done, resumed)


def test_sigterm_from_a_callback_stops_dpo_at_the_step(pairs_file, tmp_path):
    out = tmp_path / "run"

    class Stop:
        def on_step_end(self, run, step):
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as caught:
        train_dpo(dpo_config(pairs_file, out, max_steps=4, save_every=2), callbacks=[Stop()])
    assert (caught.value.step, caught.value.signal) == (2, signal.SIGTERM)  # saved once (save_every), not twice
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000002"]
    resumed = train_dpo(dpo_config(pairs_file, out, max_steps=4, save_every=2, resume="auto"))
    assert_same_weights(train_dpo(dpo_config(pairs_file, tmp_path / "straight", max_steps=4)), resumed)


def test_a_second_sigint_stops_at_once(straight, tmp_path, calls, one_thread):
    data, _ = straight
    calls["signal_at"] = (PER_STEP + 1, PER_STEP + 2)
    with pytest.raises(KeyboardInterrupt) as caught:
        train_grpo(grpo_config(data, tmp_path / "run"))
    assert not isinstance(caught.value, TrainingInterrupted)
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped inside step 2: nothing saved


def cli_args(data, tmp_path, *, signal_name: str, at: int, max_steps: int) -> tuple[list[str], Path]:
    """``fastrl train grpo`` arguments whose reward file sends ``signal_name`` once, at its call ``at``."""
    rewards, marker = tmp_path / "rewards.py", tmp_path / "stop-once"
    rewards.write_text(
        "import os, signal\n"
        "CALLS = [0]\n"
        "def reward(prompt_ids, completion_ids, **columns):\n"
        "    CALLS[0] += 1\n"
        f"    if CALLS[0] == {at} and os.path.exists({str(marker)!r}):\n"
        f"        os.remove({str(marker)!r})\n"
        f"        os.kill(os.getpid(), signal.{signal_name})\n"
        "    return sum(t == 7 for t in completion_ids) / len(completion_ids)\n")
    marker.touch()
    out = tmp_path / "run"
    args = ["train", "grpo", "--model_config", json.dumps(online_fields(data, out)["model_config"]),
            "--train_data", str(data), "--output_dir", str(out), "--reward_funcs", f"{rewards}:reward",
            "--batch_size", "4", "--num_generations", "8", "--max_completion_length", "8", "--max_steps",
            str(max_steps), "--no_progress"]
    return args, out


def test_cli_interrupted_exits_130_with_the_message_then_resumes(straight, tmp_path, capsys, one_thread):
    data, _ = straight
    args, out = cli_args(data, tmp_path, signal_name="SIGINT", at=PER_STEP + 1, max_steps=3)
    assert cli.main(args) == 130
    err = capsys.readouterr().err
    checkpoint = out / "checkpoints" / "step-00000002"
    assert f"fastrl train grpo: interrupted at step 2; checkpoint {checkpoint}; continue with --resume auto" in err
    assert checkpoint.is_dir()
    assert cli.main(args) == 2  # the same command again: a used output_dir
    assert "--resume auto" in capsys.readouterr().err
    assert cli.main(args + ["--resume", "auto"]) == 0
    assert "fastrl train grpo: 1 steps" in capsys.readouterr().out  # the resumed run does step 3 only
    assert steps_in(out / "metrics.jsonl") == [1, 2, 3]


def test_cli_sigterm_exits_143(straight, tmp_path, capsys, one_thread):
    data, _ = straight
    args, out = cli_args(data, tmp_path, signal_name="SIGTERM", at=1, max_steps=2)
    assert cli.main(args) == 143
    checkpoint = out / "checkpoints" / "step-00000001"
    assert f"interrupted at step 1; checkpoint {checkpoint}; continue with --resume auto" in capsys.readouterr().err
    assert (checkpoint / "trainer_state.pt").is_file()


# ---- a reward failing mid-step

def test_reward_error_mid_step_saves_the_last_step_then_resumes_bit_exactly(straight, tmp_path, calls, one_thread):
    data, done = straight
    out = tmp_path / "run"
    calls["raise_at"] = 2 * PER_STEP + 1  # the first reward call of step 3
    with pytest.raises(RewardError, match=r"^step 3: .*verifier is down.*checkpoint of step 2: .*step-00000002; "
                                          r"continue with --resume auto"):
        train_grpo(grpo_config(data, out))
    assert (out / "checkpoints" / "latest").read_text() == "step-00000002"
    calls["raise_at"] = None
    resumed = train_grpo(grpo_config(data, out, resume="auto"))
    assert resumed.steps == 2
    assert_same_weights(done, resumed)


def test_reward_error_in_the_first_step_saves_nothing(straight, tmp_path, calls, one_thread):
    data, _ = straight
    calls["raise_at"] = 1
    with pytest.raises(RewardError, match=r"^step 1: .*no step done: no checkpoint"):
        train_grpo(grpo_config(data, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---- callbacks

def test_callbacks_hooks(pairs_file, tmp_path):
    events = []

    class Recorder:
        def on_step_end(self, run, step):
            events.append(("step_end", step))
            return {"custom/metric": float(step)} if step == 3 else None

        def on_log(self, run, step, record):
            events.append(("log", step, record.get("custom/metric")))

        def on_save(self, run, step, path):
            events.append(("save", step, path.name))

        def on_train_end(self, run, result):
            events.append(("end", result.steps))

    result = train_dpo(dpo_config(pairs_file, tmp_path / "run", max_steps=4, log_every=2, save_every=2),
                       callbacks=[Recorder()])
    assert events == [("step_end", 1), ("step_end", 2), ("log", 2, None), ("save", 2, "step-00000002"),
                      ("step_end", 3), ("log", 3, 3.0),  # a callback's metrics are logged off the log steps
                      ("step_end", 4), ("log", 4, None), ("save", 4, "step-00000004"), ("end", 4)]
    assert [h["step"] for h in result.history] == [2, 3, 4] and result.history[1]["custom/metric"] == 3.0
