"""fastrl.ops.group_advantages: every estimator x scale x multi-reward mode against an independent fp64
implementation (plain Python loops over groups), the Triton kernel (in the interpreter, with blocks
shorter than the batch) against the reference, TRL's formula, NaN / all-equal groups, one launch,
compile / opcheck / ahead-of-time GPU builds, and every argument check."""

from __future__ import annotations

import importlib
import math
import re
import struct
from collections import defaultdict

import pytest
import torch

from fastrl.ops import backend, resolve
from fastrl.ops.group_advantages import ESTIMATORS, MULTI_REWARDS, SCALES, group_advantages
from conftest import refusal_test

OP = importlib.import_module("fastrl.ops.group_advantages")  # the module, whatever fastrl.ops exports
NAN = float("nan")
GROUP_BASELINE = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "opo", "pref_grpo")

# Out of order, sizes 5, 5, 6, 2, 3, 1, 1; one id far above B (hashing, not indexing)
IDS = [5, 2, 9, 2, 5, 40, 9, 2, 5, 9, 7, 2, 5, 1000003, 9, 40, 2, 5, 7, 9, 7, 9, 31]
GROUP_SIZE, N_CONTIGUOUS = 4, 24


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch, request):
    if "gpu" not in request.keywords:  # batches of 23-61 samples: several blocks per loop in the interpreter
        monkeypatch.setattr(OP, "_MAX_BLOCK", 16)


# ---------------------------------------------------------------------------------------------------
# The independent fp64 implementation: Python floats, one group at a time


def _f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def _mean(xs):
    return math.fsum(xs) / len(xs)


def _std(xs):  # unbiased (correction = 1), 0 below two values
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _div(a, b):
    return a / b if b > 0 else 0.0


def _advantages_of(x, groups, estimator, scale, eps, lengths):
    """One value per sample (None = unscorable) -> advantages, by the formulas of docs/losses.md#advantage-estimators."""
    n = len(x)
    a = [0.0] * n
    scorable = [i for i in range(n) if x[i] is not None]
    if estimator == "reinforce_pp":
        vals = [x[i] for i in scorable]
        for i in scorable:
            a[i] = _div(x[i] - _mean(vals), _std(vals) + eps)
        return a
    if estimator == "remax":
        return [0.0 if v is None else v for v in x]
    members = defaultdict(list)
    for i in scorable:
        members[groups[i]].append(i)
    batch_std = _std([x[i] for i in scorable])
    centred = {}
    for idx in members.values():
        vals = [x[i] for i in idx]
        m, s = _mean(vals), _std(vals)
        for i in idx:
            if estimator == "dr_grpo" or (estimator in ("grpo", "pref_grpo") and scale == "none"):
                a[i] = x[i] - m
            elif estimator in ("grpo", "pref_grpo"):
                a[i] = _div(x[i] - m, (s if scale == "group" else batch_std) + eps)
            elif estimator == "rloo":
                others = [x[j] for j in idx if j != i]
                a[i] = x[i] - _mean(others) if others else 0.0
            elif estimator == "opo":
                total = math.fsum(lengths[j] for j in idx)
                base = math.fsum(lengths[j] * x[j] for j in idx) / total if total > 0 else m
                a[i] = x[i] - base
            else:  # reinforce_pp_baseline
                centred[i] = x[i] - m
    if estimator == "reinforce_pp_baseline":
        s = _std(list(centred.values()))
        for i, c in centred.items():
            a[i] = _div(c, s + eps)
    return a


def _combine(row, weights):
    fin = [(w, r) for w, r in zip(weights, row) if math.isfinite(r)]
    return _f32(math.fsum(w * r for w, r in fin)) if fin else None


def by_hand(rewards, groups, *, estimator="grpo", scale="group", eps=1e-4, weights=None,
            multi_reward="sum_then_normalize", lengths=None, baseline=None, preferences=None):
    """rewards: list of rows (lists of floats, NaN allowed); groups: one id per row."""
    n, n_cols = len(rewards), len(rewards[0])
    weights = weights or [1.0] * n_cols
    if estimator == "pref_grpo":
        ok = [math.isfinite(row[0]) for row in rewards]
        wins = []
        for i in range(n):
            others = [j for j in range(n) if j != i and ok[j] and groups[j] == groups[i]]
            wins.append(_f32(_div(math.fsum(preferences[i][j] for j in others), len(others))) if ok[i] else None)
        columns = [wins]
    elif multi_reward == "sum_then_normalize":
        x = [_combine(row, weights) for row in rewards]
        if baseline is not None:
            b = [_combine(row, weights) for row in baseline]
            x = [None if v is None or c is None else _f32(v - c) for v, c in zip(x, b)]
        columns = [x]
    else:
        columns = []
        for c in range(n_cols):
            x = [_f32(row[c]) if math.isfinite(row[c]) else None for row in rewards]
            if baseline is not None:
                x = [None if v is None or not math.isfinite(b[c]) else _f32(v - _f32(b[c]))
                     for v, b in zip(x, baseline)]
            columns.append(x)
    per_column = [_advantages_of(x, groups, estimator, scale, eps, lengths) for x in columns]
    if multi_reward == "sum_then_normalize":
        return per_column[0]
    valid = [any(x[i] is not None for x in columns) for i in range(n)]
    total = [math.fsum(w * a[i] for w, a, x in zip(weights, per_column, columns) if x[i] is not None)
             for i in range(n)]
    s = _std([t for t, v in zip(total, valid) if v])
    return [_div(t, s + eps) if v else 0.0 for t, v in zip(total, valid)]


# ---------------------------------------------------------------------------------------------------
# Inputs


def _batch(kind: str, seed: int = 0):
    """(rewards [B, 3], groups, lengths, baseline [B, 3], preferences [B, B]) with NaN rewards (one
    whole row), a group of equal rewards, a group left with one scorable sample, a group whose
    lengths are all 0, and NaN preferences wherever two groups meet (they must never be read)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "ids":
        ids = torch.tensor(IDS)
    else:
        ids = torch.arange(N_CONTIGUOUS) // GROUP_SIZE
    n = ids.shape[0]
    levels = torch.tensor([0.0, 0.25, 0.5, 1.0, 2.0])
    rewards = levels[torch.randint(0, 5, (n, 3), generator=g)]
    rewards[:, 2] = torch.randn(n, generator=g)
    baseline = levels[torch.randint(0, 5, (n, 3), generator=g)]
    first = {}
    for i, v in enumerate(ids.tolist()):
        first.setdefault(v, []).append(i)
    groups = list(first.values())
    equal, lonely, short = groups[3], groups[4], groups[1]
    rewards[equal] = torch.tensor([0.7, -1.5, 3.0])  # every column equal within the group
    rewards[lonely[1:]] = NAN  # one scorable sample left (whole rows NaN)
    rewards[0, 1] = NAN
    rewards[5, 0] = NAN
    baseline[2, 0] = NAN
    lengths = torch.randint(0, 40, (n,), generator=g)
    lengths[short] = 0
    pref = torch.randint(0, 3, (n, n), generator=g).double() / 2
    same = ids[:, None] == ids[None, :]
    pref = torch.where(same, pref, NAN)
    return rewards, (ids if kind == "ids" else GROUP_SIZE), lengths, baseline, pref


def _kwargs(estimator, rewards, lengths, baseline, pref):
    kw = {}
    if estimator == "opo":
        kw["lengths"] = lengths
    if estimator == "remax":
        kw["baseline_rewards"] = baseline
    if estimator == "pref_grpo":
        kw["preferences"] = pref
        rewards = rewards[:, 0].contiguous()
    return rewards, kw


def _hand(rewards, groups, kw, **options):
    n = rewards.shape[0]
    ids = groups.tolist() if isinstance(groups, torch.Tensor) else [i // groups for i in range(n)]
    return by_hand(rewards.double().reshape(n, -1).tolist(), ids, lengths=_list(kw.get("lengths")),
                   baseline=_list(kw.get("baseline_rewards")), preferences=_list(kw.get("preferences")), **options)


def _list(t):
    return None if t is None else t.double().tolist()


def _run(name, *args, **kwargs):
    with backend(name):
        return group_advantages(*args, **kwargs)


def _close(got, want, rtol=1e-5, atol=1e-6):
    want = torch.as_tensor(want, dtype=torch.float64)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------------
# Every estimator x scale x multi-reward mode: by hand, reference, Triton (interpreter)


@pytest.mark.parametrize("kind", ["ids", "size"])
@pytest.mark.parametrize("multi_reward", MULTI_REWARDS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_matches_fp64_by_hand_on_both_backends(estimator, scale, multi_reward, kind):
    rewards, groups, lengths, baseline, pref = _batch(kind)
    rewards, kw = _kwargs(estimator, rewards, lengths, baseline, pref)
    weights = None if rewards.dim() == 1 else torch.tensor([1.0, 0.5, -2.0])
    options = dict(estimator=estimator, scale=scale, multi_reward=multi_reward)
    want = _hand(rewards, groups, kw, weights=None if weights is None else weights.tolist(), **options)
    ref = _run("torch", rewards, groups, reward_weights=weights, **options, **kw)
    tri = _run("triton", rewards, groups, reward_weights=weights, **options, **kw)
    _close(ref, want)
    _close(tri, want)
    torch.testing.assert_close(tri, ref, rtol=1e-5, atol=1e-6)
    nan_rows = torch.isnan(rewards.reshape(rewards.shape[0], -1)).all(1)
    assert (tri[nan_rows] == 0).all()


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_all_equal_groups_and_unscorable_samples_get_exactly_zero(estimator):
    # values that are not sums of small powers of two, fp64 input: the zero must still be exact
    ids = torch.tensor([4, 1, 4, 1, 4, 8, 8, 1])
    rewards = torch.tensor([0.1 + 0.2, 1 / 3, 0.1 + 0.2, 1 / 3, 0.1 + 0.2, NAN, NAN, NAN], dtype=torch.float64)
    kw = dict(lengths=torch.tensor([3.0, 0.0, 7.5, 2.0, 1.0, 4.0, 4.0, 4.0])) if estimator == "opo" else {}
    if estimator == "remax":
        kw = dict(baseline_rewards=rewards.clone())
    if estimator == "pref_grpo":
        kw = dict(preferences=torch.full((8, 8), 0.5))  # all ties
    for name in ("torch", "triton"):
        for eps in (0.0, 1e-4):
            for scale in SCALES:
                a = _run(name, rewards, ids, estimator=estimator, eps=eps, scale=scale, **kw)
                if estimator in GROUP_BASELINE or estimator == "remax":
                    assert a.tolist() == [0.0] * 8, (name, eps, scale)
                else:  # reinforce_pp: a batch baseline; the batch is not all equal
                    assert torch.isfinite(a).all() and a[5:].tolist() == [0.0] * 3


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_all_unscorable_and_single_sample_batches(name):
    for estimator in ("grpo", "reinforce_pp", "rloo"):
        assert _run(name, torch.full((4,), NAN), 2, estimator=estimator).tolist() == [0.0] * 4
        assert _run(name, torch.tensor([3.0]), 1, estimator=estimator).tolist() == [0.0]
        assert _run(name, torch.full((3, 2), NAN), torch.tensor([0, 0, 1]), estimator=estimator,
                    multi_reward="normalize_then_sum").tolist() == [0.0] * 3


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_explicit_numbers(name):
    r = torch.tensor([1.0, 0.0, 3.0, 3.0, 1.0, 2.0])
    ids = torch.tensor([0, 0, 1, 1, 1, 2])
    # rloo: group 1 (3, 3, 1): 3 - 2, 3 - 2, 1 - 3
    assert _run(name, r, ids, estimator="rloo").tolist() == [1.0, -1.0, 1.0, 1.0, -2.0, 0.0]
    assert _run(name, r, ids, estimator="dr_grpo").tolist() == pytest.approx([0.5, -0.5, 2 / 3, 2 / 3, -4 / 3, 0.0])
    # opo: group 1 lengths 1, 1, 2: b = (3 + 3 + 2) / 4 = 2
    a = _run(name, r, ids, estimator="opo", lengths=torch.tensor([5, 5, 1, 1, 2, 9]))
    assert a.tolist() == pytest.approx([0.5, -0.5, 1.0, 1.0, -1.0, 0.0])
    a = _run(name, r, ids, estimator="remax", baseline_rewards=torch.tensor([0.5, 0.5, 3.0, 3.0, 3.0, NAN]))
    assert a.tolist() == [0.5, -0.5, 0.0, 0.0, -2.0, 0.0]
    # pref_grpo, one group of 3: 0 beats 1 and 2; 1 ties 2 -> win rates 1, 1/4, 1/4
    p = torch.tensor([[NAN, 1.0, 1.0], [0.0, NAN, 0.5], [0.0, 0.5, NAN]])
    w = torch.tensor([1.0, 0.25, 0.25], dtype=torch.float64)
    want = (w - w.mean()) / (w.std() + 1e-4)
    _close(_run(name, torch.zeros(3), 3, estimator="pref_grpo", preferences=p), want)
    # the [B, G] per-group form: two groups of 2; sample 2 beats 3, 0 and 1 tie
    blocks = torch.tensor([[NAN, 0.5], [0.5, NAN], [NAN, 1.0], [0.0, NAN]])
    assert _run(name, torch.zeros(4), 2, estimator="pref_grpo", preferences=blocks, scale="none").tolist() == \
        [0.0, 0.0, 0.5, -0.5]


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_trl_formulas(name):
    """TRL's GRPO advantages, its code transcribed (GRPOTrainer: weighted nansum over the reward functions,
    group mean, std by scale_rewards group / batch / none, + 1e-4); TRL itself is not a dependency."""
    g = torch.Generator().manual_seed(3)
    per_func = torch.randn(12, 2, generator=g)
    per_func[3, 1] = NAN
    weights = torch.tensor([1.0, 0.3])
    rewards = (per_func * weights).nansum(dim=1)
    grouped = rewards.view(-1, 4)
    mean = grouped.mean(dim=1).repeat_interleave(4)
    for scale, std in (("group", grouped.std(dim=1).repeat_interleave(4)), ("batch", rewards.std()),
                       ("none", None)):
        want = rewards - mean if std is None else (rewards - mean) / (std + 1e-4)
        got = _run(name, per_func, 4, scale=scale, reward_weights=weights)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_normalize_then_sum_is_gdpo(name):
    """GDPO: each reward z-scored in its group, weighted sum, then divided by the batch std."""
    g = torch.Generator().manual_seed(4)
    r = torch.randn(16, 3, generator=g)
    w = torch.tensor([2.0, 1.0, 0.5])
    grouped = r.double().view(4, 4, 3)
    z = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
    total = (z.reshape(16, 3) * w.double()).sum(1)
    got = _run(name, r, 4, reward_weights=w, multi_reward="normalize_then_sum")
    _close(got, total / (total.std() + 1e-4))
    assert abs(float(got.double().mean())) < 1e-6  # a group baseline: already centred


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_layouts_and_dtypes(name):
    """[B] and [B, 1] agree; strided rewards, int32 ids, float lengths, bf16 / fp16 / fp64 rewards, list
    weights, the [B, B] and [B, G] preference forms."""
    rewards, groups, lengths, baseline, pref = _batch("size", seed=7)
    col = rewards[:, 2]  # strided
    assert col.stride(0) == 3
    a = _run(name, col, groups)
    torch.testing.assert_close(a, _run(name, col[:, None].contiguous(), groups), rtol=0, atol=0)
    ids = torch.arange(N_CONTIGUOUS, dtype=torch.int32) // GROUP_SIZE
    torch.testing.assert_close(_run(name, col, ids), a, rtol=1e-6, atol=1e-6)
    t = rewards.t().contiguous().t()  # [B, 3] with strides (1, B)
    got = _run(name, t, groups, estimator="opo", lengths=lengths.double(), reward_weights=[1, 2, 3])
    want = _run(name, rewards, groups, estimator="opo", lengths=lengths, reward_weights=torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        low = rewards.to(dtype)
        want = _hand(low, groups, {}, estimator="grpo", scale="group")
        _close(_run(name, low, groups), want)
    full = torch.where(torch.isnan(pref), 0.0, pref)
    blocks = torch.stack([full[i, (i // GROUP_SIZE) * GROUP_SIZE:][:GROUP_SIZE] for i in range(N_CONTIGUOUS)])
    torch.testing.assert_close(_run(name, col, groups, estimator="pref_grpo", preferences=blocks),
                               _run(name, col, groups, estimator="pref_grpo", preferences=pref.float()), rtol=0, atol=0)


def test_triton_hash_table_with_colliding_and_huge_ids():
    """Many groups with ids up to 2**62 (and ids equal modulo the table size): the table probes."""
    g = torch.Generator().manual_seed(5)
    n = 61
    distinct = torch.cat([torch.randint(0, 2 ** 62, (20,), generator=g), torch.arange(5) * 128,
                          torch.arange(5) * 2 ** 40])
    ids = distinct[torch.randint(0, distinct.shape[0], (n,), generator=g)]
    rewards = torch.randn(n, generator=g)
    pref = torch.rand(n, n, generator=g)
    for kw in (dict(), dict(estimator="rloo"), dict(estimator="pref_grpo", preferences=pref),
               dict(estimator="reinforce_pp_baseline")):
        want = _hand(rewards, ids, {k: v for k, v in kw.items() if k == "preferences"},
                     **{k: v for k, v in kw.items() if k != "preferences"})
        _close(_run("triton", rewards, ids, **kw), want)
        _close(_run("torch", rewards, ids, **kw), want)


def test_unchecked_values_never_give_nan():
    """What the Python checks refuse (skipped under torch.compile) reaches the op harmlessly: inf rewards
    count as unscorable, negative ids as 0, NaN weights / lengths as 0, preferences are clamped."""
    op = torch.ops.fastrl.group_advantages.default
    r = torch.tensor([1.0, float("inf"), 0.0, 2.0, -float("inf"), 5.0])
    ids = torch.tensor([0, 0, -3, 0, 2, 2])
    w = torch.tensor([NAN])
    lengths = torch.tensor([1.0, NAN, -2.0, float("inf"), 1.0, 1.0])
    pref = torch.tensor([[NAN, 7.0, -1.0, NAN, 0.2, 0.1]] * 6)
    for est, extra in (("grpo", {}), ("opo", {"lengths": lengths}), ("pref_grpo", {"preferences": pref}),
                       ("remax", {"baseline_rewards": r.flip(0)})):
        outs = []
        for name in ("torch", "triton"):
            with backend(name):
                args = (r, ids, 0, None, extra.get("lengths"), extra.get("baseline_rewards"),
                        extra.get("preferences"), est, "group", "sum_then_normalize", 1e-4)
                outs.append(op(*args))
                outs.append(op(r[:, None], ids, 0, w, *args[4:9], "normalize_then_sum", 0.0))
        for o in outs:
            assert torch.isfinite(o).all(), (est, outs)
        torch.testing.assert_close(outs[2], outs[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outs[3], outs[1], rtol=1e-5, atol=1e-6)
    # beyond fp32: an fp64 reward, a weighted sum that overflows, a difference that does (remax)
    big = torch.tensor([[1e39, 0.0], [3e38, 3e38], [1.0, 2.0], [-3e38, 0.0]], dtype=torch.float64)
    for name in ("torch", "triton"):
        with backend(name):
            for multi in MULTI_REWARDS:
                a = op(big, None, 2, None, None, None, None, "grpo", "group", multi, 1e-4)
                b = op(big, None, 2, None, None, big.flip(0).neg(), None, "remax", "group", multi, 1e-4)
                assert torch.isfinite(a).all() and torch.isfinite(b).all(), (name, multi, a, b)


def test_empty_batch():
    for name in ("torch", "triton"):
        assert _run(name, torch.zeros(0), 3).shape == (0,)
        assert _run(name, torch.zeros(0, 2), torch.zeros(0, dtype=torch.int64)).dtype == torch.float32


def test_one_launch_on_one_program(launches):
    calls = launches
    rewards, groups, lengths, baseline, pref = _batch("ids")
    with backend("triton"):
        for estimator in ESTIMATORS:
            r, kw = _kwargs(estimator, rewards, lengths, baseline, pref)
            group_advantages(r, groups, estimator=estimator, multi_reward="normalize_then_sum", **kw)
    assert [grid for _, grid in calls] == [(1,)] * len(ESTIMATORS)
    calls.clear()
    group_advantages(rewards, groups)  # auto on a CPU tensor: the torch reference
    assert resolve(rewards.device) == "torch" and calls == []


# ---------------------------------------------------------------------------------------------------
# torch.compile, opcheck, ahead-of-time GPU builds


def test_torch_compile_fullgraph_follows_the_backend():
    rewards, ids, lengths, _, _ = _batch("ids")

    def step(rewards, ids, lengths):
        a = group_advantages(rewards, ids, reward_weights=[1.0, 0.5, 0.25])
        b = group_advantages(rewards[:, 2], 1, estimator="reinforce_pp")
        c = group_advantages(rewards, ids, estimator="opo", lengths=lengths, multi_reward="normalize_then_sum")
        return a + b * c

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with backend("torch"):
        want = step(rewards, ids, lengths)
    for name in ("torch", "triton"):
        with backend(name):
            torch.testing.assert_close(compiled(rewards, ids, lengths), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_opcheck(name):
    rewards, ids, lengths, _, pref = _batch("ids")
    op = torch.ops.fastrl.group_advantages.default
    with backend(name):
        torch.library.opcheck(op, (rewards, ids, 0, torch.tensor([1.0, 2.0, 0.5]), lengths, None, None, "opo", "group",
                                   "normalize_then_sum", 1e-4))
        torch.library.opcheck(op, (rewards[:, 0], None, 23, None, None, None, pref, "pref_grpo", "batch",
                                   "sum_then_normalize", 0.0))


# estimator code, hashed (group_ids), normalize_then_sum, [B, G] preferences
_AOT = {"grpo-ids": (0, True, False, False), "opo-ids-split": (5, True, True, False),
        "pref-ids": (6, True, False, False), "pref-blocks": (6, False, False, True),
        "rpp-baseline-size": (3, False, False, False), "remax-split": (4, False, True, False)}


@pytest.mark.parametrize("variant,capability", [(v, 90) for v in _AOT] + [("grpo-ids", 80), ("pref-ids", 80)])
def test_kernel_compiles_for_the_gpu_ahead_of_time_without_spills(variant, capability):
    from conftest import compile_for_gpu

    from fastrl.kernels import group_advantages as k

    estimator, hashed, split, blocked = _AOT[variant]
    kinds = {"r_ptr": "*bf16", "w_ptr": "*fp32", "ids_ptr": "*i64", "len_ptr": "*i32", "base_ptr": "*bf16",
             "pref_ptr": "*fp32", "out_ptr": "*fp32", "keys_ptr": "*i64", "slot_ptr": "*i64", "span_ptr": "*i64",
             "stats_ptr": "*fp64", "val_ptr": "*fp64", "acc_ptr": "*fp64", "eps": "fp32"}
    constexprs = dict(ESTIMATOR=estimator, SCALE=0, SPLIT=split, HASHED=hashed, HAS_WEIGHTS=True,
                      PREF_BLOCKED=blocked, NSTATS=5 if estimator == 5 else 3, BLOCK=2048)  # the GPU block
    names = k.group_advantages_kernel.arg_names
    signature = {a: "constexpr" if a in constexprs else kinds.get(a, "i32") for a in names}
    aligned = tuple(a for a in signature if a.endswith("_ptr"))
    res = compile_for_gpu(k.group_advantages_kernel, signature, constexprs, capability=capability, num_warps=16,
                          aligned=aligned)
    assert f".target sm_{capability}" in res["ptx"]
    # 16 warps: at most 128 registers. ptxas runs fp64 division as a subroutine; around those calls it may
    # keep a few scalars on the stack (Triton 3.6: up to 32 bytes), no local arrays.
    assert res["LOCAL"] == 0 and res["STACK"] <= 64 and 0 < res["REG"] <= 128, res
    assert "bar.sync" in res["ptx"] and "ld.global.cg" in res["ptx"]
    # torch's rounding: the advantage's fp32 division and the std's sqrt round to nearest (tl.div_rn /
    # tl.sqrt_rn); a plain `/` or tl.sqrt compiles to the approximate div.full.f32 / sqrt.approx.f32
    ops = sorted(set(re.findall(r"\b(?:div|sqrt|rcp)(?:\.[a-z]+)+\.f32\b", res["ptx"])))
    assert "div.rn.f32" in ops and "sqrt.rn.f32" in ops, (variant, ops)
    assert not [op for op in ops if ".full." in op or ".approx." in op], (variant, ops)
    if hashed:
        assert "atom.global.relaxed.gpu.cas.b64" in res["ptx"] or "atom.relaxed.gpu.global.cas.b64" in res["ptx"]


# ---------------------------------------------------------------------------------------------------
# Argument checks


def _with(t, i, j, v):
    t = t.clone()
    t[i, j] = v
    return t


def _bad_calls():
    r, r2, ids = torch.zeros(4), torch.zeros(4, 2), torch.tensor([0, 0, 1, 1])
    meta = torch.device("meta")
    p = torch.full((4, 4), 0.5)
    return [
        (lambda: group_advantages([1.0, 2.0], 2), TypeError, "rewards must be a torch.Tensor"),
        (lambda: group_advantages(r.long(), 2), ValueError, "rewards must have dtype"),
        (lambda: group_advantages(torch.zeros(2, 2, 2), 2), ValueError, r"rewards must be \[B\] or \[B, R\]"),
        (lambda: group_advantages(torch.zeros(4, 0), 2), ValueError, r"rewards must be \[B\] or \[B, R\]"),
        (lambda: group_advantages(torch.tensor([1.0, float("inf"), 0.0, 0.0]), 2), ValueError,
         "rewards must not hold inf"),
        (lambda: group_advantages(torch.tensor([1e39, 0.0, 0.0, 0.0], dtype=torch.float64), 2), ValueError,
         "rewards must not hold inf, nor fp64 values beyond the fp32 range"),
        (lambda: group_advantages(r, 3), ValueError, r"group_size \(3\) must divide"),
        (lambda: group_advantages(r, 0), ValueError, "group_size must be >= 1"),
        (lambda: group_advantages(r, True), TypeError, "groups must be group_ids"),
        (lambda: group_advantages(r, 2.0), TypeError, "groups must be group_ids"),
        (lambda: group_advantages(r, ids.float()), ValueError, "group_ids must have dtype"),
        (lambda: group_advantages(r, ids[:3]), ValueError, r"group_ids must hold one id per sample \(4\)"),
        (lambda: group_advantages(r, ids[None]), ValueError, "group_ids must be 1-D"),
        (lambda: group_advantages(r, ids.to(meta)), ValueError, "group_ids must be on cpu"),
        (lambda: group_advantages(r, torch.tensor([0, -1, 1, 1])), ValueError, "group_ids must be >= 0"),
        (lambda: group_advantages(r, 2, estimator="ppo"), ValueError, "estimator must be one of grpo"),
        (lambda: group_advantages(r, 2, estimator=None), TypeError, "estimator must be a str"),
        (lambda: group_advantages(r, 2, scale="token"), ValueError, "scale must be one of group, batch, none"),
        (lambda: group_advantages(r, 2, multi_reward="sum"), ValueError, "multi_reward must be one of"),
        (lambda: group_advantages(r, 2, eps=-1e-3), ValueError, "eps must be finite and in"),
        (lambda: group_advantages(r, 2, eps=math.nan), ValueError, "eps must be finite"),
        (lambda: group_advantages(r, 2, eps="0"), TypeError, "eps must be a number"),
        (lambda: group_advantages(r2, 2, reward_weights=torch.ones(3)), ValueError,
         r"reward_weights must hold one weight per reward \(2\)"),
        (lambda: group_advantages(r2, 2, reward_weights=torch.tensor([1.0, NAN])), ValueError,
         "reward_weights must be finite"),
        (lambda: group_advantages(r2, 2, reward_weights=[1.0, "a"]), TypeError, "reward_weights must be a tensor"),
        (lambda: group_advantages(r2, 2, reward_weights=torch.ones(2, dtype=torch.int64)), ValueError,
         "reward_weights must have dtype"),
        (lambda: group_advantages(r, 2, estimator="opo"), ValueError, "estimator='opo' needs lengths"),
        (lambda: group_advantages(r, 2, lengths=torch.ones(4)), ValueError, "lengths is only used by"),
        (lambda: group_advantages(r, 2, estimator="opo", lengths=torch.ones(3)), ValueError,
         r"lengths must hold one length per sample \(4\)"),
        (lambda: group_advantages(r, 2, estimator="opo", lengths=torch.tensor([1, 2, -1, 0])), ValueError,
         "lengths must be finite and >= 0"),
        (lambda: group_advantages(r, 2, estimator="opo", lengths=torch.tensor([1.0, 2.0, NAN, 0.0])), ValueError,
         "lengths must be finite and >= 0"),
        (lambda: group_advantages(r, 2, estimator="opo", lengths=torch.ones(4, dtype=torch.bool)), ValueError,
         "lengths must have an int32 / int64 or floating dtype"),
        (lambda: group_advantages(r, 2, estimator="remax"), ValueError, "estimator='remax' needs baseline_rewards"),
        (lambda: group_advantages(r, 2, baseline_rewards=r), ValueError, "baseline_rewards is only used by"),
        (lambda: group_advantages(r2, 2, estimator="remax", baseline_rewards=r), ValueError,
         "baseline_rewards must have the shape of rewards"),
        (lambda: group_advantages(r, 2, estimator="remax", baseline_rewards=torch.tensor([0.0, -float("inf"), 0, 0])),
         ValueError, "baseline_rewards must not hold inf"),
        (lambda: group_advantages(r, 2, estimator="pref_grpo"), ValueError, "estimator='pref_grpo' needs preferences"),
        (lambda: group_advantages(r, 2, preferences=p), ValueError, "preferences is only used by"),
        (lambda: group_advantages(r2, 2, estimator="pref_grpo", preferences=p), ValueError,
         r"rewards must be \[B\] with estimator='pref_grpo'"),
        (lambda: group_advantages(r, ids, estimator="pref_grpo", preferences=p[:, :2]), ValueError,
         r"preferences must have shape \(4, 4\) \(\[B, B\]"),
        (lambda: group_advantages(r, 2, estimator="pref_grpo", preferences=p[:, :3]), ValueError,
         r"preferences must have shape \(4, 4\) or \(4, 2\)"),
        (lambda: group_advantages(r, 2, estimator="pref_grpo", preferences=p.long()), ValueError,
         "preferences must have dtype"),
        (lambda: group_advantages(r, ids, estimator="pref_grpo", preferences=_with(p, 2, 3, 1.5)), ValueError,
         r"preferences must be in \[0, 1\]"),
        (lambda: group_advantages(r, ids, estimator="pref_grpo", preferences=_with(p, 0, 1, NAN)), ValueError,
         r"preferences must be in \[0, 1\]"),
        (lambda: group_advantages(r, 2, estimator="pref_grpo", preferences=torch.tensor([[0.5, NAN]] * 4)), ValueError,
         r"preferences must be in \[0, 1\]"),
    ]


test_bad_arguments_are_refused = refusal_test(_bad_calls)


def test_entries_that_are_never_read_may_hold_anything():
    r, ids = torch.zeros(4), torch.tensor([0, 1, 0, 1])
    p = torch.full((4, 4), 9.0)  # across groups and the diagonal: not read, not checked
    p[0, 2] = p[2, 0] = p[1, 3] = p[3, 1] = 0.5
    assert group_advantages(r, ids, estimator="pref_grpo", preferences=p).tolist() == [0.0] * 4
    blocks = torch.tensor([[NAN, 1.0], [0.0, NAN]] * 2)  # [B, G]: the diagonal is not read
    assert group_advantages(r, 2, estimator="pref_grpo", preferences=blocks, scale="none").tolist() == \
        [0.5, -0.5, 0.5, -0.5]


# ---------------------------------------------------------------------------------------------------
# GPU, real shapes


@pytest.mark.gpu
@pytest.mark.parametrize("group", [8, 16])
@pytest.mark.parametrize("form", ["size", "ids"])
@pytest.mark.parametrize("estimator", ["grpo", "rloo", "opo", "reinforce_pp_baseline", "pref_grpo"])
def test_real_shapes_on_the_gpu_match_the_reference(estimator, form, group):
    device, n = torch.device("cuda"), 8192
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 4, (n, 2), generator=g).float()
    rewards[torch.randint(0, n, (64,), generator=g), 0] = NAN
    groups = group if form == "size" else (torch.randperm(n, generator=g) // group * 7919)
    kw = {}
    if estimator == "opo":
        kw["lengths"] = torch.randint(1, 2048, (n,), generator=g).to(device)
    if estimator == "pref_grpo":
        rewards = rewards[:, 0]
        kw["preferences"] = (torch.randint(0, 3, (n, n if form == "ids" else group), generator=g) / 2).to(device)
    rewards = rewards.to(device)
    groups = groups.to(device) if isinstance(groups, torch.Tensor) else groups
    assert resolve(device) == "triton"
    for multi in MULTI_REWARDS:
        got = group_advantages(rewards, groups, estimator=estimator, multi_reward=multi, **kw)
        with backend("torch"):
            want = group_advantages(rewards, groups, estimator=estimator, multi_reward=multi, **kw)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    device, n = torch.device("cuda"), 4096
    rewards = torch.randn(n, 3, device=device)
    ids = (torch.randperm(n, device=device) // 16).contiguous()
    weights = torch.tensor([1.0, 0.5, 2.0], device=device)
    for multi in MULTI_REWARDS:
        group_advantages(rewards, ids, reward_weights=weights, multi_reward=multi)  # compiles outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = group_advantages(rewards, ids, reward_weights=weights, multi_reward=multi)
        rewards.copy_(torch.randn(n, 3, device=device))
        graph.replay()
        with backend("torch"):
            want = group_advantages(rewards, ids, reward_weights=weights, multi_reward=multi)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
