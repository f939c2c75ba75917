"""Plain torch references of fastrl's ops: readable, fp64 where it matters, and slow.

Every fast path (Triton kernel, C++ or CUDA code) is tested against the function here of the same
name, and these are checked against hand-written maths in ``tests/ops/test_reference.py``. They are
also the ``torch`` backend (``FASTRL_BACKEND=torch``) and the fallback where no kernel exists yet.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """The Philox4x32-10 block (Salmon et al., SC'11): four 32-bit words from a 128-bit counter and
    a 64-bit key, as in Random123 and cuRAND."""
    c0, c1, c2, c3 = (w & _MASK32 for w in counter)
    k0, k1 = (w & _MASK32 for w in key)
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & _MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & _MASK32
        k0 = (k0 + 0x9E3779B9) & _MASK32
        k1 = (k1 + 0xBB67AE85) & _MASK32
    return c0, c1, c2, c3


def philox_uniform(seed: int, row: int) -> float:
    """The uniform in [0, 1) that the C++ sampler draws for ``row`` under ``seed``.

    Philox4x32-10 with key = the 64-bit seed and counter = (row, 0); 27 + 26 bits of its first two
    words make a double with 53 random bits. Pure Python, so tests can predict the sampler's draws.
    """
    seed &= _MASK64
    w0, w1, _, _ = philox4x32_10((row, row >> 32, 0, 0), (seed, seed >> 32))
    return (((w0 >> 5) << 26) | (w1 >> 6)) / float(1 << 53)


def _per_row(value, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).reshape(rows, 1)
    return torch.full((rows, 1), value, dtype=dtype, device=device)


def sampling_distribution(logits: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0,
                          min_p=0.0) -> torch.Tensor:
    """The distribution :func:`fastrl.sampling.sample` draws from, as fp64 probabilities [B, V].

    In order (Hugging Face's order of logits warpers): ``p = softmax(logits / T)``; top-k keeps the
    tokens whose ``p`` is at least the k-th largest (ties kept, 0 = off); top-p, on the top-k set
    renormalised, keeps token i when the mass of the tokens strictly more probable than i is below
    ``top_p`` (the smallest set reaching ``top_p``, ties kept); min-p keeps ``p >= min_p * max p``.
    The kept probabilities are renormalised. ``T = 0`` is greedy: the T -> 0 limit, uniform over
    the tied maxima. Each setting is a number or a per-row tensor [B].
    """
    rows, vocab = logits.shape
    dev = logits.device
    x = logits.double()
    t = _per_row(temperature, rows, torch.float64, dev)
    k = _per_row(top_k, rows, torch.int64, dev)
    p_top = _per_row(top_p, rows, torch.float64, dev)
    p_min = _per_row(min_p, rows, torch.float64, dev)

    greedy = t == 0
    scaled = (x - x.max(dim=-1, keepdim=True).values) / torch.where(greedy, 1.0, t)
    probs = torch.softmax(scaled, dim=-1)
    is_max = x == x.max(dim=-1, keepdim=True).values
    probs = torch.where(greedy, is_max.double() / is_max.sum(-1, keepdim=True), probs)

    descending = probs.sort(dim=-1, descending=True).values
    kth = descending.gather(-1, (k.clamp(1, vocab) - 1))
    keep = (k == 0) | (probs >= kth)

    in_top_k = probs * keep
    total = in_top_k.sum(-1, keepdim=True)
    ascending = in_top_k.sort(dim=-1).values
    n_greater = vocab - torch.searchsorted(ascending, in_top_k.contiguous(), right=True)  # entries > p_i
    # mass of the n largest entries, n = 0..V: exactly 0 for the most probable token
    prefix = torch.cat([torch.zeros_like(total), ascending.flip(-1).cumsum(-1)], dim=-1)
    mass_above = prefix.gather(-1, n_greater)
    keep &= (p_top >= 1) | (mass_above < p_top * total)

    keep &= probs >= p_min * probs.max(dim=-1, keepdim=True).values
    kept = probs * keep
    return kept / kept.sum(-1, keepdim=True)


def sample(logits: torch.Tensor, uniforms: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0,
           min_p=0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse-CDF draw from :func:`sampling_distribution` with the given uniforms [B] in [0, 1).

    Returns tokens [B] int64, the log-prob of each under softmax(logits / T) and under the filtered
    distribution (fp32). The token is the first index whose cumulative probability exceeds ``u``.
    Greedy rows (T = 0) take the first maximum, with log-prob -log(number of tied maxima).
    """
    rows, vocab = logits.shape
    probs = sampling_distribution(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    cdf = probs.cumsum(-1)
    u = uniforms.to(device=logits.device, dtype=torch.float64).reshape(rows, 1)
    tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max(vocab - 1)
    # never land on a zero-probability entry because of rounding at the top of the CDF
    tokens = torch.where(probs.gather(-1, tokens) > 0, tokens, (probs > 0).cumsum(-1).argmax(-1, keepdim=True))

    t = _per_row(temperature, rows, torch.float64, logits.device)
    greedy = (t == 0).squeeze(-1)
    tokens = torch.where(greedy, logits.argmax(-1), tokens.squeeze(-1))
    x = logits.double()
    logprobs = torch.log_softmax((x - x.max(-1, keepdim=True).values) / torch.where(t == 0, 1.0, t), dim=-1)
    logprobs = torch.where(greedy, probs.gather(-1, tokens[:, None]).log().squeeze(-1),
                           logprobs.gather(-1, tokens[:, None]).squeeze(-1))
    filtered = probs.gather(-1, tokens[:, None]).log().squeeze(-1)
    return tokens, logprobs.float(), filtered.float()


# --------------------------------------------------------------------------------------------
# Log-probs of chosen tokens


def _row_chunks(rows: int, vocab: int, budget_bytes: int = 64 << 20):
    """Row ranges whose fp32 [rows, V] working set stays within ``budget_bytes``."""
    step = max(1, budget_bytes // (4 * max(vocab, 1)))
    return [(lo, min(rows, lo + step)) for lo in range(0, rows, step)]


def selective_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                       ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``logits`` [N, V] with ``labels`` [N]: the log-prob of the label under
    ``softmax(logits / T)``, the entropy of that distribution, and ``stats`` [N, 2] = (max of
    logits / T, log of the sum of exp(logits / T - max)), what the backward needs.

    Returns fp32 ``(logp [N], entropy [N], stats [N, 2])``; rows whose label is ``ignore_index`` get 0
    for logp and entropy. Works in fp32 on row chunks, so memory stays bounded whatever N is. The
    max and the log-sum are kept apart so that huge scaled logits (|x / T| ~ 1e7) lose nothing.
    """
    rows, vocab = logits.shape
    logp = torch.zeros(rows, dtype=torch.float32, device=logits.device)
    entropy = torch.zeros_like(logp)
    stats = torch.zeros(rows, 2, dtype=torch.float32, device=logits.device)
    for lo, hi in _row_chunks(rows, vocab):
        s = logits[lo:hi].float()
        if temperature != 1.0:
            s = s / temperature
        log_p = torch.log_softmax(s, dim=-1)
        lab = labels[lo:hi]
        keep = lab != ignore_index
        picked = log_p.gather(-1, torch.where(keep, lab, 0).long()[:, None]).squeeze(-1)
        ent = torch.special.entr(log_p.exp()).sum(-1)  # -p log p, 0 where p = 0
        logp[lo:hi] = torch.where(keep, picked, 0.0)
        entropy[lo:hi] = torch.where(keep, ent, 0.0)
        stats[lo:hi, 0] = s.max(dim=-1).values
        stats[lo:hi, 1] = -log_p.max(dim=-1).values  # log p of the maximum is exactly -log z
    return logp, entropy, stats


def selective_logprobs_backward(grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None, logits: torch.Tensor,
                                labels: torch.Tensor, entropy: torch.Tensor, stats: torch.Tensor, *,
                                temperature: float = 1.0, ignore_index: int = -100) -> torch.Tensor:
    """Gradient of ``selective_logprobs`` with respect to ``logits``, in ``logits.dtype``.

    With s = x / T, p = softmax(s) and H its entropy: d logp / d x_j = (1[j = label] - p_j) / T and
    d H / d x_j = -p_j (log p_j + H) / T. Ignored rows get 0. ``logits`` may be a slice of the
    vocabulary (with the whole row's ``stats`` and ``entropy``): a label outside ``[0, V)`` that is not
    ``ignore_index`` then adds no one-hot term.
    """
    rows, vocab = logits.shape
    grad = torch.empty_like(logits)
    for lo, hi in _row_chunks(rows, vocab):
        s = logits[lo:hi].float()
        if temperature != 1.0:
            s = s / temperature
        p = ((s - stats[lo:hi, :1]) - stats[lo:hi, 1:]).exp()
        lab = labels[lo:hi]
        keep = (lab != ignore_index)[:, None]
        g_lp = grad_logp[lo:hi, None].float()
        if grad_entropy is None:
            g = p * -g_lp
        else:  # -g_H p (log p + H) = g_H entr(p) - g_H H p, with entr(p) = -p log p (0 at p = 0)
            g_h = grad_entropy[lo:hi, None].float()
            g = p * -(g_lp + g_h * entropy[lo:hi, None]) + g_h * torch.special.entr(p)
        hit = keep[:, 0] & (lab >= 0) & (lab < vocab)  # a label outside the row scores no one-hot term
        g.scatter_add_(-1, torch.where(hit, lab, 0).long()[:, None], torch.where(hit[:, None], g_lp, 0.0))
        if temperature != 1.0:
            g /= temperature
        grad[lo:hi] = torch.where(keep, g, 0.0).to(logits.dtype)
    return grad


# --------------------------------------------------------------------------------------------
# Per-sequence sums of token log-probs (packed or padded), LD-DPO weights


def _with_sentinel(values: torch.Tensor, fill) -> torch.Tensor:
    """``values`` [N] with ``fill`` appended at index N, the index of tokens of no sequence."""
    return torch.cat([values, values.new_full((1,), fill)])


def sequence_token_weights(shape, cu_seqlens: torch.Tensor | None = None, *, mask: torch.Tensor | None = None,
                           ld_alpha: float | None = None, pair_lengths: torch.Tensor | None = None,
                           reduction: str = "sum") -> tuple[torch.Tensor, torch.Tensor]:
    """Which sequence each token of a ``shape`` tensor belongs to, and the weight it carries.

    Packed (``cu_seqlens`` [N+1]): ``shape`` is ``(T,)`` and sequence i is tokens
    ``cu_seqlens[i]:cu_seqlens[i+1]``. Padded (``mask`` [B, L], N = B): sequence i is the tokens of
    row i where the mask is non-zero. The token at position t of its sequence (0-based, counting
    only that sequence's tokens) weighs 1, or ``ld_alpha`` when ``t >= pair_lengths[i]`` (LD-DPO);
    ``reduction="mean"`` divides by the sequence's token count.

    Returns ``(seq [*shape] int64, weight [*shape] float64)``; tokens of no sequence get seq = N
    and weight 0.
    """
    if cu_seqlens is not None:
        cu = cu_seqlens.long()
        n = cu.numel() - 1
        t = torch.arange(shape[0], device=cu.device)
        seq = torch.searchsorted(cu[1:], t, right=True)  # the number of sequences that end at or before t
        inside = (t >= cu[0]) & (seq < n)
        seq = torch.where(inside, seq, n)
        pos = t - cu[seq.clamp(max=max(n - 1, 0))]
        count = cu[1:] - cu[:-1]
    else:
        inside = mask != 0
        n = inside.shape[0]
        seq = torch.arange(n, device=mask.device)[:, None].expand(inside.shape)
        pos = inside.long().cumsum(1) - 1
        count = inside.long().sum(1)
    weight = torch.ones(shape, dtype=torch.float64, device=seq.device)
    if ld_alpha is not None:
        weight = torch.where(pos < _with_sentinel(pair_lengths.long(), 0)[seq], weight, float(ld_alpha))
    if reduction == "mean":
        weight = weight / _with_sentinel(count, 1).clamp(min=1)[seq]
    return seq, torch.where(inside, weight, 0.0)


def sequence_logps(token_logps: torch.Tensor, cu_seqlens: torch.Tensor | None = None, *,
                   mask: torch.Tensor | None = None, ld_alpha: float | None = None,
                   pair_lengths: torch.Tensor | None = None, reduction: str = "sum") -> torch.Tensor:
    """Per-sequence (weighted) sums or means of ``token_logps``: flat [T] with ``cu_seqlens`` [N+1],
    or [B, L] with ``mask`` [B, L]; see :func:`sequence_token_weights`. Returns [N] fp32, summed in
    fp64; a token of weight 0 adds nothing (even a ``-inf`` one) and an empty sequence gives 0."""
    seq, weight = sequence_token_weights(token_logps.shape, cu_seqlens, mask=mask, ld_alpha=ld_alpha,
                                         pair_lengths=pair_lengths, reduction=reduction)
    n = cu_seqlens.numel() - 1 if cu_seqlens is not None else token_logps.shape[0]
    terms = torch.where(weight != 0, token_logps.double() * weight, 0.0)
    out = torch.zeros(n + 1, dtype=torch.float64, device=token_logps.device)
    return out.index_add_(0, seq.reshape(-1), terms.reshape(-1))[:n].float()


def sequence_logps_backward(grad: torch.Tensor, shape, dtype: torch.dtype, cu_seqlens: torch.Tensor | None = None, *,
                            mask: torch.Tensor | None = None, ld_alpha: float | None = None,
                            pair_lengths: torch.Tensor | None = None, reduction: str = "sum") -> torch.Tensor:
    """Gradient of :func:`sequence_logps` with respect to ``token_logps`` (of ``shape`` and
    ``dtype``) given ``grad`` [N]: ``grad[seq(t)] * weight_t``, 0 for tokens of weight 0 or of no
    sequence."""
    seq, weight = sequence_token_weights(shape, cu_seqlens, mask=mask, ld_alpha=ld_alpha,
                                         pair_lengths=pair_lengths, reduction=reduction)
    g = torch.cat([grad.double(), grad.new_zeros(1, dtype=torch.float64)])[seq]
    return torch.where(weight != 0, g * weight, 0.0).to(dtype)
