"""The torch references checked against hand-written fp64 maths and published test vectors."""

from __future__ import annotations

import math

import pytest
import torch

from fastrl.ops import torch_impl


@pytest.mark.parametrize("counter,key,expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
    # Random123's known-answer vectors for Philox4x32-10
    assert torch_impl.philox4x32_10(counter, key) == expected


def test_philox_uniforms_look_uniform():
    u = torch.tensor([torch_impl.philox_uniform(99, r) for r in range(20_000)], dtype=torch.float64)
    assert ((u >= 0) & (u < 1)).all()
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    assert torch_impl.philox_uniform(99, 0) != torch_impl.philox_uniform(100, 0)


def _probs(*p):
    return torch.tensor([[math.log(x) for x in p]])


def _dist(logits, **kw):
    return torch_impl.sampling_distribution(logits, **kw)[0].tolist()


def test_no_filter_is_the_tempered_softmax():
    logits = torch.tensor([[1.0, 2.0, -0.5, 0.25]])
    for t in (1.0, 0.5, 3.0):
        z = sum(math.exp(v / t) for v in logits[0].tolist())
        assert _dist(logits, temperature=t) == pytest.approx([math.exp(v / t) / z for v in logits[0].tolist()], rel=1e-12)


def test_top_k_top_p_min_p_by_hand():
    x = _probs(0.5, 0.3, 0.15, 0.05)
    assert _dist(x, top_k=2) == pytest.approx([0.625, 0.375, 0, 0])
    # top-p keeps token i while the mass strictly above it is below p
    assert _dist(x, top_p=0.5) == pytest.approx([1, 0, 0, 0])
    assert _dist(x, top_p=0.51) == pytest.approx([0.625, 0.375, 0, 0])
    assert _dist(x, top_p=0.81) == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    # min-p keeps p >= min_p * max p = 0.145 (the boundary itself is at fp32 rounding distance)
    assert _dist(x, min_p=0.29) == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    # top-p runs on the top-k set renormalised: 0.625 >= 0.6, so only the first survives
    assert _dist(x, top_k=2, top_p=0.6) == pytest.approx([1, 0, 0, 0])
    assert _dist(x, top_k=3, top_p=0.9, min_p=0.5) == pytest.approx([0.625, 0.375, 0, 0])


def test_ties_are_kept_at_every_boundary():
    x = _probs(0.4, 0.2, 0.2, 0.2)
    assert _dist(x, top_k=2) == pytest.approx([0.4, 0.2, 0.2, 0.2])
    assert _dist(x, top_p=0.5) == pytest.approx([0.4, 0.2, 0.2, 0.2])
    assert _dist(x, top_p=0.4) == pytest.approx([1, 0, 0, 0])


def test_greedy_is_uniform_over_tied_maxima_and_per_row_settings_apply():
    x = torch.tensor([[0.0, 2.0, 2.0], [0.0, 1.0, 3.0]])
    out = torch_impl.sampling_distribution(x, temperature=torch.tensor([0.0, 1.0]), top_k=torch.tensor([0, 1]))
    assert out.tolist() == [[0.0, 0.5, 0.5], [0.0, 0.0, 1.0]]


def test_inverse_cdf_draw_and_logprobs():
    x = _probs(0.5, 0.3, 0.2)
    u = torch.tensor([0.0, 0.49, 0.51, 0.79, 0.81, 0.999999], dtype=torch.float64)
    tokens, logp, flogp = torch_impl.sample(x.expand(6, -1), u)
    assert tokens.tolist() == [0, 0, 1, 1, 2, 2]
    torch.testing.assert_close(logp, torch.tensor([0.5, 0.5, 0.3, 0.3, 0.2, 0.2]).log())
    torch.testing.assert_close(flogp, logp)
    tokens, logp, flogp = torch_impl.sample(x.expand(2, -1), torch.tensor([0.1, 0.9]), top_k=2)
    assert tokens.tolist() == [0, 1]
    torch.testing.assert_close(flogp, torch.tensor([0.625, 0.375]).log())
    torch.testing.assert_close(logp, torch.tensor([0.5, 0.3]).log())
