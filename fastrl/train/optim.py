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
    """The optimiser of ``module``'s trainable parameters, with weight decay on the matrices only.

    ``adamw``: torch's AdamW with its fused kernel where torch has one for ``device``, else the
    foreach one; ``adamw_8bit`` / ``paged_adamw_8bit``: bitsandbytes' 8-bit AdamW. Parameters of
    two or more dimensions get ``weight_decay``; norms and biases (fewer) none.

    Args:
        module: the model, already sharded (FSDP2) when it is.
        config: a trainer config: ``optimizer``, ``learning_rate``, ``weight_decay``,
            ``adam_beta1``, ``adam_beta2``, ``adam_epsilon``.
        device: where the parameters live (picks the fused or foreach AdamW).

    Returns:
        The ``torch.optim.Optimizer`` (one or two parameter groups).

    Raises:
        RuntimeError: some parameters are sharded and some gathered (reshard the model first).
    """
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
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based).

    Args:
        step: the optimiser step, from 0.
        total: the run's optimiser steps.
        warmup: steps of linear warm-up, from ``1 / (warmup + 1)`` up to 1.
        kind: ``"constant"``, ``"linear"`` or ``"cosine"``: the decay after the warm-up.
        min_ratio: the multiplier the decay ends at.

    Returns:
        The multiplier, in ``[min_ratio, 1]`` after the warm-up.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, config, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule: a linear warm-up, then constant, linear or cosine decay.

    The decay ends at ``learning_rate * min_lr_ratio`` (:func:`lr_factor` gives the multiplier).

    Args:
        optimizer: the optimiser whose learning rates it sets.
        config: a trainer config: ``warmup_steps``, ``lr_scheduler``, ``min_lr_ratio``.
        total_steps: the run's optimiser steps.

    Returns:
        A ``LambdaLR``; step it once per optimiser step.
    """
    def factor(step: int) -> float:
        return lr_factor(step, total=total_steps, warmup=config.warmup_steps, kind=config.lr_scheduler,
                         min_ratio=config.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class NonFiniteSteps:
    """Counts consecutive skipped steps (non-finite loss or gradient norm); raises after ``limit``.

    ``update`` warns at each skipped step and raises ``FloatingPointError`` at the ``limit``-th in
    a row; its ``state_dict`` goes into a checkpoint.

    Args:
        limit: how many consecutive skipped steps stop the run.
    """

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
    """Clip, then step the optimiser and the schedule unless the loss or the gradient norm is not finite.

    A step whose (process-averaged) ``loss`` or global gradient norm is not finite is skipped (the
    guard counts it). Gradients are zeroed either way.

    Args:
        module: the model whose gradients are clipped (under FSDP2 the norm is the global one).
        optimizer: its optimiser.
        scheduler: its learning-rate schedule, stepped with the optimiser.
        max_grad_norm: the clipping threshold; 0 or less: no clipping (the norm is still measured).
        loss: ``[]`` (or any shape) floating, the step's loss; a non-finite entry skips the step.
        guard: the :class:`NonFiniteSteps` that counts skipped steps.
        step: the step number, for the guard's messages.

    Returns:
        ``(grad_norm, stepped)``: the gradient norm before clipping (a float) and whether the
        optimiser stepped.

    Raises:
        FloatingPointError: from the guard, when this skip is the ``limit``-th in a row.
    """
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
