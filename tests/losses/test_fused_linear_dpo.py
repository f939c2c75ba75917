"""fastrl.losses.fused_linear_dpo against fp64 maths: logits materialised in fp64, sequence sums and
the DPO formulas written out here, autograd for the gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastrl.losses import FusedLinearDPOLoss, dpo_loss, fused_linear_dpo_loss, precompute_reference_logps
from fastrl.ops import backend
from conftest import gemm_counter

PAIRS, L, H, V = 3, 6, 32, 97


def _case(dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * PAIRS, L, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, (2 * PAIRS, L), generator=g)
    mask = torch.zeros(2 * PAIRS, L, dtype=torch.bool)
    for row, (start, stop) in enumerate([(1, 6), (2, 5), (1, 3), (2, 6), (1, 4), (3, 6)]):
        mask[row, start:stop] = True
    labels[~mask] = 10_000  # out of range: padding labels must never be read
    ref_c = -torch.rand(PAIRS, generator=g) * 10 - 20
    ref_r = -torch.rand(PAIRS, generator=g) * 10 - 20
    return hidden, weight, b, labels, mask, ref_c, ref_r


def _fp64_sequences(hidden, weight, bias, labels, mask, temperature=1.0, ld_alpha=None):
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    log_p = torch.log_softmax(logits / temperature, -1)
    token = log_p.gather(-1, torch.where(mask, labels, 0)[..., None]).squeeze(-1) * mask
    counts = mask.sum(1)
    if ld_alpha is None:
        return token.sum(1), token.sum(1), counts
    shorter = torch.minimum(counts[:PAIRS], counts[PAIRS:]).repeat(2)
    rank = mask.cumsum(1) - 1  # position within the sequence
    w = torch.where(rank < shorter[:, None], 1.0, ld_alpha).double()
    return (token * w).sum(1), token.sum(1), counts


def _ls(x):
    return F.logsigmoid(x)


def _fp64_loss(kind, seq, plain, counts, ref_c, ref_r, beta):
    pc, pr = seq[:PAIRS], seq[PAIRS:]
    nll_mean = -plain[:PAIRS].sum() / counts[:PAIRS].sum()
    h = (pc - ref_c.double()) - (pr - ref_r.double())
    if kind == "sigmoid":
        return -_ls(beta * h).mean()
    if kind == "ipo":
        hb = (pc - ref_c.double()) / counts[:PAIRS] - (pr - ref_r.double()) / counts[PAIRS:]
        return ((hb - 1 / (2 * beta)) ** 2).mean()
    if kind == "simpo":
        gamma = 0.5 * beta
        return -_ls(beta * (pc / counts[:PAIRS] - pr / counts[PAIRS:]) - gamma).mean()
    if kind == "sigmoid+sft":
        return -_ls(beta * h).mean() + nll_mean
    raise AssertionError(kind)


KINDS = {"sigmoid": {"loss_type": "sigmoid"}, "ipo": {"loss_type": "ipo"}, "simpo": {"loss_type": "simpo"},
         "sigmoid+sft": {"loss_type": ["sigmoid", "sft"]}}


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("ld_alpha", [None, 0.5])
@pytest.mark.parametrize("slices", ["several", "one"])
def test_loss_and_gradients_match_fp64(path, kind, ld_alpha, slices):
    hidden, weight, bias, labels, mask, ref_c, ref_r = _case(seed=len(kind))
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    # several vocabulary slices in the backward (two passes), or the whole logits in the default
    # workspace (one pass: the logits kept between the log-probs and the gradients)
    workspace = 4 * 2 * PAIRS * L * 10 if slices == "several" else None
    with backend(path):
        loss, metrics = fused_linear_dpo_loss(leaves[0], leaves[1], labels, ref_c, ref_r, mask=mask, bias=leaves[2],
                                              beta=0.2, temperature=0.8, ld_alpha=ld_alpha,
                                              workspace_bytes=workspace, **KINDS[kind])
        loss.backward()
    refs = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    seq, plain, counts = _fp64_sequences(*refs, labels, mask, temperature=0.8, ld_alpha=ld_alpha)
    want = _fp64_loss(kind, seq, plain, counts, ref_c, ref_r, 0.2)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    assert {"rewards/chosen", "rewards/margins", "rewards/accuracies"} <= metrics.keys()
    for got, ref in zip(leaves, refs):
        assert _rel(got.grad, ref.grad) < 1e-5, kind


def test_packed_layout_and_bf16_match_padded():
    hidden, weight, _, labels, mask, ref_c, ref_r = _case(dtype=torch.bfloat16, bias=False)
    counts = mask.sum(1)
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    hp = hidden[mask].clone().requires_grad_(True)
    h2 = hidden.clone().requires_grad_(True)
    w1, w2 = weight.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss1, _ = fused_linear_dpo_loss(hp, w1, labels[mask], ref_c, ref_r, cu_seqlens=cu_seqlens)
    loss1.backward()
    loss2, _ = fused_linear_dpo_loss(h2, w2, labels, ref_c, ref_r, mask=mask)
    loss2.backward()
    torch.testing.assert_close(loss1, loss2, rtol=1e-5, atol=1e-6)
    assert _rel(hp.grad.float(), h2.grad[mask].double()) < 1e-2
    assert _rel(w1.grad.float(), w2.grad.double()) < 1e-2
    assert (h2.grad[~mask] == 0).all()


def test_module_form_and_no_grad_path():
    hidden, weight, bias, labels, mask, ref_c, ref_r = _case()
    got, _ = FusedLinearDPOLoss(loss_type="robust", beta=0.3, label_smoothing=0.1)(
        hidden, weight, labels, ref_c, ref_r, mask=mask, bias=bias)
    assert not got.requires_grad
    seq, _, _ = _fp64_sequences(hidden, weight, bias, labels, mask)
    z = 0.3 * ((seq[:PAIRS] - ref_c.double()) - (seq[PAIRS:] - ref_r.double()))
    want = ((-(0.9) * _ls(z) + 0.1 * _ls(-z)) / 0.8).mean()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_settings_or_keywords_and_per_pair_tensors():
    from fastrl.losses import DPOSettings

    hidden, weight, bias, labels, mask, ref_c, ref_r = _case()
    kw = dict(loss_type=["sigmoid", "ipo"], beta=0.2, loss_weights=[1.0, 0.5])
    settings = DPOSettings(**kw)
    module = FusedLinearDPOLoss(settings, temperature=0.9)
    assert module.settings == settings and "temperature=0.9" in repr(module)
    want, _ = FusedLinearDPOLoss(temperature=0.9, **kw)(hidden, weight, labels, ref_c, ref_r, mask=mask, bias=bias)
    got, _ = module(hidden, weight, labels, ref_c, ref_r, mask=mask, bias=bias)
    assert torch.equal(got, want)
    # the per-pair tensors of dpo_loss pass through beside the settings
    w = torch.tensor([0.5, 1.0, 2.0])
    weighted, _ = fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, mask=mask, bias=bias, temperature=0.9,
                                        settings=settings, pair_weights=w)
    assert not torch.allclose(weighted, want)
    with pytest.raises(TypeError, match=r"fused_linear_dpo_loss\(\) got an unexpected keyword argument 'bta'"):
        fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, mask=mask, bta=0.1)


def test_precompute_reference_logps_matches_the_loss_inputs():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(V, H)
    proj = torch.nn.Linear(H, H)
    weight = torch.randn(V, H) * 0.2

    def backbone(ids, attention):
        return torch.tanh(proj(emb(ids))) * attention[..., None]

    ids = torch.randint(0, V, (5, 9))
    attention = torch.ones(5, 9, dtype=torch.long)
    attention[3, 7:] = 0
    completion = torch.zeros(5, 9, dtype=torch.long)
    completion[:, 4:] = 1
    batches = [{"input_ids": ids[:3], "attention_mask": attention[:3], "completion_mask": completion[:3]},
               {"input_ids": ids[3:], "attention_mask": attention[3:], "completion_mask": completion[3:]}]
    got = precompute_reference_logps(backbone, weight, batches, progress=False)
    with torch.no_grad():
        log_p = torch.log_softmax(backbone(ids, attention).double() @ weight.double().T, -1)[:, :-1]
        tok = log_p.gather(-1, ids[:, 1:, None]).squeeze(-1)
        score = (completion[:, 1:] * attention[:, 1:]).bool()
        want = (tok * score).sum(1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="completion_mask"):
        precompute_reference_logps(backbone, weight, [{"input_ids": ids, "attention_mask": attention}])


BAD = [
    (dict(mask=None), "cu_seqlens"),
    (dict(mask=torch.ones(5, L, dtype=torch.bool)), "mask"),
    (dict(chosen_lengths=torch.ones(PAIRS)), "chosen_lengths"),
    (dict(ld_alpha=1.5), "ld_alpha"),
    (dict(loss_type="nope"), "loss_type"),
    (dict(temperature=-1.0), "temperature"),
]


@pytest.mark.parametrize("over,name", BAD)
def test_bad_arguments_name_the_argument(over, name):
    hidden, weight, bias, labels, mask, ref_c, ref_r = _case()
    kwargs = dict(mask=mask)
    kwargs.update(over)
    with pytest.raises(ValueError, match=name):
        fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, **kwargs)


def test_odd_number_of_sequences_is_refused():
    hidden, weight, bias, labels, mask, ref_c, ref_r = _case()
    with pytest.raises(ValueError, match="2B"):
        fused_linear_dpo_loss(hidden[:5], weight, labels[:5], ref_c, ref_r, mask=mask[:5])


@pytest.mark.gpu
@pytest.mark.parametrize("workspace", [None, 3 << 30])  # two passes (default); chunks of pairs, one pass
def test_real_shapes_on_the_gpu_match_the_composed_ops(workspace):
    from fastrl.losses import dpo_loss
    from fastrl.ops import fused_linear_logprobs, sequence_logps

    g = torch.Generator(device="cuda").manual_seed(0)
    pairs, length, h, v = 4, 1024, 4096, 128256
    hidden = (torch.randn(2 * pairs, length, h, device="cuda", generator=g) * 0.5).bfloat16()
    weight = (torch.randn(v, h, device="cuda", generator=g) * 0.02).bfloat16()
    labels = torch.randint(0, v, (2 * pairs, length), device="cuda", generator=g)
    mask = torch.ones(2 * pairs, length, dtype=torch.bool, device="cuda")
    mask[:, :100] = False
    ref_c = torch.randn(pairs, device="cuda") - 1000
    ref_r = torch.randn(pairs, device="cuda") - 1000
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, _ = fused_linear_dpo_loss(h1, w1, labels, ref_c, ref_r, mask=mask, workspace_bytes=workspace)
    loss.backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    seq = sequence_logps(fused_linear_logprobs(h2, w2, labels.masked_fill(~mask, -100)), mask=mask)
    want, _ = dpo_loss(seq[:pairs], seq[pairs:], ref_c, ref_r)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)
    assert _rel(h1.grad.float(), h2.grad.double()) < 1e-2
    assert _rel(w1.grad.float(), w2.grad.double()) < 1e-2




CHUNK_KINDS = {"sigmoid": {}, "sigmoid+sft+ld": {"loss_type": ["sigmoid", "sft"], "ld_alpha": 0.5},
               "ipo": {"loss_type": "ipo"}, "orpo": {"loss_type": "orpo"}, "apo_zero": {"loss_type": "apo_zero"},
               "aot": {"loss_type": "aot"}}


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("kind", list(CHUNK_KINDS))
@pytest.mark.parametrize("workspace", ["one chunk", "pair chunks", "pair too big"])
def test_chunks_of_pairs_take_three_gemms_on_scored_rows(monkeypatch, layout, kind, workspace):
    pairs, length, h, v = 4, 10, 16, 50
    g = torch.Generator().manual_seed(len(kind))
    hidden = torch.randn(2 * pairs, length, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.3
    labels = torch.randint(0, v, (2 * pairs, length), generator=g)
    mask = torch.zeros(2 * pairs, length, dtype=torch.bool)
    for row in range(2 * pairs):  # a prompt of 2-3 positions, then 3-8 completion tokens
        start = 2 + row % 2
        mask[row, start:start + 3 + (5 * row) % 6] = True
    scored, counts = int(mask.sum()), mask.sum(1)
    ref_c, ref_r = -torch.rand(pairs, generator=g) * 5 - 10, -torch.rand(pairs, generator=g) * 5 - 10
    options = dict(CHUNK_KINDS[kind], beta=0.2)
    ld_alpha = options.pop("ld_alpha", None)
    # everything in one chunk; 16 rows of logits (the largest pair; the fp32 [V, H] accumulator fits
    # too): several chunks of whole pairs; 8 rows: a pair does not fit, two passes
    ws = {"one chunk": None, "pair chunks": 4 * v * 16, "pair too big": 4 * v * 8}[workspace]
    assert v * h * 4 <= 4 * v * 16 and int((counts[:pairs] + counts[pairs:]).max()) <= 16
    leaves = [hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)]
    record = gemm_counter(monkeypatch)
    if layout == "padded":
        loss, metrics = fused_linear_dpo_loss(*leaves, labels, ref_c, ref_r, mask=mask, ld_alpha=ld_alpha,
                                              workspace_bytes=ws, **options)
    else:
        cu = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        flat = leaves[0][mask]
        loss, metrics = fused_linear_dpo_loss(flat, leaves[1], labels[mask], ref_c, ref_r, cu_seqlens=cu,
                                              ld_alpha=ld_alpha, workspace_bytes=ws, **options)
    loss.backward()
    monkeypatch.undo()
    passes = 3 if workspace == "one chunk" or (workspace == "pair chunks" and kind != "aot") else 4
    assert sum(m * k * n for m, k, n in record) == passes * scored * v * h
    # the unfused torch reference in fp64: materialised logits, sequence sums, dpo_loss
    refs = [t.double().requires_grad_(True) for t in (hidden, weight)]
    log_p = torch.log_softmax(refs[0] @ refs[1].T, -1)
    token = log_p.gather(-1, labels[..., None]).squeeze(-1) * mask
    plain = token.sum(1)
    seq = plain
    if ld_alpha is not None:
        shorter = torch.minimum(counts[:pairs], counts[pairs:]).repeat(2)
        seq = (token * torch.where(mask.cumsum(1) - 1 < shorter[:, None], 1.0, ld_alpha)).sum(1)
    want, want_metrics = dpo_loss(seq[:pairs], seq[pairs:], ref_c.double(), ref_r.double(),
                                  chosen_lengths=counts[:pairs], rejected_lengths=counts[pairs:],
                                  chosen_nll=-plain[:pairs] if ld_alpha is not None else None, **options)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    for key in ("rewards/chosen", "rewards/margins", "logps/chosen"):
        torch.testing.assert_close(metrics[key].double(), want_metrics[key].double(), rtol=1e-5, atol=1e-5)
    d_hidden = leaves[0].grad
    assert _rel(d_hidden, refs[0].grad) < 1e-5 and _rel(leaves[1].grad, refs[1].grad) < 1e-5
    assert (d_hidden[~mask] == 0).all()


def test_precompute_reference_logps_runs_the_lm_head_on_completion_tokens_only(monkeypatch):
    torch.manual_seed(1)
    emb = torch.nn.Embedding(V, H)
    weight = torch.randn(V, H) * 0.2

    def backbone(ids, attention):  # no matrix product of its own: the counter sees the lm-head only
        return torch.tanh(emb(ids)) * attention[..., None]

    ids = torch.randint(0, V, (4, 12))
    attention = torch.ones(4, 12, dtype=torch.long)
    attention[1, 9:] = attention[2, 6:] = 0
    completion = torch.zeros(4, 12, dtype=torch.long)
    completion[:, 7:] = 1  # a 7-token prompt, 5 completion positions (fewer where padded)
    completion[3] = 0  # a row with nothing to score
    batches = [{"input_ids": ids, "attention_mask": attention, "completion_mask": completion}]
    record = gemm_counter(monkeypatch)
    got = precompute_reference_logps(backbone, weight, batches, progress=False)
    monkeypatch.undo()
    score = (completion[:, 1:] * attention[:, 1:]).bool()
    assert sum(m * k * n for m, k, n in record) == int(score.sum()) * V * H  # not 4 * 11 rows
    with torch.no_grad():
        log_p = torch.log_softmax(backbone(ids, attention).double() @ weight.double().T, -1)[:, :-1]
        want = (log_p.gather(-1, ids[:, 1:, None]).squeeze(-1) * score).sum(1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert got[3] == 0
