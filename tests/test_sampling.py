"""fastrl.sampling.sample: distribution, exact agreement with the reference, determinism, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import chi_square_pvalue

import fastrl
from fastrl.ops import backend, reference
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


def _ref_draw(logits, seed, **settings):
    """The reference's draw with the uniforms the C++ sampler uses for ``seed``."""
    u = torch.tensor([reference.philox_uniform(seed, r) for r in range(logits.shape[0])], dtype=torch.float64)
    return reference.sample(logits, u, **settings)


def _op(logits, seed, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, rows=(None, None, None, None)):
    """The operator itself; per-row settings go in as int64 / float64 tensors."""
    rows = [r.double() if r is not None and r.is_floating_point() else r for r in rows]
    return torch.ops.fastrl.sample(logits, torch.tensor([seed]), temperature, top_k, top_p, min_p, *rows)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain")
def test_distribution_matches_exact_filtered_probs(settings, generator):
    logits = torch.randn(1, 13, generator=generator) * 1.5
    exact = reference.sampling_distribution(logits, **settings)[0]
    draws = 60_000
    tokens, _ = sample(logits.expand(draws, -1), generator=generator, **settings)
    counts = torch.bincount(tokens, minlength=13)
    assert counts[exact == 0].sum() == 0, "drew a token the filters remove"
    assert chi_square_pvalue(counts, exact) > 1e-4


def test_per_row_settings_mixed_in_one_batch(generator):
    logits = torch.randn(1, 13, generator=generator) * 1.5
    groups = [SETTINGS[1], SETTINGS[4], SETTINGS[6], SETTINGS[8], SETTINGS[11]]
    n = 30_000
    full = [{"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0} | s for s in groups]
    per_row = {
        name: torch.tensor([s[name] for s in full for _ in range(n)], dtype=torch.int64 if name == "top_k" else torch.float32)
        for name in ("temperature", "top_k", "top_p", "min_p")
    }
    tokens, _ = sample(logits.expand(n * len(groups), -1), generator=generator, **per_row)
    for i, s in enumerate(full):
        exact = reference.sampling_distribution(logits, **s)[0]
        counts = torch.bincount(tokens[i * n:(i + 1) * n], minlength=13)
        assert chi_square_pvalue(counts, exact) > 1e-4, s


@pytest.mark.parametrize("vocab", [13, 257, 1031])
def test_same_draws_as_reference_given_the_same_uniforms(vocab):
    g = torch.Generator().manual_seed(vocab)
    rows = 600
    logits = torch.randn(rows, vocab, generator=g) * 3
    settings = {
        "temperature": torch.rand(rows, generator=g) * 1.5 + 0.2,
        "top_k": torch.randint(0, 60, (rows,), generator=g),
        "top_p": torch.rand(rows, generator=g) * 0.9 + 0.1,
        "min_p": torch.rand(rows, generator=g) * 0.2,
    }
    tokens, logp, flogp = _op(logits, 987, rows=tuple(settings.values()))
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


def test_filtered_logprob_is_log_of_the_renormalised_probability():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 50, generator=g)
    tokens, logp, flogp = sample(logits, top_k=10, top_p=0.8, generator=g, return_filtered_logprobs=True)
    probs = reference.sampling_distribution(logits, top_k=10, top_p=0.8)
    torch.testing.assert_close(flogp.double(), probs.gather(1, tokens[:, None]).squeeze(1).log(), rtol=0, atol=1e-5)
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1),
                               rtol=0, atol=1e-5)
    assert (flogp >= logp - 1e-6).all()  # renormalising over fewer tokens can only raise a log-prob


def test_top_k_one_and_temperature_zero_are_argmax(generator):
    logits = torch.randn(200, 1000, generator=generator)
    expected = logits.argmax(-1)
    assert torch.equal(sample(logits, top_k=1, generator=generator)[0], expected)
    tokens, logp = sample(logits, temperature=0.0, generator=generator)
    assert torch.equal(tokens, expected)
    assert torch.equal(logp, torch.zeros(200))  # the T -> 0 limit puts all mass on the maximum
    assert torch.equal(sample(logits, min_p=1.0, generator=generator)[0], expected)


def test_greedy_ties_take_the_first_maximum_and_split_the_mass():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0]])
    tokens, logp = sample(logits, temperature=0.0)
    assert tokens.item() == 1
    assert logp.item() == pytest.approx(-torch.log(torch.tensor(2.0)).item())


def test_ties_at_the_top_k_boundary_are_kept(generator):
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0]])
    tokens, _ = sample(logits.expand(20_000, -1), top_k=2, generator=generator)
    counts = torch.bincount(tokens, minlength=5)
    assert counts[4] == 0 and (counts[1:4] > 0).all()
    assert chi_square_pvalue(counts, reference.sampling_distribution(logits, top_k=2)[0]) > 1e-4


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits(dtype):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(256, 1031, generator=g) * 4).to(dtype)
    tokens, logp, _ = _op(logits, 42, 0.9, 40, 0.9, 0.0)
    ref_tokens, ref_logp, _ = _ref_draw(logits.float(), 42, temperature=0.9, top_k=40, top_p=0.9)
    assert (tokens == ref_tokens).float().mean() >= 0.99
    same = tokens == ref_tokens
    torch.testing.assert_close(logp[same], ref_logp[same], rtol=1e-5, atol=1e-5)


def test_large_vocabulary_rows():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(8, 151936, generator=g) * 3).bfloat16()
    for kw in ({"top_k": 50, "top_p": 0.9}, {"top_p": 0.95}, {"min_p": 0.05}, {}):
        tokens, logp, flogp = sample(logits, generator=g, return_filtered_logprobs=True, **kw)
        probs = reference.sampling_distribution(logits.float(), **kw)
        assert (probs.gather(1, tokens[:, None]) > 0).all(), kw
        ref_logp = torch.log_softmax(logits.double(), -1).gather(1, tokens[:, None]).squeeze(1)
        torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=1e-4)
        torch.testing.assert_close(flogp.double(), probs.gather(1, tokens[:, None]).squeeze(1).log(), rtol=0, atol=1e-4)


def test_masked_tokens_are_never_drawn(generator):
    logits = torch.randn(4000, 31, generator=generator)
    banned = torch.rand(4000, 31, generator=generator) < 0.5
    banned[:, 0] = False
    logits[banned] = float("-inf")
    for kw in ({}, {"top_k": 5}, {"top_p": 0.99}, {"min_p": 0.01}):
        tokens, logp = sample(logits, generator=generator, **kw)
        assert not banned.gather(1, tokens[:, None]).any()
        assert torch.isfinite(logp).all()


def test_extreme_logits_and_tiny_temperature():
    logits = torch.tensor([[1e4, -1e4, 9999.0, 0.0], [-3e4, -3e4 + 1, -3e4 + 0.5, -3e4]])
    for t in (1e-6, 1e-30, 1.0):
        tokens, logp, flogp = sample(logits, temperature=t, return_filtered_logprobs=True)
        assert torch.isfinite(logp).all() and torch.isfinite(flogp).all()
        if t < 1:
            assert tokens.tolist() == [0, 1]


def test_strided_logits_equal_contiguous_ones():
    logits = torch.randn(16, 5, 300)
    last = logits[:, -1, :]  # what a model's last-position logits look like: rows strided
    transposed = torch.randn(300, 16).t()  # vocabulary strided: copied first
    assert not last.is_contiguous() and transposed.stride(1) != 1
    for view in (last, transposed):
        a = _op(view, 1, 0.7, 10, 0.9, 0.0)
        b = _op(view.contiguous(), 1, 0.7, 10, 0.9, 0.0)
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("path", ["cpp", "torch"])
def test_near_ties_are_resolved_on_the_logits(path):
    # exp() of these logits is the same fp32 number; the filters must still see two values
    cases = [(torch.tensor([[-1e-8, 0.0]]), 1.0), (torch.tensor([[5.0, 5.0 + 4.7e-7]]), 50.0)]
    with backend("torch" if path == "torch" else "auto"):
        for logits, t in cases:
            for kw in ({"top_k": 1}, {"min_p": 1.0}, {"top_p": 0.3}):
                tokens, _, flogp = sample(logits.expand(2000, -1), temperature=t, return_filtered_logprobs=True,
                                          generator=torch.Generator().manual_seed(0), **kw)
                assert (tokens == 1).all(), (logits, kw)
                assert (flogp == 0).all()


@pytest.mark.parametrize("path", ["cpp", "torch"])
def test_tiny_top_p_keeps_the_most_probable_token(path):
    logits = torch.randn(200, 1000, generator=torch.Generator().manual_seed(4))
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


def test_error_names_the_first_bad_row():
    x = torch.randn(64, 100)
    x[40, 3] = float("nan")
    x[5, 7] = float("nan")
    with pytest.raises(ValueError, match=r"row 5\b"):
        sample(x)


def test_empty_batch():
    tokens, logp = sample(torch.randn(0, 10))
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
@pytest.mark.parametrize("path", ["cpp", "torch"])
def test_bad_settings_raise_naming_the_argument(kw, exc, name, path):
    with backend("torch" if path == "torch" else "auto"), pytest.raises(exc, match=name):
        sample(torch.randn(3, 10), **kw)


@pytest.mark.parametrize("path", ["cpp", "torch"])
def test_bad_logits_raise(path):
    with backend("torch" if path == "torch" else "auto"):
        for bad in (float("nan"), float("inf")):
            x = torch.randn(3, 10)
            x[1, 4] = bad
            with pytest.raises(ValueError, match="logits"):
                sample(x)
        x = torch.randn(3, 10)
        x[2] = float("-inf")
        with pytest.raises(ValueError, match="no finite value"):
            sample(x)
    with pytest.raises(ValueError, match="logits"):
        sample(torch.randn(10))
    with pytest.raises(ValueError, match="logits"):
        sample(torch.randn(2, 3, 10))
    with pytest.raises(ValueError, match="logits"):
        sample(torch.randn(3, 10).double())
    with pytest.raises(ValueError, match="logits"):
        sample(torch.randint(0, 5, (3, 10)))
    with pytest.raises(ValueError, match="vocabulary"):
        sample(torch.randn(3, 0))
    with pytest.raises(TypeError, match="logits"):
        sample([[0.0, 1.0]])


@pytest.mark.gpu
def test_generator_on_another_device_is_refused():
    with pytest.raises(ValueError, match="generator"):
        sample(torch.randn(2, 10), generator=torch.Generator(device="cuda"))
    with pytest.raises(ValueError, match="generator"):
        sample(torch.randn(2, 10, device="cuda"), generator=torch.Generator())


def test_package_level_alias():
    assert fastrl.sample is sample


@pytest.mark.gpu
def test_cuda_sampling_matches_the_cpu_distribution():
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(1, 13) * 1.5
    for s in SETTINGS:
        exact = reference.sampling_distribution(logits, **s)[0]
        tokens, logp = sample(logits.cuda().expand(40_000, -1), generator=g, **s)
        assert tokens.device.type == "cuda" and logp.device.type == "cuda"
        assert chi_square_pvalue(torch.bincount(tokens.cpu(), minlength=13), exact) > 1e-4, s


@pytest.mark.gpu
def test_cuda_large_vocabulary_bf16():
    g = torch.Generator(device="cuda").manual_seed(0)
    for vocab in (32000, 50257, 128256, 151936):
        logits = (torch.randn(64, vocab, device="cuda", generator=g) * 3).bfloat16()
        tokens, logp = sample(logits, top_k=50, top_p=0.9, temperature=0.8, generator=g)
        probs = reference.sampling_distribution(logits.float(), temperature=0.8, top_k=50, top_p=0.9)
        assert (probs.gather(1, tokens[:, None]) > 0).all()
        ref = torch.log_softmax(logits.double() / 0.8, -1).gather(1, tokens[:, None]).squeeze(1)
        torch.testing.assert_close(logp.double(), ref, rtol=0, atol=1e-4)


def test_top_k_where_fp32_exp_steps_down_as_the_logit_steps_up():
    # exp() of these two neighbouring floats is not monotone in fp32 arithmetic; the candidate
    # bound from block maxima must still keep the larger logit (block 0) over the smaller (block 1)
    logits = torch.full((4000, 128), float("-inf"))
    logits[:, 0] = 0.0
    logits[:, 1] = -0.249990553
    logits[:, 64] = -0.249990568
    assert logits[0, 1] > logits[0, 64]
    tokens, _, flogp = sample(logits, top_k=2, generator=torch.Generator().manual_seed(3),
                              return_filtered_logprobs=True)
    assert not (tokens == 64).any()
    exact = reference.sampling_distribution(logits[:1], top_k=2)[0]
    torch.testing.assert_close(flogp.double(), exact[tokens].log(), rtol=0, atol=1e-5)


def test_min_p_threshold_is_not_rounded_into_the_kept_side():
    import numpy as np

    below = float(np.nextafter(np.float32(10.0), np.float32(0)))
    below2 = float(np.nextafter(np.float32(below), np.float32(0)))
    for second, min_p in ((below, 0.5), (below2, 0.2)):
        logits = torch.tensor([[10.0, second]]).expand(2000, -1)
        exact = reference.sampling_distribution(logits[:1], temperature=1e-6, min_p=min_p)[0]
        assert exact[1] == 0  # its probability ratio to the maximum is below min_p
        tokens, _ = sample(logits, temperature=1e-6, min_p=min_p, generator=torch.Generator().manual_seed(0))
        assert (tokens == 0).all()
