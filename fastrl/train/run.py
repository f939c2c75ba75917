"""What every recipe does around its step: start the run, plan its steps, resume, end each step, finish.

A recipe reads top to bottom with these in order::

    run = start_run(config)                       # processes, seed, tokenizer, model, policy
    ...                                           # the recipe's data, layout, reference, sharding
    plan_steps(run, len(data), "pairs")           # data order and step count
    resume(run)                                   # optimiser, schedule, guard; restored from a checkpoint
    open_telemetry(run)
    try:
        for step in range(run.start_step, run.total_steps):
            started = time.perf_counter()
            ...                                   # the recipe's forwards and backwards
            end_step(run, step + 1, started=started, loss=loss, tokens=tokens, flops=flops,
                     record=lambda: {...})        # optimiser step, counters, log record, checkpoint
        return finish(run)                        # the final checkpoint, if not just saved
    finally:
        run.telemetry.close()
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import torch

from fastrl.train import distributed
from fastrl.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from fastrl.train.config import ConfigError, TrainConfig
from fastrl.train.model import Policy, build_model, freeze_unused, image_adapter, load_tokenizer
from fastrl.train.optim import NonFiniteSteps, build_optimizer, build_scheduler, optimizer_step
from fastrl.train.telemetry import Telemetry, flops_per_token, peak_flops

__all__ = ["BatchOrder", "Run", "TrainResult", "end_step", "finish", "log_due", "open_telemetry", "optimize", "plan_steps", "resume",
           "save", "save_if_due", "start_run", "step_metrics"]


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
        history: the logged records so far.
        last_saved: the last checkpoint written, or None.
    """

    config: TrainConfig
    world: distributed.World
    out: Path                      # config.output_dir
    tokenizer: Any
    model: torch.nn.Module
    vocab_size: int
    policy: Policy
    image: Any = None
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
    # the loop
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    last_saved: Path | None = None

    def autocast(self):
        """bf16 autocast when ``config.bf16``, else a no-op context."""
        if self.config.bf16:
            return torch.autocast(self.world.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def start_run(config: TrainConfig) -> Run:
    """Processes and device, the seed, the tokenizer, the model and its :class:`Policy`.

    The policy is not yet sharded: a recipe copies its reference and checks packing first.

    Args:
        config: the trainer config.

    Returns:
        A :class:`Run` with its first block filled.
    """
    world = distributed.init_world(config.device)
    torch.manual_seed(config.seed)
    source = config.tokenizer or config.model
    if source is not None and config.tokenizer is None and getattr(config, "image_run", False) and not any(
            (Path(source) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        source = None  # an image model saved without a tokenizer: the data are token ids
    tokenizer = load_tokenizer(source)
    model = build_model(config, world.device)
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
               vocab_size=vocab_size, policy=policy, image=image)


def plan_steps(run: Run, num_examples: int, what: str) -> None:
    """The data order over ``num_examples`` training rows and the run's step count.

    The step count is ``max_steps``, else ``num_epochs`` epochs. Sets ``run.order`` and
    ``run.total_steps``.

    Args:
        run: the :class:`Run`.
        num_examples: the training rows.
        what: what the rows are, for the error (examples, pairs, prompts).

    Raises:
        ConfigError: fewer rows than one step takes, naming ``batch_size``.
    """
    config, world = run.config, run.world
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
    are restored from it.

    Args:
        run: the :class:`Run`, its steps planned.
        updates_per_step: optimiser steps per run step (GRPO's μ).

    Returns:
        The checkpoint resumed from, or None.
    """
    config, world = run.config, run.world
    run.optimizer = build_optimizer(run.policy, config, world.device)
    run.scheduler = build_scheduler(run.optimizer, config, run.total_steps * updates_per_step)
    run.guard = NonFiniteSteps(config.max_bad_steps)
    checkpoint = find_checkpoint(run.out, config.resume)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, policy=run.policy, optimizer=run.optimizer, scheduler=run.scheduler,
                                world=world)
        run.start_step, run.tokens_seen = state["step"], state["tokens_seen"]
        run.order.load_state_dict(state["data"])
        run.guard.load_state_dict(state["non_finite"])
    return checkpoint


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
    (seconds), with ``layout`` ``packing_efficiency`` and ``batch_fill``, then ``tflops`` and, when
    the device's peak is known, ``mfu``.

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
    if run.peak:
        record["mfu"] = flops / step_s / (run.peak * run.world.world_size)
    return record


def save(run: Run, step: int) -> Path:
    """Checkpoint ``checkpoints/step-<step>``; every process calls it.

    Weights, optimiser, schedule, RNG and the trainer state (step, tokens seen, data position,
    non-finite guard).

    Args:
        run: the :class:`Run`.
        step: the step just ended (1-based).

    Returns:
        The checkpoint's directory.
    """
    trainer_state = {"step": step, "tokens_seen": run.tokens_seen, "data": run.order.state_dict(),
                     "non_finite": run.guard.state_dict()}
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
        run.last_saved = save(run, step)


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
    4. a checkpoint when due (:func:`save_if_due` with ``save``).

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
    if log_due(run, step):
        entries = record()
        if skipped is None:
            grad_norm, skipped = entries["grad_norm"], entries["skipped"]
        entries.update(step_metrics(run, grad_norm=grad_norm, lr=lr, skipped=skipped, tokens=tokens, step_s=step_s,
                                    flops=flops, layout=layout))
        run.history.append(run.telemetry.log(step, entries))
        if samples is not None and run.config.log_completions:
            run.telemetry.log_completions(step, samples())
    save_if_due(run, step, save)


def finish(run: Run, save: Callable[[Run, int], Path] = save) -> TrainResult:
    """The final checkpoint (unless the last step was just saved, or no step ran) and the result.

    Args:
        run: the :class:`Run`.
        save: the checkpoint function (:func:`save` by default).

    Returns:
        The :class:`TrainResult`.
    """
    if run.total_steps > run.start_step and (run.last_saved is None
                                             or run.last_saved.name != f"step-{run.total_steps:08d}"):
        run.last_saved = save(run, run.total_steps)
    return TrainResult(run.history, run.last_saved, run.policy, run.total_steps - run.start_step)
