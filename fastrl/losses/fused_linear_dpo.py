"""DPO-family loss straight from the policy's last hidden states and the lm-head weight, no logits.

>>> import torch
>>> from fastrl.losses import FusedLinearDPOLoss, dpo_loss
>>> from fastrl.ops import fused_linear_logprobs, sequence_logps
>>> hidden = torch.randn(4, 6, 32, requires_grad=True)   # [2B, L, H]: 2 chosen rows, then 2 rejected
>>> lm_head = torch.randn(300, 32, requires_grad=True)
>>> labels = torch.randint(0, 300, (4, 6))
>>> mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
>>> ref_chosen, ref_rejected = torch.tensor([-40.0, -35.0]), torch.tensor([-30.0, -41.0])
>>> loss, metrics = FusedLinearDPOLoss(beta=0.1)(hidden, lm_head, labels, ref_chosen, ref_rejected, mask=mask)
>>> loss.backward()
>>> seq = sequence_logps(fused_linear_logprobs(hidden.detach(), lm_head.detach(), labels.masked_fill(mask == 0, -100)),
...                      mask=mask)
>>> torch.allclose(loss, dpo_loss(seq[:2], seq[2:], ref_chosen, ref_rejected, beta=0.1)[0])
True
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fastrl import _checks
from fastrl.losses._fused_linear import loss_grads, grads_wanted, terminal, token_logprobs, two_pass
from fastrl.losses.dpo import DPOSettings, dpo_loss
from fastrl.ops.fused_linear_logprobs import (check_inputs, fused_linear_logprobs, pad_hidden_size,
                                              terminal_single_pass, workspace_budget)
from fastrl.ops.sequence_logps import sequence_logps

__all__ = ["FusedLinearDPOLoss", "fused_linear_dpo_loss", "precompute_reference_logps"]

_PAIR_TENSORS = ("pair_beta", "soft_labels", "pair_weights")  # dpo_loss's per-pair tensors a caller may pass


def _layout(hidden, labels, mask, cu_seqlens):
    """Checks the layout; returns ``(labels with padding ignored, token counts [2B])``."""
    if (mask is None) == (cu_seqlens is None):
        raise ValueError("pass exactly one of cu_seqlens (packed hidden [T, H]) and mask (padded hidden [2B, L, H])")
    if mask is not None:
        if hidden.dim() != 3:
            raise ValueError(f"hidden must be [2B, L, H] with mask, got shape {tuple(hidden.shape)}")
        _checks.check_tensor("mask", mask, ndim=2, device=hidden.device)
        if tuple(mask.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"mask must have shape {tuple(hidden.shape[:2])} (hidden's [2B, L]), got {tuple(mask.shape)}")
        if isinstance(labels, torch.Tensor):
            labels = torch.where(mask.bool(), labels, -100)  # padding positions score nothing
        counts = mask.bool().sum(1)
    else:
        if hidden.dim() != 2:
            raise ValueError(f"hidden must be [T, H] with cu_seqlens, got shape {tuple(hidden.shape)}")
        _checks.check_tensor("cu_seqlens", cu_seqlens, ndim=1, device=hidden.device)
        if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 1:
            raise ValueError("cu_seqlens must be a non-empty int32 / int64 tensor of offsets")
        counts = cu_seqlens[1:] - cu_seqlens[:-1]
    if counts.numel() % 2 or counts.numel() == 0:
        raise ValueError(f"the batch must hold 2B sequences (B chosen, then B rejected), got {counts.numel()}")
    return labels, counts


def fused_linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ld_alpha: float | None = None,
    workspace_bytes: int | None = None,
    settings: DPOSettings | None = None,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`fastrl.losses.dpo_loss` of the policy's sequence log-probs, from ``hidden`` and the lm-head.

    No ``[tokens, V]`` logits tensor is made. Only the scored (unmasked) positions go through the
    lm-head GEMMs. The batch is cut into chunks of whole pairs that fit the workspace; each chunk's
    logits give its log-probs and, since a pair's loss depends on that pair alone, at once its
    gradients: three GEMMs, what a linear layer's forward and backward cost (several chunks sum
    ``d_weight`` in an fp32 ``[V, H]`` accumulator). Two passes (four GEMMs: the log-probs, the loss,
    then the logits recomputed slice by slice, the backward of :func:`fastrl.ops.fused_linear_logprobs`)
    when a pair alone overflows the workspace, when the accumulator would exceed both the workspace
    and the ``[tokens, H]`` one of the two-pass backward, or for the types that sort the batch (aot,
    aot_unpaired).

    Args:
        hidden: the policy's last hidden states of 2B completions, the B chosen ones first and then
            the B rejected ones (pair i = sequences i and B + i): padded ``[2B, L, H]`` with
            ``mask [2B, L]`` (1 on the completion tokens to score), or packed ``[T, H]`` with
            ``cu_seqlens [2B+1]``. Position t holds the hidden state that predicts ``labels[t]``.
            fp32, bf16 or fp16; any H (a multiple of 16 is the fast path, others are zero-padded).
        weight: the lm-head ``[V, H]``, the dtype of ``hidden`` (fp32, bf16 or fp16).
        labels: ``[2B, L]`` / ``[T]`` int64 or int32 token ids in ``[0, V)`` (padding positions are
            never read).
        ref_chosen_logps: ``[B]`` floating (fp32, bf16, fp16 or fp64) summed reference log-probs of the
            chosen completions (e.g. from :func:`precompute_reference_logps`), or None for the
            reference-free types.
        ref_rejected_logps: ``[B]`` floating, of the rejected ones, or None.
        mask: ``[2B, L]`` bool or 0/1 integer (padded layout).
        cu_seqlens: ``[2B+1]`` int32 or int64 (packed layout).
        bias: optional ``[V]``, the dtype of ``hidden``.
        temperature: logits are divided by it.
        ld_alpha: LD-DPO: tokens of a completion beyond the shorter completion of its pair weigh
            ``ld_alpha`` (:func:`fastrl.ops.sequence_logps`); the NLL terms keep plain sums.
        workspace_bytes: cap on the fp32 logits slice (default 1 GiB on CUDA, 64 MiB on CPU).
        settings: a :class:`~fastrl.losses.DPOSettings`; or pass its fields as ``**options``.
        **options: the fields of :class:`~fastrl.losses.DPOSettings` (``loss_type``, ``beta``, ...), and
            the per-pair tensors of :func:`~fastrl.losses.dpo_loss` (``pair_beta``, ``soft_labels``,
            ``pair_weights``, a tensor ``bco_delta``); ``chosen_lengths`` / ``rejected_lengths`` /
            ``chosen_nll`` come from the layout.

    Returns:
        ``(loss, metrics)`` as :func:`~fastrl.losses.dpo_loss` (0-d fp32 tensors); the forward also
        computes, when a gradient is wanted, the gradients of ``hidden``, ``weight`` and ``bias``, and
        ``loss.backward()`` hands them on.

    Raises:
        ValueError: ``chosen_lengths`` / ``rejected_lengths`` / ``chosen_nll`` passed (they come from the
            layout), a bad layout or shape, bad settings; and as :func:`~fastrl.losses.dpo_loss`.
        TypeError: as :func:`~fastrl.losses.dpo_loss`.
    """
    for name in ("chosen_lengths", "rejected_lengths", "chosen_nll"):
        if name in options:
            raise ValueError(f"{name} is computed from the layout by fused_linear_dpo_loss; do not pass it")
    tensors = {name: options.pop(name) for name in _PAIR_TENSORS if name in options}
    if isinstance(options.get("bco_delta"), torch.Tensor):
        tensors["bco_delta"] = options.pop("bco_delta")
    settings = DPOSettings.from_options(settings, options, where="fused_linear_dpo_loss")
    labels, counts = _layout(hidden, labels, mask, cu_seqlens)
    h_size, temperature, ignore_index = check_inputs(hidden, weight, labels, bias, temperature, -100,
                                                     workspace_bytes)
    hidden, weight, h_size = pad_hidden_size(hidden, weight)  # H % 16 != 0: zero-padded (slower, exact)
    if ld_alpha is not None:
        ld_alpha = _checks.check_real("ld_alpha", ld_alpha, low=0.0, high=1.0)
    pairs = counts.numel() // 2
    shape = labels.shape
    pair_lengths = None
    if ld_alpha is not None:
        shorter = torch.minimum(counts[:pairs], counts[pairs:])
        pair_lengths = torch.cat([shorter, shorter])

    def loss_fn(logp, entropy):
        token_logps = logp.view(shape)
        seq = sequence_logps(token_logps, cu_seqlens, mask=mask, ld_alpha=ld_alpha, pair_lengths=pair_lengths)
        nll = None
        if ld_alpha is not None:  # the NLL terms are plain sums, not the LD-weighted ones
            nll = -sequence_logps(token_logps, cu_seqlens, mask=mask)[:pairs]
        return dpo_loss(seq[:pairs], seq[pairs:], ref_chosen_logps, ref_rejected_logps,
                        chosen_lengths=counts[:pairs], rejected_lengths=counts[pairs:], chosen_nll=nll,
                        settings=settings, **tensors)

    flat_hidden = hidden.reshape(-1, h_size).contiguous()
    flat_labels = labels.reshape(-1).contiguous()
    weight = weight.contiguous()
    common = dict(temperature=temperature, ignore_index=ignore_index, need_entropy=False,
                  workspace_bytes=workspace_bytes or 0)
    if not grads_wanted(hidden, weight, bias):
        with torch.no_grad():
            return loss_fn(*token_logprobs(flat_hidden, weight, bias, flat_labels, **common))
    # a pair's loss and gradient depend on that pair alone (the batch means divide by known counts),
    # except for the types that sort the batch
    chunks = None if settings.sorted_types else _pair_chunks(flat_labels, counts, pairs, mask, weight.shape[0],
                                                             h_size, hidden.device, workspace_bytes, ignore_index)

    def compute():
        if chunks is None:
            return two_pass(flat_hidden, weight, bias, flat_labels, loss_fn, **common)
        return _pair_chunked_pass(flat_hidden, weight, bias, flat_labels, loss_fn, chunks, common)

    return terminal(flat_hidden, weight, bias, compute)


def _pair_chunks(flat_labels, counts, pairs, mask, vocab, h_size, device, workspace_bytes, ignore_index):
    """The scored rows grouped by pair (chosen and rejected sequence of each pair together) in chunks of
    whole pairs whose fp32 logits fit the workspace: index tensors, or None when a single pair does not
    fit or the several chunks would need an fp32 ``[V, H]`` accumulator larger than both the
    workspace and the two-pass backward's ``[tokens, H]`` one. One host sync (the per-pair counts)."""
    rows = flat_labels.shape[0]
    position = torch.arange(rows, device=device)
    if mask is not None:
        sequence = position // mask.shape[1]
    else:
        ends = counts.cumsum(0)
        sequence = torch.searchsorted(ends, position, right=True)
    sel = (flat_labels != ignore_index).nonzero().squeeze(1)
    pair = sequence[sel] % pairs
    order = torch.argsort(pair, stable=True)
    sel = sel[order]
    per_pair = torch.bincount(pair, minlength=pairs).tolist()
    total = len(sel)
    budget = workspace_budget(device, workspace_bytes)
    step = max(1, budget // (4 * vocab))
    if total == 0 or max(per_pair) > step:
        return None

    def greedy(cap):
        bounds, size = [0], 0
        for n in per_pair:
            if size + n > cap and size:
                bounds.append(bounds[-1] + size)
                size = 0
            size += n
        bounds.append(total)
        return bounds

    bounds = greedy(step)
    if len(bounds) > 2:  # several chunks: balance them (no short tail) when that costs no extra chunk
        balanced = greedy(max(max(per_pair), -(-total // (len(bounds) - 1))))
        bounds = balanced if len(balanced) <= len(bounds) else bounds
        if vocab * h_size * 4 > budget and total < vocab:
            return None  # the [V, H] accumulator would be the larger one: two passes
    return [sel[lo:hi] for lo, hi in zip(bounds, bounds[1:])]


def _pair_chunked_pass(hidden, weight, bias, labels, loss_fn, chunks, common):
    """One pass over chunks of whole pairs: each chunk's logits give its log-probs, the loss's gradient
    at its tokens (the loss of the whole batch with not-yet-seen tokens at a placeholder log-prob of -1,
    which does not change the gradient of this chunk's pairs), and at once their products into
    ``d_hidden`` and ``d_weight``: three GEMMs. The last chunk's call sees every real value and gives
    the loss and metrics."""
    logp_all = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device)
    for idx in chunks:
        logp_all[idx] = -1.0
    found = {}

    def token_grads(idx, logp, entropy):
        logp_all[idx] = logp
        found["loss"], found["metrics"], d_logp, _ = loss_grads(loss_fn, logp_all, None, False)
        return d_logp[idx], None

    with torch.no_grad():
        _, _, d_hidden, d_weight, d_bias = terminal_single_pass(
            hidden, weight, bias, labels, token_grads, temperature=common["temperature"],
            ignore_index=common["ignore_index"], return_entropy=False, workspace_bytes=common["workspace_bytes"],
            chunks=chunks)
    return found["loss"], found["metrics"], d_hidden, d_weight, d_bias


class FusedLinearDPOLoss(torch.nn.Module):
    """:func:`fused_linear_dpo_loss` as a module: the loss options checked once here, the tensors in ``forward``.

    Args:
        settings: a :class:`~fastrl.losses.DPOSettings`; or pass its fields as ``**options``.
        temperature: logits are divided by it.
        ld_alpha: LD-DPO's weight of the tokens beyond the shorter completion, or None.
        workspace_bytes: cap on the fp32 logits slice, or None for the default.
        **options: the fields of :class:`~fastrl.losses.DPOSettings`.

    Raises:
        TypeError: bad settings, naming the field.
        ValueError: bad settings, naming the field.
    """

    def __init__(self, settings: DPOSettings | None = None, *, temperature: float = 1.0,
                 ld_alpha: float | None = None, workspace_bytes: int | None = None, **options):
        super().__init__()
        self.settings = DPOSettings.from_options(settings, options, where="FusedLinearDPOLoss")
        self.extras = {"temperature": temperature, "ld_alpha": ld_alpha, "workspace_bytes": workspace_bytes}

    def forward(self, hidden, weight, labels, ref_chosen_logps=None, ref_rejected_logps=None, *, mask=None,
                cu_seqlens=None, bias=None):
        """The loss of one batch of pairs: :func:`fused_linear_dpo_loss` with this module's options.

        Args:
            hidden: ``[2B, L, H]`` padded or ``[T, H]`` packed; fp32, bf16 or fp16.
            weight: ``[V, H]``, the dtype of ``hidden``.
            labels: ``[2B, L]`` / ``[T]`` int64 or int32.
            ref_chosen_logps: ``[B]`` floating, or None.
            ref_rejected_logps: ``[B]`` floating, or None.
            mask: ``[2B, L]`` bool or 0/1 integer, or None.
            cu_seqlens: ``[2B+1]`` int32 or int64, or None.
            bias: ``[V]``, the dtype of ``hidden``, or None.

        Returns:
            ``(loss, metrics)`` as :func:`fused_linear_dpo_loss`.
        """
        return fused_linear_dpo_loss(hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, mask=mask,
                                     cu_seqlens=cu_seqlens, bias=bias, settings=self.settings, **self.extras)

    def extra_repr(self) -> str:
        default = DPOSettings()
        changed = {k: v for k, v in self.settings.options().items() if getattr(default, k) != v}
        changed.update({k: v for k, v in self.extras.items()
                        if v is not None and not (k == "temperature" and v == 1.0)})
        return ", ".join(f"{k}={v!r}" for k, v in changed.items())


@torch.no_grad()
def precompute_reference_logps(backbone, weight: torch.Tensor, batches: Iterable[dict], *,
                               bias: torch.Tensor | None = None, temperature: float = 1.0,
                               progress: bool = True) -> torch.Tensor:
    """Summed log-probs of every completion of a dataset under a frozen reference model, in one pass.

    So DPO training keeps no second model in memory.

    Args:
        backbone: ``backbone(input_ids, attention_mask) -> hidden [N, L, H]``, the reference model
            up to its last hidden states (for a Hugging Face causal LM: ``lambda ids, am:
            model.get_decoder()(input_ids=ids, attention_mask=am).last_hidden_state``).
        weight: the reference's lm-head ``[V, H]``, the dtype of the hidden states (fp32, bf16 or fp16).
        batches: dicts with ``input_ids`` [N, L], ``attention_mask`` [N, L] and
            ``completion_mask`` [N, L] (1 on the completion tokens whose log-prob is summed).
            The hidden state at position t scores the token at t + 1.
        bias: the reference's lm-head bias ``[V]`` (the dtype of ``weight``), or None.
        temperature: logits are divided by it.
        progress: a tqdm bar when tqdm is installed.

    Returns:
        ``[total N]`` fp32 on the CPU, the batches' sequences in order (e.g. chosen and rejected
        halves to split as the batches were laid out).

    Raises:
        ValueError: a batch lacking one of the three keys, or whose three tensors do not share one
            ``[N, L]`` shape.
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    out = []
    iterator = tqdm(batches, desc="reference log-probs", unit="batch") if progress and tqdm else batches
    for i, batch in enumerate(iterator):
        for key in ("input_ids", "attention_mask", "completion_mask"):
            if key not in batch:
                raise ValueError(f"batches[{i}] lacks {key!r} (needs input_ids, attention_mask, completion_mask)")
        ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        if ids.shape != attention.shape or ids.shape != completion.shape or ids.dim() != 2:
            raise ValueError(f"batches[{i}]: input_ids, attention_mask and completion_mask must share one [N, L] shape")
        hidden = backbone(ids, attention)[:, :-1]
        score = completion[:, 1:].bool() & attention[:, 1:].bool()
        # only the completion tokens go through the lm-head: gather them (prompt and padding rows
        # would cost most of the GEMM work), then sum each sequence's log-probs
        rows, cols = score.nonzero(as_tuple=True)
        token_logps = torch.zeros(score.shape, dtype=torch.float32, device=hidden.device)
        if rows.numel():
            token_logps[rows, cols] = fused_linear_logprobs(hidden[rows, cols], weight, ids[:, 1:][rows, cols], bias,
                                                            temperature=temperature)
        out.append(sequence_logps(token_logps, mask=score).float().cpu())
    return torch.cat(out) if out else torch.empty(0)
