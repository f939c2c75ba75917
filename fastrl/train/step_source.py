"""Where each online step's completions and rewards come from: this process, or a rollout worker.

GRPO and online DPO run every step as *sample* (rollout and rewards) then *train*. The sampling half
is a :class:`StepProducer`: for step ``s`` and its prompts it generates the completions
(:func:`fastrl.train.online.rollout`, with the step's own generator
:func:`~fastrl.train.online.step_generator`), scores them (:func:`~fastrl.train.online.score_completions`)
and, with GRPO's ``filter_groups``, drops the groups whose completions all scored the same and samples
more prompts until the step's batch is full (:mod:`fastrl.train.dynamic_sampling`, DAPO's dynamic
sampling). The recipe gets each step's :class:`StepSample` from a source:

- :class:`SyncSource` (the default) calls the producer in the trainer's process, between training
  steps; the sample is drawn by the weights of every update so far (version ``s``).
- :class:`AsyncSource` (``async_rollout: {enabled: true, max_staleness: k}``) runs the producer in a
  worker process (:mod:`fastrl.train.async_rollout`) with its own copy of the policy. While the
  trainer trains step ``t``, the worker samples and scores steps ``t+1 .. t+k``; after each
  optimiser step the trainer pushes the changed tensors to it. The sample of step ``s`` is drawn by
  some version ``v`` with ``s - k <= v <= s`` (the worker waits for weights otherwise), its
  *staleness* ``s - v``; with ``k = 0`` the worker samples each step with exactly the weights the
  synchronous run would use, so the run is the synchronous one bit for bit, in two processes.

The data order is the trainer's (``run.order``): the async source reads the prompts of the steps
ahead from a copy of it, and every sample says which prompts it holds, so a checkpoint's data
position is that of the steps trained. The worker's randomness is a function of (seed, step)
(:func:`~fastrl.train.online.step_generator`), so a resumed run samples its next steps as the
uninterrupted one would in synchronous mode; in async mode the batches in flight when the run
stopped are sampled again after the resume, by the resumed weights.

Telemetry, per step: ``async/staleness``, ``async/version``, ``async/trainer_wait_s`` (the trainer
waiting for the batch), ``async/worker_wait_s`` (the worker waiting for weights), ``async/push_s`` /
``async/push_bytes`` (the weight push after the previous step), ``async/pull_s``,
``async/restarts``, ``worker/rollout_s`` / ``worker/reward_s``, and the ``filter/*`` counts of
dynamic sampling (:class:`fastrl.train.dynamic_sampling.FilterStats`).
"""

from __future__ import annotations

import contextlib
import copy
import pickle
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fastrl.train import distributed, rewards as rewards_lib
from fastrl.train.online import Completions, logged_metrics, rollout, score_completions, step_generator

__all__ = ["AsyncSource", "StepProducer", "StepSample", "SyncSource", "step_source", "worker_producer"]


@dataclass
class StepSample:
    """One step's sampled and scored completions on this process.

    Args:
        step: the step (0-based) the sample is for.
        indices: the data rows of the prompts asked for (the data position; dynamic sampling may add
            others, see ``completions.rows``).
        completions: the :class:`~fastrl.train.online.Completions` (prompt-major groups of G).
        rewards: ``[N, R]`` fp32, each reward of each completion.
        logged: what TRL-form rewards logged with ``log_metric`` while scoring.
        baseline: ``[P, R]`` fp32, the greedy completions' rewards (GRPO's remax), or None.
        preferences: a pairwise reward model's ``[N, G]`` preferences (pref_grpo), or None.
        version: the policy version that sampled it (updates in its weights; ``step`` when synchronous).
        metrics: floats for the step's record (``filter/*``, ``worker/*``, ``async/*``).
    """

    step: int
    indices: list[int]
    completions: Completions
    rewards: torch.Tensor
    logged: dict[str, float]
    baseline: torch.Tensor | None = None
    preferences: torch.Tensor | None = None
    version: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


class _Timer:
    """``phase(name)`` for a worker: seconds per phase, taken with :meth:`take`."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def take(self) -> dict[str, float]:
        out = {f"worker/{k}_s": v for k, v in self.seconds.items()}
        self.seconds.clear()
        return out


class StepProducer:
    """Samples and scores one step: ``producer(step, indices) -> StepSample``.

    Args:
        policy: the :class:`~fastrl.train.model.Policy` that samples.
        config: the recipe's config (sampling settings, seed, ``reward_weights``, GRPO's
            ``advantage_estimator`` and ``filter_groups``).
        data: the prompts (:class:`fastrl.train.data.Prompts`).
        rewards: the run's reward functions.
        tokenizer: the tokenizer (rewards read text).
        stop_ids: the ids that end a completion.
        world: the processes (:class:`~fastrl.train.distributed.World`).
        total_steps: the run's step count (rewards may read ``max_steps``).
        phase: a context-manager factory ``phase(name)`` timing ``rollout`` and ``reward``
            (the run's telemetry in the trainer; a local timer in a worker).
        decode: a context-manager factory around the scoring (the trainer's
            :func:`~fastrl.train.online.decode_weights`), or None.
        remax: sample each prompt's greedy completion too and score it (GRPO's remax baseline).
    """

    def __init__(self, policy, config, data, rewards, tokenizer, stop_ids: list[int], world: distributed.World,
                 total_steps: int, *, phase: Callable | None = None, decode: Callable | None = None,
                 remax: bool = False):
        self.policy, self.config, self.data, self.rewards = policy, config, data, rewards
        self.tokenizer, self.stop_ids, self.world, self.total_steps = tokenizer, stop_ids, world, total_steps
        self.timer = None
        if phase is None:
            self.timer = _Timer()
            phase = self.timer.phase
        self.phase = phase
        self.decode = decode or contextlib.nullcontext
        self.remax = remax
        self.filter = config.filter_options() if hasattr(config, "filter_options") else None

    def _sample(self, step: int, attempt: int, indices: list[int]):
        config, world = self.config, self.world
        prompts = [self.data.prompts[i] for i in indices]
        # attempt 0 draws exactly what the synchronous run without dynamic sampling draws
        rank = world.rank if attempt == 0 else world.rank + 1_000 * attempt
        generator = step_generator(config.seed, rank, step, world.device)
        with self.phase("rollout"):
            completions = rollout(self.policy, prompts, indices, config=config, world=world, stop_ids=self.stop_ids,
                                  generator=generator)
            greedy = None
            if self.remax:  # the baseline: each prompt's greedy completion
                greedy = rollout(self.policy, prompts, indices, config=config, world=world, stop_ids=self.stop_ids,
                                 generator=generator, num_samples=1, temperature=0.0)
        with self.phase("reward"):
            with self.decode():
                scores = score_completions(self.rewards, self.data, completions, self.tokenizer,
                                           image=self.policy.image, step=step, max_steps=self.total_steps)
            logged = logged_metrics(self.rewards, world)  # a TRL-form reward's log_metric calls
            baseline = None
            if greedy is not None:
                with self.decode():
                    baseline = score_completions(self.rewards, self.data, greedy, self.tokenizer,
                                                 image=self.policy.image, step=step, max_steps=self.total_steps)
            preferences = rewards_lib.pairwise_preferences(self.rewards)  # a pairwise reward model's, for pref_grpo
        return completions, scores, (logged, baseline, preferences)

    def __call__(self, step: int, indices: list[int]) -> StepSample:
        if self.filter is None:
            completions, scores, (logged, baseline, preferences) = self._sample(step, 0, indices)
            metrics = {}
        else:
            completions, scores, logged, preferences, metrics = self._filtered(step, indices)
            baseline = None
        if self.timer is not None:
            metrics.update(self.timer.take())
        return StepSample(step=step, indices=list(indices), completions=completions, rewards=scores, logged=logged,
                          baseline=baseline, preferences=preferences, version=step, metrics=metrics)

    def _filtered(self, step: int, indices: list[int]):
        from fastrl.train.dynamic_sampling import fill_batch, group_values, keep_groups

        config, group = self.config, self.config.num_generations
        if self.world.world_size > 1:
            raise ValueError("filter_groups: dynamic sampling runs in one process (each process would keep "
                             "different groups); remove filter_groups or run one process")
        names = [r.name for r in self.rewards]

        def keep(scores: torch.Tensor) -> torch.Tensor:
            values = group_values(scores, group, metric=self.filter["metric"], weights=config.reward_weights,
                                  names=names, pass_threshold=config.eval_pass_threshold)
            return keep_groups(values, group)

        def sample(attempt: int, rows: list[int]):
            completions, scores, (logged, _, preferences) = self._sample(step, attempt, rows)
            if preferences is not None:
                raise ValueError("filter_groups: a pairwise reward model's preferences are not kept per group; "
                                 "remove filter_groups or the pairwise reward")
            return completions, scores, logged

        completions, scores, extras, stats = fill_batch(sample, list(indices), needed_groups=len(indices),
                                                        max_tries=self.filter["max_tries"], seed=config.seed,
                                                        step=step, num_examples=len(self.data.prompts), keep=keep)
        logged: dict[str, float] = {}
        for extra in extras:
            logged.update(extra)
        return completions, scores, logged, None, stats.metrics()


def worker_producer(model: torch.nn.Module, config, data, rewards, tokenizer, stop_ids: list[int],
                    total_steps: int, remax: bool):
    """The producer a rollout worker builds around its private copy of the policy's model.

    A module-level function (the worker process imports it); its samples are returned pickled
    (one byte string per step, so that the queue does not open a shared-memory handle per tensor).

    Args:
        model: the worker's copy of the policy's model.
        config, data, rewards, tokenizer, stop_ids, total_steps, remax: as :class:`StepProducer`.

    Returns:
        ``produce(step, indices) -> bytes``, a pickled :class:`StepSample`.
    """
    from fastrl.train.model import Policy, image_adapter

    image = image_adapter(config, model)
    cfg_weight = config.image_options()["cfg_weight"] if image is not None and config.train_logps == "cfg" else 1.0
    policy = Policy(model, compute_dtype=torch.bfloat16 if config.bf16 else None, image=image, cfg_weight=cfg_weight)
    device = next(model.parameters()).device
    world = distributed.World(rank=0, world_size=1, local_rank=0, device=device)
    producer = StepProducer(policy, config, data, rewards, tokenizer, stop_ids, world, total_steps, remax=remax)

    def produce(step: int, indices: list[int]) -> bytes:
        with torch.no_grad():
            return pickle.dumps(producer(step, indices), protocol=pickle.HIGHEST_PROTOCOL)

    return produce


class SyncSource:
    """Each step sampled in this process, by the current weights (the synchronous run).

    Args:
        producer: the :class:`StepProducer`.
    """

    is_async = False

    def __init__(self, producer: StepProducer):
        self.producer = producer

    def get(self, step: int, indices: list[int]) -> StepSample:
        """The sample of ``step`` (0-based) for the prompts ``indices``."""
        return self.producer(step, indices)

    def after_update(self, model: torch.nn.Module, version: int) -> None:
        """Nothing to do: the next step samples with the updated model itself."""

    def close(self) -> None:
        pass


class AsyncSource:
    """Steps sampled ahead by a rollout worker process, with bounded staleness (the module docstring).

    Args:
        run: the :class:`~fastrl.train.run.Run` (after :func:`~fastrl.train.run.resume`: its data order
            and start step are where the worker starts).
        producer: the trainer's :class:`StepProducer` (its settings are sent to the worker).
        options: the config's ``async_rollout`` mapping (:meth:`async_options`).

    Raises:
        ConfigError: the model or a reward cannot be sent to a worker process, naming the field.
    """

    is_async = True

    def __init__(self, run, producer: StepProducer, options: dict[str, Any]):
        from fastrl.train.async_rollout import AsyncRollout, AsyncSetupError
        from fastrl.train.config import ConfigError

        config = run.config
        if run.world.world_size > 1:
            raise ConfigError(f"{type(config).__name__}.async_rollout: the rollout worker runs beside one training "
                              f"process; this run has {run.world.world_size} (run one process, or no async_rollout)")
        self.run, self.k = run, options["max_staleness"]
        self.accumulation = config.gradient_accumulation_steps
        self.ahead = copy.deepcopy(run.order)  # the prompts of the steps ahead, in the trainer's order
        self.next_request = run.start_step
        self.push_s = self.push_bytes = 0.0
        threads = options["threads"]
        if threads is None:
            from fastrl.train import threads as threads_lib

            threads = threads_lib.choose_threads(requested=None, model=run.model, share=2).threads
        self.worker_threads = threads
        for i, reward in enumerate(producer.rewards):  # name the reward that cannot go to the worker
            try:
                pickle.dumps(reward)
            except Exception as e:
                raise ConfigError(f"{type(config).__name__}.async_rollout: reward_funcs[{i}] ({reward.name}) cannot "
                                  f"be sent to the rollout worker process ({type(e).__name__}: {e}); it must pickle: "
                                  f"a module-level function ('module:function' in a config), not a lambda or a "
                                  f"local function") from None
        # the worker reads the sampling settings only: not the in-memory objects the config may hold
        settings = copy.copy(config)
        for name in ("model", "train_data", "eval_data", "tokenizer", "reward_funcs", "reward_model", "callbacks"):
            if hasattr(settings, name) and not isinstance(getattr(settings, name), (str, type(None))):
                object.__setattr__(settings, name, None if name != "reward_funcs" else [])
        args = (settings, producer.data, producer.rewards, producer.tokenizer, producer.stop_ids, run.total_steps,
                producer.remax)
        fields = ("config", "train_data", "reward_funcs", "tokenizer", "stop_token_ids", "max_steps",
                  "advantage_estimator")
        try:
            self.client = AsyncRollout(run.policy.model, worker_producer, args, max_staleness=self.k,
                                       start_version=run.start_step, on_failure=options["on_failure"],
                                       max_restarts=options["max_restarts"], threads=threads,
                                       timeout_s=float(options["timeout_s"]))
        except AsyncSetupError as e:
            where = e.field
            if where.startswith("args["):
                where = fields[int(where[5:-1])]
            raise ConfigError(f"{type(config).__name__}.async_rollout: {where}: {e}") from None
        self.startup_s = getattr(self.client, "startup_s", None)

    def _top_up(self, step: int) -> None:
        last = min(step + self.k + 1, self.run.total_steps - 1)
        while self.next_request <= last:
            indices = [i for _ in range(self.accumulation) for i in self.ahead.next()]
            self.client.request(self.next_request, indices)
            self.next_request += 1

    def get(self, step: int, indices: list[int]) -> StepSample:
        """The sample of ``step`` from the worker (waiting for it), with the async telemetry."""
        with self.run.telemetry.phase("wait"):
            self._top_up(step)
            delivery = self.client.receive(step)
        sample: StepSample = pickle.loads(delivery.payload)
        if sample.step != step or sample.indices != list(indices):
            raise RuntimeError(f"async_rollout: the worker's batch is for step {sample.step} (prompts "
                               f"{sample.indices[:4]}...), the trainer is at step {step} (prompts {indices[:4]}...)")
        sample.version = delivery.version
        staleness = step - delivery.version
        if not 0 <= staleness <= self.k:  # the worker's gate makes this impossible; never train on it silently
            raise RuntimeError(f"async_rollout: step {step} was sampled by version {delivery.version}, staleness "
                               f"{staleness} outside [0, {self.k}]")
        sample.metrics.update({
            "async/staleness": float(staleness), "async/version": float(delivery.version),
            "async/trainer_wait_s": delivery.trainer_wait_s, "async/worker_wait_s": delivery.worker_wait_s,
            "async/pull_s": delivery.pull_s, "async/pull_bytes": float(delivery.pull_bytes),
            "async/produce_s": delivery.produce_s, "async/restarts": float(self.client.restarts),
            "async/push_s": self.push_s, "async/push_bytes": self.push_bytes,
            "async/worker_threads": float(self.worker_threads),
        })
        return sample

    def after_update(self, model: torch.nn.Module, version: int) -> None:
        """Push the weights after an update (``version`` = steps trained) to the worker."""
        self.push_s, self.push_bytes = (float(x) for x in self.client.push(model, version))

    def close(self) -> None:
        self.client.close()


def step_source(run, producer: StepProducer):
    """The run's source of samples: :class:`AsyncSource` with ``async_rollout`` enabled, else :class:`SyncSource`."""
    options = run.config.async_options() if hasattr(run.config, "async_options") else None
    if options is None:
        return SyncSource(producer)
    return AsyncSource(run, producer, options)
