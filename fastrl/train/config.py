"""Trainer configs: one validated dataclass per method, loaded from YAML with command-line overrides.

>>> import pathlib, tempfile
>>> from fastrl.train.config import DPOConfig
>>> data = pathlib.Path(tempfile.mkdtemp()) / "pairs.jsonl"
>>> _ = data.write_text('{"prompt": [5, 6], "chosen": [1, 2], "rejected": [3]}')
>>> cfg = DPOConfig(model_config={"model_type": "qwen2", "vocab_size": 64}, train_data=str(data), beta=0.2,
...                 loss_type="ipo")
>>> cfg.loss_type, cfg.loss_options()["beta"]
(['ipo'], 0.2)
>>> DPOConfig(model_config={"model_type": "qwen2"}, train_data=str(data), beta=-1.0)
Traceback (most recent call last):
...
fastrl.train.config.ConfigError: DPOConfig.beta: beta must be finite and in (0.0, inf], got -1.0

``GRPOConfig``, ``DPOConfig``, ``OnlineDPOConfig`` and ``SFTConfig`` share :class:`TrainConfig` (model, data,
batch, optimiser, schedule, logging, checkpointing, seed, systems); the loss options are not written
here again: they are the fields of :class:`fastrl.losses.GRPOSettings` / :class:`fastrl.losses.DPOSettings`
(same names, defaults and help, made by :func:`fastrl.losses.settings.config_fields`), checked by building
those settings (one place for each check; ``loss_settings()`` returns them). Every field has a default, so a YAML
file names only what it changes. :func:`load_config` reads the YAML and applies overrides such as
``--beta 0.2 --loss_type sigmoid ipo`` with transformers' ``HfArgumentParser`` (argparse): YAML
values become the parser's defaults and the command line wins. Dict fields (``model_config``) are
YAML mappings or JSON strings on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastrl.losses import GRPOSettings
from fastrl.losses.settings import config_fields

__all__ = ["DPOConfig", "GRPOConfig", "OnlineDPOConfig", "RMConfig", "SFTConfig", "TrainConfig", "config_class",
           "load_config", "trl_names"]

DTYPES = ("float32", "bfloat16", "float16")
REPORTERS = ("tensorboard", "wandb")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def _help(text: str, default: Any = dataclasses.MISSING, **kwargs) -> Any:
    if "default_factory" in kwargs:
        return field(metadata={"help": text}, **kwargs)
    return field(default=default, metadata={"help": text})


def _alias(target: str, note: str = "") -> Any:
    """A field holding one of TRL's names (a key of :data:`TRL_NAMES`): default None; ``__post_init__``
    moves its value to ``target``."""
    return _help(f"TRL's name of {target}" + (f": {note}" if note else "") + " (docs/migration.md)", None)


class ConfigError(ValueError):
    """A bad config value; the message starts with ``<ConfigClass>.<field>:``."""


def _is_module(value: Any) -> bool:
    """Whether ``value`` is a ``torch.nn.Module`` (a model given from Python), without importing torch."""
    return any(c.__name__ == "Module" and c.__module__ == "torch.nn.modules.module" for c in type(value).__mro__)


def _default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _plain(value: Any, *, table: bool = False) -> Any:
    """``value`` with every object that is not plain data (str, number, bool, None, list, dict) named
    ``<name>``; a table (a data field given from Python) is named with its row count."""
    if table and not isinstance(value, (str, os.PathLike, type(None))):
        return f"<{type(value).__name__} of {len(value)} rows>"
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return f"<{getattr(value, '__name__', type(value).__name__)}>"


# ---- TRL's names: converters of the values whose meaning differs from the fastrl field's (else taken as is)

def _whole(value: Any, what: str = "a whole number") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"must be {what}, got {value!r}")
    return int(value)


def _per_device_batch(config, value: Any) -> int:
    value = _whole(value, "a whole number of examples")
    if not isinstance(config, GRPOConfig):  # DPO, SFT, RM: examples; online DPO: prompts, as fastrl's batch_size
        return value
    generations = config.num_generations
    if value % generations:  # GRPO: TRL counts completions, fastrl prompts
        raise ValueError(f"{value} completions is not a whole number of prompts: TRL's per_device_train_batch_size "
                         f"counts completions, fastrl's batch_size prompts (= per_device_train_batch_size / "
                         f"num_generations); make it a multiple of num_generations ({generations}), or give "
                         f"batch_size (prompts per micro-batch) instead")
    return value // generations


def _scheduler(config, value: Any) -> str:
    value = getattr(value, "value", value)  # transformers' SchedulerType
    names = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}
    if value not in names:
        raise ValueError(f"{value!r} has no fastrl equivalent; the schedules are {', '.join(names)} (warm-up: "
                         f"warmup_steps)")
    return names[value]


def _optimizer(config, value: Any) -> str:
    value = getattr(value, "value", value)  # transformers' OptimizerNames
    names = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_8bit": "adamw_8bit",
             "adamw_bnb_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}
    if value not in names:
        raise ValueError(f"{value!r} has no fastrl equivalent; the optimisers are {', '.join(names)}")
    return names[value]


def _resume(config, value: Any) -> str:
    if value is True or (isinstance(value, str) and value.lower() == "true"):
        return "auto"
    if value is False or (isinstance(value, str) and value.lower() in ("false", "")):
        return getattr(config, "resume", None)
    return str(value)


def _scale_rewards(config, value: Any) -> str:
    names = {True: "group", False: "none", "true": "group", "false": "none", "group": "group", "batch": "batch",
             "none": "none"}
    key = value.lower() if isinstance(value, str) else value
    if key not in names:
        raise ValueError(f"must be group, batch, none, true or false; got {value!r}")
    return names[key]


def _pair_part(field_name: str, index: int):
    def convert(config, value: Any) -> list[float]:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {value!r}")
        pair = getattr(config, field_name)
        pair = list(pair) * 2 if isinstance(pair, (int, float)) else list(pair)
        pair[index] = float(value)
        return pair[:2]
    return convert


def _precompute(config, value: Any) -> str:
    if isinstance(value, str):
        value = {"true": True, "false": False}.get(value.lower(), value)
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return "precomputed" if value else "live"


#: TRL's name -> ``convert(config, value)`` giving the fastrl field's value, for the names whose values
#: differ in meaning or type; the other TRL names (each field made by ``_alias``) pass their value as is.
ALIAS_VALUES = {
    "per_device_train_batch_size": _per_device_batch,
    "num_train_epochs": lambda config, value: _whole(value, "a whole number of epochs (fastrl runs whole passes)"),
    "logging_steps": lambda config, value: _whole(value, "a whole number of steps (not a ratio)"),
    "save_steps": lambda config, value: _whole(value, "a whole number of steps (not a ratio)"),
    "eval_steps": lambda config, value: _whole(value, "a whole number of steps (not a ratio)"),
    "save_total_limit": lambda config, value: _whole(value),
    "lr_scheduler_type": _scheduler,
    "optim": _optimizer,
    "resume_from_checkpoint": _resume,
    "scale_rewards": _scale_rewards,
    "vespo_k_pos": _pair_part("vespo_k", 0), "vespo_k_neg": _pair_part("vespo_k", 1),
    "vespo_lambda_pos": _pair_part("vespo_lambda", 0), "vespo_lambda_neg": _pair_part("vespo_lambda", 1),
    "precompute_ref_log_probs": _precompute,
}


#: TRL's name -> the fastrl field it sets; each is a field (default None) of the configs that have the target.
TRL_NAMES = {
    "per_device_train_batch_size": "batch_size", "num_train_epochs": "num_epochs", "logging_steps": "log_every",
    "save_steps": "save_every", "save_total_limit": "keep_checkpoints", "lr_scheduler_type": "lr_scheduler",
    "optim": "optimizer", "resume_from_checkpoint": "resume",
    # GRPO, online DPO
    "shuffle_dataset": "shuffle", "eval_steps": "eval_every", "num_generations_eval": "eval_num_generations",
    # GRPO
    "scale_rewards": "advantage_scale", "multi_objective_aggregation": "multi_reward",
    "sapo_temperature_pos": "sapo_tau_pos", "sapo_temperature_neg": "sapo_tau_neg",
    "vespo_k_pos": "vespo_k", "vespo_k_neg": "vespo_k", "vespo_lambda_pos": "vespo_lambda",
    "vespo_lambda_neg": "vespo_lambda", "vllm_importance_sampling_mode": "is_mode",
    "vllm_importance_sampling_clip_max": "is_cap", "vllm_importance_sampling_clip_min": "is_min",
    # DPO, online DPO
    "f_divergence_type": "f_divergence", "f_alpha_divergence_coef": "f_alpha",
    # DPO
    "precompute_ref_log_probs": "reference", "precompute_ref_batch_size": "reference_batch_size",
    # online DPO (trl.experimental.online_dpo.OnlineDPOConfig)
    "max_new_tokens": "max_completion_length",
}


def trl_names(config_class: type) -> dict[str, str]:
    """TRL's names a config class accepts, each with the fastrl field it sets.

    Args:
        config_class: a :class:`TrainConfig` subclass.

    Returns:
        ``{trl_name: fastrl_field}``.
    """
    return {f.name: TRL_NAMES[f.name] for f in dataclasses.fields(config_class) if f.name in TRL_NAMES}


@dataclass
class TrainConfig:
    """Fields every method shares. Sizes are per process unless the name says otherwise."""

    # --- model
    model: str | None = _help("local directory of a Hugging Face causal LM (nothing is downloaded); from Python "
                              "also the model itself (an nn.Module, trained in place)", None)
    model_config: dict | str | None = _help(
        "a Hugging Face config for a randomly initialised model, e.g. {model_type: qwen2, vocab_size: 512, ...} "
        "(a JSON string on the command line); exclusive with `model`", None)
    peft_config: dict | str | None = _help(
        "LoRA adapters (needs peft): a mapping of peft.LoraConfig fields, e.g. {r: 16, lora_alpha: 32, "
        "target_modules: all-linear} (a JSON string on the command line); only the adapters train, the base stays "
        "frozen and is the reference (adapters disabled, no copy); the lm-head is adapted only when "
        "target_modules or modules_to_save name it; checkpoints hold the adapter (adapter/); one process, text "
        "runs; null: full fine-tuning", None)
    tokenizer: str | None = _help("tokenizer directory (default: `model`'s; from Python also a tokenizer); without "
                                  "one, data are token ids", None)
    dtype: Literal["float32", "bfloat16", "float16"] = _help("parameter dtype", "float32")
    bf16: bool = _help("bf16 autocast for the forward (mixed precision over float32 parameters)", False)
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = _help(
        "transformers attention implementation; auto = the one `attention` selects", "auto")
    attention: Literal["auto", "flash", "xformers", "sdpa"] = _help(
        "attention kernel of packed batches: flash (flash-attn varlen), xformers (memory_efficient_attention, "
        "block-diagonal causal mask), sdpa (dense block-diagonal mask); auto = the first installed of the three "
        "(flash and xformers on CUDA, flash with bf16/fp16 compute)", "auto")
    gradient_checkpointing: bool = _help("recompute decoder layers in the backward", False)
    compile: bool = _help("torch.compile each decoder layer", False)
    # --- data
    train_data: str | None = _help("local .jsonl / .json / .parquet file (or a directory of them); from Python also "
                                   "a datasets.Dataset or a list of dicts", None)
    prompt_column: str = _help("column of the prompts (text, chat messages or token ids)", "prompt")
    chat_template: bool = _help("apply the tokenizer's chat template when it has one", True)
    max_prompt_length: int = _help("longest prompt in tokens", 512)
    prompt_truncation: Literal["error", "left"] = _help(
        "a longer prompt is an error, or keeps its last max_prompt_length tokens", "error")
    max_completion_length: int = _help("completions are cut to this many tokens", 512)
    shuffle: bool = _help("shuffle the examples every epoch (seeded)", True)
    packing: bool = _help("pack sequences into one row with per-sequence attention (else pad)", True)
    # --- batch and schedule
    batch_size: int = _help("examples per micro-batch per process (pairs for DPO, prompts for GRPO)", 8)
    gradient_accumulation_steps: int = _help("micro-batches per optimiser step", 1)
    num_epochs: int = _help("passes over the data (when max_steps is 0)", 1)
    max_steps: int = _help("optimiser steps; 0 = num_epochs passes", 0)
    # --- optimiser
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = _help(
        "adamw (torch, fused where supported) or bitsandbytes 8-bit AdamW", "adamw")
    learning_rate: float = _help("peak learning rate", 1e-6)
    weight_decay: float = _help("AdamW weight decay (matrices only)", 0.0)
    adam_beta1: float = _help("AdamW beta1", 0.9)
    adam_beta2: float = _help("AdamW beta2", 0.999)
    adam_epsilon: float = _help("AdamW epsilon", 1e-8)
    lr_scheduler: Literal["constant", "linear", "cosine"] = _help("decay after warm-up", "linear")
    warmup_steps: int = _help("linear warm-up steps", 0)
    min_lr_ratio: float = _help("the decay ends at learning_rate * min_lr_ratio", 0.0)
    max_grad_norm: float = _help("clip the gradient norm to this; 0 = no clipping", 1.0)
    max_bad_steps: int = _help("stop after this many consecutive steps with a non-finite loss or gradient", 10)
    # --- output, logging, checkpoints
    output_dir: str = _help("metrics.jsonl, checkpoints/ and the reference cache go here", "runs/fastrl")
    log_every: int = _help("log metrics every N steps", 1)
    progress: bool = _help("progress bar (tqdm) on rank 0", True)
    report_to: list[str] = _help("also log to: tensorboard, wandb (when installed)", default_factory=list)
    run_name: str | None = _help("run name for TensorBoard / W&B", None)
    peak_tflops: float | None = _help("device peak TFLOP/s for the MFU estimate (known GPUs are looked up)", None)
    save_every: int = _help("checkpoint every N steps (0 = only at the end)", 0)
    keep_checkpoints: int = _help("checkpoints kept (oldest removed)", 2)
    resume: str | None = _help("'auto' (latest checkpoint in output_dir, if any) or a checkpoint directory", None)
    overwrite_output_dir: bool = _help(
        "start afresh in an output_dir a previous run used: its metrics.jsonl, completions.jsonl, checkpoints/, "
        "tensorboard/ and wandb/ are removed first (without it, and without resume, such a directory is refused)",
        False)
    force_resume: bool = _help(
        "resume even where the checkpoint's run settings (loss, group size, model, data, ...) differ from this "
        "config's (refused otherwise, naming each differing field)", False)
    # --- misc
    seed: int = _help("seed of the initialisation, data order and sampling", 0)
    device: str | None = _help("cuda / cpu (default: cuda when available)", None)
    threads: int | None = _help(
        "CPU intra-op threads of this process (torch.set_num_threads); null: OMP_NUM_THREADS when set, else the "
        "cores it may use (half each for an async trainer and its worker), 1 for a model under 2M parameters "
        "(fastrl.train.threads)", None)
    # --- TRL's names (transformers.TrainingArguments / trl): each sets the field it names, with TRL's meaning
    per_device_train_batch_size: int | None = _alias(
        "batch_size", "examples per micro-batch per process (pairs for DPO, prompts for online DPO); for GRPO it "
        "counts completions: batch_size = per_device_train_batch_size / num_generations prompts")
    num_train_epochs: float | None = _alias("num_epochs", "a whole number of passes")
    logging_steps: int | None = _alias("log_every")
    save_steps: int | None = _alias("save_every")
    save_total_limit: int | None = _alias("keep_checkpoints")
    lr_scheduler_type: str | None = _alias("lr_scheduler", "linear, cosine, constant or constant_with_warmup")
    optim: str | None = _alias("optimizer", "adamw_torch, adamw_torch_fused, adamw_8bit, adamw_bnb_8bit or "
                                            "paged_adamw_8bit")
    resume_from_checkpoint: str | None = _alias("resume", "a checkpoint directory, or true for the latest one")

    def __post_init__(self) -> None:
        self._apply_aliases()
        self.validate()

    # ---------------------------------------------------------------- TRL's names
    def _apply_aliases(self) -> None:
        """Move each TRL-named field's value to its fastrl field (converted: :data:`ALIAS_VALUES`), then set
        it to None. A fastrl field given too (not at its default) and different is an error naming both.
        ``max_steps: -1`` (TRL's "not set") is 0."""
        if self.max_steps == -1:
            self.max_steps = 0
        for f in dataclasses.fields(self):
            target = TRL_NAMES.get(f.name)
            value = getattr(self, f.name)
            if target is None or value is None:
                continue
            convert = ALIAS_VALUES.get(f.name)
            try:
                new = convert(self, value) if convert is not None else value
            except ValueError as e:
                problem = f"{e} (TRL's name of {target})"
            else:
                problem = None
            if problem is not None:
                self._fail(f.name, problem)
            given = getattr(self, target)
            if given != _default(type(self), target) and given != new:
                self._fail(f.name, f"TRL's name of {target}, which is given too and differs ({target}={given!r}, "
                                   f"{f.name}={value!r} -> {target}={new!r}); give one of them")
            setattr(self, target, new)
            setattr(self, f.name, None)

    # ---------------------------------------------------------------- validation
    def _fail(self, name: str, message: str) -> None:
        raise ConfigError(f"{type(self).__name__}.{name}: {message}")

    def _positive(self, *names: str, zero_ok: bool = False) -> None:
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                self._fail(name, f"must be an int, got {value!r}")
            if value < 0 or (value == 0 and not zero_ok):
                self._fail(name, f"must be {'>= 0' if zero_ok else '>= 1'}, got {value}")

    def _real(self, name: str, low: float | None = None, high: float | None = None, *, low_open: bool = False,
              optional: bool = False) -> None:
        value = getattr(self, name)
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            self._fail(name, f"must be a number, got {value!r}")
        setattr(self, name, float(value))
        if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
            lo = f"{'>' if low_open else '>='} {low}" if low is not None else ""
            hi = f"<= {high}" if high is not None else ""
            self._fail(name, f"must be {' and '.join(x for x in (lo, hi) if x)}, got {value}")

    def _choice(self, name: str, choices: tuple[str, ...]) -> None:
        if getattr(self, name) not in choices:
            self._fail(name, f"must be one of {', '.join(choices)}; got {getattr(self, name)!r}")

    def validate(self) -> None:
        """Check every field once; raise :class:`ConfigError` (a ``ValueError``) naming the field."""
        if isinstance(self.model_config, str):
            try:
                self.model_config = json.loads(self.model_config)
            except json.JSONDecodeError as e:
                self._fail("model_config", f"is not valid JSON ({e})")
        if (self.model is None) == (self.model_config is None):
            self._fail("model", "give exactly one of model (a local model directory) and model_config "
                                "(a config for a random initialisation)")
        if self.model is not None and not isinstance(self.model, (str, os.PathLike)):
            if not _is_module(self.model):  # from Python, a model in memory
                self._fail("model", f"must be a local model directory or (from Python) an nn.Module, got "
                                    f"{type(self.model).__name__}")
        elif self.model is not None:
            if not Path(self.model).is_dir():
                self._fail("model", f"{self.model!r} is not a local directory (models are never downloaded)")
            if not (Path(self.model) / "config.json").is_file():
                self._fail("model", f"{self.model!r} has no config.json: not a Hugging Face model directory")
        else:
            if not isinstance(self.model_config, dict):
                self._fail("model_config", f"must be a mapping, got {type(self.model_config).__name__}")
            if not isinstance(self.model_config.get("model_type"), str):
                self._fail("model_config", "needs model_type (e.g. qwen2, llama)")
        from fastrl.train.adapters import check_peft_config

        try:
            self.peft_config = check_peft_config(self.peft_config)
        except ValueError as e:  # the message starts with peft_config[.key]
            raise ConfigError(f"{type(self).__name__}.{e}") from None
        if self.peft_config is not None and getattr(self, "image_generation", None) is not None:
            self._fail("peft_config", "LoRA adapters are for text runs; an image-generation run trains the full model")
        if isinstance(self.tokenizer, (str, os.PathLike)):
            if not Path(self.tokenizer).is_dir():
                self._fail("tokenizer", f"{self.tokenizer!r} is not a local directory")
        elif self.tokenizer is not None and not callable(getattr(self.tokenizer, "decode", None)):
            self._fail("tokenizer", f"must be a tokenizer directory or (from Python) a tokenizer, got "
                                    f"{type(self.tokenizer).__name__}")
        self._choice("dtype", DTYPES)
        self._choice("attn_implementation", ("auto", "flash_attention_2", "sdpa", "eager"))
        if self.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            self._fail("attn_implementation", "flash_attention_2 needs the flash-attn package")
        self._check_attention()
        if self.train_data is None:
            self._fail("train_data", "is required (a local .jsonl / .json / .parquet file or directory)")
        self._check_data("train_data")
        self._choice("prompt_truncation", ("error", "left"))
        self._positive("max_prompt_length", "max_completion_length", "batch_size", "gradient_accumulation_steps",
                       "num_epochs", "log_every", "keep_checkpoints", "max_bad_steps")
        self._positive("max_steps", "warmup_steps", "save_every", "seed", zero_ok=True)
        self._choice("optimizer", ("adamw", "adamw_8bit", "paged_adamw_8bit"))
        if self.optimizer != "adamw" and importlib.util.find_spec("bitsandbytes") is None:
            self._fail("optimizer", f"{self.optimizer} needs bitsandbytes (pip install bitsandbytes)")
        self._real("learning_rate", 0.0, low_open=True)
        self._real("weight_decay", 0.0)
        self._real("adam_beta1", 0.0, 1.0)
        self._real("adam_beta2", 0.0, 1.0)
        self._real("adam_epsilon", 0.0)
        self._choice("lr_scheduler", ("constant", "linear", "cosine"))
        self._real("min_lr_ratio", 0.0, 1.0)
        self._real("max_grad_norm", 0.0)
        self._real("peak_tflops", 0.0, low_open=True, optional=True)
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        for name in self.report_to:
            if name not in REPORTERS:
                self._fail("report_to", f"{name!r} is not one of {', '.join(REPORTERS)}")
        if self.resume is not None and self.resume != "auto" and not Path(self.resume).is_dir():
            self._fail("resume", f"{self.resume!r} is neither 'auto' nor a checkpoint directory")
        if self.overwrite_output_dir and self.resume is not None and (
                self.resume == "auto" or Path(self.resume).resolve().is_relative_to(Path(self.output_dir).resolve())):
            self._fail("overwrite_output_dir", f"contradicts resume={self.resume!r} (overwriting removes the "
                                               "checkpoints a resume reads); set one of them")
        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda"):
            self._fail("device", f"must be cpu or cuda[:N], got {self.device!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            self._fail("threads", f"must be an int >= 1 or null (auto), got {self.threads!r}")
        if self.bf16 and self.dtype != "float32":
            self._fail("bf16", f"autocast is for float32 parameters; dtype is {self.dtype}")

    def _check_attention(self) -> None:
        from fastrl.train import attention as backends

        self._choice("attention", backends.ATTENTION_CHOICES)
        if self.attention != "auto" and self.attn_implementation != "auto" and \
                backends.HF_NAMES[self.attention] != self.attn_implementation:
            self._fail("attention", f"{self.attention!r} contradicts attn_implementation="
                                    f"{self.attn_implementation!r}; set one of them and leave the other 'auto'")
        if self.attention in backends.PACKAGES:
            dist, module, how = backends.PACKAGES[self.attention]
            if not backends.installed(module):
                self._fail("attention", f"{self.attention!r} needs the {dist} package, which is not installed: "
                                        f"{how}; or use attention: auto or sdpa")

    def _check_data(self, name: str) -> None:
        """``name`` holds a local data file or directory, or (from Python) a table: a ``datasets.Dataset``
        or a list of dicts."""
        value = getattr(self, name)
        if not isinstance(value, (str, os.PathLike)):
            if isinstance(value, dict) or type(value).__name__ in ("DatasetDict", "IterableDatasetDict"):
                self._fail(name, "is a mapping of splits; give one split (e.g. dataset['train'])")
            if isinstance(value, (list, tuple)):
                if not value:
                    self._fail(name, "the list of rows is empty")
                bad = next((i for i, row in enumerate(value) if not isinstance(row, dict)), None)
                if bad is not None:
                    self._fail(name, f"row {bad + 1} (1-based) is a {type(value[bad]).__name__}, not a dict of "
                                     f"columns")
            elif not hasattr(value, "column_names") or not hasattr(value, "__len__"):
                self._fail(name, f"must be a local .jsonl / .json / .parquet file or directory, or (from Python) a "
                                 f"datasets.Dataset or a list of dicts; got {type(value).__name__}")
            return
        path = Path(value)
        if path.is_dir():
            if not any(p.suffix in DATA_SUFFIXES for p in path.iterdir()):
                self._fail(name, f"directory {str(path)!r} holds no {' / '.join(DATA_SUFFIXES)} file")
        elif not path.is_file():
            self._fail(name, f"{str(path)!r} does not exist (data are read from local files only)")
        elif path.suffix not in DATA_SUFFIXES:
            self._fail(name, f"{str(path)!r} is not a {' / '.join(DATA_SUFFIXES)} file")

    # ---------------------------------------------------------------- helpers
    def to_dict(self) -> dict[str, Any]:
        """The fields (TRL's names left out: they are moved to fastrl's), with objects given from Python (a
        model, a tokenizer, a table, reward callables) replaced by their names: no deep copy of a model."""
        return {f.name: _plain(getattr(self, f.name), table=f.name in ("train_data", "eval_data"))
                for f in dataclasses.fields(self) if f.name not in TRL_NAMES}


# The keys of ``image_generation`` and their defaults (None: off / the model's own value).
IMAGE_GENERATION = {"cfg_weight": 1.0, "image_tokens": None, "plan": "none", "plan_max_tokens": 0,
                    "plan_stop_token_ids": None, "image_token_range": None, "boi_token_id": None, "eoi_token_id": None, "uncond_prompt": None,
                    "decode": None}
PLANS = ("none", "text")
TRAIN_LOGPS = ("conditional", "cfg")


@dataclass
class _ImageFields:
    """Image generation (GRPO, DPO, online DPO, SFT): the settings of an image run, and which log-prob
    training scores image tokens with (``docs/image_generation.md``)."""

    image_generation: dict | str | None = _help(
        "an image-generation run (null: a text run): a mapping of cfg_weight (classifier-free guidance weight w "
        "of the rollout, >= 0; 1 = no guidance), image_tokens (codes per image; null: the model's), plan (none: "
        "the completion is the image; text: a text plan through the lm-head, then the begin-of-image token, then "
        "the image, as BiCoT / T2I-R1), plan_max_tokens, plan_stop_token_ids (the ids that end a plan; null: the "
        "begin-of-image token and the run's stop tokens), image_token_range ([lo, hi): a causal LM whose image "
        "codes are these vocabulary ids; null: a Janus model's image head), boi_token_id, eoi_token_id (null: "
        "the model's), uncond_prompt (the unconditional prompt's token ids; null: the prompt with every token but "
        "BOS / BOI replaced by the pad token, as Janus), decode (codes [n, N] -> pixels [n, H, W, 3], as "
        "'module:function' or from Python a callable; null: the Janus VQ-VAE's; a range model needs one for image "
        "rewards); a JSON string on the command line", None)
    train_logps: Literal["conditional", "cfg"] = _help(
        "the log-prob training gives image tokens: conditional (the conditional branch, as T2I-R1 trains; the "
        "rollout's log-probs are CFG-mixed, which GRPO's is_cap / is_mode importance-sampling correction "
        "accounts for) or cfg (log_softmax(u + w (c - u)), the distribution the rollout sampled from; the "
        "unconditional sequences run through the model with gradient too)", "conditional")

    @property
    def image_run(self) -> bool:
        """Whether the run generates images (``image_generation`` is set)."""
        return self.image_generation is not None

    def image_options(self) -> dict[str, Any] | None:
        """The ``image_generation`` mapping with every key (defaults filled in), or None for a text run."""
        return None if self.image_generation is None else {**IMAGE_GENERATION, **self.image_generation}

    def _validate_image(self) -> None:
        self._choice("train_logps", TRAIN_LOGPS)
        value = self.image_generation
        if value is None:
            if self.train_logps == "cfg":
                self._fail("train_logps", "cfg is the guided log-prob of image tokens; set image_generation")
            return
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                self._fail("image_generation", f"is not valid JSON ({e})")
        if not isinstance(value, dict):
            self._fail("image_generation", f"must be a mapping, got {type(value).__name__}")
        for key in value:
            if key not in IMAGE_GENERATION:
                near = difflib.get_close_matches(str(key), list(IMAGE_GENERATION), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                self._fail("image_generation", f"unknown key {key!r}{hint}; the keys are {', '.join(IMAGE_GENERATION)}")
        value = {**IMAGE_GENERATION, **value}

        def fail(key: str, message: str) -> None:
            self._fail(f"image_generation.{key}", message)

        def integer(key: str, low: int, optional: bool = True) -> None:
            v = value[key]
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                fail(key, f"must be an int >= {low}{' or null' if optional else ''}, got {v!r}")

        w = value["cfg_weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w == w or w in (float("inf"), -float("inf")):
            fail("cfg_weight", f"must be a finite number, got {w!r}")
        if w < 0:
            fail("cfg_weight", f"must be >= 0, got {w}")
        value["cfg_weight"] = float(w)
        integer("image_tokens", 1)
        if value["plan"] not in PLANS:
            fail("plan", f"must be one of {', '.join(PLANS)}; got {value['plan']!r}")
        integer("plan_max_tokens", 0, optional=False)
        if value["plan"] == "text" and value["plan_max_tokens"] == 0:
            fail("plan_max_tokens", "plan text needs plan_max_tokens >= 1")
        if value["plan"] == "none" and value["plan_max_tokens"]:
            fail("plan_max_tokens", "is for plan text; with plan none the completion is the image alone")
        stops = value["plan_stop_token_ids"]
        if stops is not None:
            if isinstance(stops, int) and not isinstance(stops, bool):
                stops = [stops]
            if isinstance(stops, (str, bytes)) or not isinstance(stops, (list, tuple)) or any(
                    isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in stops):
                fail("plan_stop_token_ids", f"must be a token id, a list of token ids or null, got {stops!r}")
            if value["plan"] != "text":
                fail("plan_stop_token_ids", "is for plan text; with plan none there is no plan to stop")
            value["plan_stop_token_ids"] = [int(t) for t in stops]
        span = value["image_token_range"]
        if span is not None:
            if isinstance(span, (str, bytes)) or not isinstance(span, (list, tuple)) or len(span) != 2 or any(
                    isinstance(v, bool) or not isinstance(v, int) for v in span) or not 0 <= span[0] < span[1]:
                fail("image_token_range", f"must be [lo, hi) with 0 <= lo < hi, got {span!r}")
            value["image_token_range"] = [int(span[0]), int(span[1])]
        integer("boi_token_id", 0)
        integer("eoi_token_id", 0)
        prompt = value["uncond_prompt"]
        if prompt is not None and (isinstance(prompt, (str, bytes)) or not isinstance(prompt, (list, tuple)) or any(
                isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in prompt) or not prompt):
            fail("uncond_prompt", f"must be a non-empty list of token ids or null, got {prompt!r}")
        decode = value["decode"]
        if isinstance(decode, str):
            module, sep, name = decode.partition(":")
            if not sep or not module or not name.isidentifier():
                fail("decode", f"{decode!r} is not 'module:function'")
        elif decode is not None and not callable(decode):
            fail("decode", f"must be 'module:function', a callable or null, got {type(decode).__name__}")
        if span is None:
            kind = self.model_config.get("model_type") if self.model is None else None
            if _is_module(self.model):
                kind = getattr(getattr(self.model, "config", None), "model_type", None)
            elif self.model is not None:
                try:
                    kind = json.loads((Path(self.model) / "config.json").read_text(encoding="utf-8")).get("model_type")
                except (OSError, ValueError):
                    kind = None
            if kind is not None and kind != "janus":
                self._fail("image_generation", f"the model ({kind}) has no image head (a Janus model has one); for a "
                                               "causal LM whose image codes are vocabulary ids give "
                                               "image_token_range: [lo, hi)")
        if getattr(self, "rollout_keep_cuda_graph", False):
            self._fail("rollout_keep_cuda_graph", "the image rollout keeps no decoder between calls; set it false")
        self.image_generation = {k: v for k, v in value.items()}


def _dpo_loss_fields() -> list:
    """The fields of :class:`fastrl.losses.DPOSettings` (same names, defaults and help; tuples as lists), then
    ``ld_alpha``, an option of the fused loss rather than of the settings."""
    from fastrl.losses import DPOSettings
    from fastrl.losses.settings import config_fields

    ld_alpha = _help("LD-DPO: weight of the tokens beyond the shorter completion of a pair", None)
    return [*config_fields(DPOSettings), ("ld_alpha", float | None, ld_alpha)]


class _DPOLossFields(dataclasses.make_dataclass("_DPOLossFieldsBase", _dpo_loss_fields(),
                                                namespace={"__module__": __name__})):
    """The loss fields of the DPO configs: those of :class:`fastrl.losses.DPOSettings` (:meth:`loss_settings`)
    and ``ld_alpha``."""

    def loss_settings(self):
        """The loss fields but ``ld_alpha`` as :class:`fastrl.losses.DPOSettings` (checked)."""
        from fastrl.losses import DPOSettings

        return DPOSettings(**{k: v for k, v in self.loss_options().items() if k != "ld_alpha"})

    def loss_options(self) -> dict[str, Any]:
        """Keywords for :class:`fastrl.losses.FusedLinearDPOLoss`: the loss fields, as the config holds them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(_DPOLossFields)}

    @property
    def needs_reference(self) -> bool:
        return self.loss_settings().needs_reference

    def _validate_dpo_loss(self) -> None:
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        if self.ld_alpha is not None:
            self._real("ld_alpha", 0.0, 1.0)
        try:
            self.loss_settings()
        except (TypeError, ValueError) as e:  # the settings' message starts with the field's name
            raise ConfigError(f"{type(self).__name__}.{str(e).split(' ', 1)[0]}: {e}") from None


@dataclass
class _RolloutFields:
    """Generation and reward settings of the online methods (GRPO, online DPO)."""

    num_generations: int = _help("completions per prompt (the group size G)", 8)
    temperature: float = _help("sampling temperature (log-probs are taken at the same temperature)", 1.0)
    top_k: int = _help("top-k filter (0 = off)", 0)
    top_p: float = _help("top-p filter (1 = off)", 1.0)
    min_p: float = _help("min-p filter (0 = off)", 0.0)
    stop_token_ids: list[int] | None = _help(
        "tokens that end a completion (default: the tokenizer's and the model's EOS ids)", None)
    rollout_engine: Literal["auto", "fastrl", "hf", "vllm"] = _help(
        "fastrl.rollout engine: the lean static-KV decoder (fastrl), the model's own forward (hf), auto, or a "
        "colocated vLLM engine (vllm: pip install vllm; weights pushed before each rollout, asleep while training; "
        "one process, CUDA; see fastrl.train.vllm_rollout)", "auto")
    rollout_keep_cuda_graph: bool = _help(
        "keep the lean decoder's static KV cache and CUDA graphs from one rollout to the next (saves their "
        "re-capture, a few decode steps' time) instead of freeing them before the training step; they then "
        "hold 2 * layers * rows * slots * kv_heads * head_dim * dtype bytes through training (~9 GB for a 7B "
        "Qwen2 at 64 rows x 2560 slots in bf16) plus the graphs' memory pool", False)
    vllm_gpu_memory_utilization: float = _help(
        "rollout_engine: vllm: the fraction of the GPU's memory the engine takes (TRL's name and default)", 0.3)
    vllm_enable_sleep_mode: bool = _help(
        "rollout_engine: vllm: free the engine's weights and KV cache while training (sleep level 2; the weights "
        "are pushed again before each rollout). TRL's name; TRL's default is false", True)
    vllm_max_model_length: int | None = _help(
        "rollout_engine: vllm: the engine's context length (none: the model's)", None)
    reward_funcs: list[str] = _help(
        "reward callables as 'module:function' or 'path/to/file.py:function' (per sample or batched; from Python "
        "also the callables themselves); see fastrl.train.rewards", default_factory=list)
    reward_weights: list[float] | None = _help("one weight per reward (callables, then the reward model)", None)
    reward_model: str | None = _help(
        "local directory of an AutoModelForSequenceClassification reward model (from Python also an nn.Module); "
        "or an image reward model {kind: clip | clip_preference, path: DIR, ...} (see fastrl.train.image_rewards)",
        None)
    reward_batch_size: int = _help("completions per reward-model forward", 32)
    allow_missing_columns: bool = _help(
        "a data row without a column a reward asks for (names in its signature, or gets through **kwargs) "
        "hands the reward None for it (a per-sample reward's parameter default, where it has one); false: "
        "an error naming the reward, the column and the row's line", False)
    log_completions: int = _help("sample completions written to completions.jsonl at every log step", 2)
    # --- held-out evaluation (fastrl.train.evaluate)
    eval_data: str | None = _help(
        "held-out prompts (a local .jsonl / .json / .parquet file or directory; from Python also a "
        "datasets.Dataset or a list of dicts), rolled out and scored with the run's rewards; none: no evaluation",
        None)
    eval_every: int = _help("evaluate every N steps (0: at the last step only)", 0)
    eval_num_generations: int | None = _help("completions per held-out prompt (none: num_generations)", None)
    eval_pass_threshold: float = _help(
        "eval/pass_rate is the fraction of completions whose combined reward is above this", 0.0)

    def _validate_rollout(self, min_generations: int) -> None:
        self._positive("num_generations", "reward_batch_size")
        if not isinstance(self.allow_missing_columns, bool):
            self._fail("allow_missing_columns", f"must be true or false, got {self.allow_missing_columns!r}")
        if self.eval_data is not None:
            self._check_data("eval_data")
        self._positive("eval_every", zero_ok=True)
        if self.eval_num_generations is not None:
            self._positive("eval_num_generations")
        self._real("eval_pass_threshold")
        if self.num_generations < min_generations:
            self._fail("num_generations", f"must be >= {min_generations}, got {self.num_generations}")
        self._real("temperature", 0.0, low_open=True)
        self._positive("top_k", zero_ok=True)
        self._real("top_p", 0.0, 1.0, low_open=True)
        self._real("min_p", 0.0, 1.0)
        self._positive("log_completions", zero_ok=True)
        self._choice("rollout_engine", ("auto", "fastrl", "hf", "vllm"))
        self._real("vllm_gpu_memory_utilization", 0.0, 1.0, low_open=True)
        if not isinstance(self.vllm_enable_sleep_mode, bool):
            self._fail("vllm_enable_sleep_mode", f"must be true or false, got {self.vllm_enable_sleep_mode!r}")
        if self.vllm_max_model_length is not None:
            self._positive("vllm_max_model_length")
        if not isinstance(self.rollout_keep_cuda_graph, bool):
            self._fail("rollout_keep_cuda_graph", f"must be true or false, got {self.rollout_keep_cuda_graph!r}")
        if self.stop_token_ids is not None:
            if isinstance(self.stop_token_ids, int):
                self.stop_token_ids = [self.stop_token_ids]
            from fastrl.rollout import resolve_stop_tokens  # the one check of stop ids (rollout and trainer)

            try:
                resolve_stop_tokens(self.stop_token_ids)
            except ValueError:
                self._fail("stop_token_ids", f"must be non-negative token ids, got {self.stop_token_ids!r}")
        if isinstance(self.reward_funcs, str) or callable(self.reward_funcs):
            self.reward_funcs = [self.reward_funcs]
        for spec in self.reward_funcs:
            if not isinstance(spec, str):
                if not callable(spec):
                    self._fail("reward_funcs", f"{spec!r} is neither 'module:function' nor a callable")
                continue
            module, sep, name = spec.partition(":")
            if not sep or not module or not name.isidentifier():
                self._fail("reward_funcs", f"{spec!r} is not 'module:function'")
        if isinstance(self.reward_model, str) and self.reward_model.lstrip().startswith("{"):
            try:  # an image reward model's mapping, as JSON on the command line
                self.reward_model = json.loads(self.reward_model)
            except json.JSONDecodeError as e:
                self._fail("reward_model", f"is not valid JSON ({e})")
        if isinstance(self.reward_model, dict):
            from fastrl.train.image_rewards import check_image_reward_spec

            try:
                check_image_reward_spec(self.reward_model)
            except ValueError as e:
                raise ConfigError(f"{type(self).__name__}.{e}") from None
        elif isinstance(self.reward_model, (str, os.PathLike)):
            if not (Path(self.reward_model) / "config.json").is_file():
                self._fail("reward_model", f"{str(self.reward_model)!r} is not a local model directory with a "
                                           f"config.json")
        elif self.reward_model is not None and not callable(self.reward_model):
            self._fail("reward_model", f"must be a model directory or an nn.Module, got "
                                       f"{type(self.reward_model).__name__}")
        n_rewards = len(self.reward_funcs) + (self.reward_model is not None)
        if n_rewards == 0:
            self._fail("reward_funcs", "give at least one reward: reward_funcs and/or reward_model")
        if self.reward_weights is not None:
            if len(self.reward_weights) != n_rewards:
                self._fail("reward_weights",
                           f"needs one weight per reward ({n_rewards}), got {len(self.reward_weights)}")
            self.reward_weights = [float(w) for w in self.reward_weights]


@dataclass
class _OnlineTRLNames:
    """TRL's names of fields of the online methods (GRPO, online DPO)."""

    shuffle_dataset: bool | None = _alias("shuffle")
    eval_steps: int | None = _alias("eval_every")
    num_generations_eval: int | None = _alias("eval_num_generations")


@dataclass
class _GRPOTRLNames:
    """TRL's names of GRPO fields (``trl.GRPOConfig``)."""

    scale_rewards: str | None = _alias("advantage_scale", "group, batch or none (true: group, false: none)")
    multi_objective_aggregation: str | None = _alias("multi_reward")
    sapo_temperature_pos: float | None = _alias("sapo_tau_pos")
    sapo_temperature_neg: float | None = _alias("sapo_tau_neg")
    vespo_k_pos: float | None = _alias("vespo_k", "its first (positive-advantage) value")
    vespo_k_neg: float | None = _alias("vespo_k", "its second (negative-advantage) value")
    vespo_lambda_pos: float | None = _alias("vespo_lambda", "its first (positive-advantage) value")
    vespo_lambda_neg: float | None = _alias("vespo_lambda", "its second (negative-advantage) value")
    vllm_importance_sampling_mode: str | None = _alias("is_mode")
    vllm_importance_sampling_clip_max: float | None = _alias("is_cap")
    vllm_importance_sampling_clip_min: float | None = _alias("is_min")


@dataclass
class _DPOTRLNames:
    """TRL's names of the DPO loss fields (``trl.DPOConfig``)."""

    f_divergence_type: str | None = _alias("f_divergence")
    f_alpha_divergence_coef: float | None = _alias("f_alpha")


@dataclass
class _OfflineDPOTRLNames:
    """TRL's names of the offline DPO reference fields."""

    precompute_ref_log_probs: bool | None = _alias("reference", "true: precomputed, false: live")
    precompute_ref_batch_size: int | None = _alias("reference_batch_size")


@dataclass
class _OnlineDPOTRLNames:
    """TRL's names of online DPO fields (``trl.experimental.online_dpo.OnlineDPOConfig``)."""

    max_new_tokens: int | None = _alias("max_completion_length")


@dataclass
class DPOConfig(_OfflineDPOTRLNames, _DPOTRLNames, _DPOLossFields, _ImageFields, TrainConfig):
    """Offline DPO on preference pairs (columns prompt / chosen / rejected)."""

    chosen_column: str = _help("column of the preferred completions", "chosen")
    rejected_column: str = _help("column of the dispreferred completions", "rejected")
    reference: Literal["precomputed", "live"] = _help(
        "precomputed: reference log-probs in one pass before training, cached on disk; "
        "live: a frozen reference model scores every batch", "precomputed")
    reference_model: str | None = _help("local directory of the reference model (default: the initial policy; from "
                                        "Python also an nn.Module)", None)
    reference_cache_dir: str | None = _help("reference log-prob cache (default: <output_dir>/reference_cache)", None)
    reference_batch_size: int = _help("pairs per forward of the reference pass (0 = batch_size)", 0)

    def validate(self) -> None:
        super().validate()
        self._choice("reference", ("precomputed", "live"))
        if self.reference_model is not None and not _is_module(self.reference_model) and \
                not (Path(self.reference_model) / "config.json").is_file():
            self._fail("reference_model", f"{self.reference_model!r} is not a local model directory with a config.json")
        self._positive("reference_batch_size", zero_ok=True)
        self._validate_dpo_loss()
        self._validate_image()


# The keys of ``async_rollout`` and ``filter_groups`` and their defaults (fastrl.train.step_source).
ASYNC_ROLLOUT = {"enabled": False, "max_staleness": 1, "on_failure": "restart", "max_restarts": 3,
                 "timeout_s": 600.0, "threads": None}
FILTER_GROUPS = {"metric": "reward", "max_tries": 4}
ASYNC_IS_CAP = 3.0  # is_cap of an async GRPO run with max_staleness > 0 that sets none


def _mapping_field(config, name: str, defaults: dict[str, Any]) -> dict[str, Any] | None:
    """``config.<name>`` as a mapping with every key (None stays None); unknown keys and bad JSON fail naming it."""
    value = getattr(config, name)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            config._fail(name, f"is not valid JSON ({e})")
    if isinstance(value, bool) and name == "async_rollout":
        value = {"enabled": value}
    if not isinstance(value, dict):
        config._fail(name, f"must be a mapping, got {type(value).__name__}")
    for key in value:
        if key not in defaults:
            near = difflib.get_close_matches(str(key), list(defaults), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            config._fail(name, f"unknown key {key!r}{hint}; the keys are {', '.join(defaults)}")
    return {**defaults, **value}


@dataclass
class _AsyncFields:
    """Asynchronous rollout (GRPO, online DPO): a worker process samples and scores the next steps while
    the trainer trains (``docs/async_grpo.md``)."""

    async_rollout: dict | str | None = _help(
        "a rollout worker process that generates and scores steps t+1..t+k while the trainer trains step t "
        "(null / enabled: false: synchronous): a mapping of enabled, max_staleness (k >= 0: a batch is sampled by "
        "weights at most k updates old; 0 gives the synchronous run's numbers), on_failure (restart: a worker that "
        "dies is started again with the current weights, up to max_restarts times; stop: the run saves and stops), "
        "max_restarts, timeout_s (the longest wait for a batch), threads (the worker's intra-op threads; null: "
        "half the cores); one process, fastrl's own rollout engine; a JSON string on the command line. GRPO trains "
        "on the worker's batches with the sampler's importance-sampling correction (is_mode, is_cap; with "
        "max_staleness > 0 and no is_cap, is_cap is 3)", None)

    def async_options(self) -> dict[str, Any] | None:
        """The ``async_rollout`` mapping with every key when enabled, else None."""
        value = _mapping_field(self, "async_rollout", ASYNC_ROLLOUT)
        return value if value is not None and value["enabled"] else None

    def _validate_async(self) -> None:
        value = _mapping_field(self, "async_rollout", ASYNC_ROLLOUT)
        if value is None:
            return
        self.async_rollout = value

        def fail(key: str, message: str) -> None:
            self._fail(f"async_rollout.{key}", message)

        if not isinstance(value["enabled"], bool):
            fail("enabled", f"must be true or false, got {value['enabled']!r}")
        k = value["max_staleness"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            fail("max_staleness", f"must be an int >= 0 (updates a batch's weights may lag), got {k!r}")
        if value["on_failure"] not in ("restart", "stop"):
            fail("on_failure", f"must be restart or stop, got {value['on_failure']!r}")
        n = value["max_restarts"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            fail("max_restarts", f"must be an int >= 0, got {n!r}")
        t = value["timeout_s"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            fail("timeout_s", f"must be a number > 0, got {t!r}")
        threads = value["threads"]
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            fail("threads", f"must be null or an int >= 1, got {threads!r}")
        if not value["enabled"]:
            return
        if self.rollout_engine == "vllm":
            self._fail("async_rollout", "runs fastrl's own rollout in a worker process; rollout_engine: vllm "
                                        "is colocated with the trainer (use one or the other)")
        if self.peft_config is not None:
            self._fail("async_rollout", "a LoRA run (peft_config) is not supported in async mode yet")
        if k > 0 and hasattr(self, "is_cap") and self.is_cap is None:
            self.is_cap = ASYNC_IS_CAP  # off-policy batches: the sampler correction, truncated (TRL's default cap)


# The loss fields of GRPOConfig: every field of GRPOSettings (same names, defaults and help) but
# max_completion_length, which the config has already (TrainConfig) and hands to the settings.
_GRPOLossFields = dataclasses.make_dataclass(
    "_GRPOLossFields", config_fields(GRPOSettings, exclude=("max_completion_length",),
                                     help={"beta": "KL coefficient (0 = no reference model is loaded)"}),
    namespace={"__module__": __name__, "__doc__": "The fields of :class:`fastrl.losses.GRPOSettings`."})


@dataclass
class GRPOConfig(_GRPOTRLNames, _OnlineTRLNames, _GRPOLossFields, _AsyncFields, _RolloutFields, _ImageFields,
                 TrainConfig):
    """GRPO-family RL on prompts with rewards (:func:`fastrl.train.grpo.train_grpo`).

    The loss fields are those of :class:`fastrl.losses.GRPOSettings` (:meth:`loss_settings`). Every
    field is documented by its ``help`` (``fastrl train grpo --help``).
    """

    num_iterations: int = _help("μ: optimiser passes over each rollout batch", 1)
    mask_truncated_completions: bool = _help("completions without EOS get no loss", False)
    advantage_estimator: str = _help(
        "group_advantages estimator: grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline, remax (baseline: the "
        "reward of a greedy completion), opo (completion lengths), pref_grpo (preferences from the rewards)", "grpo")
    advantage_scale: str = _help("group, batch or none", "group")
    advantage_eps: float = _help("ε added to the std", 1e-4)
    multi_reward: Literal["sum_then_normalize", "normalize_then_sum"] = _help(
        "several rewards: weighted sum then the estimator, or the estimator per reward then the weighted sum (GDPO)",
        "sum_then_normalize")
    old_logps: Literal["auto", "policy", "sampler"] = _help(
        "π_old of the ratio: auto = on-policy (the current log-probs, detached) when num_iterations is 1, else "
        "policy; policy = a no-grad fused forward of the policy before the first update; sampler = the rollout "
        "engine's log-probs (no extra forward)", "auto")
    filter_groups: dict | str | None = _help(
        "dynamic sampling (DAPO): drop the groups whose completions all scored the same (zero advantage, no "
        "gradient) and sample more prompts until the step has its batch_size x gradient_accumulation_steps "
        "groups: a mapping of metric (reward: the combined reward; accuracy: combined reward > "
        "eval_pass_threshold; or one reward's name) and max_tries (rollouts per step at most; a step still short "
        "trains on the groups it has); one process; null: off", None)

    def filter_options(self) -> dict[str, Any] | None:
        """The ``filter_groups`` mapping with every key, or None (off)."""
        return _mapping_field(self, "filter_groups", FILTER_GROUPS)

    def loss_settings(self) -> GRPOSettings:
        """The loss settings: the loss fields and the config's ``max_completion_length`` (checked)."""
        names = [f.name for f in dataclasses.fields(_GRPOLossFields)]
        return GRPOSettings(**{name: getattr(self, name) for name in names},
                            max_completion_length=self.max_completion_length)

    def loss_options(self) -> dict[str, Any]:
        """Keywords for :class:`fastrl.losses.FusedLinearGRPOLoss`: the fields of :meth:`loss_settings`."""
        return self.loss_settings().options()

    def advantage_options(self) -> dict[str, Any]:
        """Keywords for :func:`fastrl.ops.group_advantages`."""
        return {"estimator": self.advantage_estimator, "scale": self.advantage_scale, "eps": self.advantage_eps,
                "multi_reward": self.multi_reward}

    def validate(self) -> None:
        super().validate()
        self._validate_rollout(min_generations=2)
        self._validate_image()
        self._validate_async()
        self._positive("num_iterations")
        groups = self.filter_options()
        if groups is not None:
            self.filter_groups = groups
            tries = groups["max_tries"]
            if isinstance(tries, bool) or not isinstance(tries, int) or tries < 1:
                self._fail("filter_groups.max_tries", f"must be an int >= 1, got {tries!r}")
            if not isinstance(groups["metric"], str) or not groups["metric"]:
                self._fail("filter_groups.metric", f"must be reward, accuracy or a reward's name, got "
                                                   f"{groups['metric']!r}")
            if self.advantage_estimator == "remax":
                self._fail("filter_groups", "remax's greedy baseline is not sampled for refilled groups; use "
                                            "another advantage_estimator or no filter_groups")
        try:
            self.loss_settings()
        except (TypeError, ValueError) as e:  # the settings' message starts with the field's name
            raise ConfigError(f"GRPOConfig.{str(e).split(' ', 1)[0]}: {e}") from None
        import torch

        from fastrl.ops import group_advantages

        self._choice("old_logps", ("auto", "policy", "sampler"))
        extras = {"remax": {"baseline_rewards": torch.zeros(2)}, "opo": {"lengths": torch.ones(2)},
                  "pref_grpo": {"preferences": torch.zeros(2, 2)}}.get(self.advantage_estimator, {})
        try:
            group_advantages(torch.zeros(2), 2, **self.advantage_options(), **extras)
        except (TypeError, ValueError) as e:
            name = {"estimator": "advantage_estimator", "scale": "advantage_scale", "eps": "advantage_eps",
                    "multi_reward": "multi_reward"}.get(str(e).split(" ", 1)[0], "advantage_estimator")
            raise ConfigError(f"GRPOConfig.{name}: {e}") from None


@dataclass
class OnlineDPOConfig(_OnlineDPOTRLNames, _DPOTRLNames, _OnlineTRLNames, _DPOLossFields, _AsyncFields, _RolloutFields,
                      _ImageFields, TrainConfig):
    """Online / iterative DPO: pairs sampled from the current policy and scored by the rewards."""

    num_generations: int = _help("completions per prompt (>= 2)", 2)
    pairing: Literal["best_worst", "all_pairs"] = _help("pairs per prompt: best vs worst, or every ordered pair",
                                                        "best_worst")
    reference_update: Literal["fixed", "previous_iterate"] = _help(
        "the reference stays the initial policy, or becomes the policy every reference_update_every steps "
        "(iterative DPO)", "fixed")
    reference_update_every: int = _help("steps between reference updates (previous_iterate)", 1)
    min_reward_gap: float = _help("drop pairs whose reward gap is smaller (curriculum by gap)", 0.0)

    def validate(self) -> None:
        super().validate()
        self._validate_rollout(min_generations=2)
        self._choice("pairing", ("best_worst", "all_pairs"))
        self._choice("reference_update", ("fixed", "previous_iterate"))
        self._positive("reference_update_every")
        self._real("min_reward_gap", 0.0)
        self._validate_dpo_loss()
        self._validate_image()
        self._validate_async()


@dataclass
class SFTConfig(_ImageFields, TrainConfig):
    """Supervised fine-tuning: next-token NLL on the completion tokens (columns prompt / completion)."""

    completion_column: str = _help("column of the completions (text, chat messages or token ids)", "completion")

    def validate(self) -> None:
        super().validate()
        self._validate_image()


@dataclass
class RMConfig(TrainConfig):
    """Reward model: a sequence classifier with one output trained with the Bradley–Terry loss on preference pairs.

    The model is ``AutoModelForSequenceClassification`` with ``num_labels=1``; the pairs' columns are
    prompt / chosen / rejected, optionally margin; :func:`fastrl.train.rm.train_rm`. Every field is
    documented by its ``help`` (``fastrl train rm --help``).
    """

    num_labels = 1  # not a field: the model the run builds is a sequence classifier with one output
    chosen_column: str = _help("column of the preferred completions", "chosen")
    rejected_column: str = _help("column of the dispreferred completions", "rejected")
    margin_column: str | None = _help(
        "column of a per-pair margin m (a number; the loss is -log sigmoid(r_chosen - r_rejected - m)); "
        "none: no margin", None)
    center_rewards_coefficient: float | None = _help(
        "weight of mean((r_chosen + r_rejected)^2) added to the loss, which keeps the rewards centred on 0 "
        "(TRL's center_rewards_coefficient); none: off", None)

    def validate(self) -> None:
        super().validate()
        for name in ("chosen_column", "rejected_column", "margin_column"):
            value = getattr(self, name)
            if not (isinstance(value, str) and value) and not (value is None and name == "margin_column"):
                self._fail(name, f"must be a column name, got {value!r}")
        self._real("center_rewards_coefficient", 0.0, optional=True)


CONFIGS: dict[str, type[TrainConfig]] = {"dpo": DPOConfig, "grpo": GRPOConfig, "online-dpo": OnlineDPOConfig,
                                         "rm": RMConfig, "sft": SFTConfig}


def config_class(method: str) -> type[TrainConfig]:
    """The config class of a training method.

    Args:
        method: ``"dpo"`` / ``"grpo"`` / ``"online-dpo"`` (``online_dpo`` too) / ``"rm"`` / ``"sft"``.

    Returns:
        Its :class:`TrainConfig` subclass.

    Raises:
        ValueError: an unknown ``method``.
    """
    key = method.replace("_", "-")
    if key not in CONFIGS:
        raise ValueError(f"method must be one of {', '.join(CONFIGS)}; got {method!r}")
    return CONFIGS[key]


def load_config(cls: type[TrainConfig] | str, path: str | os.PathLike | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The config of ``cls`` from the YAML file ``path`` (optional) with ``overrides`` applied.

    ``cls`` is a :class:`TrainConfig` subclass or a method name (:func:`config_class`).

    Args:
        path: a YAML mapping of field: value, or None.
        overrides: argparse options of transformers' ``HfArgumentParser``, one per field:
            ``["--beta", "0.2", "--loss_type", "sigmoid", "ipo", "--no_packing", "--model_config",
            '{"...": 1}']``.

    Returns:
        The config, validated.

    Raises:
        ConfigError: unknown YAML keys and unknown options, naming them; a value of the wrong type or
            outside the choices; a YAML file that is not a mapping; and the validation's errors.
    """
    import yaml
    from transformers import HfArgumentParser

    if isinstance(cls, str):
        cls = config_class(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    parser = HfArgumentParser(cls, prog=f"fastrl train {cls.__name__.removesuffix('Config').lower()}",
                              exit_on_error=False, allow_abbrev=False)
    if path is not None:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the YAML file must be a mapping of field: value")
        for key in data:
            if key not in names:
                near = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(f"{path}: unknown key {key!r}: {cls.__name__} has no such field{hint}")
        parser.set_defaults(**data)
    try:
        namespace, unknown = parser.parse_known_args(list(overrides))
    except argparse.ArgumentError as e:  # a value of the wrong type or outside the choices
        raise ConfigError(f"{cls.__name__}: {e}") from None
    if unknown:
        flags = [u for u in unknown if u.startswith("-")]
        word = (flags or unknown)[0]
        near = difflib.get_close_matches(word.lstrip("-").replace("-", "_"), names, n=1)
        hint = f" (did you mean --{near[0]}?)" if near else ""
        raise ConfigError(f"{cls.__name__}: unknown option {word!r}{hint}")
    config = cls(**{k: v for k, v in vars(namespace).items() if k in names})
    return config
