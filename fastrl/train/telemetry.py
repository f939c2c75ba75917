"""What a run reports: a progress bar, ``metrics.jsonl``, TensorBoard / W&B when installed and
asked for, phase timings, throughput, an MFU estimate and device memory / utilisation / power.

Only process 0 writes. Metrics arrive already averaged over processes (the step reduces them).

Besides ``time/<phase>`` (seconds in each phase since the last record), a record holds, when a
reward phase ran, ``time/reward_share``: the reward phase's seconds over the wall-clock seconds since
the last record (the share of the steps spent scoring). On runs whose rewards read images
(:mod:`fastrl.train.rewards`): ``images/decoded`` and ``images/decoded_per_s`` (images decoded to
pixels since the last record, and per second of decoding: the VQ decoder's throughput), and
``images/scored`` and ``images/scored_per_s`` (images scored, counted once per image reward, and per
second spent in those rewards). These counts are this process's (process 0's on a multi-process run).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import resource
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

__all__ = ["IMAGE_STATS", "ImageStats", "Telemetry", "drop_records_after", "flops_per_token", "peak_flops"]

# Dense bf16 tensor-core peaks (FLOP/s), by a substring of the CUDA device name.
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
              "L4": 121e12, "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12}


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """The device's peak FLOP/s for the MFU.

    Args:
        device: the training device; only CUDA devices have a table entry (matched by a substring of
            the device name: H200, H100, A100, L40S, 4090, ...; dense bf16 tensor-core peaks).
        override_tflops: the peak in TFLOP/s, used as given when not None.

    Returns:
        ``override_tflops * 1e12`` if given, else the table's bf16 number for a known GPU, else None
        (no MFU, e.g. on the CPU).
    """
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16.items():
        if key in name:
            return value
    return None


def flops_per_token(model: torch.nn.Module) -> float:
    """Forward FLOPs per token: 2 × the parameters that multiply.

    The parameters that multiply are everything but the input embedding, the lm-head included (an
    lm-head tied to the input embedding is counted, once); training costs 3× this (PaLM's 6N; attention
    scores left out).

    Args:
        model: a transformers model (``get_input_embeddings`` / ``get_output_embeddings``).

    Returns:
        The FLOPs, a float.
    """
    n = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()  # None: a sequence classifier (its score head is counted)
    if head is None or emb is not head.weight:
        n -= emb.numel()
    return 2.0 * n


class ImageStats:
    """Counts and seconds of image work (decoding, scoring) since they were last taken.

    The reward code adds to the process-wide :data:`IMAGE_STATS`; :meth:`Telemetry.log` takes them
    into each record (``images/<kind>`` and ``images/<kind>_per_s``).
    """

    def __init__(self):
        self.counts: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)

    def add(self, kind: str, count: int, seconds: float) -> None:
        """Count ``count`` images of ``kind`` (``"decoded"``, ``"scored"``) done in ``seconds``.

        Args:
            kind: what was done to them.
            count: how many images (>= 0).
            seconds: the time it took (>= 0).
        """
        self.counts[kind] += int(count)
        self.seconds[kind] += float(seconds)

    def take(self) -> dict[str, float]:
        """The metrics since the last call, then zero.

        Returns:
            ``{"images/<kind>": count, "images/<kind>_per_s": count / seconds}`` per kind seen (the
            rate is left out when no time was measured).
        """
        out: dict[str, float] = {}
        for kind, count in self.counts.items():
            out[f"images/{kind}"] = count
            if self.seconds[kind] > 0:
                out[f"images/{kind}_per_s"] = count / self.seconds[kind]
        self.counts.clear()
        self.seconds.clear()
        return out


IMAGE_STATS = ImageStats()  # the process's image counters (fastrl.train.rewards adds to them)


class _NVML:
    def __init__(self, device: torch.device):
        self.handle = None
        if device.type != "cuda" or importlib.util.find_spec("pynvml") is None:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:  # no driver access (containers): report without NVML
            self.handle = None

    def read(self) -> dict[str, float]:
        if self.handle is None:
            return {}
        try:
            util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
            mem = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
            return {"gpu/util_pct": float(util.gpu), "gpu/mem_used_gib": mem.used / 2**30,
                    "gpu/power_w": self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0}
        except Exception:
            return {}


class Telemetry:
    """A run's reporting: phase timings, metrics records and their sinks.

    ``phase(name)`` times a block (synchronising CUDA so that GPU work is charged to the phase
    that queued it); ``log(step, metrics)`` adds the phase breakdown, ``elapsed_s`` (wall-clock
    seconds since the telemetry started: differences between records measure throughput over
    everything a step does, logging included) and device figures and writes every sink;
    ``close()`` flushes them. The sinks: ``metrics.jsonl`` (and ``completions.jsonl``) under
    ``config.output_dir``, a progress bar, TensorBoard / W&B when installed and asked for.

    Args:
        config: the trainer config: ``output_dir``, ``progress``, ``report_to``, ``run_name``.
        total_steps: the run's steps (the progress bar's total).
        device: the training device (CUDA is synchronised around phases and reports memory,
            utilisation and power; the CPU its peak RSS).
        is_main: whether this process writes (only process 0 does); the others only time.
        start_step: the step a resumed run starts at (the progress bar's start); the records of
            later steps in ``metrics.jsonl`` / ``completions.jsonl`` (and TensorBoard's events) are
            dropped, as the run redoes those steps (:func:`drop_records_after`).
    """

    def __init__(self, config, *, total_steps: int, device: torch.device, is_main: bool, start_step: int = 0):
        self.device, self.is_main = device, is_main
        self.started = self.last_log = time.perf_counter()
        IMAGE_STATS.take()  # counts from before this run are not its own
        self.phases: dict[str, float] = defaultdict(float)
        self.out = Path(config.output_dir)
        self.jsonl = self.tb = self.wandb = self.bar = None
        self.nvml = _NVML(device)
        if not is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "completions.jsonl"):  # a resumed run redoes the steps after its checkpoint
            drop_records_after(self.out / name, start_step)
        self.jsonl = open(self.out / "metrics.jsonl", "a", encoding="utf-8")
        if config.progress:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
            except ImportError:
                pass
        for sink in config.report_to:
            if sink == "tensorboard":
                if importlib.util.find_spec("tensorboard") is None:
                    warnings.warn("report_to: tensorboard is not installed; skipped", stacklevel=2)
                    continue
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: the events of the steps a resumed run redoes are dropped
                self.tb = SummaryWriter(log_dir=str(self.out / "tensorboard"),
                                        purge_step=start_step + 1 if start_step else None)
            elif sink == "wandb":
                if importlib.util.find_spec("wandb") is None:
                    warnings.warn("report_to: wandb is not installed; skipped", stacklevel=2)
                    continue
                import wandb

                self.wandb = wandb.init(name=config.run_name, config=config.to_dict(), dir=str(self.out))

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.phases[name] += time.perf_counter() - start

    def device_metrics(self) -> dict[str, float]:
        if self.device.type == "cuda":
            out = {"memory/peak_allocated_gib": torch.cuda.max_memory_allocated(self.device) / 2**30}
            out.update(self.nvml.read())
            return out
        return {"memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Write ``metrics`` (plus ``time/<phase>`` seconds since the last log, ``time/reward_share``,
        the image counters of the module docstring and device figures)."""
        now = time.perf_counter()
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        record.update({f"time/{k}": v for k, v in self.phases.items()})
        if "reward" in self.phases and now > self.last_log:
            record["time/reward_share"] = self.phases["reward"] / (now - self.last_log)
        record.update(IMAGE_STATS.take())
        record["elapsed_s"] = now - self.started
        self.last_log = now
        record.update(self.device_metrics())
        self.phases.clear()
        if not self.is_main:
            return record
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(record, step=step)
        if self.bar is not None:
            shown = {"loss": "loss", "acc": "rewards/accuracies", "margin": "rewards/margins", "tok/s": "tokens_per_s",
                     "reward": "reward/mean", "kl": "kl", "stale": "async/staleness", "wait_s": "async/trainer_wait_s",
                     "dropped": "filter/dropped_groups"}
            self.bar.set_postfix({k: f"{record[v]:.4g}" for k, v in shown.items() if isinstance(record.get(v), float)},
                                 refresh=False)
        return record

    def log_completions(self, step: int, samples: list[dict[str, Any]]) -> None:
        """Append sample completions (one JSON line each, with ``step``) to ``completions.jsonl``."""
        if not self.is_main or not samples:
            return
        with open(self.out / "completions.jsonl", "a", encoding="utf-8") as f:
            for sample in samples:
                f.write(json.dumps({"step": step, **sample}) + "\n")

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def drop_records_after(path: Path, step: int) -> int:
    """Remove from the JSON-lines file ``path`` every record of a step after ``step``.

    Also any line that is not a JSON object with a ``step`` (a line cut short by a crash);
    atomically (a temporary file renamed over it). A missing file is left missing.

    A run resumed from the checkpoint of step ``step`` redoes the steps after it: without this,
    ``metrics.jsonl`` and ``completions.jsonl`` would hold two records of those steps.

    Args:
        path: ``metrics.jsonl`` or ``completions.jsonl``.
        step: the last step whose records are kept (0: none).

    Returns:
        The number of lines removed.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step
            except ValueError:
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v
