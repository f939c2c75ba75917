"""fastrl.ops.packing: pack_sequences / unpack by hand, round trips, gradients, and every argument check."""

from __future__ import annotations

import pytest
import torch

from fastrl.ops.packing import pack_sequences, unpack
from conftest import refusal_test


def test_pack_keeps_masked_positions_in_order_anywhere_in_the_row():
    padded = torch.arange(12).reshape(3, 4)
    mask = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    flat, cu = pack_sequences(padded, mask)
    assert flat.tolist() == [1, 3, 8, 9, 11]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 2, 2, 5]


def test_pack_with_trailing_feature_dims_and_a_float_mask():
    padded = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    flat, cu = pack_sequences(padded, mask)
    assert flat.shape == (3, 2, 2) and cu.tolist() == [0, 2, 3]
    assert torch.equal(flat, torch.stack([padded[0, 0], padded[0, 2], padded[1, 1]]))


def test_unpack_by_hand_with_max_len_and_padding_value():
    flat = torch.tensor([5, 6, 7, 8])
    padded, mask = unpack(flat, torch.tensor([0, 3, 3, 4]), max_len=4, padding_value=-1)
    assert padded.dtype == flat.dtype and mask.dtype == torch.bool
    assert padded.tolist() == [[5, 6, 7, -1], [-1, -1, -1, -1], [8, -1, -1, -1]]
    assert mask.tolist() == [[True, True, True, False], [False] * 4, [True, False, False, False]]
    padded, mask = unpack(flat, torch.tensor([0, 3, 3, 4]))  # max_len = the longest sequence
    assert padded.shape == (3, 3) and mask.sum(1).tolist() == [3, 0, 1]


@pytest.mark.parametrize("feature_shape", [(), (3,), (2, 5)])
def test_unpack_of_pack_round_trips_for_left_aligned_masks(feature_shape):
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([0, 7, 1, 11, 0, 4])
    width = 11
    mask = torch.arange(width) < lengths[:, None]
    x = torch.randn(len(lengths), width, *feature_shape, generator=g)
    flat, cu = pack_sequences(x, mask)
    assert flat.shape == (int(lengths.sum()), *feature_shape)
    back, back_mask = unpack(flat, cu, max_len=width)
    assert torch.equal(back_mask, mask)
    assert torch.equal(back[mask], x[mask]) and (back[~mask] == 0).all()
    # and pack(unpack(...)) gives back the packed tensor
    flat2, cu2 = pack_sequences(back, back_mask)
    assert torch.equal(flat2, flat) and torch.equal(cu2, cu)


def test_non_left_aligned_masks_unpack_left_aligned():
    x = torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 4.0, 5.0]])
    flat, cu = pack_sequences(x, x != 0)
    back, mask = unpack(flat, cu, padding_value=float("nan"))
    assert back[:, :2].tolist() == [[1.0, 2.0], [3.0, 4.0]] and back[1, 2] == 5.0 and back[0, 2].isnan()
    assert mask.tolist() == [[True, True, False], [True, True, True]]


def test_both_are_differentiable():
    x = torch.randn(3, 5, 2, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0, 1], [0, 0, 0, 0, 0], [0, 1, 1, 1, 1]])
    flat, cu = pack_sequences(x, mask)
    padded, m = unpack(flat * 3, cu, max_len=6)
    padded.sum().backward()
    assert torch.equal(x.grad, 3 * mask[..., None].float().expand(3, 5, 2))


def test_int64_offsets_and_empty_inputs():
    padded, mask = unpack(torch.zeros(0, 4), torch.tensor([0, 0, 0], dtype=torch.int64))
    assert padded.shape == (2, 0, 4) and mask.shape == (2, 0)
    padded, mask = unpack(torch.zeros(0), torch.tensor([0]))
    assert padded.shape == (0, 0) and mask.shape == (0, 0)
    flat, cu = pack_sequences(torch.zeros(0, 5, 3), torch.zeros(0, 5, dtype=torch.bool))
    assert flat.shape == (0, 3) and cu.tolist() == [0]


def _bad_calls():
    x, m = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    flat, cu = torch.zeros(5), torch.tensor([0, 2, 5])
    meta = torch.device("meta")
    return [
        (lambda: pack_sequences([[1, 2]], m), TypeError, "padded must be a torch.Tensor"),
        (lambda: pack_sequences(torch.zeros(3), m), ValueError, "padded must be"),
        (lambda: pack_sequences(x, "mask"), TypeError, "mask must be a torch.Tensor"),
        (lambda: pack_sequences(x, m[:, :2]), ValueError, r"mask must have shape \(2, 3\)"),
        (lambda: pack_sequences(x, m[None]), ValueError, "mask must be 2-D"),
        (lambda: pack_sequences(x, m.int() - 2), ValueError, "mask must hold only 0 and 1"),
        (lambda: pack_sequences(x, m.to(torch.complex64)), ValueError, "mask must have dtype"),
        (lambda: pack_sequences(x, m.to(meta)), ValueError, "mask must be on cpu"),
        (lambda: unpack([1.0, 2.0], cu), TypeError, "flat must be a torch.Tensor"),
        (lambda: unpack(torch.tensor(1.0), cu), ValueError, "flat must be"),
        (lambda: unpack(flat, cu[None]), ValueError, "cu_seqlens must be 1-D"),
        (lambda: unpack(flat, cu.float()), ValueError, "cu_seqlens must have dtype"),
        (lambda: unpack(flat, torch.zeros(0, dtype=torch.int32)), ValueError, "cu_seqlens must hold"),
        (lambda: unpack(flat, cu.to(meta)), ValueError, "cu_seqlens must be on cpu"),
        (lambda: unpack(flat, torch.tensor([1, 2, 5])), ValueError, "cu_seqlens must start at 0"),
        (lambda: unpack(flat, torch.tensor([0, 3, 2, 5])), ValueError, "cu_seqlens must be non-decreasing"),
        (lambda: unpack(flat, torch.tensor([0, 2, 4])), ValueError, "cu_seqlens must end at the number of tokens, 5"),
        (lambda: unpack(flat, cu, max_len=2), ValueError, r"max_len \(2\) is shorter than the longest sequence \(3\)"),
        (lambda: unpack(flat, cu, max_len=-1), ValueError, "max_len must be >= 0"),
        (lambda: unpack(flat, cu, max_len=3.0), TypeError, "max_len must be an int"),
        (lambda: unpack(flat, cu, padding_value="0"), TypeError, "padding_value must be a number"),
    ]


test_bad_arguments_are_refused = refusal_test(_bad_calls)
