"""fastrl's trainer: SFT, offline DPO, GRPO and online DPO on Hugging Face causal LMs, and reward models.

    from fastrl.train import load_config, train
    config = load_config("grpo", "examples/grpo_tiny.yaml", ["--max_steps", "4"])
    result = train(config)   # result.history: the logged records; result.checkpoint: the last checkpoint

Modules, each a piece the recipes compose: :mod:`~fastrl.train.config` (validated dataclasses,
YAML + overrides), :mod:`~fastrl.train.data` (local JSONL / Parquet, tokenised once, seeded order),
:mod:`~fastrl.train.packing` (packed or padded model batches), :mod:`~fastrl.train.model` (the HF
model run to its last hidden states; the lm-head goes to a fused-linear loss),
:mod:`~fastrl.train.reference` (reference log-probs, cached), :mod:`~fastrl.train.rewards`
(reward callables and reward models), :mod:`~fastrl.train.optim`, :mod:`~fastrl.train.checkpoint`
(atomic, bit-exact resume), :mod:`~fastrl.train.telemetry`, :mod:`~fastrl.train.distributed`
(torchrun + FSDP2), :mod:`~fastrl.train.run` (what every recipe does around its step: start, plan,
resume, end each step, finish), :mod:`~fastrl.train.online` (rollout, rewards and logs of the online
recipes), and the recipes :mod:`~fastrl.train.sft`, :mod:`~fastrl.train.dpo`,
:mod:`~fastrl.train.grpo`, :mod:`~fastrl.train.online_dpo`, :mod:`~fastrl.train.rm` (a Bradley–Terry reward
model, the ``reward_model`` of the online methods); :mod:`~fastrl.train.evaluate` (held-out evaluation of the
online methods) and :mod:`~fastrl.train.trainers` (``GRPOTrainer``, ``DPOTrainer``, ``OnlineDPOTrainer``: the
recipes behind TRL's trainer interface, docs/migration.md).
"""

from fastrl.train.config import (ConfigError, DPOConfig, GRPOConfig, OnlineDPOConfig, RMConfig, SFTConfig,
                                 TrainConfig, config_class, load_config)
from fastrl.train.data import DataError
from fastrl.train.dpo import train_dpo
from fastrl.train.grpo import train_grpo
from fastrl.train.online_dpo import train_online_dpo
from fastrl.train.rewards import RewardError, RewardModel
from fastrl.train.rm import train_rm
from fastrl.train.run import TrainingInterrupted, TrainResult
from fastrl.train.sft import train_sft
from fastrl.train.trainers import DPOTrainer, GRPOTrainer, OnlineDPOTrainer, TrainerCallback

__all__ = ["ConfigError", "DPOConfig", "DPOTrainer", "DataError", "GRPOConfig", "GRPOTrainer", "OnlineDPOConfig",
           "OnlineDPOTrainer", "RMConfig", "RewardError", "RewardModel", "SFTConfig", "TrainerCallback", "TrainConfig", "TrainResult", "TrainingInterrupted", "config_class",
           "load_config", "train", "train_dpo", "train_grpo", "train_online_dpo", "train_rm", "train_sft"]


def train(config: TrainConfig, reward_funcs=None, *, callbacks=None) -> TrainResult:
    """Run the recipe of ``config``'s type. ``reward_funcs`` (GRPO / online DPO only): reward
    callables given from Python, in place of ``config.reward_funcs``; ``callbacks``: run callbacks
    (:mod:`fastrl.train.run`; :class:`TrainerCallback` is their base)."""
    if reward_funcs is not None and not isinstance(config, (GRPOConfig, OnlineDPOConfig)):
        raise TypeError(f"reward_funcs apply to GRPO and online DPO, not {type(config).__name__}")
    if isinstance(config, SFTConfig):
        return train_sft(config, callbacks=callbacks)
    if isinstance(config, DPOConfig):
        return train_dpo(config, callbacks=callbacks)
    if isinstance(config, GRPOConfig):
        return train_grpo(config, reward_funcs, callbacks=callbacks)
    if isinstance(config, OnlineDPOConfig):
        return train_online_dpo(config, reward_funcs, callbacks=callbacks)
    if isinstance(config, RMConfig):
        return train_rm(config, callbacks=callbacks)
    raise TypeError(f"config must be an SFTConfig, DPOConfig, GRPOConfig, OnlineDPOConfig or RMConfig, "
                    f"got {type(config).__name__}")
