"""Optimiser and learning-rate schedule.

AdamW from torch with its fused kernel wherever torch has one for the device (CUDA and the CPU
in torch >= 2.4), else the foreach one; or bitsandbytes' 8-bit AdamW (paged or not) when it is
installed. Weight decay applies to matrices only (not to norms and biases). The schedule is a
linear warm-up then constant, linear or cosine decay to ``learning_rate * min_lr_ratio``.
"""

from __future__ import annotations

import math
import warnings

import torch

__all__ = ["NonFiniteSteps", "build_optimizer", "build_scheduler", "optimizer_step"]


def _fused_supported(device: torch.device) -> bool:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return device.type in _get_fused_kernels_supported_devices()
    except ImportError:
        return device.type == "cuda"


def build_optimizer(module: torch.nn.Module, config, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    sharded = {type(p).__name__ == "DTensor" for p in params}
    if len(sharded) > 1:  # FSDP2 left a unit gathered: the optimiser would miss its sharded parameters
        raise RuntimeError("some parameters are sharded and some gathered; reshard the model "
                           "(fastrl.train.distributed.reshard) before building the optimiser")
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    if config.optimizer == "adamw":
        fast = {"fused": True} if _fused_supported(device) else {"foreach": True}
        return torch.optim.AdamW(groups, **kwargs, **fast)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if config.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, **kwargs)


def lr_factor(step: int, *, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, config, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        return lr_factor(step, total=total_steps, warmup=config.warmup_steps, kind=config.lr_scheduler,
                         min_ratio=config.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class NonFiniteSteps:
    """Counts consecutive skipped steps (non-finite loss or gradient norm); raises after ``limit``."""

    def __init__(self, limit: int):
        self.limit, self.consecutive, self.total = limit, 0, 0

    def update(self, finite: bool, step: int) -> None:
        if finite:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        warnings.warn(f"step {step}: non-finite loss or gradient; the step is skipped "
                      f"({self.consecutive} in a row, {self.total} in all)", RuntimeWarning, stacklevel=3)
        if self.consecutive >= self.limit:
            raise FloatingPointError(f"{self.consecutive} consecutive steps had a non-finite loss or gradient "
                                     f"(max_bad_steps={self.limit}); stopping")

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive, self.total = state["consecutive"], state["total"]


def optimizer_step(module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, *, max_grad_norm: float,
                   loss: torch.Tensor, guard: NonFiniteSteps, step: int) -> tuple[float, bool]:
    """Clip, then step the optimiser and the schedule unless the (process-averaged) ``loss`` or the
    global gradient norm is not finite — then skip the step (the guard counts it). Gradients are
    zeroed either way. Returns ``(grad_norm before clipping, stepped)``."""
    params = [p for p in module.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2: the global norm
        norm = norm.full_tensor()
    norm = float(norm)
    finite = math.isfinite(norm) and bool(torch.isfinite(loss).all())
    if finite:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    guard.update(finite, step)
    return norm, finite
