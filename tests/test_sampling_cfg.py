"""fastrl.sampling.sample with classifier-free guidance (uncond_logits, cfg_weight), a restricted
token range (token_range) and the conditional branch's log-probs (return_cond_logprobs).

Independent references: the exact distribution in fp64, ``softmax((u + w (c - u)) / T)`` over the
range and then filtered (:func:`fastrl.ops.torch_impl.sampling_distribution` applied to an fp64 mix
formed here), checked with a chi-square test; the fp64 ``log_softmax(c / T)`` over the range for the
conditional log-prob; the unguided sampler on the sliced logits for the range. The CUDA kernel's
source, run on the CPU through its SIMT emulation, is checked against the CPU sampler in
tests/test_sampling.py (the emulation's home).
"""

from __future__ import annotations

import pytest
import torch
from conftest import chi_square_pvalue, expect_error

import fastrl
from fastrl.ops import backend, torch_impl
from fastrl.sampling import SampleErrors, sample

PATHS = ["cpp", "torch"]
SETTINGS = [
    {},
    {"temperature": 0.6},
    {"top_k": 4},
    {"top_p": 0.7},
    {"min_p": 0.2},
    {"temperature": 1.3, "top_k": 8, "top_p": 0.9, "min_p": 0.02},
]


def _run(path, *args, **kwargs):
    if path == "torch":
        with backend("torch"):
            return sample(*args, **kwargs)
    return sample(*args, **kwargs)


def _pair(rows, vocab, seed, dtype=torch.float32, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(rows, vocab, generator=g) * scale
    u = c * 0.5 + torch.randn(rows, vocab, generator=g) * scale  # an unconditional branch related to c
    return c.to(dtype), u.to(dtype)


def _exact(c, u, w, token_range, **settings):
    """fp64: the filtered softmax of (u + w (c - u)) / T over [lo, hi), as a [B, hi - lo] table."""
    lo, hi = token_range
    mixed = u.double() + w * (c.double() - u.double())
    return torch_impl.sampling_distribution(mixed[:, lo:hi], **settings)


def _seed_of(generator_seed):
    """The per-call seed sample() draws from a generator seeded with ``generator_seed``."""
    return int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(generator_seed)))


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain")
@pytest.mark.parametrize("w", [0.0, 0.5, 3.0])
def test_guided_draws_follow_the_exact_fp64_distribution_over_the_range(settings, w):
    c, u = _pair(1, 24, 3)
    lo, hi = 4, 21
    exact = _exact(c, u, w, (lo, hi), **settings)[0]
    draws = 40_000
    tokens, _ = sample(c.expand(draws, -1), uncond_logits=u.expand(draws, -1), cfg_weight=w, token_range=(lo, hi),
                       generator=torch.Generator().manual_seed(7), **settings)
    assert ((tokens >= lo) & (tokens < hi)).all()
    counts = torch.bincount(tokens - lo, minlength=hi - lo)
    assert counts[exact == 0].sum() == 0, "drew a token the filters remove"
    assert chi_square_pvalue(counts, exact) > 1e-4


def test_torch_path_guided_draws_follow_the_exact_distribution():
    c, u = _pair(1, 12, 4)
    exact = _exact(c, u, 4.0, (2, 12), top_k=6, temperature=0.8)[0]
    draws = 6000
    tokens, _ = _run("torch", c.expand(draws, -1), uncond_logits=u.expand(draws, -1), cfg_weight=4.0,
                     token_range=(2, 12), top_k=6, temperature=0.8, generator=torch.Generator().manual_seed(1))
    assert chi_square_pvalue(torch.bincount(tokens - 2, minlength=10), exact) > 1e-4


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_draws_invert_the_philox_uniform_through_the_exact_cdf(path, dtype):
    """Given the sampler's own uniform per row, the token is the exact fp64 CDF's inverse at it (up to
    draws within fp32 rounding of a boundary), and both log-probs match fp64."""
    rows, vocab, lo, hi, w = 200, 97, 10, 90, 5.0
    c, u = _pair(rows, vocab, 5, dtype)
    g = torch.Generator().manual_seed(9)
    settings = {"temperature": torch.rand(rows, generator=g) + 0.3, "top_k": torch.randint(0, 40, (rows,), generator=g),
                "top_p": torch.rand(rows, generator=g) * 0.8 + 0.2, "min_p": torch.rand(rows, generator=g) * 0.1}
    tokens, logp, flogp, cond = _run(path, c, uncond_logits=u, cfg_weight=w, token_range=(lo, hi),
                                     generator=torch.Generator().manual_seed(21), return_filtered_logprobs=True,
                                     return_cond_logprobs=True, **settings)
    seed = _seed_of(21)
    uniforms = torch.tensor([torch_impl.philox_uniform(seed, r) for r in range(rows)], dtype=torch.float64)
    probs = _exact(c, u, w, (lo, hi), **settings)
    cdf = probs.cumsum(-1)
    want = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).squeeze(1).clamp_max(hi - lo - 1)
    same = tokens - lo == want
    assert same.float().mean() >= 0.99
    at = (tokens - lo)[:, None]
    t = settings["temperature"].double()[:, None]
    mixed = (u.double() + w * (c.double() - u.double()))[:, lo:hi]
    torch.testing.assert_close(logp.double(), torch.log_softmax(mixed / t, -1).gather(1, at).squeeze(1),
                               rtol=0, atol=2e-5)
    torch.testing.assert_close(flogp.double(), probs.gather(1, at).squeeze(1).log(), rtol=0, atol=2e-5)
    cond_ref = torch.log_softmax(c.double()[:, lo:hi] / t, -1).gather(1, at).squeeze(1)
    torch.testing.assert_close(cond.double(), cond_ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("path", PATHS)
def test_cond_logprobs_are_the_conditional_branch_under_temperature(path):
    c, u = _pair(64, 40, 6)
    for t in (1.0, 0.7):
        tokens, logp, cond = _run(path, c, uncond_logits=u, cfg_weight=3.0, temperature=t, top_p=0.9,
                                  generator=torch.Generator().manual_seed(2), return_cond_logprobs=True)
        ref = torch.log_softmax(c.double() / t, -1).gather(1, tokens[:, None]).squeeze(1)
        torch.testing.assert_close(cond.double(), ref, rtol=0, atol=1e-5)
        assert not torch.allclose(cond, logp)  # the mix is another distribution


@pytest.mark.parametrize("path", PATHS)
def test_greedy_takes_the_first_maximum_of_the_mix(path):
    c, u = _pair(16, 30, 8)
    c[0, 3] = c[0, 5] = 50.0  # row 0: c has two tied maxima, the mix (w = 1.5) one of them too
    u[0, 3] = u[0, 5] = 0.0
    tokens, logp, cond = _run(path, c, uncond_logits=u, cfg_weight=1.5, temperature=0.0, token_range=(2, 30),
                              return_cond_logprobs=True)
    mixed = u + (c - u) * 1.5
    assert torch.equal(tokens, mixed[:, 2:].argmax(-1) + 2)
    assert tokens[0] == 3 and logp[0] == pytest.approx(-torch.log(torch.tensor(2.0)).item())
    is_cond_max = c[:, 2:].gather(1, (tokens - 2)[:, None]).squeeze(1) == c[:, 2:].max(-1).values
    ties = (c[:, 2:] == c[:, 2:].max(-1, keepdim=True).values).sum(-1).float()
    assert torch.equal(cond, torch.where(is_cond_max, -ties.log(), float("-inf")))


@pytest.mark.parametrize("path", PATHS)
def test_weight_one_is_the_unguided_sampler_bit_for_bit(path):
    c, u = _pair(300, 77, 10)
    u[5, 3] = float("nan")  # unread at w = 1
    kw = {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "return_filtered_logprobs": True}
    plain = _run(path, c, generator=torch.Generator().manual_seed(3), **kw)
    guided = _run(path, c, uncond_logits=u, cfg_weight=1.0, generator=torch.Generator().manual_seed(3),
                  return_cond_logprobs=True, **kw)
    no_uncond = _run(path, c, cfg_weight=1.0, generator=torch.Generator().manual_seed(3), **kw)
    for a, b, d in zip(plain, guided, no_uncond):
        assert torch.equal(a, b) and torch.equal(a, d)
    with pytest.raises(ValueError, match="cfg_weight"):  # guidance with nothing to mix with is refused
        _run(path, c, cfg_weight=4.0, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(guided[3], plain[1])  # the conditional branch is what was sampled


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("guided", [False, True])
def test_range_draws_what_the_sliced_logits_draw_plus_lo(path, guided):
    c, u = _pair(120, 64, 11)
    lo, hi = 17, 49
    extra = {"uncond_logits": u, "cfg_weight": 2.5} if guided else {}
    sliced = {"uncond_logits": u[:, lo:hi].contiguous(), "cfg_weight": 2.5} if guided else {}
    kw = {"temperature": 0.9, "top_k": 10, "min_p": 0.01, "return_filtered_logprobs": True,
          "return_cond_logprobs": True}
    ranged = _run(path, c, token_range=(lo, hi), generator=torch.Generator().manual_seed(4), **extra, **kw)
    assert ((ranged[0] >= lo) & (ranged[0] < hi)).all()
    alone = _run(path, c[:, lo:hi].contiguous(), generator=torch.Generator().manual_seed(4), **sliced, **kw)
    assert torch.equal(ranged[0], alone[0] + lo)
    for a, b in zip(ranged[1:], alone[1:]):
        assert torch.equal(a, b)


def test_range_is_read_in_place_without_a_copy():
    """The C++ sampler reads the row-strided view logits[:, lo:hi] (and the uncond view) as it is:
    no copy, clone or contiguous call is dispatched."""
    c, u = _pair(8, 500, 12)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        sample(c, uncond_logits=u, cfg_weight=3.0, token_range=(100, 400), return_cond_logprobs=True)
    names = {e.name for e in prof.events()}
    assert "fastrl::sample" in names
    assert not names & {"aten::contiguous", "aten::clone", "aten::copy_", "aten::sub", "aten::mul"}, names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpp_and_torch_reference_draw_the_same_tokens(dtype):
    c, u = _pair(400, 131, 13, dtype)
    g = torch.Generator().manual_seed(14)
    settings = {"temperature": torch.rand(400, generator=g) + 0.2, "top_k": torch.randint(0, 50, (400,), generator=g),
                "top_p": torch.rand(400, generator=g) * 0.9 + 0.1, "min_p": torch.rand(400, generator=g) * 0.2}
    settings["temperature"][:20] = 0.0  # greedy rows
    kw = dict(uncond_logits=u, cfg_weight=5.0, token_range=(3, 120), return_filtered_logprobs=True,
              return_cond_logprobs=True, **settings)
    fast = _run("cpp", c, generator=torch.Generator().manual_seed(15), **kw)
    slow = _run("torch", c, generator=torch.Generator().manual_seed(15), **kw)
    same = fast[0] == slow[0]
    assert same.float().mean() >= 0.99  # fp32 vs fp64 may only move a draw within rounding of a CDF boundary
    assert same[:20].all()
    for a, b in zip(fast[1:], slow[1:]):
        torch.testing.assert_close(a[same], b[same], rtol=1e-5, atol=1e-5)


def test_mix_is_formed_in_fp32_in_hugging_faces_order():
    """The C++ mix is torch_impl.cfg_logits bit for bit: the greedy token of a row whose mixed maxima are
    one fp32 rounding apart is the same on both paths."""
    c = torch.tensor([[1.0, 1.0 + 2**-23, 0.3]])
    u = torch.tensor([[0.1, 0.1 + 2**-22, 0.2]])
    for w in (0.5, 3.0, 7.3):
        mixed = torch_impl.cfg_logits(c, u, w)
        torch.testing.assert_close(mixed, (u + (c - u) * torch.tensor(w, dtype=torch.float32)), rtol=0, atol=0)
        for path in PATHS:
            tokens, logp = _run(path, c, uncond_logits=u, cfg_weight=w, temperature=0.0)
            assert int(tokens) == int(mixed.argmax()), (path, w)
            ties = int((mixed == mixed.max()).sum())
            assert float(logp) == pytest.approx(-torch.log(torch.tensor(float(ties))).item())


@pytest.mark.parametrize("path", PATHS)
def test_banned_tokens_and_bad_uncond_rows(path):
    c, u = _pair(6, 20, 16)
    c[:, 0] = float("-inf")  # banned in the conditional branch
    u[:, 1] = float("-inf")  # banned in the unconditional branch
    for _ in range(3):
        tokens, logp = _run(path, c, uncond_logits=u, cfg_weight=3.0, temperature=2.0)
        assert (tokens > 1).all() and torch.isfinite(logp).all()
    bad = u.clone()
    bad[4, 7] = float("nan")
    expect_error(_run, ValueError, "NaN or \\+inf", path, c, uncond_logits=bad, cfg_weight=3.0)
    bad_c = c.clone()
    bad_c[2, 0] = float("nan")  # NaN where the other branch is -inf is still a bad row
    bad_u = u.clone()
    bad_u[2, 0] = float("-inf")
    expect_error(_run, ValueError, "NaN or \\+inf", path, bad_c, uncond_logits=bad_u, cfg_weight=3.0)
    empty = u.clone()
    empty[3] = float("-inf")
    expect_error(_run, ValueError, "no finite value", path, c, uncond_logits=empty, cfg_weight=0.5)
    errors = SampleErrors("cpu")
    tokens, logp, cond = _run(path, c, uncond_logits=bad, cfg_weight=3.0, errors=errors, token_range=(2, 20),
                              return_cond_logprobs=True)
    assert tokens[4] == -1 and torch.isnan(logp[4]) and torch.isnan(cond[4])
    if path == "cpp":  # the C++ sampler marks only the bad row; the torch path marks every row
        assert ((tokens[torch.arange(6) != 4] >= 2)).all()
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        errors.check()


def _bad_calls():
    c, u = _pair(3, 10, 17)
    return [
        (lambda: sample(c, uncond_logits=u, cfg_weight=-0.5), ValueError, "cfg_weight"),
        (lambda: sample(c, uncond_logits=u, cfg_weight=float("nan")), ValueError, "cfg_weight"),
        (lambda: sample(c, uncond_logits=u, cfg_weight=float("inf")), ValueError, "cfg_weight"),
        (lambda: sample(c, uncond_logits=u, cfg_weight="2"), TypeError, "cfg_weight"),
        (lambda: sample(c, uncond_logits=u, cfg_weight=True), TypeError, "cfg_weight"),
        (lambda: sample(c, cfg_weight=-1.0), ValueError, "cfg_weight"),
        (lambda: sample(c, cfg_weight=3.0), ValueError, "cfg_weight"),  # guidance with no branch to mix with
        (lambda: sample(c, uncond_logits=u.numpy()), TypeError, "uncond_logits"),
        (lambda: sample(c, uncond_logits=u[:, :9], cfg_weight=2.0), ValueError, "uncond_logits"),
        (lambda: sample(c, uncond_logits=u[:2], cfg_weight=2.0), ValueError, "uncond_logits"),
        (lambda: sample(c, uncond_logits=u.double(), cfg_weight=2.0), ValueError, "uncond_logits"),
        (lambda: sample(c, uncond_logits=u.bfloat16(), cfg_weight=2.0), ValueError, "uncond_logits"),
        (lambda: sample(c, uncond_logits=u.to("meta"), cfg_weight=2.0), ValueError, "uncond_logits"),
        (lambda: sample(c, uncond_logits=u[None], cfg_weight=1.0), ValueError, "uncond_logits"),
        (lambda: sample(c, token_range=(4, 4)), ValueError, "token_range"),
        (lambda: sample(c, token_range=(5, 3)), ValueError, "token_range"),
        (lambda: sample(c, token_range=(-1, 3)), ValueError, "token_range"),
        (lambda: sample(c, token_range=(0, 11)), ValueError, "token_range"),
        (lambda: sample(c, token_range=(0.0, 3)), ValueError, "token_range"),
        (lambda: sample(c, token_range=(True, 3)), ValueError, "token_range"),
        (lambda: sample(c, token_range=(1, 2, 3)), ValueError, "token_range"),
        (lambda: sample(c, token_range=5), ValueError, "token_range"),
        (lambda: sample(c, token_range="ab"), ValueError, "token_range"),
        (lambda: sample(c, return_cond_logprobs=1), TypeError, "return_cond_logprobs"),
        (lambda: sample(c, top_k=-1, token_range=(0, 5)), ValueError, "top_k"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_arguments_are_refused(index):
    expect_error(*_bad_calls()[index])


def test_op_refuses_bad_uncond_and_cond_outputs():
    c, u = _pair(3, 10, 18)
    seed = torch.tensor([1])
    op = torch.ops.fastrl.sample
    base = (c, seed, 1.0, 0, 1.0, 0.0, None, None, None, None, None)
    expect_error(op, ValueError, "cfg_weight", *base, u, -2.0)
    expect_error(op, ValueError, "uncond", *base, u[:, :5], 2.0)
    expect_error(op, ValueError, "uncond", *base, u.half(), 2.0)
    expect_error(op, ValueError, "cond_logprobs", *base, u, 2.0, torch.empty(2))
    expect_error(op, ValueError, "cond_logprobs", *base, u, 2.0, torch.empty(3, dtype=torch.float64))


def test_opcheck_with_guidance_and_the_cond_output():
    c, u = _pair(4, 50, 19)
    seed = torch.tensor([3])
    rows = (torch.full((4,), 0.7, dtype=torch.float64), torch.tensor([0, 5, 10, 1]),
            torch.full((4,), 0.9, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
    for args in ((c, seed, 1.0, 0, 1.0, 0.0, None, None, None, None, None, u, 3.0, torch.empty(4)),
                 (c[:, 5:45], seed, 1.0, 0, 1.0, 0.0, *rows, None, u[:, 5:45], 0.0, torch.empty(4))):
        torch.library.opcheck(torch.ops.fastrl.sample.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_guided_sample_under_torch_compile_fullgraph():
    c, u = _pair(8, 300, 20)

    def step(x, y):
        return sample(x * 1.0, uncond_logits=y, cfg_weight=3.0, token_range=(10, 290), temperature=0.7, top_p=0.9,
                      return_cond_logprobs=True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    tokens, logp, cond = compiled(c, u)
    assert ((tokens >= 10) & (tokens < 290)).all()
    ref = torch.log_softmax(c.double()[:, 10:290] / 0.7, -1).gather(1, (tokens - 10)[:, None]).squeeze(1)
    torch.testing.assert_close(cond.double(), ref, rtol=0, atol=1e-5)


def test_fastrl_sample_is_the_same_function():
    assert fastrl.sample is sample



@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_guided_range_draws_the_cpu_samplers_tokens(dtype):
    """The CUDA path (the kernel, or the torch reference without it) against the C++ sampler for the
    same seed: guided, over a range, with per-row settings and greedy rows; the range views are read
    without a copy."""
    rows, vocab, lo, hi, w = 256, 20000, 3, 16387, 5.0
    c, u = _pair(rows, vocab, 40, dtype)
    g = torch.Generator().manual_seed(41)
    settings = [torch.rand(rows, generator=g).double() + 0.2, torch.randint(0, 500, (rows,), generator=g),
                torch.rand(rows, generator=g).double() * 0.9 + 0.1, torch.rand(rows, generator=g).double() * 0.05]
    settings[0][:8] = 0.0
    names = ("temperature", "top_k", "top_p", "min_p")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        gpu = sample(c.cuda(), uncond_logits=u.cuda(), cfg_weight=w, token_range=(lo, hi),
                     generator=torch.Generator("cuda").manual_seed(5), return_filtered_logprobs=True,
                     return_cond_logprobs=True, **{n: v.cuda() for n, v in zip(names, settings)})
    gpu = [t.cpu() for t in gpu]
    if fastrl._extension.cuda_enabled():
        assert not {e.name for e in prof.events()} & {"aten::contiguous", "aten::clone", "aten::copy_"}
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator("cuda").manual_seed(5), device="cuda"))
    cond = torch.empty(rows)
    cpu = torch.ops.fastrl.sample(c[:, lo:hi], torch.tensor([seed]), 1.0, 0, 1.0, 0.0, *settings, None,
                                  u[:, lo:hi], w, cond)
    cpu = (cpu[0] + lo, cpu[1], cpu[2], cond)
    same = gpu[0] == cpu[0]
    assert same.float().mean() >= 0.99 and same[:8].all()
    for a, b in zip(gpu[1:], cpu[1:]):
        torch.testing.assert_close(a[same], b[same], rtol=1e-5, atol=2e-5)
