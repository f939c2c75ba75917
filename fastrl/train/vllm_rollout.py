"""vLLM as the online trainers' rollout engine (rollout_engine: vllm): colocated, weights pushed, asleep while training.

With ``rollout_engine: vllm`` (GRPO, online DPO) :func:`fastrl.train.online.online_setup` calls
:func:`attach`, which builds a ``vllm.LLM`` in this process, on this process's GPU (:func:`build_engine`),
and :func:`fastrl.train.online.rollout` samples from it instead of the built-in decoders. Each rollout:

1. ``wake_up(tags=["weights"])`` (sleep mode), then the policy's weights pushed into the engine when the
   engine does not hold them (:meth:`VLLMRollout.sync`): the full state dict, each tensor in the engine's
   dtype, under the checkpoint names vLLM loads (:func:`engine_weights`; a LoRA policy's weights merged,
   ``W + scale * B @ A``, without touching the model). The weights are those after the last optimiser
   step: a push happens after every optimiser step on the policy's parameters (a global
   ``torch.optim`` step hook), whenever a parameter was replaced or written in place since the last
   push (the tensors' version counters), and after every sleep (level 2 frees the engine's weights);
2. ``wake_up(tags=["kv_cache"])``, the rollout (:func:`fastrl.rollout.generate` with ``engine="vllm"``:
   vLLM's sampler, its log-probs as the sampler log-probs, post-temperature where vLLM has
   ``logprobs_mode="processed_logprobs"``);
3. ``sleep(level=2)`` (``vllm_enable_sleep_mode``): the engine's weights and KV cache are freed while the
   trainer computes the step.

The engine is any object with ``generate`` / ``load_weights`` / ``sleep`` / ``wake_up`` and a ``dtype``
(:class:`VLLMEngine` wraps a ``vllm.LLM`` so); ``tests/train/test_vllm_rollout.py`` runs the trainer on a
stand-in engine on the CPU and checks that the weights it holds at every rollout are the policy's.

Limits: one process (a colocated engine per process with ``torch.distributed`` is not done yet), a CUDA
device, text models (not image generation). vLLM is optional: without it the run stops at its start
with a :class:`~fastrl.train.config.ConfigError` naming ``rollout_engine``.
"""

from __future__ import annotations

import os
import re
import tempfile
import weakref
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from fastrl.rollout import Rollout, generate
from fastrl.train.adapters import is_peft
from fastrl.train.config import ConfigError
from fastrl.train.model import DTYPES

__all__ = ["VLLMEngine", "VLLMRollout", "attach", "build_engine", "engine_of", "engine_weights"]

_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # policy -> its VLLMRollout
_LIVE: weakref.WeakSet = weakref.WeakSet()  # every VLLMRollout (the optimiser-step hook marks them stale)


def engine_weights(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights as an engine loads them: ``(checkpoint name, tensor)`` pairs.

    A plain model: its state dict. A PEFT (LoRA) model: the base model's names, each adapted linear's
    weight merged (``base + sum of the active adapters' delta weights``, computed, not written into the
    model), a ``modules_to_save`` module's trained copy, no adapter tensors.

    Args:
        model: a transformers model, or a ``peft.PeftModel`` of one.
        dtype: the engine's dtype (each tensor is cast to it), or None to keep the model's.

    Returns:
        An iterator of detached tensors, one per checkpoint name.
    """
    if not is_peft(model):
        for name, tensor in model.state_dict().items():
            yield name, tensor.detach() if dtype is None else tensor.detach().to(dtype)
        return
    base = model.get_base_model()
    lora = {name: module for name, module in base.named_modules()
            if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight")}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name or ".original_module." in name:
            continue
        key = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name).replace(".base_layer.", ".")
        tensor = tensor.detach()
        owner = name[: -len(".base_layer.weight")] if name.endswith(".base_layer.weight") else None
        if owner in lora and not getattr(lora[owner], "merged", False):
            module = lora[owner]
            with torch.no_grad():
                for adapter in module.active_adapters:
                    adapted = getattr(module, "lora_A", {}), getattr(module, "lora_embedding_A", {})
                    if any(adapter in table for table in adapted):
                        tensor = tensor + module.get_delta_weight(adapter).to(tensor.dtype)
        yield key, tensor if dtype is None else tensor.to(dtype)


def _weights_version(model: nn.Module) -> tuple:
    """Changes whenever a parameter of ``model`` is replaced or written in place through autograd's
    view of it (an optimiser writing through ``.data`` is caught by :func:`_after_optimizer_step`)."""
    return tuple((id(p), p._version) for p in model.parameters())


_HOOK = []  # the global optimiser-step hook, registered once


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    """After any optimiser step: the engines whose policy it updates no longer hold its weights."""
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for rollout in list(_LIVE):
        if rollout._param_ids & stepped:
            rollout._held = None


class VLLMRollout:
    """The trainer's side of a colocated engine: keeps the engine's weights the policy's, sleeps it between rollouts.

    Args:
        engine: the engine (:class:`VLLMEngine` or a stand-in with ``generate``, ``load_weights``,
            ``sleep``, ``wake_up`` and ``dtype``).
        sleep_mode: put the engine to sleep (level 2: weights and KV cache freed) after each rollout,
            and now.

    Attributes:
        pushes: the number of weight pushes so far.
    """

    def __init__(self, engine, *, sleep_mode: bool):
        self.engine = engine
        self.sleep_mode = bool(sleep_mode)
        self.pushes = 0
        self._held = None  # the version of the policy's weights the engine holds (None: none)
        self._param_ids: set[int] = set()  # the pushed model's parameters (an optimiser step on one: stale)
        _LIVE.add(self)
        if not _HOOK:
            _HOOK.append(register_optimizer_step_post_hook(_after_optimizer_step))
        if self.sleep_mode:
            self.engine.sleep(level=2)

    def sync(self, model: nn.Module) -> bool:
        """Pushes the model's weights into the engine unless it holds them already.

        Args:
            model: the policy's model (a PEFT model's weights are merged, :func:`engine_weights`).

        Returns:
            Whether weights were pushed.
        """
        version = _weights_version(model)
        if self._held == version:
            return False
        self._param_ids = {id(p) for p in model.parameters()}
        self.engine.load_weights(engine_weights(model, getattr(self.engine, "dtype", None)))
        reset = getattr(self.engine, "reset_prefix_cache", None)
        if reset is not None:
            reset()  # cached prefixes hold the old weights' keys and values
        self._held = version
        self.pushes += 1
        return True

    def generate(self, model: nn.Module, prompts: list[list[int]], **sampling) -> Rollout:
        """One rollout with the model's current weights: wake, sync, sample, sleep.

        Args:
            model: the policy's model.
            prompts: the prompts' token ids.
            **sampling: the engine's ``generate`` keywords (``num_samples``, ``max_new_tokens``,
                ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``stop_token_ids``, ``generator``).

        Returns:
            The engine's :class:`~fastrl.rollout.Rollout`.
        """
        if self.sleep_mode:
            self.engine.wake_up(tags=["weights"])
        self.sync(model)
        if self.sleep_mode:
            self.engine.wake_up(tags=["kv_cache"])
        try:
            return self.engine.generate(prompts, **sampling)
        finally:
            if self.sleep_mode:
                self.engine.sleep(level=2)
                self._held = None  # level 2 frees the weights: the next rollout pushes them again


class VLLMEngine:
    """A ``vllm.LLM`` behind the four calls :class:`VLLMRollout` makes.

    Args:
        llm: a ``vllm.LLM`` running in this process.
        dtype: the dtype of its weights (what pushed tensors are cast to).
    """

    def __init__(self, llm, dtype: torch.dtype):
        self.llm = llm
        self.dtype = dtype

    def generate(self, prompts: list[list[int]], **sampling) -> Rollout:
        """:func:`fastrl.rollout.generate` with ``engine="vllm"`` on this engine (keywords as there)."""
        return generate(self.llm, [torch.tensor(p) for p in prompts], engine="vllm", **sampling)

    def _model(self):
        executor = self.llm.llm_engine.model_executor
        worker = executor.driver_worker
        runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
        return runner.model

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Loads ``(name, tensor)`` pairs into the engine's model (vLLM's own name mapping), one at a time.

        Through the in-process worker's model, as TRL's colocated mode does; a vLLM without that path
        gets them through ``LLM.apply_model``.
        """
        try:
            model = self._model()
        except AttributeError:
            pairs = list(weights)
            self.llm.apply_model(lambda m: m.load_weights(pairs))
            return
        for name, tensor in weights:
            model.load_weights([(name, tensor)])

    def sleep(self, level: int = 2) -> None:
        self.llm.sleep(level=level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.llm.wake_up(tags=tags)

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()


def build_engine(run) -> VLLMEngine:
    """The run's colocated ``vllm.LLM``, wrapped (:class:`VLLMEngine`).

    Built from the run's model directory (``model``), or, for a model given as ``model_config`` or
    from Python, from its config alone (``load_format="dummy"``: the weights come from the first
    push). Token ids in, token ids out (no tokenizer); the run's dtype, seed and ``vllm_*`` settings.

    Args:
        run: the :class:`~fastrl.train.run.Run`.

    Returns:
        The engine.

    Raises:
        ConfigError: vLLM is not installed, the run is not on a CUDA device or has several processes,
            naming ``rollout_engine``.
    """
    config = run.config
    where = f"{type(config).__name__}.rollout_engine"
    try:
        import vllm
    except ImportError:
        raise ConfigError(f"{where}: 'vllm' needs vLLM, which is not installed (pip install vllm); or use "
                          f"rollout_engine: auto, fastrl or hf (built in)") from None
    if run.world.device.type != "cuda":
        raise ConfigError(f"{where}: 'vllm' needs a CUDA device, the run is on {run.world.device}")
    if run.world.distributed:
        raise ConfigError(f"{where}: 'vllm' runs in one process (one colocated engine); the run has "
                          f"{run.world.world_size}; use rollout_engine: auto there")
    # the engine in this process, so that its model's load_weights is reachable
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    source, load_format, scratch = config.model, "auto", None
    if not isinstance(source, (str, os.PathLike)):
        # outside output_dir (a run directory holds the run's files only); removed with the engine
        scratch = tempfile.TemporaryDirectory(prefix="fastrl_vllm_model_")
        source = scratch.name
        run.model.config.save_pretrained(source)
        load_format = "dummy"
    kwargs = dict(model=str(source), dtype=config.dtype, gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                  enable_sleep_mode=config.vllm_enable_sleep_mode, max_model_len=config.vllm_max_model_length,
                  seed=config.seed, skip_tokenizer_init=True, load_format=load_format)
    try:  # the sampler's log-probs after temperature (the trainer's), where this vLLM has the option
        llm = vllm.LLM(**kwargs, logprobs_mode="processed_logprobs")
    except TypeError:
        llm = vllm.LLM(**kwargs)
    engine = VLLMEngine(llm, DTYPES[config.dtype])
    engine.scratch = scratch
    return engine


def attach(run, engine=None) -> VLLMRollout:
    """Makes the run's rollouts use a colocated engine (``rollout_engine: vllm``).

    Args:
        run: the :class:`~fastrl.train.run.Run` (its policy's rollouts then go through the engine).
        engine: the engine to use; None builds one (:func:`build_engine`).

    Returns:
        The :class:`VLLMRollout`, also found by :func:`engine_of` from the run's policy.

    Raises:
        ConfigError: an image-generation run, naming ``rollout_engine``; and as :func:`build_engine`.
    """
    if run.image is not None:
        raise ConfigError(f"{type(run.config).__name__}.rollout_engine: 'vllm' does not generate images; use "
                          f"rollout_engine: auto, fastrl or hf")
    rollout = VLLMRollout(build_engine(run) if engine is None else engine,
                          sleep_mode=run.config.vllm_enable_sleep_mode)
    _ENGINES[run.policy] = rollout
    return rollout


def engine_of(policy) -> VLLMRollout:
    """The :class:`VLLMRollout` :func:`attach` gave ``policy``.

    Args:
        policy: the run's :class:`~fastrl.train.model.Policy`.

    Returns:
        Its :class:`VLLMRollout`.

    Raises:
        RuntimeError: none was attached (the run did not go through ``online_setup``).
    """
    try:
        return _ENGINES[policy]
    except KeyError:
        raise RuntimeError("rollout_engine: vllm, but no engine is attached to this policy "
                           "(fastrl.train.vllm_rollout.attach(run) is called by online_setup)") from None
