"""fastrl's ops: one module per op (checks, custom-op registration, autograd, dispatch).

Each op runs its Triton kernel on CUDA tensors and its torch reference (:mod:`fastrl.ops.torch_impl`)
on CPU tensors; :func:`backend` / ``FASTRL_BACKEND`` force one or the other (see
:mod:`fastrl.ops.dispatch`).
"""

from fastrl.ops import torch_impl
from fastrl.ops.dispatch import BACKENDS, backend, requested_backend, resolve
from fastrl.ops.fused_linear_logprobs import fused_linear_logprobs
from fastrl.ops.group_advantages import group_advantages
from fastrl.ops.packing import pack_sequences, unpack
from fastrl.ops.selective_logprobs import selective_logprobs
from fastrl.ops.sequence_logps import sequence_logps

__all__ = ["BACKENDS", "backend", "fused_linear_logprobs", "group_advantages", "pack_sequences", "torch_impl",
           "requested_backend", "resolve", "selective_logprobs", "sequence_logps", "unpack"]
