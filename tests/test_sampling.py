"""fastrl.sampling.sample: distribution, exact agreement with the reference, determinism, errors.

The behavioural tests run on CPU and, marked ``gpu``, on CUDA (the CUDA kernel when the extension is
built with it). Without a GPU the CUDA kernel's source still runs here: ``csrc/cuda/sampling.cu``
compiled for the host with its SIMT emulation (``csrc/cuda/simt_emulation.cuh``: one fiber per CUDA
thread, barriers and warp collectives enforced), checked against the CPU sampler.
"""

from __future__ import annotations

import ctypes
import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import chi_square_pvalue, expect_error

import fastrl
from fastrl.ops import backend, torch_impl
from fastrl.sampling import sample

SETTINGS = [
    {},
    {"temperature": 0.5},
    {"temperature": 2.0},
    {"top_k": 1},
    {"top_k": 5},
    {"top_p": 0.3},
    {"top_p": 0.8},
    {"min_p": 0.1},
    {"min_p": 0.5},
    {"top_k": 6, "top_p": 0.7},
    {"temperature": 0.7, "top_p": 0.9, "min_p": 0.05},
    {"temperature": 1.3, "top_k": 8, "top_p": 0.95, "min_p": 0.02},
]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
PATHS = ["cpp", "torch", pytest.param("cuda", marks=pytest.mark.gpu)]


def _generator(device, seed=1234):
    return torch.Generator(device=device).manual_seed(seed)


def _ref_draw(logits, seed, **settings):
    """The reference's draw with the uniforms the C++ sampler uses for ``seed``."""
    u = torch.tensor([torch_impl.philox_uniform(seed, r) for r in range(logits.shape[0])], dtype=torch.float64)
    return torch_impl.sample(logits, u, **settings)


def _op(logits, seed, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, rows=(None, None, None, None)):
    """The operator itself; per-row settings go in as int64 / float64 tensors on the logits' device."""
    rows = [None if r is None else (r.double() if r.is_floating_point() else r).to(logits.device) for r in rows]
    return torch.ops.fastrl.sample(logits, torch.tensor([seed]), temperature, top_k, top_p, min_p, *rows)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain")
def test_distribution_matches_exact_filtered_probs(settings, device):
    generator = _generator(device)
    logits = torch.randn(1, 13, generator=generator, device=device) * 1.5
    exact = torch_impl.sampling_distribution(logits.cpu(), **settings)[0]
    draws = 60_000
    tokens, _ = sample(logits.expand(draws, -1), generator=generator, **settings)
    assert tokens.device == logits.device
    counts = torch.bincount(tokens.cpu(), minlength=13)
    assert counts[exact == 0].sum() == 0, "drew a token the filters remove"
    assert chi_square_pvalue(counts, exact) > 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_per_row_settings_mixed_in_one_batch(device):
    generator = _generator(device)
    logits = torch.randn(1, 13, generator=generator, device=device) * 1.5
    groups = [SETTINGS[1], SETTINGS[4], SETTINGS[6], SETTINGS[8], SETTINGS[11]]
    n = 30_000
    full = [{"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0} | s for s in groups]
    per_row = {
        name: torch.tensor([s[name] for s in full for _ in range(n)], device=device,
                           dtype=torch.int64 if name == "top_k" else torch.float32)
        for name in ("temperature", "top_k", "top_p", "min_p")
    }
    tokens, _ = sample(logits.expand(n * len(groups), -1), generator=generator, **per_row)
    for i, s in enumerate(full):
        exact = torch_impl.sampling_distribution(logits.cpu(), **s)[0]
        counts = torch.bincount(tokens[i * n:(i + 1) * n].cpu(), minlength=13)
        assert chi_square_pvalue(counts, exact) > 1e-4, s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [13, 257, 1031])
def test_same_draws_as_reference_given_the_same_uniforms(vocab, device):
    g = torch.Generator().manual_seed(vocab)
    rows = 600
    logits = torch.randn(rows, vocab, generator=g) * 3
    settings = {
        "temperature": torch.rand(rows, generator=g) * 1.5 + 0.2,
        "top_k": torch.randint(0, 60, (rows,), generator=g),
        "top_p": torch.rand(rows, generator=g) * 0.9 + 0.1,
        "min_p": torch.rand(rows, generator=g) * 0.2,
    }
    tokens, logp, flogp = (t.cpu() for t in _op(logits.to(device), 987, rows=tuple(settings.values())))
    ref_tokens, ref_logp, ref_flogp = _ref_draw(logits, 987, **settings)
    # fp32 vs fp64 arithmetic may only move a draw that sits within ~1e-6 of a CDF boundary
    assert (tokens == ref_tokens).float().mean() >= 0.995
    same = tokens == ref_tokens
    torch.testing.assert_close(logp[same], ref_logp[same], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flogp[same], ref_flogp[same], rtol=1e-5, atol=1e-5)


def test_torch_backend_draws_the_same_tokens():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(300, 97, generator=g)
    kw = {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "min_p": 0.01}
    fast = sample(logits, generator=torch.Generator().manual_seed(11), return_filtered_logprobs=True, **kw)
    with backend("torch"):
        slow = sample(logits, generator=torch.Generator().manual_seed(11), return_filtered_logprobs=True, **kw)
    same = fast[0] == slow[0]
    assert same.float().mean() >= 0.99
    torch.testing.assert_close(fast[1][same], slow[1][same], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[2][same], slow[2][same], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_filtered_logprob_is_log_of_the_renormalised_probability(device):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 50, generator=g)
    tokens, logp, flogp = (t.cpu() for t in sample(logits.to(device), top_k=10, top_p=0.8,
                                                   generator=_generator(device, 2), return_filtered_logprobs=True))
    probs = torch_impl.sampling_distribution(logits, top_k=10, top_p=0.8)
    torch.testing.assert_close(flogp.double(), probs.gather(1, tokens[:, None]).squeeze(1).log(), rtol=0, atol=1e-5)
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1),
                               rtol=0, atol=1e-5)
    assert (flogp >= logp - 1e-6).all()  # renormalising over fewer tokens can only raise a log-prob


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_one_and_temperature_zero_are_argmax(device):
    generator = _generator(device)
    logits = torch.randn(200, 1000, generator=generator, device=device)
    expected = logits.argmax(-1)
    assert torch.equal(sample(logits, top_k=1, generator=generator)[0], expected)
    tokens, logp = sample(logits, temperature=0.0, generator=generator)
    assert torch.equal(tokens, expected)
    assert torch.equal(logp, torch.zeros(200, device=device))  # the T -> 0 limit puts all mass on the maximum
    assert torch.equal(sample(logits, min_p=1.0, generator=generator)[0], expected)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_ties_take_the_first_maximum_and_split_the_mass(device):
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0]], device=device)
    tokens, logp = sample(logits, temperature=0.0)
    assert tokens.item() == 1
    assert logp.item() == pytest.approx(-torch.log(torch.tensor(2.0)).item())


@pytest.mark.parametrize("device", DEVICES)
def test_ties_at_the_top_k_boundary_are_kept(device):
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0]])
    tokens, _ = sample(logits.to(device).expand(20_000, -1), top_k=2, generator=_generator(device))
    counts = torch.bincount(tokens.cpu(), minlength=5)
    assert counts[4] == 0 and (counts[1:4] > 0).all()
    assert chi_square_pvalue(counts, torch_impl.sampling_distribution(logits, top_k=2)[0]) > 1e-4


def test_same_generator_state_same_tokens_any_thread_count():
    logits = torch.randn(64, 5000)
    kw = {"temperature": 0.9, "top_p": 0.9}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = sample(logits, generator=torch.Generator().manual_seed(7), **kw)
        torch.set_num_threads(1)
        b = sample(logits, generator=torch.Generator().manual_seed(7), **kw)
    finally:
        torch.set_num_threads(threads)
    c = sample(logits, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    torch.manual_seed(3)
    d = sample(logits, **kw)
    torch.manual_seed(3)
    assert torch.equal(d[0], sample(logits, **kw)[0])  # no generator: the global one


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits(dtype, device):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(256, 1031, generator=g) * 4).to(dtype)
    tokens, logp, _ = (t.cpu() for t in _op(logits.to(device), 42, 0.9, 40, 0.9, 0.0))
    ref_tokens, ref_logp, _ = _ref_draw(logits.float(), 42, temperature=0.9, top_k=40, top_p=0.9)
    assert (tokens == ref_tokens).float().mean() >= 0.99
    same = tokens == ref_tokens
    torch.testing.assert_close(logp[same], ref_logp[same], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_large_vocabulary_rows(device):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(8, 151936, generator=g) * 3).bfloat16()
    for kw in ({"top_k": 50, "top_p": 0.9}, {"top_p": 0.95}, {"min_p": 0.05}, {}):
        tokens, logp, flogp = (t.cpu() for t in sample(logits.to(device), generator=_generator(device),
                                                       return_filtered_logprobs=True, **kw))
        probs = torch_impl.sampling_distribution(logits.float(), **kw)
        assert (probs.gather(1, tokens[:, None]) > 0).all(), kw
        ref_logp = torch.log_softmax(logits.double(), -1).gather(1, tokens[:, None]).squeeze(1)
        torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=1e-4)
        torch.testing.assert_close(flogp.double(), probs.gather(1, tokens[:, None]).squeeze(1).log(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_tokens_are_never_drawn(device):
    generator = _generator(device)
    logits = torch.randn(4000, 31, generator=generator, device=device)
    banned = torch.rand(4000, 31, generator=generator, device=device) < 0.5
    banned[:, 0] = False
    logits[banned] = float("-inf")
    for kw in ({}, {"top_k": 5}, {"top_p": 0.99}, {"min_p": 0.01}):
        tokens, logp = sample(logits, generator=generator, **kw)
        assert not banned.gather(1, tokens[:, None]).any()
        assert torch.isfinite(logp).all()


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_logits_and_tiny_temperature(device):
    logits = torch.tensor([[1e4, -1e4, 9999.0, 0.0], [-3e4, -3e4 + 1, -3e4 + 0.5, -3e4]], device=device)
    for t in (1e-6, 1e-30, 1.0):
        tokens, logp, flogp = sample(logits, temperature=t, return_filtered_logprobs=True)
        assert torch.isfinite(logp).all() and torch.isfinite(flogp).all()
        if t < 1:
            assert tokens.tolist() == [0, 1]


@pytest.mark.parametrize("device", DEVICES)
def test_strided_logits_equal_contiguous_ones(device):
    logits = torch.randn(16, 5, 300, device=device)
    last = logits[:, -1, :]  # what a model's last-position logits look like: rows strided
    transposed = torch.randn(300, 16, device=device).t()  # vocabulary strided: copied first
    assert not last.is_contiguous() and transposed.stride(1) != 1
    for view in (last, transposed):
        a = _op(view, 1, 0.7, 10, 0.9, 0.0)
        b = _op(view.contiguous(), 1, 0.7, 10, 0.9, 0.0)
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def _path_device(path):
    return "cuda" if path == "cuda" else "cpu"


@pytest.mark.parametrize("path", PATHS)
def test_near_ties_are_resolved_on_the_logits(path):
    # exp() of these logits is the same fp32 number; the filters must still see two values
    dev = _path_device(path)
    cases = [(torch.tensor([[-1e-8, 0.0]], device=dev), 1.0), (torch.tensor([[5.0, 5.0 + 4.7e-7]], device=dev), 50.0)]
    with backend("torch" if path == "torch" else "auto"):
        for logits, t in cases:
            for kw in ({"top_k": 1}, {"min_p": 1.0}, {"top_p": 0.3}):
                tokens, _, flogp = sample(logits.expand(2000, -1), temperature=t, return_filtered_logprobs=True,
                                          generator=_generator(dev, 0), **kw)
                assert (tokens == 1).all(), (logits, kw)
                assert (flogp == 0).all()


@pytest.mark.parametrize("path", PATHS)
def test_tiny_top_p_keeps_the_most_probable_token(path):
    logits = torch.randn(200, 1000, generator=torch.Generator().manual_seed(4)).to(_path_device(path))
    with backend("torch" if path == "torch" else "auto"):
        tokens, logp, flogp = sample(logits, top_p=1e-20, return_filtered_logprobs=True)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.isfinite(logp).all() and (flogp == 0).all()


def test_outputs_carry_no_gradient():
    logits = torch.randn(4, 30, requires_grad=True)
    tokens, logp = sample(logits)
    assert not logp.requires_grad and logp.grad_fn is None


def test_huge_temperature_with_flushed_denormals():
    logits = torch.randn(4, 200)
    logits[:, :64] = float("-inf")
    logits[:, ::7] = float("-inf")
    previous = torch.set_flush_denormal(True)
    try:
        for t in (1e38, 3e38):
            tokens, logp, flogp = sample(logits, temperature=t, return_filtered_logprobs=True, top_p=0.5)
            assert ((tokens >= 0) & (tokens < 200)).all()
            assert torch.isfinite(logits.gather(1, tokens[:, None])).all()
            assert torch.isfinite(logp).all() and torch.isfinite(flogp).all()
    finally:
        torch.set_flush_denormal(previous)


def test_scalar_like_settings_are_accepted():
    import numpy as np

    logits = torch.randn(3, 40)
    g = torch.Generator().manual_seed(0)
    a = sample(logits, temperature=np.float32(0.5), top_k=np.int64(5), top_p=torch.tensor(0.9), generator=g)
    g = torch.Generator().manual_seed(0)
    b = sample(logits, temperature=0.5, top_k=5, top_p=0.9, generator=g)
    assert torch.equal(a[0], b[0])
    assert sample(logits, top_k=2**63)[0].shape == (3,)  # larger than the vocabulary: no top-k


@pytest.mark.parametrize("device", DEVICES)
def test_error_names_the_first_bad_row(device):
    x = torch.randn(64, 100, device=device)
    x[40, 3] = float("nan")
    x[5, 7] = float("nan")
    with pytest.raises(ValueError, match=r"row 5\b"):
        sample(x)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    tokens, logp = sample(torch.randn(0, 10, device=device))
    assert tokens.shape == (0,) and tokens.dtype == torch.int64 and logp.dtype == torch.float32


BAD_SETTINGS = [
    ({"temperature": -0.1}, ValueError, "temperature"),
    ({"temperature": float("nan")}, ValueError, "temperature"),
    ({"top_p": 0.0}, ValueError, "top_p"),
    ({"top_p": 1.5}, ValueError, "top_p"),
    ({"top_k": -1}, ValueError, "top_k"),
    ({"top_k": 2.5}, TypeError, "top_k"),
    ({"min_p": -0.1}, ValueError, "min_p"),
    ({"min_p": 1.1}, ValueError, "min_p"),
    ({"temperature": torch.tensor([1.0, -1.0, 1.0])}, ValueError, "temperature"),
    ({"top_k": torch.tensor([1, -2, 0])}, ValueError, "top_k"),
    ({"top_p": torch.tensor([0.5, 0.0, 1.0])}, ValueError, "top_p"),
    ({"min_p": torch.tensor([0.5, 2.0, 0.0])}, ValueError, "min_p"),
    ({"top_p": torch.tensor([0.5, 0.5])}, ValueError, "top_p"),
    ({"top_k": torch.tensor([1.0, 2.0, 3.0])}, TypeError, "top_k"),
    ({"temperature": torch.tensor([1, 2, 3])}, TypeError, "temperature"),
    ({"generator": "seed"}, TypeError, "generator"),
]


@pytest.mark.parametrize("kw,exc,name", BAD_SETTINGS, ids=lambda v: str(v)[:30] if not isinstance(v, type) else "")
@pytest.mark.parametrize("path", PATHS)
def test_bad_settings_raise_naming_the_argument(kw, exc, name, path):
    dev = _path_device(path)
    kw = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    with backend("torch" if path == "torch" else "auto"):
        expect_error(sample, exc, name, torch.randn(3, 10, device=dev), **kw)


@pytest.mark.parametrize("path", PATHS)
def test_bad_logits_raise(path):
    dev = _path_device(path)
    with backend("torch" if path == "torch" else "auto"):
        for bad in (float("nan"), float("inf")):
            x = torch.randn(3, 10, device=dev)
            x[1, 4] = bad
            expect_error(sample, ValueError, "logits", x)
        x = torch.randn(3, 10, device=dev)
        x[2] = float("-inf")
        expect_error(sample, ValueError, "no finite value", x)
    expect_error(sample, ValueError, "logits", torch.randn(10))
    expect_error(sample, ValueError, "logits", torch.randn(2, 3, 10))
    expect_error(sample, ValueError, "logits", torch.randn(3, 10).double())
    expect_error(sample, ValueError, "logits", torch.randint(0, 5, (3, 10)))
    expect_error(sample, ValueError, "vocabulary", torch.randn(3, 0))
    expect_error(sample, TypeError, "logits", [[0.0, 1.0]])


# -- deferred checks (fastrl.sampling.SampleErrors): no host sync per call -----------------------------

DEFERRED_CASES = ["nan", "inf", "no_finite", "temperature", "top_k", "top_p", "min_p"]


def _bad_call(case, device):
    """(bad logits, bad settings, the same call with the bad rows fixed, fixed settings, bad rows)."""
    g = torch.Generator().manual_seed(3)
    good = torch.randn(6, 40, generator=g)
    bad, kw_bad, kw_good, rows = good.clone(), {}, {}, []
    if case == "nan":
        bad[4, 7], rows = float("nan"), [4]
    elif case == "inf":
        bad[2, 0], bad[5, 1], rows = float("inf"), float("nan"), [2, 5]
    elif case == "no_finite":
        bad[3], rows = float("-inf"), [3]
    else:
        fine = {"temperature": 0.8, "top_k": 3, "top_p": 0.9, "min_p": 0.05}[case]
        wrong = {"temperature": [(3, -0.5), (4, float("inf"))], "top_k": [(2, -2)], "top_p": [(1, 1.25), (4, 0.0)],
                 "min_p": [(5, 1.5)]}[case]
        values = torch.tensor([fine] * 6, dtype=torch.int64 if case == "top_k" else torch.float64)
        kw_good[case] = values.clone().to(device)
        for r, v in wrong:
            values[r] = v
        kw_bad[case], rows = values.to(device), [r for r, _ in wrong]
    return bad.to(device), kw_bad, good.to(device), kw_good, rows


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", DEFERRED_CASES)
def test_deferred_errors_raise_at_the_check_with_the_eager_message(case, path):
    """With errors=SampleErrors(...) a call does not raise for bad rows: they get token -1 and NaN
    log-probs, the other rows their usual draw, and errors.check() raises the eager call's ValueError."""
    from fastrl.sampling import SampleErrors

    dev = _path_device(path)
    x, kw, x_good, kw_good, bad_rows = _bad_call(case, dev)
    with backend("torch" if path == "torch" else "auto"):
        with pytest.raises(ValueError) as eager:
            sample(x, generator=_generator(dev, 1), **kw)
        errors = SampleErrors(dev)
        tokens, logp = sample(x, generator=_generator(dev, 1), errors=errors, **kw)  # does not raise
        with pytest.raises(ValueError) as deferred:
            errors.check()
        assert str(deferred.value) == str(eager.value)
        errors.check()  # a check clears what it raised
        want, _ = sample(x_good, generator=_generator(dev, 1), **kw_good)
    if path == "torch":  # the torch path checks on the host: every row of the call is marked
        assert (tokens == -1).all()
        return
    bad = torch.zeros(6, dtype=torch.bool, device=dev)
    bad[bad_rows] = True
    assert (tokens[bad] == -1).all() and torch.isnan(logp[bad]).all()
    assert torch.equal(tokens[~bad], want[~bad]) and torch.isfinite(logp[~bad]).all()


def test_deferred_errors_keep_the_smallest_code_over_calls():
    """The word keeps, over the calls since the last check, a bad setting before bad logits, then the
    lowest row; good calls in between change nothing."""
    from fastrl.sampling import SampleErrors

    errors = SampleErrors()
    x = torch.randn(8, 30)
    sample(x, errors=errors)
    errors.check()
    late, early = x.clone(), x.clone()
    late[5, 0], early[2, 3] = float("nan"), float("nan")
    sample(late, errors=errors)
    sample(x, errors=errors)
    sample(early, errors=errors)
    with pytest.raises(ValueError, match=r"NaN or \+inf \(row 2\)"):
        errors.check()
    sample(early, errors=errors)
    top_p = torch.full((8,), 0.9, dtype=torch.float64)
    top_p[6] = 2.0
    sample(x, top_p=top_p, errors=errors)
    with pytest.raises(ValueError, match="top_p must be in .0, 1., got 2 for row 6"):
        errors.check()
    with pytest.raises(ValueError, match="top_p"):  # numbers are checked at the call, deferred or not
        sample(x, top_p=2.0, errors=errors)


def test_deferred_errors_bad_handles():
    from fastrl.sampling import SampleErrors

    expect_error(sample, TypeError, "errors", torch.randn(2, 5), errors=torch.tensor([-1, 0]))
    expect_error(sample, ValueError, "errors", torch.randn(2, 5), errors=SampleErrors("meta"))
    seed = torch.tensor([1])
    for word in (torch.tensor([-1]), torch.tensor([-1.0, 0.0]), torch.tensor([-1, 0, 0])):
        expect_error(torch.ops.fastrl.sample, ValueError, "error",
                     torch.randn(2, 5), seed, 1.0, 0, 1.0, 0.0, None, None, None, None, word)


def test_rollout_defers_the_samplers_checks(monkeypatch):
    """generate() passes one SampleErrors to every step (no sync per step on a GPU), feeds a bad row's
    token -1 to the model as 0, and raises the sampler's eager message at its checks."""
    pytest.importorskip("transformers")
    import importlib

    import transformers

    from fastrl.rollout import generate
    from fastrl.sampling import SampleErrors

    module = importlib.import_module("fastrl.rollout.generate")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config).eval()
    top_p = torch.tensor([0.9, 1.5])
    with pytest.raises(ValueError) as eager:
        sample(torch.randn(2, 64), top_p=top_p.double())
    seen = []
    real = module.sample

    def spy(*args, **kwargs):
        seen.append(kwargs.get("errors"))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "sample", spy)
    prompts = [torch.tensor([3, 4, 5]), torch.tensor([6, 7])]
    with pytest.raises(ValueError) as deferred:
        generate(model, prompts, max_new_tokens=5, top_p=top_p, stop_token_ids=[])  # no stops: checked at the end
    assert str(deferred.value) == str(eager.value)
    assert len(seen) == 5 and all(isinstance(e, SampleErrors) for e in seen) and len({id(e) for e in seen}) == 1
    seen.clear()
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompts, max_new_tokens=5, top_p=top_p, stop_token_ids=[2])  # the first exit check
    assert len(seen) == 1


@pytest.mark.gpu
def test_generator_on_another_device_is_refused():
    expect_error(sample, ValueError, "generator", torch.randn(2, 10), generator=torch.Generator(device="cuda"))
    expect_error(sample, ValueError, "generator", torch.randn(2, 10, device="cuda"), generator=torch.Generator())


def test_package_level_alias():
    assert fastrl.sample is sample


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_where_fp32_exp_steps_down_as_the_logit_steps_up(device):
    # exp() of these two neighbouring floats is not monotone in fp32 arithmetic; the candidate
    # bound from block maxima must still keep the larger logit (block 0) over the smaller (block 1)
    logits = torch.full((4000, 128), float("-inf"))
    logits[:, 0] = 0.0
    logits[:, 1] = -0.249990553
    logits[:, 64] = -0.249990568
    assert logits[0, 1] > logits[0, 64]
    tokens, _, flogp = (t.cpu() for t in sample(logits.to(device), top_k=2, generator=_generator(device, 3),
                                                return_filtered_logprobs=True))
    assert not (tokens == 64).any()
    exact = torch_impl.sampling_distribution(logits[:1], top_k=2)[0]
    torch.testing.assert_close(flogp.double(), exact[tokens].log(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_min_p_threshold_is_not_rounded_into_the_kept_side(device):
    import numpy as np

    below = float(np.nextafter(np.float32(10.0), np.float32(0)))
    below2 = float(np.nextafter(np.float32(below), np.float32(0)))
    for second, min_p in ((below, 0.5), (below2, 0.2)):
        logits = torch.tensor([[10.0, second]]).expand(2000, -1)
        exact = torch_impl.sampling_distribution(logits[:1], temperature=1e-6, min_p=min_p)[0]
        assert exact[1] == 0  # its probability ratio to the maximum is below min_p
        tokens, _ = sample(logits.to(device), temperature=1e-6, min_p=min_p, generator=_generator(device, 0))
        assert (tokens == 0).all()


# ---------------------------------------------------------------------------------------------------
# CUDA: agreement with the CPU sampler, reproducibility, real shapes, streams and graphs

CUDA_SETTINGS = SETTINGS + [{"temperature": 0.0}, {"top_k": 300}, {"top_p": 0.95, "min_p": 0.3},
                            {"temperature": 0.8, "top_k": 50, "top_p": 0.9}]


def _cuda_op(logits, seed, **kw):
    kw = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0} | kw
    seed_t = torch.tensor([seed], device=logits.device)
    return torch.ops.fastrl.sample(logits, seed_t, kw["temperature"], kw["top_k"], kw["top_p"], kw["min_p"],
                                   None, None, None, None)


def _cuda_kernel_or_skip():
    if not fastrl._extension.cuda_enabled():
        pytest.skip("fastrl._C was built without its CUDA kernels (the CUDA path runs the torch reference)")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 13, 1031, 50257, 151936])
def test_cuda_draws_the_cpu_samplers_tokens_for_the_same_seed(vocab, dtype):
    """The same Philox uniform per row: CPU and GPU pick the same token unless a draw falls within
    fp32 rounding (~1e-6 relative) of a CDF boundary; log-probs agree to fp32 rounding."""
    g = torch.Generator().manual_seed(vocab)
    rows = 256 if vocab < 100_000 else 64
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)
    for kw in CUDA_SETTINGS:
        cpu = _op(logits, 2024, **kw)
        gpu = [t.cpu() for t in _cuda_op(logits.cuda(), 2024, **kw)]
        same = cpu[0] == gpu[0]
        assert same.float().mean() >= 0.99, (kw, same.float().mean())
        torch.testing.assert_close(gpu[1][same], cpu[1][same], rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(gpu[2][same], cpu[2][same], rtol=1e-5, atol=2e-5)


@pytest.mark.gpu
def test_cuda_same_seed_same_bits_and_per_row_settings():
    _cuda_kernel_or_skip()
    g = torch.Generator(device="cuda").manual_seed(0)
    rows, vocab = 512, 32000
    logits = torch.randn(rows, vocab, generator=g, device="cuda") * 3
    per_row = {"temperature": torch.rand(rows, generator=g, device="cuda") + 0.2,
               "top_k": torch.randint(0, 100, (rows,), generator=g, device="cuda"),
               "top_p": torch.rand(rows, generator=g, device="cuda") * 0.9 + 0.1,
               "min_p": torch.rand(rows, generator=g, device="cuda") * 0.1}
    a = sample(logits, generator=_generator("cuda", 5), return_filtered_logprobs=True, **per_row)
    b = sample(logits, generator=_generator("cuda", 5), return_filtered_logprobs=True, **per_row)
    for x, y in zip(a, b):
        assert torch.equal(x, y)  # masses are summed in integers: bit-identical reruns
    c = sample(logits, generator=_generator("cuda", 6), **per_row)
    assert not torch.equal(a[0], c[0])
    rows_cpu = {k: v.cpu() for k, v in per_row.items()}
    seed = int(torch.randint(0, 2**62, (1,), generator=_generator("cuda", 5), device="cuda").item())
    ref = _op(logits.cpu(), seed, rows=tuple(rows_cpu[k] for k in ("temperature", "top_k", "top_p", "min_p")))
    assert (ref[0] == a[0].cpu()).float().mean() >= 0.99


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_real_shape_b256_v151936(dtype):
    """B = 256, V = 151936 (Qwen): every token drawn is in the filtered support, log-probs match fp64."""
    g = torch.Generator(device="cuda").manual_seed(1)
    logits = (torch.randn(256, 151936, generator=g, device="cuda") * 2).to(dtype)
    for kw in ({"temperature": 0.8, "top_k": 50, "top_p": 0.9}, {"temperature": 0.8, "top_p": 0.9},
               {"temperature": 0.8}, {"min_p": 0.05}, {"top_k": 1}, {"temperature": 0.0}):
        tokens, logp, flogp = sample(logits, generator=g, return_filtered_logprobs=True, **kw)
        x = logits.double()
        probs = torch_impl.sampling_distribution(x, **kw)
        assert (probs.gather(1, tokens[:, None]) > 0).all(), kw
        t = kw.get("temperature", 1.0)
        if t > 0:
            ref = torch.log_softmax((x - x.max(-1, keepdim=True).values) / t, -1).gather(1, tokens[:, None]).squeeze(1)
            torch.testing.assert_close(logp.double(), ref, rtol=0, atol=1e-4)
        torch.testing.assert_close(flogp.double(), probs.gather(1, tokens[:, None]).squeeze(1).log(), rtol=0, atol=1e-4)
        if kw.get("top_k") == 1 or t == 0:
            assert torch.equal(tokens, logits.argmax(-1))


@pytest.mark.gpu
def test_cuda_huge_temperature():
    logits = torch.randn(4, 200, device="cuda")
    logits[:, :64] = float("-inf")
    logits[:, ::7] = float("-inf")
    for t in (1e38, 3e38):
        tokens, logp, flogp = sample(logits, temperature=t, return_filtered_logprobs=True, top_p=0.5)
        assert torch.isfinite(logits.gather(1, tokens[:, None])).all()
        assert torch.isfinite(logp).all() and torch.isfinite(flogp).all()


@pytest.mark.gpu
def test_cuda_runs_on_the_current_stream_and_in_a_cuda_graph():
    _cuda_kernel_or_skip()
    logits = torch.randn(64, 5000, device="cuda")
    seed = torch.tensor([123], device="cuda")
    eager = _cuda_op(logits, 123, temperature=0.7, top_p=0.9)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = _cuda_op(logits, 123, temperature=0.7, top_p=0.9)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(on_side[0], eager[0])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # no host sync inside: errors are not raised while capturing
        captured = torch.ops.fastrl.sample(logits, seed, 0.7, 0, 0.9, 0.0, None, None, None, None)
    graph.replay()
    assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])
    logits[3, 0] = float("nan")  # a bad row inside the graph: token -1, NaN log-probs
    graph.replay()
    assert captured[0][3].item() == -1 and torch.isnan(captured[1][3])
    assert torch.equal(captured[0][:3], eager[0][:3])


# ---------------------------------------------------------------------------------------------------
# The CUDA kernel's source, run on the CPU through its SIMT emulation

CUDA_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
# (threads, candidate capacity, log2 histogram bins): the real block, and a small one that sends
# vocabularies of a few hundred through the histogram rounds meant for large ones.
EMULATED_CONFIGS = {"real": (256, 4096, 11), "small": (64, 32, 6)}
MIN_CHUNK = {"real": 2048, "small": 64}  # the shortest row chunk of a split first pass
_ENTRY = """#include "sampling.cu"
#include <vector>
static int last_chunks = 0;
extern "C" int fastrl_emulated_chunks() { return last_chunks; }  // of the last launch
// The arguments both entries share: scalar settings, per-row ones, the outputs, the error word; sms is the
// GPU's SM count (0: no split of the first pass).
static fastrl::gpu::SampleArgs base_args(const void* logits, int dtype, long long rows, long long vocab,
    long long row_stride, long long seed, double temperature, long long top_k, double top_p, double min_p,
    const double* temperatures, const long long* top_ks, const double* top_ps, const double* min_ps,
    long long* tokens, float* logprobs, float* filtered, unsigned long long* error, int sms) {
  fastrl::gpu::SampleArgs a{};
  a.logits = logits;
  a.dtype = static_cast<fastrl::gpu::LogitsType>(dtype);
  a.rows = rows; a.vocab = vocab; a.row_stride = row_stride; a.seed_value = static_cast<uint64_t>(seed);
  a.temperature = temperature; a.top_k = top_k; a.top_p = top_p; a.min_p = min_p;
  a.temperatures = temperatures; a.top_ks = reinterpret_cast<const int64_t*>(top_ks);
  a.top_ps = top_ps; a.min_ps = min_ps;
  a.tokens = reinterpret_cast<int64_t*>(tokens); a.logprobs = logprobs; a.filtered_logprobs = filtered;
  a.error = error;
  a.chunks = sms > 0 ? fastrl::gpu::sample_chunks(rows, vocab, sms) : 1;
  return a;
}
static int launch(fastrl::gpu::SampleArgs& a) {  // with a workspace of the size the launch asks for
  std::vector<unsigned char> workspace(
      static_cast<size_t>(fastrl::gpu::sample_workspace_bytes(a.rows, a.chunks, a.cond_logprobs != nullptr)));
  a.workspace = workspace.data();
  last_chunks = a.chunks;
  return fastrl::gpu::launch_sample(a, nullptr);
}
extern "C" int fastrl_emulated_sample(const void* logits, int dtype, long long rows, long long vocab,
    long long row_stride, long long seed, double temperature, long long top_k, double top_p, double min_p,
    const double* temperatures, const long long* top_ks, const double* top_ps, const double* min_ps,
    long long* tokens, float* logprobs, float* filtered, unsigned long long* error, int accumulate, int sms) {
  fastrl::gpu::SampleArgs a = base_args(logits, dtype, rows, vocab, row_stride, seed, temperature, top_k, top_p,
      min_p, temperatures, top_ks, top_ps, min_ps, tokens, logprobs, filtered, error, sms);
  a.accumulate = accumulate != 0;
  return launch(a);
}
extern "C" unsigned long long fastrl_emulated_atomics() {  // atomics since the last call
  const unsigned long long n = simt::atomic_count();
  simt::atomic_count() = 0;
  return n;
}
// Classifier-free guidance: the plain entry's arguments (scalar settings, per-row ones), then the
// unconditional logits (same dtype, element stride 1), their row stride, the weight and the output of
// the conditional branch's log-probs (nullptr: not asked for).
extern "C" int fastrl_emulated_sample_cfg(const void* logits, int dtype, long long rows, long long vocab,
    long long row_stride, long long seed, double temperature, long long top_k, double top_p, double min_p,
    const double* temperatures, const long long* top_ks, const double* top_ps, const double* min_ps,
    long long* tokens, float* logprobs, float* filtered, unsigned long long* error, int sms,
    const void* uncond, long long uncond_stride, float cfg_weight, float* cond_logprobs) {
  fastrl::gpu::SampleArgs a = base_args(logits, dtype, rows, vocab, row_stride, seed, temperature, top_k, top_p,
      min_p, temperatures, top_ks, top_ps, min_ps, tokens, logprobs, filtered, error, sms);
  a.uncond = uncond; a.uncond_stride = uncond_stride; a.cfg_weight = cfg_weight; a.cond_logprobs = cond_logprobs;
  return launch(a);
}
"""


@functools.cache
def _emulated_kernel(config: str, ex2_ulps: int = 0):
    if shutil.which("g++") is None:
        pytest.skip("g++ not found: the CUDA kernel's source is not run on the CPU")
    threads, capacity, bins_log2 = EMULATED_CONFIGS[config]
    tmp = Path(tempfile.mkdtemp(prefix="fastrl-simt-"))
    (tmp / "entry.cpp").write_text(_ENTRY)
    cmd = ["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-DFASTRL_SIMT_EMULATION",
           f"-DFASTRL_SAMPLE_THREADS={threads}", f"-DFASTRL_SAMPLE_CAPACITY={capacity}",
           f"-DFASTRL_SAMPLE_BINS_LOG2={bins_log2}", f"-DFASTRL_SAMPLE_MIN_CHUNK={MIN_CHUNK[config]}",
           f"-DFASTRL_SIMT_EX2_ULPS={ex2_ulps}",
           f"-I{CUDA_DIR}", str(tmp / "entry.cpp"), "-o", str(tmp / "k.so")]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    fn = ctypes.CDLL(str(tmp / "k.so")).fastrl_emulated_sample
    p, i64, f64 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_double
    fn.argtypes = [p, ctypes.c_int, i64, i64, i64, i64, f64, i64, f64, f64, p, p, p, p, p, p, p, p, ctypes.c_int,
                   ctypes.c_int]
    fn.chunks = ctypes.CDLL(str(tmp / "k.so")).fastrl_emulated_chunks
    fn.atomics = ctypes.CDLL(str(tmp / "k.so")).fastrl_emulated_atomics
    fn.atomics.restype = ctypes.c_ulonglong
    fn.cfg = ctypes.CDLL(str(tmp / "k.so")).fastrl_emulated_sample_cfg
    fn.cfg.argtypes = [p, ctypes.c_int, i64, i64, i64, i64, f64, i64, f64, f64, p, p, p, p, p, p, p, p, ctypes.c_int,
                       p, i64, ctypes.c_float, p]
    return fn


_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _emulated(config, logits, seed, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, rows=(None,) * 4, word=None,
              sms=0, ex2_ulps=0):
    """The CUDA kernel on the CPU: (tokens, logprobs, filtered logprobs, error code). With ``word`` (int64
    [2]) the launch lowers that caller-owned error word (the deferred form) instead of resetting its own."""
    assert logits.stride(1) == 1
    b = logits.shape[0]
    out = (torch.empty(b, dtype=torch.int64), torch.empty(b), torch.empty(b))
    error = torch.zeros(2, dtype=torch.int64) if word is None else word
    rows = [None if r is None else (r.long() if i == 1 else r.double()).contiguous() for i, r in enumerate(rows)]
    ptr = [None if r is None else r.data_ptr() for r in rows]
    kernel = _emulated_kernel(config) if ex2_ulps == 0 else _emulated_kernel(config, ex2_ulps)  # one cache entry
    rc = kernel(logits.data_ptr(), _DTYPE_CODES[logits.dtype], b, logits.shape[1], logits.stride(0),
                                  seed, temperature, top_k, top_p, min_p, *ptr, *(t.data_ptr() for t in out),
                                  error.data_ptr(), word is not None, sms)
    assert rc == 0
    return (*out, int(error[0]) & (2**64 - 1))


NO_ERROR = 2**64 - 1
EMULATED_CASES = [{}, {"temperature": 0.5}, {"top_k": 1}, {"top_k": 7}, {"top_k": 300}, {"top_p": 0.3}, {"top_p": 0.9},
                  {"top_p": 1e-20}, {"min_p": 0.1}, {"min_p": 1.0}, {"top_k": 6, "top_p": 0.7},
                  {"temperature": 0.7, "top_p": 0.9, "min_p": 0.05}, {"temperature": 1.3, "top_k": 8, "top_p": 0.95,
                                                                      "min_p": 0.02},
                  {"temperature": 0.0}, {"top_p": 0.95, "min_p": 0.3}, {"temperature": 1e-6, "top_k": 3}]


def _assert_same_draws(got, want, what, min_agree=0.99):
    same = got[0] == want[0]
    assert same.float().mean() >= min_agree, (what, same.float().mean().item())
    torch.testing.assert_close(got[1][same], want[1][same], rtol=1e-5, atol=1e-5, msg=str(what))
    torch.testing.assert_close(got[2][same], want[2][same], rtol=1e-5, atol=1e-5, msg=str(what))


@pytest.mark.parametrize("config", EMULATED_CONFIGS)
@pytest.mark.parametrize("vocab", [13, 257, 1031])
def test_emulated_cuda_kernel_draws_the_cpu_samplers_tokens(config, vocab):
    g = torch.Generator().manual_seed(vocab)
    rows = 96
    logits = torch.randn(rows, vocab, generator=g) * 3
    settings = (torch.rand(rows, generator=g) * 1.5 + 0.2, torch.randint(0, 60, (rows,), generator=g),
                torch.rand(rows, generator=g) * 0.9 + 0.1, torch.rand(rows, generator=g) * 0.2)
    got = _emulated(config, logits, 987, rows=settings)
    assert got[3] == NO_ERROR
    _assert_same_draws(got, _op(logits, 987, rows=settings), "per-row settings", min_agree=0.995)


@pytest.mark.parametrize("kind", ["randn", "ties", "masked", "bf16", "fp16", "misaligned"])
def test_emulated_cuda_kernel_every_filter_path(kind):
    """Each filter combination on the small block (histogram rounds, candidates overflowing),
    with ties, banned tokens, half-precision inputs and rows that start off a 16-byte boundary."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(24, 302, generator=g) * 3
    if kind == "ties":
        x = (x * 2).round() / 2
    if kind == "masked":
        x[torch.rand(x.shape, generator=g) < 0.6] = float("-inf")
        x[:, :2] = 0.5
    x = x[:, 1:301] if kind == "misaligned" else x[:, :300].contiguous()
    x = {"bf16": x.bfloat16(), "fp16": x.half()}.get(kind, x)
    for kw in EMULATED_CASES:
        got = _emulated("small", x, 31337, **kw)
        assert got[3] == NO_ERROR, kw
        _assert_same_draws(got, _op(x, 31337, **kw), kw, min_agree=0.95)


def test_emulated_cuda_kernel_large_vocabulary():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 151936, generator=g) * 2).bfloat16()
    for kw in ({"temperature": 0.8, "top_k": 50, "top_p": 0.9}, {"temperature": 0.8, "top_p": 0.9},
               {"temperature": 0.8}, {"top_k": 1000}, {"temperature": 0.7, "top_p": 0.9, "min_p": 0.05}):
        _assert_same_draws(_emulated("real", logits, 5, **kw), _op(logits, 5, **kw), kw, min_agree=1.0)


def test_emulated_cuda_kernel_is_deterministic_and_reports_bad_rows():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(40, 500, generator=g)
    kw = {"temperature": 0.9, "top_p": 0.8, "top_k": 100}
    a, b = _emulated("small", logits, 3, **kw), _emulated("small", logits, 3, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))
    logits[9, 4] = float("nan")
    logits[30, :] = float("-inf")
    tokens, logp, _, error = _emulated("small", logits, 3, **kw)
    assert error == (1 << 60) | (9 << 3) | 4  # logits, first bad row 9, NaN or +inf
    assert tokens[9] == -1 and tokens[30] == -1 and torch.isnan(logp[9])
    good = torch.ones(40, dtype=torch.bool)
    good[[9, 30]] = False
    assert (tokens[good] >= 0).all() and torch.isfinite(logp[good]).all()
    top_p = torch.full((40,), 0.9)
    top_p[17] = 1.5  # a bad setting is reported before bad logits, whatever the row
    assert _emulated("small", logits, 3, rows=(None, None, top_p, None))[3] == (17 << 3) | 2


@pytest.mark.parametrize("case", DEFERRED_CASES)
def test_emulated_cuda_kernel_writes_the_cpu_ops_error_word(case):
    """The deferred form on both devices: the kernel lowers the caller's two-word error word exactly
    as the CPU op does (code and the bad setting's value), so the later check raises the same message,
    and it leaves a word it does not lower as it was (an eager launch resets its own)."""
    x, kw, _, _, _ = _bad_call(case, "cpu")
    rows = tuple(kw.get(name) for name in ("temperature", "top_k", "top_p", "min_p"))
    cpu_word = torch.tensor([-1, 0])
    torch.ops.fastrl.sample(x, torch.tensor([11]), 1.0, 0, 1.0, 0.0, *rows, cpu_word)
    emu_word = torch.tensor([-1, 0])
    got = _emulated("small", x, 11, rows=rows, word=emu_word)
    assert int(cpu_word[0]) != -1 and torch.equal(emu_word, cpu_word), (emu_word, cpu_word)
    assert got[3] == int(cpu_word[0]) & (2**64 - 1)
    with pytest.raises(ValueError) as eager:
        _op(x, 11, rows=rows)
    with pytest.raises(ValueError) as deferred:
        torch.ops.fastrl.sample_check(emu_word)
    assert str(deferred.value) == str(eager.value)
    earlier = torch.tensor([0, 12345])  # the smallest code (row 0's temperature), left by an earlier call
    _emulated("small", x, 11, rows=rows, word=earlier)
    assert earlier.tolist() == [0, 12345]
    clean = torch.tensor([-1, 0])
    _emulated("small", torch.randn(4, 50), 11, word=clean)
    assert clean.tolist() == [-1, 0]


def test_cuda_glue_does_not_sync_in_the_deferred_path():
    """The torch glue of the CUDA sampler: with an error word, nothing between the entry of sample_cuda
    and its deferred return reads device memory back (no .item(), no copy to the host, no stream or
    device synchronisation); an eager call's one read-back is raise_if_error's 16-byte copy."""
    src = (CUDA_DIR / "sampling_ops.cpp").read_text()
    body = src[src.index("std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_cuda("):]
    deferred = body[: body.index("if (deferred) return {tokens, logprobs, filtered_logprobs};")]
    for sync in (".item", ".cpu()", "Synchronize", "cudaMemcpy(", "raise_if_error", "kCPU", ".to("):
        assert sync not in deferred, sync
    assert ".item" not in src  # no per-call scalar read-back anywhere in the glue
    eager = body[len(deferred):]
    assert "raise_if_error(error, stream)" in eager


@pytest.mark.parametrize("config,vocab", [("small", 4096), ("real", 20000)])
def test_emulated_histogram_atomics_are_aggregated_per_warp(config, vocab):
    """top_k above the block size on a mostly -inf row: the first histogram pass takes every element,
    and its -inf entries all fall in one bin. The lanes of a warp that share a bin update it once
    (warp-aggregated atomics), so the kernel issues far fewer atomics than the 4 per element of
    per-lane updates; the draws stay the CPU sampler's."""
    g = torch.Generator().manual_seed(vocab)
    x = torch.full((2, vocab), float("-inf"))
    finite = torch.rand(2, vocab, generator=g) < 0.05
    x[finite] = torch.randn(int(finite.sum()), generator=g) * 2
    kernel = _emulated_kernel(config)
    for kw in ({"top_k": 300}, {"top_k": 300, "top_p": 0.9}):
        kernel.atomics()
        got = _emulated(config, x, 21, **kw)
        atomics = kernel.atomics()
        assert got[3] == NO_ERROR
        _assert_same_draws(got, _op(x, 21, **kw), kw, min_agree=1.0)
        assert atomics < 2 * vocab, (kw, atomics)  # per-lane updates: >= 4 per element and row


H200_SMS = 132


def test_emulated_split_rows_draw_the_cpu_samplers_tokens():
    """Fewer rows than SMs: the first pass runs on rows x chunks blocks (a first kernel writes per-warp
    partials of each row chunk, the per-row kernel merges them instead of reading the row), and the
    draws stay the CPU sampler's (the partials change only the fp32 rounding of the normaliser)."""
    kernel = _emulated_kernel("small")
    g = torch.Generator().manual_seed(11)
    rows, vocab = 96, 1031
    logits = torch.randn(rows, vocab, generator=g) * 3
    settings = (torch.rand(rows, generator=g) * 1.5 + 0.2, torch.randint(0, 60, (rows,), generator=g),
                torch.rand(rows, generator=g) * 0.9 + 0.1, torch.rand(rows, generator=g) * 0.2)
    settings[0][:8] = 0.0  # greedy rows: the first maximum comes from the merged partials
    split = _emulated("small", logits, 987, rows=settings, sms=H200_SMS)
    assert kernel.chunks() == 3  # 96 rows on 132 SMs: 3 chunks a row, 288 blocks
    assert split[3] == NO_ERROR
    cpu = _op(logits, 987, rows=settings)
    _assert_same_draws(split, cpu, "split, per-row settings", min_agree=0.995)
    whole = _emulated("small", logits, 987, rows=settings)
    assert kernel.chunks() == 1
    _assert_same_draws(split, whole, "split vs one block per row", min_agree=0.995)
    assert torch.equal(split[0][:8], logits[:8].argmax(-1))
    for kw in EMULATED_CASES:  # B = 1: 16 chunks of 65 elements
        for seed in range(4):
            one = _emulated("small", logits[seed:seed + 1], seed, sms=H200_SMS, **kw)
            assert kernel.chunks() == 16 and one[3] == NO_ERROR
            _assert_same_draws(one, _op(logits[seed:seed + 1], seed, **kw), kw, min_agree=1.0)


def test_emulated_split_rows_report_bad_rows_as_one_block_does():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 700, generator=g)
    logits[4, 650] = float("nan")
    logits[2] = float("-inf")
    logits[5, :600] = float("-inf")  # whole chunks of -inf, a finite tail
    split, whole = _emulated("small", logits, 3, sms=H200_SMS), _emulated("small", logits, 3)
    assert split[3] == whole[3] == (1 << 60) | (2 << 3) | 5  # row 2: no finite value
    assert torch.equal(split[0], whole[0]) and split[0][4] == -1 and split[0][2] == -1
    assert 600 <= split[0][5] < 700


def test_emulated_split_large_vocabulary_b1():
    """B = 1 and 2 at V = 151936 (Qwen) on the real block: 74 chunks of 2056 elements per row."""
    kernel = _emulated_kernel("real")
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(2, 151936, generator=g) * 2).bfloat16()
    for kw in ({"temperature": 0.8, "top_k": 50, "top_p": 0.9}, {"temperature": 0.8, "top_p": 0.9},
               {"temperature": 0.8}, {"top_k": 1000}, {"temperature": 0.0}):
        for b in (1, 2):
            got = _emulated("real", logits[:b], 5, sms=H200_SMS, **kw)
            assert kernel.chunks() == 74
            _assert_same_draws(got, _op(logits[:b], 5, **kw), (b, kw), min_agree=1.0)


def test_emulated_first_pass_exp_does_not_move_the_masses():
    """The first pass takes the hardware exp (ex2.approx, a few ulp from exp2, its rounding not
    specified), which feeds only the normaliser z; the masses the filters and the draw compare are
    the CPU sampler's exp, in exact fixed point. Emulated with ex2.approx biased by -4, 0 and +4 ulp on
    every term (a systematic error twice the size the hardware is known for): with top-k or min-p the
    tokens and filtered log-probs are bit-identical whatever the bias; plain and top-p-only rows still
    draw the CPU sampler's tokens; log-probs move by < 1e-5."""
    g = torch.Generator().manual_seed(8)
    # 4 rows of a 64k vocabulary: 16 warps' worth of terms per row at the real block size, enough for a
    # biased exp to move the normaliser well past the masses' fixed-point step (the test's point)
    logits = (torch.randn(4, 65536, generator=g) * 2).bfloat16()
    exact = [{"top_k": 50}, {"temperature": 0.8, "top_k": 50, "top_p": 0.9}, {"min_p": 0.05}]
    loose = [{}, {"temperature": 0.8, "top_p": 0.9}]
    base = {i: _emulated("real", logits, 9, **kw) for i, kw in enumerate(exact)}
    moved = False
    for ulps in (-4, 4):
        for i, kw in enumerate(exact):
            got = _emulated("real", logits, 9, ex2_ulps=ulps, **kw)
            assert torch.equal(got[0], base[i][0]) and torch.equal(got[2], base[i][2]), (ulps, kw)
            torch.testing.assert_close(got[1], base[i][1], rtol=0, atol=1e-5)
            moved |= not torch.equal(got[1], base[i][1])
        for kw in loose:
            _assert_same_draws(_emulated("real", logits, 9, ex2_ulps=ulps, **kw), _op(logits, 9, **kw), (ulps, kw),
                               min_agree=1.0)
    assert moved, "the biased exp changed no log-prob: the emulation did not apply FASTRL_SIMT_EX2_ULPS"


# ---------------------------------------------------------------------------------------------------
# Classifier-free guidance and vocabulary ranges in the CUDA kernel (emulated) vs the CPU sampler


def _emulated_cfg(config, logits, uncond, w, seed, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                  rows=(None,) * 4, sms=0, cond=True):
    """The guided kernel on the CPU: (tokens, logprobs, filtered, cond logprobs or None, error code)."""
    assert logits.stride(1) == 1 and uncond.stride(1) == 1 and uncond.shape == logits.shape
    b = logits.shape[0]
    out = (torch.empty(b, dtype=torch.int64), torch.empty(b), torch.empty(b))
    cond_out = torch.empty(b) if cond else None
    error = torch.zeros(2, dtype=torch.int64)
    rows = [None if r is None else (r.long() if i == 1 else r.double()).contiguous() for i, r in enumerate(rows)]
    ptr = [None if r is None else r.data_ptr() for r in rows]
    rc = _emulated_kernel(config).cfg(logits.data_ptr(), _DTYPE_CODES[logits.dtype], b, logits.shape[1],
                                      logits.stride(0), seed, temperature, top_k, top_p, min_p, *ptr,
                                      *(t.data_ptr() for t in out), error.data_ptr(), sms, uncond.data_ptr(),
                                      uncond.stride(0), w, None if cond_out is None else cond_out.data_ptr())
    assert rc == 0
    return (*out, cond_out, int(error[0]) & (2**64 - 1))


def _cpu_cfg(logits, uncond, w, seed, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, rows=(None,) * 4):
    """The CPU op, guided, with the conditional log-probs: (tokens, logprobs, filtered, cond)."""
    rows = [None if r is None else (r.double() if r.is_floating_point() else r) for r in rows]
    cond = torch.empty(logits.shape[0])
    out = torch.ops.fastrl.sample(logits, torch.tensor([seed]), temperature, top_k, top_p, min_p, *rows, None,
                                  uncond, w, cond)
    return (*out, cond)


def _assert_same_guided_draws(got, want, what, min_agree=0.99):
    _assert_same_draws(got, want, what, min_agree)
    same = got[0] == want[0]
    if got[3] is not None:
        torch.testing.assert_close(got[3][same], want[3][same], rtol=1e-5, atol=1e-5, msg=str(what))


def _guided_pair(rows, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(rows, vocab, generator=g) * 2
    return c, c * 0.3 + torch.randn(rows, vocab, generator=g) * 2


@pytest.mark.parametrize("config", EMULATED_CONFIGS)
@pytest.mark.parametrize("vocab", [13, 257, 1031])
def test_emulated_cuda_kernel_guided_draws_the_cpu_samplers_tokens(config, vocab):
    rows = 64
    c, u = _guided_pair(rows, vocab, vocab)
    g = torch.Generator().manual_seed(vocab + 1)
    settings = (torch.rand(rows, generator=g) * 1.5 + 0.2, torch.randint(0, 60, (rows,), generator=g),
                torch.rand(rows, generator=g) * 0.9 + 0.1, torch.rand(rows, generator=g) * 0.2)
    settings[0][:6] = 0.0  # greedy rows
    for w in (0.0, 3.0):
        got = _emulated_cfg(config, c, u, w, 987, rows=settings)
        assert got[4] == NO_ERROR
        _assert_same_guided_draws(got, _cpu_cfg(c, u, w, 987, rows=settings), ("per-row", w), min_agree=0.99)


@pytest.mark.parametrize("kind", ["randn", "ties", "masked", "bf16", "fp16", "range", "range_bf16", "uncond_offset"])
def test_emulated_cuda_kernel_guided_every_filter_path(kind):
    """Guided rows through each filter combination on the small block, with ties, tokens banned in
    either branch, half-precision inputs, a vocabulary range read as a row-strided view (rows starting
    off a 16-byte boundary), and an uncond whose rows are not aligned as the logits' are (its vector
    reads gathered element by element); token for token with the CPU sampler, log-probs included."""
    g = torch.Generator().manual_seed(17)
    c, u = _guided_pair(24, 302, 17)
    if kind == "ties":
        c, u = (c * 2).round() / 2, (u * 2).round() / 2
    if kind == "masked":
        c[torch.rand(c.shape, generator=g) < 0.3] = float("-inf")
        u[torch.rand(u.shape, generator=g) < 0.3] = float("-inf")
        c[:, :2], u[:, :2] = 0.5, 0.1
    if kind.startswith("range"):
        c, u = c[:, 3:290], u[:, 3:290]  # views: rows start 12 bytes (6 for bf16) off alignment
    elif kind == "uncond_offset":
        c, u = c[:, :300].contiguous(), u[:, 1:301]  # logits aligned, uncond rows 4 bytes off
    else:
        c, u = c[:, :300].contiguous(), u[:, :300].contiguous()
    if kind in ("bf16", "range_bf16"):
        c, u = c.bfloat16(), u.bfloat16()
    if kind == "fp16":
        c, u = c.half(), u.half()
    for kw in EMULATED_CASES:
        got = _emulated_cfg("small", c, u, 4.0, 31337, **kw)
        assert got[4] == NO_ERROR, kw
        _assert_same_guided_draws(got, _cpu_cfg(c, u, 4.0, 31337, **kw), kw, min_agree=0.95)


def test_emulated_split_rows_guided_draw_the_cpu_samplers_tokens():
    """Fewer rows than SMs, guided: the split first pass writes the conditional branch's records too."""
    kernel = _emulated_kernel("small")
    c, u = _guided_pair(8, 1031, 23)
    for kw in ({}, {"temperature": 0.7, "top_p": 0.9}, {"top_k": 20}, {"temperature": 0.0}, {"min_p": 0.1}):
        got = _emulated_cfg("small", c, u, 5.0, 77, sms=H200_SMS, **kw)
        assert kernel.chunks() > 1 and got[4] == NO_ERROR
        _assert_same_guided_draws(got, _cpu_cfg(c, u, 5.0, 77, **kw), kw, min_agree=1.0)
        plain = _emulated_cfg("small", c, u, 5.0, 77, sms=H200_SMS, cond=False, **kw)
        assert torch.equal(plain[0], got[0]) and torch.equal(plain[1], got[1])


def test_emulated_guided_cond_logprobs_match_fp64():
    c, u = _guided_pair(32, 500, 29)
    for t in (1.0, 0.6):
        got = _emulated_cfg("real", c, u, 3.0, 5, temperature=t, top_k=50)
        ref = torch.log_softmax(c.double() / t, -1).gather(1, got[0][:, None]).squeeze(1)
        torch.testing.assert_close(got[3].double(), ref, rtol=0, atol=2e-5)
        mixed = (u.double() + 3.0 * (c.double() - u.double())) / t
        torch.testing.assert_close(got[1].double(), torch.log_softmax(mixed, -1).gather(1, got[0][:, None]).squeeze(1),
                                   rtol=0, atol=2e-5)


def test_emulated_guided_bad_rows():
    """NaN in the unconditional branch is a bad row (even where the conditional one is -inf); a row
    banned entirely by the two branches together has no finite value."""
    c, u = _guided_pair(10, 400, 31)
    u[3, 17] = float("nan")
    c[6, 5], u[6, 5] = float("-inf"), float("nan")
    c[8, :200] = float("-inf")
    u[8, 200:] = float("-inf")
    tokens, logp, _, cond, error = _emulated_cfg("small", c, u, 2.0, 3, top_p=0.9)
    assert error == (1 << 60) | (3 << 3) | 4  # first bad row 3: NaN or +inf
    assert tokens[3] == tokens[6] == tokens[8] == -1 and torch.isnan(cond[[3, 6, 8]]).all()
    good = torch.ones(10, dtype=torch.bool)
    good[[3, 6, 8]] = False
    cpu = _cpu_cfg(c[good], u[good], 2.0, 3, top_p=0.9)
    with pytest.raises(ValueError, match="row 3"):
        _cpu_cfg(c, u, 2.0, 3, top_p=0.9)
    assert (tokens[good] >= 0).all() and torch.isfinite(cond[good]).all()
    assert cpu[0].shape == (7,)
    only8 = _emulated_cfg("small", c[8:9].contiguous(), u[8:9].contiguous(), 2.0, 3)
    assert only8[4] == (1 << 60) | (0 << 3) | 5  # no finite value
