"""fastrl.ops.selective_logprobs: reference vs fp64 maths, Triton kernels (interpreter) vs reference."""

from __future__ import annotations

import math

import pytest
import torch

from fastrl.ops import backend, torch_impl, selective_logprobs
from conftest import expect_error


def _fp64(logits, labels, temperature=1.0, ignore_index=-100):
    """Plain fp64 log-prob and entropy, differentiable."""
    s = logits.double() / temperature
    log_p = torch.log_softmax(s, -1)
    keep = labels != ignore_index
    lp = log_p.gather(-1, torch.where(keep, labels, 0).long()[..., None]).squeeze(-1)
    ent = -(log_p.exp() * log_p).sum(-1)
    return torch.where(keep, lp, 0.0), torch.where(keep, ent, 0.0)


def _case(shape, vocab, seed=0, scale=3.0, dtype=torch.float32, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=g) * scale).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels.view(-1)[::ignore_every] = -100
    return logits, labels


def test_reference_against_fp64_maths():
    logits, labels = _case((40,), 257)
    for t in (1.0, 0.6, 2.5):
        lp, ent, stats = torch_impl.selective_logprobs(logits, labels, temperature=t)
        rlp, rent = _fp64(logits, labels, t)
        torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.sum(-1).double(), torch.logsumexp(logits.double() / t, -1),
                                   rtol=1e-6, atol=1e-5)


def test_reference_backward_against_autograd():
    logits, labels = _case((30,), 101)
    gl, ge = torch.randn(30, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
    x = logits.double().requires_grad_(True)
    rlp, rent = _fp64(x, labels, 0.8)
    (rlp * gl + rent * ge).sum().backward()
    _, ent, stats = torch_impl.selective_logprobs(logits, labels, temperature=0.8)
    g = torch_impl.selective_logprobs_backward(gl.float(), ge.float(), logits, labels, ent, stats, temperature=0.8)
    torch.testing.assert_close(g.double(), x.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("vocab,dtype", [(257, torch.float32), (1031, torch.bfloat16), (13, torch.float16)])
def test_forward_and_gradients_match_fp64(path, vocab, dtype):
    logits, labels = _case((3, 7), vocab, seed=vocab, dtype=dtype)
    t = 0.7
    gl, ge = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    x = logits.clone().requires_grad_(True)
    with backend(path):
        lp, ent = selective_logprobs(x, labels, temperature=t, return_entropy=True)
        (lp * gl + ent * ge).sum().backward()
    xd = logits.double().requires_grad_(True)
    rlp, rent = _fp64(xd, labels, t)
    (rlp * gl + rent * ge).sum().backward()
    assert lp.dtype == torch.float32 and lp.shape == labels.shape and x.grad.dtype == dtype
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=2e-5)
    ref = xd.grad
    rel = (x.grad.double() - ref).norm() / ref.norm()
    assert rel < (1e-2 if dtype != torch.float32 else 1e-5), float(rel)
    ignored = labels == -100
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all() and (x.grad[ignored] == 0).all()


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_logp_alone_and_entropy_alone(path):
    logits, labels = _case((9,), 300, seed=1)
    with backend(path):
        x = logits.clone().requires_grad_(True)
        selective_logprobs(x, labels).sum().backward()
        y = logits.clone().requires_grad_(True)
        selective_logprobs(y, labels, return_entropy=True)[1].sum().backward()
    xd = logits.double().requires_grad_(True)
    _fp64(xd, labels)[0].sum().backward()
    yd = logits.double().requires_grad_(True)
    _fp64(yd, labels)[1].sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(y.grad.double(), yd.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_inplace_backward_writes_the_gradient_over_the_logits(path):
    logits, labels = _case((12,), 200, seed=2)
    with backend(path):
        a = logits.clone().requires_grad_(True)
        selective_logprobs(a, labels, temperature=1.3).sum().backward()
        leaf = logits.clone().requires_grad_(True)
        b = leaf * 1.0  # a non-leaf whose buffer may be overwritten
        selective_logprobs(b, labels, temperature=1.3, inplace_backward=True).sum().backward()
    torch.testing.assert_close(leaf.grad, a.grad)
    torch.testing.assert_close(b.detach(), a.grad)  # the logits buffer now holds the gradient


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_huge_logits_and_tiny_temperature_stay_finite(path):
    logits = torch.tensor([[1e4, -1e4, 9999.0, 0.0], [-1e4, -1e4, -1e4, -1e4]]).repeat(3, 1)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    x = logits.clone().requires_grad_(True)
    with backend(path):
        lp, ent = selective_logprobs(x, labels, temperature=1e-3, return_entropy=True)
        (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(x.grad).all()
    rlp, rent = _fp64(logits, labels, 1e-3)
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=1e-5)
    xd = logits.double().requires_grad_(True)
    sum(_fp64(xd, labels, 1e-3)).sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-4, atol=1e-2)  # d/dx scales as 1/T = 1e3


def test_masked_vocabulary_entries():
    logits, labels = _case((6,), 64, seed=3)
    logits[:, 10:40] = float("-inf")
    labels[:] = 5
    for path in ("torch", "triton"):
        x = logits.clone().requires_grad_(True)
        with backend(path):
            lp, ent = selective_logprobs(x, labels, return_entropy=True)
            (lp + ent).sum().backward()
        rlp, _ = _fp64(logits, labels)
        rent = -(torch.softmax(logits.double(), -1) * torch.log_softmax(logits.double(), -1).nan_to_num(0.0,
                 0.0, 0.0)).sum(-1)
        torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(x.grad).all() and (x.grad[:, 10:40] == 0).all()


def test_torch_compile_fullgraph_forward_and_backward():
    logits, labels = _case((4, 5), 97, seed=4)

    def loss(x):
        lp, ent = selective_logprobs(x, labels, temperature=0.9, return_entropy=True)
        return (lp + 0.1 * ent).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    with backend("triton"):
        compiled(a).backward()
    loss(b).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_opcheck():
    from fastrl.ops.selective_logprobs import _forward

    logits, labels = _case((6,), 50, seed=5)
    torch.library.opcheck(_forward, (logits.requires_grad_(True), labels, 0.8, -100, True, False))


BAD = [
    (lambda x, y: selective_logprobs(x.long(), y), ValueError, "logits"),
    (lambda x, y: selective_logprobs(x, y.float()), ValueError, "labels"),
    (lambda x, y: selective_logprobs(x, y[:, :2]), ValueError, "labels"),
    (lambda x, y: selective_logprobs(x, torch.full_like(y, 50)), ValueError, "labels"),
    (lambda x, y: selective_logprobs(x, torch.full_like(y, -1)), ValueError, "labels"),
    (lambda x, y: selective_logprobs(x, y, temperature=0.0), ValueError, "temperature"),
    (lambda x, y: selective_logprobs(x, y, temperature=-1.0), ValueError, "temperature"),
    (lambda x, y: selective_logprobs(x, y, return_entropy=1), TypeError, "return_entropy"),
    (lambda x, y: selective_logprobs(x[..., :0], y), ValueError, "logits"),
    (lambda x, y: selective_logprobs(x.tolist(), y), TypeError, "logits"),
]


@pytest.mark.parametrize("call,exc,name", BAD)
def test_bad_input_names_the_argument(call, exc, name):
    expect_error(call, exc, name, *_case((2, 3), 50))


def test_custom_ignore_index_and_int32_labels():
    logits, labels = _case((10,), 40, seed=6)
    labels[labels == -100] = 39
    labels[::3] = 7_000
    for path in ("torch", "triton"):
        with backend(path):
            lp = selective_logprobs(logits, labels.int(), ignore_index=7_000)
        rlp, _ = _fp64(logits, labels, ignore_index=7_000)
        torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel_name", ["selective_logprobs_fwd_kernel", "selective_logprobs_bwd_kernel"])
@pytest.mark.parametrize("capability", [80, 90])
def test_kernels_compile_for_the_gpu_at_their_launch_config_without_spills(kernel_name, capability):
    from conftest import compile_for_gpu

    import fastrl.kernels.selective_logprobs as k
    from fastrl.ops.selective_logprobs import _BLOCK, _NUM_WARPS

    if kernel_name.endswith("fwd_kernel"):
        sig = {"logits_ptr": "*bf16", "labels_ptr": "*i64", "logp_ptr": "*fp32", "entropy_ptr": "*fp32",
               "stats_ptr": "*fp32", "n_cols": "i32", "stride_row": "i64", "inv_temperature": "fp32",
               "ignore_index": "i64", "RETURN_ENTROPY": "constexpr", "BLOCK": "constexpr"}
        const = {"RETURN_ENTROPY": True, "BLOCK": _BLOCK}
    else:
        sig = {"grad_logits_ptr": "*bf16", "grad_logp_ptr": "*fp32", "grad_entropy_ptr": "*fp32",
               "logits_ptr": "*bf16", "labels_ptr": "*i64", "entropy_ptr": "*fp32", "stats_ptr": "*fp32",
               "n_cols": "i32", "stride_row": "i64", "grad_stride_row": "i64", "inv_temperature": "fp32",
               "ignore_index": "i64", "HAS_GRAD_ENTROPY": "constexpr", "BLOCK": "constexpr"}
        const = {"HAS_GRAD_ENTROPY": True, "BLOCK": _BLOCK}
    aligned = tuple(a for a in sig if a.endswith("_ptr") or "stride" in a or a == "n_cols")
    res = compile_for_gpu(getattr(k, kernel_name), sig, const, capability=capability, num_warps=_NUM_WARPS,
                          aligned=aligned)
    assert res["STACK"] == 0 and res["LOCAL"] == 0 and res["REG"] < 255, res
    assert "ld.global.v4" in res["ptx"] or "ld.global.nc.v4" in res["ptx"]  # vectorised loads


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [32000, 50257, 128256, 151936])
def test_real_shapes_on_gpu(vocab):
    g = torch.Generator(device="cuda").manual_seed(vocab)
    tokens = 8192
    logits = (torch.randn(tokens, vocab, device="cuda", generator=g) * 2).bfloat16().requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
    labels[::7] = -100
    lp, ent = selective_logprobs(logits, labels, temperature=0.9, return_entropy=True)
    gl, ge = torch.randn_like(lp), torch.randn_like(ent)
    (lp * gl + ent * ge).sum().backward()
    rlp, rent, stats = torch_impl.selective_logprobs(logits.detach(), labels, temperature=0.9)
    torch.testing.assert_close(lp, rlp, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ent, rent, rtol=1e-4, atol=1e-3)
    ref_grad = torch_impl.selective_logprobs_backward(gl, ge, logits.detach(), labels, rent, stats, temperature=0.9)
    rel = (logits.grad.float() - ref_grad.float()).norm() / ref_grad.float().norm()
    assert rel < 1e-2


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_padding_rows_of_minus_inf_or_finfo_min(path):
    vocab = 40
    logits = torch.randn(4, vocab)
    logits[1] = float("-inf")  # a padding row, ignored
    logits[2] = torch.finfo(torch.float32).min  # masked_fill(mask, finfo.min): a uniform row
    labels = torch.tensor([3, -100, 7, -100])
    logits[3, 5] = float("inf")  # garbage in an ignored row must not leak into the gradient
    x = logits.clone().requires_grad_(True)
    with backend(path):
        lp, ent = selective_logprobs(x, labels, return_entropy=True)
        (lp.sum() + ent.sum()).backward()
    assert lp[1] == 0 and lp[3] == 0 and ent[1] == 0 and ent[3] == 0
    assert lp[2].item() == pytest.approx(-math.log(vocab), abs=1e-5)
    assert ent[2].item() == pytest.approx(math.log(vocab), abs=1e-5)
    assert torch.isfinite(x.grad).all() and (x.grad[1] == 0).all() and (x.grad[3] == 0).all()


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_inplace_backward_with_overlapping_rows(path):
    base = torch.randn(1, 60, requires_grad=True)
    labels = torch.tensor([1, 2, 3, 4, 5, 6])
    with backend(path):
        selective_logprobs((base * 1.0).expand(6, 60), labels, inplace_backward=True).sum().backward()
    expected = torch.softmax(base.detach(), -1).mul(-6)
    expected[0, 1:7] += 1
    torch.testing.assert_close(base.grad, expected, rtol=1e-5, atol=1e-6)


def _rows_read(loads, tensor, rows):
    """How many loaded addresses fall in each of ``rows`` of the 2-D contiguous ``tensor``."""
    import numpy as np

    addresses = np.concatenate(loads) if loads else np.zeros(0, np.uint64)
    row_bytes = tensor.shape[-1] * tensor.element_size()
    starts = [tensor.data_ptr() + r * row_bytes for r in rows]
    return [int(((addresses >= s) & (addresses < s + row_bytes)).sum()) for s in starts]


@pytest.mark.parametrize("inplace", [False, True])
def test_ignored_rows_are_never_read(interpreter_loads, inplace):
    """Rows labelled ignore_index cost no read of their logits, forward or backward: every load the
    interpreted kernels make is recorded, and none falls in an ignored row (NaN / inf there), while
    every kept row is read in both passes. The outputs of ignored rows are exactly 0, the gradient
    row too (written, not left as it was: in place, the row held NaN logits)."""
    vocab, rows = 300, 6  # several BLOCK-wide steps per row
    logits, labels = _case((rows,), vocab, seed=11, ignore_every=1000)
    ignored, kept = [1, 4], [0, 2, 3, 5]
    labels[0] = 17  # _case ignored row 0
    labels[ignored] = -100
    logits[1] = float("nan")
    logits[4] = float("inf")
    logits[4, ::2] = float("-inf")
    x = logits.clone().requires_grad_(True)
    gl, ge = torch.randn(rows, dtype=torch.float64), torch.randn(rows, dtype=torch.float64)
    with backend("triton"):
        lp, ent = selective_logprobs(x, labels, temperature=0.8, return_entropy=True, inplace_backward=inplace)
        forward_reads = _rows_read(interpreter_loads, x.detach(), range(rows))
        interpreter_loads.clear()
        if inplace:
            x_data = x.detach()
            (lp * gl.float() + ent * ge.float()).sum().backward()
            grad = x_data  # the gradient is written over the logits
        else:
            (lp * gl.float() + ent * ge.float()).sum().backward()
            grad = x.grad
        backward_reads = _rows_read(interpreter_loads, x.detach(), range(rows))
    for r in ignored:
        assert forward_reads[r] == 0 and backward_reads[r] == 0, (r, forward_reads, backward_reads)
    for r in kept:
        assert forward_reads[r] >= vocab and backward_reads[r] >= vocab, (r, forward_reads, backward_reads)
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert torch.isfinite(grad).all() and (grad[ignored] == 0).all()
    x64 = logits[kept].double().requires_grad_(True)
    rlp, rent = _fp64(x64, labels[kept], 0.8)
    (rlp * gl[kept] + rent * ge[kept]).sum().backward()
    torch.testing.assert_close(lp[kept].double(), rlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent[kept].double(), rent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[kept].double(), x64.grad, rtol=1e-4, atol=1e-6)


def test_backward_writes_zero_rows_into_a_buffer_that_is_not_zeroed():
    """The backward kernel owns every element of its output: an ignored row is written with zeros,
    not skipped, so a gradient buffer full of NaN (torch.empty may hold anything) comes back clean."""
    from fastrl.ops.selective_logprobs import grad_logits as _grad_logits, row_stats as _row_stats

    vocab, rows = 257, 5
    logits, labels = _case((rows,), vocab, seed=12, ignore_every=2)  # rows 0, 2, 4 ignored
    with backend("triton"):
        logp, entropy, stats = _row_stats(logits, labels, 1.0, -100, True)
        out = torch.full_like(logits, float("nan"))
        _grad_logits(torch.ones(rows), torch.ones(rows), logits, labels, entropy, stats, 1.0, -100, out)
    assert (out[0::2] == 0).all() and torch.isfinite(out).all()
    ref = torch_impl.selective_logprobs_backward(torch.ones(rows), torch.ones(rows), logits, labels, entropy, stats)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
