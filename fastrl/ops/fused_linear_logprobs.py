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

Only the scored rows (label not ``ignore_index``) go through the lm-head: they are gathered once
(one host sync for their count) and the results scattered back; ignored rows get log-prob 0 and an
exact zero gradient. The forward runs over token chunks: the logits of one chunk, ``[chunk, V]`` in
fp32, are the only vocabulary-sized buffer (the workspace, ``chunk * V * 4`` bytes capped by
``workspace_bytes``), and each chunk's log-probs come from the :mod:`selective_logprobs` kernels
(online log-sum-exp, entropy). Chunks are balanced (:func:`chunk_spans`): token chunks are
multiples of 128 rows and vocabulary slices multiples of 256 columns, so that every GEMM operand and
the workspace have 16-byte aligned leading dimensions. The backward recomputes the logits one slice
at a time, writes their gradient (the same kernels) into a buffer of the model's dtype (over the
fp32 slice itself for fp32 models) and multiplies it into the two weight gradients. Two gradients
need a sum over slices, and that sum runs in fp32, so the backward slices along whichever axis
makes the fp32 accumulator smaller:

- fewer tokens than vocabulary entries (the usual case: 16k tokens, V = 152k): vocabulary slices
  ``[tokens, v]``; each slice's ``d_weight`` rows come from one GEMM over all tokens (fp32
  accumulation inside the GEMM, written once in the weight's dtype) and ``d_hidden`` is summed over
  slices in an fp32 ``[tokens, H]`` buffer;
- otherwise token slices ``[t, V]``; ``d_hidden`` rows come from one GEMM each and ``d_weight`` is
  summed in an fp32 ``[V, H]`` buffer.

One slice holding everything needs no accumulator. Peak extra memory: the gradients themselves,
``min(scored tokens, V) * H * 4`` bytes of accumulator, 1.5x the workspace (the fp32 slice and its
gradient in the model's dtype for the GEMMs) and, for vocabulary slices when some rows are ignored,
a copy of the scored rows of ``hidden`` (freed before the gradient is scattered back): never more
than the ungathered path needed.
"""

from __future__ import annotations

import functools

import torch

from fastrl import _checks
from fastrl.ops.selective_logprobs import grad_logits, row_stats

__all__ = ["check_inputs", "chunk_spans", "fused_linear_logprobs", "pad_hidden_size", "terminal_single_pass",
           "token_chunks"]

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


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b in the inputs' dtype (fp32 accumulation inside the GEMM), into ``out`` when given."""
    return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)


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


TOKEN_ALIGN = 128  # token chunks: multiples of 128 rows
VOCAB_ALIGN = 256  # vocabulary slices: multiples of 256 columns (16-byte aligned leading dimensions)


def workspace_budget(device: torch.device, workspace_bytes: int | None) -> int:
    """Bytes of the fp32 logits workspace: ``workspace_bytes``, else 1 GiB on CUDA and 64 MiB elsewhere.

    Args:
        device: where the pass runs.
        workspace_bytes: the cap asked for; None or 0: the default.

    Returns:
        The budget in bytes.
    """
    return workspace_bytes or (DEFAULT_WORKSPACE_BYTES if device.type == "cuda" else 64 << 20)


def chunk_spans(n: int, width: int, budget: int, align: int) -> list[tuple[int, int]]:
    """Splits ``n`` rows of ``width`` fp32 entries into ``(lo, hi)`` chunks that fit ``budget`` bytes.

    One chunk when everything fits. Otherwise the fewest chunks of at most ``budget // (4 * width)``
    rows, each a multiple of ``align`` (halved while a chunk cannot hold it) except the last, and
    balanced: they differ by at most one ``align`` unit (plus the last one's partial unit), so that a
    12288-row batch is not cut into 1766-row chunks and a short tail.

    Args:
        n: rows to split; ``n <= 0`` gives no chunk.
        width: fp32 entries per row (a row costs ``4 * width`` bytes).
        budget: bytes one chunk may take; a chunk holds at least one row whatever the budget.
        align: a power of two; every chunk but the last is a multiple of it (or of the largest
            power of two below it that fits the budget).

    Returns:
        ``[(lo, hi), ...]``: consecutive half-open row ranges tiling ``[0, n)``.
    """
    if n <= 0:
        return []
    step = max(1, budget // (4 * width))
    if n <= step:
        return [(0, n)]
    unit = align
    while unit > step:
        unit //= 2
    per_chunk = step // unit  # units a chunk may hold
    units = -(-n // unit)
    count = -(-units // per_chunk)
    small, extra = divmod(units, count)  # count - extra chunks of small units, then extra of small + 1
    spans, lo = [], 0
    for i in range(count):
        hi = min(n, lo + (small + (i >= count - extra)) * unit)
        spans.append((lo, hi))
        lo = hi
    return spans


def scored_rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices of the rows whose label is not ``ignore_index``, or None when every row is scored.

    One host sync (the count is data-dependent).

    Args:
        labels: ``[N]`` int64 or int32.
        ignore_index: label of the rows left out.

    Returns:
        ``[S]`` int64 row indices, increasing, or None when S = N.
    """
    sel = (labels != ignore_index).nonzero().squeeze(1)
    return None if sel.numel() == labels.shape[0] else sel


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = _mm_fp32(h, weight.t())
    if bias is not None:
        out += bias.float()
    return out


def _grad_buffer(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where the gradient of fp32 ``logits`` goes: over the logits themselves for an fp32 model, else
    its own buffer in the model's dtype (the dtype the two GEMMs read), written once by the gradient
    kernel: no fp32 write followed by a conversion pass."""
    if dtype == torch.float32:
        return logits
    return torch.empty(logits.shape, dtype=dtype, device=logits.device)


def token_chunks(labels: torch.Tensor, ignore_index: int, vocab: int, device: torch.device,
                 workspace_bytes: int | None) -> list:
    """The token chunks of a pass over flat ``labels``.

    Chunks are balanced multiples of 128 rows (:func:`chunk_spans`) whose fp32 logits fit the
    workspace. Rows labelled ``ignore_index`` go through no GEMM: they are in no chunk. One host
    sync (the number of scored rows is data-dependent).

    Args:
        labels: ``[N]`` int64 or int32, flat.
        ignore_index: label of the rows to leave out.
        vocab: V, the width of a row's logits.
        device: where the pass runs (sets the default workspace).
        workspace_bytes: cap on one chunk's fp32 ``[chunk, V]`` logits; None or 0: 1 GiB on CUDA,
            64 MiB elsewhere.

    Returns:
        A list of row selectors: slices tiling ``[0, N)`` when every row is scored, else ``[chunk]``
        int64 index tensors of the scored rows only.
    """
    sel = scored_rows(labels, ignore_index)
    n = labels.shape[0] if sel is None else sel.numel()
    spans = chunk_spans(n, vocab, workspace_budget(device, workspace_bytes or None), TOKEN_ALIGN)
    return [slice(lo, hi) if sel is None else sel[lo:hi] for lo, hi in spans]


@torch.library.custom_op("fastrl::fused_linear_logprobs", mutates_args=())
def logprobs_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
             temperature: float, ignore_index: int, return_entropy: bool,
             workspace_bytes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, vocab = hidden.shape[0], weight.shape[0]
    logp = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
    entropy = torch.zeros_like(logp)
    stats = torch.zeros(rows, 2, dtype=torch.float32, device=hidden.device)  # ignored rows: unused
    for idx in token_chunks(labels, ignore_index, vocab, hidden.device, workspace_bytes):
        lp, ent, st = row_stats(_logits(hidden[idx], weight, bias), labels[idx], temperature, ignore_index,
                                 return_entropy)
        logp[idx], entropy[idx], stats[idx] = lp, ent, st
    return logp, entropy, stats


@logprobs_op.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, return_entropy, workspace_bytes):
    rows = hidden.shape[0]
    f32 = torch.float32
    return hidden.new_empty(rows, dtype=f32), hidden.new_empty(rows, dtype=f32), hidden.new_empty(rows, 2, dtype=f32)


@torch.library.custom_op("fastrl::fused_linear_logprobs_backward", mutates_args=())
def logprobs_backward_op(grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None, hidden: torch.Tensor,
              weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, entropy: torch.Tensor,
              stats: torch.Tensor, temperature: float, ignore_index: int,
              workspace_bytes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    vocab = weight.shape[0]
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device)
    out_bias_dtype = bias.dtype if bias is not None else weight.dtype
    sel = scored_rows(labels, ignore_index)  # rows labelled ignore_index have zero gradient: no GEMM for them
    scored = labels.shape[0] if sel is None else sel.numel()
    if scored == 0:
        return torch.zeros_like(hidden), torch.zeros_like(weight), d_bias.to(out_bias_dtype)
    if sel is not None:  # the per-row vectors of the scored rows (small)
        grad_logp, labels, entropy, stats = grad_logp[sel], labels[sel], entropy[sel], stats[sel]
        grad_entropy = None if grad_entropy is None else grad_entropy[sel]
    args = (grad_logp, grad_entropy, weight, bias, labels, entropy, stats, temperature, ignore_index, workspace_bytes,
            d_bias)
    if scored < vocab:
        # every vocabulary slice multiplies all the scored rows: gathered once, freed before the scatter
        d_scored, d_weight = _backward_vocab_slices(hidden if sel is None else hidden[sel], *args)
        d_hidden = _scatter_rows(d_scored, sel, hidden)
    else:
        d_hidden, d_weight = _backward_token_slices(hidden, sel, *args)
    return d_hidden, d_weight, d_bias.to(out_bias_dtype)


def _scatter_rows(d_scored: torch.Tensor, sel: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``d_scored`` (fp32 or ``like``'s dtype) as a tensor like ``like``: its rows at ``sel``, zeros elsewhere
    (all rows when ``sel`` is None), converted a block of rows at a time (no second full-size copy)."""
    if sel is None:
        return d_scored.to(like.dtype)
    out = torch.zeros_like(like)
    block = max(1, (32 << 20) // max(1, like.shape[1] * 4))
    for lo in range(0, sel.numel(), block):
        out.index_copy_(0, sel[lo:lo + block], d_scored[lo:lo + block].to(like.dtype))
    return out


def _backward_token_slices(hidden, sel, grad_logp, grad_entropy, weight, bias, labels, entropy, stats, temperature,
                           ignore_index, workspace_bytes, d_bias):
    """Token slices of the scored rows (all rows when ``sel`` is None; else ``hidden``'s rows at ``sel``,
    gathered a slice at a time, the per-row vectors already gathered)."""
    rows, vocab = labels.shape[0], weight.shape[0]
    d_hidden = torch.empty_like(hidden) if sel is None else torch.zeros_like(hidden)
    spans = chunk_spans(rows, vocab, workspace_budget(hidden.device, workspace_bytes), TOKEN_ALIGN)
    one_slice = len(spans) == 1  # then d_weight is one GEMM, written once: no fp32 [V, H] accumulator
    d_weight = None if one_slice else torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for lo, hi in spans:
        h = hidden[lo:hi] if sel is None else hidden[sel[lo:hi]]
        logits = _logits(h, weight, bias)  # recomputed
        d_low = _grad_buffer(logits, hidden.dtype)  # the two GEMMs run in the model's dtype
        grad_logits(grad_logp[lo:hi], None if grad_entropy is None else grad_entropy[lo:hi], logits,
                     labels[lo:hi], entropy[lo:hi], stats[lo:hi], temperature, ignore_index, d_low)
        if sel is None:
            _mm(d_low, weight, out=d_hidden[lo:hi])
        else:
            d_hidden.index_copy_(0, sel[lo:hi], _mm(d_low, weight))
        if one_slice:
            d_weight = _mm(d_low.t(), h)
        else:
            _accumulate_fp32(d_weight, d_low.t(), h)
        if bias is not None:
            d_bias += d_low.sum(0, dtype=torch.float32)
    return d_hidden, d_weight.to(weight.dtype)


def _backward_vocab_slices(hidden, grad_logp, grad_entropy, weight, bias, labels, entropy, stats, temperature,
                           ignore_index, workspace_bytes, d_bias):
    """Vocabulary slices over all rows of ``hidden``; returns ``d_hidden`` (fp32 when summed over several
    slices: the caller converts it) and ``d_weight``."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    d_weight = torch.empty_like(weight)
    spans = chunk_spans(vocab, rows, workspace_budget(hidden.device, workspace_bytes), VOCAB_ALIGN)
    one_slice = len(spans) == 1  # then d_hidden is one GEMM: no fp32 [tokens, H] accumulator
    d_hidden = None if one_slice else torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    # a label outside the slice scores no one-hot term; -1 (or -2) is never a column and never ignore_index
    outside = -1 if ignore_index != -1 else -2
    ignored = labels == ignore_index
    for lo, hi in spans:
        w = weight[lo:hi]
        logits = _logits(hidden, w, None if bias is None else bias[lo:hi])
        local = torch.where((labels >= lo) & (labels < hi), labels - lo, outside)
        local = torch.where(ignored, ignore_index, local)
        d_low = _grad_buffer(logits, hidden.dtype)
        grad_logits(grad_logp, grad_entropy, logits, local, entropy, stats, temperature, ignore_index, d_low)
        _mm(d_low.t(), hidden, out=d_weight[lo:hi])  # fp32 accumulation inside the GEMM
        if one_slice:
            d_hidden = _mm(d_low, w)
        else:
            _accumulate_fp32(d_hidden, d_low, w)
        if bias is not None:
            d_bias[lo:hi] = d_low.sum(0, dtype=torch.float32)
    return d_hidden, d_weight


@logprobs_backward_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, labels, entropy, stats, temperature, ignore_index,
      workspace_bytes):
    return (torch.empty_like(hidden), torch.empty_like(weight),
            torch.empty_like(bias) if bias is not None else weight.new_empty(weight.shape[0]))


def terminal_single_pass(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         labels: torch.Tensor, token_grads, *, temperature: float, ignore_index: int,
                         return_entropy: bool, workspace_bytes: int = 0, chunks: list | None = None):
    """Log-probs and the gradients of a terminal loss in one pass over token chunks.

    For a loss whose gradient at each token depends only on that token's log-prob and entropy (a
    token-level GRPO loss: per-token terms times weights fixed by the mask), or only on values of
    its own chunk (a DPO loss chunked by pairs), the gradient of the logits is known as soon as a
    chunk's log-probs are, and the chunk's logits become their gradient (in the model's dtype) and
    go straight into ``d_hidden`` and ``d_weight`` (an fp32 ``[V, H]`` accumulator over several
    chunks; one GEMM, written once, when one chunk holds every row). Three GEMMs in all, the cost of
    a plain linear layer forward and backward. The inputs are flat and checked by the caller
    (:func:`check_inputs`).

    Args:
        hidden: ``[N, H]`` fp32, bf16 or fp16.
        weight: ``[V, H]``, ``hidden``'s dtype and device (the lm-head).
        bias: ``[V]`` floating, or None.
        labels: ``[N]`` int64 or int32, in ``[0, V)`` or ``ignore_index``.
        token_grads: ``token_grads(rows, logp, entropy) -> (d_logp, d_entropy or None)``, the loss's
            gradient with respect to the log-probs (and entropies) of ``rows`` (a slice or an index
            tensor into the ``N`` rows); ``logp`` / ``entropy`` are that chunk's fp32 values
            (``entropy`` None unless ``return_entropy``).
        temperature: > 0; the logits are divided by it.
        ignore_index: label value of the rows to skip.
        return_entropy: also compute the entropies (and pass them to ``token_grads``).
        workspace_bytes: cap on a chunk's fp32 logits, as in :func:`fused_linear_logprobs`; 0: the
            default.
        chunks: the row chunks (slices tiling ``[0, N)`` or index tensors; rows in no chunk get
            log-prob 0 and zero gradient); default :func:`token_chunks` (the scored rows, in
            balanced chunks that fit the workspace).

    Returns:
        ``(logp, entropy, d_hidden, d_weight, d_bias)``: ``logp [N]`` fp32, ``entropy [N]`` fp32
        (zeros unless asked), ``d_hidden [N, H]`` in ``hidden``'s dtype, ``d_weight [V, H]`` in
        ``weight``'s dtype, ``d_bias [V]`` in ``bias``'s dtype (None without a bias).
    """
    rows, vocab = hidden.shape[0], weight.shape[0]
    if chunks is None:
        chunks = token_chunks(labels, ignore_index, vocab, hidden.device, workspace_bytes)
    logp = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
    entropy = torch.zeros_like(logp)
    tiled = all(isinstance(c, slice) for c in chunks) and sum(c.stop - c.start for c in chunks) == rows
    d_hidden = torch.empty_like(hidden) if tiled else torch.zeros_like(hidden)
    one_slice = len(chunks) == 1  # then d_weight is one GEMM, written once: no fp32 [V, H] accumulator
    d_weight = None if one_slice else torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    d_bias = None if bias is None else torch.zeros(vocab, dtype=torch.float32, device=weight.device)
    for idx in chunks:
        h, lab = hidden[idx], labels[idx]
        logits = _logits(h, weight, bias)
        lp, ent, st = row_stats(logits, lab, temperature, ignore_index, return_entropy)
        logp[idx], entropy[idx] = lp, ent
        g_lp, g_ent = token_grads(idx, lp, ent if return_entropy else None)
        d_low = _grad_buffer(logits, hidden.dtype)
        grad_logits(g_lp, g_ent, logits, lab, ent, st, temperature, ignore_index, d_low)
        if isinstance(idx, slice):
            _mm(d_low, weight, out=d_hidden[idx])
        else:
            d_hidden.index_copy_(0, idx, _mm(d_low, weight))
        if one_slice:
            d_weight = _mm(d_low.t(), h)
        else:
            _accumulate_fp32(d_weight, d_low.t(), h)
        if d_bias is not None:
            d_bias += d_low.sum(0, dtype=torch.float32)
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
    d_hidden, d_weight, d_bias = logprobs_backward_op(grad_logp, grad_entropy, hidden, weight, bias, labels, entropy, stats,
                                           *ctx.args)
    return d_hidden, d_weight, (d_bias if bias is not None else None), None, None, None, None, None


logprobs_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          bias: torch.Tensor | None = None, *, temperature: float = 1.0, ignore_index: int = -100,
                          return_entropy: bool = False, workspace_bytes: int | None = None):
    """``selective_logprobs(hidden @ weight.T + bias, labels, ...)`` without the full logits.

    How the forward and backward are chunked, and what they cost in memory: see the module
    docstring.

    Args:
        hidden: ``[..., H]`` fp32, bf16 or fp16; H a multiple of 16 is the fast path, any other H is
            zero-padded to one (:func:`pad_hidden_size`: exact, slower, a padded copy of ``weight``).
        weight: ``[V, H]`` same dtype and device (the lm-head).
        labels: ``[...]`` int64/int32 in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]``, any floating dtype, on ``hidden``'s device.
        temperature: > 0; the logits are divided by it (as in :func:`fastrl.ops.selective_logprobs`).
        ignore_index: label value of positions to skip: log-prob 0 and an exact zero gradient (as in
            :func:`fastrl.ops.selective_logprobs`).
        return_entropy: also return the entropy of ``softmax(logits / temperature)`` (as in
            :func:`fastrl.ops.selective_logprobs`).
        workspace_bytes: cap on the fp32 chunk-logits buffer (default 1 GiB on CUDA, 64 MiB on CPU).

    Returns:
        ``logp [...]`` fp32 (and ``entropy [...]`` fp32 when asked), differentiable with respect to
        hidden, weight and bias. ``d_weight`` is accumulated in fp32.

    Raises:
        TypeError: a non-tensor input, a non-bool ``return_entropy``, a non-int ``workspace_bytes``
            (and the scalar checks of :func:`fastrl.ops.selective_logprobs`).
        ValueError: as :func:`check_inputs`.
    """
    h_size, temperature, ignore_index = check_inputs(hidden, weight, labels, bias, temperature, ignore_index,
                                                     workspace_bytes)
    _checks.check_bool("return_entropy", return_entropy)
    hidden, weight, h_size = pad_hidden_size(hidden, weight)
    logp, entropy, _ = logprobs_op(hidden.reshape(-1, h_size).contiguous(), weight.contiguous(), bias,
                                labels.reshape(-1).contiguous(), temperature, ignore_index, return_entropy,
                                workspace_bytes or 0)
    logp = logp.view(labels.shape)
    return (logp, entropy.view(labels.shape)) if return_entropy else logp


H_ALIGN = 16  # hidden sizes the fast path takes: 16-element (32-byte bf16) aligned GEMM rows


def pad_hidden_size(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``hidden`` and ``weight`` with the hidden size H zero-padded to a multiple of 16 (the slower path).

    Exact: the padded columns add zero products to every logit, and their gradients are dropped by
    the padding's own backward (``torch.nn.functional.pad`` is differentiable). It costs a padded copy
    of both tensors (``weight``'s is ``[V, H']``); hidden sizes of real models are multiples of 16 and
    take no copy.

    Args:
        hidden: ``[..., H]`` floating.
        weight: ``[V, H]`` floating.

    Returns:
        ``(hidden, weight, H')``: the inputs themselves when ``H % 16 == 0``, else their padded copies
        with ``H'`` the next multiple of 16.
    """
    h_size = hidden.shape[-1]
    pad = -h_size % H_ALIGN
    if pad == 0:
        return hidden, weight, h_size
    return (torch.nn.functional.pad(hidden, (0, pad)), torch.nn.functional.pad(weight, (0, pad)), h_size + pad)


def check_inputs(hidden, weight, labels, bias, temperature, ignore_index, workspace_bytes) -> tuple[int, float, int]:
    """The checks of :func:`fused_linear_logprobs`, shared with the fused-linear losses.

    Args:
        hidden: ``[..., H]`` fp32, bf16 or fp16, H >= 1 (a multiple of 16 is the fast path; see
            :func:`pad_hidden_size`).
        weight: ``[V, H]`` with V >= 1, ``hidden``'s dtype and device.
        labels: ``[...]`` (``hidden``'s leading shape) int64 or int32, in ``[0, V)`` or ``ignore_index``.
        bias: ``[V]`` floating on ``hidden``'s device, or None.
        temperature: a number > 0.
        ignore_index: an int.
        workspace_bytes: an int >= 1, or None.

    Returns:
        ``(H, temperature, ignore_index)`` as int, float and int.

    Raises:
        TypeError: a non-tensor input or a scalar of the wrong kind, naming it.
        ValueError: a wrong shape, dtype, device or value, naming the argument (the label range
            check reads the labels: one device sync, skipped under ``torch.compile``).
    """
    _checks.check_tensor("hidden", hidden, dtypes=_checks.FLOAT_DTYPES)
    if hidden.dim() < 1:
        raise ValueError("hidden must have a last (hidden-size) dimension")
    h_size = hidden.shape[-1]
    if h_size == 0:
        raise ValueError("hidden size (last dimension of hidden) must be positive, got 0")
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
