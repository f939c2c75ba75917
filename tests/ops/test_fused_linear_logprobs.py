"""fastrl.ops.fused_linear_logprobs against fp64 maths, on both backends, chunked and not."""

from __future__ import annotations

import importlib

import pytest
import torch

from fastrl.ops import backend, fused_linear_logprobs
from conftest import expect_error, gemm_counter


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
    from fastrl.ops.fused_linear_logprobs import logprobs_op

    hidden, weight, bias, labels = _case(rows=6, vocab=40)
    torch.library.opcheck(logprobs_op, (hidden.requires_grad_(True), weight.requires_grad_(True), bias, labels,
                                     1.0, -100, True, 0))


BAD = [
    (lambda h, w, b, y: fused_linear_logprobs(h[:, :0], w[:, :0], y), ValueError, "must be positive"),
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
    expect_error(call, exc, name, *_case())


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
    from fastrl.ops.fused_linear_logprobs import logprobs_backward_op, logprobs_op

    hidden, weight, _, labels = _case(rows=6, vocab=40, dtype=torch.bfloat16)
    bias = torch.randn(40)  # fp32 bias beside a bf16 weight
    _, entropy, stats = logprobs_op(hidden, weight, bias, labels, 1.0, -100, True, 0)
    args = (torch.randn(6), torch.randn(6), hidden, weight, bias, labels, entropy, stats, 1.0, -100, 0)
    torch.library.opcheck(logprobs_backward_op, args, test_utils=("test_schema", "test_faketensor"))
    assert logprobs_backward_op(*args)[2].dtype == torch.float32


# ---------------------------------------------------------------------------------------------------
# Chunk shapes (aligned, balanced), GEMMs only on scored rows, the gradient written in the model's dtype




def _check_spans(spans, n, width, budget, align):
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # every row once, in order
    sizes = [hi - lo for lo, hi in spans]
    step = max(1, budget // (4 * width))
    assert max(sizes) <= max(step, 1) and min(sizes) > 0  # never more than the workspace holds
    assert len(spans) == -(-n // (step // align * align or step)) or step < align  # fewest aligned chunks
    if step >= align:
        assert all(s % align == 0 for s in sizes[:-1])
        assert max(sizes) - min(sizes) <= align  # balanced: no short tail
    return sizes


@pytest.mark.parametrize("n,width,budget,align", [
    (12288, 151936, 1 << 30, 128),    # token chunks of 12288 tokens at V = 151936, 1 GiB
    (151936, 12288, 1 << 30, 256),    # vocabulary slices of the same batch
    (8192, 128256, 256 << 20, 128), (128256, 8192, 256 << 20, 256),
    (16384, 50257, 1 << 30, 128), (50257, 16384, 1 << 30, 256),
    (1000, 50, 4 * 50 * 700, 128), (5000, 77, 4 * 77 * 300, 256), (300, 64, 4 * 64 * 200, 128),
])
def test_chunk_spans_are_aligned_balanced_and_fit_the_workspace(n, width, budget, align):
    from fastrl.ops.fused_linear_logprobs import chunk_spans

    sizes = _check_spans(chunk_spans(n, width, budget, align), n, width, budget, align)
    if (n, width) == (12288, 151936):
        assert sizes == [1536] * 8  # not 6 x 1766 + 1692
    if (n, width) == (151936, 12288):
        assert sizes == [21504] + [21760] * 5 + [21632]  # not 6 x 21845 + 20866: odd widths


@pytest.mark.parametrize("n,width,budget", [(7, 3, 1), (10, 5, 4 * 5 * 3), (129, 2, 4 * 2 * 128), (50, 515, 10**9)])
def test_chunk_spans_small_workspaces(n, width, budget):
    from fastrl.ops.fused_linear_logprobs import chunk_spans

    spans = chunk_spans(n, width, budget, 128)
    _check_spans(spans, n, width, budget, 128)
    assert chunk_spans(0, width, budget, 128) == []


def test_forward_token_chunks_and_backward_vocabulary_slices_are_aligned(monkeypatch):
    fl = importlib.import_module("fastrl.ops.fused_linear_logprobs")

    forward_rows, backward_cols = [], []
    row_stats, grad_logits = fl.row_stats, fl.grad_logits
    monkeypatch.setattr(fl, "row_stats", lambda logits, *a: forward_rows.append(logits.shape[0]) or row_stats(logits, *a))
    monkeypatch.setattr(fl, "grad_logits",
                        lambda g, ge, logits, *a: backward_cols.append(logits.shape[1]) or grad_logits(g, ge, logits, *a))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1000, 16, generator=g)
    weight = torch.randn(50, 16, generator=g)
    fused_linear_logprobs(hidden, weight, torch.randint(0, 50, (1000,), generator=g), workspace_bytes=4 * 50 * 700)
    assert forward_rows == [512, 488]  # was [700, 300]
    h = torch.randn(40, 16, generator=g)
    w = (torch.randn(1000, 16, generator=g) * 0.3).requires_grad_(True)
    fused_linear_logprobs(h, w, torch.randint(0, 1000, (40,), generator=g), workspace_bytes=4 * 40 * 600).sum().backward()
    assert backward_cols == [512, 488]  # was [600, 400]


@pytest.mark.parametrize("rows,vocab", SHAPES)
@pytest.mark.parametrize("workspace", [None, 4 * 8 * 515])
def test_only_scored_rows_go_through_the_lm_head(monkeypatch, rows, vocab, workspace):
    hidden, weight, bias, labels = _case(rows=rows, vocab=vocab, bias=False)
    labels[: rows // 2] = -100  # more than half of the rows score nothing (prompt / padding)
    scored = int((labels != -100).sum())
    want = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    # the ungathered result: every row through the head, ignored rows zeroed afterwards
    s = want[0] @ want[1].T
    lp_all = torch.log_softmax(s, -1).gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1)
    ref = torch.where(labels != -100, lp_all, 0.0)
    ref.sum().backward()
    record = gemm_counter(monkeypatch)
    got = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    lp = fused_linear_logprobs(got[0], got[1], labels, workspace_bytes=workspace)
    lp.sum().backward()
    monkeypatch.undo()
    # forward logits, recomputed logits, d_hidden, d_weight: each over the scored rows only
    assert sum(m * k * n for m, k, n in record) == 4 * scored * vocab * 32
    torch.testing.assert_close(lp, ref.detach(), rtol=1e-5, atol=1e-6)
    assert (got[0].grad[labels == -100] == 0).all()  # exact zeros
    for a, b in zip(got, want):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_backward_writes_the_gradient_in_the_model_dtype_into_its_own_buffer(monkeypatch):
    fl = importlib.import_module("fastrl.ops.fused_linear_logprobs")

    seen = []
    grad_logits = fl.grad_logits

    def spy(g, ge, logits, labels, entropy, stats, temperature, ignore_index, out):
        seen.append((logits.dtype, out.dtype, out.data_ptr() == logits.data_ptr()))
        grad_logits(g, ge, logits, labels, entropy, stats, temperature, ignore_index, out)

    monkeypatch.setattr(fl, "grad_logits", spy)
    for rows, vocab in SHAPES:  # both backward layouts
        for dtype in (torch.bfloat16, torch.float32):
            hidden, weight, _, labels = _case(rows=rows, vocab=vocab, dtype=dtype, bias=False)
            w = weight.clone().requires_grad_(True)
            seen.clear()
            fused_linear_logprobs(hidden, w, labels, workspace_bytes=32 * max(rows, vocab)).sum().backward()
            assert len(seen) > 1
            for logits_dtype, out_dtype, same in seen:
                assert logits_dtype == torch.float32 and out_dtype == dtype
                assert same == (dtype == torch.float32)  # fp32 models: in place; else its own bf16 buffer


_BWD_COMPILE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from conftest import compile_for_gpu
from fastrl.kernels.selective_logprobs import selective_logprobs_bwd_kernel as kernel
signature = {"grad_logits_ptr": "*bf16", "grad_logp_ptr": "*fp32", "grad_entropy_ptr": "*fp32",
             "logits_ptr": "*fp32", "labels_ptr": "*i64", "entropy_ptr": "*fp32", "stats_ptr": "*fp32",
             "n_cols": "i32", "stride_row": "i32", "grad_stride_row": "i32", "inv_temperature": "fp32",
             "ignore_index": "i32", "HAS_GRAD_ENTROPY": "constexpr", "BLOCK": "constexpr"}
out = {}
for width in map(int, sys.argv[2:]):
    aligned = [name for name, kind in signature.items() if kind.startswith("*")]
    if width % 16 == 0:  # Triton's launcher marks an int divisible by 16 so
        aligned += ["n_cols", "stride_row", "grad_stride_row"]
    out[width] = compile_for_gpu(kernel, signature, {"HAS_GRAD_ENTROPY": True, "BLOCK": 4096}, num_warps=8,
                                 aligned=tuple(aligned))
print(json.dumps(out))
"""


def _bwd_ptx_for_slices(*widths: int) -> dict:
    """The backward kernel as a vocabulary slice of each width launches it from fused_linear_logprobs
    on an sm_90 GPU: fp32 logits in, the gradient written in bf16 into its own buffer; the width is
    the row stride of both. Compiled ahead of time in a fresh process (the interpreter, once it has
    run in this one, leaves triton.language patched)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _BWD_COMPILE, str(Path(__file__).parents[1]), *map(str, widths)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return {int(k): v for k, v in json.loads(run.stdout.strip().splitlines()[-1]).items()}


def test_vocabulary_slices_of_a_real_batch_compile_to_vector_loads_and_stores():
    from fastrl.ops.fused_linear_logprobs import VOCAB_ALIGN, chunk_spans

    # 12288 tokens, V = 151936, 1 GiB: every slice width the backward launches with
    widths = {hi - lo for lo, hi in chunk_spans(151936, 12288, 1 << 30, VOCAB_ALIGN)}
    assert all(w % 128 == 0 for w in widths)
    compiled = _bwd_ptx_for_slices(*sorted(widths), 21845)
    for width in sorted(widths):
        res = compiled[width]
        assert "ld.global.v4" in res["ptx"], width  # fp32 logits, 16 bytes a load
        assert "st.global.v4" in res["ptx"] and "st.global.b16" not in res["ptx"], width  # bf16 gradient
        assert res.get("STACK", 0) == 0 and res.get("LOCAL", 0) == 0
    # the old width, 2**28 // 12288 = 21845 columns, is odd: the loads cannot be vectorised
    odd = compiled[21845]["ptx"]
    assert "ld.global.v4" not in odd and "st.global.b16" in odd
