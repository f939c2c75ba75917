"""Checkpoints that a crash cannot corrupt, and a resume that continues bit for bit.

Layout of ``<output_dir>/checkpoints/step-00000042/``::

    model.safetensors    full (unsharded) weights under the Hugging Face names
    config.json          the model config (with model.safetensors: a from_pretrained directory)
    tokenizer files      when the run has a tokenizer
    optimizer.pt         full optimiser state, keyed by parameter name (any process count can load it)
    trainer_state.pt     scheduler, every process's RNG states, step, data position, counters
    trainer_state.json   the same counters and the config, for people

A LoRA run (``peft_config``) writes its adapter instead of ``model.safetensors``, as peft does:
``adapter/adapter_config.json`` and ``adapter/adapter_model.safetensors``
(``peft.PeftModel.from_pretrained(base_model, checkpoint / "adapter")``); its resume rebuilds the
frozen base from the run's model and loads the adapter (:mod:`fastrl.train.adapters`).

Online DPO with a previous-iterate reference also keeps that reference beside the checkpoint, as
``checkpoints/reference-step-00000042.safetensors`` (:func:`save_reference`, :func:`load_reference`),
written before the checkpoint and removed with it (:func:`prune_reference_files`).

A checkpoint is written under ``step-00000042.tmp`` (files fsynced), then renamed into place — a
rename is atomic — and only then does ``checkpoints/latest`` (also replaced atomically) name it
and are the checkpoints beyond ``keep`` removed (:func:`prunable`): never the one just written, so
``latest`` always names a complete checkpoint; the ``keep - 1`` highest steps below it stay, and a
checkpoint of a later step (a branch abandoned by resuming from an earlier one) goes. A crash
mid-write leaves a ``.tmp`` directory, removed by the next save, and every earlier checkpoint
intact (a crash while a step is saved again leaves its old copy as ``.old``: the next save puts it
back, or removes it once the new one is in place). Under FSDP2 the full state dicts are gathered
collectively (every process calls :func:`save_checkpoint`) and process 0 writes.

``trainer_state.json`` holds the config the run was started with (values JSON cannot write as
:func:`jsonable` names them) and the data's fingerprint: a resume compares them with its own
(:func:`fastrl.train.run.check_output_dir`, :func:`~fastrl.train.run.resume`; :func:`saved_config`
reads them back).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from fastrl.train import distributed
from fastrl.train.adapters import ADAPTER_DIR, is_peft, load_adapter, save_adapter

__all__ = ["checkpoints_after", "find_checkpoint", "jsonable", "load_checkpoint", "load_reference", "prunable",
           "prune_reference_files", "save_checkpoint", "save_reference", "saved_config"]

_PREFIX = "model."  # Policy wraps the Hugging Face model as .model


def jsonable(obj: Any) -> Any:
    """The JSON form of a config value JSON cannot write (``json.dumps(default=jsonable)``).

    A callable (a reward, a decode function) as ``<its name>``, anything else as its ``str``
    (paths). Stable from one process to the next (no object address), so a resumed run's config compares
    equal to its checkpoint's.

    Args:
        obj: the value.

    Returns:
        A string.
    """
    if callable(obj):
        return f"<{getattr(obj, '__qualname__', None) or getattr(obj, '__name__', None) or type(obj).__name__}>"
    return str(obj)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _model_tensors(full: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """HF names, each storage once (tied weights: the later name points at the first)."""
    tensors, tied, seen = {}, {}, {}
    for name, t in full.items():
        name = name.removeprefix(_PREFIX)
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            tied[name] = seen[ident]
            continue
        seen[ident] = name
        tensors[name] = t.contiguous()
    return tensors, tied


def _write_weights(full: dict[str, torch.Tensor], path: Path) -> None:
    """A full model state dict as one safetensors file under the HF names, tied weights stored once
    (the ``tied`` metadata, JSON, names each tied name's source)."""
    from safetensors.torch import save_file

    tensors, tied = _model_tensors(full)
    save_file(tensors, str(path), metadata={"format": "pt", "tied": json.dumps(tied)})


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict (``Policy`` names) of a file :func:`_write_weights` wrote, tied weights restored."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        text = (f.metadata() or {}).get("tied", "{}")
    try:
        tied = json.loads(text)
    except json.JSONDecodeError:  # a reference file from before JSON metadata: a Python dict literal
        import ast

        tied = ast.literal_eval(text)
    for name, source in tied.items():
        tensors[name] = tensors[source]
    return {_PREFIX + k: v for k, v in tensors.items()}


def save_checkpoint(output_dir: str | os.PathLike, step: int, *, policy, optimizer, scheduler,
                    trainer_state: dict[str, Any], config: dict[str, Any], world: distributed.World,
                    keep: int, tokenizer=None) -> Path:
    """Write ``checkpoints/step-<step>`` atomically (see the module docstring); every process calls it.

    Args:
        output_dir: the run's output directory.
        step: the step just ended.
        policy: the :class:`~fastrl.train.model.Policy` (its full state dict is gathered).
        optimizer: the optimiser.
        scheduler: the learning-rate schedule.
        trainer_state: the trainer's state (step, tokens seen, data position, counters), JSON.
        config: the config as a dict, JSON.
        world: the processes.
        keep: how many checkpoints to keep (older ones are removed).
        tokenizer: saved beside the weights when given.

    Returns:
        The checkpoint's directory.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    lora = is_peft(policy.model)  # a LoRA run: the adapter alone (the base is the run's model, frozen)
    model_sd = None if lora else get_model_state_dict(policy, options=options)
    optim_sd = get_optimizer_state_dict(policy, optimizer, options=options)
    rngs = distributed.all_gather_object(rng_state())
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        for old in root.glob("step-*.old"):  # a crash while a step was saved again: the old one is complete
            if old.with_suffix("").exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(old, old.with_suffix(""))
        tmp = root / f"step-{step:08d}.tmp"
        tmp.mkdir()
        if lora:
            save_adapter(policy.model, tmp / ADAPTER_DIR)
        else:
            _write_weights(model_sd, tmp / "model.safetensors")
        policy.model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(optim_sd, tmp / "optimizer.pt")
        torch.save({"scheduler": scheduler.state_dict(), "rng": rngs, "trainer": trainer_state},
                   tmp / "trainer_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "config": config}, indent=2,
                                                           default=jsonable))
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        if final.exists():  # the same step saved again: keep the old one until the new one is in place
            old = root / f"step-{step:08d}.old"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        latest = root / "latest.tmp"
        latest.write_text(final.name)
        os.replace(latest, root / "latest")
        _fsync(root)
        for old in prunable(root, final, keep):
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def _step_of(path: Path) -> int | None:
    """The step of a ``step-<step>`` directory's name, or None for any other name."""
    digits = path.name.removeprefix("step-")
    return int(digits) if path.name.startswith("step-") and digits.isdigit() else None


def prunable(root: Path, final: Path, keep: int) -> list[Path]:
    """The checkpoints under ``root`` that the save of ``final`` removes.

    Kept: ``final`` (the checkpoint just written, which ``latest`` names) and the ``keep - 1``
    highest steps below it. Removed: the other steps below it, and every checkpoint of a later
    step than ``final`` — a run's history ends at the step it just saved, so those belong to an
    abandoned branch (a run resumed from an earlier checkpoint). The result never holds ``final``.

    Args:
        root: ``<output_dir>/checkpoints``.
        final: the checkpoint just written.
        keep: how many checkpoints to keep, ``final`` included (>= 1).

    Returns:
        The directories to remove.
    """
    step = _step_of(final)
    steps = {p: _step_of(p) for p in root.glob("step-*") if p.is_dir() and p != final}
    earlier = sorted((p for p, s in steps.items() if s is not None and s < step), key=steps.get)
    later = [p for p, s in steps.items() if s is not None and s > step]
    return earlier[:max(len(earlier) - (keep - 1), 0)] + sorted(later)


def checkpoints_after(output_dir: str | os.PathLike, step: int) -> list[Path]:
    """The checkpoints of ``output_dir`` later than ``step``, their reference files included.

    They are an abandoned branch when a run resumes from ``step``. Not the ``.tmp`` debris of a
    crash (the next save removes it).

    Args:
        output_dir: the run's output directory.
        step: the step resumed from.

    Returns:
        The paths, by step.
    """
    root = Path(output_dir) / "checkpoints"
    found = []
    for p in root.glob("step-*"):
        s = _step_of(p)
        if s is not None and s > step:
            found.append((s, p))
    for p in root.glob("reference-step-*.safetensors"):
        s = _step_of(Path(p.name.removeprefix("reference-").removesuffix(".safetensors")))
        if s is not None and s > step:
            found.append((s, p))
    return [p for _, p in sorted(found)]


def saved_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The config (and trainer state) a checkpoint was written with, from its ``trainer_state.json``.

    Args:
        path: the checkpoint's directory.

    Returns:
        The ``trainer_state.json`` mapping (``config``, ``step``, ``data_fingerprint``, ...), or None
        when the file is missing or unreadable.
    """
    try:
        return json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def find_checkpoint(output_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """The checkpoint to resume from, or None when there is none.

    ``resume`` itself if it is a directory; for ``"auto"`` the one ``checkpoints/latest`` names, else
    the highest complete ``step-*``.

    Args:
        output_dir: the run's output directory.
        resume: a checkpoint directory, ``"auto"``, or None (no resume).

    Returns:
        The checkpoint's directory, or None.
    """
    if resume is None:
        return None
    if resume != "auto":
        return Path(resume)
    root = Path(output_dir) / "checkpoints"
    latest = root / "latest"
    if latest.is_file() and (root / latest.read_text().strip() / "trainer_state.pt").is_file():
        return root / latest.read_text().strip()
    complete = sorted(p for p in root.glob("step-*") if p.suffix == "" and (p / "trainer_state.pt").is_file())
    return complete[-1] if complete else None


def load_checkpoint(path: str | os.PathLike, *, policy, optimizer, scheduler,
                    world: distributed.World) -> dict[str, Any]:
    """Restore weights, optimiser, scheduler and this process's RNG from ``path``; every process calls it.

    Args:
        path: the checkpoint's directory.
        policy: the :class:`~fastrl.train.model.Policy` to load into.
        optimizer: the optimiser to load into.
        scheduler: the schedule to load into.
        world: the processes.

    Returns:
        The trainer state (step, data position, counters).

    Raises:
        FileNotFoundError: ``path`` is not a complete checkpoint.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    path = Path(path)
    lora = is_peft(policy.model)  # a LoRA run's checkpoint holds the adapter, not the whole model
    weights = f"{ADAPTER_DIR}/adapter_model.safetensors" if lora else "model.safetensors"
    for name in (weights, "optimizer.pt", "trainer_state.pt"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"resume: {path} is not a complete checkpoint (no {name})")
    options = StateDictOptions(full_state_dict=True)
    if lora:
        load_adapter(policy.model, path / ADAPTER_DIR)
    else:
        set_model_state_dict(policy, _read_weights(path / "model.safetensors"), options=options)
    optim_sd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    # a parameter no step has given a gradient (e.g. an image run's lm-head) has no optimiser state to restore
    set_optimizer_state_dict(policy, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True, strict=False))
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    scheduler.load_state_dict(state["scheduler"])
    rngs = state["rng"]
    set_rng_state(rngs[world.rank] if world.rank < len(rngs) else rngs[0])
    return state["trainer"]


# ---------------------------------------------------------------------------------------------- reference

def _reference_file(output_dir: str | os.PathLike, step: int) -> Path:
    """Where :func:`save_reference` keeps the reference of the checkpoint at ``step``."""
    return Path(output_dir) / "checkpoints" / f"reference-step-{step:08d}.safetensors"


def save_reference(reference, output_dir: str | os.PathLike, step: int, world: distributed.World) -> None:
    """Write the (previous-iterate) reference model of the checkpoint at ``step``, atomically, before it.

    Every process calls it (its full state dict is gathered collectively).

    Args:
        reference: the reference model.
        output_dir: the run's output directory.
        step: the checkpoint's step.
        world: the processes.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(reference, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if world.is_main:
        path = _reference_file(output_dir, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        _write_weights(state, tmp)
        os.replace(tmp, path)
    distributed.barrier()


def load_reference(reference, checkpoint: str | os.PathLike) -> None:
    """Restore into ``reference`` the model :func:`save_reference` kept beside ``checkpoint``.

    Args:
        reference: the reference model to load into.
        checkpoint: the checkpoint's directory.

    Raises:
        FileNotFoundError: the reference file is missing.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    checkpoint = Path(checkpoint)
    path = checkpoint.parent / f"reference-{checkpoint.name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"resume: {path} is missing; it holds the previous-iterate reference of "
                                f"{checkpoint.name}")
    set_model_state_dict(reference, _read_weights(path), options=StateDictOptions(full_state_dict=True))


def prune_reference_files(output_dir: str | os.PathLike) -> None:
    """Remove the reference files of checkpoints no longer kept (run by process 0 after a save).

    Args:
        output_dir: the run's output directory.
    """
    root = Path(output_dir) / "checkpoints"
    kept = {p.name for p in root.glob("step-*") if p.is_dir()}
    for f in root.glob("reference-step-*.safetensors"):
        if f.name.removeprefix("reference-").removesuffix(".safetensors") not in kept:
            f.unlink(missing_ok=True)
