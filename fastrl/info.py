"""What this installation of fastrl can run: versions, GPUs and backends (``fastrl info``)."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

import torch

from fastrl import _extension
from fastrl.ops import dispatch

# Optional packages fastrl detects at run time: distribution name -> module name. They are looked
# up, not imported (importing some of them takes seconds or initialises CUDA).
OPTIONAL_PACKAGES = {
    "triton": "triton",
    "transformers": "transformers",
    "flash-attn": "flash_attn",
    "xformers": "xformers",
    "bitsandbytes": "bitsandbytes",
    "liger-kernel": "liger_kernel",
    "trl": "trl",
    "vllm": "vllm",
    "flashinfer-python": "flashinfer",
    "nvidia-ml-py": "pynvml",
}


def package_version(dist: str, module: str) -> str | None:
    """Installed version of ``dist`` if its module ``module`` can be found, else None."""
    from fastrl.train.attention import installed

    if not installed(module):
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def _gpus() -> list[dict[str, Any]]:
    """Name, memory and clocks of each GPU: NVML when present (no CUDA context), else torch."""
    if package_version("nvidia-ml-py", "pynvml"):
        try:
            import pynvml

            pynvml.nvmlInit()
            try:
                gpus = []
                for i in range(pynvml.nvmlDeviceGetCount()):
                    h = pynvml.nvmlDeviceGetHandleByIndex(i)
                    name = pynvml.nvmlDeviceGetName(h)
                    gpus.append({
                        "index": i,
                        "name": name.decode() if isinstance(name, bytes) else name,
                        "memory_gib": round(pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30, 1),
                        "sm_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                        "driver": pynvml.nvmlSystemGetDriverVersion(),
                    })
                return gpus
            finally:
                pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001  (no driver, or NVML unusable: fall back to torch)
            pass
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        prop = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": prop.name, "memory_gib": round(prop.total_memory / 2**30, 1),
                    "capability": f"{prop.major}.{prop.minor}"})
    return out


def collect() -> dict[str, Any]:
    """The report as a dict (what ``fastrl info --json`` prints)."""
    import fastrl

    packages = {dist: package_version(dist, mod) for dist, mod in OPTIONAL_PACKAGES.items()}
    cuda = torch.cuda.is_available()
    return {
        "fastrl": fastrl.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "gpus": _gpus(),
        "cpu_threads": torch.get_num_threads(),
        "backends": {
            "cpp_extension": _extension.available(),
            "cpp_extension_isa": _extension.cpu_isa(),
            "cuda_extension": _extension.cuda_enabled(),
            "triton": packages["triton"] is not None,
            "triton_gpu": packages["triton"] is not None and cuda,
            "requested": _requested_backend(),
            "attention": _attention(cuda),
        },
        "packages": packages,
    }


def _attention(cuda: bool) -> str:
    """The kernel ``attention: auto`` gives packed bf16 batches here: flash, xformers or sdpa."""
    from fastrl.train import attention

    return attention.select("auto", "cuda" if cuda else "cpu", half=True)


def _requested_backend() -> str:
    try:
        return dispatch.requested_backend()
    except ValueError as exc:
        return f"invalid ({exc})"


def format_report(report: dict[str, Any]) -> str:
    """Human-readable form of :func:`collect`'s report."""
    b = report["backends"]
    yes = lambda flag: "yes" if flag else "no"  # noqa: E731
    lines = [
        f"fastrl        {report['fastrl']}",
        f"python        {report['python']}  ({report['platform']})",
        f"torch         {report['torch']}  (CUDA {report['torch_cuda'] or 'none'}; "
        f"{report['cpu_threads']} CPU threads)",
    ]
    if report["gpus"]:
        for g in report["gpus"]:
            extra = ", ".join(f"{k} {v}" for k, v in g.items() if k not in ("index", "name", "memory_gib"))
            lines.append(f"gpu {g['index']}         {g['name']}, {g['memory_gib']} GiB" + (f", {extra}" if extra else ""))
    else:
        lines.append("gpu           none (CPU only: Triton kernels run in the interpreter when forced)")
    lines += [
        "backends",
        f"  C++ extension   {yes(b['cpp_extension'])}" + (f" (CPU loops: {b['cpp_extension_isa']})" if b["cpp_extension"] else
                                                          " - build it: make install"),
        f"  CUDA extension  {yes(b['cuda_extension'])}",
        f"  Triton          {yes(b['triton'])}" + (" (GPU)" if b["triton_gpu"] else " (interpreter only)" if b["triton"] else ""),
        f"  requested       {b['requested']}  (FASTRL_BACKEND or fastrl.ops.backend())",
        f"  attention       {b['attention']}  (packed batches, attention: auto; flash-attn > xformers > sdpa)",
        "optional packages",
    ]
    for dist, version in report["packages"].items():
        lines.append(f"  {dist:<17} {version or '-'}")
    return "\n".join(lines)
