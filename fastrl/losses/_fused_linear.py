"""What the fused-linear losses share: a terminal loss whose gradients are computed in its forward.

A loss on the log-probs of ``hidden @ weight.T`` is the last node of the graph, so its gradients
with respect to ``hidden``, ``weight`` and ``bias`` can be computed as soon as the loss is: the
forward of :class:`_Terminal` does all the work and stores them, and its backward hands them on,
scaled by the incoming gradient (``loss.backward()`` passes 1). Logits are never held whole: the
passes over the vocabulary are those of :mod:`fastrl.ops.fused_linear_logprobs`.
"""

from __future__ import annotations

import torch

from fastrl.ops.fused_linear_logprobs import logprobs_backward_op as _linear_logprobs_backward
from fastrl.ops.fused_linear_logprobs import terminal_single_pass, token_chunks
from fastrl.ops.fused_linear_logprobs import logprobs_op as _linear_logprobs


def grads_wanted(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def token_logprobs(hidden, weight, bias, labels, *, temperature, ignore_index, need_entropy, workspace_bytes):
    """Forward only: ``(logp [N], entropy [N] or None)`` of flat ``hidden [N, H]``, ``labels [N]``."""
    with torch.no_grad():
        logp, entropy, _ = _linear_logprobs(hidden, weight, bias, labels, temperature, ignore_index, need_entropy,
                                            workspace_bytes)
    return logp, entropy if need_entropy else None


def two_pass(hidden, weight, bias, labels, loss_fn, *, temperature, ignore_index, need_entropy, workspace_bytes,
             chunks=None):
    """Log-probs (one pass over the vocabulary), the loss and its gradient with respect to them
    (autograd over ``loss_fn(logp [N], entropy [N] or None) -> (loss, metrics)``, cheap: no
    vocabulary), then the logits recomputed slice by slice into the weight gradients (second pass).
    When the scored rows fit one chunk of the workspace (``chunks``, default
    :func:`~fastrl.ops.fused_linear_logprobs.token_chunks`), their logits are kept between the two
    halves instead: three GEMMs, not four. Rows labelled ``ignore_index`` go through no GEMM.
    Returns ``(loss, metrics, d_hidden, d_weight, d_bias or None)``."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    if chunks is None:
        chunks = token_chunks(labels, ignore_index, vocab, hidden.device, workspace_bytes)
    if len(chunks) == 1:
        found = {}

        def token_grads(idx, logp, entropy):
            logp_all = torch.zeros(rows, dtype=logp.dtype, device=logp.device)
            logp_all[idx] = logp
            entropy_all = None
            if need_entropy:
                entropy_all = torch.zeros_like(logp_all)
                entropy_all[idx] = entropy
            found["loss"], found["metrics"], d_logp, d_entropy = loss_grads(loss_fn, logp_all, entropy_all,
                                                                               need_entropy)
            return d_logp[idx], None if d_entropy is None else d_entropy[idx]

        with torch.no_grad():
            _, _, d_hidden, d_weight, d_bias = terminal_single_pass(
                hidden, weight, bias, labels, token_grads, temperature=temperature, ignore_index=ignore_index,
                return_entropy=need_entropy, workspace_bytes=workspace_bytes, chunks=chunks)
        return found["loss"], found["metrics"], d_hidden, d_weight, d_bias
    with torch.no_grad():
        logp, entropy, stats = _linear_logprobs(hidden, weight, bias, labels, temperature, ignore_index,
                                                need_entropy, workspace_bytes)
    loss, metrics, d_logp, d_entropy = loss_grads(loss_fn, logp, entropy, need_entropy)
    with torch.no_grad():
        d_hidden, d_weight, d_bias = _linear_logprobs_backward(d_logp, d_entropy, hidden, weight, bias, labels,
                                                               entropy.detach(), stats, temperature, ignore_index,
                                                               workspace_bytes)
    return loss, metrics, d_hidden, d_weight, d_bias if bias is not None else None


def loss_grads(loss_fn, logp, entropy, need_entropy):
    """``(loss, metrics, d_logp, d_entropy or None)``: autograd over ``loss_fn`` alone (no vocabulary)."""
    with torch.enable_grad():
        leaves = [logp.detach().requires_grad_(True)]
        if need_entropy:
            leaves.append(entropy.detach().requires_grad_(True))
        loss, metrics = loss_fn(*leaves, *([] if need_entropy else [None]))
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    d_logp = torch.zeros_like(logp) if grads[0] is None else grads[0]
    d_entropy = grads[1] if need_entropy and grads[1] is not None else None
    return loss.detach(), metrics, d_logp, d_entropy


def terminal(hidden, weight, bias, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``compute()`` -> ``(loss, metrics, d_hidden, d_weight, d_bias or None)``, all without autograd;
    returns ``(loss, metrics)`` with ``loss`` differentiable with respect to the three tensors."""
    metrics: dict[str, torch.Tensor] = {}
    loss = _Terminal.apply(hidden, weight, bias, compute, metrics)
    return loss, metrics


class _Terminal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, compute, metrics_out):
        loss, metrics, d_hidden, d_weight, d_bias = compute()
        metrics_out.update(metrics)
        ctx.grads = (d_hidden, d_weight, d_bias if bias is not None else None)
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("a fused-linear loss hands its stored gradients on once; it cannot be "
                               "backpropagated twice")
        # scaled in place and handed on: no second copy of d_weight
        grads = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.grads]
        ctx.grads = None
        return (*grads, None, None)
