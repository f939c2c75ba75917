"""Processes: one, or several launched by ``torchrun`` and sharded with FSDP2 (``fully_shard``).

NCCL on CUDA, gloo on the CPU (2 CPU processes is how the multi-process path is tested). Every
process reads the same data order and takes its own slice of each micro-batch
(:class:`fastrl.train.run.BatchOrder`); FSDP2 averages gradients over processes, so a loss that is
a mean over examples gives the same step as one process on the whole batch. For a rollout,
:func:`full_weights` holds every FSDP2 unit gathered so that the decoder sees whole weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import weakref

import torch
import torch.distributed as dist
from torch import nn

from fastrl.train.packing import pack

__all__ = ["World", "all_gather_object", "all_reduce", "barrier", "broadcast_object", "close_world", "full_weights",
           "init_world", "gradient_sync", "reduce_metrics", "reshard", "shard"]


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the processes of a run, and its device.

    ``is_main`` is rank 0; ``distributed`` is more than one process.

    Args:
        rank: this process's global rank.
        world_size: the number of processes.
        local_rank: this process's rank on its machine.
        device: this process's device.
    """
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(device: str | None = None) -> World:
    """Join the process group that ``torchrun`` describes in the environment (if any) and pick this process's device.

    Args:
        device: the device; default ``cuda:<LOCAL_RANK>`` when CUDA is there, else CPU.

    Returns:
        The :class:`World`.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return World(rank, world_size, local_rank, dev)


def close_world() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(module: nn.Module, layers: list[nn.Module], world: World) -> nn.Module:
    """FSDP2: each decoder layer its own unit, the rest (embeddings, norm, lm-head) the root's.

    A no-op in one process.

    Args:
        module: the model (the root unit).
        layers: its decoder layers.
        world: the processes.

    Returns:
        ``module``, sharded in place.
    """
    if not world.distributed:
        return module
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(world.device.type, (world.world_size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def reshard(module: nn.Module) -> None:
    """Put every FSDP2 unit of ``module`` back in its sharded state.

    FSDP2 leaves the root unit gathered after a forward (its backward would follow at once); after a
    no-grad forward, e.g. the reference pass, that would keep a replicated copy of its parameters and
    hand an optimiser built afterwards the gathered tensors instead of the sharded parameters.

    Args:
        module: the model.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


_FSDP_READY: weakref.WeakSet = weakref.WeakSet()


@contextlib.contextmanager
def full_weights(policy: nn.Module, world: World):
    """Every FSDP2 unit of ``policy`` gathered for the rollout, and resharded after.

    The units are kept gathered through the prompt prefill's forward (no reshard after forward), so
    that the lean decoder, which calls the layers' sub-modules directly, runs on FSDP2 models too;
    after the block they are resharded, and the units' reshard-after-forward restored. A no-op in one
    process.

    Args:
        policy: a :class:`fastrl.train.model.Policy`.
        world: the processes.

    Yields:
        Nothing: the block runs with the full weights.
    """
    units = []
    if world.distributed:
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in policy.modules() if isinstance(m, FSDPModule)]
        if units and policy not in _FSDP_READY:
            # FSDP2 initialises its units from the root's first forward; unsharding a layer first
            # would make it a root of its own
            with torch.no_grad():
                policy(pack([[0]], [[0]]).to(world.device), lambda hidden, weight, bias: hidden)
            reshard(policy)
            _FSDP_READY.add(policy)
    held = []  # (unit, what to restore or None), filled one unit at a time so a failure restores the ones held
    try:
        for unit in units:
            held.append((unit, None))
            held[-1] = (unit, _hold_gathered(unit))
        yield
    finally:
        for unit, saved in held:
            if saved is not None:
                auto, infos = saved
                state = unit._get_fsdp_state()
                state._auto_reshard_after_forward = auto  # what set_reshard_after_forward changed
                for group, info in zip(state._fsdp_param_groups, infos):
                    group.post_forward_mesh_info = info
            unit.reshard()


def _hold_gathered(unit) -> tuple | None:
    """Gather an FSDP2 unit and keep it gathered after its forwards; returns what to restore (each
    parameter group's post-forward mesh, None being FSDP2's "do not reshard after forward")."""
    state = unit._get_fsdp_state()
    if not (hasattr(state, "_auto_reshard_after_forward") and hasattr(state, "_fsdp_param_groups")):
        # another torch's FSDP2 internals: gather only (its forwards may reshard, and the rollout then
        # takes the HF path, slower but correct)
        unit.unshard()
        return None
    saved = (state._auto_reshard_after_forward, [group.post_forward_mesh_info for group in state._fsdp_param_groups])
    unit.set_reshard_after_forward(False, recurse=False)
    unit.unshard()
    return saved


def gradient_sync(module: nn.Module, enabled: bool) -> None:
    """Under FSDP2, whether the next backward reduce-scatters gradients.

    Off for all but the last micro-batch of a step, so that accumulation communicates once per step.
    A no-op otherwise.

    Args:
        module: the model.
        enabled: reduce-scatter on the next backward.
    """
    set_sync = getattr(module, "set_requires_gradient_sync", None)
    if set_sync is not None:
        set_sync(enabled)


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or mean) over processes, in place; the tensor itself in one process.

    Args:
        tensor: ``[...]`` any shape, a floating or integer dtype the backend reduces.
        op: ``"sum"`` or ``"mean"``.

    Returns:
        ``tensor``, reduced.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        if op == "mean":
            tensor /= dist.get_world_size()
    return tensor


def reduce_metrics(metrics: dict[str, float], device: torch.device, *, summed: tuple[str, ...] | frozenset = (),
                   weight: float | None = None) -> dict[str, float]:
    """A step's metrics over every process, in one collective.

    Each is the mean over processes (weighted by each process's ``weight`` when given); the ``summed`` ones
    (counts) are summed.

    Args:
        metrics: ``{name: float}``, the same names on every process.
        device: where the collective runs (the process's device).
        summed: names that are summed instead of averaged (token counts and the like).
        weight: this process's weight in the means (e.g. its pairs); None: every process weighs 1.

    Returns:
        ``{name: float}``, the same values in one process.
    """
    names = sorted(metrics)
    w = 1.0 if weight is None else float(weight)
    totals = all_reduce(torch.tensor([metrics[k] * (1.0 if k in summed else w) for k in names] + [w],
                                     dtype=torch.float64, device=device)).tolist()
    return {k: float(v) if k in summed else float(v) / totals[-1] for k, v in zip(names, totals)}


def barrier() -> None:
    """Wait for every process, if a process group was joined."""
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` of process ``src`` on every process.

    Args:
        obj: a picklable object (only process ``src``'s is read).
        src: the rank that sends.

    Returns:
        Process ``src``'s ``obj``.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every process's ``obj``, in rank order.

    Args:
        obj: a picklable object.

    Returns:
        A list of ``world_size`` objects (``[obj]`` in one process).
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
