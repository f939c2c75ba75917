"""The machine the benchmarks run on: where its results go, what it is, and its physical limits.

    python benchmarks/device.py     # prints benchmarks/results/<device>/ (GPU name, or CPU model)
"""

from __future__ import annotations

import functools
import os
import platform
import re

import torch

# Datasheet limits of the GPUs fastrl is tuned for: HBM bandwidth (bytes/s) and dense bf16 tensor-core
# throughput (FLOP/s, without 2:4 sparsity; NVIDIA quotes the sparse figure, twice these). Sources:
#   NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100): H100 SXM 3.35 TB/s and
#     1,979 TFLOP/s bf16 with sparsity; H100 NVL 3.9 TB/s and 1,671; H100 PCIe 2.0 TB/s and 1,513.
#   NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200): H200 SXM 4.8 TB/s and
#     1,979 TFLOP/s bf16 with sparsity; H200 NVL 4.8 TB/s and 1,671.
#   NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100): 312 TFLOP/s bf16 dense;
#     80GB SXM 2,039 GB/s, 80GB PCIe 1,935 GB/s, 40GB 1,555 GB/s.
# "measured" are the ceilings seen on this project's lent machines (docs/design.md#performance-method): a large
# device-to-device copy (bytes read + written) and an 8192^3 bf16 matmul through torch.
# Matched in order against torch.cuda.get_device_name() (e.g. "NVIDIA H100 80GB HBM3" is the SXM part).
GPU_PEAKS = [
    # (name pattern, label, HBM bytes/s, bf16 dense FLOP/s, measured bytes/s, measured FLOP/s)
    (r"h200.*nvl", "H200 NVL", 4.8e12, 835e12, None, None),
    (r"h200", "H200 SXM", 4.8e12, 989e12, 4.3e12, 790e12),
    (r"h100.*nvl", "H100 NVL", 3.9e12, 835e12, None, None),
    (r"h100.*pcie", "H100 PCIe", 2.0e12, 756e12, None, None),
    (r"h100", "H100 SXM", 3.35e12, 989e12, 3.0e12, 800e12),
    (r"a100.*sxm.*80", "A100 SXM 80GB", 2.039e12, 312e12, None, None),
    (r"a100.*80", "A100 PCIe 80GB", 1.935e12, 312e12, None, None),
    (r"a100", "A100 40GB", 1.555e12, 312e12, None, None),
]


def device_name() -> str:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                model = next((line.split(":", 1)[1] for line in f if line.startswith("model name")), "")
            name = model.strip() or name
        except OSError:
            pass
        name = f"cpu-{name}-{os.cpu_count()}c"
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-").lower()


def results_dir() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", device_name())


def peaks(gpu_name: str | None = None) -> dict | None:
    """The GPU's limits ``{"label", "hbm_bytes_per_s", "bf16_flops", "measured_bytes_per_s",
    "measured_flops"}`` (None where unknown), or None for a CPU or an unknown GPU."""
    if gpu_name is None:
        if not torch.cuda.is_available():
            return None
        gpu_name = torch.cuda.get_device_name(0)
    for pattern, label, bw, flops, mbw, mflops in GPU_PEAKS:
        if re.search(pattern, gpu_name.lower()):
            return {"label": label, "hbm_bytes_per_s": bw, "bf16_flops": flops, "measured_bytes_per_s": mbw,
                    "measured_flops": mflops}
    return None


@functools.lru_cache(maxsize=None)
def _nvml_handle():
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None, None
    try:
        pynvml.nvmlInit()
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # no driver, no device
        return None, None


def nvml_snapshot() -> dict:
    """SM / memory clocks (MHz), power (W), temperature (C) now, through nvidia-ml-py; {} without it."""
    nv, h = _nvml_handle()
    if h is None:
        return {}
    out = {}
    for key, call in (
        ("sm_clock_mhz", lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
        ("mem_clock_mhz", lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)),
        ("power_w", lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000),
        ("temperature_c", lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
    ):
        try:
            out[key] = call()
        except Exception:
            pass
    return out


def info() -> dict:
    """What the results were measured on: device, versions, the GPU's limits and NVML's static data."""
    out = {"device": device_name(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import fastrl

        out["fastrl"] = getattr(fastrl, "__version__", None)
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                   gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda, peaks=peaks(props.name))
        nv, h = _nvml_handle()
        if h is not None:
            for key, call in (
                ("driver", lambda: nv.nvmlSystemGetDriverVersion()),
                ("max_sm_clock_mhz", lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM)),
                ("max_mem_clock_mhz", lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_MEM)),
                ("power_limit_w", lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000),
            ):
                try:
                    value = call()
                    out[key] = value.decode() if isinstance(value, bytes) else value
                except Exception:
                    pass
    return out


if __name__ == "__main__":
    print(os.path.relpath(results_dir()))
