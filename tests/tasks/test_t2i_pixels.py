"""The codebook decoder and the pixel detector: decode -> detect is the identity, noise is survived, and the
pixel reward equals the token-level scorer on clean images."""

from __future__ import annotations

import random

import pytest
import torch

from fastrl.tasks.t2i import Canvas, Vocab, make_prompt_sets, make_reward_fn, sft_examples
from fastrl.tasks.t2i.grid import ITEMS
from fastrl.tasks.t2i.pixels import PALETTE, decode_codes, detect, glyph_masks, pixel_reward
from fastrl.tasks.t2i.pipeline import scattered_canvas

VOCAB = Vocab()


def codes_of(canvases) -> torch.Tensor:
    return torch.tensor([VOCAB.read_completion(VOCAB.encode_image_completion(c))[0] for c in canvases])


@pytest.fixture(scope="module")
def canvases():
    """Teacher canvases (perfect and flawed), scattered ones, and dense random canvases holding every code."""
    sets = make_prompt_sets(seed=0, in_domain_per_category=6, ood_per_category=2)
    out = [e.canvas for e in sft_examples(sets.train + sets.ood, VOCAB, samples_per_prompt=2, seed=0)]
    rng = random.Random(0)
    out += [scattered_canvas(spec, rng) for spec in sets.train[:10]]
    out += [Canvas(6, tuple(rng.choice((None, *ITEMS)) for _ in range(36))) for _ in range(20)]
    out.append(Canvas(6, ITEMS * 3))  # every object at every column
    return out


def test_glyphs_are_far_apart():
    masks = glyph_masks()
    assert masks.shape == (3, 8, 8)
    for i in range(3):
        assert not masks[i, 0].any() and not masks[i, -1].any()  # a white margin
        for j in range(i):
            assert int((masks[i] ^ masks[j]).sum()) >= 10


def test_decode_draws_each_code_in_its_patch():
    codes = torch.zeros(1, 36, dtype=torch.long)
    codes[0, 7] = 1 + ITEMS.index(("blue", "square"))  # row 1, column 1
    image = decode_codes(codes)
    assert image.shape == (1, 48, 48, 3) and image.dtype == torch.uint8
    patch = image[0, 8:16, 8:16]
    assert (patch[glyph_masks()[1]] == torch.tensor(PALETTE["blue"], dtype=torch.uint8)).all()
    image[0, 8:16, 8:16] = 255
    assert (image == 255).all()  # everything else is white


def test_decode_then_detect_is_the_identity(canvases):
    assert detect(decode_codes(codes_of(canvases))) == canvases


def test_detection_survives_noise(canvases):
    """Gaussian pixel noise (std 25) and three flipped pixels per patch: still every object and cell right."""
    gen = torch.Generator().manual_seed(0)
    images = decode_codes(codes_of(canvases)).float()
    images += 25 * torch.randn(images.shape, generator=gen)
    n = images.shape[0]
    for _ in range(3):  # in each patch one random pixel turns white, black or a palette colour
        rows = torch.randint(0, 8, (n, 6, 6), generator=gen) + 8 * torch.arange(6)[:, None]
        cols = torch.randint(0, 8, (n, 6, 6), generator=gen) + 8 * torch.arange(6)[None, :]
        values = torch.tensor([(255, 255, 255), (0, 0, 0), *PALETTE.values()], dtype=torch.float32)
        pick = values[torch.randint(0, len(values), (n, 6, 6), generator=gen)]
        images[torch.arange(n)[:, None, None], rows, cols] = pick
    assert detect(images.clamp(0, 255)) == canvases


def test_heavy_damage_degrades_without_errors(canvases):
    images = decode_codes(codes_of(canvases[:8]))
    images[:, :, :24] = 255  # the left half erased: its objects are gone, the right half still read
    found = detect(images)
    for canvas, seen in zip(canvases[:8], found):
        assert all(seen.at(r, c) is None for r in range(6) for c in range(3))
        assert all(seen.at(r, c) == canvas.at(r, c) for r in range(6) for c in range(3, 6))


@pytest.mark.parametrize("pass_weight", [0.0, 0.5])
def test_pixel_reward_equals_the_token_scorer(pass_weight):
    """On clean images (and on malformed completions: the same scaling), the pixel reward is the scorer's."""
    sets = make_prompt_sets(seed=0, in_domain_per_category=6, ood_per_category=2)
    examples = sft_examples(sets.train + sets.ood, VOCAB, samples_per_prompt=3, cot=True, seed=1)
    prompts, completions = [], []
    for k, e in enumerate(examples):
        prompts.append(list(e.prompt_ids))
        plan = e.completion_ids[:e.completion_ids.index(VOCAB.plan_end_id) + 1]
        image = VOCAB.encode_image_completion(e.canvas, plan=None)
        completions.append([*plan, VOCAB.boi_id, *image] if k % 3 else image)
    completions.append(completions[0][:20])  # malformed: too few image tokens
    completions.append([VOCAB.plan_id] + completions[1])  # malformed: a bad plan
    prompts += [prompts[0], prompts[1]]
    tokens = make_reward_fn(VOCAB, pass_weight=pass_weight)
    pixels = pixel_reward(VOCAB, pass_weight=pass_weight)
    got = pixels(prompts, completions)
    assert got == pytest.approx([tokens(p, c) for p, c in zip(prompts, completions)], abs=1e-12)
    assert 0.0 < min(got[:-2]) or max(got) == 1.0
    assert pixels.__name__ == "detector" and pixels.batched
    assert pixels([[VOCAB.bos_id, VOCAB.sep_id]], [completions[0]]) == [0.0]  # a prompt that does not parse


def test_bad_input():
    with pytest.raises(ValueError, match="codes"):
        decode_codes(torch.zeros(2, 35, dtype=torch.long))
    with pytest.raises(ValueError, match="codes"):
        decode_codes(torch.full((1, 36), 13))
    with pytest.raises(ValueError, match="images"):
        detect(torch.zeros(1, 47, 47, 3))
    with pytest.raises(ValueError, match="pass_weight"):
        pixel_reward(VOCAB, pass_weight=2.0)
    with pytest.raises(ValueError, match="patch"):
        glyph_masks(2)
