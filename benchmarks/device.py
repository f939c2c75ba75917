"""Where results of this machine go: prints benchmarks/results/<device>/ (GPU name, or CPU model)."""

from __future__ import annotations

import os
import platform
import re

import torch


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


if __name__ == "__main__":
    print(os.path.relpath(results_dir()))
