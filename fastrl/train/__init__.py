"""fastrl's trainer: offline DPO now; GRPO and online DPO configs are ready for their steps.

    from fastrl.train import load_config, train
    config = load_config("dpo", "examples/dpo_tiny.yaml", ["--max_steps", "4"])
    result = train(config)   # result.history: the logged records; result.checkpoint: the last checkpoint

Modules, each a piece the recipes compose: :mod:`~fastrl.train.config` (validated dataclasses,
YAML + overrides), :mod:`~fastrl.train.data` (local JSONL / Parquet, tokenised once, seeded order),
:mod:`~fastrl.train.packing` (packed or padded model batches), :mod:`~fastrl.train.model` (the HF
model run to its last hidden states; the lm-head goes to a fused-linear loss),
:mod:`~fastrl.train.reference` (reference log-probs, cached), :mod:`~fastrl.train.optim`,
:mod:`~fastrl.train.checkpoint` (atomic, bit-exact resume), :mod:`~fastrl.train.telemetry`,
:mod:`~fastrl.train.distributed` (torchrun + FSDP2), and the recipe :mod:`~fastrl.train.dpo`.
"""

from fastrl.train.config import (ConfigError, DPOConfig, GRPOConfig, OnlineDPOConfig, TrainConfig, config_class,
                                 load_config)
from fastrl.train.data import DataError
from fastrl.train.dpo import TrainResult, train_dpo

__all__ = ["ConfigError", "DPOConfig", "DataError", "GRPOConfig", "OnlineDPOConfig", "TrainConfig", "TrainResult",
           "config_class", "load_config", "train", "train_dpo"]


def train(config: TrainConfig) -> TrainResult:
    """Run the recipe of ``config``'s type."""
    if isinstance(config, DPOConfig):
        return train_dpo(config)
    if isinstance(config, (GRPOConfig, OnlineDPOConfig)):
        raise NotImplementedError(f"{type(config).__name__}: the config is validated, but the step lands with the "
                                  f"rollout engine (fastrl.rollout); only dpo trains today")
    raise TypeError(f"config must be a DPOConfig, GRPOConfig or OnlineDPOConfig, got {type(config).__name__}")
