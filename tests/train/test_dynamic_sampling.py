"""Dynamic sampling (filter_groups): group values, the keep rule, refills, batch assembly, stats."""

import math

import pytest
import torch

from fastrl.train.dynamic_sampling import (FilterStats, concat_completions, fill_batch, group_values, keep_groups,
                                           refill_indices, select_groups)
from fastrl.train.online import Completions

NAN = math.nan


def make(groups, g=2, cond=False, tag=0, engine="fastrl"):
    """Completions of len(groups) prompts; row i of group p has a completion of p + i + 1 tokens."""
    prompts, comps, logps, rows, conds = [], [], [], [], []
    for p, row in enumerate(groups):
        for i in range(g):
            n = p + i + 1
            prompts.append([row, tag])
            comps.append([row * 10 + i] * n)
            logps.append(torch.full((n,), -float(row * 10 + i)))
            conds.append(torch.full((n,), float(row * 10 + i)))
            rows.append(row)
    stopped = torch.tensor([(k % 2) == 0 for k in range(len(comps))], dtype=torch.bool)
    return Completions(prompts=prompts, completions=comps, sampler_logps=logps, stopped=stopped, rows=rows,
                       group_size=g, engine=engine, cond_logps=conds if cond else None)


def keep_reward(scores):
    return keep_groups(group_values(scores, 2, metric="reward", weights=None, names=["r"]), 2)


# ---------------------------------------------------------------------------------------------- values, keep

def test_group_values_reward_accuracy_and_name():
    table = torch.tensor([[1.0, 0.5], [0.0, NAN], [NAN, NAN], [2.0, 1.0]])
    combined = group_values(table, 2, metric="reward", weights=[1.0, 2.0], names=["a", "b"])
    assert torch.allclose(combined[[0, 1, 3]], torch.tensor([2.0, 0.0, 4.0])) and math.isnan(combined[2])
    acc = group_values(table, 2, metric="accuracy", weights=[1.0, 2.0], names=["a", "b"], pass_threshold=1.0)
    assert acc[[0, 1, 3]].tolist() == [1.0, 0.0, 1.0] and math.isnan(acc[2])
    col = group_values(table, 2, metric="b", weights=None, names=["a", "b"])
    assert col[[0, 3]].tolist() == [0.5, 1.0] and math.isnan(col[1])


def test_accuracy_threshold_is_strict_like_eval_pass_rate():
    table = torch.tensor([[0.0], [1.0], [0.5], [0.7]])
    assert group_values(table, 2, metric="accuracy", weights=None, names=["r"]).tolist() == [0.0, 1.0, 1.0, 1.0]
    acc = group_values(table, 2, metric="accuracy", weights=None, names=["r"], pass_threshold=0.6)
    assert acc.tolist() == [0.0, 1.0, 0.0, 1.0]
    # accuracy drops group 1 (both pass at 0) though its rewards differ; reward keeps it
    assert keep_groups(group_values(table, 2, metric="accuracy", weights=None, names=["r"]), 2).tolist() == \
        [True, False]
    assert keep_groups(group_values(table, 2, metric="reward", weights=None, names=["r"]), 2).tolist() == \
        [True, True]


def test_unknown_metric_names_the_field_and_choices():
    with pytest.raises(ValueError, match=r"filter_groups\.metric.*'nope'.*reward, accuracy, a, b"):
        group_values(torch.zeros(2, 2), 2, metric="nope", weights=None, names=["a", "b"])


def test_keep_groups_exact_equality_and_nan():
    values = torch.tensor([1.0, 1.0,  1.0, 1.0 + 1e-6,  NAN, NAN,  NAN, 3.0,  NAN, 2.0, 2.0,  0.0, NAN, 1.0])
    v3 = torch.cat([values, torch.zeros(1)])
    assert keep_groups(values[:8], 2).tolist() == [False, True, False, False]
    # groups of 3: [1,1,1] drop, [1+eps,NaN,NaN] one finite -> drop, [NaN,3,NaN] drop, [2,2,0] keep, [NaN,1,0] keep
    assert keep_groups(v3, 3).tolist() == [False, False, False, True, True]


# ---------------------------------------------------------------------------------------------- refills

def test_refill_indices_deterministic_and_in_range():
    a = refill_indices(7, 3, 1, 5, 20)
    assert a == refill_indices(7, 3, 1, 5, 20)
    assert len(a) == 5 and len(set(a)) == 5 and all(0 <= i < 20 for i in a)
    assert a != refill_indices(7, 3, 2, 5, 20) or a != refill_indices(7, 4, 1, 5, 20)
    many = refill_indices(0, 0, 1, 9, 3)
    assert len(many) == 9 and all(0 <= i < 3 for i in many)
    with pytest.raises(ValueError):
        refill_indices(0, 0, 1, 2, 0)


class FakeSampler:
    """sample(attempt, indices): a data row's group scores [row, row] when row is in `flat`, else [0, 1]."""

    def __init__(self, flat=(), always_flat=False):
        self.flat, self.always_flat, self.calls = set(flat), always_flat, []

    def __call__(self, attempt, indices):
        self.calls.append((attempt, list(indices)))
        comps = make(indices, g=2, tag=attempt)
        scores = []
        for row in indices:
            scores += [[float(row)], [float(row)]] if self.always_flat or row in self.flat else [[0.0], [1.0]]
        return comps, torch.tensor(scores), {"attempt": attempt}


def run(sampler, first, needed, max_tries, n=50):
    return fill_batch(sampler, first, needed_groups=needed, max_tries=max_tries, seed=3, step=5, num_examples=n,
                      keep=keep_reward)


def test_fill_batch_refills_until_full_and_never_keeps_all_equal_groups():
    first = [0, 1, 2, 3]
    sampler = FakeSampler(flat=[1, 3])
    comps, scores, extras, stats = run(sampler, first, 4, 4)
    refill = refill_indices(3, 5, 1, 4, 50)
    assert sampler.calls == [(0, first), (1, refill)]
    assert extras == [{"attempt": 0}, {"attempt": 1}]
    rows = [r for r in refill if r not in (1, 3)][:2]
    assert comps.rows[::2] == [0, 2, *rows] and len(comps) == 8 and scores.shape == (8, 1)
    assert keep_reward(scores).all()
    assert stats.tries == 2 and stats.kept_groups == 4 and stats.short_groups == 0
    assert stats.generated_groups == 8 and stats.dropped_groups == 2 + sum(r in (1, 3) for r in refill)


def test_fill_batch_one_try_when_the_first_attempt_is_full():
    sampler = FakeSampler()
    comps, scores, extras, stats = run(sampler, [4, 5], 2, 3)
    assert len(sampler.calls) == 1 and comps.rows == [4, 4, 5, 5] and stats.tries == 1
    assert stats.metrics() == {"filter/tries": 1.0, "filter/dropped_groups": 0.0, "filter/kept_groups": 2.0,
                               "filter/short_groups": 0.0, "filter/generated_groups": 2.0,
                               "filter/extra_generated_tokens": 0.0}


def test_fill_batch_short_when_refills_never_vary():
    sampler = FakeSampler(always_flat=True)
    comps, scores, extras, stats = run(sampler, [0, 1, 2], 3, 3)
    assert len(comps) == 0 and scores.shape == (0, 1) and comps.group_size == 2 and len(extras) == 3
    assert [a for a, _ in sampler.calls] == [0, 1, 2]
    # make(): group p of an attempt has rows of p+1 and p+2 tokens -> 3 + 5 + 7 = 15 per attempt
    assert stats == FilterStats(tries=3, generated_groups=9, dropped_groups=9, kept_groups=0, short_groups=3,
                                generated_tokens=45, extra_generated_tokens=30)
    assert stats.metrics()["filter/short_groups"] == 3.0 and stats.metrics()["filter/extra_generated_tokens"] == 30.0


def test_fill_batch_truncates_surplus_in_order():
    comps, _, _, stats = run(FakeSampler(flat=[0]), [0, 1, 2], 3, 2)
    assert stats.tries == 2 and stats.kept_groups == 3 and stats.generated_groups == 6
    assert comps.rows[::2][:2] == [1, 2] and len(comps) == 6


def test_fill_batch_nan_groups_dropped():
    def sample(attempt, indices):
        scores = torch.tensor([[NAN], [NAN], [NAN], [1.0], [0.0], [NAN]]) if attempt == 0 else \
            torch.tensor([[0.0], [1.0]] * len(indices))
        return make(indices), scores, None

    comps, scores, extras, stats = run(sample, [0, 1, 2], 3, 1)
    assert stats.kept_groups == 0 and stats.dropped_groups == 3 and stats.short_groups == 3 and extras == [None]
    comps, scores, _, stats = run(sample, [0, 1, 2], 3, 2)
    assert stats.kept_groups == 3 and not torch.isnan(scores).any()


def test_fill_batch_max_tries_checked():
    with pytest.raises(ValueError, match=r"filter_groups\.max_tries"):
        run(FakeSampler(), [0], 1, 0)


# ---------------------------------------------------------------------------------------------- select / concat

@pytest.mark.parametrize("cond", [False, True])
def test_select_and_concat_keep_rows_and_fields(cond):
    a = make([10, 11, 12], g=2, cond=cond, engine="vllm")
    rewards = torch.arange(6, dtype=torch.float32)[:, None]
    picked, r = select_groups(a, rewards, [2, 0])
    assert picked.rows == [12, 12, 10, 10] and r[:, 0].tolist() == [4.0, 5.0, 0.0, 1.0]
    assert picked.completions == [a.completions[i] for i in (4, 5, 0, 1)]
    assert picked.prompts == [a.prompts[i] for i in (4, 5, 0, 1)]
    assert picked.stopped.tolist() == [a.stopped[i].item() for i in (4, 5, 0, 1)]
    assert all(torch.equal(x, a.sampler_logps[i]) for x, i in zip(picked.sampler_logps, (4, 5, 0, 1)))
    assert picked.group_size == 2 and picked.engine == "vllm"
    if cond:
        assert all(torch.equal(x, a.cond_logps[i]) for x, i in zip(picked.cond_logps, (4, 5, 0, 1)))
    else:
        assert picked.cond_logps is None
    b = make([20], g=2, cond=cond)
    both = concat_completions([picked, b])
    assert both.rows == [12, 12, 10, 10, 20, 20] and len(both) == 6 and both.stopped.shape == (6,)
    assert both.completions[4:] == b.completions and both.sampler_logps[4] is b.sampler_logps[0]
    assert (both.cond_logps is None) == (not cond)
    assert both.lengths.tolist() == [len(c) for c in both.completions]


def test_concat_rejects_mismatches():
    with pytest.raises(ValueError):
        concat_completions([])
    with pytest.raises(ValueError, match="group sizes"):
        concat_completions([make([0], g=2), make([0], g=3)])
    with pytest.raises(ValueError, match="cond_logps"):
        concat_completions([make([0], cond=True), make([0])])
