"""fastrl.ops.sequence_logps: the reference against hand-written fp64 maths, the Triton kernels (in the
interpreter, with blocks shorter than the sequences) against the reference, forward and backward, the
packed and padded forms against each other, compile / opcheck / ahead-of-time GPU builds, and every
argument check."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from fastrl.ops import backend, torch_impl, resolve
from fastrl.ops.packing import pack_sequences, unpack
from fastrl.ops.sequence_logps import sequence_logps
from conftest import refusal_test

OP = importlib.import_module("fastrl.ops.sequence_logps")  # the module, whatever fastrl.ops exports

# empty, longer than a 16-token block (the loop and the cumsum carry), exactly one block, odd, single
LENGTHS = [0, 37, 5, 16, 1, 0, 50, 17]


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(OP, "_MAX_BLOCK", 16)


def _cu(lengths, dtype=torch.int32) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=dtype)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu


def _logps(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (-5 * torch.rand(shape, generator=g, dtype=torch.float64)).to(dtype)


def _scattered_mask(lengths, width, seed=0) -> torch.Tensor:
    """[B, width] bool with lengths[b] set positions at random places in row b (not left-aligned)."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.rand(len(lengths), width, generator=g).argsort(1).argsort(1)
    return rank < torch.tensor(lengths)[:, None]


def _pair_lengths(lengths, seed=0, dtype=torch.int64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, n + 3, (), generator=g) for n in lengths]).to(dtype)


def _by_hand(seqs, *, alpha=None, pair_lengths=None, mean=False):
    """fp64, one Python float at a time: sum_t w_t x_t (/ len) with w_t = 1 or alpha past pair_lengths."""
    out, grads = [], []
    for i, s in enumerate(seqs):
        ws = [1.0 if alpha is None or t < pair_lengths[i] else alpha for t in range(len(s))]
        if mean and s:
            ws = [w / len(s) for w in ws]
        out.append(math.fsum(w * v for w, v in zip(ws, s) if w != 0))
        grads.append(ws)
    return out, grads


# ---------------------------------------------------------------------------------------------------
# The reference against hand-written maths


def test_reference_packed_by_hand_explicit_numbers():
    x = torch.tensor([-1.0, -2.0, -0.5, -0.25, -4.0, -3.0])
    cu = torch.tensor([0, 2, 2, 6])
    assert torch_impl.sequence_logps(x, cu).tolist() == [-3.0, 0.0, -7.75]
    assert torch_impl.sequence_logps(x, cu, reduction="mean").tolist() == [-1.5, 0.0, -7.75 / 4]
    pl = torch.tensor([1, 0, 2])
    # seq 0: -1 + 0.25 * -2; seq 2: -0.5 - 0.25 + 0.25 * (-4 - 3)
    assert torch_impl.sequence_logps(x, cu, ld_alpha=0.25, pair_lengths=pl).tolist() == [-1.5, 0.0, -2.5]
    assert torch_impl.sequence_logps(x, cu, ld_alpha=0.25, pair_lengths=pl, reduction="mean").tolist() == \
        [-0.75, 0.0, -0.625]
    grad = torch_impl.sequence_logps_backward(torch.tensor([1.0, 5.0, -2.0]), (6,), torch.float32, cu,
                                             ld_alpha=0.25, pair_lengths=pl, reduction="mean")
    assert grad.tolist() == [0.5, 0.125, -0.5, -0.5, -0.125, -0.125]


def test_reference_padded_counts_positions_among_masked_tokens_only():
    x = torch.tensor([[-1.0, 7.0, -2.0, -4.0], [9.0, 9.0, 9.0, 9.0], [-0.5, -1.5, 3.0, -2.5]])
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    pl = torch.tensor([2, 4, 1])
    # row 0 tokens -1, -2, -4 at positions 0, 1, 2: the third is past pair_lengths = 2
    out = torch_impl.sequence_logps(x, mask=mask, ld_alpha=0.5, pair_lengths=pl)
    assert out.tolist() == [-1.0 - 2.0 - 2.0, 0.0, -0.5 + 0.5 * (-1.5 - 2.5)]
    mean = torch_impl.sequence_logps(x, mask=mask, ld_alpha=0.5, pair_lengths=pl, reduction="mean")
    torch.testing.assert_close(mean, torch.tensor([-5.0 / 3, 0.0, -2.5 / 3]), rtol=0, atol=1e-7)
    grad = torch_impl.sequence_logps_backward(torch.tensor([3.0, 1.0, 2.0]), (3, 4), torch.float64, mask=mask,
                                             ld_alpha=0.5, pair_lengths=pl)
    assert grad.tolist() == [[3.0, 0.0, 3.0, 1.5], [0.0] * 4, [2.0, 1.0, 0.0, 1.0]]


@pytest.mark.parametrize("alpha,mean", [(None, False), (None, True), (0.3, False), (0.7, True), (0.0, True)])
def test_reference_matches_fp64_maths_on_random_sequences(alpha, mean):
    x, cu = _logps(sum(LENGTHS), torch.float64), _cu(LENGTHS, torch.int64)
    pl = _pair_lengths(LENGTHS)
    seqs = [x[a:b].tolist() for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    want, weights = _by_hand(seqs, alpha=alpha, pair_lengths=pl.tolist(), mean=mean)
    kw = dict(ld_alpha=alpha, pair_lengths=pl if alpha is not None else None, reduction="mean" if mean else "sum")
    torch.testing.assert_close(torch_impl.sequence_logps(x, cu, **kw).double(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)  # fp32 result of an fp64 sum
    g = torch.arange(1.0, len(LENGTHS) + 1, dtype=torch.float64)
    grad = torch_impl.sequence_logps_backward(g, x.shape, torch.float64, cu, **kw)
    assert grad.tolist() == pytest.approx([gi * w for gi, ws in zip(g.tolist(), weights) for w in ws], rel=1e-15)


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_weight_zero_tokens_are_left_out_even_at_minus_infinity(name):
    x = torch.tensor([-1.0, -float("inf"), -2.0, -float("inf")], requires_grad=True)
    cu = torch.tensor([0, 2, 4])
    pl = torch.tensor([1, 1])
    with backend(name):
        out = sequence_logps(x, cu, ld_alpha=0.0, pair_lengths=pl)
        out.sum().backward()
        assert sequence_logps(x, cu).tolist() == [-float("inf")] * 2  # weight 1: the -inf counts
    assert out.tolist() == [-1.0, -2.0]
    assert x.grad.tolist() == [1.0, 0.0, 1.0, 0.0]


# ---------------------------------------------------------------------------------------------------
# The Triton kernels (interpreter) against the reference


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _run(name, fn, inputs, grad):
    """fn(*inputs) under backend ``name``, and the gradient of <fn, grad> with respect to inputs[0]."""
    x = inputs[0].detach().clone().requires_grad_()
    with backend(name):
        y = fn(x, *inputs[1:])
        (dx,) = torch.autograd.grad(y, x, grad)
    return y, dx


def _compare(fn, inputs, dtype):
    grad = torch.linspace(-2, 3, _n_out(fn, inputs))
    y, dx = _run("triton", fn, inputs, grad)
    y_ref, dx_ref = _run("torch", fn, inputs, grad)
    assert y.dtype == torch.float32 and dx.dtype == dtype and dx.shape == inputs[0].shape
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)
    else:
        assert _rel(dx, dx_ref) <= 1e-2
    return y, dx


def _n_out(fn, inputs):
    with backend("torch"):
        return fn(*inputs).shape[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [None, 0.3])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_triton_packed_matches_the_reference(small_blocks, reduction, alpha, dtype):
    x, cu = _logps(sum(LENGTHS), dtype), _cu(LENGTHS, torch.int32 if alpha is None else torch.int64)
    pl = _pair_lengths(LENGTHS, dtype=torch.int32)
    kw = dict(ld_alpha=alpha, pair_lengths=pl if alpha is not None else None, reduction=reduction)
    y, dx = _compare(lambda x, cu: sequence_logps(x, cu, **kw), (x, cu), dtype)
    assert y[0] == 0 and y[5] == 0  # empty sequences


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
@pytest.mark.parametrize("alpha", [None, 0.3])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_triton_padded_matches_the_reference(small_blocks, reduction, alpha, mask_dtype):
    width = 53  # > 3 blocks of 16, not a multiple of 16
    mask = _scattered_mask(LENGTHS, width)
    x = _logps((len(LENGTHS), width), torch.bfloat16 if mask_dtype == torch.int64 else torch.float32)
    pl = _pair_lengths(LENGTHS)
    kw = dict(ld_alpha=alpha, pair_lengths=pl if alpha is not None else None, reduction=reduction)
    m = mask.to(mask_dtype)
    y, dx = _compare(lambda x, m: sequence_logps(x, mask=m, **kw), (x, m), x.dtype)
    assert (dx[~mask] == 0).all() and (dx[mask] != 0).all()


def test_triton_strided_inputs_and_ld_alpha_zero(small_blocks):
    base = _logps((2 * sum(LENGTHS),))
    x, cu = base[::2], _cu(LENGTHS)  # stride 2
    pl = _pair_lengths(LENGTHS)
    _compare(lambda x, cu: sequence_logps(x, cu, ld_alpha=0.0, pair_lengths=pl), (x, cu), torch.float32)
    width = 40
    xt = _logps((width, len(LENGTHS))).t()  # [B, L] with strides (1, B)
    mask = _scattered_mask(LENGTHS, width, seed=1).t().contiguous().t()  # a transposed mask too
    _compare(lambda x, m: sequence_logps(x, mask=m, ld_alpha=1.0, pair_lengths=pl, reduction="mean"), (xt, mask),
             torch.float32)


def test_padding_is_ignored_even_when_it_holds_nan(small_blocks):
    mask = _scattered_mask(LENGTHS, 30)
    x = _logps((len(LENGTHS), 30)).masked_fill(~mask, float("nan"))
    for name in ("torch", "triton"):
        y, dx = _run(name, lambda x: sequence_logps(x, mask=mask, reduction="mean"), (x,), torch.ones(len(LENGTHS)))
        assert torch.isfinite(y).all() and (dx[~mask] == 0).all(), name


def test_one_launch_forward_and_one_backward(small_blocks, launches):
    calls = launches
    x, cu = _logps(sum(LENGTHS)).requires_grad_(), _cu(LENGTHS)
    with backend("triton"):
        sequence_logps(x, cu, reduction="mean").sum().backward()
    assert [grid for _, grid in calls] == [(len(LENGTHS),), (len(LENGTHS),)]
    assert calls[0][0] != calls[1][0]
    calls.clear()
    sequence_logps(x, cu)  # auto on a CPU tensor: the torch reference
    assert resolve(x.device) == "torch" and calls == []


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_packed_and_padded_forms_agree(small_blocks, name):
    mask = _scattered_mask(LENGTHS, 57, seed=3)
    padded = _logps((len(LENGTHS), 57), seed=4).requires_grad_()
    pl = _pair_lengths(LENGTHS, seed=5)
    kw = dict(ld_alpha=0.4, pair_lengths=pl, reduction="mean")
    grad = torch.linspace(-1, 1, len(LENGTHS))
    with backend(name):
        y_padded = sequence_logps(padded, mask=mask, **kw)
        (d_padded,) = torch.autograd.grad(y_padded, padded, grad)
        flat, cu = pack_sequences(padded, mask)  # differentiable: the gradient flows back to padded
        y_packed = sequence_logps(flat, cu, **kw)
        (d_packed,) = torch.autograd.grad(y_packed, padded, grad)
    torch.testing.assert_close(y_packed, y_padded, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d_packed, d_padded, rtol=1e-6, atol=1e-7)


def test_empty_inputs():
    for name in ("torch", "triton"):
        with backend(name):
            assert sequence_logps(torch.zeros(0), torch.tensor([0])).shape == (0,)
            assert sequence_logps(torch.zeros(0), torch.tensor([0, 0, 0])).tolist() == [0.0, 0.0]
            assert sequence_logps(torch.zeros(3, 0), mask=torch.zeros(3, 0, dtype=torch.bool)).tolist() == [0.0] * 3
            x = torch.zeros(0, 5, requires_grad=True)
            sequence_logps(x, mask=torch.zeros(0, 5), reduction="mean").sum().backward()
            assert x.grad.shape == (0, 5)


# ---------------------------------------------------------------------------------------------------
# torch.compile, opcheck, ahead-of-time GPU builds


def test_torch_compile_fullgraph_follows_the_backend(small_blocks):
    x, cu, pl = _logps(sum(LENGTHS)), _cu(LENGTHS), _pair_lengths(LENGTHS)
    mask = _scattered_mask(LENGTHS, 50)
    padded = _logps((len(LENGTHS), 50), seed=2)

    def step(x, cu, padded, mask, pl):
        a = sequence_logps(x, cu, ld_alpha=0.5, pair_lengths=pl, reduction="mean")
        b = sequence_logps(padded, mask=mask)
        return (a * b).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = {}
    for name, fn in (("eager", step), ("torch", compiled), ("triton", compiled)):
        xs = (x.clone().requires_grad_(), padded.clone().requires_grad_())
        with backend("torch" if name == "eager" else name):
            loss = fn(xs[0], cu, xs[1], mask, pl)
            loss.backward()
        results[name] = (loss.detach(), xs[0].grad, xs[1].grad)
    for name in ("torch", "triton"):
        for got, want in zip(results[name], results["eager"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["packed", "padded"])
@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck(form, weighted):
    pl = _pair_lengths(LENGTHS) if weighted else None
    if form == "packed":
        args = (_logps(sum(LENGTHS)).requires_grad_(), _cu(LENGTHS), None, pl, 0.25, weighted)
    else:
        args = (_logps((len(LENGTHS), 20)).requires_grad_(), None, _scattered_mask(LENGTHS, 20).int(), pl, 0.25,
                not weighted)
    torch.library.opcheck(torch.ops.fastrl.sequence_logps.default, args)
    bwd = (torch.randn(len(LENGTHS)), *args[1:], list(args[0].shape), torch.bfloat16)
    torch.library.opcheck(torch.ops.fastrl.sequence_logps_backward.default, bwd,
                          test_utils=("test_schema", "test_faketensor"))


def test_opcheck_on_the_triton_path(small_blocks):
    args = (_logps(sum(LENGTHS)).requires_grad_(), _cu(LENGTHS), None, _pair_lengths(LENGTHS), 0.25, True)
    with backend("triton"):
        torch.library.opcheck(torch.ops.fastrl.sequence_logps.default, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("weighted_mean", [True, False])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_kernels_compile_for_the_gpu_ahead_of_time_without_spills(direction, packed, weighted_mean, capability):
    from conftest import compile_for_gpu

    from fastrl.kernels import sequence_logps as kernels

    kernel = getattr(kernels, f"sequence_logps_{direction}_kernel")
    src, dst = ("*bf16", "*fp32") if direction == "fwd" else ("*fp32", "*bf16")
    # As Triton specialises a launch on contiguous tensors: unit strides are constants, pointers
    # (and a padded row stride, L a multiple of 16) are 16-aligned.
    types = [src, "*i32" if packed else src, src if packed else "*i1", "*i64", dst,
             "i32", "i32", "i32", "constexpr", "i32", "constexpr", "fp32"]
    signature = dict(zip(kernel.arg_names, types + ["constexpr"] * 4))
    names = list(signature)
    constexprs = {names[8]: 1, names[10]: 1, "PACKED": packed, "WEIGHTED": weighted_mean, "MEAN": weighted_mean,
                  "BLOCK": 1024}
    aligned = tuple(names[:5]) + (() if packed else (names[7], names[9]))
    res = compile_for_gpu(kernel, signature, constexprs, capability=capability, num_warps=4, aligned=aligned)
    assert f".target sm_{capability}" in res["ptx"]
    assert res["STACK"] == 0 and res["LOCAL"] == 0 and 0 < res["REG"] < 255, res


# ---------------------------------------------------------------------------------------------------
# Argument checks


def _bad_calls():
    x, cu = torch.zeros(6), torch.tensor([0, 2, 6])
    xp, m = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    pl = torch.tensor([1, 2])
    meta = torch.device("meta")
    return [
        (lambda: sequence_logps(x), ValueError, "exactly one of cu_seqlens"),
        (lambda: sequence_logps(xp, cu, mask=m), ValueError, "exactly one of cu_seqlens"),
        (lambda: sequence_logps([0.0, 1.0], cu), TypeError, "token_logps must be a torch.Tensor"),
        (lambda: sequence_logps(x.long(), cu), ValueError, "token_logps must have dtype"),
        (lambda: sequence_logps(x.double(), cu), ValueError, "token_logps must have dtype"),
        (lambda: sequence_logps(xp, cu), ValueError, "token_logps must be 1-D"),
        (lambda: sequence_logps(x, mask=m), ValueError, "token_logps must be 2-D"),
        (lambda: sequence_logps(x, cu[None]), ValueError, "cu_seqlens must be 1-D"),
        (lambda: sequence_logps(x, cu.float()), ValueError, "cu_seqlens must have dtype"),
        (lambda: sequence_logps(x, torch.zeros(0, dtype=torch.int64)), ValueError, "cu_seqlens must hold"),
        (lambda: sequence_logps(x, torch.tensor([1, 2, 6])), ValueError, "cu_seqlens must start at 0"),
        (lambda: sequence_logps(x, torch.tensor([0, 4, 3, 6])), ValueError, "cu_seqlens must be non-decreasing"),
        (lambda: sequence_logps(x, torch.tensor([0, 2, 5])), ValueError, "cu_seqlens must end at the number"),
        (lambda: sequence_logps(x, cu.to(meta)), ValueError, "cu_seqlens must be on cpu"),
        (lambda: sequence_logps(xp, mask=m[:, :2]), ValueError, r"mask must have shape \(2, 3\)"),
        (lambda: sequence_logps(xp, mask=m[0]), ValueError, "mask must be 2-D"),
        (lambda: sequence_logps(xp, mask=m.int() * 2), ValueError, "mask must hold only 0 and 1"),
        (lambda: sequence_logps(xp, mask=m.float() * 0.5), ValueError, "mask must hold only 0 and 1"),
        (lambda: sequence_logps(xp, mask=m.to(torch.complex64)), ValueError, "mask must have dtype"),
        (lambda: sequence_logps(xp, mask=m.to(meta)), ValueError, "mask must be on cpu"),
        (lambda: sequence_logps(x, cu, reduction="max"), ValueError, "reduction must be one of sum, mean"),
        (lambda: sequence_logps(x, cu, reduction=None), TypeError, "reduction must be a str"),
        (lambda: sequence_logps(x, cu, ld_alpha=-0.1, pair_lengths=pl), ValueError, "ld_alpha must be finite and in"),
        (lambda: sequence_logps(x, cu, ld_alpha=1.5, pair_lengths=pl), ValueError, "ld_alpha must be finite and in"),
        (lambda: sequence_logps(x, cu, ld_alpha=math.nan, pair_lengths=pl), ValueError, "ld_alpha must be finite"),
        (lambda: sequence_logps(x, cu, ld_alpha="0.5", pair_lengths=pl), TypeError, "ld_alpha must be a number"),
        (lambda: sequence_logps(x, cu, ld_alpha=True, pair_lengths=pl), TypeError, "ld_alpha must be a number"),
        (lambda: sequence_logps(x, cu, ld_alpha=0.5), ValueError, "ld_alpha needs pair_lengths"),
        (lambda: sequence_logps(x, cu, pair_lengths=pl), ValueError, "pair_lengths is only used with ld_alpha"),
        (lambda: sequence_logps(x, cu, ld_alpha=0.5, pair_lengths=pl[:1]), ValueError,
         r"pair_lengths must hold one length per sequence \(2\)"),
        (lambda: sequence_logps(xp, mask=m, ld_alpha=0.5, pair_lengths=pl[None]), ValueError,
         "pair_lengths must be 1-D"),
        (lambda: sequence_logps(x, cu, ld_alpha=0.5, pair_lengths=pl.float()), ValueError,
         "pair_lengths must have dtype"),
        (lambda: sequence_logps(x, cu, ld_alpha=0.5, pair_lengths=pl.to(meta)), ValueError,
         "pair_lengths must be on cpu"),
        (lambda: sequence_logps(x, cu, ld_alpha=0.5, pair_lengths=torch.tensor([1, -1])), ValueError,
         "pair_lengths must be >= 0"),
    ]


test_bad_arguments_are_refused = refusal_test(_bad_calls)


# ---------------------------------------------------------------------------------------------------
# GPU, real shapes


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["packed", "padded"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_real_shapes_on_the_gpu_match_the_reference(form, reduction):
    device, total, n = torch.device("cuda"), 32768, 64
    g = torch.Generator().manual_seed(0)
    cuts = torch.randint(0, total + 1, (n - 1,), generator=g).sort().values
    cu = torch.cat([torch.tensor([0]), cuts, torch.tensor([total])]).to(device=device, dtype=torch.int32)
    lengths = cu[1:] - cu[:-1]
    x = (-8 * torch.rand(total, generator=g)).to(device=device, dtype=torch.bfloat16)
    pl = torch.minimum(lengths, lengths.roll(1))  # min(|chosen|, |rejected|) of neighbouring "pairs"
    kw = dict(ld_alpha=0.3, pair_lengths=pl, reduction=reduction)
    if form == "packed":
        inputs, call = (x, cu), lambda x: sequence_logps(x, cu, **kw)
        ref_args = dict(cu_seqlens=cu)
    else:
        padded, mask = unpack(x, cu)
        inputs, call = (padded, mask), lambda x: sequence_logps(x, mask=mask, **kw)
        ref_args = dict(mask=mask)
    assert resolve(device) == "triton"
    src = inputs[0].clone().requires_grad_()
    y = call(src)
    grad = torch.randn(n, device=device)
    (dx,) = torch.autograd.grad(y, src, grad)
    y_ref = torch_impl.sequence_logps(src.detach(), **ref_args, **kw)
    dx_ref = torch_impl.sequence_logps_backward(grad, src.shape, src.dtype, **ref_args, **kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-3)
    assert _rel(dx, dx_ref) <= 1e-2
    if form == "padded":
        assert (dx[~mask] == 0).all()
