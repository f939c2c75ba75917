"""Rewards on images: pixels decoded once per completion and shared by the rewards, the PIL form, a
CLIP image-text reward against CLIPModel's own forward, a pairwise preference model feeding
pref_grpo (win rates), best-of-N against scoring every sample by hand, the telemetry's image
metrics, the best-of-n command, and the errors that name their field."""

from __future__ import annotations

import json
import math
import struct
import sys
import types
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastrl.ops import group_advantages
from fastrl.rollout.image import image_model, tiny_janus
from fastrl.train import rewards as rewards_lib
from fastrl.train.image_rewards import (CLIP_MEAN, CLIP_STD, ImagePreferenceReward, ImageTextReward, ScorePreference,
                                        pixel_values)
from fastrl.train.rewards import RewardError, load_rewards, reward_function, score

from .conftest import make_tokenizer, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

BOI, OFFSET, CODEBOOK, N = 62, 64, 32, 16  # tiny_janus: 16 codes of 32 after 64 text ids; 8x8 pixels


@pytest.fixture(scope="module")
def im():
    return image_model(tiny_janus(seed=0))


def _completions(rows: int, seed: int = 0, plan: list[int] | None = None) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [list(plan or []) + (torch.randint(0, CODEBOOK, (N,), generator=g) + OFFSET).tolist() for _ in range(rows)]


def _clip(seed: int = 0, image_size: int = 16):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


@pytest.fixture(scope="module")
def clip():
    return _clip()


class DecodeSpy:
    """Counts the calls (and rows) of an ImageModel's decode."""

    def __init__(self, im, monkeypatch):
        self.calls, self.rows, self.inner = 0, 0, im.decode
        monkeypatch.setattr(im, "decode", self)

    def __call__(self, codes):
        self.calls += 1
        self.rows += codes.shape[0]
        return self.inner(codes)


# ---------------------------------------------------------------------------------------------- images reach rewards

def test_images_are_decoded_once_and_shared(im, monkeypatch):
    completions = _completions(5, plan=[])
    expected = im.decode(im.codes(completions))  # before the spy
    spy = DecodeSpy(im, monkeypatch)
    seen = {}

    def batched(prompt_ids: list, completion_ids, images):
        seen["batched"] = images
        return images.float().mean((1, 2, 3)).tolist()

    def per_sample(prompt_ids, completion_ids, images, target):
        seen.setdefault("per_sample", []).append(images)
        return float(images[..., 0].float().mean()) + target

    def text_only(prompt_ids, completion_ids, **columns):
        return float(len(completion_ids))

    rewards = load_rewards([batched, per_sample, text_only])
    assert [r.image_args for r in rewards] == [frozenset({"images"}), frozenset({"images"}), frozenset()]
    prompts = [[1, 5, BOI]] * 5
    columns = [{"target": 1.0, "images": "a data column of that name"}] * 5  # the pixels take its place
    table = score(rewards, prompts, completions, columns, image=im, decode_batch_size=2)
    assert spy.rows == 5 and spy.calls == 3  # each completion once, in batches of 2
    assert torch.equal(seen["batched"], expected) and seen["batched"].dtype == torch.uint8
    assert seen["batched"].shape == (5, 8, 8, 3)
    assert all(torch.equal(a, b) for a, b in zip(seen["per_sample"], expected))
    assert torch.allclose(table[:, 0], expected.float().mean((1, 2, 3)))
    assert torch.allclose(table[:, 1], expected[..., 0].float().mean((1, 2)) + 1.0)
    assert table[:, 2].tolist() == [float(N)] * 5


def test_no_decode_without_an_image_reward(im, monkeypatch):
    spy = DecodeSpy(im, monkeypatch)
    rewards = load_rewards([lambda prompt_ids, completion_ids, **k: 1.0])
    score(rewards, [[1]] * 2, _completions(2), [{}, {}], image=im)
    assert spy.calls == 0


def test_images_after_a_text_plan_and_given_pixels(im, monkeypatch):
    completions = _completions(3, plan=[7, 8, BOI])
    expected = im.decode(im.codes(completions))
    got = []
    reward = reward_function(lambda prompt_ids, completion_ids, images: got.append(images) or 0.0)
    score([reward], [[1]] * 3, completions, [{}] * 3, image=im)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    spy = DecodeSpy(im, monkeypatch)
    got.clear()
    score([reward], [[1]] * 3, completions, [{}] * 3, images=expected)  # already decoded: nothing decoded again
    assert spy.calls == 0 and all(torch.equal(a, b) for a, b in zip(got, expected))


def test_pil_images(im, monkeypatch):
    completions = _completions(2)
    expected = im.decode(im.codes(completions))
    made = []
    fake = types.ModuleType("PIL")
    fake.Image = SimpleNamespace(fromarray=lambda array: made.append(array) or ("pil", len(made)))
    monkeypatch.setitem(sys.modules, "PIL", fake)
    monkeypatch.setitem(sys.modules, "PIL.Image", fake.Image)
    got = {}

    def batched(prompt_ids: list, completion_ids, pil_images, images):
        got["pil"], got["images"] = pil_images, images
        return [0.0] * len(pil_images)

    def per_sample(prompt_ids, completion_ids, pil_images):
        got.setdefault("one", []).append(pil_images)
        return 0.0

    score(load_rewards([batched, per_sample]), [[1]] * 2, completions, [{}, {}], image=im)
    assert got["pil"] == [("pil", 1), ("pil", 2)] and got["one"] == got["pil"]  # converted once, shared
    assert len(made) == 2 and all((a == b.numpy()).all() and a.shape == (8, 8, 3) for a, b in zip(made, expected))
    assert torch.equal(got["images"], expected)


def test_pil_images_without_pillow_is_a_clear_error(im, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL raises ImportError

    def reward(prompt_ids, completion_ids, pil_images):
        return 0.0

    with pytest.raises(RewardError, match=r"reward_funcs\[0\].*pil_images.*Pillow"):
        score(load_rewards([reward]), [[1]], _completions(1), [{}], image=im)


def test_real_pil_images(im):
    pil = pytest.importorskip("PIL.Image")
    completions = _completions(2)
    got = []
    score(load_rewards([lambda prompt_ids, completion_ids, pil_images: got.append(pil_images) or 0.0]), [[1]] * 2, completions, [{}, {}],
          image=im)
    expected = im.decode(im.codes(completions))
    assert all(isinstance(g, pil.Image) and g.size == (8, 8) for g in got)
    import numpy as np

    assert all((np.asarray(g) == e.numpy()).all() for g, e in zip(got, expected))


def test_image_reward_on_a_text_run_names_the_reward():
    def clip_score(prompt_ids, completion_ids, images):
        return 0.0

    rewards = load_rewards([lambda prompt_ids, completion_ids: 1.0, clip_score])
    with pytest.raises(RewardError, match=r"reward_funcs\[1\] \(clip_score\).*no image generation.*image_generation"):
        score(rewards, [[1]], [[3, 4]], [{}])
    with pytest.raises(ValueError, match="image_generation"):  # a RewardError is a ValueError
        score(rewards, [[1]], [[3, 4]], [{}], image=None)


def test_text_run_data_columns_named_images_or_group_size_reach_the_reward_as_before():
    # the image meanings of these names apply to image runs; on a text run a column of that name is data
    seen = []

    def uses_columns(prompt_ids, completion_ids, images, group_size):
        seen.append((images, group_size))
        return 1.0

    table = score(load_rewards([uses_columns]), [[1], [1]], [[3], [4]],
                  [{"images": "a.png", "group_size": 7}, {"images": "b.png", "group_size": 7}], group_size=2)
    assert table[:, 0].tolist() == [1.0, 1.0] and seen == [("a.png", 7), ("b.png", 7)]


def test_image_reward_on_a_text_training_run(prompts_file, tmp_path):
    from fastrl.train import GRPOConfig, train_grpo

    from .conftest import online_fields

    def redness(prompt_ids: list, completion_ids, images):
        return [0.0] * len(completion_ids)

    config = GRPOConfig(**online_fields(prompts_file, tmp_path / "run", max_steps=1, reward_funcs=[redness]))
    with pytest.raises(RewardError, match=r"GRPOConfig\.reward_funcs\[0\] \(redness\).*no image generation"):
        train_grpo(config)


# ---------------------------------------------------------------------------------------------- CLIP image-text reward

def _direct_clip(model, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CLIPModel's own forward: logits_per_image / logit_scale = the cosine of the two embeddings."""
    x = images.permute(0, 3, 1, 2).double() / 255.0
    x = (x - torch.tensor(CLIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / \
        torch.tensor(CLIP_STD, dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=x.float())
    return out.logits_per_image.diagonal() / model.logit_scale.exp()


def test_clip_similarity_matches_clip_model_from_ids(clip):
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (5, 16, 16, 3), generator=g, dtype=torch.uint8)  # the model's size: no resize
    prompts = [[5, 6, 2], [5, 6, 2], [7, 2], [9, 10, 11, 2], [7, 2]]
    reward = ImageTextReward(clip, batch_size=2, name="clip")
    got = torch.tensor(reward(prompts, [[0]] * 5, images))
    ids = torch.zeros(5, 4, dtype=torch.long)
    mask = torch.zeros(5, 4, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), 1
    assert torch.allclose(got, _direct_clip(clip, images, ids, mask), atol=1e-5)
    scaled = ImageTextReward(clip, scale=2.5).score_images(images, prompts)
    assert torch.allclose(scaled, 2.5 * got, atol=1e-5)


def test_clip_similarity_from_text_through_a_tokenizer(clip, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok"))
    images = torch.randint(0, 256, (3, 16, 16, 3), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    captions = ["good answer", "the bad world", "good answer"]
    reward = ImageTextReward(clip, tokenizer=tok, prompt_column="caption")
    got = torch.tensor(reward([[1]] * 3, [[0]] * 3, images, caption=captions))
    enc = tok(captions, padding=True, return_tensors="pt")
    assert torch.allclose(got, _direct_clip(clip, images, enc["input_ids"], enc["attention_mask"]), atol=1e-5)
    # prompts as the run's token ids, decoded by the run's tokenizer into that text
    run_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in captions]
    decoded = ImageTextReward(clip, tokenizer=tok, prompt_tokenizer=tok)
    assert torch.allclose(torch.tensor(decoded(run_ids, [[0]] * 3, images)), got, atol=1e-6)


def test_clip_reward_from_a_directory_and_the_resize(clip, im, tmp_path):
    path = tmp_path / "clip"
    clip.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "crop_size": {"height": 16, "width": 16}}))
    [reward] = load_rewards([], {"kind": "clip", "path": str(path)}, field_name="GRPOConfig.reward_funcs")
    assert reward.name == "clip" and reward.image_args == {"images"} and reward.batched
    completions = _completions(3)
    prompts = [[5, 2], [6, 2], [5, 2]]
    got = score([reward], prompts, completions, [{}] * 3, image=im)[:, 0]
    pixels = im.decode(im.codes(completions))  # 8x8, the model reads 16x16: resized by the reward
    x = torch.nn.functional.interpolate(pixels.permute(0, 3, 1, 2).float() / 255, size=(16, 16), mode="bicubic",
                                        align_corners=False).clamp(0, 1)
    assert torch.allclose(pixel_values(pixels, 16, mean=(0.5,) * 3, std=(0.25,) * 3), (x - 0.5) / 0.25, atol=1e-6)
    with torch.no_grad():
        image = clip.get_image_features(pixel_values=(x - 0.5) / 0.25)
        text = clip.get_text_features(input_ids=torch.tensor(prompts))
    image = getattr(image, "pooler_output", image)
    text = getattr(text, "pooler_output", text)
    assert torch.allclose(got, torch.nn.functional.cosine_similarity(image, text), atol=1e-5)


def test_image_text_reward_from_any_pair_scorer(im):
    class PairScorer(torch.nn.Module):  # a model whose forward scores (image, prompt) pairs
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, pixel_values, input_ids, attention_mask):
            return SimpleNamespace(logits=(self.w * pixel_values.mean((1, 2, 3)) + attention_mask.sum(1))[:, None])

    reward = ImageTextReward(PairScorer(), preprocess=lambda x: x.permute(0, 3, 1, 2).float() / 255)
    pixels = im.decode(im.codes(_completions(2)))
    got = reward.score_images(pixels, [[3, 4], [5]])
    assert torch.allclose(got, 2 * pixels.float().mean((1, 2, 3)) / 255 + torch.tensor([2.0, 1.0]))


# ---------------------------------------------------------------------------------------------- pairwise -> pref_grpo

def _grpo_config(tmp_path, **fields):
    from fastrl.train import GRPOConfig

    from .conftest import TINY

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": [3, 4]}])
    return GRPOConfig(model_config=dict(TINY["qwen2"]), train_data=str(data), reward_funcs=["m:f"], **fields)


def test_preference_model_feeds_pref_grpo_win_rates(clip, tmp_path):
    from fastrl.train.grpo import advantages_of

    G, T = 4, 0.05
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (2 * G, 16, 16, 3), generator=g, dtype=torch.uint8)
    prompts = [[5, 6, 2]] * G + [[7, 2]] * G
    scorer = ImageTextReward(clip)
    reward = reward_function(ImagePreferenceReward(ScorePreference(scorer, temperature=T)), "reward_model")
    assert reward.wants_group_size and reward.batched
    table = score([reward], prompts, [[0]] * (2 * G), [{}] * (2 * G), images=images, group_size=G)
    preferences = rewards_lib.pairwise_preferences([reward])
    assert preferences.shape == (2 * G, G)

    s = scorer.score_images(images, prompts).double().view(2, G)  # the formula, by hand, in fp64
    P = torch.sigmoid((s[:, :, None] - s[:, None, :]) / T)
    wins = (P.sum(2) - 0.5) / (G - 1)  # each image's win rate over the other G - 1 of its group
    assert torch.allclose(table[:, 0].double(), wins.reshape(-1), atol=1e-5)
    expected = (wins - wins.mean(1, keepdim=True)) / (wins.std(1, keepdim=True) + 1e-4)

    config = _grpo_config(tmp_path, advantage_estimator="pref_grpo", num_generations=G)
    got = advantages_of(table, G, config, weights=None, lengths=torch.ones(2 * G, dtype=torch.long), baseline=None,
                        preferences=preferences)
    assert torch.allclose(got.double(), expected.reshape(-1), atol=1e-4)
    direct = group_advantages(table[:, 0], G, estimator="pref_grpo", preferences=preferences)
    assert torch.allclose(direct, got)
    # the matrix is the model's, not ranks of the combined reward: without it pref_grpo ranks the win rates
    ranked = advantages_of(table, G, config, weights=None, lengths=torch.ones(2 * G, dtype=torch.long), baseline=None)
    assert not torch.allclose(ranked, got, atol=1e-3)
    # under grpo the win rates are an ordinary reward: the same advantages
    plain = advantages_of(table, G, _grpo_config(tmp_path, num_generations=G), weights=None,
                          lengths=torch.ones(2 * G, dtype=torch.long), baseline=None)
    assert torch.allclose(plain, got, atol=1e-4)


def test_pairwise_model_in_both_orders(im):
    bias = 0.3  # a judge that favours whichever image it sees first

    def prefer(a, b, prompts):
        return torch.sigmoid(a.float().mean((1, 2, 3)) / 50 - b.float().mean((1, 2, 3)) / 50 + bias)

    pixels = im.decode(im.codes(_completions(6)))
    m = pixels.float().mean((1, 2, 3)).view(2, 3) / 50
    matrix = ImagePreferenceReward(prefer, batch_size=4).preferences([[1]] * 6, pixels, 3)
    d = m[:, :, None] - m[:, None, :]
    both = (torch.sigmoid(d + bias) + 1 - torch.sigmoid(-d + bias)) / 2  # the first-position bias cancels
    both.diagonal(dim1=1, dim2=2).fill_(0.5)
    assert torch.allclose(matrix.view(2, 3, 3), both, atol=1e-6)
    one = ImagePreferenceReward(prefer, both_orders=False).preferences([[1]] * 6, pixels, 3).view(2, 3, 3)
    upper = torch.triu(torch.ones(3, 3, dtype=torch.bool), 1)
    assert torch.allclose(one[:, upper], torch.sigmoid(d + bias)[:, upper], atol=1e-6)
    assert torch.allclose(one + one.transpose(1, 2), torch.ones(2, 3, 3))
    # group size from the runs of equal prompts
    reward = ImagePreferenceReward(prefer)
    rates = reward([[1]] * 3 + [[2]] * 3, [[0]] * 6, pixels)
    assert reward.last_preferences.shape == (6, 3) and len(rates) == 6


def test_preference_config_through_grpo_run(clip, tmp_path, monkeypatch):
    """A tiny-Janus GRPO step with reward_model {kind: clip_preference} and estimator pref_grpo: the
    preference matrix reaches the advantages, the telemetry counts the images."""
    from fastrl.train import GRPOConfig, train_grpo
    from fastrl.train import grpo as grpo_module

    janus_dir, clip_dir = tmp_path / "janus", tmp_path / "clip"
    tiny_janus(seed=0).save_pretrained(janus_dir)
    clip.save_pretrained(clip_dir)
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [1, 5, 6, BOI]}, {"prompt": [1, 7, 8, BOI]}])
    seen = []
    real = grpo_module.advantages_of

    def spy(*args, **kwargs):
        seen.append(kwargs.get("preferences"))
        return real(*args, **kwargs)

    monkeypatch.setattr(grpo_module, "advantages_of", spy)
    config = GRPOConfig(model=str(janus_dir), train_data=str(data), output_dir=str(tmp_path / "run"), batch_size=2,
                        num_generations=3, max_steps=1, progress=False, seed=0, log_completions=0,
                        reward_model={"kind": "clip_preference", "path": str(clip_dir), "temperature": 0.1},
                        advantage_estimator="pref_grpo", image_generation={"cfg_weight": 2.0, "boi_token_id": BOI})
    result = train_grpo(config)
    assert seen and seen[0] is not None and seen[0].shape == (6, 3)
    last = result.history[-1]
    assert last["images/decoded"] == 6 and last["images/scored"] == 6
    assert last["images/decoded_per_s"] > 0 and last["images/scored_per_s"] > 0
    assert 0 < last["time/reward_share"] < 1
    assert "reward/clip_preference/mean" in last


# ---------------------------------------------------------------------------------------------- telemetry

def test_telemetry_reports_image_rates_and_reward_share(im, tmp_path):
    from fastrl.train.telemetry import Telemetry

    config = SimpleNamespace(output_dir=str(tmp_path), progress=False, report_to=[], run_name=None)
    telemetry = Telemetry(config, total_steps=1, device=torch.device("cpu"), is_main=True)
    rewards = load_rewards([lambda prompt_ids, completion_ids, images: 1.0,
                            lambda prompt_ids, completion_ids, images=None: 2.0])
    with telemetry.phase("reward"):
        score(rewards, [[1]] * 3, _completions(3), [{}] * 3, image=im)
    record = telemetry.log(1, {})
    assert record["images/decoded"] == 3 and record["images/scored"] == 6  # two image rewards
    assert record["images/decoded_per_s"] > 0 and record["images/scored_per_s"] > 0
    assert 0 < record["time/reward_share"] <= 1
    again = telemetry.log(2, {})  # counted since the last record
    assert "images/decoded" not in again and "time/reward_share" not in again
    telemetry.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["images/decoded"] == 3


# ---------------------------------------------------------------------------------------------- best-of-N

def _redness(prompt_ids: list, completion_ids, images):
    return (images[..., 0].float() - images[..., 1:].float().mean(-1)).mean((1, 2)).tolist()


def test_best_of_n_keeps_the_argmax(im):
    from fastrl.rollout import generate
    from fastrl.train.best_of_n import best_of_n

    prompts = [[1, 5, 6, BOI], [1, 9, BOI], [1, 3, 4, 7, BOI]]
    n, w = 4, 3.0
    result = best_of_n(im, prompts, _redness, n, cfg_weight=w, generator=torch.Generator().manual_seed(7),
                       batch_size=len(prompts))
    # every sample scored by hand: the same draws (same seed, one generate call), decoded, scored
    out = generate(im.model, [torch.tensor(p) for p in prompts], image=im, num_samples=n, cfg_weight=w,
                   generator=torch.Generator().manual_seed(7))
    rows = [r[:k] for r, k in zip(out.completion_ids.tolist(), out.lengths.tolist())]
    pixels = im.decode(im.codes(rows))
    scores = torch.tensor(_redness(None, None, pixels)).view(len(prompts), n)
    assert torch.allclose(result.all_scores, scores)
    assert torch.equal(result.index, scores.argmax(1))
    assert torch.allclose(result.scores, scores.max(1).values)
    best = [p * n + int(i) for p, i in enumerate(scores.argmax(1))]
    assert torch.equal(result.images, pixels[best])
    assert result.completion_ids == [rows[b] for b in best]
    assert torch.equal(result.codes, im.codes([rows[b] for b in best]))
    assert result.rewards.shape == (3, n, 1) and result.names == ["_redness"]


def test_best_of_n_with_a_preference_reward_and_unscorable_samples(im):
    from fastrl.train.best_of_n import best_of_n

    calls = []

    def some_unscorable(prompt_ids: list, completion_ids, images):
        calls.append(len(completion_ids))
        values = _redness(prompt_ids, completion_ids, images)
        return [None if i % 3 == 0 else v for i, v in enumerate(values)]

    result = best_of_n(im, [[1, 5, BOI], [1, 6, BOI]], [some_unscorable], 3,
                       generator=torch.Generator().manual_seed(1), batch_size=1)
    assert calls == [3, 3]  # one batch of n per prompt
    assert torch.isnan(result.all_scores[:, 0]).all() and (result.index != 0).all()  # NaN never wins
    prefer = ImagePreferenceReward(lambda a, b, p: (a.float().mean((1, 2, 3)) > b.float().mean((1, 2, 3))).float())
    result = best_of_n(im, [[1, 5, BOI]], prefer, 4, generator=torch.Generator().manual_seed(2))
    means = result.images.float().mean((1, 2, 3))
    assert result.scores[0] == result.all_scores[0].max() and means.numel() == 1


def _read_png(path: Path) -> torch.Tensor:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height = size
    raw = zlib.decompress(idat)
    rows = [raw[y * (3 * width + 1):(y + 1) * (3 * width + 1)] for y in range(height)]
    assert all(r[0] == 0 for r in rows)  # filter 0 (what the plain encoder writes)
    return torch.tensor([list(r[1:]) for r in rows], dtype=torch.uint8).view(height, width, 3)


def test_write_best_of_n_pngs_and_scores(im, tmp_path, monkeypatch):
    from fastrl.train.best_of_n import best_of_n, write_best_of_n

    monkeypatch.setitem(sys.modules, "PIL", None)  # the plain encoder, whatever is installed
    prompts = [[1, 5, BOI], [1, 6, BOI]]
    result = best_of_n(im, prompts, _redness, 3, generator=torch.Generator().manual_seed(0))
    paths = write_best_of_n(result, tmp_path / "out", prompts=prompts)
    assert [p.name for p in paths["images"]] == ["best_0000.png", "best_0001.png"]
    for i, p in enumerate(paths["images"]):
        assert torch.equal(_read_png(p), result.images[i])
    lines = [json.loads(line) for line in paths["scores"].read_text().splitlines()]
    assert [line["best"] for line in lines] == result.index.tolist()
    assert lines[0]["scores"] == pytest.approx(result.all_scores[0].tolist())
    assert lines[1]["prompt"] == prompts[1]
    assert lines[1]["rewards"]["_redness"] == pytest.approx(float(result.scores[1]))
    with pytest.raises(ValueError, match="out: .* not an empty directory"):
        write_best_of_n(result, tmp_path / "out")


def test_best_of_n_command(tmp_path, capsys, one_thread):
    from fastrl.cli import main

    janus_dir = tmp_path / "janus"
    tiny_janus(seed=0).save_pretrained(janus_dir)
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [1, 5, 6, BOI]}, {"prompt": [1, 7, BOI]},
                                                    {"prompt": [1, 9, BOI]}])
    (tmp_path / "my_image_rewards.py").write_text(
        "def redness(prompt_ids: list, completion_ids, images):\n"
        "    return (images[..., 0].float() - images[..., 1:].float().mean(-1)).mean((1, 2)).tolist()\n")
    config = tmp_path / "bon.yaml"
    config.write_text(f"model: {janus_dir}\ntrain_data: {data}\n"
                      f"reward_funcs: ['{tmp_path}/my_image_rewards.py:redness']\n"
                      f"image_generation: {{cfg_weight: 2.0, boi_token_id: {BOI}}}\nseed: 0\n")
    out = tmp_path / "best"
    assert main(["best-of-n", str(config), "--n", "3", "--out", str(out), "--num-prompts", "2",
                 "--temperature", "0.9"]) == 0
    printed = capsys.readouterr().out
    assert "2 prompts x 3 samples" in printed
    lines = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(len(line["scores"]) == 3 for line in lines)
    assert sorted(p.name for p in out.glob("*.png")) == ["best_0000.png", "best_0001.png"]
    assert all(line["score"] == max(line["scores"]) for line in lines)
    assert main(["best-of-n", str(config), "--n", "3", "--out", str(out)]) == 2  # not empty: refused
    assert "not an empty directory" in capsys.readouterr().err
    assert main(["best-of-n", str(config), "--n", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- errors

def test_bad_input_names_the_field(im, clip, tmp_path):
    from fastrl.train.best_of_n import best_of_n
    from fastrl.train.config import ConfigError

    with pytest.raises(ValueError, match="^n must be an int >= 1"):
        best_of_n(im, [[1, BOI]], _redness, 0)
    with pytest.raises(ValueError, match="^batch_size"):
        best_of_n(im, [[1, BOI]], _redness, 2, batch_size=0)
    with pytest.raises(ValueError, match="^temperature"):
        best_of_n(im, [[1, BOI]], _redness, 2, temperature=0.0)
    with pytest.raises(ValueError, match="^columns"):
        best_of_n(im, [[1, BOI]], _redness, 2, columns=[{}, {}])
    with pytest.raises(ValueError, match="^reward_weights"):
        best_of_n(im, [[1, BOI]], _redness, 2, reward_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="^prompt_column: the data has no column 'caption'"):
        ImageTextReward(clip, prompt_column="caption")([[1]], [[0]], torch.zeros(1, 16, 16, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="^images must be a uint8"):
        pixel_values(torch.zeros(1, 8, 8, 3), 16)
    with pytest.raises(ValueError, match="^text_ids: prompt 0 has ids outside"):
        ImageTextReward(clip).score_images(torch.zeros(1, 16, 16, 3, dtype=torch.uint8), [[99]])
    with pytest.raises(ValueError, match="^scale"):
        ImageTextReward(clip, scale=math.inf)
    with pytest.raises(ValueError, match="^temperature"):
        ScorePreference(ImageTextReward(clip), temperature=0.0)
    with pytest.raises(ValueError, match="^group_size: rows 0..1 do not share one prompt"):
        ImagePreferenceReward(lambda a, b, p: torch.ones(len(p)) / 2)([[1], [2]], [[0]] * 2,
                                                                        torch.zeros(2, 4, 4, 3, dtype=torch.uint8),
                                                                        group_size=2)
    with pytest.raises(ValueError, match="^prefer: preferences must be probabilities"):
        ImagePreferenceReward(lambda a, b, p: torch.full((len(p),), 2.0)).preferences(
            [[1]] * 2, torch.zeros(2, 4, 4, 3, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match=r"^images must be uint8 \[2, H, W, 3\]"):
        score(load_rewards([_redness]), [[1]] * 2, [[0]] * 2, [{}] * 2, images=torch.zeros(3, 4, 4, 3))
    clip_dir = tmp_path / "clip"
    clip.save_pretrained(clip_dir)
    cases = [({"kind": "hps", "path": str(clip_dir)}, r"GRPOConfig\.reward_model\.kind: must be one of clip"),
             ({"kind": "clip", "path": str(tmp_path / "none")}, r"GRPOConfig\.reward_model\.path: .* not a local"),
             ({"kind": "clip", "path": str(clip_dir), "temprature": 1.0}, r"GRPOConfig\.reward_model\.temprature"),
             ({"kind": "clip_preference", "path": str(clip_dir), "temperature": -1},
              r"GRPOConfig\.reward_model\.temperature: must be a finite number > 0"),
             ('{"kind": "clip", "path": ', r"GRPOConfig\.reward_model: is not valid JSON")]
    for spec, message in cases:
        with pytest.raises(ConfigError, match=message):
            _grpo_config(tmp_path, reward_model=spec)
    config = _grpo_config(tmp_path, reward_model=json.dumps({"kind": "clip", "path": str(clip_dir)}))
    assert config.reward_model == {"kind": "clip", "path": str(clip_dir)}  # JSON on the command line
    assert config.to_dict()["reward_model"] == {"kind": "clip", "path": str(clip_dir)}
