"""fastrl.ops.fused_linear_logprobs against fp64 maths, on both backends, chunked and not."""

from __future__ import annotations

import pytest
import torch

from fastrl.ops import backend, fused_linear_logprobs


def _case(rows=29, h=32, vocab=515, dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, h, generator=g).to(dtype)
    weight = (torch.randn(vocab, h, generator=g) * 0.3).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[::4] = -100
    return hidden, weight, b, labels


def _fp64(hidden, weight, bias, labels, temperature):
    s = hidden.double() @ weight.double().T
    if bias is not None:
        s = s + bias.double()
    log_p = torch.log_softmax(s / temperature, -1)
    keep = labels != -100
    lp = log_p.gather(-1, torch.where(keep, labels, 0)[:, None]).squeeze(-1)
    return torch.where(keep, lp, 0.0), torch.where(keep, -(log_p.exp() * log_p).sum(-1), 0.0)


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


# (rows, vocab): fewer rows than vocabulary entries takes the vocabulary-sliced backward, more the token-sliced one
SHAPES = [(29, 515), (61, 47)]


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("rows,vocab", SHAPES)
def test_values_and_gradients_match_fp64(path, dtype, with_bias, rows, vocab):
    hidden, weight, bias, labels = _case(rows=rows, vocab=vocab, dtype=dtype, bias=with_bias, seed=int(with_bias))
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight) + ((bias,) if with_bias else ())]
    gl, ge = torch.randn(rows, dtype=torch.float64), torch.randn(rows, dtype=torch.float64)
    with backend(path):  # a workspace of 8 rows or 8 columns: several slices either way
        lp, ent = fused_linear_logprobs(leaves[0], leaves[1], labels, leaves[2] if with_bias else None,
                                        temperature=0.8, return_entropy=True, workspace_bytes=32 * max(rows, vocab))
        (lp * gl + ent * ge).sum().backward()
    refs = [t.double().requires_grad_(True) for t in (hidden, weight) + ((bias,) if with_bias else ())]
    rlp, rent = _fp64(refs[0], refs[1], refs[2] if with_bias else None, labels, 0.8)
    (rlp * gl + rent * ge).sum().backward()
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=2e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for got, ref in zip(leaves, refs):
        assert got.grad.dtype == dtype
        assert _rel(got.grad, ref.grad) < tol


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("ignore_index", [-1, -2, 600])
def test_vocabulary_slices_never_confuse_a_label_with_ignore_index(path, ignore_index):
    # labels lo - 1 / lo - 2 shift to -1 / -2 inside a slice starting at lo: they must stay scored labels
    hidden, weight, bias, labels = _case(rows=40, vocab=515, bias=False)
    edges = torch.arange(64, 515, 64)
    labels = torch.cat([edges - 1, edges - 2, edges, torch.arange(16) * 29 % 515])  # slices of 64 columns
    labels[::5] = ignore_index
    w = weight.clone().requires_grad_(True)
    with backend(path):
        lp = fused_linear_logprobs(hidden, w, labels, ignore_index=ignore_index, workspace_bytes=4 * 40 * 64)
        lp.sum().backward()
    w_ref = weight.double().requires_grad_(True)
    log_p = torch.log_softmax(hidden.double() @ w_ref.T, -1)
    keep = labels != ignore_index
    torch.where(keep, log_p.gather(-1, torch.where(keep, labels, 0)[:, None]).squeeze(-1), 0.0).sum().backward()
    assert _rel(w.grad, w_ref.grad) < 1e-5


def test_chunking_does_not_change_the_result():
    hidden, weight, bias, labels = _case(rows=50)
    full = fused_linear_logprobs(hidden, weight, labels, bias, return_entropy=True)
    tiny = fused_linear_logprobs(hidden, weight, labels, bias, return_entropy=True, workspace_bytes=1)
    for a, b in zip(full, tiny):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_leading_dimensions_and_agreement_with_selective_logprobs():
    from fastrl.ops import selective_logprobs

    hidden, weight, bias, labels = _case(rows=24)
    h3, l3 = hidden.view(2, 3, 4, 32), labels.view(2, 3, 4)
    lp = fused_linear_logprobs(h3, weight, l3, bias, temperature=1.3)
    assert lp.shape == (2, 3, 4)
    direct = selective_logprobs(hidden @ weight.T + bias, labels, temperature=1.3)
    torch.testing.assert_close(lp.reshape(-1), direct, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph():
    hidden, weight, bias, labels = _case(rows=12)

    def loss(h, w):
        return fused_linear_logprobs(h, w, labels, bias, return_entropy=True)[1].sum()

    a = [hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)]
    b = [hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)]
    torch.compile(loss, fullgraph=True, backend="aot_eager")(*a).backward()
    loss(*b).backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)


def test_opcheck():
    from fastrl.ops.fused_linear_logprobs import _forward

    hidden, weight, bias, labels = _case(rows=6, vocab=40)
    torch.library.opcheck(_forward, (hidden.requires_grad_(True), weight.requires_grad_(True), bias, labels,
                                     1.0, -100, True, 0))


BAD = [
    (lambda h, w, b, y: fused_linear_logprobs(h[:, :20], w[:, :20], y), ValueError, "multiple of 16"),
    (lambda h, w, b, y: fused_linear_logprobs(h, w.double(), y), ValueError, "weight"),
    (lambda h, w, b, y: fused_linear_logprobs(h, w[:, :16], y), ValueError, "weight"),
    (lambda h, w, b, y: fused_linear_logprobs(h, w, y, b[:5]), ValueError, "bias"),
    (lambda h, w, b, y: fused_linear_logprobs(h, w, y[:3]), ValueError, "labels"),
    (lambda h, w, b, y: fused_linear_logprobs(h, w, torch.full_like(y, 515)), ValueError, "labels"),
    (lambda h, w, b, y: fused_linear_logprobs(h, w, y, temperature=0), ValueError, "temperature"),
    (lambda h, w, b, y: fused_linear_logprobs(h.long(), w, y), ValueError, "hidden"),
    (lambda h, w, b, y: fused_linear_logprobs(h, w, y, workspace_bytes=0), ValueError, "workspace_bytes"),
]


@pytest.mark.parametrize("call,exc,name", BAD)
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call(*_case())


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [32000, 151936])
def test_real_shapes_on_gpu_match_the_materialised_path_with_bounded_memory(vocab):
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens, h = 8192, 4096
    hidden = (torch.randn(tokens, h, device="cuda", generator=g) * 0.5).bfloat16().requires_grad_(True)
    weight = (torch.randn(vocab, h, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
    labels[::9] = -100
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp, ent = fused_linear_logprobs(hidden, weight, labels, return_entropy=True, workspace_bytes=256 << 20)
    (lp.sum() + 0.1 * ent.sum()).backward()
    peak_extra = torch.cuda.max_memory_allocated() - base
    # grads of hidden and weight, the fp32 d_hidden accumulator (tokens < V), the workspace and its bf16 copy
    bound = hidden.numel() * (2 + 4) + weight.numel() * 2 + (256 << 20) * 3 // 2 + (64 << 20)
    assert peak_extra < bound, (peak_extra, bound)
    h_ref = hidden.detach().clone().requires_grad_(True)
    w_ref = weight.detach().clone().requires_grad_(True)
    s = (h_ref.float() @ w_ref.float().T)
    log_p = torch.log_softmax(s, -1)
    keep = labels != -100
    rlp = torch.where(keep, log_p.gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1), 0.0)
    rent = torch.where(keep, -(log_p.exp() * log_p).sum(-1), 0.0)
    (rlp.sum() + 0.1 * rent.sum()).backward()
    torch.testing.assert_close(lp, rlp, rtol=1e-3, atol=1e-2)
    assert _rel(hidden.grad.float(), h_ref.grad.double()) < 1e-2
    assert _rel(weight.grad.float(), w_ref.grad.double()) < 1e-2


def test_backward_fake_kernel_matches_bias_dtype():
    from fastrl.ops.fused_linear_logprobs import _backward, _forward

    hidden, weight, _, labels = _case(rows=6, vocab=40, dtype=torch.bfloat16)
    bias = torch.randn(40)  # fp32 bias beside a bf16 weight
    _, entropy, stats = _forward(hidden, weight, bias, labels, 1.0, -100, True, 0)
    args = (torch.randn(6), torch.randn(6), hidden, weight, bias, labels, entropy, stats, 1.0, -100, 0)
    torch.library.opcheck(_backward, args, test_utils=("test_schema", "test_faketensor"))
    assert _backward(*args)[2].dtype == torch.float32
