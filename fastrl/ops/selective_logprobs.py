"""Log-prob of the chosen token at every position, with the entropy, straight from the logits.

>>> import torch
>>> from fastrl.ops import selective_logprobs
>>> logits = torch.randn(2, 5, 1000, requires_grad=True)
>>> labels = torch.randint(0, 1000, (2, 5))
>>> logp, entropy = selective_logprobs(logits, labels, temperature=0.9, return_entropy=True)
>>> (logp.sum() + 0.01 * entropy.sum()).backward()
>>> logp.shape, logits.grad.shape
(torch.Size([2, 5]), torch.Size([2, 5, 1000]))
"""

from __future__ import annotations

import torch

from fastrl import _checks
from fastrl.ops import torch_impl
from fastrl.ops.dispatch import resolve

__all__ = ["selective_logprobs"]

_BLOCK = 4096  # vocabulary block per loop step on the GPU (fp32 registers: 16 per thread at 8 warps)
_NUM_WARPS = 8
_INTERPRETER_BLOCK = 128  # small blocks keep the CPU interpreter quick and exercise the loop


def _launch_config(device: torch.device, vocab: int) -> dict:
    if device.type == "cpu":
        return {"BLOCK": min(_INTERPRETER_BLOCK, max(16, 1 << (vocab - 1).bit_length()))}
    return {"BLOCK": min(_BLOCK, max(128, 1 << (vocab - 1).bit_length())), "num_warps": _NUM_WARPS}


def row_stats(logits, labels, temperature, ignore_index, return_entropy):
    """(logp, entropy, stats) of each row of a 2-D ``logits`` (entropy 0 unless asked).

    The forward of :func:`selective_logprobs` without its checks (the caller checked): the Triton
    kernel, or :func:`fastrl.ops.torch_impl.selective_logprobs` on the torch backend.

    Args:
        logits: ``[N, V]`` fp32, bf16 or fp16, rows of stride ``logits.stride(0)``, unit column stride.
        labels: ``[N]`` int64 or int32, in ``[0, V)`` or ``ignore_index``.
        temperature: > 0; the logits are divided by it.
        ignore_index: label of the rows that get 0 (log-prob and entropy).
        return_entropy: compute the entropy (else it is zeros).

    Returns:
        ``(logp [N], entropy [N], stats [N, 2])`` fp32; ``stats`` = (max of logits / T, log of the
        sum of exp(logits / T - max)), what :func:`grad_logits` needs.
    """
    if resolve(logits.device) == "torch":
        return torch_impl.selective_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                            return_entropy=return_entropy)  # entropy zeros unless asked
    from fastrl.kernels import launch
    from fastrl.kernels.selective_logprobs import selective_logprobs_fwd_kernel

    rows, vocab = logits.shape
    logp = torch.empty(rows, dtype=torch.float32, device=logits.device)
    entropy = torch.zeros_like(logp)
    stats = torch.empty(rows, 2, dtype=torch.float32, device=logits.device)
    if rows:
        launch(selective_logprobs_fwd_kernel, (rows,), logits, labels, logp, entropy, stats, vocab,
               logits.stride(0), 1.0 / temperature, ignore_index, RETURN_ENTROPY=return_entropy,
               **_launch_config(logits.device, vocab))
    return logp, entropy, stats


@torch.library.custom_op("fastrl::selective_logprobs", mutates_args=())
def _forward(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int,
             return_entropy: bool, inplace_backward: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return row_stats(logits, labels, temperature, ignore_index, return_entropy)


@_forward.register_fake
def _(logits, labels, temperature, ignore_index, return_entropy, inplace_backward):
    rows = logits.shape[0]
    f32 = torch.float32
    return logits.new_empty(rows, dtype=f32), logits.new_empty(rows, dtype=f32), logits.new_empty(rows, 2, dtype=f32)


def grad_logits(grad_logp, grad_entropy, logits, labels, entropy, stats, temperature, ignore_index, out):
    """Writes d logits into ``out`` (which may be ``logits`` itself: each block is read, then written).

    The backward of :func:`selective_logprobs` without its checks, from what :func:`row_stats`
    returned.

    Args:
        grad_logp: ``[N]`` fp32, the gradient of the log-probs.
        grad_entropy: ``[N]`` fp32, the gradient of the entropies, or None (no entropy term).
        logits: ``[N, V]`` fp32, bf16 or fp16, as given to :func:`row_stats`.
        labels: ``[N]`` int64 or int32, as given to :func:`row_stats` (a label outside ``[0, V)``
            that is not ``ignore_index`` adds no one-hot term: the vocabulary-slice backward uses it).
        entropy: ``[N]`` fp32 from :func:`row_stats`.
        stats: ``[N, 2]`` fp32 from :func:`row_stats`.
        temperature: the forward's temperature.
        ignore_index: the forward's ignore index (those rows get a zero gradient).
        out: ``[N, V]`` floating (``logits``' dtype, or the model's for the fused-linear path), the
            gradient's destination.

    Returns:
        Nothing: the gradient is in ``out``.
    """
    if resolve(logits.device) == "torch":
        out.copy_(torch_impl.selective_logprobs_backward(grad_logp, grad_entropy, logits, labels, entropy, stats,
                                                        temperature=temperature, ignore_index=ignore_index))
        return
    from fastrl.kernels import launch
    from fastrl.kernels.selective_logprobs import selective_logprobs_bwd_kernel

    rows, vocab = logits.shape
    if rows:
        launch(selective_logprobs_bwd_kernel, (rows,), out, grad_logp.contiguous(),
               grad_logp if grad_entropy is None else grad_entropy.contiguous(), logits, labels, entropy, stats,
               vocab, logits.stride(0), out.stride(0), 1.0 / temperature, ignore_index,
               HAS_GRAD_ENTROPY=grad_entropy is not None, **_launch_config(logits.device, vocab))


@torch.library.custom_op("fastrl::selective_logprobs_backward", mutates_args=())
def _backward(grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None, logits: torch.Tensor,
              labels: torch.Tensor, entropy: torch.Tensor, stats: torch.Tensor, temperature: float,
              ignore_index: int) -> torch.Tensor:
    out = torch.empty_like(logits)
    grad_logits(grad_logp, grad_entropy, logits, labels, entropy, stats, temperature, ignore_index, out)
    return out


@_backward.register_fake
def _(grad_logp, grad_entropy, logits, labels, entropy, stats, temperature, ignore_index):
    return torch.empty_like(logits)


@torch.library.custom_op("fastrl::selective_logprobs_backward_", mutates_args=("logits",))
def _backward_inplace(grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None, logits: torch.Tensor,
                      labels: torch.Tensor, entropy: torch.Tensor, stats: torch.Tensor, temperature: float,
                      ignore_index: int) -> None:
    """d logits written over ``logits``: no second [rows, V] buffer."""
    grad_logits(grad_logp, grad_entropy, logits, labels, entropy, stats, temperature, ignore_index, logits)


@_backward_inplace.register_fake
def _(grad_logp, grad_entropy, logits, labels, entropy, stats, temperature, ignore_index):
    return None


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, return_entropy, inplace_backward = inputs
    _, entropy, stats = output
    ctx.save_for_backward(logits, labels, entropy, stats)
    ctx.set_materialize_grads(False)  # an unused entropy output then skips its backward work
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.inplace = inplace_backward


def _autograd_backward(ctx, grad_logp, grad_entropy, grad_stats):  # stats carry no gradient
    logits, labels, entropy, stats = ctx.saved_tensors
    if grad_logp is None:
        grad_logp = torch.zeros_like(entropy)
    args = (grad_logp, grad_entropy, logits, labels, entropy, stats, ctx.temperature, ctx.ignore_index)
    if ctx.inplace:
        _backward_inplace(*args)
        grad = logits
    else:
        grad = _backward(*args)
    return grad, None, None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def selective_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                       ignore_index: int = -100, return_entropy: bool = False, inplace_backward: bool = False):
    """Log-prob of ``labels`` under ``softmax(logits / temperature)``, position by position.

    Args:
        logits: ``[..., V]`` fp32, bf16 or fp16 (any leading shape; the last dimension contiguous
            avoids a copy).
        labels: ``[...]`` int64 or int32, each in ``[0, V)`` or ``ignore_index``.
        temperature: > 0; the logits are divided by it.
        ignore_index: label value of positions to skip: they get log-prob 0, entropy 0 and no gradient.
        return_entropy: also return the entropy of ``softmax(logits / temperature)`` (differentiable).
        inplace_backward: write the logits gradient over ``logits`` instead of a new tensor (saves a
            ``[..., V]`` buffer; ``logits`` holds the gradient after backward, so nothing else may
            need its values).

    Returns:
        ``logp [...]`` fp32, and ``entropy [...]`` fp32 when asked. One pass over the logits with an
        online log-sum-exp in fp32 (Triton on CUDA); never an fp32 copy of the ``[..., V]`` logits.

    Raises:
        TypeError: ``logits`` or ``labels`` not a tensor, a non-number ``temperature``, a non-int
            ``ignore_index``, a non-bool ``return_entropy`` / ``inplace_backward``.
        ValueError: a wrong dtype, device or shape (``labels`` must be ``logits``' shape without its
            last dimension), an empty vocabulary, ``temperature <= 0``, a label outside ``[0, V)`` that
            is not ``ignore_index`` (this value check reads the labels; skipped under ``torch.compile``).
    """
    _checks.check_tensor("logits", logits, dtypes=_checks.FLOAT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got shape {tuple(logits.shape)}")
    vocab = logits.shape[-1]
    temperature, ignore_index = _checks.check_token_labels(labels, logits.shape[:-1], logits.device, vocab,
                                                           temperature, ignore_index, "logits")
    _checks.check_bool("return_entropy", return_entropy)
    _checks.check_bool("inplace_backward", inplace_backward)

    flat = logits.reshape(-1, vocab)
    overlapping = flat.shape[0] > 1 and flat.stride(0) < vocab  # e.g. expanded rows
    if flat.stride(-1) != 1 or (inplace_backward and overlapping):
        flat = flat.contiguous()  # the in-place gradient needs one buffer slot per element
    logp, entropy, _ = _forward(flat, labels.reshape(-1).contiguous(), temperature, ignore_index, return_entropy,
                                inplace_backward)
    logp = logp.view(labels.shape)
    return (logp, entropy.view(labels.shape)) if return_entropy else logp
