"""Log-probs (and entropy) of chosen tokens from hidden states and the lm-head weight, without a
``[tokens, V]`` logits tensor.

>>> import torch
>>> from fastrl.ops import fused_linear_logprobs
>>> hidden = torch.randn(2, 6, 64, requires_grad=True)
>>> weight = torch.randn(500, 64, requires_grad=True)
>>> labels = torch.randint(0, 500, (2, 6))
>>> logp, entropy = fused_linear_logprobs(hidden, weight, labels, return_entropy=True)
>>> logp.sum().backward()
>>> hidden.grad.shape, weight.grad.shape
(torch.Size([2, 6, 64]), torch.Size([500, 64]))

The forward runs over token chunks: the logits of one chunk, ``[chunk, V]`` in fp32, are the only
vocabulary-sized buffer (the workspace, ``chunk * V * 4`` bytes capped by ``workspace_bytes``), and
each chunk's log-probs come from the :mod:`selective_logprobs` kernels (online log-sum-exp, entropy).
The backward recomputes the logits one slice at a time, turns the slice into its gradient in place
(the same kernels) and multiplies it into the two weight gradients. Two gradients need a sum over
slices, and that sum runs in fp32, so the backward slices along whichever axis makes the fp32
accumulator smaller:

- fewer tokens than vocabulary entries (the usual case: 16k tokens, V = 152k): vocabulary slices
  ``[tokens, v]``; each slice's ``d_weight`` rows come from one GEMM over all tokens (fp32
  accumulation inside the GEMM, written once in the weight's dtype) and ``d_hidden`` is summed over
  slices in an fp32 ``[tokens, H]`` buffer;
- otherwise token slices ``[t, V]``; ``d_hidden`` rows come from one GEMM each and ``d_weight`` is
  summed in an fp32 ``[V, H]`` buffer.

Peak extra memory: the gradients themselves, ``min(tokens, V) * H * 4`` bytes of accumulator, and
1.5x the workspace (the fp32 slice and its copy in the model's dtype for the GEMMs).
"""

from __future__ import annotations

import functools

import torch

from fastrl import _checks
from fastrl.ops.selective_logprobs import _grad_logits, _row_stats

__all__ = ["check_inputs", "fused_linear_logprobs", "terminal_single_pass"]

DEFAULT_WORKSPACE_BYTES = 1 << 30  # fp32 chunk logits on the GPU; CPU uses 64 MiB


@functools.cache
def _mm_has_out_dtype(device_type: str) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for bf16 inputs on this device type."""
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device_type)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result (fp32 accumulation) whatever the input dtype."""
    if a.dtype == torch.float32:
        return a @ b.float()
    if _mm_has_out_dtype(a.device.type):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with fp32 accumulation, without an fp32 copy of a or b on CUDA."""
    if a.dtype != torch.float32 and _mm_has_out_dtype(a.device.type):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # cuBLAS: C = A B + C in place
            return
        except (RuntimeError, TypeError):
            acc += torch.mm(a, b, out_dtype=torch.float32)
            return
    acc.addmm_(a.float(), b.float())


def _chunk_rows(rows: int, vocab: int, device: torch.device, workspace_bytes: int | None) -> int:
    budget = workspace_bytes or (DEFAULT_WORKSPACE_BYTES if device.type == "cuda" else 64 << 20)
    return max(1, min(rows, budget // (4 * vocab)))


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = _mm_fp32(h, weight.t())
    if bias is not None:
        out += bias.float()
    return out


@torch.library.custom_op("fastrl::fused_linear_logprobs", mutates_args=())
def _forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
             temperature: float, ignore_index: int, return_entropy: bool,
             workspace_bytes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, vocab = hidden.shape[0], weight.shape[0]
    logp = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    entropy = torch.zeros_like(logp)
    stats = torch.empty(rows, 2, dtype=torch.float32, device=hidden.device)
    step = _chunk_rows(rows, vocab, hidden.device, workspace_bytes)
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        lp, ent, st = _row_stats(_logits(hidden[lo:hi], weight, bias), labels[lo:hi], temperature, ignore_index,
                                 return_entropy)
        logp[lo:hi], entropy[lo:hi], stats[lo:hi] = lp, ent, st
    return logp, entropy, stats


@_forward.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, return_entropy, workspace_bytes):
    rows = hidden.shape[0]
    f32 = torch.float32
    return hidden.new_empty(rows, dtype=f32), hidden.new_empty(rows, dtype=f32), hidden.new_empty(rows, 2, dtype=f32)


@torch.library.custom_op("fastrl::fused_linear_logprobs_backward", mutates_args=())
def _backward(grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None, hidden: torch.Tensor,
              weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, entropy: torch.Tensor,
              stats: torch.Tensor, temperature: float, ignore_index: int,
              workspace_bytes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, vocab = hidden.shape[0], weight.shape[0]
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device)
    if rows < vocab:
        d_hidden, d_weight = _backward_vocab_slices(grad_logp, grad_entropy, hidden, weight, bias, labels, entropy,
                                                    stats, temperature, ignore_index, workspace_bytes, d_bias)
    else:
        d_hidden, d_weight = _backward_token_slices(grad_logp, grad_entropy, hidden, weight, bias, labels, entropy,
                                                    stats, temperature, ignore_index, workspace_bytes, d_bias)
    return d_hidden, d_weight, d_bias.to(bias.dtype if bias is not None else weight.dtype)


def _backward_token_slices(grad_logp, grad_entropy, hidden, weight, bias, labels, entropy, stats, temperature,
                           ignore_index, workspace_bytes, d_bias):
    rows, vocab = hidden.shape[0], weight.shape[0]
    d_hidden = torch.empty_like(hidden)
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    step = _chunk_rows(rows, vocab, hidden.device, workspace_bytes)
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        h = hidden[lo:hi]
        d_logits = _logits(h, weight, bias)  # recomputed, then overwritten by its gradient
        _grad_logits(grad_logp[lo:hi], None if grad_entropy is None else grad_entropy[lo:hi], d_logits,
                     labels[lo:hi], entropy[lo:hi], stats[lo:hi], temperature, ignore_index, d_logits)
        d_low = d_logits.to(hidden.dtype)  # the two GEMMs run in the model's dtype
        d_hidden[lo:hi] = d_low @ weight
        _accumulate_fp32(d_weight, d_low.t(), h)
        if bias is not None:
            d_bias += d_logits.sum(0)
    return d_hidden, d_weight.to(weight.dtype)


def _backward_vocab_slices(grad_logp, grad_entropy, hidden, weight, bias, labels, entropy, stats, temperature,
                           ignore_index, workspace_bytes, d_bias):
    rows, vocab = hidden.shape[0], weight.shape[0]
    d_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    d_weight = torch.empty_like(weight)
    step = _chunk_rows(vocab, rows, hidden.device, workspace_bytes)
    # a label outside the slice scores no one-hot term; -1 (or -2) is never a column and never ignore_index
    outside = -1 if ignore_index != -1 else -2
    ignored = labels == ignore_index
    for lo in range(0, vocab, step):
        hi = min(vocab, lo + step)
        w = weight[lo:hi]
        d_logits = _logits(hidden, w, None if bias is None else bias[lo:hi])
        local = torch.where((labels >= lo) & (labels < hi), labels - lo, outside)
        local = torch.where(ignored, ignore_index, local)
        _grad_logits(grad_logp, grad_entropy, d_logits, local, entropy, stats, temperature, ignore_index, d_logits)
        d_low = d_logits.to(hidden.dtype)
        torch.mm(d_low.t(), hidden, out=d_weight[lo:hi])  # fp32 accumulation inside the GEMM
        _accumulate_fp32(d_hidden, d_low, w)
        if bias is not None:
            d_bias[lo:hi] = d_logits.sum(0)
    return d_hidden.to(hidden.dtype), d_weight


@_backward.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, labels, entropy, stats, temperature, ignore_index,
      workspace_bytes):
    return (torch.empty_like(hidden), torch.empty_like(weight),
            torch.empty_like(bias) if bias is not None else weight.new_empty(weight.shape[0]))


def terminal_single_pass(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         labels: torch.Tensor, token_grads, *, temperature: float, ignore_index: int,
                         return_entropy: bool, workspace_bytes: int = 0):
    """Log-probs and the gradients of a terminal loss in one pass over token slices.

    For a loss whose gradient at each token depends only on that token's log-prob and entropy (a
    token-level GRPO loss: per-token terms times weights fixed by the mask), the gradient of the
    logits is known as soon as a slice's log-probs are: ``token_grads(lo, hi, logp, entropy)``
    returns ``(d_logp, d_entropy or None)`` for rows ``lo:hi``, and the slice's logits become their
    gradient in place and go straight into ``d_hidden`` and ``d_weight`` (an fp32 ``[V, H]``
    accumulator over several slices; one GEMM, written once, when one slice holds every row). Three GEMMs in all, the cost of a plain linear layer forward and backward.

    ``hidden [N, H]``, ``labels [N]`` flat and checked by the caller. Returns
    ``(logp, entropy, d_hidden, d_weight, d_bias)``; ``entropy`` is zeros unless asked, ``d_bias``
    None without a bias.
    """
    rows, vocab = hidden.shape[0], weight.shape[0]
    logp = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    entropy = torch.zeros_like(logp)
    d_hidden = torch.empty_like(hidden)
    step = _chunk_rows(rows, vocab, hidden.device, workspace_bytes or None)
    one_slice = 0 < rows <= step  # then d_weight is one GEMM, written once: no fp32 [V, H] accumulator
    d_weight = None if one_slice else torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    d_bias = None if bias is None else torch.zeros(vocab, dtype=torch.float32, device=weight.device)
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        h, lab = hidden[lo:hi], labels[lo:hi]
        logits = _logits(h, weight, bias)
        lp, ent, st = _row_stats(logits, lab, temperature, ignore_index, return_entropy)
        logp[lo:hi], entropy[lo:hi] = lp, ent
        g_lp, g_ent = token_grads(lo, hi, lp, ent if return_entropy else None)
        _grad_logits(g_lp, g_ent, logits, lab, ent, st, temperature, ignore_index, logits)
        d_low = logits.to(hidden.dtype)
        d_hidden[lo:hi] = d_low @ weight
        if one_slice:
            d_weight = (d_low.t() @ h).to(weight.dtype)
        else:
            _accumulate_fp32(d_weight, d_low.t(), h)
        if d_bias is not None:
            d_bias += logits.sum(0)
    if d_weight is None:  # no rows
        d_weight = torch.zeros_like(weight)
    return logp, entropy, d_hidden, d_weight.to(weight.dtype), None if d_bias is None else d_bias.to(bias.dtype)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, return_entropy, workspace_bytes = inputs
    _, entropy, stats = output
    ctx.save_for_backward(hidden, weight, bias, labels, entropy, stats)
    ctx.set_materialize_grads(False)  # an unused entropy output then skips its backward work
    ctx.args = (temperature, ignore_index, workspace_bytes)


def _autograd_backward(ctx, grad_logp, grad_entropy, grad_stats):  # stats carry no gradient
    hidden, weight, bias, labels, entropy, stats = ctx.saved_tensors
    if grad_logp is None:
        grad_logp = torch.zeros_like(entropy)
    d_hidden, d_weight, d_bias = _backward(grad_logp, grad_entropy, hidden, weight, bias, labels, entropy, stats,
                                           *ctx.args)
    return d_hidden, d_weight, (d_bias if bias is not None else None), None, None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          bias: torch.Tensor | None = None, *, temperature: float = 1.0, ignore_index: int = -100,
                          return_entropy: bool = False, workspace_bytes: int | None = None):
    """``selective_logprobs(hidden @ weight.T + bias, labels, ...)`` without the full logits.

    Args:
        hidden: ``[..., H]`` fp32, bf16 or fp16, H divisible by 16.
        weight: ``[V, H]`` same dtype and device (the lm-head).
        labels: ``[...]`` int64/int32 in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]``.
        temperature, ignore_index, return_entropy: as in :func:`fastrl.ops.selective_logprobs`.
        workspace_bytes: cap on the fp32 chunk-logits buffer (default 1 GiB on CUDA, 64 MiB on CPU).

    Returns:
        ``logp [...]`` fp32 (and ``entropy [...]``), differentiable with respect to hidden, weight
        and bias. ``d_weight`` is accumulated in fp32.
    """
    h_size, temperature, ignore_index = check_inputs(hidden, weight, labels, bias, temperature, ignore_index,
                                                     workspace_bytes)
    _checks.check_bool("return_entropy", return_entropy)
    logp, entropy, _ = _forward(hidden.reshape(-1, h_size).contiguous(), weight.contiguous(), bias,
                                labels.reshape(-1).contiguous(), temperature, ignore_index, return_entropy,
                                workspace_bytes or 0)
    logp = logp.view(labels.shape)
    return (logp, entropy.view(labels.shape)) if return_entropy else logp


def check_inputs(hidden, weight, labels, bias, temperature, ignore_index, workspace_bytes) -> tuple[int, float, int]:
    """The checks of :func:`fused_linear_logprobs` (shared with the fused-linear losses): returns
    ``(H, temperature, ignore_index)``."""
    _checks.check_tensor("hidden", hidden, dtypes=_checks.FLOAT_DTYPES)
    if hidden.dim() < 1:
        raise ValueError("hidden must have a last (hidden-size) dimension")
    h_size = hidden.shape[-1]
    if h_size == 0 or h_size % 16:
        raise ValueError(f"hidden size (last dimension of hidden) must be a positive multiple of 16, got {h_size}")
    _checks.check_tensor("weight", weight, ndim=2, dtypes=(hidden.dtype,), device=hidden.device)
    if weight.shape[1] != h_size or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [V, {h_size}] with V >= 1, got {tuple(weight.shape)}")
    vocab = weight.shape[0]
    if bias is not None:
        _checks.check_tensor("bias", bias, ndim=1, device=hidden.device)
        if bias.shape[0] != vocab or not bias.dtype.is_floating_point:
            raise ValueError(f"bias must be a floating tensor of shape [{vocab}], got {tuple(bias.shape)} {bias.dtype}")
    if workspace_bytes is not None:
        _checks.check_int("workspace_bytes", workspace_bytes, low=1)
    temperature, ignore_index = _checks.check_token_labels(labels, hidden.shape[:-1], hidden.device, vocab,
                                                           temperature, ignore_index, "hidden")
    return h_size, temperature, ignore_index
