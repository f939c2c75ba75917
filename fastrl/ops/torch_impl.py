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


def cfg_logits(logits: torch.Tensor, uncond: torch.Tensor | None, cfg_weight: float = 1.0) -> torch.Tensor:
    """The classifier-free-guidance mix the samplers draw from: ``u + (c - u) * w`` per element in fp32,
    in that order (Hugging Face's ``ClassifierFreeGuidanceLogitsProcessor``), each step rounded.

    A ``-inf`` in either branch bans the token; NaN or ``+inf`` in either gives NaN. ``uncond`` None or
    ``w == 1``: ``logits`` itself, unread ``uncond`` (the samplers' unguided path).
    """
    if uncond is None or cfg_weight == 1.0:
        return logits
    c, u = logits.float(), uncond.float()
    w = torch.tensor(float(cfg_weight), dtype=torch.float32)  # rounded to fp32, as the kernels do
    mixed = u + (c - u) * w
    banned = (c == float("-inf")) | (u == float("-inf"))
    bad = torch.isnan(c) | torch.isnan(u) | (c == float("inf")) | (u == float("inf"))
    mixed = torch.where(banned, float("-inf"), mixed)
    return torch.where(bad, float("nan"), mixed)


def cond_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature=1.0) -> torch.Tensor:
    """fp32 [B]: each token's log-prob under ``softmax(logits / T)`` (fp64 inside); greedy rows (T = 0)
    the T -> 0 limit: ``-log(number of tied maxima)`` at a maximum, ``-inf`` elsewhere."""
    rows = logits.shape[0]
    t = _per_row(temperature, rows, torch.float64, logits.device)
    x = logits.double()
    top = x.max(-1, keepdim=True).values
    at = tokens.reshape(rows, 1)
    logp = torch.log_softmax((x - top) / torch.where(t == 0, 1.0, t), dim=-1).gather(-1, at)
    is_max = x == top
    greedy = torch.where(is_max.gather(-1, at), -is_max.sum(-1, keepdim=True).double().log(), float("-inf"))
    return torch.where(t == 0, greedy, logp).squeeze(-1).float()


def sampling_distribution(logits: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0,
                          min_p=0.0, uncond: torch.Tensor | None = None, cfg_weight: float = 1.0) -> torch.Tensor:
    """The distribution :func:`fastrl.sampling.sample` draws from, as fp64 probabilities [B, V].

    With ``uncond`` and ``cfg_weight`` the logits are first the guided mix :func:`cfg_logits`. In order (Hugging Face's order of logits warpers): ``p = softmax(logits / T)``; top-k keeps the
    tokens whose ``p`` is at least the k-th largest (ties kept, 0 = off); top-p, on the top-k set
    renormalised, keeps token i when the mass of the tokens strictly more probable than i is below
    ``top_p`` (the smallest set reaching ``top_p``, ties kept); min-p keeps ``p >= min_p * max p``.
    The kept probabilities are renormalised. ``T = 0`` is greedy: the T -> 0 limit, uniform over
    the tied maxima. Each setting is a number or a per-row tensor [B].
    """
    logits = cfg_logits(logits, uncond, cfg_weight)
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
           min_p=0.0, uncond: torch.Tensor | None = None, cfg_weight: float = 1.0,
           return_cond_logprobs: bool = False):
    """Inverse-CDF draw from :func:`sampling_distribution` with the given uniforms [B] in [0, 1).

    Returns tokens [B] int64, the log-prob of each under softmax(logits / T) and under the filtered
    distribution (fp32). The token is the first index whose cumulative probability exceeds ``u``.
    Greedy rows (T = 0) take the first maximum, with log-prob -log(number of tied maxima).
    With ``uncond`` and ``cfg_weight`` the draw and those two log-probs are those of the guided mix
    :func:`cfg_logits`; ``return_cond_logprobs=True`` appends :func:`cond_logprobs` of ``logits`` (the
    conditional branch) at the drawn tokens.
    """
    if uncond is not None and cfg_weight != 1.0:
        out = sample(cfg_logits(logits, uncond, cfg_weight), uniforms, temperature=temperature, top_k=top_k,
                     top_p=top_p, min_p=min_p)
        return (*out, cond_logprobs(logits, out[0], temperature)) if return_cond_logprobs else out
    if return_cond_logprobs:
        out = sample(logits, uniforms, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        return (*out, out[1].clone())
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
                       ignore_index: int = -100,
                       return_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``logits`` [N, V] with ``labels`` [N]: the log-prob of the label under
    ``softmax(logits / T)``, the entropy of that distribution, and ``stats`` [N, 2] = (max of
    logits / T, log of the sum of exp(logits / T - max)), what the backward needs.

    Returns fp32 ``(logp [N], entropy [N], stats [N, 2])``; rows whose label is ``ignore_index`` get 0
    for logp and entropy (entropy is all 0 with ``return_entropy=False``). Works in fp32 on row chunks,
    so memory stays bounded whatever N is. The max and the log-sum are kept apart so that huge scaled
    logits (|x / T| ~ 1e7) lose nothing.
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
        logp[lo:hi] = torch.where(keep, picked, 0.0)
        if return_entropy:
            ent = torch.special.entr(log_p.exp()).sum(-1)  # -p log p, 0 where p = 0
            entropy[lo:hi] = torch.where(keep, ent, 0.0)
        top = s.max(dim=-1)
        stats[lo:hi, 0] = top.values
        stats[lo:hi, 1] = -log_p.gather(-1, top.indices[:, None]).squeeze(-1)  # log p of the maximum is -log z
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


# --------------------------------------------------------------------------------------------
# Group-relative advantages (GRPO family)


def _segment_sum(x: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float64, device=x.device).index_add_(0, index, x)


def _safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den where den > 0, else 0."""
    pos = den > 0
    return torch.where(pos, num / torch.where(pos, den, 1.0), 0.0)


def _segment_mean_std(x: torch.Tensor, valid: torch.Tensor, index: torch.Tensor, n: int):
    """Per sample: the count, mean and unbiased std (correction 1; 0 below two values) of the valid
    ``x`` of its segment."""
    count = _segment_sum(valid.double(), index, n)
    mean = _segment_sum(torch.where(valid, x, 0.0), index, n) / count.clamp(min=1)
    dev = torch.where(valid, x - mean[index], 0.0)
    m2 = _segment_sum(dev * dev, index, n)
    std = torch.where(count > 1, (m2 / (count - 1).clamp(min=1)).sqrt(), 0.0)
    return count[index], mean[index], std[index]


def _fp32(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` rounded to fp32 (in fp64), 0 where not valid or not finite once rounded (an fp64 value
    beyond the fp32 range, an overflowing sum), and the validity."""
    x = x.float().double()
    valid = valid & torch.isfinite(x)
    return torch.where(valid, x, 0.0), valid


def _combined(values: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum over the finite columns of ``values`` [B, R] (fp64, rounded to fp32) and whether
    it is scorable (some column finite)."""
    finite = torch.isfinite(values)
    return _fp32(torch.where(finite, values * weights, 0.0).sum(1), finite.any(1))


def _column_advantages(x, valid, index, n, estimator, scale, eps, lengths):
    """The advantage of every sample from one value per sample (0 where not ``valid``)."""
    batch = torch.zeros_like(index)
    count, mean, std = _segment_mean_std(x, valid, index, n)
    centred = torch.where(valid, x - mean, 0.0)
    if estimator in ("grpo", "dr_grpo", "pref_grpo"):
        if estimator == "dr_grpo" or scale == "none":
            a = centred
        elif scale == "group":
            a = _safe_divide(centred, std + eps)
        else:
            a = _safe_divide(centred, _segment_mean_std(x, valid, batch, 1)[2] + eps)
    elif estimator == "rloo":  # R_i - mean_{j != i} R_j = n / (n - 1) (R_i - mean)
        a = _safe_divide(centred * count, count - 1)
    elif estimator == "reinforce_pp":
        _, mean_b, std_b = _segment_mean_std(x, valid, batch, 1)
        a = _safe_divide(x - mean_b, std_b + eps)
    elif estimator == "reinforce_pp_baseline":
        a = _safe_divide(centred, _segment_mean_std(centred, valid, batch, 1)[2] + eps)
    elif estimator == "remax":
        a = x
    else:  # opo: baseline mean + sum L (R - mean) / sum L, the plain mean when the lengths sum to 0
        length = lengths.double()
        length = torch.where(valid & torch.isfinite(length) & (length > 0), length, 0.0)
        a = centred - _safe_divide(_segment_sum(length * centred, index, n), _segment_sum(length, index, n))[index]
    return torch.where(valid, a, 0.0)


def group_advantages(rewards: torch.Tensor, groups, *, estimator: str = "grpo", scale: str = "group",
                     eps: float = 1e-4, reward_weights: torch.Tensor | None = None,
                     multi_reward: str = "sum_then_normalize", lengths: torch.Tensor | None = None,
                     baseline_rewards: torch.Tensor | None = None,
                     preferences: torch.Tensor | None = None) -> torch.Tensor:
    """Advantages [B] fp32 of ``rewards`` [B] or [B, R] in groups (``groups``: ids [B] or a group
    size); the semantics are those of :func:`fastrl.ops.group_advantages.group_advantages`, arguments
    unchecked. Statistics in fp64 over fp32-rounded values; NaN / inf rewards are unscorable."""
    r = rewards.double().reshape(rewards.shape[0], -1)
    size, device = r.shape[0], r.device
    if isinstance(groups, int):
        index = torch.arange(size, device=device) // groups
        n = size // groups
    else:
        _, index = torch.unique(groups.long().clamp(min=0), return_inverse=True)
        n = int(index.max()) + 1 if size else 0
    w = (torch.ones(r.shape[1], dtype=torch.float64, device=device) if reward_weights is None
         else reward_weights.double().to(device))
    w = torch.where(torch.isfinite(w), w, 0.0)
    base = None if baseline_rewards is None else baseline_rewards.double().reshape(r.shape)
    if estimator == "pref_grpo":  # one value per sample: its win rate within the group
        valid = torch.isfinite(r[:, 0])
        same = index[:, None] == index[None, :]
        if preferences.shape[1] != size:  # [B, G] blocks: P[i, j - g * G] for j in group g, = P[i, j % G]
            p = preferences.double()[:, torch.arange(size, device=device) % preferences.shape[1]]
        else:
            p = preferences.double()
        p = torch.where(p.isnan(), 0.5, p.clamp(0, 1))
        read = same & valid[:, None] & valid[None, :] & ~torch.eye(size, dtype=torch.bool, device=device)
        count = _segment_sum(valid.double(), index, n)[index]
        wins = torch.where(read, p, 0.0).sum(1)
        columns = [(torch.where(valid, _safe_divide(wins, count - 1).float().double(), 0.0), valid)]
    elif multi_reward == "sum_then_normalize":
        x, valid = _combined(r, w)
        if base is not None:
            b, valid_b = _combined(base, w)
            x, valid = _fp32(x - b, valid & valid_b)
        columns = [(x, valid)]
    else:
        columns = []
        for c in range(r.shape[1]):
            x, valid = _fp32(r[:, c], torch.isfinite(r[:, c]))
            if base is not None:
                b, valid_b = _fp32(base[:, c], torch.isfinite(base[:, c]))
                x, valid = _fp32(x - b, valid & valid_b)
            columns.append((x, valid))
    advantages = [_column_advantages(torch.where(valid, x, 0.0), valid, index, n, estimator, scale, eps, lengths)
                  for x, valid in columns]
    if multi_reward == "sum_then_normalize":
        return advantages[0].float()
    # normalize_then_sum: the weighted sum of the columns' advantages, divided by its batch std
    total = sum(w[c] * a for c, a in enumerate(advantages))
    any_valid = torch.stack([valid for _, valid in columns]).any(0)
    std = _segment_mean_std(total, any_valid, torch.zeros_like(index), 1)[2]
    return torch.where(any_valid, _safe_divide(total, std + eps), 0.0).float()
