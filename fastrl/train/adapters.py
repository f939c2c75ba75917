"""LoRA adapters (PEFT) on the policy: only the adapters train, the base stays frozen.

A config's ``peft_config`` (the fields of a ``peft.LoraConfig``: ``r``, ``lora_alpha``,
``lora_dropout``, ``target_modules``, ``modules_to_save``, ...) makes
:func:`fastrl.train.model.build_model` wrap the model with ``peft.get_peft_model``; everything
else sees the same model:

- **the head** — :class:`~fastrl.train.model.Policy` runs the decoder stack (its LoRA linears
  inside) and hands the lm-head's weight to the fused-linear loss; the lm-head is not adapted
  unless ``target_modules`` / ``modules_to_save`` name it, and then :func:`linear_parts` gives the
  weight the adapted head computes with (``W + scale * B @ A``, differentiable);
- **the rollout** — :func:`fastrl.rollout.generate` runs the PEFT model's underlying transformers
  model, whose linears are the LoRA layers, with either engine;
- **the reference** (``beta > 0``, DPO, online DPO with a fixed reference) — the same model with
  its adapters disabled (:class:`AdapterReference`: ``with model.disable_adapter()``), no second
  copy of the weights;
- **checkpoints** — the adapter alone, as ``peft`` writes it (``adapter/adapter_config.json`` and
  ``adapter/adapter_model.safetensors``: :func:`save_adapter`; ``peft.PeftModel.from_pretrained``
  loads it onto the base model); a resume rebuilds the base and loads the adapter
  (:func:`load_adapter`), bit for bit.

One process only (FSDP2 sharding of a PEFT model is refused), text runs only.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ADAPTER_DIR", "AdapterReference", "apply_adapters", "check_peft_config", "config_dict", "is_peft",
           "linear_parts", "load_adapter", "lora_config", "lora_fields", "save_adapter"]

ADAPTER_DIR = "adapter"  # a checkpoint's adapter subdirectory
# LoraConfig fields that are peft's own bookkeeping, not settings of an adapter
_INTERNAL = ("peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "runtime_config",
             "megatron_config", "megatron_core")
# initialisations that rewrite the base weights (the adapters-disabled model is then not the initial model)
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
_TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")


def _peft():
    """The peft package, or a :class:`ImportError` that says how to install it."""
    try:
        import peft
    except ImportError:
        raise ImportError("peft_config needs the peft package: pip install peft (or pip install 'fastrl[peft]')") \
            from None
    return peft


def lora_fields() -> list[str]:
    """The ``peft.LoraConfig`` fields a ``peft_config`` may set.

    Returns:
        The names, in ``LoraConfig``'s order.

    Raises:
        ImportError: peft is not installed.
    """
    return [f.name for f in dataclasses.fields(_peft().LoraConfig) if f.init and f.name not in _INTERNAL]


def _plain(value: Any) -> Any:
    """A LoraConfig value as YAML / JSON holds it (sets and tuples as lists, nested configs as dicts)."""
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "value") and type(value).__module__.startswith("peft"):  # an enum (TaskType)
        return value.value
    return value


def config_dict(config) -> dict[str, Any]:
    """A ``peft.LoraConfig`` as the ``peft_config`` mapping: the fields it sets away from their defaults.

    The trainer classes turn a ``peft_config=LoraConfig(...)`` into this form; it is also what a
    YAML file writes.

    Args:
        config: a ``peft.LoraConfig``.

    Returns:
        ``{field: value}``, JSON-serialisable.

    Raises:
        TypeError: ``config`` is not a ``peft.LoraConfig``.
    """
    peft = _peft()
    if not isinstance(config, peft.LoraConfig):
        raise TypeError(f"peft_config: only LoRA adapters are supported (a peft.LoraConfig), got "
                        f"{type(config).__name__}")
    defaults = peft.LoraConfig()
    out = {}
    for name in lora_fields():
        value = _plain(getattr(config, name))
        if name == "task_type" and value is not None:
            out[name] = value
        elif value != _plain(getattr(defaults, name)):
            out[name] = value
    return out


def check_peft_config(value) -> dict[str, Any] | None:
    """The ``peft_config`` field, checked: a mapping of ``peft.LoraConfig`` fields (or None).

    Args:
        value: None, a mapping of LoraConfig fields, its JSON string (the command line), or a
            ``peft.LoraConfig``.

    Returns:
        The mapping (None when ``value`` is None); ``target_modules`` / ``modules_to_save`` as given.

    Raises:
        ValueError: peft is missing, the value is not a mapping, a key is not a LoraConfig field,
            or LoraConfig refuses a value; the message starts with ``peft_config:`` or
            ``peft_config.<key>:`` (the config prefixes its class name).
    """
    if value is None:
        return None
    try:
        peft = _peft()
    except ImportError as e:
        raise ValueError(f"peft_config: {e}") from None
    if isinstance(value, peft.PeftConfig):
        try:
            value = config_dict(value)
        except TypeError as e:
            raise ValueError(str(e)) from None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"peft_config: is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"peft_config: must be a mapping of peft.LoraConfig fields (r, lora_alpha, target_modules, "
                         f"...), got {type(value).__name__}")
    names = lora_fields()
    for key in value:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            internal = " (peft's own bookkeeping, set by fastrl)" if key in _INTERNAL else ""
            raise ValueError(f"peft_config.{key}: not a field of peft.LoraConfig{internal}{hint}; fastrl trains LoRA "
                             f"adapters, set with r, lora_alpha, lora_dropout, target_modules, modules_to_save, ...")
    task = value.get("task_type")
    if task is not None and str(getattr(task, "value", task)) not in _TASK_TYPES:
        raise ValueError(f"peft_config.task_type: must be one of {', '.join(_TASK_TYPES)} or null, got {task!r}")
    if value.get("inference_mode"):
        raise ValueError("peft_config.inference_mode: true freezes the adapters too; nothing would train")
    init = value.get("init_lora_weights", True)
    if isinstance(init, str) and init.split("_", 1)[0] in _BASE_CHANGING_INITS:
        raise ValueError(f"peft_config.init_lora_weights: {init!r} rewrites the base weights, which the "
                         "adapters-disabled reference and an adapter-only checkpoint take as the initial model; "
                         "use true, false or 'gaussian'")
    try:
        lora_config(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"peft_config: peft.LoraConfig refuses it: {e}") from None
    return dict(value)


def lora_config(fields: dict[str, Any], *, task_type: str = "CAUSAL_LM", base: str | None = None):
    """The ``peft.LoraConfig`` of a ``peft_config`` mapping.

    Args:
        fields: the mapping (:func:`check_peft_config`).
        task_type: the task type when the mapping sets none (``SEQ_CLS`` for a reward model: its
            score head is then trained too, as peft does for that task).
        base: the base model's directory, written into the adapter's config.

    Returns:
        The ``peft.LoraConfig``.
    """
    peft = _peft()
    fields = dict(fields)
    if fields.get("task_type") is None:
        fields["task_type"] = task_type
    if base is not None:
        fields["base_model_name_or_path"] = str(base)
    return peft.LoraConfig(**fields)


def is_peft(model) -> bool:
    """Whether ``model`` is a PEFT model (``peft.PeftModel``), without importing peft when it is not loaded.

    Args:
        model: any object.

    Returns:
        True for a PEFT model.
    """
    import sys

    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def apply_adapters(model: nn.Module, fields: dict[str, Any], *, seed: int, base: str | None = None) -> nn.Module:
    """``model`` with LoRA adapters: a ``peft.PeftModel``, the base frozen, the adapters trainable.

    The adapters' random initialisation runs under ``torch.manual_seed(seed)`` with the global RNG
    state restored after (a run's other random draws do not move).

    Args:
        model: the transformers model (a causal LM, or a sequence classifier).
        fields: the ``peft_config`` mapping (:func:`check_peft_config`).
        seed: the initialisation's seed.
        base: the base model's directory (for the adapter's config), or None.

    Returns:
        The PEFT model, on ``model``'s device, in ``model``'s training mode.

    Raises:
        ValueError: several processes (FSDP2 does not shard a PEFT model here), or an adapted
            lm-head the fused head cannot compute (DoRA, a LoRA bias).
    """
    peft = _peft()
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        raise ValueError("peft_config: LoRA training runs in one process (FSDP2 sharding of a PEFT model is not "
                         "supported); launch one process, or train without peft_config")
    classifier = model.get_output_embeddings() is None and hasattr(model, "score")
    config = lora_config(fields, task_type="SEQ_CLS" if classifier else "CAUSAL_LM", base=base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with warnings.catch_warnings():  # peft's notes on a random-init model's missing name_or_path, and its
            warnings.simplefilter("ignore", UserWarning)  # read of transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            wrapped = peft.get_peft_model(model, config)
    wrapped.train(model.training)
    head = wrapped.get_output_embeddings()
    if head is not None:
        _check_head(head)
    return wrapped


def _check_head(head: nn.Module) -> None:
    """An adapted lm-head must be one :func:`linear_parts` computes exactly."""
    layer = _lora_layer(head)
    if layer is None:
        return
    for name in layer.active_adapters:
        if layer.use_dora.get(name, False) or getattr(layer, "lora_bias", {}).get(name, False):
            raise ValueError("peft_config: DoRA / lora_bias on the lm-head is not supported (the fused-linear head "
                             "takes one weight matrix); leave lm_head out of target_modules, or put it in "
                             "modules_to_save")
        if getattr(layer.lora_dropout[name], "p", 0.0):
            warnings.warn("peft_config: the adapted lm-head's lora_dropout is not applied (the fused-linear head "
                          "computes with W + scale * B @ A)", stacklevel=3)


def _lora_layer(module):
    """The peft LoRA layer ``module`` is, else None."""
    import sys

    peft = sys.modules.get("peft")
    if peft is None:
        return None
    from peft.tuners.lora import LoraLayer

    return module if isinstance(module, LoraLayer) else None


def linear_parts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [V, H], bias [V] or None)`` that a linear head computes with, adapters included.

    A plain ``nn.Linear``: its own. A peft ``modules_to_save`` wrapper: the active copy's (the
    original while adapters are disabled). A LoRA-adapted linear: ``W + Σ scale * B @ A`` over its
    active adapters (differentiable in A and B), ``W`` alone while disabled or merged.

    Args:
        module: the lm-head (or a classifier's score head).

    Returns:
        The weight and bias.
    """
    layer = _lora_layer(module)
    if layer is None:
        return module.weight, getattr(module, "bias", None)
    base = layer.get_base_layer()
    weight = base.weight
    if not (layer.disable_adapters or layer.merged):
        for name in layer.active_adapters:
            if name in layer.lora_A:
                weight = weight + layer.get_delta_weight(name).to(weight.dtype)
    return weight, getattr(base, "bias", None)


class AdapterReference(nn.Module):
    """The reference model of a LoRA run: the policy itself with its adapters disabled.

    It computes what the base model computes (the initial policy, as the adapters start at zero)
    without a second copy of the weights. It stands where a frozen copy of the policy would: called
    as ``reference(batch, head)`` (no gradient: the callers run it under ``torch.no_grad``), in its
    own training mode (eval by default; the policy's mode is restored after each call).

    Args:
        policy: the :class:`~fastrl.train.model.Policy` around a PEFT model.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        if not is_peft(policy.model):
            raise TypeError("AdapterReference: the policy's model is not a PEFT model")
        self.policy = policy  # a submodule: fastrl.train.distributed.reshard reaches its units
        self.training = False

    def train(self, mode: bool = True) -> AdapterReference:
        """Set the mode this reference runs the policy in (the policy's own mode is left as it is)."""
        self.training = bool(mode)
        return self

    def requires_grad_(self, requires_grad: bool = True) -> AdapterReference:
        """A no-op: the parameters are the policy's (its adapters train); the reference runs without gradient."""
        return self

    @property
    def image(self):
        return self.policy.image

    @property
    def compute_dtype(self):
        return self.policy.compute_dtype

    def forward(self, batch, head):
        """``policy(batch, head)`` with the adapters disabled and the policy in this reference's mode."""
        policy = self.policy
        was_training = policy.training
        policy.train(self.training)
        try:
            with policy.model.disable_adapter():
                return policy(batch, head)
        finally:
            policy.train(was_training)


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the adapter of a PEFT model as peft does: ``adapter_config.json`` and ``adapter_model.safetensors``.

    ``peft.PeftModel.from_pretrained(base_model, directory)`` loads it onto the base model.

    Args:
        model: the PEFT model.
        directory: the directory to write (created).

    Returns:
        The directory.
    """
    directory = Path(directory)
    with warnings.catch_warnings():  # peft warns when it cannot look up a random-init base's config online
        warnings.simplefilter("ignore", UserWarning)
        model.save_pretrained(str(directory), safe_serialization=True, save_embedding_layers=False)
    readme = directory / "README.md"  # peft's model-card stub
    if readme.is_file():
        readme.unlink()
    for f in directory.iterdir():  # on disk before the checkpoint is renamed into place
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return directory


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load the adapter :func:`save_adapter` wrote into the PEFT model ``model`` (in place, exactly).

    Args:
        model: the PEFT model, built with the same ``peft_config``.
        directory: the adapter directory.

    Raises:
        FileNotFoundError: the directory holds no ``adapter_model.safetensors``.
        ValueError: the file's tensors do not match the model's adapter (another ``peft_config``).
    """
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(directory) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"resume: {path} is missing (the checkpoint's LoRA adapter)")
    tensors = load_file(str(path))
    result = set_peft_model_state_dict(model, tensors)
    missing = [k for k in result.missing_keys if ".lora_" in k or "modules_to_save" in k]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(f"resume: the adapter in {path.parent} does not fit this run's peft_config (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]})")
