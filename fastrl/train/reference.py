"""Reference log-probs for DPO: per batch from a frozen model (live), or once for the whole
dataset before training (precomputed, the default) and cached on disk.

Both run the same no-grad forward, :func:`fastrl.train.model.pair_logps`: the :class:`~fastrl.train.model.Policy`
forward with a head that takes the completion tokens' log-probs with
:func:`fastrl.ops.fused_linear_logprobs` and sums them per sequence with
:func:`fastrl.ops.sequence_logps` (LD-DPO weights included) — the ops of
:func:`fastrl.losses.precompute_reference_logps`, inside the policy's forward so that the same code
runs sharded under FSDP2. The cache file is keyed by a hash of the tokenised data, the reference
model (weights of a random initialisation, or the weight files of a model directory) and every
setting that changes the numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch

from fastrl.train import distributed
from fastrl.train.model import pair_logps

__all__ = ["cache_key", "model_fingerprint", "precompute_pair_logps"]


def model_fingerprint(path: str | None, model: torch.nn.Module | None) -> str:
    """Identity of reference weights, for the cache key.

    For a model directory, its config and the name, size and modification time of each weight file
    (hashing tens of GB would cost more than it saves); for a model built in memory, the bytes of
    every tensor of its state dict.

    Args:
        path: the model directory, or None for a model built in memory.
        model: the model built in memory (read when ``path`` is None).

    Returns:
        A sha256 hex digest.
    """
    h = hashlib.sha256()
    if path is not None:
        root = Path(path).resolve()
        h.update(str(root).encode())
        for f in sorted(root.iterdir()):
            if f.suffix in (".safetensors", ".bin", ".pt", ".json"):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(data_fingerprint: str, model_fingerprint: str, settings: dict) -> str:
    """The key of a reference cache file: a hash of the data, the reference weights and the settings.

    Args:
        data_fingerprint: the tokenised data's fingerprint.
        model_fingerprint: :func:`model_fingerprint` of the reference.
        settings: every setting that changes the numbers (JSON-serialisable).

    Returns:
        A sha256 hex digest.
    """
    blob = json.dumps({"format": 1, "data": data_fingerprint, "model": model_fingerprint, "settings": settings},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _load(path: Path, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    table = load_file(str(path))
    if table["chosen"].numel() != n:
        return None
    return table["chosen"], table["rejected"]


def precompute_pair_logps(policy, num_pairs: int, make_batch, *, batch_size: int, cache_dir: str | os.PathLike,
                          key: str, ld_alpha: float | None, world: distributed.World,
                          progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Reference log-probs of every pair, computed once (or read from the cache).

    Processes split the batches; every process runs the same number of forwards (FSDP2 gathers
    parameters collectively), the last ones repeating a batch whose result is dropped. Process 0
    writes the cache file.

    Args:
        policy: the reference :class:`~fastrl.train.model.Policy` (run in eval mode, no grad).
        num_pairs: the pairs of the dataset.
        make_batch: ``make_batch(indices)`` builds the :class:`~fastrl.train.packing.SequenceBatch` of
            those pairs (on the device).
        batch_size: pairs per forward.
        cache_dir: the cache's directory.
        key: the cache key (:func:`cache_key`).
        ld_alpha: LD-DPO's weight, or None.
        world: the processes.
        progress: a tqdm bar on process 0 when tqdm is installed.

    Returns:
        ``(chosen, rejected, cached)``: ``[num_pairs]`` fp32 CPU tensors each, and whether they came
        from the cache.
    """
    from safetensors.torch import save_file

    path = Path(cache_dir) / f"reference-{key[:32]}.safetensors"
    cached = _load(path, num_pairs)
    if cached is not None:
        return cached[0], cached[1], True
    chunks = [list(range(i, min(i + batch_size, num_pairs))) for i in range(0, num_pairs, batch_size)]
    rounds = math.ceil(len(chunks) / world.world_size)
    mine: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []
    bar = None
    if progress and world.is_main:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=rounds, desc="reference log-probs", unit="batch", leave=False)
        except ImportError:
            pass
    was_training = policy.training
    policy.eval()
    for r in range(rounds):
        k = r * world.world_size + world.rank
        indices = chunks[k] if k < len(chunks) else chunks[0]
        chosen, rejected = pair_logps(policy, make_batch(indices), ld_alpha=ld_alpha)
        if k < len(chunks):
            mine.append((indices, chosen.cpu(), rejected.cpu()))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    policy.train(was_training)
    chosen = torch.empty(num_pairs)
    rejected = torch.empty(num_pairs)
    for part in distributed.all_gather_object(mine):
        for indices, c, r in part:
            chosen[indices], rejected[indices] = c, r
    if world.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, str(tmp), metadata={"key": key})
        os.replace(tmp, path)
    distributed.barrier()
    return chosen, rejected, False
