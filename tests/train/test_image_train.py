"""The trainer on image-generation models: a tiny random Janus (fastrl.rollout.image.tiny_janus).

Log-probs of image tokens through the Policy against HF's forward + generation_head + log_softmax in
fp64 (conditional, CFG-mixed, text plan + image); GRPO and DPO runs that raise a reward read from the
decoded pixels; online DPO and SFT runs; resume; config errors.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch

from fastrl.rollout import generate
from fastrl.rollout.image import image_model, tiny_janus
from fastrl.train import DPOConfig, GRPOConfig, OnlineDPOConfig, SFTConfig, train_dpo, train_grpo, train_online_dpo, \
    train_sft
from fastrl.train.config import ConfigError
from fastrl.train.model import Policy, dpo_head, logprob_head, unconditional_prompt
from fastrl.train.packing import pack, pad, with_unconditional

from .conftest import state, write_jsonl

BOI, PAD = 62, 0  # tiny_janus: text ids 0 pad, 1 bos, 2 eos; BOI / EOI the last two text ids
OFFSET, CODEBOOK, N = 64, 32, 16


def _tiny_janus():
    """tiny_janus with a milder image head: its random logits are nearly one-hot, so sampling would
    not explore."""
    model = tiny_janus(seed=0)
    with torch.no_grad():
        model.model.generation_head.vision_head.weight.mul_(0.1)
    return model


@pytest.fixture(scope="module")
def janus():
    return _tiny_janus()


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("janus")
    _tiny_janus().save_pretrained(path)
    return path


def _codes(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, CODEBOOK, (N,), generator=g) + OFFSET).tolist() for _ in range(n)]


def _hf_logps(model, prompt: list[int], completion: list[int], *, uncond: list[int] | None = None, w: float = 1.0):
    """fp64 reference: HF's language model on the embeddings T2I-R1 builds (embed_tokens for text,
    prepare_embeddings_for_image_generation for codes), lm_head on plan rows, generation_head on
    image rows, log_softmax; CFG: log_softmax(u + w (c - u)) of the two branches' image logits."""
    def rows(seq: list[int], start: int):
        ids = torch.tensor(seq)
        text = ids < OFFSET
        emb = torch.where(text[:, None], model.model.language_model.embed_tokens(torch.where(text, ids, 0)),
                          model.prepare_embeddings_for_image_generation((ids - OFFSET).clamp(min=0)))
        h = model.model.language_model(inputs_embeds=emb[None]).last_hidden_state[0]
        return h[start - 1:-1]

    with torch.no_grad():
        h = rows(prompt + completion, len(prompt))
        plan = len(completion) - N
        image_logits = model.model.generation_head(h[plan:])
        if uncond is not None:
            u = model.model.generation_head(rows(uncond + completion[plan:], len(uncond)))
            image_logits = u + w * (image_logits - u)
        labels = torch.tensor(completion)
        text = torch.log_softmax(model.lm_head(h[:plan]), -1).gather(1, labels[:plan, None])[:, 0]
        image = torch.log_softmax(image_logits, -1).gather(1, (labels[plan:] - OFFSET)[:, None])[:, 0]
    return torch.cat([text, image])


def _reference_copy(model):
    return copy.deepcopy(model).double()


@pytest.mark.parametrize("layout", [pack, pad])
def test_image_logps_match_hf_fp64(janus, layout):
    im = image_model(janus)
    ref = _reference_copy(janus)
    prompts = [[1, 5, 6, 7, BOI], [1, 9, 10, 11, 12, 13, BOI], [1, 3, BOI]]
    completions = _codes(3, seed=1)
    logps = Policy(janus, None, im)(layout(prompts, completions), logprob_head())
    expected = torch.cat([_hf_logps(ref, p, c) for p, c in zip(prompts, completions)])
    torch.testing.assert_close(logps.double(), expected, atol=1e-4, rtol=0)


def test_an_image_position_without_an_image_code_is_refused(janus):
    # a text id where the last N labels must be codes; offset - 100 would otherwise be read as the fused
    # op's ignore_index (log-prob 0, no gradient) without a word
    im = image_model(janus)
    completion = _codes(1, seed=1)[0]
    for bad in (5, OFFSET - 100 if OFFSET >= 100 else 0):
        wrong = completion[:3] + [bad] + completion[4:]
        with pytest.raises(ValueError, match=rf"labels: the image position 3 holds id {bad}, not an image code"):
            Policy(janus, None, im)(pack([[1, 5, BOI]], [wrong]), logprob_head())


@pytest.mark.parametrize("layout", [pack, pad])
def test_cfg_mixed_logps_match_hf_fp64(janus, layout):
    im = image_model(janus)
    ref = _reference_copy(janus)
    w = 3.0
    prompts = [[1, 5, 6, 7, BOI], [1, 9, 10, BOI]]
    completions = _codes(2, seed=2)
    uncond = [unconditional_prompt(im, p) for p in prompts]
    assert uncond[0] == [1, PAD, PAD, PAD, BOI]
    batch = with_unconditional(layout, prompts, completions, uncond, N)
    policy = Policy(janus, None, im, cfg_weight=w)
    logps = policy(batch, logprob_head())
    expected = torch.cat([_hf_logps(ref, p, c, uncond=u, w=w) for p, c, u in zip(prompts, completions, uncond)])
    torch.testing.assert_close(logps.double(), expected, atol=1e-4, rtol=0)
    # the conditional log-prob is a different number (w != 1 does mix)
    assert (Policy(janus, None, im)(batch, logprob_head()) - logps).abs().max() > 1e-2


@pytest.mark.parametrize("uncond", [False, True])
def test_plan_and_image_logps_match_hf_fp64_and_their_gradients(janus, uncond):
    model = copy.deepcopy(janus)
    im = image_model(model)
    ref = _reference_copy(model)
    w = 2.5 if uncond else 1.0
    prompts = [[1, 5, 6, 7], [1, 9, 10]]
    completions = [[20, 21, 22, BOI] + c for c, in zip(_codes(2, seed=3))]
    completions[1] = [BOI] + completions[1][4:]  # an empty plan: only the begin-of-image token
    unconds = [unconditional_prompt(im, p) for p in prompts]
    batch = with_unconditional(pack, prompts, completions, unconds, N) if uncond else pack(prompts, completions)
    policy = Policy(model, None, im, cfg_weight=w)
    logps = policy(batch, logprob_head())
    expected = torch.cat([_hf_logps(ref, p, c, uncond=u if uncond else None, w=w)
                          for p, c, u in zip(prompts, completions, unconds)])
    torch.testing.assert_close(logps.double(), expected, atol=1e-4, rtol=0)

    # gradients of sum(logp * weights) against the plain autograd of the same formula in fp32
    weights = torch.randn(logps.shape[0], generator=torch.Generator().manual_seed(0))
    (logps * weights).sum().backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    plain = torch.cat([_autograd_logps(model, im, p, c, u if uncond else None, w)
                       for p, c, u in zip(prompts, completions, unconds)])
    (plain * weights).sum().backward()
    assert fused.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in fused.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, atol=2e-4, rtol=1e-3)


def _autograd_logps(model, im, prompt, completion, uncond, w):
    def rows(seq, start):
        h = im.trunk(inputs_embeds=im.embed(torch.tensor(seq))[None]).last_hidden_state[0]
        return h[start - 1:-1]

    h = rows(prompt + completion, len(prompt))
    plan = len(completion) - N
    logits = im.image_logits(h[plan:])
    if uncond is not None:
        u = im.image_logits(rows(uncond + completion[plan:], len(uncond)))
        logits = u + w * (logits - u)
    labels = torch.tensor(completion)
    text = torch.log_softmax(im.text_logits(h[:plan]), -1).gather(1, labels[:plan, None])[:, 0]
    image = torch.log_softmax(logits, -1).gather(1, (labels[plan:] - OFFSET)[:, None])[:, 0]
    return torch.cat([text, image])


def test_mixed_dpo_head_equals_fused_loss_on_image_only_batches(janus):
    # an image-only batch takes the fused form; its log-prob form (used for plan + image batches) gives
    # the same loss from the per-token log-probs
    from fastrl.losses import FusedLinearDPOLoss

    im = image_model(janus)
    prompts = [[1, 5, BOI], [1, 6, BOI]] * 2
    batch = pack(prompts, _codes(4, seed=4))
    loss_fn = FusedLinearDPOLoss(beta=0.1, loss_type=["sigmoid", "sft"])
    ref_c, ref_r = torch.tensor([-50.0, -52.0]), torch.tensor([-51.0, -49.0])
    head = dpo_head(loss_fn, batch, ref_c, ref_r)
    with torch.no_grad():
        fused_loss, fused_metrics = Policy(janus, None, im)(batch, head)
        token_logps = Policy(janus, None, im)(batch, logprob_head())
        loss, metrics = head.from_logps(token_logps, None)
    torch.testing.assert_close(loss, fused_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["logps/chosen"], fused_metrics["logps/chosen"], atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- runs

PALETTE = torch.randint(0, 256, (CODEBOOK, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def palette_decode(codes: torch.Tensor) -> torch.Tensor:
    """A fixed codebook decoder (image_generation.decode): code c paints its 2 x 2 patch of the 8 x 8
    image in PALETTE[c]. (The random tiny VQ-VAE's group norms paint nearly every image the same
    grey, which would leave a pixel reward little to see.)"""
    side = int(codes.shape[1] ** 0.5)
    patches = PALETTE[codes].view(-1, side, side, 3)
    return patches.repeat_interleave(2, 1).repeat_interleave(2, 2)


def redness(prompt_ids, completion_ids, images) -> float:
    """The pixel reward of the runs: mean red minus mean green and blue, in [-1, 1]."""
    pixels = images.float() / 255.0
    return float(pixels[..., 0].mean() - pixels[..., 1:].mean())


def _prompts_file(tmp_path: Path, n: int = 8, *, boi: bool = True) -> Path:
    rng = random.Random(0)
    rows = [{"prompt": [1] + [rng.randrange(3, 60) for _ in range(3)] + ([BOI] if boi else [])} for _ in range(n)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def _image_fields(model_dir: Path, data: Path, out: Path, **overrides) -> dict:
    fields = dict(model=str(model_dir), train_data=str(data), output_dir=str(out), batch_size=2,
                  num_generations=4, max_steps=6, learning_rate=1e-2, lr_scheduler="constant", progress=False,
                  seed=0, reward_funcs=[redness], log_completions=0,
                  image_generation={"cfg_weight": 1.0, "boi_token_id": BOI, "decode": palette_decode})
    fields.update(overrides)
    return fields


def _mean_redness(policy, prompts, samples: int, seed: int = 0) -> float:
    im = image_model(policy.model, decode=palette_decode)
    with torch.no_grad():
        out = generate(im.model.eval(), [torch.tensor(p) for p in prompts], num_samples=samples, image=im,
                       generator=torch.Generator().manual_seed(seed))
    codes = im.codes([row[:n] for row, n in zip(out.completion_ids.tolist(), out.lengths.tolist())])
    pixels = im.decode(codes).float() / 255.0
    return float((pixels[..., 0].mean((1, 2)) - pixels[..., 1:].mean((1, 2, 3))).mean())


def test_grpo_raises_a_pixel_reward(janus_dir, tmp_path, one_thread):
    result = train_grpo(GRPOConfig(**_image_fields(janus_dir, _prompts_file(tmp_path), tmp_path / "run")))
    rewards = [h["reward/mean"] for h in result.history]
    assert rewards[-1] > rewards[0] + 0.2, rewards
    assert result.policy.image is not None and result.checkpoint is not None


def test_grpo_cfg_logps_and_text_plan_run(janus_dir, tmp_path, one_thread):
    # guidance in the rollout, the CFG-mixed log-prob in training (unconditional rows with gradient),
    # a text plan before the image, the sampler correction on: the step runs and learns something
    fields = _image_fields(janus_dir, _prompts_file(tmp_path, boi=False), tmp_path / "run", max_steps=2,
                           train_logps="cfg", is_cap=2.0, entropy_coef=0.01,
                           image_generation={"cfg_weight": 3.0, "boi_token_id": BOI, "plan": "text",
                                             "plan_max_tokens": 3})
    before = {k: v.clone() for k, v in _tiny_janus().state_dict().items()}
    result = train_grpo(GRPOConfig(**fields))
    assert result.policy.cfg_weight == 3.0
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    after = state(result.policy)
    head = "model.generation_head.vision_head.weight"
    assert not torch.equal(after[head], before[head])


@pytest.mark.parametrize("train_logps", ["conditional", "cfg"])
@pytest.mark.parametrize("plan", [0, 2])
def test_sampler_old_logps_match_the_trained_branch(janus_dir, tmp_path, one_thread, train_logps, plan):
    # old_logps: sampler with guidance w = 3: π_old is the rollout's log-prob of the branch that is
    # trained (its conditional one, or the guided one), so the first update's ratio is 1 — which also
    # checks the training log-probs against the rollout's, token by token, in both modes; with a 2-token
    # plan most rows get a forced BOI, whose recorded log-prob must be the model's too
    extra = {"plan": "text", "plan_max_tokens": plan} if plan else {}
    fields = _image_fields(janus_dir, _prompts_file(tmp_path, boi=not plan), tmp_path / "run", max_steps=1,
                           old_logps="sampler", train_logps=train_logps,
                           image_generation={"cfg_weight": 3.0, "boi_token_id": BOI, **extra})
    ratio = train_grpo(GRPOConfig(**fields)).history[0]["ratio/mean"]
    assert abs(ratio - 1.0) < 1e-4, ratio


def test_grpo_image_resume_is_bit_exact(janus_dir, tmp_path, one_thread):
    fields = dict(max_steps=4, beta=0.04, lr_scheduler="linear", save_every=2)
    data = _prompts_file(tmp_path)
    straight = train_grpo(GRPOConfig(**_image_fields(janus_dir, data, tmp_path / "a", **fields)))
    middle = tmp_path / "a" / "checkpoints" / "step-00000002"
    resumed = train_grpo(GRPOConfig(**_image_fields(janus_dir, data, tmp_path / "b", resume=str(middle), **fields)))
    assert resumed.steps == 2
    for key in ("reward/mean", "loss", "kl"):
        assert [h[key] for h in straight.history[2:]] == [h[key] for h in resumed.history], key
    for name, value in state(straight.policy).items():
        assert torch.equal(value, state(resumed.policy)[name]), name


def _image_pairs(janus, n: int, tmp_path: Path) -> Path:
    """Image pairs: of 6 random images per prompt, the reddest is chosen and the least red rejected."""
    im = image_model(janus, decode=palette_decode)
    rng = random.Random(1)
    rows = []
    for i in range(n):
        candidates = _codes(6, seed=100 + i)
        pixels = im.decode(torch.tensor(candidates) - OFFSET).float() / 255.0
        red = pixels[..., 0].mean((1, 2)) - pixels[..., 1:].mean((1, 2, 3))
        rows.append({"prompt": [1, rng.randrange(3, 60), rng.randrange(3, 60), BOI],
                     "chosen": candidates[int(red.argmax())], "rejected": candidates[int(red.argmin())]})
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def test_dpo_on_image_pairs_raises_a_pixel_reward(janus, janus_dir, tmp_path, one_thread):
    data = _image_pairs(janus, 16, tmp_path)
    prompts = [json.loads(line)["prompt"] for line in data.read_text().splitlines()[:4]]
    initial = Policy(janus, None, image_model(janus))
    config = DPOConfig(model=str(janus_dir), train_data=str(data), output_dir=str(tmp_path / "run"), batch_size=4,
                       max_steps=8, learning_rate=3e-2, lr_scheduler="constant", progress=False, beta=0.1,
                       image_generation={"boi_token_id": BOI, "decode": palette_decode})
    result = train_dpo(config)
    assert result.history[-1]["rewards/accuracies"] >= 0.75
    before, after = _mean_redness(initial, prompts, 16), _mean_redness(result.policy, prompts, 16)
    assert after > before + 0.15, (before, after)


def test_dpo_cfg_logps_and_plan_pairs_run(janus, janus_dir, tmp_path, one_thread):
    # plan text + image completions (the log-prob form of the loss), CFG-mixed training log-probs
    rows = [json.loads(line) for line in _image_pairs(janus, 8, tmp_path).read_text().splitlines()]
    for r in rows:
        r["prompt"] = r["prompt"][:-1]
        r["chosen"], r["rejected"] = [20, 21, BOI] + r["chosen"], [22, BOI] + r["rejected"]
    data = write_jsonl(tmp_path / "plan_pairs.jsonl", rows)
    config = DPOConfig(model=str(janus_dir), train_data=str(data), output_dir=str(tmp_path / "run"), batch_size=4,
                       max_steps=2, learning_rate=1e-2, lr_scheduler="constant", progress=False, train_logps="cfg",
                       image_generation={"cfg_weight": 2.0, "boi_token_id": BOI, "plan": "text",
                                         "plan_max_tokens": 4})
    result = train_dpo(config)
    assert len(result.history) == 2 and all(h["loss"] == h["loss"] for h in result.history)


def test_online_dpo_runs_on_images(janus_dir, tmp_path, one_thread):
    # prompts without the begin-of-image token: a plan-less image run appends it
    fields = _image_fields(janus_dir, _prompts_file(tmp_path, boi=False), tmp_path / "run", max_steps=2,
                           log_completions=2)
    result = train_online_dpo(OnlineDPOConfig(**fields))
    assert len(result.history) == 2 and result.history[-1]["pairs"] > 0
    sample = json.loads((tmp_path / "run" / "completions.jsonl").read_text().splitlines()[0])
    assert sample["prompt"][-1] == BOI and len(sample["completion"]) == N


def test_sft_on_images_lowers_the_nll(janus, janus_dir, tmp_path, one_thread):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]}
            for r in map(json.loads, _image_pairs(janus, 8, tmp_path).read_text().splitlines())]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    result = train_sft(SFTConfig(model=str(janus_dir), train_data=str(data), output_dir=str(tmp_path / "run"),
                                 batch_size=4, max_steps=6, learning_rate=1e-2, lr_scheduler="constant",
                                 progress=False, image_generation={"boi_token_id": BOI}))
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] - 0.5, losses


def test_janus_from_a_model_config(tmp_path, one_thread):
    from fastrl.rollout.image import tiny_janus_config

    cfg, _, _ = tiny_janus_config()
    fields = {k: v for k, v in cfg.to_dict().items() if k in ("model_type", "text_config", "vision_config",
                                                                "vq_config", "image_token_id")}
    rows = [{"prompt": [1, 5, BOI], "completion": c} for c in _codes(4, seed=5)]
    result = train_sft(SFTConfig(model_config=fields, train_data=str(write_jsonl(tmp_path / "d.jsonl", rows)),
                                 output_dir=str(tmp_path / "run"), batch_size=2, max_steps=1, progress=False,
                                 image_generation={"boi_token_id": BOI}))
    assert type(result.policy.model).__name__ == "JanusForConditionalGeneration"
    assert result.policy.image.codebook == CODEBOOK


# ---------------------------------------------------------------------------------------------- errors

def test_image_config_errors(tmp_path, janus_dir):
    data = _prompts_file(tmp_path)

    def grpo(**overrides):
        return GRPOConfig(**_image_fields(janus_dir, data, tmp_path / "x", **overrides))

    cases = [({"cfg_weight": -1.0}, "GRPOConfig.image_generation.cfg_weight"),
             ({"image_tokens": 0}, "GRPOConfig.image_generation.image_tokens"),
             ({"plan": "cot"}, "GRPOConfig.image_generation.plan"),
             ({"plan": "text"}, "GRPOConfig.image_generation.plan_max_tokens"),
             ({"image_token_range": [5, 5]}, "GRPOConfig.image_generation.image_token_range"),
             ({"cfg_scale": 2.0}, "GRPOConfig.image_generation: unknown key 'cfg_scale'"),
             ({"uncond_prompt": []}, "GRPOConfig.image_generation.uncond_prompt"),
             ({"plan_stop_token_ids": [2]}, "GRPOConfig.image_generation.plan_stop_token_ids: is for plan text"),
             ({"plan": "text", "plan_max_tokens": 2, "plan_stop_token_ids": ["x"]},
              "GRPOConfig.image_generation.plan_stop_token_ids: must be")]
    for value, message in cases:
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            grpo(image_generation=value)
    # ids the model cannot read as text are refused when the run starts, before any rollout
    for key, value in (("uncond_prompt", [1, 10_000]), ("uncond_prompt", [1, OFFSET + 1])):
        config = grpo(image_generation={"boi_token_id": BOI, key: value})
        with pytest.raises(ConfigError, match=rf"GRPOConfig\.image_generation\.{key}: id {value[1]} is not a text"):
            train_grpo(config)
    with pytest.raises(ConfigError, match=r"GRPOConfig\.train_logps"):
        grpo(image_generation=None, train_logps="cfg", reward_funcs=["m:f"])
    with pytest.raises(ConfigError, match=r"GRPOConfig\.train_logps"):
        grpo(train_logps="mixed")
    with pytest.raises(ConfigError, match=r"GRPOConfig\.rollout_keep_cuda_graph"):
        grpo(rollout_keep_cuda_graph=True)
    with pytest.raises(ConfigError, match=r"GRPOConfig\.image_generation\.decode"):
        grpo(image_generation={"decode": "no_colon"})
    with pytest.raises(ConfigError, match=r"GRPOConfig\.image_generation\.decode"):
        grpo(image_generation={"decode": 3})
    # a model without an image head: known from model_config, no model built
    for cls in (SFTConfig, DPOConfig):
        with pytest.raises(ConfigError, match=rf"{cls.__name__}\.image_generation: the model \(qwen2\) has no image head"):
            cls(model_config={"model_type": "qwen2"}, train_data=str(data), image_generation={})


def test_image_run_errors_at_start(tmp_path, janus_dir, one_thread):
    from fastrl.train.data import DataError

    data = _prompts_file(tmp_path)
    # more codes per image than the model has positions for
    with pytest.raises(ConfigError, match=r"GRPOConfig\.image_generation"):
        train_grpo(GRPOConfig(**_image_fields(janus_dir, data, tmp_path / "a",
                                              image_generation={"image_tokens": 400, "boi_token_id": BOI})))
    # a boi id outside the vocabulary: image_model's error, named by the config field
    with pytest.raises(ConfigError, match=r"GRPOConfig\.image_generation\.boi_token_id"):
        train_grpo(GRPOConfig(**_image_fields(janus_dir, data, tmp_path / "b",
                                              image_generation={"boi_token_id": 500})))
    # an image-pair row whose completion does not end with a whole image
    pairs = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": [1, 5, BOI], "chosen": _codes(1, 0)[0],
                                                 "rejected": [5, 6] + _codes(1, 1)[0][:-3]}] * 4)
    with pytest.raises(DataError, match="column 'rejected'"):
        train_dpo(DPOConfig(model=str(janus_dir), train_data=str(pairs), output_dir=str(tmp_path / "c"), batch_size=2,
                            progress=False, image_generation={"boi_token_id": BOI}))
    # offline image data cut by max_completion_length
    with pytest.raises(ConfigError, match=r"SFTConfig\.max_completion_length"):
        train_sft(SFTConfig(model=str(janus_dir), train_data=str(pairs), output_dir=str(tmp_path / "e"), batch_size=2,
                            progress=False, max_completion_length=8, completion_column="chosen",
                            image_generation={"boi_token_id": BOI}))
    # a pixel reward on a text-only run
    from .conftest import TINY

    text = dict(_image_fields(janus_dir, data, tmp_path / "d"), model=None, model_config=dict(TINY["qwen2"]),
                image_generation=None, max_completion_length=4)
    with pytest.raises((ConfigError, ValueError), match="redness"):
        train_grpo(GRPOConfig(**text))


def test_two_gloo_processes_match_one_on_image_pairs(janus, janus_dir, tmp_path):
    # FSDP2 over the Janus trunk's decoder layers: a 2-process DPO run on image pairs (CFG-mixed
    # log-probs, so the unconditional rows are sharded and reduced too) equals the 1-process run
    import os
    import subprocess
    import sys

    import yaml

    data = _image_pairs(janus, 8, tmp_path)
    # adam_epsilon 1e-3: Adam's first steps move each weight by about lr * sign(grad), so a gradient
    # element that is rounding noise (the 2-process sum and the 1-process sum round differently) would
    # move by ±lr in either run; with epsilon above the noise such elements move by ~lr * grad / eps
    common = dict(model=str(janus_dir), train_data=str(data), max_steps=2, learning_rate=1e-2, lr_scheduler="constant",
                  adam_epsilon=1e-3, progress=False, beta=0.1, train_logps="cfg",
                  image_generation={"cfg_weight": 2.0, "boi_token_id": BOI})
    single = train_dpo(DPOConfig(output_dir=str(tmp_path / "one"), batch_size=4, **common))
    (tmp_path / "two.yaml").write_text(yaml.safe_dump({**common, "output_dir": str(tmp_path / "two"), "batch_size": 2}))
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "fastrl", "train", "dpo", "--config", str(tmp_path / "two.yaml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for a, b in zip(single.history, records):
        for key in ("loss", "rewards/margins", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
    from safetensors.torch import load_file

    sharded = load_file(str(tmp_path / "two" / "checkpoints" / "step-00000002" / "model.safetensors"))
    for name, value in state(single.policy).items():
        torch.testing.assert_close(sharded[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("decoder", ["palette", "vq"])
def test_two_gloo_processes_run_image_grpo(janus_dir, tmp_path, decoder):
    # the image rollout under FSDP2 (weights gathered for it), a pixel reward (this file's
    # functions, named as 'module:function' in the YAML) and the update: it runs and learns; with the
    # model's own VQ-VAE decoding (weights gathered for the rewards too) it runs
    import os
    import subprocess
    import sys

    import yaml

    here = Path(__file__).resolve()
    config = _image_fields(janus_dir, _prompts_file(tmp_path), tmp_path / "two", batch_size=1, max_steps=6,
                           reward_funcs=["tests.train.test_image_train:redness"],
                           image_generation={"boi_token_id": BOI, "decode": "tests.train.test_image_train:palette_decode"}
                           if decoder == "palette" else {"boi_token_id": BOI})
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(here.parents[2])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "fastrl", "train", "grpo", "--config", str(tmp_path / "two.yaml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rewards = [json.loads(line)["reward/mean"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(rewards) == 6 and (decoder == "vq" or rewards[-1] > rewards[0] + 0.1), rewards


def test_example_config_trains_through_the_command_line(tmp_path, monkeypatch, capsys, one_thread):
    from fastrl.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # example paths are relative to the repository root
    rc = main(["train", "grpo", "--config", "examples/grpo_janus_tiny.yaml", "--output_dir", str(tmp_path),
               "--max_steps", "8", "--no_progress"])
    assert rc == 0 and "8 steps" in capsys.readouterr().out
    rewards = [json.loads(line)["reward/mean"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rewards[-1] > rewards[0] + 0.1, rewards


# ---------------------------------------------------------------------------------------------- range models

RANGE = (32, 64)  # a tiny Qwen2 whose ids [32, 64) are image codes


def test_range_model_logps_match_hf_fp64():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from .conftest import TINY

    fields = {k: v for k, v in TINY["qwen2"].items() if k != "model_type"}
    model = Qwen2ForCausalLM(Qwen2Config(**fields)).eval()
    im = image_model(model, image_token_range=list(RANGE), image_tokens=4, boi_id=31)
    ref = copy.deepcopy(model).double()
    prompts, completions = [[1, 5, 31], [1, 6, 7, 8]], [[40, 33, 63, 32], [9, 31, 50, 51, 52, 53]]
    logps = Policy(model, None, im)(pack(prompts, completions), logprob_head())
    expected = []
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            logits = ref(torch.tensor([p + c])).logits[0, len(p) - 1:-1]
            plan = len(c) - 4
            labels = torch.tensor(c)
            expected.append(torch.log_softmax(logits[:plan], -1).gather(1, labels[:plan, None])[:, 0])
            image = torch.log_softmax(logits[plan:, RANGE[0]:RANGE[1]], -1)  # over the codes only
            expected.append(image.gather(1, (labels[plan:] - RANGE[0])[:, None])[:, 0])
    torch.testing.assert_close(logps.double(), torch.cat(expected), atol=1e-4, rtol=0)


def code_fraction(prompt_ids, completion_ids):
    """A code reward for the range model: the fraction of its image's codes in the lower half."""
    return sum(RANGE[0] <= t < RANGE[0] + 16 for t in completion_ids[-4:]) / 4


def test_range_model_grpo_and_bf16_janus_run(janus_dir, tmp_path, one_thread):
    from .conftest import TINY

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": [1, 5 + i, 31]} for i in range(8)])
    result = train_grpo(GRPOConfig(model_config=dict(TINY["qwen2"]), train_data=str(data),
                                   output_dir=str(tmp_path / "range"), batch_size=2, num_generations=4, max_steps=6,
                                   learning_rate=1e-2, lr_scheduler="constant", progress=False,
                                   reward_funcs=[code_fraction], log_completions=0,
                                   image_generation={"image_token_range": list(RANGE), "image_tokens": 4,
                                                     "boi_token_id": 31}))
    rewards = [h["reward/mean"] for h in result.history]
    assert result.policy.image.kind == "range" and rewards[-1] > rewards[0] + 0.2, rewards
    # bf16 autocast over fp32 parameters, with the CFG-mixed log-prob and a text plan
    fields = _image_fields(janus_dir, _prompts_file(tmp_path, boi=False), tmp_path / "bf16", max_steps=2, bf16=True,
                           train_logps="cfg", image_generation={"cfg_weight": 2.0, "boi_token_id": BOI,
                                                                "plan": "text", "plan_max_tokens": 2})
    history = train_grpo(GRPOConfig(**fields)).history
    assert all(h["loss"] == h["loss"] and h["grad_norm"] > 0 for h in history), history
