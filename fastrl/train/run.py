"""What every recipe does around its step: start the run, plan its steps, resume, end each step, finish.

A recipe reads top to bottom with these in order::

    run = start_run(config)                       # processes, output_dir checked, seed, tokenizer, model, policy
    ...                                           # the recipe's data, layout, reference, sharding
    plan_steps(run, len(data), "pairs", fingerprint=data_fingerprint(data))  # data order and step count
    resume(run)                                   # optimiser, schedule, guard; restored from a checkpoint
    open_telemetry(run)
    with guarded(run):                            # Ctrl-C / SIGTERM, a reward failing mid-step; telemetry closed
        for step in range(run.start_step, run.total_steps):
            started = time.perf_counter()
            ...                                   # the recipe's forwards and backwards
            end_step(run, step + 1, started=started, loss=loss, tokens=tokens, flops=flops,
                     record=lambda: {...})        # optimiser step, counters, log record, checkpoint
        return finish(run)                        # the final checkpoint, if not just saved

**A run never mixes with another.** :func:`start_run` refuses an ``output_dir`` that holds a previous
run's outputs (``metrics.jsonl``, ``completions.jsonl``, ``checkpoints/``, ``tensorboard/``,
``wandb/``) unless ``resume`` is set (continue it) or ``overwrite_output_dir`` (those outputs are
removed first; other files, such as the data, are never touched). A resume whose checkpoint was
written with other run settings (loss, group size, model, seed, ...: every field but
:data:`RUN_NEUTRAL`) or on other data (the data fingerprint kept in the checkpoint) is refused,
naming each differing field ``old -> new``, unless ``force_resume``. A resumed run drops the records
of the steps after its checkpoint from ``metrics.jsonl`` / ``completions.jsonl`` (it redoes them)
and moves the checkpoints of those steps aside (``checkpoints/abandoned-after-step-N/``). Pruning
never removes the checkpoint just written, and ``checkpoints/latest`` always names a complete one.

**Stopping.** Under :func:`guarded`, SIGINT (Ctrl-C) or SIGTERM asks the run to stop: the step in
progress ends, its checkpoint is written and :class:`TrainingInterrupted` (a ``KeyboardInterrupt``
with ``.step``, ``.checkpoint``, ``.signal``) is raised; ``fastrl train`` prints ``interrupted at
step N; checkpoint PATH; continue with --resume auto`` and exits with 130 (SIGINT) or 143 (SIGTERM).
A second Ctrl-C stops at once. A reward that raises (a ``RewardError``) mid-step is raised again
with ``step N:`` in front, after a checkpoint of the last step done (one process).

**Callbacks** (``run.callbacks``, a list; the Trainer classes' ``callbacks``): objects with any of
these methods, called on every process, in order — ``on_step_end(run, step) -> dict | None`` after
the step's optimiser step (a dict of floats joins the step's record and the step is logged even off
the log steps; return one on every process or on none), ``on_log(run, step, record)`` after a
record is logged, ``on_save(run, step, path)`` after a checkpoint is written, and
``on_train_end(run, result)`` from :func:`finish`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from fastrl.train import distributed
from fastrl.train import threads as threads_lib
from fastrl.train.async_rollout import WorkerFailed
from fastrl.train.checkpoint import (checkpoints_after, find_checkpoint, jsonable, load_checkpoint, rng_state,
                                     save_checkpoint, saved_config, set_rng_state)
from fastrl.train.config import ConfigError, TrainConfig
from fastrl.train.model import Policy, build_model, freeze_unused, image_adapter, load_tokenizer
from fastrl.train.optim import NonFiniteSteps, build_optimizer, build_scheduler, optimizer_step
from fastrl.train.rewards import RewardError
from fastrl.train.telemetry import Telemetry, flops_per_token, peak_flops

__all__ = ["RUN_NEUTRAL", "RUN_OUTPUTS", "BatchOrder", "Run", "TrainResult", "TrainingInterrupted", "check_output_dir",
           "config_changes", "data_fingerprint", "end_step", "finish", "guarded", "log_due", "open_telemetry",
           "optimize", "plan_steps", "resume", "save", "save_if_due", "start_run", "step_metrics"]

# What a run writes into its output_dir: a directory holding any of these is a used one (start_run).
RUN_OUTPUTS = ("metrics.jsonl", "completions.jsonl", "checkpoints", "tensorboard", "wandb")

# Config fields a resume may change (they do not change what is trained: length, logging, checkpointing,
# systems); every other field differing from the checkpoint's is refused unless force_resume. The data
# are compared by their fingerprint instead of the train_data path. Fields starting with a prefix of
# RUN_NEUTRAL_PREFIXES (held-out evaluation, the vLLM engine's settings) are run-neutral too.
RUN_NEUTRAL = frozenset({
    "output_dir", "resume", "force_resume", "overwrite_output_dir", "max_steps", "num_epochs", "log_every",
    "progress", "report_to", "run_name", "save_every", "keep_checkpoints", "peak_tflops", "log_completions",
    "device", "train_data", "attention", "attn_implementation", "compile", "gradient_checkpointing", "packing",
    "max_bad_steps", "rollout_engine", "rollout_keep_cuda_graph", "reward_batch_size", "reference_batch_size",
    "reference_cache_dir", "threads"})
RUN_NEUTRAL_PREFIXES = ("eval_", "vllm_")


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT / SIGTERM at a step boundary, after checkpointing that step.

    Raised by :func:`end_step` (see :func:`guarded`); ``fastrl train`` turns it into a message and
    exit code 130 (SIGINT) or 143 (SIGTERM). A ``KeyboardInterrupt``, so code that stops on Ctrl-C
    stops on it too.

    Args:
        step: the last step done (1-based), the checkpoint's.
        checkpoint: the checkpoint's directory.
        signal: the signal's number (``signal.SIGINT`` or ``signal.SIGTERM``).
    """

    def __init__(self, step: int, checkpoint: Path | None, signal: int):
        self.step, self.checkpoint, self.signal = step, checkpoint, signal
        super().__init__(f"interrupted at step {step}; checkpoint {checkpoint}; continue with --resume auto")


class BatchOrder:
    """Which examples each micro-batch of each process reads.

    A seeded permutation per epoch, consumed ``batch_size × world_size`` examples at a time (rank r
    reads its own slice), the incomplete tail of an epoch dropped. Its state (epoch, position) is
    the data position a checkpoint stores.

    Args:
        num_examples: the size of the dataset.
        batch_size: examples per micro-batch of one process.
        world_size: the number of processes.
        rank: this process's rank, in ``[0, world_size)``.
        seed: the permutation of epoch e is seeded with ``seed + e``.
        shuffle: False: every epoch reads the examples in order.
    """

    def __init__(self, num_examples: int, *, batch_size: int, world_size: int, rank: int, seed: int, shuffle: bool):
        self.n, self.batch_size, self.world_size, self.rank = num_examples, batch_size, world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def micro_batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    def next(self) -> list[int]:
        """The example indices of this process's next micro-batch."""
        if self.position + self.global_batch > self.n:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation()
        start = self.position + self.rank * self.batch_size
        self.position += self.global_batch
        return self._order[start:start + self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_examples": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_examples"] != self.n or state["seed"] != self.seed:
            raise ValueError(f"the checkpoint was taken on {state['num_examples']} examples with seed {state['seed']}; "
                             f"this run has {self.n} with seed {self.seed}")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation()


@dataclasses.dataclass
class TrainResult:
    """What a run returns: the logged records, the last checkpoint, the policy and the steps taken.

    Args:
        history: the logged records, one dict per log step.
        checkpoint: the last checkpoint's directory, or None.
        policy: the trained :class:`~fastrl.train.model.Policy` (unsharded in one process).
        steps: the number of optimiser steps taken in this run.
    """

    history: list[dict[str, Any]]
    checkpoint: Path | None
    policy: Policy
    steps: int


@dataclasses.dataclass
class Run:
    """One run's shared state, filled in stages.

    :func:`start_run` fills the first block; :func:`plan_steps`, :func:`resume` and
    :func:`open_telemetry` the rest; the recipe's loop advances ``tokens_seen``, ``history`` and
    ``last_saved``.

    Args:
        config: the trainer config.
        world: the processes and device.
        out: ``config.output_dir``.
        tokenizer: the policy's tokenizer.
        model: the Hugging Face model.
        vocab_size: rows of its input embedding; for an image run the size of the model's id space
            (text ids, then image codes: ``offset + codebook`` for Janus).
        policy: the :class:`~fastrl.train.model.Policy` around ``model``.
        image: the :class:`~fastrl.rollout.image.ImageModel` of an image run, or None.
        threads: the :class:`~fastrl.train.threads.ThreadChoice` applied to this process.
        order: the data order (:func:`plan_steps`).
        total_steps: the run's step count (:func:`plan_steps`).
        optimizer: the optimiser (:func:`resume`).
        scheduler: the learning-rate schedule (:func:`resume`).
        guard: the non-finite-step guard (:func:`resume`).
        start_step: the step resumed from (:func:`resume`).
        tokens_seen: tokens trained on so far, every process.
        telemetry: the run's :class:`~fastrl.train.telemetry.Telemetry` (:func:`open_telemetry`).
        forward_flops: forward FLOPs per token (training: 3×).
        peak: the device's peak FLOP/s; None: no MFU.
        data_fingerprint: the training data's fingerprint (:func:`plan_steps`), kept in checkpoints.
        history: the logged records so far.
        last_saved: the last checkpoint written (or resumed from), or None.
        saved_step: the step of ``last_saved``, or None.
        step: the last step done (``start_step`` before the first).
        callbacks: objects with any of ``on_step_end`` / ``on_log`` / ``on_save`` / ``on_train_end``
            (the module docstring), called in order.
        stop_signal: the SIGINT / SIGTERM received while the loop runs, or None.
        boundary: the data position and RNG states after ``step`` (a checkpoint written mid-step
            restores them: :func:`guarded`).
        source: GRPO's / online DPO's :class:`~fastrl.train.step_source.SyncSource` or
            :class:`~fastrl.train.step_source.AsyncSource` (its rollout worker), or None.
    """

    config: TrainConfig
    world: distributed.World
    out: Path                      # config.output_dir
    tokenizer: Any
    model: torch.nn.Module
    vocab_size: int
    policy: Policy
    image: Any = None
    threads: Any = None            # the intra-op threads chosen (fastrl.train.threads.ThreadChoice)
    # plan_steps
    order: BatchOrder | None = None
    total_steps: int = 0
    # resume
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    guard: NonFiniteSteps | None = None
    start_step: int = 0
    tokens_seen: int = 0
    # open_telemetry
    telemetry: Telemetry | None = None
    forward_flops: float = 0.0     # forward FLOPs per token (training: 3×)
    peak: float | None = None      # the device's peak FLOP/s; None: no MFU
    data_fingerprint: str | None = None  # plan_steps
    # the loop
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    last_saved: Path | None = None
    saved_step: int | None = None  # the step of last_saved
    step: int = 0                  # the last step done (start_step before the first)
    callbacks: list[Any] = dataclasses.field(default_factory=list)
    stop_signal: int | None = None  # SIGINT / SIGTERM received while the loop runs (guarded)
    boundary: tuple[dict[str, int], dict[str, Any]] | None = None  # data position and RNG after `step`
    source: Any = None             # an online recipe's source of samples (fastrl.train.step_source)

    def autocast(self):
        """bf16 autocast when ``config.bf16``, else a no-op context."""
        if self.config.bf16:
            return torch.autocast(self.world.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def start_run(config: TrainConfig) -> Run:
    """Processes and device, the output directory checked, the seed, the tokenizer, the model, its :class:`Policy`.

    The output directory is checked first (:func:`check_output_dir`): a used one is refused unless
    the run resumes or ``overwrite_output_dir`` is set, and a resume whose checkpoint was written with
    other run settings is refused. The policy is not yet sharded: a recipe copies its reference and
    checks packing first.

    Args:
        config: the trainer config.

    Returns:
        A :class:`Run` with its first block filled.

    Raises:
        ConfigError: a used ``output_dir``, or changed run settings on resume, naming the fields.
    """
    world = distributed.init_world(config.device)
    check_output_dir(config, world)  # before anything is loaded or written
    torch.manual_seed(config.seed)
    paths = (str, os.PathLike)
    source = config.tokenizer if config.tokenizer is not None else \
        (config.model if isinstance(config.model, paths) else None)  # a model given from Python has no directory
    if source is not None and config.tokenizer is None and getattr(config, "image_run", False) and not any(
            (Path(source) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        source = None  # an image model saved without a tokenizer: the data are token ids
    tokenizer = load_tokenizer(source) if source is None or isinstance(source, paths) else source  # or given
    model = build_model(config, world.device)
    async_run = callable(getattr(config, "async_options", None)) and config.async_options() is not None
    threads = threads_lib.choose_threads(requested=config.threads, model=model, share=2 if async_run else 1,
                                         device=world.device)
    threads_lib.apply(threads)
    vocab_size = model.get_input_embeddings().weight.shape[0]  # a reward model has no lm-head
    image = image_adapter(config, model)
    cfg_weight = 1.0
    if image is not None:
        freeze_unused(image)
        vocab_size = max(vocab_size, image.offset + image.codebook)
        if config.train_logps == "cfg":  # training mixes the branches with the rollout's weight
            cfg_weight = config.image_options()["cfg_weight"]
    policy = Policy(model, compute_dtype=torch.bfloat16 if config.bf16 else None, image=image, cfg_weight=cfg_weight)
    return Run(config=config, world=world, out=Path(config.output_dir), tokenizer=tokenizer, model=model,
               vocab_size=vocab_size, policy=policy, image=image, threads=threads)


def check_output_dir(config: TrainConfig, world: distributed.World) -> None:
    """Refuse a used ``output_dir``, empty it with ``overwrite_output_dir``, and check a resume's settings.

    A directory is used when it holds a previous run's outputs (:data:`RUN_OUTPUTS`:
    ``metrics.jsonl``, ``completions.jsonl``, ``checkpoints/``, ``tensorboard/``, ``wandb/``); other
    files (the data, a config, the content-keyed ``reference_cache/``) do not count and are never
    removed. A used directory is refused unless ``config.resume`` is set (the run continues there)
    or ``config.overwrite_output_dir`` (process 0 removes those outputs, before anything is
    written). With ``resume``, the checkpoint found is compared with ``config``
    (:func:`config_changes`): differing run settings are refused unless ``force_resume`` (then a
    warning names them). Every process calls it.

    Args:
        config: the trainer config.
        world: the processes.

    Raises:
        ConfigError: a used ``output_dir`` (naming both ways out), or a resume with changed settings
            (naming each field, ``old -> new``).
    """
    cls = type(config).__name__
    out = Path(config.output_dir)
    used = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if used and config.resume is None:
        if not config.overwrite_output_dir:
            raise ConfigError(f"{cls}.output_dir: {str(out)!r} holds a previous run ({', '.join(used)}); continue "
                              f"it with resume: auto (--resume auto), start afresh there with overwrite_output_dir: "
                              f"true (--overwrite_output_dir, which removes those), or choose another output_dir")
        distributed.barrier()  # every process has looked before process 0 removes
        if world.is_main:
            for name in used:
                path = out / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        distributed.barrier()
    checkpoint = find_checkpoint(out, config.resume)
    if checkpoint is None:
        return
    saved = saved_config(checkpoint)
    if saved is None or not isinstance(saved.get("config"), dict):
        return  # a checkpoint without its config: nothing to compare
    changes = config_changes(saved["config"], config)
    if not changes:
        return
    listed = "; ".join(changes)
    if config.force_resume:
        if world.is_main:
            warnings.warn(f"{cls}.force_resume: resuming from {checkpoint} with other run settings: {listed}",
                          stacklevel=2)
        return
    raise ConfigError(f"{cls}.resume: the checkpoint {checkpoint} was written with other run settings: {listed}; "
                      f"resume with the checkpoint's settings, or set force_resume: true (--force_resume) to resume "
                      f"with these")


def config_changes(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """The run settings of ``config`` that differ from a checkpoint's ``saved`` config.

    Every field but the run-neutral ones (:data:`RUN_NEUTRAL`, and names starting with one of
    ``RUN_NEUTRAL_PREFIXES``) is compared in its JSON form. A field the checkpoint does not hold
    (added to fastrl since) counts as changed only when ``config`` gives it a value other than its
    default.

    Args:
        saved: the checkpoint's config (``trainer_state.json["config"]``).
        config: this run's config.

    Returns:
        ``"field: old -> new"`` per differing field, in field order (empty: the same run).
    """
    def plain(value):
        return json.loads(json.dumps(value, default=jsonable))

    current = plain(config.to_dict())
    defaults = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    changes = []
    for name, new in current.items():
        if name in RUN_NEUTRAL or name.startswith(RUN_NEUTRAL_PREFIXES):
            continue
        if name in saved:
            if saved[name] != new:
                changes.append(f"{name}: {saved[name]!r} -> {new!r}")
        elif name in defaults and plain(defaults[name]) != new:
            changes.append(f"{name}: (not in the checkpoint: {plain(defaults[name])!r}) -> {new!r}")
    return changes


def data_fingerprint(data) -> str:
    """The fingerprint of a recipe's training data, kept in its checkpoints and compared on resume.

    The data's own ``fingerprint()`` (its token ids, :func:`fastrl.train.data.fingerprint`), with
    the rows' other columns (``rows``: the reward columns of prompts) and ``margins`` where the
    data have them.

    Args:
        data: ``Prompts``, ``PreferencePairs``, SFT examples: anything with ``fingerprint()``.

    Returns:
        A sha256 hex digest.
    """
    h = hashlib.sha256(data.fingerprint().encode())
    for extra in ("rows", "margins"):
        value = getattr(data, extra, None)
        if value is not None:
            h.update(json.dumps(value, sort_keys=True, default=lambda o: f"<{type(o).__name__}>").encode())
    return h.hexdigest()


def plan_steps(run: Run, num_examples: int, what: str, fingerprint: str | None = None) -> None:
    """The data order over ``num_examples`` training rows and the run's step count.

    The step count is ``max_steps``, else ``num_epochs`` epochs. Sets ``run.order``,
    ``run.total_steps`` and ``run.data_fingerprint``.

    Args:
        run: the :class:`Run`.
        num_examples: the training rows.
        what: what the rows are, for the error (examples, pairs, prompts).
        fingerprint: the data's fingerprint (:func:`data_fingerprint`), kept in the checkpoints; a
            resume from a checkpoint of other data is refused (:func:`resume`). None: not checked.

    Raises:
        ConfigError: fewer rows than one step takes, naming ``batch_size``.
    """
    config, world = run.config, run.world
    run.data_fingerprint = fingerprint
    run.order = BatchOrder(num_examples, batch_size=config.batch_size, world_size=world.world_size, rank=world.rank,
                           seed=config.seed, shuffle=config.shuffle)
    steps_per_epoch = run.order.micro_batches_per_epoch() // config.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ConfigError(f"{type(config).__name__}.batch_size: train_data has {num_examples} {what}, fewer than one "
                          f"step takes (batch_size {config.batch_size} × gradient_accumulation_steps "
                          f"{config.gradient_accumulation_steps} × {world.world_size} processes)")
    run.total_steps = config.max_steps or steps_per_epoch * config.num_epochs


def resume(run: Run, *, updates_per_step: int = 1) -> Path | None:
    """The optimiser, the schedule and the non-finite guard; then the state of a checkpoint, if one is found.

    The schedule runs over ``total_steps × updates_per_step`` optimiser steps. If ``config.resume``
    finds a checkpoint, weights, optimiser, schedule, RNG, step, tokens seen, data position and guard
    are restored from it — unless it was taken on other data (its data fingerprint differs from
    ``run.data_fingerprint``), which is refused unless ``force_resume``. The checkpoints of
    ``output_dir`` of a later step than the one resumed from (an abandoned branch: the run resumed
    from an earlier checkpoint) are moved aside, into ``checkpoints/abandoned-after-step-<step>/``,
    so that neither pruning nor a later ``resume: auto`` mixes them with this run's.

    Args:
        run: the :class:`Run`, its steps planned.
        updates_per_step: optimiser steps per run step (GRPO's μ).

    Returns:
        The checkpoint resumed from, or None.

    Raises:
        ConfigError: the checkpoint was taken on other data (naming ``train_data``).
    """
    config, world = run.config, run.world
    cls = type(config).__name__
    run.optimizer = build_optimizer(run.policy, config, world.device)
    run.scheduler = build_scheduler(run.optimizer, config, run.total_steps * updates_per_step)
    run.guard = NonFiniteSteps(config.max_bad_steps)
    checkpoint = find_checkpoint(run.out, config.resume)
    if checkpoint is not None:
        saved = (saved_config(checkpoint) or {}).get("data_fingerprint")
        if saved is not None and run.data_fingerprint is not None and saved != run.data_fingerprint \
                and not config.force_resume:
            raise ConfigError(f"{cls}.train_data: train_data changed since the checkpoint {checkpoint} was written "
                              f"(its data fingerprint {saved[:12]}..., this data's {run.data_fingerprint[:12]}...); "
                              f"resume with the checkpoint's data, or set force_resume: true (--force_resume)")
        state = load_checkpoint(checkpoint, policy=run.policy, optimizer=run.optimizer, scheduler=run.scheduler,
                                world=world)
        run.start_step, run.tokens_seen = state["step"], state["tokens_seen"]
        try:
            run.order.load_state_dict(state["data"])
        except ValueError as e:  # other data or seed: the saved data position means nothing here
            raise ConfigError(f"{cls}.train_data: cannot resume from {checkpoint}: {e}") from None
        run.guard.load_state_dict(state["non_finite"])
        run.last_saved, run.saved_step = checkpoint, run.start_step
        _set_aside(run, run.start_step)
    run.step = run.start_step
    run.boundary = (run.order.state_dict(), rng_state())
    return checkpoint


def _set_aside(run: Run, step: int) -> None:
    """Move the checkpoints of ``run.out`` later than ``step`` into ``checkpoints/abandoned-after-step-<step>``
    (process 0), warning with their names."""
    later = checkpoints_after(run.out, step)
    if later and run.world.is_main:
        aside = run.out / "checkpoints" / f"abandoned-after-step-{step:08d}"
        n = 1
        while aside.exists():
            aside, n = aside.with_name(f"abandoned-after-step-{step:08d}.{n}"), n + 1
        aside.mkdir()
        for path in later:
            os.rename(path, aside / path.name)
        latest = run.out / "checkpoints" / "latest"
        if latest.is_file() and not (latest.parent / latest.read_text().strip()).is_dir():
            found = find_checkpoint(run.out, "auto")  # the highest complete checkpoint left
            if found is None:
                latest.unlink()
            else:
                tmp = latest.with_name("latest.tmp")
                tmp.write_text(found.name)
                os.replace(tmp, latest)
        names = ", ".join(p.name for p in later)
        warnings.warn(f"resume: {len(later)} checkpoint file(s) of steps after {step} ({names}) belong to an "
                      f"abandoned branch of this run; moved into {aside}", stacklevel=3)
    distributed.barrier()


def open_telemetry(run: Run) -> None:
    """The run's :class:`Telemetry` (from ``start_step``), and what the FLOP figures need.

    Args:
        run: the :class:`Run`, resumed.
    """
    run.telemetry = Telemetry(run.config, total_steps=run.total_steps, device=run.world.device,
                              is_main=run.world.is_main, start_step=run.start_step)
    run.forward_flops = flops_per_token(run.model)
    run.peak = peak_flops(run.world.device, run.config.peak_tflops)


def optimize(run: Run, loss: float, step: int) -> tuple[float, bool]:
    """Clip and step the optimiser and schedule, skipped when ``loss`` or the gradient norm is not finite.

    It is :func:`~fastrl.train.optim.optimizer_step` with the run's settings.

    Args:
        run: the :class:`Run`.
        loss: the step's loss, every process.
        step: the step (1-based).

    Returns:
        ``(grad_norm, stepped)``.
    """
    return optimizer_step(run.policy, run.optimizer, run.scheduler, max_grad_norm=run.config.max_grad_norm,
                          loss=torch.tensor(loss), guard=run.guard, step=step)


def log_due(run: Run, step: int) -> bool:
    """Whether step ``step`` (1-based) is logged: every ``log_every`` steps and the last one.

    Args:
        run: the :class:`Run`.
        step: the step, 1-based.

    Returns:
        True on a log step.
    """
    return step % run.config.log_every == 0 or step == run.total_steps


def step_metrics(run: Run, *, grad_norm: float, lr: float, skipped: float, tokens: float, step_s: float,
                 flops: float, layout: tuple[float, float, float] | None = None) -> dict[str, float]:
    """The part of a step's record every recipe logs.

    ``grad_norm``, ``lr``, ``skipped`` (optimiser steps skipped this step), ``skipped_total``,
    ``epoch``, ``tokens`` (the step's, every process), ``tokens_seen``, ``tokens_per_s``, ``step_s``
    (seconds), with ``layout`` ``packing_efficiency`` and ``batch_fill``, then ``tflops``, ``threads``
    (this process's intra-op threads; the first record also ``threads_reason``) and, when the device's
    peak is known, ``mfu``.

    Args:
        run: the :class:`Run`.
        grad_norm: the step's gradient norm.
        lr: the learning rate.
        skipped: optimiser steps skipped this step.
        tokens: the step's tokens, every process.
        step_s: the step's seconds.
        flops: the step's FLOPs, every process.
        layout: (tokens, slots, padded slots) of the step's model batches, or None.

    Returns:
        ``{name: float}``.
    """
    record = {"grad_norm": grad_norm, "lr": lr, "skipped": skipped, "skipped_total": run.guard.total,
              "epoch": run.order.epoch, "tokens": tokens, "tokens_seen": run.tokens_seen,
              "tokens_per_s": tokens / step_s, "step_s": step_s}
    if layout is not None:
        laid_out, slots, padded_slots = layout
        record["packing_efficiency"] = laid_out / max(padded_slots, 1.0)
        record["batch_fill"] = laid_out / max(slots, 1.0)
    record["tflops"] = flops / step_s / 1e12
    if run.threads is not None:  # the intra-op threads chosen (fastrl.train.threads); why, in the first record
        record["threads"] = float(run.threads.threads)
        if not run.history:
            record["threads_reason"] = run.threads.reason
    if run.peak:
        record["mfu"] = flops / step_s / (run.peak * run.world.world_size)
    return record


def save(run: Run, step: int) -> Path:
    """Checkpoint ``checkpoints/step-<step>``; every process calls it.

    Weights, optimiser, schedule, RNG and the trainer state (step, tokens seen, data position,
    non-finite guard, the data's fingerprint), and the config (compared on resume).

    Args:
        run: the :class:`Run`.
        step: the step just ended (1-based).

    Returns:
        The checkpoint's directory.
    """
    trainer_state = {"step": step, "tokens_seen": run.tokens_seen, "data": run.order.state_dict(),
                     "non_finite": run.guard.state_dict(), "data_fingerprint": run.data_fingerprint}
    return save_checkpoint(run.out, step, policy=run.policy, optimizer=run.optimizer, scheduler=run.scheduler,
                           trainer_state=trainer_state, config=run.config.to_dict(), world=run.world,
                           keep=run.config.keep_checkpoints, tokenizer=run.tokenizer)


def save_if_due(run: Run, step: int, save: Callable[[Run, int], Path] = save) -> None:
    """Checkpoint after step ``step`` (1-based) every ``save_every`` steps.

    Args:
        run: the :class:`Run` (``last_saved`` set when it saves).
        step: the step, 1-based.
        save: the checkpoint function (:func:`save` by default).
    """
    if run.config.save_every and step % run.config.save_every == 0:
        _save(run, step, save)


def _save(run: Run, step: int, save: Callable[[Run, int], Path]) -> Path:
    """``save(run, step)``, recorded in ``run.last_saved`` / ``saved_step``, then the callbacks' ``on_save``."""
    run.last_saved, run.saved_step = save(run, step), step
    _callbacks(run, "on_save", step, run.last_saved)
    return run.last_saved


def _callbacks(run: Run, hook: str, *args) -> list[Any]:
    """Call ``hook(run, *args)`` of every callback that has it, in order; their results."""
    return [getattr(cb, hook)(run, *args) for cb in run.callbacks if callable(getattr(cb, hook, None))]


def end_step(run: Run, step: int, *, started: float, tokens: float, flops: float,
             record: Callable[[], dict[str, Any]], loss: float | None = None, empty: bool = False,
             layout: tuple[float, float, float] | None = None,
             samples: Callable[[], list[dict[str, Any]]] | None = None,
             save: Callable[[Run, int], Path] = save) -> None:
    """The end of step ``step`` (1-based), the same in every recipe.

    In this order:

    1. the optimiser step (telemetry phase ``optimizer``): on ``loss`` (the step's, every process)
       with :func:`optimize`; with ``empty`` (a step with nothing to learn from) none, the gradients
       dropped and the schedule advanced all the same; with ``loss=None`` the recipe has stepped the
       optimiser itself (GRPO's μ updates) and ``record()`` holds the step's ``grad_norm`` and
       ``skipped``;
    2. ``tokens`` (the step's, every process) counted into ``tokens_seen``, the telemetry advanced;
    3. on a log step (:func:`log_due`): ``record()`` — the recipe's metrics, called on log steps only,
       on every process (it may hold collectives) — then :func:`step_metrics` (``lr`` read before the
       optimiser step, ``step_s`` since ``started``, a ``time.perf_counter()``, ``flops`` the step's
       over every process, ``layout`` = model-batch tokens, slots, padded slots), logged and appended
       to ``history``; and, with ``samples`` and ``config.log_completions``, ``samples()`` written to
       ``completions.jsonl``;
    4. a checkpoint when due (:func:`save_if_due` with ``save``);
    5. a stop asked for by SIGINT / SIGTERM (:func:`guarded`; agreed over processes): the step's
       checkpoint (unless just written), then :class:`TrainingInterrupted` — except after the last
       step, which :func:`finish` saves anyway.

    The callbacks (``run.callbacks``, every process): ``on_step_end(run, step)`` after items 1–2 — a
    dict of floats it returns joins the step's record, and the step is logged even off the log
    steps (return one on every process or on none: ``record()`` may hold collectives) —,
    ``on_log(run, step, record)`` after the record is logged, ``on_save(run, step, path)`` after a
    checkpoint is written.

    Args:
        run: the :class:`Run`.
        step: the step, 1-based.
        started: the step's start, a ``time.perf_counter()``.
        tokens: the step's tokens, every process.
        flops: the step's FLOPs, every process.
        record: the recipe's metrics, called on log steps only, on every process.
        loss: the step's loss (every process), or None when the recipe stepped the optimiser itself.
        empty: a step with nothing to learn from (no optimiser step).
        layout: model-batch (tokens, slots, padded slots), or None.
        samples: the step's sample records for ``completions.jsonl``, or None.
        save: the checkpoint function (:func:`save` by default).
    """
    lr = run.scheduler.get_last_lr()[0]
    grad_norm = skipped = None
    if loss is not None or empty:
        with run.telemetry.phase("optimizer"):
            if empty:  # no optimiser step (Adam's moments would still move the weights)
                run.optimizer.zero_grad(set_to_none=True)
                run.scheduler.step()
                grad_norm, stepped = 0.0, False
            else:
                grad_norm, stepped = optimize(run, loss, step)
        skipped = float(not stepped)
    step_s = time.perf_counter() - started
    run.tokens_seen += int(tokens)
    run.telemetry.advance()
    run.step = step
    extra: dict[str, Any] = {}
    for out in _callbacks(run, "on_step_end", step):
        extra.update(out or {})
    if log_due(run, step) or extra:
        entries = record()
        if skipped is None:
            grad_norm, skipped = entries["grad_norm"], entries["skipped"]
        entries.update(step_metrics(run, grad_norm=grad_norm, lr=lr, skipped=skipped, tokens=tokens, step_s=step_s,
                                    flops=flops, layout=layout))
        entries.update(extra)
        logged = run.telemetry.log(step, entries)
        run.history.append(logged)
        if samples is not None and run.config.log_completions:
            run.telemetry.log_completions(step, samples())
        _callbacks(run, "on_log", step, logged)
    save_if_due(run, step, save)
    stop = _stop_agreed(run)
    if stop is not None and step < run.total_steps:
        if run.saved_step != step:
            _save(run, step, save)
        raise TrainingInterrupted(step, run.last_saved, stop)
    run.boundary = (run.order.state_dict(), rng_state())


def _stop_agreed(run: Run) -> int | None:
    """The stop signal any process received (SIGINT first), or None; a collective when distributed."""
    if run.world.world_size == 1:
        return run.stop_signal
    flags = torch.tensor([float(run.stop_signal == signal.SIGINT), float(run.stop_signal == signal.SIGTERM)],
                         device=run.world.device)
    sigint, sigterm = distributed.all_reduce(flags).tolist()
    return signal.SIGINT if sigint else signal.SIGTERM if sigterm else None


def finish(run: Run, save: Callable[[Run, int], Path] = save) -> TrainResult:
    """The final checkpoint (unless the last step was just saved, or no step ran) and the result.

    Args:
        run: the :class:`Run`.
        save: the checkpoint function (:func:`save` by default).

    Returns:
        The :class:`TrainResult`.
    """
    if run.total_steps > run.start_step and run.saved_step != run.total_steps:
        _save(run, run.total_steps, save)
    result = TrainResult(run.history, run.last_saved, run.policy, run.total_steps - run.start_step)
    _callbacks(run, "on_train_end", result)
    return result


@contextlib.contextmanager
def guarded(run: Run, *, save: Callable[[Run, int], Path] = save, on_exit: Callable[[], None] | None = None):
    """The recipe's loop under watch: stop signals, a reward failing mid-step, and the run's end.

    Around the loop and :func:`finish`::

        with guarded(run):
            for step in range(run.start_step, run.total_steps):
                ...
                end_step(run, step + 1, ...)
            return finish(run)

    - **SIGINT / SIGTERM** (in the main thread; the previous handlers are restored on exit): the
      first sets ``run.stop_signal`` and prints ``stopping after step N; Ctrl-C again to stop at
      once``; :func:`end_step` then checkpoints the step and raises :class:`TrainingInterrupted`. A
      second signal raises ``KeyboardInterrupt`` at once (no checkpoint).
    - **A** :class:`~fastrl.train.rewards.RewardError` **mid-step** is raised again as a
      ``RewardError`` whose message starts with ``step N:``; in one process, first a checkpoint of
      the last step done, if any step was done since the last checkpoint (the data position and
      RNG restored to that step's end, so the checkpoint equals the one the step would have
      written). Under several processes nothing is saved (a checkpoint needs every process, and the
      others may be waiting in a collective); the message says so.
    - **A rollout worker that failed** (:class:`~fastrl.train.async_rollout.WorkerFailed`, an
      async run's worker dead past its restarts, or ``on_failure: stop``): the same, raised again as a
      ``WorkerFailed`` whose message starts with ``step N:``.
    - **On exit**, whatever happened: ``on_exit()`` (e.g. freeing a rollout decoder), then the
      telemetry closed.

    Args:
        run: the :class:`Run`, its telemetry open.
        save: the checkpoint function (:func:`save` by default; the one the recipe passes to
            :func:`end_step`).
        on_exit: called when the loop ends, or None.

    Returns:
        A context manager (it yields ``run``).

    Raises:
        RewardError: a reward failed mid-step (``step N: ...``).
    """
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum, frame):
            if run.stop_signal is not None:
                raise KeyboardInterrupt(f"{signal.Signals(signum).name} again: stopped at once")
            run.stop_signal = signum
            if run.world.is_main:
                print(f"fastrl: {signal.Signals(signum).name}: stopping after step {run.step + 1}; Ctrl-C again to "
                      f"stop at once", file=sys.stderr, flush=True)

        for signum in (signal.SIGINT, signal.SIGTERM):
            handlers[signum] = signal.signal(signum, on_signal)
    try:
        yield run
    except RewardError as e:
        raise RewardError(_failed_step(run, e, save)) from e
    except WorkerFailed as e:  # the rollout worker is gone (async_rollout): the trainer's state is saved first
        raise WorkerFailed(_failed_step(run, e, save), step=e.step, exitcode=e.exitcode, restarts=e.restarts) from e
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        try:
            if on_exit is not None:
                on_exit()
        finally:
            if run.telemetry is not None:
                run.telemetry.close()


def _failed_step(run: Run, error: Exception, save: Callable[[Run, int], Path]) -> str:
    """The message of an error in step ``run.step + 1``, after checkpointing the last step done (one process)."""
    step = run.step + 1
    if run.world.world_size > 1:
        kept = f"; the last checkpoint is {run.last_saved}" if run.last_saved is not None else ""
        return (f"step {step}: {error} (no checkpoint written: under {run.world.world_size} processes a checkpoint "
                f"needs every process{kept})")
    if run.step > run.start_step and run.saved_step != run.step and run.boundary is not None:
        data, rngs = run.boundary
        run.order.load_state_dict(data)  # the step's start, as the checkpoint of the step before it saw it
        set_rng_state(rngs)
        _save(run, run.step, save)
    if run.last_saved is None:
        return f"step {step}: {error} (no step done: no checkpoint)"
    return f"step {step}: {error} (checkpoint of step {run.saved_step}: {run.last_saved}; continue with --resume auto)"
