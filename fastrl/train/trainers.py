"""Trainer classes shaped like TRL's: ``GRPOTrainer``, ``DPOTrainer``, ``OnlineDPOTrainer``.

A thin layer over the recipes (:func:`~fastrl.train.grpo.train_grpo`, :func:`~fastrl.train.dpo.train_dpo`,
:func:`~fastrl.train.online_dpo.train_online_dpo`), not a second trainer: the constructor builds the
method's config from ``args`` and the objects given, ``.train()`` runs the recipe::

    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy], args=trl.GRPOConfig(...),
                          train_dataset=dataset, processing_class=tokenizer)
    result = trainer.train()     # a TrainResult: result.history, result.checkpoint

- ``model``: a local model directory or a transformers model in memory (used itself, trained in
  place, cast to the config's ``dtype``, which defaults to the model's own). Nothing is downloaded:
  a hub id that is not a local directory is refused.
- ``processing_class``: a tokenizer, or its local directory; None: the model directory's tokenizer,
  or none (the data are then token ids).
- ``train_dataset`` / ``eval_dataset``: a ``datasets.Dataset``, a list of dicts, or a local file or
  directory (``eval_dataset``: held-out prompts of the online methods, :mod:`fastrl.train.evaluate`).
- ``args``: a ``trl.GRPOConfig`` / ``trl.DPOConfig`` (or any ``transformers.TrainingArguments``),
  converted field by field with TRL's values (:func:`config_from_trl`); a dict of fastrl or TRL
  names (:data:`fastrl.train.config.TRL_NAMES`); a fastrl config of the method; or None.
- ``reward_funcs``: callables (TRL's form or fastrl's, :mod:`fastrl.train.rewards`),
  ``"module:function"`` strings, a reward model (a local directory or an ``nn.Module``), or a list
  of them.
- ``peft_config``: a ``peft.LoraConfig`` or its fields as a dict (the config's ``peft_config``).
- ``callbacks``: fastrl callbacks (:class:`TrainerCallback`, or any object with its methods) and
  ``transformers.TrainerCallback`` objects or classes (called with ``args, state, control`` on
  step end, log, save and train end; ``control`` is not read back).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import warnings
from typing import Any

from fastrl.train.config import (REPORTERS, TRL_NAMES, ConfigError, DPOConfig, GRPOConfig, OnlineDPOConfig,
                                 TrainConfig)
from fastrl.train.dpo import train_dpo
from fastrl.train.grpo import train_grpo
from fastrl.train.online_dpo import train_online_dpo
from fastrl.train.run import Run, TrainResult

__all__ = ["DPOTrainer", "GRPOTrainer", "OnlineDPOTrainer", "TrainerCallback", "config_from_trl"]


class TrainerCallback:
    """A base for run callbacks; each method is called on every process (see :mod:`fastrl.train.run`).

    Override what you need; the defaults do nothing.
    """

    def on_step_end(self, run: Run, step: int) -> dict[str, float] | None:
        """After step ``step``'s optimiser step; a returned dict of floats joins the step's logged record."""
        return None

    def on_log(self, run: Run, step: int, record: dict[str, Any]) -> None:
        """After the record of step ``step`` is logged."""

    def on_save(self, run: Run, step: int, path) -> None:
        """After the checkpoint of step ``step`` is written to ``path``."""

    def on_train_end(self, run: Run, result: TrainResult) -> None:
        """At the end of the run, with its result."""


class _HFCallback:
    """A ``transformers.TrainerCallback`` called with ``(args, state, control, **kwargs)`` from fastrl's hooks."""

    def __init__(self, callback, args):
        from transformers import TrainerControl, TrainerState

        self.callback, self.args = callback, args
        self.state, self.control = TrainerState(), TrainerControl()

    def _sync(self, run: Run, step: int) -> None:
        s = self.state
        s.global_step, s.max_steps, s.log_history = step, run.total_steps, run.history
        s.epoch = float(run.order.epoch) if run.order is not None else 0.0
        s.is_world_process_zero = s.is_local_process_zero = run.world.is_main

    def _call(self, hook: str, run: Run, step: int, **kwargs) -> None:
        self._sync(run, step)
        getattr(self.callback, hook)(self.args, self.state, self.control, model=run.model,
                                     processing_class=run.tokenizer, optimizer=run.optimizer,
                                     lr_scheduler=run.scheduler, **kwargs)

    def on_step_end(self, run: Run, step: int) -> None:
        self._call("on_step_end", run, step)

    def on_log(self, run: Run, step: int, record: dict[str, Any]) -> None:
        self._call("on_log", run, step, logs=record)

    def on_save(self, run: Run, step: int, path) -> None:
        self._call("on_save", run, step)

    def on_train_end(self, run: Run, result: TrainResult) -> None:
        self._call("on_train_end", run, run.total_steps)


# ---------------------------------------------------------------------------------------------- TRL configs

# TrainingArguments fields that would change the numbers and that fastrl does not do: refused unless at
# their default. The other TrainingArguments fields (logging, hub, dataloader, process setup) are ignored.
_BASE_REFUSED = ("fp16", "lr_scheduler_kwargs", "label_smoothing_factor", "optim_args", "neftune_noise_alpha",
                 "auto_find_batch_size", "data_seed", "warmup_ratio", "group_by_length", "fsdp", "deepspeed",
                 "torch_compile_mode", "average_tokens_across_devices")
# TRL-only fields that do not change the numbers fastrl computes (memory, speed, logging, hub, processes) or
# whose TRL default is what fastrl does anyway: ignored whatever their value.
_TRL_IGNORED = ("model_init_kwargs", "trust_remote_code", "disable_dropout", "cast_lm_head_to_fp32",
                "remove_unused_columns", "ds3_gather_for_generation", "pad_to_multiple_of", "cache_implementation",
                "padding_free", "pad_token", "dataset_num_proc", "activation_offloading", "log_multimodal",
                "num_completions_to_print", "log_unique_prompts", "log_completions_hub_repo", "vllm_mode",
                "vllm_model_impl", "vllm_server_base_url", "vllm_server_host", "vllm_server_port",
                "vllm_server_timeout", "vllm_group_port", "vllm_importance_sampling_cap",
                "use_transformers_paged", "generation_batch_size", "steps_per_generation",
                "vllm_importance_sampling_correction", "truncation_mode")


def _field_defaults(obj) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _plain(value: Any) -> Any:
    return getattr(value, "value", value)  # transformers' str enums (IntervalStrategy, SchedulerType, ...)


def config_from_trl(args, cls: type[TrainConfig]) -> dict[str, Any]:
    """The fields of ``cls`` that a TRL config (a ``transformers.TrainingArguments``) sets, with TRL's values.

    Every field fastrl has under the same name or under TRL's name (:data:`fastrl.train.config.TRL_NAMES`)
    is taken with the object's value, TRL's defaults included (``num_train_epochs: 3``,
    ``logging_steps: 10``, ``seed: 42``, ``gradient_checkpointing``, ``bf16``, ...); some are read
    with TRL's meaning: ``max_steps: -1`` (0), ``log_completions`` (a flag: 0 or 2 samples),
    ``report_to`` (``none``), ``use_cpu``, ``disable_tqdm``, ``torch_compile``, ``eval_strategy`` /
    ``save_strategy`` (``steps`` / ``no``), ``use_vllm`` (``rollout_engine: vllm``, with TRL's
    importance-sampling fields), ``generation_batch_size`` / ``steps_per_generation`` (one rollout
    per step, as TRL's defaults), ``max_length`` (DPO; refused unless at its default).

    Args:
        args: the TRL config object.
        cls: the fastrl config class it is converted for.

    Returns:
        ``{field: value}``, TRL's names among them (the config maps them).

    Raises:
        ConfigError: a setting fastrl does not have, away from TRL's default (``<cls>: ...`` naming
            every such field), or a value fastrl cannot take (``eval_strategy: epoch``, ...).
    """
    from transformers import TrainingArguments

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if hasattr(args, f.name)}
    defaults = _field_defaults(args)
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    refused: list[str] = []
    where = f"{cls.__name__} (from {type(args).__module__.partition('.')[0]}.{type(args).__name__})"

    def differs(name: str) -> bool:
        return _plain(values[name]) != _plain(defaults.get(name))

    v = values.get
    # the values read with TRL's meaning
    if v("max_steps") is not None:
        out["max_steps"] = max(int(v("max_steps")), 0)
    if "log_completions" in values and "log_completions" in names:
        out["log_completions"] = 2 if v("log_completions") else 0
    reporters = v("report_to") or []
    reporters = [reporters] if isinstance(reporters, str) else list(reporters)
    dropped = [r for r in reporters if r not in REPORTERS and r != "none"]
    if dropped:
        warnings.warn(f"{where}: report_to {dropped} not supported by fastrl (it logs to metrics.jsonl and "
                      f"{', '.join(REPORTERS)}); left out", stacklevel=3)
    out["report_to"] = [r for r in reporters if r in REPORTERS]
    if v("use_cpu"):
        out["device"] = "cpu"
    if v("disable_tqdm"):
        out["progress"] = False
    if v("torch_compile"):
        out["compile"] = True
    warmup = v("warmup_steps") or 0
    if warmup and (warmup < 1 or warmup != int(warmup)):
        raise ConfigError(f"{where}.warmup_steps: {warmup!r} is a ratio of the run; fastrl takes a whole number of "
                          f"warm-up steps")
    out["warmup_steps"] = int(warmup)
    save = str(_plain(v("save_strategy", "steps")))
    if save == "no":
        out["save_every"] = 0
        values.pop("save_steps", None)
    elif save != "steps":
        raise ConfigError(f"{where}.save_strategy: {save!r} has no fastrl equivalent; use steps (save_steps) or no")
    evaluate = str(_plain(v("eval_strategy", "no")))
    if evaluate == "steps" and "eval_every" in names:
        out["eval_every"] = int(v("eval_steps") or v("logging_steps") or 0)
    elif evaluate not in ("no", "steps"):
        raise ConfigError(f"{where}.eval_strategy: {evaluate!r} has no fastrl equivalent; use steps (eval_steps) "
                          f"or no (fastrl then evaluates an eval_dataset at the last step)")
    if "steps_per_generation" in values and v("steps_per_generation") not in (None,
                                                                              v("gradient_accumulation_steps")):
        refused.append(f"steps_per_generation={v('steps_per_generation')!r} (fastrl: one rollout per step)")
    if v("use_vllm"):
        if str(v("vllm_mode")) != "colocate":
            raise ConfigError(f"{where}.vllm_mode: {v('vllm_mode')!r}: fastrl runs vLLM colocated only")
        out["rollout_engine"] = "vllm"  # vllm_gpu_memory_utilization & co: fastrl's fields of the same names
        if v("vllm_importance_sampling_correction", False):
            for trl in ("vllm_importance_sampling_mode", "vllm_importance_sampling_clip_max",
                        "vllm_importance_sampling_clip_min"):
                if v(trl) is not None:
                    out[trl] = _plain(v(trl))
    if "max_length" in values and differs("max_length"):
        refused.append(f"max_length={v('max_length')!r} (fastrl bounds max_prompt_length and max_completion_length)")
    handled = {"max_steps", "log_completions", "report_to", "use_cpu", "disable_tqdm", "torch_compile",
               "warmup_steps", "save_strategy", "eval_strategy", "steps_per_generation", "use_vllm", "max_length",
               "vllm_importance_sampling_mode",
               "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min", "eval_steps", "beta",
               "reward_model_path"}
    if not isinstance(v("beta"), (list, tuple)) and v("beta") is not None and "beta" in names:
        out["beta"] = v("beta")
    if isinstance(v("beta"), (list, tuple)):  # TRL's online DPO: one beta per epoch
        if len(v("beta")) != 1:
            refused.append(f"beta={list(v('beta'))!r} (fastrl: one beta for the run)")
        else:
            out["beta"] = float(v("beta")[0])
    if v("reward_model_path") is not None and "reward_model" in names:
        out["reward_model"] = v("reward_model_path")
    init = v("model_init_kwargs") or {}
    dtype = str(init.get("dtype", init.get("torch_dtype", "auto")) if isinstance(init, dict) else "auto")
    if dtype != "auto":  # a model loaded from its directory, in this dtype
        out["dtype"] = dtype.removeprefix("torch.")
    for name, value in values.items():
        if name in handled or name in _TRL_IGNORED:
            continue
        if name in names and (name in TRL_NAMES or name not in base or name in _SAME_MEANING):
            if value is not None:
                out[name] = _plain(value)
        elif name in base:
            if name in _BASE_REFUSED and differs(name):
                refused.append(f"{name}={_plain(value)!r}")
        elif differs(name):
            refused.append(f"{name}={_plain(value)!r}")
    if refused:
        raise ConfigError(f"{where}: fastrl has no equivalent of {', '.join(refused)}; leave them at TRL's defaults "
                          f"(docs/migration.md lists what fastrl takes)")
    return out


# TrainingArguments fields fastrl has under the same name with the same meaning
_SAME_MEANING = ("output_dir", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
                 "max_grad_norm", "gradient_accumulation_steps", "seed", "run_name", "bf16", "gradient_checkpointing",
                 "overwrite_output_dir")


# ---------------------------------------------------------------------------------------------- trainers

def _dtype_name(model) -> str | None:
    import torch

    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    for p in model.parameters():
        if p.is_floating_point():
            return names.get(p.dtype)
    return None


def _is_hf_args(args) -> bool:
    try:
        from transformers import TrainingArguments
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(args, TrainingArguments)


class _Trainer:
    """What the three trainers share: the config built from ``args`` and the objects, and ``train``."""

    config_class: type[TrainConfig] = TrainConfig

    def __init__(self, model, *, args=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 peft_config=None, callbacks=None, **objects):
        fields = self._fields(args)
        if model is not None:
            fields["model"], fields["model_config"] = os.fspath(model) if isinstance(model, os.PathLike) else model, None
        if processing_class is not None:
            fields["tokenizer"] = processing_class
        if train_dataset is not None:
            fields["train_data"] = train_dataset
        if eval_dataset is not None:
            fields["eval_data"] = eval_dataset
        if peft_config is not None:
            if not isinstance(peft_config, dict):
                from fastrl.train.adapters import config_dict

                try:
                    peft_config = config_dict(peft_config)
                except TypeError as e:
                    raise ConfigError(f"{self.config_class.__name__}.{e}") from None
            fields["peft_config"] = peft_config
        fields.update({k: v for k, v in objects.items() if v is not None})
        given = fields.get("model")
        if given is not None and not isinstance(given, (str, os.PathLike)) and "dtype" not in self._explicit:
            fields["dtype"] = _dtype_name(given) or "float32"  # a model in memory keeps its dtype
        if fields.get("dtype", "float32") != "float32" and fields.get("bf16"):
            fields["bf16"] = False  # TRL's bf16 autocast over half-precision parameters: the same numbers
        self._check_names(fields)
        #: the fastrl config the recipe runs (``args`` converted, the objects set)
        self.config = self.config_class(**fields)
        self.args = self.config
        self.model = self.config.model
        self.processing_class = self.config.tokenizer
        self.callbacks: list[Any] = []
        self._hf_args = args if _is_hf_args(args) else self.config
        for callback in callbacks or ():
            self.add_callback(callback)
        self.result: TrainResult | None = None

    def _fields(self, args) -> dict[str, Any]:
        cls = self.config_class
        self._explicit: set[str] = set()
        if args is None:
            return {}
        if isinstance(args, dict):
            self._explicit = set(args)
            return dict(args)
        if isinstance(args, TrainConfig):
            if not isinstance(args, cls):
                raise TypeError(f"{type(self).__name__}: args is a {type(args).__name__}; give a {cls.__name__}, "
                                f"a TRL config or a dict")
            self._explicit = {"dtype"} if args.dtype != "float32" else set()
            return {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.name not in TRL_NAMES}
        if _is_hf_args(args):
            fields = config_from_trl(args, cls)
            self._explicit = set(fields) & {"dtype"}
            return fields
        raise TypeError(f"{type(self).__name__}: args must be a {cls.__name__}, a TRL config (transformers."
                        f"TrainingArguments), a dict or None; got {type(args).__name__}")

    def _check_names(self, fields: dict[str, Any]) -> None:
        cls = self.config_class
        names = [f.name for f in dataclasses.fields(cls)]
        for key in fields:
            if key not in names:
                near = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(f"{cls.__name__}: unknown field {key!r}{hint}")

    def add_callback(self, callback) -> None:
        """Add a callback: a fastrl one (:class:`TrainerCallback` methods) or a ``transformers.TrainerCallback``
        (an object or its class)."""
        try:
            from transformers import TrainerCallback as HFCallback
        except ImportError:  # pragma: no cover - transformers is a dependency
            HFCallback = None
        if isinstance(callback, type):
            callback = callback()
        if HFCallback is not None and isinstance(callback, HFCallback):
            callback = _HFCallback(callback, self._hf_args)
        self.callbacks.append(callback)

    def _run(self, config: TrainConfig) -> TrainResult:
        raise NotImplementedError

    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainResult:
        """Run the method's recipe on the config.

        Args:
            resume_from_checkpoint: a checkpoint directory, or True for the latest one in
                ``output_dir`` (the config's ``resume``); None: the config's ``resume``.

        Returns:
            The run's :class:`~fastrl.train.run.TrainResult` (also ``self.result``); ``self.model``
            is then the trained model.
        """
        config = self.config
        if resume_from_checkpoint not in (None, False):
            config = dataclasses.replace(config, resume="auto" if resume_from_checkpoint is True
                                         else os.fspath(resume_from_checkpoint))
        self.result = self._run(config)
        self.model = self.result.policy.model
        return self.result

    def save_model(self, output_dir: str | os.PathLike | None = None) -> None:
        """Save the trained model (``save_pretrained``: a LoRA model saves its adapter) and the tokenizer.

        Args:
            output_dir: the directory (default: the config's ``output_dir``).
        """
        if isinstance(self.model, (str, os.PathLike)):
            raise RuntimeError(f"{type(self).__name__}.save_model: train() first (the model is loaded by the run)")
        path = os.fspath(output_dir if output_dir is not None else self.config.output_dir)
        self.model.save_pretrained(path)
        if self.processing_class is not None and not isinstance(self.processing_class, (str, os.PathLike)):
            self.processing_class.save_pretrained(path)


def _rewards(cls: type[TrainConfig], reward_funcs) -> dict[str, Any]:
    """TRL's ``reward_funcs`` as the config's ``reward_funcs`` (callables, 'module:function') and
    ``reward_model`` (a model directory or an ``nn.Module``; fastrl takes one, scored after the others)."""
    import torch

    if reward_funcs is None:
        return {}
    single = isinstance(reward_funcs, (str, os.PathLike, torch.nn.Module)) or callable(reward_funcs)
    items = [reward_funcs] if single else list(reward_funcs)
    funcs, models = [], []
    for i, item in enumerate(items):
        if isinstance(item, torch.nn.Module) or (isinstance(item, (str, os.PathLike)) and os.path.isdir(item)):
            models.append((i, os.fspath(item) if isinstance(item, os.PathLike) else item))
        else:
            funcs.append(item)
    if len(models) > 1:
        raise ConfigError(f"{cls.__name__}.reward_model: fastrl takes one reward model, got {len(models)} in "
                          f"reward_funcs")
    if models and models[0][0] != len(items) - 1:
        warnings.warn(f"{cls.__name__}.reward_funcs: the reward model is scored after the reward functions "
                      f"(reward_weights and the reward/<name> metrics follow that order)", stacklevel=4)
    return {"reward_funcs": funcs, **({"reward_model": models[0][1]} if models else {})}


class GRPOTrainer(_Trainer):
    """GRPO, TRL-shaped: ``GRPOTrainer(model, reward_funcs, args, train_dataset, ...).train()``.

    See the module docstring for what each argument takes; the run is
    :func:`fastrl.train.grpo.train_grpo` on :attr:`config` (a :class:`~fastrl.train.config.GRPOConfig`).

    Args:
        model: a local model directory or a transformers model.
        reward_funcs: a reward or a list of rewards (callables, 'module:function', a reward model).
        args: a ``trl.GRPOConfig``, a dict, a fastrl ``GRPOConfig`` or None.
        train_dataset: the prompts: a ``datasets.Dataset``, a list of dicts or a local path.
        eval_dataset: held-out prompts evaluated every ``eval_every`` steps (TRL's ``eval_steps``), or None.
        processing_class: the tokenizer (or its directory), or None.
        peft_config: a ``peft.LoraConfig`` or its fields, or None.
        callbacks: callbacks (fastrl's or ``transformers.TrainerCallback``), or None.
    """

    config_class = GRPOConfig

    def __init__(self, model, reward_funcs=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, callbacks=None):
        super().__init__(model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, peft_config=peft_config, callbacks=callbacks,
                         **_rewards(GRPOConfig, reward_funcs))

    def _run(self, config: GRPOConfig) -> TrainResult:
        return train_grpo(config, callbacks=self.callbacks)


class OnlineDPOTrainer(_Trainer):
    """Online DPO, TRL-shaped: ``OnlineDPOTrainer(model, reward_funcs, args, train_dataset, ...).train()``.

    The reference is the initial policy (or, with ``reference_update: previous_iterate``, the
    policy of a few steps before); the run is :func:`fastrl.train.online_dpo.train_online_dpo`.

    Args:
        model: a local model directory or a transformers model.
        reward_funcs: a reward or a list of rewards (callables, 'module:function', a reward model).
        args: a TRL config, a dict, a fastrl ``OnlineDPOConfig`` or None.
        train_dataset: the prompts: a ``datasets.Dataset``, a list of dicts or a local path.
        eval_dataset: held-out prompts evaluated every ``eval_every`` steps, or None.
        processing_class: the tokenizer (or its directory), or None.
        peft_config: a ``peft.LoraConfig`` or its fields, or None.
        callbacks: callbacks (fastrl's or ``transformers.TrainerCallback``), or None.
    """

    config_class = OnlineDPOConfig

    def __init__(self, model, reward_funcs=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, callbacks=None):
        super().__init__(model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, peft_config=peft_config, callbacks=callbacks,
                         **_rewards(OnlineDPOConfig, reward_funcs))

    def _run(self, config: OnlineDPOConfig) -> TrainResult:
        return train_online_dpo(config, callbacks=self.callbacks)


class DPOTrainer(_Trainer):
    """Offline DPO, TRL-shaped: ``DPOTrainer(model, ref_model, args, train_dataset, ...).train()``.

    The run is :func:`fastrl.train.dpo.train_dpo` (reference log-probs precomputed once by default,
    ``reference: live`` / TRL's ``precompute_ref_log_probs: false`` to run the reference every batch).

    Args:
        model: a local model directory or a transformers model.
        ref_model: the reference (a local directory or a transformers model); None: the initial policy
            (with LoRA: the policy with its adapters disabled).
        args: a ``trl.DPOConfig``, a dict, a fastrl ``DPOConfig`` or None.
        train_dataset: the preference pairs (prompt / chosen / rejected): a ``datasets.Dataset``, a
            list of dicts or a local path.
        eval_dataset: not supported for offline DPO: must be None.
        processing_class: the tokenizer (or its directory), or None.
        peft_config: a ``peft.LoraConfig`` or its fields, or None.
        callbacks: callbacks (fastrl's or ``transformers.TrainerCallback``), or None.

    Raises:
        ConfigError: an ``eval_dataset`` (fastrl's offline DPO has no held-out evaluation).
    """

    config_class = DPOConfig

    def __init__(self, model, ref_model=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, callbacks=None):
        if eval_dataset is not None:
            raise ConfigError("DPOConfig.eval_data: fastrl's offline DPO has no held-out evaluation; leave "
                              "eval_dataset out (the online methods have one)")
        super().__init__(model, args=args, train_dataset=train_dataset, processing_class=processing_class,
                         peft_config=peft_config, callbacks=callbacks,
                         reference_model=os.fspath(ref_model) if isinstance(ref_model, os.PathLike) else ref_model)

    def _run(self, config: DPOConfig) -> TrainResult:
        return train_dpo(config, callbacks=self.callbacks)
