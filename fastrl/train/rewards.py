"""Rewards of the online methods: Python callables (verifiers) and learned reward models.

>>> from fastrl.train.rewards import load_rewards, score
>>> def has_seven(prompt_ids, completion_ids, **columns):             # fastrl's form: token ids
...     return float(7 in completion_ids)
>>> async def length(prompt_ids, completion_ids, **columns):
...     return None if not completion_ids else len(completion_ids) / 4
>>> def says_good(prompts, completions, completion_ids, **kwargs):  # TRL's form: text
...     return [c.count("good") for c in completions]
>>> rewards = load_rewards([has_seven, length, says_good])
>>> score(rewards, [[1], [1]], [[3, 7], []], [{}, {}], prompts=["q", "q"], completions=["good good", ""]).tolist()
[[1.0, 0.5, 2.0], [0.0, nan, 0.0]]

A **reward function** is given as ``"module:function"`` in a config (a dotted module importable from
the working directory, or a file path such as ``examples/rewards.py:count_token``) or as the object
itself from Python. Its signature says which of two forms it takes:

- **TRL's form** (a signature naming ``prompts`` or ``completions``, e.g. ``f(prompts, completions,
  completion_ids, **kwargs)`` or TRL's own ``f(completions, solution, **kwargs)``): called as TRL 1.16's
  ``GRPOTrainer`` calls it, once per step with keywords: ``prompts`` as the data holds them (the
  prompt column's text, or its list of chat messages; a token-id prompt decoded), ``completions``
  as text (for a chat prompt ``[{"role": "assistant", "content": text}]``, as TRL without a
  response parser), ``completion_ids`` (token-id lists), every other data column as a list (not
  ``prompt`` / ``completion``; fastrl's ``finish_reason`` list only where the signature names it),
  and ``trainer_state`` (a :class:`RewardState`: ``global_step``, ``max_steps``),
  ``log_metric(name, value)`` (the values' mean goes to the step's metrics under ``name``) and
  ``log_extra(column, values)`` (kept in :attr:`RewardFunction.logged`, not written to
  ``completions.jsonl``). TRL's ``environments`` is not passed. Returns one float (or None) per
  completion. It needs text: on a run without a tokenizer it is refused at load.
  :file:`examples/trl_rewards.py` holds TRL-style rewards that train unchanged.
- **fastrl's form** (first two parameters ``prompt_ids, completion_ids``), on token ids: per sample
  ``f(prompt_ids, completion_ids, **columns) -> float``, called once per completion; or batched,
  ``-> list[float]`` with every argument a list with one entry per completion, when ``f.batched``
  is true or its first parameter is annotated as a list / sequence. ``columns`` are the data row's
  columns (a reference answer, a target, ...), plus ``completion`` (the decoded text, when the run
  has a tokenizer) and ``finish_reason`` (``"stop"`` / ``"length"``).

Any other signature (``f(p, c)``, ``f(*args)``) is refused at load with both forms shown. A
function without ``**kwargs`` receives only the keywords its signature names. ``async def``
functions are awaited, every call of every async function concurrently, in one event loop (a
fresh one in a worker thread when the caller already runs a loop, e.g. a notebook). ``None`` or
NaN means *unscorable*: the sample is left out of the reward statistics and gets advantage 0
(GRPO) or is never paired (online DPO). An inf, a non-number or a wrong number of values raises
:class:`RewardError` naming the reward.

**Missing columns.** A data row without a column a reward asks for (one its signature names, or,
for a ``**kwargs`` reward, one other rows have: a JSON line without the key) is a
:class:`RewardError` naming the reward, the column and the row's line, raised before the first
step (:func:`check_columns`) and by :func:`score`; a per-sample reward's parameter with a default
takes its default instead. With ``allow_missing_columns: true`` the reward gets None for it. A
column that no row has, named by a parameter without a default, is an error too.

**A reward that raises** is reported as a :class:`RewardError` naming the reward, the completion
(its index and text) and its data row (``train_data (path) line 7``); the trainer adds the step. A
batched reward that raises is called again one completion at a time to find the one that raises
(where none raises alone, the message names the batch's rows).

**Images.** On a run that generates images (``image_generation`` in the config), a reward whose
signature names an ``images`` parameter gets the completions' pixels: each completion's image codes
(its last ``image_tokens`` tokens) are decoded once per step, in batches
(:meth:`fastrl.rollout.image.ImageModel.decode`), and the same pixels go to every reward that asks.
A batched reward gets ``images`` as a uint8 ``[N, H, W, 3]`` tensor, a per-sample one gets its
completion's ``[H, W, 3]``; a parameter named ``pil_images`` gets ``PIL.Image`` objects instead (a
list, or one; Pillow must be installed). A reward naming ``group_size`` gets G, the completions per
prompt (rows ``[g G, (g + 1) G)`` share a prompt). Asking for images on a text-only run is a
:class:`RewardError` naming the reward. :mod:`fastrl.train.image_rewards` has image-text and pairwise
preference models built on this; a pairwise one also leaves its preference matrix for the
``pref_grpo`` estimator (:func:`pairwise_preferences`).

A **reward model** is a local ``AutoModelForSequenceClassification`` directory (``reward_model``)
or, from Python, any ``nn.Module`` whose ``forward(input_ids, attention_mask)`` returns a score per
row (a tensor ``[N]`` / ``[N, 1]``, or an output with ``.logits [N, 1]``); it reads prompt +
completion token ids (the policy's vocabulary unless it has its own tokenizer, then the text is
re-tokenised), right-padded, ``reward_batch_size`` sequences per forward, without gradients. A
``reward_model`` given as a mapping ``{kind: clip | clip_preference, path: DIR, ...}`` is an image
reward model instead (:func:`fastrl.train.image_rewards.image_reward_model`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import importlib.util
import inspect
import math
import os
import sys
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastrl.train.image_rewards import score_tensor
from fastrl.train.telemetry import IMAGE_STATS

__all__ = ["IMAGE_ARGS", "MISSING", "RewardError", "RewardFunction", "RewardModel", "RewardState", "check_columns",
           "decode_images", "load_rewards", "pairwise_preferences", "reward_function", "score"]

IMAGE_ARGS = ("images", "pil_images")  # the parameter names that ask for the completions' images


class RewardError(ValueError):
    """A reward that cannot be loaded or returned something unusable; the message names it."""


TRL_ARGS = ("prompts", "completions", "completion_ids")  # a TRL-form reward's data arguments (keywords)
TRL_EXTRAS = ("trainer_state", "log_extra", "log_metric")  # what else TRL 1.16 passes every reward
FORMS = ("TRL's form f(prompts, completions, completion_ids, **kwargs) -> list[float] (text, or chat messages for "
         "chat prompts; the data columns as keyword lists), or fastrl's form f(prompt_ids, completion_ids, **columns) "
         "-> float (token ids; per sample, or batched with lists)")


class _Missing:
    """A column a data row lacks (its JSON line has no such key); see :data:`MISSING`."""

    def __repr__(self) -> str:
        return "<missing>"

    def __reduce__(self):
        return "MISSING"


MISSING = _Missing()  # a reward column a data row lacks (fastrl.train.online.reward_columns fills it in)


@dataclass
class RewardState:
    """What a TRL-form reward gets as ``trainer_state`` (the fields of TRL's ``TrainerState`` fastrl knows).

    Args:
        global_step: optimiser steps done before this one (TRL's meaning).
        max_steps: the run's total steps, or 0 when not known.
        epoch: passes over the data so far (fractional), or None.
    """

    global_step: int = 0
    max_steps: int = 0
    epoch: float | None = None


@dataclass
class RewardFunction:
    """One reward: ``fn`` and how to call it (built by :func:`reward_function`).

    Args:
        fn: the callable (a function, or a :class:`RewardModel`).
        name: labels its metrics (``reward/<name>``).
        where: names it in errors (e.g. ``reward_funcs[1] (examples/rewards.py:count_token)``).
        batched: called once with lists (one entry per completion) rather than once per completion.
        is_async: ``fn`` is a coroutine function: its calls are awaited, concurrently.
        keywords: the column keywords ``fn`` accepts; None: it takes ``**kwargs`` (every column).
        is_model: ``fn`` is a learned reward model.
        options: extra settings of this reward.
        image_args: the image parameters its signature names (``images`` and / or ``pil_images``).
        wants_group_size: its signature names ``group_size`` (it gets G).
        preferences: after a :func:`score` call, a pairwise reward's ``[N, G]`` fp32 preference
            matrix (its ``last_preferences``), else None.
        form: ``"trl"`` (``f(prompts, completions, completion_ids, **kwargs)``, text, keywords) or
            ``"fastrl"`` (``f(prompt_ids, completion_ids, **columns)``, token ids, positional).
        named: the keywords its signature names (past the data arguments).
        defaults: those of them that have a default value.
        trl_args: a TRL-form reward's data arguments it accepts (of ``prompts``, ``completions``,
            ``completion_ids``).
        logged: after a :func:`score` call, what a TRL-form reward logged: ``{"metrics": {name:
            [values]}, "extra": {column: [values]}}`` (its ``log_metric`` / ``log_extra`` calls).
    """

    fn: Callable
    name: str
    where: str
    batched: bool = False
    is_async: bool = False
    keywords: frozenset[str] | None = None  # None: the function takes **kwargs
    is_model: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    image_args: frozenset[str] = frozenset()
    wants_group_size: bool = False
    preferences: torch.Tensor | None = None
    form: str = "fastrl"
    named: frozenset[str] = frozenset()
    defaults: frozenset[str] = frozenset()
    trl_args: frozenset[str] = frozenset(TRL_ARGS)
    logged: dict[str, dict[str, list]] = field(default_factory=dict)

    def select(self, columns: dict[str, Any]) -> dict[str, Any]:
        if self.keywords is None:
            return columns
        return {k: v for k, v in columns.items() if k in self.keywords}


# ---------------------------------------------------------------------------------------------- loading

def _import(spec: str, where: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise RewardError(f"{where}: file {module_name!r} does not exist (paths are relative to the working "
                              f"directory {os.getcwd()})")
        name = f"_fastrl_reward_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(name)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            try:
                module_spec.loader.exec_module(module)
            except Exception as e:
                raise RewardError(f"{where}: importing {module_name!r} failed: {type(e).__name__}: {e}") from e
            sys.modules[name] = module
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name.split(".")[0] and e.name != module_name:
                raise RewardError(f"{where}: importing {module_name!r} failed: {e}") from e
            if os.getcwd() in sys.path:  # already searched
                raise RewardError(f"{where}: no module named {module_name!r}") from None
            sys.path.insert(0, os.getcwd())  # `fastrl train` runs from a script whose path[0] is not the cwd
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError:
                raise RewardError(f"{where}: no module named {module_name!r} (searched sys.path and the working "
                                  f"directory)") from None
            finally:
                sys.path.remove(os.getcwd())
        except Exception as e:
            raise RewardError(f"{where}: importing {module_name!r} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise RewardError(f"{where}: module {module_name!r} has no attribute {attr!r}")
    return fn


def _is_list_annotation(annotation: Any) -> bool:
    if isinstance(annotation, str):
        return annotation.replace(" ", "").lower().startswith(("list", "sequence", "typing.list", "typing.sequence"))
    origin = typing.get_origin(annotation) or annotation
    return origin in (list, Sequence, typing.List) or (isinstance(origin, type) and issubclass(origin, (list,)))


def reward_function(spec: str | Callable, where: str = "reward_funcs") -> RewardFunction:
    """The :class:`RewardFunction` of ``spec``: the callable and how to call it.

    Its form (TRL's or fastrl's), whether it is batched, async and which keywords it takes are
    read from its signature (see the module docstring).

    Args:
        spec: a ``"module:function"`` string (a dotted module importable from the working
            directory, or a file path such as ``examples/rewards.py:count_token``) or a callable.
        where: the config field it came from, for the error messages.

    Returns:
        The :class:`RewardFunction`, named after the callable.

    Raises:
        RewardError: a module or file that cannot be imported, a missing attribute, something not
            callable, or a signature of neither form (the message shows both).
    """
    label = f"{where} ({spec if isinstance(spec, str) else getattr(spec, '__name__', type(spec).__name__)})"
    fn = _import(spec, label) if isinstance(spec, str) else spec
    if not callable(fn):
        raise RewardError(f"{label}: {spec!r} is not callable")
    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else getattr(fn, "__call__", fn)
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        signature = None
    keywords = None
    batched = bool(getattr(fn, "batched", False))
    named: set[str] = set()
    defaults: set[str] = set()
    form, trl_args = "fastrl", frozenset(TRL_ARGS)
    if signature is not None:
        params = list(signature.parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        by_keyword = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        var_keyword = any(p.kind == p.VAR_KEYWORD for p in params)
        if [p.name for p in positional[:2]] == ["prompt_ids", "completion_ids"]:
            rest = params[2:]
        elif by_keyword & {"prompts", "completions"} and not (positional and positional[0].name == "prompt_ids"):
            form = "trl"
            required = [p.name for p in positional if p.default is p.empty and p.name not in by_keyword]
            if required:  # TRL passes every argument by keyword
                raise RewardError(f"{label}: its positional-only parameter {required[0]!r} cannot be passed by "
                                  f"keyword, as TRL's form is called; a reward takes {FORMS}; its signature is "
                                  f"{signature}")
            trl_args = frozenset(TRL_ARGS) if var_keyword else frozenset(by_keyword & set(TRL_ARGS))
            rest = [p for p in params if p.name not in TRL_ARGS]
            batched = True
        else:
            raise RewardError(f"{label}: a reward takes {FORMS}; its signature is {signature}")
        named = {p.name for p in rest if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        defaults = {p.name for p in rest if p.name in named and p.default is not p.empty}
        if not var_keyword:
            keywords = frozenset(named)
        if form == "fastrl" and not hasattr(fn, "batched"):
            batched = _is_list_annotation(positional[0].annotation)
    name = getattr(fn, "__name__", None) or type(fn).__name__
    is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))
    return RewardFunction(fn=fn, name=name, where=label, batched=batched, is_async=is_async, keywords=keywords,
                          image_args=frozenset(named & set(IMAGE_ARGS)), wants_group_size="group_size" in named,
                          form=form, named=frozenset(named), defaults=frozenset(defaults), trl_args=trl_args)


def load_rewards(reward_funcs: Sequence[str | Callable] = (), reward_model=None, *, field_name: str = "reward_funcs",
                 tokenizer=None, batch_size: int = 32, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, text_available: bool = True) -> list[RewardFunction]:
    """Every reward of a run, in config order: the functions, then the reward model.

    Names that repeat get their index appended (metrics need distinct names).

    Args:
        reward_funcs: each a ``"module:function"`` string or a callable (:func:`reward_function`).
        reward_model: a local model directory or an ``nn.Module`` (:class:`RewardModel`), an image
            reward model (a ``{kind: ..., path: ...}`` mapping, see
            :func:`fastrl.train.image_rewards.image_reward_model`, or one of that module's objects),
            or None.
        field_name: prefixes the error messages (``GRPOConfig.reward_funcs``).
        tokenizer: the policy's tokenizer, for a reward model with its own vocabulary.
        batch_size: sequences per reward-model forward.
        device: where the reward model runs.
        dtype: the reward model's dtype when loaded from a directory.
        text_available: False where the run has no tokenizer: a TRL-form reward (which reads text)
            is then refused.

    Returns:
        The :class:`RewardFunction` list.

    Raises:
        RewardError: a reward that cannot be loaded, naming it; a TRL-form reward on a run without
            text (``text_available`` False).
    """
    rewards = []
    for i, spec in enumerate(reward_funcs):
        reward = reward_function(spec, f"{field_name}[{i}]")
        if reward.form == "trl" and not text_available:
            raise RewardError(f"{reward.where}: takes TRL's form f(prompts, completions, ...), which reads text, but "
                              f"the run has no tokenizer to decode the completions (set `tokenizer`, or write it in "
                              f"fastrl's form f(prompt_ids, completion_ids, **columns), on token ids)")
        rewards.append(reward)
    where = field_name.rsplit(".", 1)[0] + ".reward_model" if "." in field_name else "reward_model"
    if isinstance(reward_model, dict) or getattr(reward_model, "image_reward", False):
        from fastrl.train.image_rewards import image_reward_model

        try:
            model = image_reward_model(reward_model, tokenizer=tokenizer, batch_size=batch_size, device=device,
                                       dtype=dtype, where=where)
        except (TypeError, ValueError) as e:
            raise RewardError(str(e) if str(e).startswith(where) else f"{where}: {e}") from e
        reward = reward_function(model, where)
        reward.name, reward.is_model = getattr(model, "__name__", "reward_model"), True
        rewards.append(reward)
    elif reward_model is not None:
        model = RewardModel(reward_model, batch_size=batch_size, device=device, dtype=dtype, tokenizer=tokenizer,
                            where=where)
        rewards.append(RewardFunction(fn=model, name="reward_model", where=where, batched=True, is_model=True))
    names = [r.name for r in rewards]
    for i, r in enumerate(rewards):  # metrics need distinct names
        if names.count(r.name) > 1:
            r.name = f"{r.name}_{i}"
    return rewards


# ---------------------------------------------------------------------------------------------- models

class RewardModel:
    """A learned reward model scored in batches.

    ``RewardModel(model_or_dir)(prompt_ids, completion_ids) -> list[float]`` (lists of token-id
    lists; no gradient). Sequences are right-padded with the model's pad id; a transformers model
    without one scores a row at a time.

    Args:
        model: a local ``AutoModelForSequenceClassification`` directory (with a config.json), or an
            ``nn.Module`` whose ``forward(input_ids, attention_mask)`` returns a score per row (a
            tensor ``[N]`` / ``[N, 1]``, or an output with ``.logits [N, 1]``).
        batch_size: sequences per forward.
        device: where a model loaded from a directory is put (a module stays where it is; the
            inputs of one without parameters go there).
        dtype: the dtype a model loaded from a directory is read in.
        tokenizer: the policy's tokenizer.
        to_ids: ``to_ids(prompt_ids, completion_ids) -> ids`` (optional) builds the sequence the
            model reads (default: prompt + completion, re-tokenised through the text when the model
            directory has its own tokenizer whose vocabulary differs from the policy's
            ``tokenizer``).
        where: names it in errors.

    Raises:
        RewardError: a directory without a config.json, a model that cannot be loaded, something
            that is not an ``nn.Module``; when called, a model output that is not one score per
            sequence.
    """

    batched = True

    def __init__(self, model, *, batch_size: int = 32, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, tokenizer=None, to_ids: Callable | None = None,
                 where: str = "reward_model"):
        self.where, self.batch_size, self.to_ids = where, batch_size, to_ids
        self.device = torch.device(device)
        self.own_tokenizer = None
        self.policy_tokenizer = tokenizer
        if isinstance(model, (str, os.PathLike)):
            from transformers import AutoModelForSequenceClassification

            path = Path(model)
            if not (path / "config.json").is_file():
                raise RewardError(f"{where}: {str(path)!r} is not a local model directory with a config.json")
            try:
                model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, dtype=dtype)
            except Exception as e:
                raise RewardError(f"{where}: cannot load {str(path)!r} as AutoModelForSequenceClassification: "
                                  f"{e}") from e
            if tokenizer is not None and any(path.glob("tokenizer*")):
                from transformers import AutoTokenizer

                own = AutoTokenizer.from_pretrained(path, local_files_only=True)
                if own.get_vocab() != tokenizer.get_vocab():
                    self.own_tokenizer = own
            model = model.to(device)
        if not isinstance(model, torch.nn.Module):
            raise RewardError(f"{where}: must be a model directory or a torch.nn.Module, got {type(model).__name__}")
        self.model = model.eval().requires_grad_(False)
        config = getattr(model, "config", None)
        text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
        self.pad_id = getattr(text, "pad_token_id", None) if text is not None else None
        self.hf = config is not None and hasattr(model, "base_model_prefix")
        self.__name__ = "reward_model"

    def _sequence(self, prompt: list[int], completion: list[int]) -> list[int]:
        if self.to_ids is not None:
            return list(self.to_ids(prompt, completion))
        if self.own_tokenizer is not None:
            text = self.policy_tokenizer.decode(prompt + completion, skip_special_tokens=False)
            return self.own_tokenizer(text, add_special_tokens=False)["input_ids"]
        return list(prompt) + list(completion)

    @torch.no_grad()
    def __call__(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], **columns) -> list[float]:
        seqs = [self._sequence(p, c) for p, c in zip(prompt_ids, completion_ids)]
        first = next(self.model.parameters(), None)
        device = first.device if first is not None else self.device
        # HF sequence classifiers pool the last token that is not the pad id; without a pad id they
        # can only score one row at a time
        size = self.batch_size if (self.pad_id is not None or not self.hf) else 1
        out: list[float] = []
        for start in range(0, len(seqs), size):
            chunk = seqs[start:start + size]
            width = max(len(s) for s in chunk)
            pad = self.pad_id if self.pad_id is not None else 0
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
                mask[i, :len(s)] = 1
            result = self.model(input_ids=ids.to(device), attention_mask=mask.to(device))
            scores = score_tensor(result)
            if scores is None:
                raise RewardError(f"{self.where}: the model returned {type(result).__name__}, not a score tensor")
            if scores.dim() != 1 or scores.shape[0] != len(chunk):
                raise RewardError(f"{self.where}: expected one score per sequence ({len(chunk)}), got a tensor of "
                                  f"shape {tuple(scores.shape)} (a classifier needs num_labels=1)")
            out.extend(scores.float().cpu().tolist())
        return out


# ---------------------------------------------------------------------------------------------- scoring

def _at(index: int, row_names: Sequence[str] | None) -> str:
    """Completion ``index`` named with its data row (``completion 3 (train_data (p.jsonl) line 2)``)."""
    return f"completion {index}" + (f" ({row_names[index]})" if row_names is not None else "")


def _value(reward: RewardFunction, v: Any, index: int, row_names: Sequence[str] | None = None) -> float:
    if v is None:
        return math.nan
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise RewardError(f"{reward.where}: returned {type(v).__name__} {v!r} for {_at(index, row_names)}; "
                          f"expected a number (or None for unscorable)") from None
    if math.isinf(v):
        raise RewardError(f"{reward.where}: returned {v} for {_at(index, row_names)}; rewards must be finite "
                          f"(None or NaN marks an unscorable completion)")
    return v


def _as_list(reward: RewardFunction, values: Any, n: int, row_names: Sequence[str] | None = None) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.reshape(-1).tolist()
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"{reward.where}: a batched reward must return a list of {n} numbers, got "
                          f"{type(values).__name__}") from None
    if len(values) != n:
        raise RewardError(f"{reward.where}: returned {len(values)} values for {n} completions")
    return [_value(reward, v, i, row_names) for i, v in enumerate(values)]


def _run(coroutine):
    """Run a coroutine to completion, also when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def decode_images(image, completion_ids: Sequence[Sequence[int]], *, batch_size: int = 16) -> torch.Tensor:
    """The pixels of N image completions: each one's codes decoded once, ``batch_size`` at a time.

    Args:
        image: the run's :class:`~fastrl.rollout.image.ImageModel`.
        completion_ids: N completions' token ids (unified ids), each ending with its image's codes.
        batch_size: images per decoder call (>= 1).

    Returns:
        uint8 ``[N, H, W, 3]`` on the CPU (``[0, 0, 0, 3]`` for no completion).

    Raises:
        ValueError: a completion whose last ``image_tokens`` tokens are not image codes (naming the row),
            a ``batch_size`` < 1.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    started = time.perf_counter()
    codes = image.codes(list(completion_ids))
    if codes.shape[0] == 0:
        return torch.zeros(0, 0, 0, 3, dtype=torch.uint8)
    pixels = torch.cat([image.decode(codes[i:i + batch_size]) for i in range(0, codes.shape[0], batch_size)])
    IMAGE_STATS.add("decoded", codes.shape[0], time.perf_counter() - started)
    return pixels


def _pil(pixels: torch.Tensor, where: str) -> list:
    try:
        from PIL import Image
    except ImportError:
        raise RewardError(f"{where}: asks for pil_images, which needs Pillow (pip install pillow); or name the "
                          f"parameter images to get a uint8 [N, H, W, 3] tensor") from None
    return [Image.fromarray(p.numpy()) for p in pixels]  # uint8 [H, W, 3] is an RGB image


_NOT_TRL_COLUMNS = frozenset({"prompt", "completion", "prompt_ids", "completion_ids", *TRL_ARGS})


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _missing(reward: RewardFunction, column: str, row: str) -> RewardError:
    why = "its signature names it" if column in reward.named else \
        "it takes **kwargs, so it gets every column, and other rows have this one"
    return RewardError(f"{reward.where}: {row} has no column {column!r}, which this reward asks for ({why}); add it "
                       f"to the row, or set allow_missing_columns: true to pass None for it")


def _asks_for(reward: RewardFunction, columns: Sequence[str]) -> list[str]:
    """The data columns (of ``columns``) a reward gets: those it names, or every one with ``**kwargs``;
    not a per-sample reward's parameters with a default (the default stands in for a missing one)."""
    skip = set(IMAGE_ARGS) | {"group_size", "completion", "finish_reason", "prompt_ids", "completion_ids"}
    if reward.form == "trl":
        skip |= _NOT_TRL_COLUMNS | set(TRL_EXTRAS)
    if not reward.batched:
        skip |= reward.defaults
    return [k for k in columns if k not in skip and (reward.keywords is None or k in reward.keywords)]


def check_columns(rewards: Sequence[RewardFunction], rows: Sequence[dict[str, Any]], columns: Sequence[str],
                  row_names: Sequence[str], *, allow_missing_columns: bool = False) -> None:
    """Refuse, before any step, a data row without a column a reward asks for (see :func:`score`).

    Args:
        rewards: the run's rewards.
        rows: the data rows (the columns each has).
        columns: every column of the table.
        row_names: ``row_names[i]`` names row i (``train_data (p.jsonl) line 7``).
        allow_missing_columns: such a row is allowed (the reward then gets None): check nothing.

    Raises:
        RewardError: the first such row, naming the reward, the column and the row.
    """
    if allow_missing_columns:
        return
    for reward in rewards:
        asked = _asks_for(reward, columns)
        for i, row in enumerate(rows):
            for k in asked:
                if k not in row or row[k] is MISSING:
                    raise _missing(reward, k, row_names[i])


def _raised(reward: RewardFunction, error: Exception, index: int | None, n: int, row_names: Sequence[str] | None,
            texts: Sequence | None, completion_ids: Sequence[list[int]]) -> RewardError:
    """The :class:`RewardError` of an exception a reward raised: the reward, the completion, its data row."""
    if index is None:
        rows = list(dict.fromkeys(row_names)) if row_names is not None else []
        shown = ", ".join(rows[:3]) + (f" and {len(rows) - 3} more" if len(rows) > 3 else "")
        what = f"on a batch of {n} completions" + (f" (data rows {shown})" if rows else "") + \
            " (no single completion raises alone)"
    else:
        text = texts[index] if texts is not None and isinstance(texts[index], (str, list)) else completion_ids[index]
        shown = repr(text) if len(repr(text)) <= 120 else repr(text)[:117] + "..."
        what = f"on {_at(index, row_names)}: {shown}"
    return RewardError(f"{reward.where}: raised {type(error).__name__}: {error} {what}")


def score(rewards: Sequence[RewardFunction], prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]],
          columns: Sequence[dict[str, Any]], *, image=None, group_size: int | None = None,
          decode_batch_size: int = 16, images: torch.Tensor | None = None, prompts: Sequence | None = None,
          completions: Sequence | None = None, row_names: Sequence[str] | None = None,
          allow_missing_columns: bool = False, state: RewardState | None = None) -> torch.Tensor:
    """Rewards of N completions under R rewards.

    Async rewards are awaited together, every call of every async function concurrently, in one
    event loop (a fresh one in a worker thread when the caller already runs a loop). When a reward
    asks for images (its signature names ``images`` or ``pil_images``), every completion's image is
    decoded once (:func:`decode_images`) and shared by all the rewards that ask; their count and time
    go to the telemetry (``images/decoded_per_s``, ``images/scored_per_s``).

    A column is *missing* from completion i's row when ``columns[i]`` lacks a key another row has,
    or holds :data:`MISSING`. A reward that asks for it (names it, or takes ``**kwargs``) raises a
    :class:`RewardError` naming the reward, the column and the row, unless
    ``allow_missing_columns`` (then it gets None, or a per-sample reward its parameter's default).
    An exception a reward raises becomes a :class:`RewardError` naming the reward, the completion
    and its row; a batched reward that raises is called again one completion at a time to find
    the completion that raises.

    Args:
        rewards: the R rewards (:func:`load_rewards`).
        prompt_ids: the N prompts' token ids.
        completion_ids: the N completions' token ids.
        columns: ``columns[i]`` are the keyword arguments of completion i (its data row and
            extras).
        image: the run's :class:`~fastrl.rollout.image.ImageModel` on an image-generation run, else
            None.
        group_size: G, completions per prompt (rows ``[g G, (g + 1) G)`` share a prompt), for the
            rewards that name ``group_size``; None: not known.
        decode_batch_size: images per decoder call.
        images: the completions' pixels when the caller has decoded them already (uint8 ``[N, H, W,
            3]``, e.g. :func:`decode_images`): handed to the rewards as they are, nothing decoded.
        prompts: the N prompts as the data holds them (text, or a list of chat messages), for the
            TRL-form rewards; None: each row's ``prompt`` column.
        completions: the N completions' text, for the TRL-form rewards (a chat prompt's completion
            is handed to them as ``[{"role": "assistant", "content": text}]``); None: each row's
            ``completion`` column.
        row_names: ``row_names[i]`` names completion i's data row in messages
            (``train_data (p.jsonl) line 7``), or None.
        allow_missing_columns: hand None to a reward for a column its row lacks, instead of raising.
        state: what a TRL-form reward gets as ``trainer_state`` (default: a :class:`RewardState`
            at step 0).

    Returns:
        ``[N, R]`` fp32, NaN where a reward returned None or NaN (unscorable).

    Raises:
        RewardError: a reward returned an inf, a non-number or a wrong number of values, or raised,
            naming it (and the completion and row); a reward asks for a column a row lacks or the
            data does not have, naming the reward, the column and the row; a reward asks for images
            on a run without image generation (``image`` None), naming it; a TRL-form reward without
            the completions' text.
    """
    n = len(completion_ids)
    table = torch.full((n, len(rewards)), math.nan, dtype=torch.float32)
    names = sorted({k for c in columns for k in c})
    lists = {k: [c.get(k, MISSING) for c in columns] for k in names}
    pixels = pil = None
    if images is not None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
                or images.shape[0] != n or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [{n}, H, W, 3] (one image per completion), got "
                             + (f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor)
                                else type(images).__name__))
        pixels = images
    image_run = image is not None or pixels is not None
    # on a text run a data column of the same name keeps reaching the reward as it always has
    as_columns = not image_run and set(names)
    provided = set(IMAGE_ARGS) | {"group_size"}
    for reward in rewards:
        if reward.image_args and not image_run and not reward.image_args <= as_columns:
            raise RewardError(f"{reward.where}: asks for images (its signature names "
                              f"{' and '.join(sorted(reward.image_args))}) but the run has no image generation "
                              f"(set image_generation in the config, or drop this reward)")
        absent = sorted(reward.named - set(names) - provided - reward.defaults
                        - (set(TRL_EXTRAS) if reward.form == "trl" else set()))
        if absent and n:
            raise RewardError(f"{reward.where}: its signature names {absent[0]!r}, which is no column of the data "
                              f"(what a reward can get: {names}); give the parameter a default, or add the column")
    trl = [r for r in rewards if r.form == "trl"]
    texts = list(completions) if completions is not None else lists.get("completion")
    if texts is not None and len(texts) != n:
        raise ValueError(f"completions: {len(texts)} texts for {n} completions")
    if trl and n:
        if texts is None or any(t is MISSING or t is None for t in texts):
            raise RewardError(f"{trl[0].where}: takes TRL's form f(prompts, completions, ...) but the completions' "
                              f"text is not known (the run has no tokenizer)")
        prompt_values = list(prompts) if prompts is not None else lists.get("prompt", [None] * n)
        if len(prompt_values) != n:
            raise ValueError(f"prompts: {len(prompt_values)} prompts for {n} completions")
        trl_inputs = {"prompts": prompt_values,
                      "completions": [[{"role": "assistant", "content": t}] if _is_messages(p) and isinstance(t, str)
                                      else t for p, t in zip(prompt_values, texts)],
                      "completion_ids": [list(c) for c in completion_ids]}
    if image_run and pixels is None and any(r.image_args for r in rewards):
        pixels = decode_images(image, completion_ids, batch_size=decode_batch_size)
    for reward in rewards:
        if image_run and "pil_images" in reward.image_args and pil is None:
            pil = _pil(pixels, reward.where)

    def extras(reward: RewardFunction, i: int | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if image_run and "images" in reward.image_args:
            out["images"] = pixels if i is None else pixels[i]
        if image_run and "pil_images" in reward.image_args:
            out["pil_images"] = pil if i is None else pil[i]
        if reward.wants_group_size and not (as_columns and "group_size" in as_columns):
            out["group_size"] = group_size
        return out

    def missing(reward: RewardFunction, column: str, i: int) -> RewardError:
        return _missing(reward, column, row_names[i] if row_names is not None else f"the data row of completion {i}")

    def column_lists(reward: RewardFunction, skip: frozenset[str] = frozenset()) -> dict[str, list]:
        out = {}
        for k, values in reward.select(lists).items():
            if k in skip:
                continue
            if any(v is MISSING for v in values):
                if not allow_missing_columns:
                    raise missing(reward, k, next(i for i, v in enumerate(values) if v is MISSING))
                values = [None if v is MISSING else v for v in values]
            out[k] = values
        return out

    def row_keywords(reward: RewardFunction, i: int) -> dict[str, Any]:
        out = {}
        for k in (names if reward.keywords is None else [k for k in names if k in reward.keywords]):
            v = columns[i].get(k, MISSING)
            if v is MISSING:
                if k in reward.defaults:  # the parameter's default stands in
                    continue
                if not allow_missing_columns:
                    raise missing(reward, k, i)
                v = None
            out[k] = v
        return out

    def trl_keywords(reward: RewardFunction) -> dict[str, Any]:
        logged = reward.logged = {"metrics": {}, "extra": {}}
        kw = {k: v for k, v in trl_inputs.items() if k in reward.trl_args}
        # exactly TRL's keywords: fastrl's finish_reason only to a reward that names it
        kw.update(column_lists(reward, _NOT_TRL_COLUMNS | ({"finish_reason"} - reward.named)))
        specials = {"trainer_state": state if state is not None else RewardState(),
                    "log_extra": lambda column, values: logged["extra"].setdefault(column, []).extend(values),
                    "log_metric": lambda key, value: logged["metrics"].setdefault(key, []).append(value)}
        kw.update({k: v for k, v in specials.items() if reward.keywords is None or k in reward.keywords})
        return kw

    def one(kw: dict[str, Any], i: int) -> dict[str, Any]:  # completion i's slice of batched keywords
        out = {}
        for k, v in kw.items():
            sliceable = isinstance(v, list) or (isinstance(v, torch.Tensor) and k in IMAGE_ARGS)
            out[k] = v[i:i + 1] if sliceable and len(v) == n else v
        return out

    def batched_call(reward: RewardFunction, kw: dict[str, Any], i: int | None = None):
        if reward.form == "trl":
            return reward.fn(**(kw if i is None else one(kw, i)))
        if i is None:
            return reward.fn(list(prompt_ids), list(completion_ids), **kw)
        return reward.fn(list(prompt_ids[i:i + 1]), list(completion_ids[i:i + 1]), **one(kw, i))

    def locate(reward: RewardFunction, kw: dict[str, Any]) -> int | None:
        for i in range(n):
            try:
                out = batched_call(reward, kw, i)
                if inspect.isawaitable(out):
                    _run(out)
            except Exception:
                return i
        return None

    async def guarded(reward: RewardFunction, awaitable, index: int | None, kw: dict[str, Any] | None):
        try:
            return await awaitable
        except RewardError:
            raise
        except Exception as e:
            if index is None and kw is not None:
                for i in range(n):
                    try:
                        await batched_call(reward, kw, i)
                    except Exception:
                        index = i
                        break
            raise _raised(reward, e, index, n, row_names, texts, completion_ids) from e

    pending: list[tuple[int, Any]] = []
    scored, seconds = 0, 0.0
    for j, reward in enumerate(rewards):
        started = time.perf_counter()
        reward.preferences = None
        if reward.batched:
            kw = trl_keywords(reward) if reward.form == "trl" else column_lists(reward)
            kw.update(extras(reward, None))
            try:
                out = batched_call(reward, kw)
            except RewardError:
                raise
            except Exception as e:
                raise _raised(reward, e, None if reward.is_model else locate(reward, kw), n, row_names, texts,
                              completion_ids) from e
            if inspect.isawaitable(out):
                pending.append((j, guarded(reward, out, None, kw)))
            else:
                table[:, j] = torch.tensor(_as_list(reward, out, n, row_names))
        else:
            outs = []
            for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
                try:
                    out = reward.fn(p, c, **{**row_keywords(reward, i), **extras(reward, i)})
                except RewardError:
                    raise
                except Exception as e:
                    raise _raised(reward, e, i, n, row_names, texts, completion_ids) from e
                outs.append(guarded(reward, out, i, None) if inspect.isawaitable(out) else out)
            if outs and inspect.iscoroutine(outs[0]):
                pending.append((j, outs))
            else:
                table[:, j] = torch.tensor([_value(reward, v, i, row_names) for i, v in enumerate(outs)])
        if reward.image_args:
            scored, seconds = scored + n, seconds + time.perf_counter() - started
    if pending:
        async def gather_all():
            jobs = []
            for _, out in pending:
                jobs.append(asyncio.gather(*out) if isinstance(out, list) else out)
            return await asyncio.gather(*jobs)

        started = time.perf_counter()
        results = _run(gather_all())
        if any(rewards[j].image_args for j, _ in pending):
            seconds += time.perf_counter() - started
        for (j, _), out in zip(pending, results):
            table[:, j] = torch.tensor(_as_list(rewards[j], out, n, row_names))
    for reward in rewards:
        found = getattr(reward.fn, "last_preferences", None) if getattr(reward.fn, "pairwise", False) else None
        if found is not None:
            reward.preferences = found
    if scored:
        IMAGE_STATS.add("scored", scored, seconds)
    return table


def pairwise_preferences(rewards: Sequence[RewardFunction]) -> torch.Tensor | None:
    """The preference matrix of the last :func:`score` call's pairwise rewards, for ``pref_grpo``.

    A pairwise reward (an object with ``pairwise = True``, e.g.
    :class:`fastrl.train.image_rewards.ImagePreferenceReward`) leaves ``P[i, k]`` = how much sample i
    beats sample ``g G + k`` of its group g; several pairwise rewards are averaged.

    Args:
        rewards: the run's rewards, after :func:`score`.

    Returns:
        ``[N, G]`` fp32 on the CPU, or None when no reward left one.
    """
    found = [r.preferences for r in rewards if r.preferences is not None]
    if not found:
        return None
    return torch.stack([f.float().cpu() for f in found]).mean(0)


def combine(table: torch.Tensor, weights: Sequence[float] | None) -> torch.Tensor:
    """The weighted sum ``[N]`` of each row's scorable rewards; NaN where none is scorable.

    Args:
        table: ``[N, R]`` fp32 rewards (:func:`score`), NaN for unscorable.
        weights: R weights, or None (all 1).

    Returns:
        ``[N]`` in ``table``'s dtype.
    """
    w = torch.tensor(weights if weights is not None else [1.0] * table.shape[1], dtype=table.dtype)
    finite = ~torch.isnan(table)
    total = torch.where(finite, table * w, torch.zeros_like(table)).sum(1)
    return torch.where(finite.any(1), total, torch.full_like(total, math.nan))
