"""fastrl: fused kernels, a C++ sampler and a lean trainer for DPO- and GRPO-family training."""

from fastrl import _extension, ops, sampling
from fastrl.sampling import sample

__version__ = "0.1.0.dev0"

__all__ = ["__version__", "ops", "sample", "sampling"]
