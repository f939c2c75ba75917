"""Shared pieces of the benchmark suites: scale (CPU or GPU shapes), timing and what each result records.

Every benchmark goes through :func:`measure`, which stores in the pytest-benchmark JSON
``extra_info`` of the result:

- ``median_s``: pytest-benchmark's median wall-clock time of one call (synchronised on CUDA); on
  CUDA also ``cuda_median_s``, the median of ``triton.testing.do_bench`` (CUDA events);
- ``peak_extra_bytes``: the memory above the starting point at the peak of one call (CUDA
  allocator peak on GPU, peak RSS on CPU);
- ``bytes_moved`` / ``flops`` (set by the suite: the fewest bytes the op must move through memory,
  or its useful FLOPs), and from them ``achieved_bytes_per_s`` / ``achieved_flops`` and, on a GPU
  with known limits (``device.py``), ``fraction_of_peak`` (datasheet) and
  ``fraction_of_measured`` (ceilings measured on this project's machines);
- ``device_name``; on GPU with nvidia-ml-py: ``nvml`` = mean SM / memory clocks, peak power and
  temperature sampled while the benchmark ran;
- at the end of the session (``pytest_benchmark_update_json``): ``time_ratio_to`` and
  ``memory_ratio_to``, this contender's median time (peak memory) over each other contender's of
  the same group, all measured in this one process.

``FASTRL_BENCH_SCALE=gpu`` selects real shapes on CUDA. Rounds: as many as fit
``--benchmark-max-time`` seconds per benchmark (measured from the warm-up call), at least
``--benchmark-min-rounds`` and at most the suite's ``rounds``.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import pytest
import torch

import device as _device

SCALE = os.environ.get("FASTRL_BENCH_SCALE", "cpu")
DEVICE = "cuda" if SCALE == "gpu" else "cpu"

if SCALE == "gpu" and not torch.cuda.is_available():
    raise pytest.UsageError("FASTRL_BENCH_SCALE=gpu needs a CUDA device")

_PEAKS = _device.peaks() if DEVICE == "cuda" else None
_DEVICE_NAME = _device.device_name()


def synchronized(fn):
    """On CUDA, wait for the device so the wall-clock time covers the kernels."""
    if DEVICE != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _rss_peak() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_extra_bytes(step) -> int | None:
    """Memory above the starting point at the peak of one run of ``step``: the CUDA allocator's peak
    on GPU; on CPU the peak resident set size (Linux: VmHWM, reset through /proc/self/clear_refs).
    None where neither can be read."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS to the current RSS
    except OSError:
        return None
    base = _rss_peak()
    step()
    peak = _rss_peak()
    return None if base is None or peak is None else max(0, peak - base)


class _NvmlSampler:
    """Samples clocks, power and temperature every ``period`` seconds on a thread while it is open."""

    def __init__(self, period: float = 0.02):
        self.period = period
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if DEVICE == "cuda" and _device.nvml_snapshot():
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(_device.nvml_snapshot())
            self._stop.wait(self.period)

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {}
        out = {"samples": len(self.samples)}
        for key, how in (("sm_clock_mhz", statistics.mean), ("mem_clock_mhz", statistics.mean),
                         ("power_w", max), ("temperature_c", max)):
            values = [s[key] for s in self.samples if key in s]
            if values:
                name = {"power_w": "max_power_w", "temperature_c": "max_temperature_c"}.get(key, f"mean_{key}")
                out[name] = round(how(values), 1)
        return out


def _rounds(benchmark, seconds_per_call: float, max_rounds: int) -> int:
    budget = getattr(benchmark, "_max_time", 1.0)
    low = getattr(benchmark, "_min_rounds", 3)
    return max(low, min(max_rounds, int(budget / max(seconds_per_call, 1e-9))))


def measure(benchmark, fn, *, group: str, info: dict, rounds: int = 20, memory: bool = True,
            bytes_moved: float | None = None, flops: float | None = None) -> None:
    """Time ``fn`` (no arguments) with pytest-benchmark and record what the module docstring lists.

    ``info`` must hold ``op`` and ``contender``; ``bytes_moved`` / ``flops`` are the op's fewest bytes
    through memory / useful FLOPs, for the achieved rate and its fraction of the device's limit.
    """
    step = synchronized(fn)
    start = time.perf_counter()
    step()  # warm-up: compilation, autotuning, allocator
    first = time.perf_counter() - start
    start = time.perf_counter()
    step()
    warm = time.perf_counter() - start
    extra = dict(info, device=DEVICE, device_name=_DEVICE_NAME, torch=torch.__version__)
    if memory:
        extra["peak_extra_bytes"] = peak_extra_bytes(step)
    if bytes_moved is not None:
        extra["bytes_moved"] = bytes_moved
    if flops is not None:
        extra["flops"] = flops
    benchmark.group = group
    with _NvmlSampler() as sampler:
        benchmark.pedantic(step, rounds=_rounds(benchmark, warm, rounds), warmup_rounds=0, iterations=1)
        if DEVICE == "cuda":
            import triton.testing

            extra["cuda_median_s"] = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    extra["first_call_s"] = first
    if benchmark.stats is not None:
        extra["median_s"] = benchmark.stats.stats.median
    if sampler.summary():
        extra["nvml"] = sampler.summary()
    seconds = extra.get("cuda_median_s") or extra.get("median_s")
    if seconds:
        for amount, rate, peak_key, measured_key in ((bytes_moved, "achieved_bytes_per_s", "hbm_bytes_per_s",
                                                      "measured_bytes_per_s"),
                                                     (flops, "achieved_flops", "bf16_flops", "measured_flops")):
            if amount is None:
                continue
            extra[rate] = amount / seconds
            if _PEAKS is not None and _PEAKS.get(peak_key):
                extra["fraction_of_peak"] = extra[rate] / _PEAKS[peak_key]
                extra["peak"] = {"label": _PEAKS["label"], peak_key: _PEAKS[peak_key]}
                if _PEAKS.get(measured_key):
                    extra["fraction_of_measured"] = extra[rate] / _PEAKS[measured_key]
    benchmark.extra_info.update(extra)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu_only: contender that exists only on CUDA")


# A GPU visit is short: `make gpu-all` sets FASTRL_BENCH_DEADLINE (Unix seconds) and the benchmarks that would
# start after it are skipped, so the suite still ends normally and writes the JSON of those that ran.
def pytest_runtest_setup(item):
    deadline = float(os.environ.get("FASTRL_BENCH_DEADLINE") or "inf")
    if time.time() > deadline:
        pytest.skip(f"the time budget of this run (FASTRL_BENCH_DEADLINE) ended {time.time() - deadline:.0f} s ago")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastrl_device"] = _device.info()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Ratios between the contenders of each group, all timed in this process."""
    groups: dict[str, list[dict]] = {}
    for b in output_json["benchmarks"]:
        groups.setdefault(b["group"], []).append(b)
    for members in groups.values():
        for b in members:
            mine = b["extra_info"]
            others = [o for o in members if o is not b and "contender" in o["extra_info"]]
            b["extra_info"]["time_ratio_to"] = {
                o["extra_info"]["contender"]: b["stats"]["median"] / o["stats"]["median"]
                for o in others if o["stats"]["median"] > 0}
            mem = {}
            for o in others:
                theirs = o["extra_info"].get("peak_extra_bytes")
                if (mine.get("peak_extra_bytes") or 0) > 0 and (theirs or 0) > 0:
                    mem[o["extra_info"]["contender"]] = mine["peak_extra_bytes"] / theirs
            if mem:
                b["extra_info"]["memory_ratio_to"] = mem
