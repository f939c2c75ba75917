"""A rollout worker process that samples the steps ahead while the trainer trains (bounded staleness).

The trainer and one worker process (``torch.multiprocessing``, *spawn* context) share the policy's
weights through a *shadow*: a full copy of the model in shared memory (:class:`SharedWeights`; on a
GPU the shadow is on the model's device and shared by CUDA IPC), with a version (the number of
training steps whose update is in it) and a lock. After each optimiser step the trainer *pushes* the
trainable tensors (the parameters with ``requires_grad``, in the model's dtype) into the shadow; the
worker builds a private copy of the shadow when it starts and, before each batch, *pulls* the newest
version into it under the lock, then samples from its private copy, so a push never tears a batch
in progress.

Versions and staleness: the batch of step ``s`` (0-based) is produced once the shadow's version is
at least ``s - k`` (``k = max_staleness``), always with the newest weights, so its version ``v``
satisfies ``s - k <= v <= s`` (the trainer pushes version ``s + 1`` only after it received batch
``s``); with ``k = 0`` every batch is sampled by exactly the weights a synchronous run would use.

:class:`AsyncRollout` is the trainer's side::

    rollout = AsyncRollout(model, make_producer, (config, data), max_staleness=1)
    rollout.request(0, indices0); rollout.request(1, indices1)
    delivery = rollout.receive(0)          # Delivery(step=0, version=0, payload=..., ...)
    ...train step 0...
    rollout.push(model, 1)                 # the worker samples the next steps with these weights
    rollout.close()

``make_producer(private_model, *args)`` is a module-level function the worker imports and calls once;
it returns ``producer(step, indices) -> payload``. Results travel in messages of at most a few KiB
(written in one piece, so a killed worker cannot leave half a message in the pipe); a larger pickled
payload goes through a file in ``/dev/shm`` and tensors in a payload through shared memory
(``torch.multiprocessing``'s reductions; use CPU tensors or bytes).

Faults: :meth:`AsyncRollout.receive` watches the worker while it waits. A worker that died is
restarted from the current shadow and given the outstanding requests again (``on_failure="restart"``,
at most ``max_restarts`` times), else :class:`WorkerFailed` is raised; so it is when no batch comes
for ``timeout_s`` seconds. An exception raised by the producer is raised again in the trainer (its own
type when it survives pickling, else a RuntimeError with the worker's traceback). The worker exits by
itself when the trainer's process is gone; :meth:`AsyncRollout.close` (idempotent, also run at
interpreter exit) stops it, terminating it after a grace period.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import itertools
import multiprocessing
import os
import pickle
import queue
import shutil
import signal
import tempfile
import time
import traceback
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.multiprocessing as torch_mp
from multiprocessing.reduction import ForkingPickler

__all__ = ["AsyncRollout", "AsyncSetupError", "Delivery", "SharedWeights", "WorkerFailed"]

_INLINE_BYTES = 3500   # a message up to this size goes through the queue in one write (< PIPE_BUF)
_POLL_S = 0.1          # how often the trainer checks the worker while it waits for a batch
_WORKER_POLL_S = 0.5   # how often the worker checks that the trainer is alive while it waits
_LOCK_POLL_S = 0.5     # how long one attempt at the weights lock waits before checking the other side


class AsyncSetupError(ValueError):
    """A rollout worker cannot be set up as asked.

    Args:
        message: what is wrong.
        field: what it concerns: ``"async_rollout.max_staleness"`` (and the other options),
            ``"make_producer"``, ``"model"``, ``"args[i]"`` (the i-th producer argument; the caller maps it
            to its config field) or ``"trainable"``.
    """

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class WorkerFailed(RuntimeError):
    """The rollout worker died (and was not restarted) or sent no batch in time.

    Attributes:
        step: the step the trainer was waiting for (or the first outstanding one).
        exitcode: the worker's exit code (negative: killed by that signal), None when it was alive.
        restarts: how many times it had been restarted.
    """

    def __init__(self, message: str, *, step: int | None, exitcode: int | None, restarts: int):
        super().__init__(message)
        self.step, self.exitcode, self.restarts = step, exitcode, restarts


class _RemoteTraceback(Exception):
    """The worker's traceback, chained as the cause of an exception raised again in the trainer."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self):
        return f"\n\nThe rollout worker's traceback:\n{self.text}"


@dataclass
class Delivery:
    """One step's batch from the worker, with the timings of its making.

    Args:
        step: the step (0-based) it is for.
        version: the weights' version that produced it (training steps in them), ``step - k <= version <= step``.
        payload: what the producer returned.
        trainer_wait_s: seconds :meth:`AsyncRollout.receive` blocked for it.
        worker_wait_s: seconds the worker waited for the weights of version ``step - k``.
        pull_s: seconds the worker took to copy the newest weights into its model (0 if it had them).
        pull_bytes: bytes it copied.
        produce_s: seconds the producer ran.
        restarts: the worker's restarts so far.
    """

    step: int
    version: int
    payload: Any
    trainer_wait_s: float
    worker_wait_s: float
    pull_s: float
    pull_bytes: int
    produce_s: float
    restarts: int


# ---------------------------------------------------------------------------------------------- weights

def _named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    named = dict(model.named_buffers(remove_duplicate=False))
    named.update(model.named_parameters(remove_duplicate=False))
    return named


def _synchronize(tensors) -> None:
    devices = {t.device for t in tensors if t.device.type == "cuda"}
    for device in devices:
        torch.cuda.synchronize(device)


class SharedWeights:
    """The model's full copy in shared memory (the *shadow*), its version and a lock.

    Built by the trainer and handed to the worker process. The trainer :meth:`push` es the trainable
    tensors after each update; the worker takes a :meth:`private_copy` once, then :meth:`wait_for` s
    the version it needs and :meth:`pull` s the newest tensors into its copy. Every copy runs under
    the lock, so neither side reads half-written tensors. The methods that take ``timeout`` raise
    TimeoutError when the lock (or the version) was not had in time, so that the caller can check
    whether the other process is still alive.

    Args:
        model: the trainer's model (copied; its CPU tensors go to shared memory, CUDA ones stay on their device).
        ctx: the multiprocessing context (spawn).
        trainable: names (``named_parameters`` / ``named_buffers``) of the tensors that change; default
            the parameters with ``requires_grad``.
        version: the version of ``model``'s weights (a resumed run's start step).

    Raises:
        AsyncSetupError: ``trainable`` names a tensor the model does not have (field ``"trainable"``).
    """

    def __init__(self, model: torch.nn.Module, *, ctx, trainable: list[str] | None = None, version: int = 0):
        named = _named_tensors(model)
        if trainable is None:
            trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        missing = [name for name in trainable if name not in named]
        if missing:
            raise AsyncSetupError(f"trainable: the model has no tensor {missing[0]!r}", field="trainable")
        self.names = list(dict.fromkeys(trainable))
        with torch.no_grad():
            shadow = copy.deepcopy(model)
        for p in shadow.parameters():
            p.grad = None
        shadow.share_memory()
        self.shadow = shadow
        self._version = ctx.RawValue("q", int(version))
        self._lock = ctx.Lock()
        self._bell = ctx.Semaphore(0)  # released once per push: wakes a worker waiting for a version

    def renew_lock(self, ctx) -> None:
        """A new lock (the trainer's, when the worker died and may have held the old one)."""
        self._lock = ctx.Lock()
        self._bell = ctx.Semaphore(0)

    @property
    def version(self) -> int:
        """The shadow's version (training steps whose update is in it)."""
        return int(self._version.value)

    @property
    def nbytes(self) -> int:
        """Bytes of the trainable tensors (what a push copies)."""
        named = _named_tensors(self.shadow)
        return sum(named[n].numel() * named[n].element_size() for n in self.names)

    def _acquire(self, timeout: float | None) -> None:
        if timeout is None:
            self._lock.acquire()
        elif not self._lock.acquire(True, max(timeout, 0.0)):
            raise TimeoutError(f"the weights lock was not free within {timeout} s")

    def _pairs(self, source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], what: str):
        pairs = []
        for name in self.names:
            if name not in source:
                raise ValueError(f"{what}: the model has no tensor {name!r} (the trainable tensors of the shadow)")
            a, b = source[name], target[name]
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(f"{what}: {name} is {tuple(a.shape)} {a.dtype}, the shadow's "
                                 f"{tuple(b.shape)} {b.dtype}")
            pairs.append((a, b))
        return pairs

    def push(self, model: torch.nn.Module, version: int, *, timeout: float | None = None) -> tuple[float, int]:
        """Copy ``model``'s trainable tensors into the shadow and set its version (the trainer).

        Args:
            model: the trainer's model (same structure and dtypes as the shadow's).
            version: the version of its weights (training steps done).
            timeout: seconds to wait for the lock (None: as long as it takes).

        Returns:
            ``(seconds, bytes)`` the push took and copied.
        """
        start = time.perf_counter()
        pairs = self._pairs(_named_tensors(model), _named_tensors(self.shadow), "push")
        self._acquire(timeout)
        try:
            with torch.no_grad():
                for source, target in pairs:
                    target.copy_(source.detach())
            _synchronize(t for _, t in pairs)
            self._version.value = int(version)
        finally:
            self._lock.release()
        self._bell.release()
        return time.perf_counter() - start, sum(t.numel() * t.element_size() for _, t in pairs)

    def pull(self, model: torch.nn.Module, have_version: int, *,
             timeout: float | None = None) -> tuple[int, float, int]:
        """Copy the shadow's trainable tensors into ``model`` if they are newer than ``have_version`` (the worker).

        Args:
            model: the worker's private copy.
            have_version: the version in ``model`` now.
            timeout: seconds to wait for the lock.

        Returns:
            ``(version, seconds, bytes)``: the version now in ``model``, the seconds and bytes copied.
        """
        if self.version <= have_version:
            return have_version, 0.0, 0
        start = time.perf_counter()
        pairs = self._pairs(_named_tensors(self.shadow), _named_tensors(model), "pull")
        self._acquire(timeout)
        try:
            version = self.version
            with torch.no_grad():
                for source, target in pairs:
                    target.copy_(source)
            _synchronize(t for _, t in pairs)
        finally:
            self._lock.release()
        return version, time.perf_counter() - start, sum(t.numel() * t.element_size() for _, t in pairs)

    def wait_for(self, version: int, timeout: float | None = None) -> float:
        """Block until the shadow's version is at least ``version`` (the worker).

        Returns:
            the seconds waited.

        Raises:
            TimeoutError: not reached within ``timeout`` seconds.
        """
        start = time.perf_counter()
        deadline = None if timeout is None else start + timeout
        while self.version < version:
            left = None if deadline is None else deadline - time.perf_counter()
            if left is not None and left <= 0:
                raise TimeoutError(f"the weights of version {version} did not come within {timeout} s "
                                   f"(version {self.version})")
            self._bell.acquire(True, left)
        return time.perf_counter() - start

    def private_copy(self, timeout: float | None = None) -> tuple[torch.nn.Module, int]:
        """A copy of the shadow in this process's own memory, and its version (the worker, once)."""
        self._acquire(timeout)
        try:
            with torch.no_grad():
                model = copy.deepcopy(self.shadow)
            _synchronize(model.parameters())
            return model, self.version
        finally:
            self._lock.release()


# ---------------------------------------------------------------------------------------------- worker

class _Orphaned(Exception):
    """The trainer's process is gone: the worker stops."""


def _retry(attempt: Callable[[float], Any], orphaned: Callable[[], bool]):
    """``attempt(timeout)`` until it does not time out; _Orphaned when the trainer died meanwhile."""
    while True:
        try:
            return attempt(_WORKER_POLL_S)
        except TimeoutError:
            if orphaned():
                raise _Orphaned() from None


class _Sender:
    """The worker's side of the result queue: each message pickled here, in one piece of <= 3.5 KiB."""

    def __init__(self, results, spill_dir: str):
        self.results, self.spill_dir = results, spill_dir
        self.count = itertools.count()

    def send(self, message: tuple) -> None:
        blob = ForkingPickler.dumps(message, pickle.HIGHEST_PROTOCOL)
        if len(blob) > _INLINE_BYTES:
            path = os.path.join(self.spill_dir, f"{os.getpid()}-{next(self.count)}.pkl")
            with open(path + ".part", "wb") as f:
                f.write(blob)
            os.replace(path + ".part", path)
            blob = ForkingPickler.dumps(("file", path), pickle.HIGHEST_PROTOCOL)
        self.results.put(bytes(blob))

    def error(self, step: int | None, exc: BaseException) -> None:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:  # the exception itself when it comes back whole
            exc_blob = pickle.dumps(exc, pickle.HIGHEST_PROTOCOL)
            pickle.loads(exc_blob)
        except Exception:
            exc_blob = None
        self.send(("error", step, exc_blob, type(exc).__qualname__, str(exc), text))


def _worker_main(shared: SharedWeights, producer_blob: bytes, max_staleness: int, threads: int | None,
                 requests, results, spill_dir: str) -> None:
    """The worker process: build the producer, then answer requests ``(step, indices)`` in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's; it closes the worker
    parent = multiprocessing.parent_process()
    parent_pid = os.getppid()

    def orphaned() -> bool:
        return os.getppid() != parent_pid or (parent is not None and not parent.is_alive())

    def leave() -> None:  # the trainer is gone: nobody reads or cleans up after this process
        for q in (requests, results):
            q.cancel_join_thread()
        shutil.rmtree(spill_dir, ignore_errors=True)
        os._exit(0)

    sender = _Sender(results, spill_dir)
    try:
        if threads:
            torch.set_num_threads(int(threads))
        make_producer, args = pickle.loads(producer_blob)
        model, have = _retry(lambda t: shared.private_copy(timeout=t), orphaned)
        producer = make_producer(model, *args)
    except _Orphaned:
        leave()
    except BaseException as e:  # a setup error: the trainer raises it
        sender.error(None, e)
        return
    sender.send(("ready", os.getpid(), have))
    while True:
        try:
            item = requests.get(timeout=_WORKER_POLL_S)
        except queue.Empty:
            if orphaned():
                leave()
            continue
        if item is None:  # close()
            results.cancel_join_thread()
            return
        step, indices = item
        try:
            start = time.perf_counter()
            _retry(lambda t: shared.wait_for(step - max_staleness, timeout=t), orphaned)
            worker_wait = time.perf_counter() - start
            have, pull_s, pull_bytes = _retry(lambda t: shared.pull(model, have, timeout=t), orphaned)
            start = time.perf_counter()
            payload = producer(step, indices)
            produce_s = time.perf_counter() - start
            sender.send(("ok", step, have, payload, worker_wait, pull_s, pull_bytes, produce_s))
        except _Orphaned:
            leave()
        except Exception as e:
            sender.error(step, e)


# ---------------------------------------------------------------------------------------------- trainer

class _Worker:
    """What close() needs (no reference to the AsyncRollout, so that exit hooks do not keep it alive)."""

    def __init__(self, spill_dir: str):
        self.process = None
        self.requests = self.results = None
        self.spill_dir = spill_dir
        self.grace_s = 5.0
        self.closed = False

    def stop(self, grace_s: float) -> None:
        """Stop the worker process: a stop request, then SIGTERM and SIGKILL after ``grace_s``."""
        process = self.process
        if process is not None and process.exitcode is None:
            try:
                self.requests.put_nowait(None)
            except Exception:
                pass
            process.join(grace_s)
            if process.exitcode is None:
                process.terminate()
                process.join(2.0)
            if process.exitcode is None:
                process.kill()
                process.join(2.0)
        for q in (self.requests, self.results):
            if q is not None:
                q.cancel_join_thread()
                q.close()
        if process is not None and process.exitcode is not None:
            process.close()
        self.process = self.requests = self.results = None


def _shutdown(worker: _Worker) -> None:
    if worker.closed:
        return
    worker.closed = True
    try:
        worker.stop(worker.grace_s)
    finally:
        shutil.rmtree(worker.spill_dir, ignore_errors=True)


def _spill_dir() -> str:
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    return tempfile.mkdtemp(prefix="fastrl-async-", dir=base)


class _NullFile:
    def write(self, data) -> int:
        return len(data)


class _TensorsAside(ForkingPickler):
    """Pickles everything but the tensors (which travel in shared memory): the check before spawning."""

    def persistent_id(self, obj):
        if isinstance(obj, (torch.Tensor, torch.UntypedStorage, torch.TypedStorage)):
            return id(obj)
        return None


def _pickle_error(obj) -> str | None:
    try:
        _TensorsAside(_NullFile(), pickle.HIGHEST_PROTOCOL).dump(obj)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def _setup_error(field: str, detail: str) -> AsyncSetupError:
    return AsyncSetupError(f"{field} cannot be sent to the rollout worker process ({detail}); it must pickle: "
                           f"module-level functions and classes, no lambdas, local functions or open handles",
                           field=field)


class AsyncRollout:
    """The trainer's side of a rollout worker process (the module docstring).

    Args:
        model: the policy's model (its weights at ``start_version``; the shadow and the worker's copy are made from it).
        make_producer: a module-level function; the worker calls ``make_producer(private_model, *args)`` once and
            then ``producer(step, indices)`` for each request.
        args: the other arguments of ``make_producer`` (pickled; each process has its own copy).
        max_staleness: k, the batch of step s is produced by a version in ``[s - k, s]``.
        start_version: the version of ``model``'s weights (a resumed run's start step).
        on_failure: ``"restart"`` a dead worker (at most ``max_restarts`` times) or ``"stop"`` (WorkerFailed).
        max_restarts: restarts allowed in the rollout's lifetime.
        threads: the worker's ``torch.set_num_threads`` (None: torch's default).
        timeout_s: seconds :meth:`receive` waits without any message from the worker before WorkerFailed
            (the worker's start-up counts; an attribute, it may be changed later).
        trainable: names of the tensors pushed (default: the parameters with ``requires_grad``).

    Raises:
        AsyncSetupError: an option out of range (field ``async_rollout.<name>``), or ``make_producer``, ``model``
            or ``args[i]`` cannot be pickled for the worker (the field names which).
    """

    def __init__(self, model: torch.nn.Module, make_producer: Callable, args: tuple = (), *, max_staleness: int,
                 start_version: int = 0, on_failure: str = "restart", max_restarts: int = 3,
                 threads: int | None = None, timeout_s: float = 600.0, trainable: list[str] | None = None):
        def bad(name: str, message: str):
            raise AsyncSetupError(f"async_rollout.{name}: {message}", field=f"async_rollout.{name}")

        if isinstance(max_staleness, bool) or not isinstance(max_staleness, int) or max_staleness < 0:
            bad("max_staleness", f"must be an integer >= 0 (0: each batch by the newest weights), "
                                 f"got {max_staleness!r}")
        if on_failure not in ("restart", "stop"):
            bad("on_failure", f"must be 'restart' or 'stop', got {on_failure!r}")
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            bad("max_restarts", f"must be an integer >= 0, got {max_restarts!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            bad("threads", f"must be an integer >= 1 or None, got {threads!r}")
        if not timeout_s > 0:
            bad("timeout_s", f"must be > 0 seconds, got {timeout_s!r}")
        if isinstance(start_version, bool) or not isinstance(start_version, int) or start_version < 0:
            raise AsyncSetupError(f"start_version must be an integer >= 0, got {start_version!r}",
                                  field="start_version")

        # everything is checked before a process starts, so that the error is the caller's, not a worker's
        detail = _pickle_error(make_producer)
        if detail is not None:
            raise _setup_error("make_producer", detail)
        args = tuple(args)
        for i, arg in enumerate(args):
            detail = _pickle_error(arg)
            if detail is not None:
                raise _setup_error(f"args[{i}]", detail)
        detail = _pickle_error(model)
        if detail is not None:
            raise _setup_error("model", detail)
        try:  # one pickle for all (objects shared between the arguments stay shared); tensors by value
            producer_blob = pickle.dumps((make_producer, args), pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            where = "args"
            for i, arg in enumerate(args):
                try:
                    pickle.dumps(arg, pickle.HIGHEST_PROTOCOL)
                except Exception:
                    where = f"args[{i}]"
                    break
            raise _setup_error(where, f"{type(e).__name__}: {e}") from None

        self.max_staleness, self.on_failure, self.max_restarts = max_staleness, on_failure, max_restarts
        self.threads, self.timeout_s = threads, float(timeout_s)
        self.restarts = 0
        self.startup_s: float | None = None  # the last worker's seconds from start to ready (None: not yet)
        self._ctx = torch_mp.get_context("spawn")
        try:
            self.shared = SharedWeights(model, ctx=self._ctx, trainable=trainable, version=start_version)
        except AsyncSetupError:
            raise
        except Exception as e:
            raise _setup_error("model", f"copying it: {type(e).__name__}: {e}") from None
        self._producer_blob = producer_blob
        self._outstanding: dict[int, list[int]] = {}  # requested, not yet received: step -> indices
        self._ready: dict[int, tuple] = {}            # received from the worker, not yet taken
        self._worker = _Worker(_spill_dir())
        self._finalizer = weakref.finalize(self, _shutdown, self._worker)
        try:
            self._start()
        except Exception as e:
            self._finalizer()
            raise _setup_error("model", f"starting the worker: {type(e).__name__}: {e}") from None
        self._atexit = functools.partial(_shutdown, self._worker)
        atexit.register(self._atexit)  # after multiprocessing's own exit hook, so it runs first

    # ------------------------------------------------------------------------------------------ process

    def _start(self) -> None:
        worker, ctx = self._worker, self._ctx
        worker.requests, worker.results = ctx.Queue(), ctx.Queue()
        process = ctx.Process(target=_worker_main, name="fastrl-rollout-worker",
                              args=(self.shared, self._producer_blob, self.max_staleness, self.threads,
                                    worker.requests, worker.results, worker.spill_dir))
        self._started = time.perf_counter()
        self.startup_s = None
        process.start()
        worker.process = process

    @property
    def worker_pid(self) -> int | None:
        """The worker process's id (None once closed)."""
        process = self._worker.process
        return None if process is None else process.pid

    @property
    def version(self) -> int:
        """The version of the weights pushed last."""
        return self.shared.version

    @property
    def close_grace_s(self) -> float:
        """Seconds :meth:`close` gives the worker to stop before it is terminated (default 5)."""
        return self._worker.grace_s

    @close_grace_s.setter
    def close_grace_s(self, value: float) -> None:
        self._worker.grace_s = float(value)

    def kill_worker_for_test(self) -> int:
        """SIGKILL the worker (tests of the fault handling); returns its pid."""
        pid = self.worker_pid
        os.kill(pid, signal.SIGKILL)
        self._worker.process.join(10.0)
        return pid

    def _failed(self, step: int | None, why: str, exitcode: int | None) -> WorkerFailed:
        return WorkerFailed(f"async_rollout: the rollout worker {why}", step=step, exitcode=exitcode,
                            restarts=self.restarts)

    def _worker_died(self, step: int | None, waiting_for: str) -> None:
        """The worker is dead: restart it with the outstanding requests, or raise WorkerFailed."""
        worker = self._worker
        process = worker.process
        process.join(1.0)
        code = process.exitcode
        if code is not None and code >= 0:  # it exited by itself: its last messages are whole, read them
            self._drain()
        how = f"exit code {code}"
        if code is not None and code < 0:
            try:
                how += f", {signal.Signals(-code).name}"
            except ValueError:
                pass
        why = f"(pid {process.pid}) died ({how}) while the trainer waited for {waiting_for}"
        if self.on_failure == "stop":
            raise self._failed(step, f"{why}; on_failure is 'stop'", code)
        if self.restarts >= self.max_restarts:
            raise self._failed(step, f"{why}, after {self.restarts} restart(s) (max_restarts {self.max_restarts})",
                               code)
        old_pid = process.pid
        worker.stop(0.0)  # the old queues may hold half a message: never read them again
        for name in os.listdir(worker.spill_dir):
            if name.startswith(f"{old_pid}-"):
                with contextlib.suppress(Exception):
                    os.remove(os.path.join(worker.spill_dir, name))
        self.restarts += 1
        self.shared.renew_lock(self._ctx)  # the dead worker may have held the lock
        self._start()
        for s in sorted(self._outstanding):
            worker.requests.put((s, self._outstanding[s]))

    def _drain(self) -> None:
        while True:
            try:
                blob = self._worker.results.get(timeout=0.05)
            except (queue.Empty, OSError, EOFError, ValueError):
                return
            self._handle(blob)

    def _decode(self, blob: bytes) -> tuple:
        message = pickle.loads(blob)
        if message[0] == "file":
            path = message[1]
            with open(path, "rb") as f:
                data = f.read()
            os.remove(path)
            message = pickle.loads(data)
        return message

    def _handle(self, blob: bytes) -> None:
        message = self._decode(blob)
        kind = message[0]
        if kind == "ready":
            self.startup_s = time.perf_counter() - self._started
        elif kind == "ok":
            step = message[1]
            if step in self._outstanding:  # a step re-requested after a restart arrives once
                del self._outstanding[step]
                self._ready[step] = message
        elif kind == "error":
            _, step, exc_blob, type_name, text, tb = message
            self._outstanding.pop(step, None)
            where = "building the producer" if step is None else f"producing step {step}"
            exc = None
            if exc_blob is not None:
                with contextlib.suppress(Exception):
                    exc = pickle.loads(exc_blob)
            if not isinstance(exc, BaseException):
                raise RuntimeError(f"async_rollout: the rollout worker raised {type_name} while {where}: {text}\n\n"
                                   f"The rollout worker's traceback:\n{tb}")
            if hasattr(exc, "add_note"):
                exc.add_note(f"(raised in the rollout worker while {where})")
            raise exc from _RemoteTraceback(tb)

    # ------------------------------------------------------------------------------------------ API

    def _check_open(self) -> None:
        if self._worker.closed:
            raise RuntimeError("async_rollout: the rollout worker is closed")

    def request(self, step: int, indices: list[int]) -> None:
        """Ask for the batch of ``step`` (the prompts ``indices``); the worker answers in request order.

        Raises:
            ValueError: ``step`` was requested already and not received.
        """
        self._check_open()
        if step in self._outstanding or step in self._ready:
            raise ValueError(f"async_rollout: step {step} is requested already")
        indices = [int(i) for i in indices]
        self._outstanding[step] = indices
        self._worker.requests.put((int(step), indices))

    def receive(self, step: int) -> Delivery:
        """The batch of ``step``, waiting for it (and restarting a dead worker, per ``on_failure``).

        Raises:
            ValueError: ``step`` was not requested.
            WorkerFailed: the worker died (not restarted) or sent nothing for ``timeout_s`` seconds.
            Exception: the producer's exception (its type when it pickles, else RuntimeError).
        """
        self._check_open()
        start = time.perf_counter()
        if step not in self._ready and step not in self._outstanding:
            raise ValueError(f"async_rollout: step {step} was not requested (or was received already)")
        heard = start  # the last message from a (live) worker
        while step not in self._ready:
            try:
                blob = self._worker.results.get(timeout=_POLL_S)
            except queue.Empty:
                now = time.perf_counter()
                if not self._worker.process.is_alive():
                    self._worker_died(step, f"step {step}")
                    heard = time.perf_counter()
                elif now - heard > self.timeout_s:
                    raise self._failed(step, f"(pid {self.worker_pid}) sent no batch for step {step} after "
                                             f"{self.timeout_s:g} s (timeout_s)", None) from None
                continue
            heard = time.perf_counter()
            self._handle(blob)
        _, _, version, payload, worker_wait, pull_s, pull_bytes, produce_s = self._ready.pop(step)
        return Delivery(step=step, version=version, payload=payload, trainer_wait_s=time.perf_counter() - start,
                        worker_wait_s=worker_wait, pull_s=pull_s, pull_bytes=pull_bytes, produce_s=produce_s,
                        restarts=self.restarts)

    def push(self, model: torch.nn.Module, version: int) -> tuple[float, int]:
        """Copy ``model``'s trainable tensors to the worker as ``version`` (training steps in them).

        Returns:
            ``(seconds, bytes)`` of the copy into the shadow.
        """
        self._check_open()
        while True:
            try:
                return self.shared.push(model, version, timeout=_LOCK_POLL_S)
            except TimeoutError:  # the lock is held: by the worker's pull, or by a dead worker
                if not self._worker.process.is_alive():
                    step = min(self._outstanding, default=None)
                    self._worker_died(step, f"the push of version {version}")

    def close(self) -> None:
        """Stop the worker (a stop request, then terminate after a grace period); idempotent."""
        self._finalizer()
        atexit.unregister(self._atexit)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

