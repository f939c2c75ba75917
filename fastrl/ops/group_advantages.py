"""Group-relative advantages of the GRPO family from per-sample rewards, in one kernel launch.

>>> import torch
>>> from fastrl.ops.group_advantages import group_advantages
>>> rewards = torch.tensor([1.0, 2.0, 0.0, 2.0, 5.0])
>>> group_ids = torch.tensor([3, 0, 3, 0, 7])  # any non-negative ids, in any order
>>> [round(a, 4) for a in group_advantages(rewards, group_ids).tolist()]  # (R - mean) / (std + 1e-4)
[0.707, 0.0, -0.707, 0.0, 0.0]
>>> group_advantages(rewards, group_ids, estimator="dr_grpo").tolist()  # R - mean
[0.5, 0.0, -0.5, 0.0, 0.0]
>>> group_advantages(torch.tensor([1.0, float("nan"), 0.0, 4.0]), 2, estimator="rloo").tolist()
[0.0, 0.0, -4.0, 4.0]

Group 0 holds two equal rewards and group 7 a single one: both get 0. The NaN reward (unscorable)
gets 0 and leaves its group with one scorable sample, whose leave-one-out baseline is undefined: 0.
"""

from __future__ import annotations

import numbers

import torch

from fastrl import _checks
from fastrl._checks import INDEX_DTYPES, raise_first
from fastrl.ops import torch_impl
from fastrl.ops.dispatch import resolve

__all__ = ["group_advantages"]

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax", "opo", "pref_grpo")
SCALES = ("group", "batch", "none")
MULTI_REWARDS = ("sum_then_normalize", "normalize_then_sum")
REWARD_DTYPES = (*_checks.FLOAT_DTYPES, torch.float64)
_MAX_BLOCK = 2048  # samples per loop step of the kernel (tests lower it to exercise the loops)
_UNGROUPED = ("reinforce_pp", "remax")  # estimators that never read the groups


def group_advantages(
    rewards: torch.Tensor,
    groups: torch.Tensor | int,
    *,
    estimator: str = "grpo",
    scale: str = "group",
    eps: float = 1e-4,
    reward_weights: torch.Tensor | None = None,
    multi_reward: str = "sum_then_normalize",
    lengths: torch.Tensor | None = None,
    baseline_rewards: torch.Tensor | None = None,
    preferences: torch.Tensor | None = None,
) -> torch.Tensor:
    """The advantage of each of B samples from its reward(s) and the group (prompt) it belongs to.

    NaN marks an unscorable sample (the reward function returned nothing): it is left out of every
    statistic and gets advantage 0. Means and stds are over a group's scorable samples; every std is
    the unbiased one (``torch.std``'s default correction = 1, as TRL's GRPO), and the std of fewer
    than 2 values is 0. Every division by ``std + eps`` gives 0 where that is 0 (an all-equal group
    with ``eps=0``). A group whose scorable rewards are all equal gets exactly 0 from every estimator
    with a group baseline (all but ``reinforce_pp`` and ``remax``); never NaN. Values are rounded to
    fp32 (the working precision) before the statistics, which accumulate in fp64.

    On CUDA: one Triton launch for the whole batch, whatever the options: a single program (one CTA)
    that loops over the batch in blocks of 2048 samples, a few passes (one more per reward column with
    ``normalize_then_sum``), keeping the group statistics in scratch memory it initialises itself
    (``group_ids`` go through an in-kernel hash table of the next power of two >= 2B slots, so ids are
    arbitrary). No host sync and nothing data-dependent on the host: a call can be captured in a CUDA
    graph (the value checks are skipped while capturing). Its time grows linearly with B (it is
    meant for the B of an RL step, up to ~64k); ``pref_grpo`` reads, per sample, the index range its
    group spans, so with ``group_ids`` whose groups are spread over the whole batch it costs O(B^2).
    Elsewhere the torch reference :func:`fastrl.ops.torch_impl.group_advantages` runs (see
    :mod:`fastrl.ops.dispatch`).

    Args:
        rewards: ``[B]`` or ``[B, R]`` fp32, bf16, fp16 or fp64, any strides: one reward, or R
            rewards, per sample; NaN for an unscorable one. With ``pref_grpo`` it must be ``[B]`` and
            is read only for NaN (samples to leave out).
        groups: either ``group_ids`` ``[B]`` int32 / int64 (any non-negative ids, any order, groups
            of any sizes, e.g. ``[3, 0, 3, 0, 7]``) or ``group_size`` G, an int: samples
            ``[g G, (g + 1) G)`` form group g and G must divide B.
        estimator: how a sample's reward R becomes its advantage:

            - ``"grpo"``: ``(R - mean_g) / (std + eps)`` with std by ``scale``. With eps = 1e-4
              these are TRL's numbers (TRL's NaN for a group of one is 0 here).
            - ``"dr_grpo"``: ``R - mean_g`` (``grpo`` with ``scale="none"``; ``scale`` is ignored).
            - ``"rloo"``: ``R_i - mean_{j != i} R_j``, 0 in a group of one scorable sample.
            - ``"reinforce_pp"`` (REINFORCE++): ``(R - mean_B) / (std_B + eps)`` over the batch;
              groups unused.
            - ``"reinforce_pp_baseline"``: ``c = R - mean_g``, then ``c / (std_B(c) + eps)``. The
              batch mean of ``c`` is 0 by construction and not subtracted again (that keeps equal
              groups at exactly 0).
            - ``"remax"``: ``R_i - baseline_rewards_i``.
            - ``"opo"``: ``R_i - sum_j L_j R_j / sum_j L_j`` over the group, ``L = lengths``; the
              plain mean when the group's lengths sum to 0.
            - ``"pref_grpo"``: win rates from pairwise preferences, ``w_i = sum_j P[i, j] / (n_g -
              1)`` over the other scorable samples j of i's group (with P = 1 win, 0.5 tie, 0 loss:
              ``(wins + ties / 2) / (G - 1)``), then ``grpo`` on ``w`` (``scale`` applies; "group"
              is Pref-GRPO's z-score).
        scale: the std ``grpo`` and ``pref_grpo`` divide by: ``"group"`` std_g, ``"batch"`` the std
            of all scorable rewards of the batch (TRL ``scale_rewards="batch"``), ``"none"``: no
            division. The other estimators have their fixed normalisation above and ignore it.
        eps: >= 0, added to each std before the division.
        reward_weights: ``[R]`` fp32, bf16, fp16 or fp64, finite (default all 1): the weight of each
            reward column. May also be a list of numbers (copied to the device on each call; pass a
            tensor inside a CUDA graph).
        multi_reward: how several rewards (``[B, R]``) combine:

            - ``"sum_then_normalize"``: R_i = the weighted sum of sample i's non-NaN rewards (TRL's
              ``nansum``; a sample with no finite reward is unscorable, where TRL would count 0),
              then the estimator.
            - ``"normalize_then_sum"`` (GDPO): the estimator on each column alone (a NaN leaves that
              column's statistics only), the weighted sum of the columns' advantages, then that sum
              divided by its batch std (+ eps), not re-centred (for a group baseline its batch mean
              is 0 already). For one reward (``[B]`` or ``[B, 1]``) this is the estimator followed
              by that division.
        lengths: ``[B]`` int32 / int64 or floating (fp32, bf16, fp16, fp64), finite and >= 0: the
            completion lengths; required by ``"opo"`` and only used there.
        baseline_rewards: the shape of ``rewards`` (``[B]`` or ``[B, R]``), fp32, bf16, fp16 or
            fp64: per sample, the reward(s) of its prompt's greedy completion (repeat it over the
            group); combined over columns like ``rewards``, and NaN there makes the sample
            unscorable. Required by ``"remax"`` and only used there.
        preferences: ``[B, B]`` fp32, bf16, fp16 or fp64, ``P[i, j]`` = how much sample i beats
            sample j, in [0, 1]; or, with ``group_size`` G, ``[B, G]``, the diagonal blocks:
            ``P[i, k]`` about sample ``g G + k``. Only entries of two different samples of one group
            are read (the rest may hold anything). Required by ``"pref_grpo"`` and only used there.

    Returns:
        Advantages ``[B]`` fp32, without autograd (rewards carry no gradient).

    Raises:
        TypeError: an argument of the wrong kind, naming it.
        ValueError: a wrong shape, dtype, device or choice, naming the argument; a setting tensor
            given to an estimator that does not use it, or missing for one that does; an inf reward
            (or an fp64 one beyond the fp32 range). The value checks (inf rewards, negative ids,
            lengths, preference entries, finite weights) read the tensors, one device sync; they are
            skipped under ``torch.compile``, where the kernel treats inf as NaN, clamps negative ids
            to 0 and preferences into [0, 1], and zeroes non-finite weights and lengths.
    """
    _checks.check_tensor("rewards", rewards, dtypes=REWARD_DTYPES)
    if rewards.dim() not in (1, 2) or (rewards.dim() == 2 and rewards.shape[1] == 0):
        raise ValueError(f"rewards must be [B] or [B, R] with R >= 1, got shape {tuple(rewards.shape)}")
    device, size = rewards.device, rewards.shape[0]
    n_cols = rewards.shape[1] if rewards.dim() == 2 else 1
    estimator = _choice("estimator", estimator, ESTIMATORS)
    scale = _choice("scale", scale, SCALES)
    multi_reward = _choice("multi_reward", multi_reward, MULTI_REWARDS)
    eps = _checks.check_real("eps", eps, low=0.0)
    checks = _ValueChecks(device)
    checks.add(lambda: (_has_inf(rewards), f"rewards {_NO_INF}"))

    group_ids, group_size = None, 0
    if isinstance(groups, torch.Tensor):
        _checks.check_tensor("group_ids", groups, ndim=1, dtypes=INDEX_DTYPES, device=device)
        if groups.shape[0] != size:
            raise ValueError(f"group_ids must hold one id per sample ({size}), got shape {tuple(groups.shape)}")
        group_ids = groups
        checks.add(lambda: ((group_ids < 0).any(), "group_ids must be >= 0"))
    elif isinstance(groups, numbers.Integral) and not isinstance(groups, bool):
        group_size = _checks.check_int("group_size", groups, low=1)
        if size % group_size:
            raise ValueError(f"group_size ({group_size}) must divide the number of samples ({size})")
    else:
        raise TypeError(f"groups must be group_ids (an int32 / int64 tensor [B]) or group_size (an int), "
                        f"got {type(groups).__name__}")

    if reward_weights is not None:
        if isinstance(reward_weights, (list, tuple)):
            if not all(isinstance(w, numbers.Real) and not isinstance(w, bool) for w in reward_weights):
                raise TypeError("reward_weights must be a tensor [R] or a list of numbers")
            reward_weights = torch.tensor(reward_weights, dtype=torch.float32, device=device)
        _checks.check_tensor("reward_weights", reward_weights, ndim=1, dtypes=REWARD_DTYPES, device=device)
        if reward_weights.shape[0] != n_cols:
            raise ValueError(f"reward_weights must hold one weight per reward ({n_cols}), got shape "
                             f"{tuple(reward_weights.shape)}")
        checks.add(lambda: ((~torch.isfinite(reward_weights)).any(), "reward_weights must be finite"))

    _needed("lengths", lengths, estimator, "opo")
    if lengths is not None:
        _checks.check_tensor("lengths", lengths, ndim=1, device=device)
        if lengths.dtype not in (*INDEX_DTYPES, *REWARD_DTYPES):
            raise ValueError(f"lengths must have an int32 / int64 or floating dtype, got {lengths.dtype}")
        if lengths.shape[0] != size:
            raise ValueError(f"lengths must hold one length per sample ({size}), got shape {tuple(lengths.shape)}")
        checks.add(lambda: ((~torch.isfinite(lengths) | (lengths < 0)).any(), "lengths must be finite and >= 0"))

    _needed("baseline_rewards", baseline_rewards, estimator, "remax")
    if baseline_rewards is not None:
        _checks.check_tensor("baseline_rewards", baseline_rewards, dtypes=REWARD_DTYPES, device=device)
        if baseline_rewards.shape != rewards.shape:
            raise ValueError(f"baseline_rewards must have the shape of rewards {tuple(rewards.shape)}, got "
                             f"{tuple(baseline_rewards.shape)}")
        checks.add(lambda: (_has_inf(baseline_rewards), f"baseline_rewards {_NO_INF}"))

    _needed("preferences", preferences, estimator, "pref_grpo")
    if preferences is not None:
        if rewards.dim() != 1:
            raise ValueError("rewards must be [B] with estimator='pref_grpo' (it is read only for NaN: samples to "
                             f"leave out), got shape {tuple(rewards.shape)}")
        _checks.check_tensor("preferences", preferences, ndim=2, dtypes=REWARD_DTYPES, device=device)
        shapes = [(size, size)] + ([(size, group_size)] if group_size else [])
        if tuple(preferences.shape) not in shapes:
            wanted = " or ".join(str(s) for s in shapes)
            raise ValueError(f"preferences must have shape {wanted} ([B, B]; [B, G] per group with group_size), "
                             f"got {tuple(preferences.shape)}")
        checks.add(lambda: (_bad_preferences(preferences, group_ids, group_size),
                            "preferences must be in [0, 1] where two samples of one group meet"))
    raise_first(checks.flags())
    return _group_advantages(rewards, group_ids, group_size, reward_weights, lengths, baseline_rewards, preferences,
                             estimator, scale, multi_reward, eps)


_NO_INF = "must not hold inf, nor fp64 values beyond the fp32 range (NaN marks an unscorable sample)"


def _has_inf(rewards: torch.Tensor) -> torch.Tensor:
    return torch.isinf(rewards.float()).any()


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _needed(name: str, value: object, estimator: str, user: str) -> None:
    if estimator == user and value is None:
        raise ValueError(f"estimator={user!r} needs {name}")
    if estimator != user and value is not None:
        raise ValueError(f"{name} is only used by estimator={user!r}; drop it (or pick that estimator)")


class _ValueChecks:
    """The ``(flag, message)`` checks for :func:`raise_first`, built only where they will run: not
    under ``torch.compile`` (a data-dependent branch) nor during CUDA-graph capture (no syncs there)."""

    def __init__(self, device: torch.device):
        self.enabled = not torch.compiler.is_compiling() and not (
            device.type == "cuda" and torch.cuda.is_current_stream_capturing())
        self.items: list[tuple[torch.Tensor, str]] = []

    def add(self, make) -> None:
        if self.enabled:
            self.items.append(make())

    def flags(self) -> list[tuple[torch.Tensor, str]]:
        return self.items


def _bad_preferences(preferences: torch.Tensor, group_ids: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """True when an entry the op reads (two different samples of one group) is outside [0, 1] or NaN."""
    size, width = preferences.shape
    bad = ~((preferences >= 0) & (preferences <= 1))
    idx = torch.arange(size, device=preferences.device)
    if width != size:  # [B, G] blocks: every entry but sample i against itself, column i % G
        read = torch.arange(width, device=idx.device)[None, :] != (idx % width)[:, None]
    else:
        group = group_ids if group_ids is not None else idx // group_size
        read = (group[:, None] == group[None, :]) & (idx[:, None] != idx[None, :])
    return (bad & read).any()


def _launch(rewards, group_ids, group_size, reward_weights, lengths, baseline, preferences, estimator, scale,
            multi_reward, eps):
    import triton

    from fastrl.kernels import launch
    from fastrl.kernels import group_advantages as k

    size = rewards.shape[0]
    device = rewards.device
    codes = {"grpo": k.GRPO, "dr_grpo": k.GRPO, "rloo": k.RLOO, "reinforce_pp": k.REINFORCE_PP,
             "reinforce_pp_baseline": k.REINFORCE_PP_BASELINE, "remax": k.REMAX, "opo": k.OPO,
             "pref_grpo": k.PREF_GRPO}
    scale_code = {"group": k.SCALE_GROUP, "batch": k.SCALE_BATCH, "none": k.SCALE_NONE}[
        "none" if estimator == "dr_grpo" else scale]
    grouped = estimator not in _UNGROUPED
    hashed = grouped and group_ids is not None
    if hashed:  # an open-addressing table at most half full
        n_slots = max(2, triton.next_power_of_2(2 * size))
    else:
        n_slots = size // group_size if grouped else 1
    n_stats = 5 if estimator == "opo" else 3
    split = multi_reward == "normalize_then_sum"
    keys, slot, span = _scratch(torch.int64, device, n_slots + 1, size, 2 * n_slots) if hashed else [None] * 3
    stats, val, acc = _scratch(torch.float64, device, n_stats * n_slots, size, size if split else 0)
    out = torch.empty(size, dtype=torch.float32, device=device)

    def strides(t, n):
        return (t.stride() + (0,))[:n] if t is not None else (0,) * n

    def given(t):  # pointers a variant does not read still need a tensor
        return out if t is None else t

    # CUDA: at least 128 samples a block (no thread holds a replica that would repeat an atomic); one
    # warp per 128 samples, 16 at 2048. CPU (the interpreter): small blocks exercise the loops.
    low = 128 if device.type == "cuda" else 16
    block = max(low, min(_MAX_BLOCK, triton.next_power_of_2(size)))
    launch(k.group_advantages_kernel, (1,),
           rewards, *strides(rewards, 2), rewards.shape[1] if rewards.dim() == 2 else 1,
           given(reward_weights), *strides(reward_weights, 1), given(group_ids), *strides(group_ids, 1), group_size,
           given(lengths), *strides(lengths, 1), given(baseline), *strides(baseline, 2),
           given(preferences), *strides(preferences, 2),
           out, given(keys), given(slot), given(span), stats, val, given(acc),
           size, n_slots, n_slots.bit_length() - 1, eps,
           ESTIMATOR=codes[estimator], SCALE=scale_code, SPLIT=split, HASHED=hashed,
           HAS_WEIGHTS=reward_weights is not None,
           PREF_BLOCKED=preferences is not None and preferences.shape[1] != size, NSTATS=n_stats, BLOCK=block,
           num_warps=max(1, min(8, block // 128)))
    return out


def _scratch(dtype: torch.dtype, device: torch.device, *sizes: int) -> list[torch.Tensor | None]:
    """Uninitialised views of one allocation (no kernel runs), each 16-byte aligned; None for size 0."""
    starts, total = [], 0
    for n in sizes:
        starts.append(total)
        total += (n + 1) // 2 * 2  # 8-byte elements: an even offset is 16-byte aligned
    buffer = torch.empty(max(total, 1), dtype=dtype, device=device)
    return [buffer[a:a + n] if n else None for a, n in zip(starts, sizes)]


@torch.library.custom_op("fastrl::group_advantages", mutates_args=())
def _group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor | None, group_size: int,
                      reward_weights: torch.Tensor | None, lengths: torch.Tensor | None,
                      baseline_rewards: torch.Tensor | None, preferences: torch.Tensor | None, estimator: str,
                      scale: str, multi_reward: str, eps: float) -> torch.Tensor:
    """The operator under :func:`group_advantages` (arguments checked there): [B] fp32. ``group_ids``
    or, when it is None, ``group_size``."""
    if rewards.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float32, device=rewards.device)
    if resolve(rewards.device) == "torch":
        return torch_impl.group_advantages(
            rewards, group_ids if group_ids is not None else group_size, estimator=estimator, scale=scale, eps=eps,
            reward_weights=reward_weights, multi_reward=multi_reward, lengths=lengths,
            baseline_rewards=baseline_rewards, preferences=preferences)
    return _launch(rewards, group_ids, group_size, reward_weights, lengths, baseline_rewards, preferences, estimator,
                   scale, multi_reward, eps)


@_group_advantages.register_fake
def _(rewards, group_ids, group_size, reward_weights, lengths, baseline_rewards, preferences, estimator, scale,
      multi_reward, eps):
    return rewards.new_empty(rewards.shape[0], dtype=torch.float32)
