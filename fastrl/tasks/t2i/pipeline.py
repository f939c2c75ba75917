"""The embedded demo (``fastrl demo``): SFT, then DPO and GRPO from the same SFT checkpoint, on the
text-to-image task, evaluated in-domain and out of domain. The policy is a tiny
``JanusForConditionalGeneration`` (a Llama trunk, Janus's image-generation embedding, aligner and
``gen_head`` over a 13-code codebook), images are decoded to pixels by a fixed codebook decoder and
scored from the pixels by a detector (:mod:`fastrl.tasks.t2i.pixels`). Every model is trained by
fastrl's own trainer (:func:`~fastrl.train.train_sft`, :func:`~fastrl.train.train_dpo`,
:func:`~fastrl.train.train_grpo`, and :func:`~fastrl.train.train_rm` for the learned reward) and every
sample drawn by :func:`fastrl.rollout.generate` (with ``image=``: classifier-free guidance, the image
head, the BiCoT plan).

    from fastrl.tasks.t2i.pipeline import DemoSettings, run_demo
    result = run_demo(DemoSettings.preset(quick=True), "runs/demo")
    print(result.markdown)                      # the paper-style tables; result.files: what was written

The stages, top to bottom (:func:`run_demo` calls one function each on a shared :class:`Study`):

1. **SFT** — the prompt sets (in-domain train / test, out-of-domain) and sequences from an imperfect
   teacher (:func:`~fastrl.tasks.t2i.data.sft_examples`: half of the canvases flawed; with ``cot`` a
   plan first, then ``<boi>``), written as JSONL of token ids; ``uncond_rate`` of them with the
   unconditional prompt (every prompt token but ``<bos>`` / ``<boi>`` the pad token, as Janus drops
   the condition in training, so that classifier-free guidance has an unconditional branch); a tiny
   Janus (random init, seeded) trained on them with ``train_sft``.
2. **reward** — the training reward: the detector's score of the decoded pixels, or with
   ``reward="learned"`` a tiny Bradley–Terry reward model (a Llama sequence classifier over
   :func:`~fastrl.tasks.t2i.data.reward_model_ids`) trained by ``train_rm`` with
   :func:`fastrl.losses.bradley_terry_loss` on the scorer's preferences between canvases; loaded back
   as a :class:`fastrl.train.RewardModel`, it then replaces the detector in both RL methods.
   Evaluation always uses the detector.
3. **DPO** — ``dpo_samples`` completions per training prompt sampled from the SFT model (at the CFG
   weight ``cfg_weight``), ``dpo_rounds`` times; in each group the best and the worst by the reward
   make a pair (:func:`~fastrl.tasks.t2i.data.preference_pair`); the pairs (JSONL) train ``train_dpo``
   from the SFT checkpoint.
4. **GRPO** — ``train_grpo`` from the SFT checkpoint on the training prompts, G = ``group_size`` samples
   per prompt drawn with CFG (``cfg_weight``; training scores the conditional branch's log-prob, as
   T2I-R1 does), the reward a Python callable. By default both RL methods draw about the same number
   of completions from their policy (12,960 and 12,928).
5. **evaluation** — every model samples ``eval_samples`` images per prompt of the in-domain test split
   and of the out-of-domain split (temperature ``eval_temperature``, seeded, the same random numbers
   for every model; CFG at ``cfg_weight``, and the SFT model at w = 1 too); best-of-N keeps the best
   of ``best_of_n`` SFT samples by the training reward; the detector scores them from the pixels;
   tables (pass rate, mean reward) go to ``results.md`` and ``results.json``, training curves and a
   grid of canvases to PNGs.

``architecture="llama"`` is the earlier form of the demo: a plain causal LM whose vocabulary holds the
13 cell tokens, writing ``cells <eos>`` after the prompt (no image head, no guidance); the detector
scores it the same way.

Evaluation samples at temperature 1 by default. A canvas that satisfies a prompt is a few objects on
free cells, so the likeliest token of almost every cell is "empty": greedy decoding of the SFT model
writes near-empty canvases, a pass rate near 0 that measures argmax rather than the model. Sampling
measures the distribution each method trained.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fastrl.tasks.t2i.data import plan_for, preference_pair, reward_model_ids, sample_canvas, sft_examples
from fastrl.tasks.t2i.evaluate import EvalRecord, SplitEval, evaluate, markdown_table, results_table
from fastrl.tasks.t2i.grid import COLOURS, ITEMS, Canvas, Placed
from fastrl.tasks.t2i.pixels import decode_codes, detect_completions, pixel_reward
from fastrl.tasks.t2i.prompts import PromptSpec, make_prompt_sets
from fastrl.tasks.t2i.scorer import CLUTTER_PENALTY, make_reward_fn, score_canvas
from fastrl.tasks.t2i.vocab import Vocab

__all__ = ["DemoResult", "DemoSettings", "run_demo", "scorer_reward"]

REWARDS = ("scorer", "learned")
ARCHITECTURES = ("janus", "llama")


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Every size of one demo run; :meth:`preset` gives the full and the quick run."""

    quick: bool = False
    cot: bool = False  # the model writes a plan (objects and cells) before the image tokens (BiCoT)
    reward: str = "scorer"  # "scorer" (the detector on the pixels), or "learned": a Bradley–Terry reward model
    seed: int = 0
    device: str = "auto"  # auto = cuda when available, else cpu
    # the policy: a tiny Janus (or "llama": a causal LM with the cells as words), randomly initialised
    architecture: str = "janus"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    init_std: float = 0.1  # larger than HF's 0.02: the tiny model leaves the prompt-blind plateau sooner
    # data volume: the first train_prompts training prompts (None: all of them)
    train_prompts: int | None = None
    # SFT warm-up on the imperfect teacher: many distinct canvases, few epochs (a few epochs over few
    # canvases per prompt memorise them)
    sft_samples_per_prompt: int = 48
    perfect_rate: float = 0.5
    uncond_rate: float = 0.1  # SFT rows with the unconditional prompt (Janus drops the condition so in training)
    sft_epochs: int = 4
    sft_batch: int = 32
    sft_lr: float = 3e-3
    # classifier-free guidance weight w of every rollout after SFT (DPO pairs, GRPO, evaluation); 1 = none
    # (the llama architecture has no unconditional branch: it samples unguided whatever this says)
    cfg_weight: float = 3.0
    # the training reward: (1 - w) * scorer reward (clutter penalty c per object) + w * passed
    reward_pass_weight: float = 0.5  # partial credit alone pays RL to trade clutter for coverage
    reward_clutter_penalty: float = CLUTTER_PENALTY
    sample_temperature: float = 1.0  # DPO pair sampling and GRPO rollouts
    # DPO: best vs worst of dpo_samples completions per prompt, dpo_rounds groups per prompt
    dpo_samples: int = 4
    dpo_rounds: int = 12
    dpo_beta: float = 2.0  # smaller betas let DPO drift to malformed canvases (both log-probs fall)
    dpo_lr: float = 3e-4
    dpo_epochs: int = 1
    dpo_batch: int = 16
    # GRPO: group_size completions of grpo_batch prompts per step
    group_size: int = 4
    grpo_batch: int = 16
    grpo_steps: int = 202  # 202 x 16 x 4 = 12928 completions, about DPO's 270 prompts x 12 x 4 = 12960
    grpo_lr: float = 3e-4
    grpo_beta: float = 0.0
    # learned reward model (reward="learned")
    rm_canvases_per_prompt: int = 16  # teacher canvases, as many scattered ones, and half as many SFT samples
    rm_steps: int = 600
    rm_batch: int = 64
    rm_lr: float = 2e-3
    # evaluation
    eval_samples: int = 8
    eval_temperature: float = 1.0
    best_of_n: int = 4  # the best-of-N row: the best of N SFT samples by the training reward (1: no row)
    grid_prompts: int = 3  # canvases drawn per split and method

    def __post_init__(self) -> None:
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {self.reward!r}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.group_size < 2 or self.dpo_samples < 2:
            raise ValueError("group_size and dpo_samples must be >= 2")
        if not 0.0 <= self.reward_pass_weight <= 1.0:
            raise ValueError(f"reward_pass_weight must be in [0, 1], got {self.reward_pass_weight}")
        if not 0.0 <= self.uncond_rate < 1.0:
            raise ValueError(f"uncond_rate must be in [0, 1), got {self.uncond_rate}")
        if not (isinstance(self.cfg_weight, (int, float)) and math.isfinite(self.cfg_weight) and self.cfg_weight >= 0):
            raise ValueError(f"cfg_weight must be a finite number >= 0, got {self.cfg_weight!r}")
        if self.best_of_n < 1:
            raise ValueError(f"best_of_n must be >= 1, got {self.best_of_n}")
        if self.train_prompts is not None and self.train_prompts < 1:
            raise ValueError(f"train_prompts must be >= 1 or None, got {self.train_prompts}")

    @classmethod
    def preset(cls, *, quick: bool = False, **changes: Any) -> DemoSettings:
        """The full run (``make demo``) or the quick one (``--quick``, what the tests run), then ``changes``."""
        return cls(quick=quick, **{**(QUICK if quick else {}), **changes})

    @property
    def image(self) -> bool:
        """Whether the policy is an image model (Janus) rather than a causal LM writing cells as words."""
        return self.architecture == "janus"

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: cuda was asked for, but torch sees no CUDA device")
        return self.device


QUICK: dict[str, Any] = {"sft_samples_per_prompt": 24, "dpo_rounds": 4, "grpo_steps": 68,
                         "rm_canvases_per_prompt": 8, "rm_steps": 300, "eval_samples": 4}
"""What ``--quick`` changes: fewer samples and steps; the same task, model and methods."""


@dataclasses.dataclass
class DemoResult:
    """What :func:`run_demo` returns: the tables (:func:`~fastrl.tasks.t2i.evaluate.results_table`
    layout; pass rate and mean reward), their Markdown, the per-split summaries, each stage's seconds,
    and the files written."""

    table: dict[str, Any]
    reward_table: dict[str, Any]
    markdown: str
    summaries: dict[str, dict[str, Any]]
    timings: dict[str, float]
    files: dict[str, Path]


# ---------------------------------------------------------------------------------------------- pieces

def model_config(vocab: Vocab, settings: DemoSettings, max_positions: int) -> dict[str, Any]:
    """The policy's ``model_config``: a tiny Janus (:func:`janus_model_config`), or with
    ``architecture="llama"`` a Llama over every token of the task (the cells as words)."""
    if settings.image:
        return janus_model_config(vocab, settings, max_positions)
    return llama_model_config(vocab, settings, max_positions, vocab_size=len(vocab))


def llama_model_config(vocab: Vocab, settings: DemoSettings, max_positions: int, *, vocab_size: int) -> dict[str, Any]:
    """A Llama's ``model_config`` (also the text trunk of the Janus policy)."""
    return {"model_type": "llama", "vocab_size": vocab_size, "hidden_size": settings.hidden_size,
            "intermediate_size": 2 * settings.hidden_size, "num_hidden_layers": settings.num_layers,
            "num_attention_heads": settings.num_heads, "num_key_value_heads": settings.num_heads,
            "max_position_embeddings": max_positions, "initializer_range": settings.init_std,
            "tie_word_embeddings": False, "bos_token_id": vocab.bos_id, "eos_token_id": vocab.eos_id,
            "pad_token_id": vocab.pad_id}


def janus_model_config(vocab: Vocab, settings: DemoSettings, max_positions: int) -> dict[str, Any]:
    """A tiny ``JanusConfig`` as a ``model_config`` mapping: the text trunk a Llama over the
    ``vocab.text_size`` text tokens (its lm-head writes the plan and ``<boi>``), the image head over the
    ``vocab.codebook`` cell codes, ``size * size`` image tokens per image. Every width is a multiple of
    16 (the fused losses' and the lean decoder's paths). The understanding tower (vision model) and
    the VQ-VAE are the smallest HF builds: the demo never feeds images in, and decodes codes with
    :func:`~fastrl.tasks.t2i.pixels.decode_codes`, not the VQ-VAE."""
    h, side = settings.hidden_size, vocab.grid_size
    text = {k: v for k, v in llama_model_config(vocab, settings, max_positions, vocab_size=vocab.text_size).items()
            if k != "model_type"}
    return {"model_type": "janus", "text_config": {"model_type": "llama", **text},
            "vision_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                              "image_size": 8 * side, "patch_size": 8, "projection_dim": h,
                              "num_image_tokens": side * side, "depth": 1, "mlp_ratio": 2.0},
            "vq_config": {"embed_dim": 16, "num_embeddings": vocab.codebook, "base_channels": 32,
                          "channel_multiplier": [1], "num_res_blocks": 1, "latent_channels": 32,
                          "projection_dim": h, "image_token_embed_dim": h, "num_hidden_layers": 1,
                          "initializer_range": settings.init_std},
            "image_token_id": vocab.eoi_id}  # the understanding placeholder: never in the demo's sequences


def plan_budget(vocab: Vocab) -> int:
    """Tokens a plan may take (the rollout's ``plan_max_tokens``): ``<plan>``, up to ``grid_size`` objects
    of six tokens (the teacher's longest plans list six), ``</plan>``. The ``<boi>`` after it is the
    plan's stop token when drawn within the budget, else the rollout forces it."""
    return 2 + 6 * vocab.grid_size


def completion_budget(vocab: Vocab, cot: bool, *, image: bool = False) -> int:
    """Tokens a completion may take: the image tokens (and ``<eos>`` in the text format), plus with
    ``cot`` a plan (:func:`plan_budget`, and ``<boi>`` in the image format)."""
    n = vocab.grid_size
    if image:
        return n * n + (plan_budget(vocab) + 1 if cot else 0)
    return n * n + 1 + (plan_budget(vocab) if cot else 0)


def image_generation(vocab: Vocab, settings: DemoSettings, cfg_weight: float) -> dict[str, Any] | None:
    """The trainer's ``image_generation`` mapping of an image run (None for the llama architecture)."""
    if not settings.image:
        return None
    return {"cfg_weight": float(cfg_weight), "image_tokens": vocab.grid_size ** 2,
            "plan": "text" if settings.cot else "none", "plan_max_tokens": plan_budget(vocab) if settings.cot else 0,
            "boi_token_id": vocab.boi_id, "eoi_token_id": vocab.eoi_id}


def demo_image_model(model, vocab: Vocab):
    """The Janus policy as a :class:`fastrl.rollout.image.ImageModel` whose decode is the codebook decoder."""
    from fastrl.rollout.image import image_model

    return image_model(model, image_tokens=vocab.grid_size ** 2, boi_id=vocab.boi_id, eoi_id=vocab.eoi_id,
                       pad_id=vocab.pad_id, decode=lambda codes: decode_codes(codes, size=vocab.grid_size))


def unconditional_prompt(vocab: Vocab, prompt_ids: Sequence[int]) -> list[int]:
    """Janus's unconditional prompt: every token but ``<bos>`` and ``<boi>`` replaced by ``<pad>`` (same
    length); what :meth:`fastrl.rollout.image.ImageModel.uncond_prompt` gives the rollout."""
    return [t if t in (vocab.bos_id, vocab.boi_id) else vocab.pad_id for t in prompt_ids]


def sft_rows(examples, vocab: Vocab, settings: DemoSettings) -> list[dict[str, Any]]:
    """The SFT data rows (prompt / completion ids) of ``examples`` in the policy's format. For the image
    model: ``<bos> words <sep> <boi>`` + the image, or with ``cot`` ``<bos> words <sep>`` + plan +
    ``<boi>`` + the image; a seeded ``uncond_rate`` of the rows get the unconditional prompt
    (:func:`unconditional_prompt` of the ``<boi>`` prompt) and the image alone."""
    rng = random.Random(f"{settings.seed}:uncond")
    rows = []
    for e in examples:
        row = {"text": e.prompt.text, "corruption": e.corruption, "unconditional": False}
        if not settings.image:
            row.update(prompt=list(e.prompt_ids), completion=list(e.completion_ids))
        elif rng.random() < settings.uncond_rate:
            row.update(prompt=unconditional_prompt(vocab, vocab.encode_prompt(e.prompt.text, boi=True)),
                       completion=vocab.encode_image_completion(e.canvas), unconditional=True)
        else:
            plan = plan_for(e.prompt, e.canvas) if settings.cot else None
            row.update(prompt=vocab.encode_prompt(e.prompt.text, boi=plan is None),
                       completion=vocab.encode_image_completion(e.canvas, plan))
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def load_policy(checkpoint: str | Path, device: str, settings: DemoSettings | None = None):
    """A trained checkpoint as an eval-mode Hugging Face model (a ``JanusForConditionalGeneration`` for the
    image architecture, else a causal LM)."""
    if settings is None or settings.image:
        from transformers import JanusForConditionalGeneration as auto
    else:
        from transformers import AutoModelForCausalLM as auto
    return auto.from_pretrained(checkpoint, local_files_only=True).to(device).eval()


def sample_completions(model, prompts: Sequence[Sequence[int]], vocab: Vocab, *, num_samples: int, max_new_tokens: int,
                       temperature: float, generator: torch.Generator, image=None, cfg_weight: float = 1.0,
                       plan_max_tokens: int = 0, prompts_per_call: int = 128) -> list[list[int]]:
    """``num_samples`` completions of each prompt (prompt-major) from :func:`fastrl.rollout.generate`.

    With ``image`` (an :class:`~fastrl.rollout.image.ImageModel`): the plan (up to ``plan_max_tokens``,
    ending at ``<boi>``) then the image codes, under classifier-free guidance ``cfg_weight``; else text
    completions ending at ``<eos>`` (included)."""
    from fastrl.rollout import generate

    out: list[list[int]] = []
    for start in range(0, len(prompts), prompts_per_call):
        chunk = [torch.tensor(p) for p in prompts[start:start + prompts_per_call]]
        if image is None:
            r = generate(model, chunk, max_new_tokens=max_new_tokens, num_samples=num_samples,
                         temperature=temperature, stop_token_ids=[vocab.eos_id], pad_token_id=vocab.pad_id,
                         generator=generator)
        else:
            plan = {"plan_max_tokens": plan_max_tokens, "plan_stop_token_ids": [vocab.boi_id]} if plan_max_tokens \
                else {}
            r = generate(model, chunk, image=image, cfg_weight=cfg_weight, num_samples=num_samples,
                         temperature=temperature, pad_token_id=vocab.pad_id, generator=generator, **plan)
        ids, lengths = r.completion_ids.cpu(), r.lengths.cpu().tolist()
        out += [ids[i, :n].tolist() for i, n in enumerate(lengths)]
    return out


def scorer_reward(vocab: Vocab, *, pass_weight: float = 0.0,
                  clutter_penalty: float = CLUTTER_PENALTY) -> Callable[..., list[float]]:
    """The token-level scorer as a batched reward callable named ``scorer`` (the name its metrics get), in
    the form :class:`fastrl.train.RewardModel` has too: lists of prompts and completions in, one reward
    each out. Each is ``(1 - pass_weight) * scorer reward + pass_weight * passed``
    (:func:`~fastrl.tasks.t2i.scorer.make_reward_fn`); a prompt that does not parse scores 0. The demo
    trains on :func:`~fastrl.tasks.t2i.pixels.pixel_reward` (the same rules on the detector's objects,
    equal on clean images)."""
    one = make_reward_fn(vocab, clutter_penalty=clutter_penalty, pass_weight=pass_weight)

    def scorer(prompt_ids, completion_ids, **columns) -> list[float]:
        return [one(p, c) for p, c in zip(prompt_ids, completion_ids)]

    scorer.batched = True
    return scorer


# ---------------------------------------------------------------------------------------------- reward model

Pair = tuple[list[int], list[int]]  # (chosen, rejected) reward-model inputs


def reward_model_pairs(prompts: Sequence[PromptSpec], vocab: Vocab, samples: dict[str, list[list[int]]], *,
                       canvases_per_prompt: int, seed: int) -> list[Pair]:
    """The scorer's preferences between canvases of one prompt, as reward-model inputs: per prompt,
    ``canvases_per_prompt`` teacher canvases (perfect, or flawed in one of the teacher's ways), as many
    scattered ones (:func:`scattered_canvas`: what a policy that games the reward writes), and the
    policy's completions ``samples[prompt text]``, paired at random; ties are dropped."""
    rng = random.Random(f"{seed}:reward_model")
    pairs = []
    for spec in prompts:
        prompt_ids = vocab.encode_prompt(spec.text)
        canvases = [sample_canvas(spec, rng, size=vocab.grid_size, perfect=rng.random() < 0.5)[0]
                    for _ in range(canvases_per_prompt)]
        canvases += [scattered_canvas(spec, rng, size=vocab.grid_size) for _ in range(canvases_per_prompt)]
        completions = [vocab.encode_completion(c) for c in canvases] + list(samples.get(spec.text, []))
        seqs = [reward_model_ids(vocab, prompt_ids, c) for c in completions]
        scores = [score_canvas(spec, vocab.decode_completion(s[len(prompt_ids):]).canvas).reward for s in seqs]
        order = list(range(len(seqs)))
        rng.shuffle(order)
        for a, b in zip(order[0::2], order[1::2]):
            if scores[a] != scores[b]:
                pairs.append((seqs[a], seqs[b]) if scores[a] > scores[b] else (seqs[b], seqs[a]))
    return pairs


def scattered_canvas(spec: PromptSpec, rng: random.Random, *, size: int = 6) -> Canvas:
    """Objects the prompt names (up to 8, any number of each) and up to 3 it does not, on random cells."""
    wanted = [(p.colour or rng.choice(COLOURS), p.shape)
              for p in (rng.choice(spec.objects) for _ in range(rng.randint(0, 8)))]
    others = [rng.choice(ITEMS) for _ in range(rng.randint(0, 3))]
    cells = rng.sample(range(size * size), len(wanted) + len(others))
    return Canvas.from_objects(size, [Placed(i // size, i % size, *item) for i, item in zip(cells, wanted + others)])


def pair_rows(pairs: Sequence[Pair], vocab: Vocab) -> list[dict[str, list[int]]]:
    """``pairs`` as the trainer's preference rows: the shared ``<bos> words <sep>`` prefix is the prompt,
    the two canvases (image tokens and ``<eos>``) the chosen and rejected completions."""
    rows = []
    for chosen, rejected in pairs:
        start = chosen.index(vocab.sep_id) + 1
        rows.append({"prompt": chosen[:start], "chosen": chosen[start:], "rejected": rejected[start:]})
    return rows


def pair_accuracy(reward_fn: Callable[..., list[float]], rows: Sequence[dict[str, list[int]]]) -> float:
    """The share of preference ``rows`` (:func:`pair_rows`) whose chosen completion ``reward_fn`` (a batched
    reward callable, e.g. :class:`fastrl.train.RewardModel`) scores above the rejected one."""
    prompts = [r["prompt"] for r in rows]
    chosen = reward_fn(prompts, [r["chosen"] for r in rows])
    rejected = reward_fn(prompts, [r["rejected"] for r in rows])
    return sum(c > r for c, r in zip(chosen, rejected)) / max(len(rows), 1)


# ---------------------------------------------------------------------------------------------- evaluation

def evaluate_policy(model, prompts: Sequence[PromptSpec], vocab: Vocab, settings: DemoSettings, *, max_new_tokens: int,
                    device: str, seed: int, image=None, cfg_weight: float = 1.0) -> SplitEval:
    """``eval_samples`` sampled images per prompt, scored by the detector from their pixels. Pass the same
    ``seed`` for every model: common random numbers make the comparison less noisy."""
    generator = torch.Generator(device=device).manual_seed(seed)
    plan = plan_budget(vocab) if settings.cot else 0

    def generate(batch: list[list[int]]) -> list[list[int]]:
        return sample_completions(model, batch, vocab, num_samples=1, max_new_tokens=max_new_tokens,
                                  temperature=settings.eval_temperature, generator=generator, image=image,
                                  cfg_weight=cfg_weight, plan_max_tokens=plan, prompts_per_call=512)

    return evaluate(generate, [p for p in prompts for _ in range(settings.eval_samples)], vocab, batch_size=512,
                    read=lambda completions: detect_completions(completions, vocab),
                    boi=settings.image and not settings.cot)


def best_of_n_eval(model, prompts: Sequence[PromptSpec], vocab: Vocab, settings: DemoSettings, *, max_new_tokens: int,
                   device: str, seed: int, reward: Callable[..., list[float]], image=None,
                   cfg_weight: float = 1.0) -> SplitEval:
    """Best-of-N at test time (as Image-Generation-CoT): for each of the ``eval_samples`` images per prompt,
    ``best_of_n`` are sampled and the one ``reward`` (the training reward, on the pixels) ranks first is
    kept (:func:`fastrl.train.best_of_n.best_of_n` for an image model); the kept images are scored by
    the detector as every other row is."""
    from fastrl.train.best_of_n import best_of_n

    n = settings.best_of_n
    generator = torch.Generator(device=device).manual_seed(seed)
    plan = plan_budget(vocab) if settings.cot else 0

    def generate(batch: list[list[int]]) -> list[list[int]]:
        if image is not None:
            return best_of_n(image, batch, reward, n, cfg_weight=cfg_weight, generator=generator,
                             batch_size=max(1, 512 // n), temperature=settings.eval_temperature,
                             plan_max_tokens=plan).completion_ids
        drawn = sample_completions(model, batch, vocab, num_samples=n, max_new_tokens=max_new_tokens,
                                   temperature=settings.eval_temperature, generator=generator,
                                   prompts_per_call=max(1, 512 // n))
        scores = reward([p for p in batch for _ in range(n)], drawn)
        return [drawn[i * n + max(range(n), key=lambda k: scores[i * n + k])] for i in range(len(batch))]

    return evaluate(generate, [p for p in prompts for _ in range(settings.eval_samples)], vocab, batch_size=512,
                    read=lambda completions: detect_completions(completions, vocab),
                    boi=settings.image and not settings.cot)


def grid_panels(evals: dict[str, dict[str, SplitEval]], count: int) -> dict[str, list]:
    """Per method, its first sampled canvas for ``count`` prompts of each split: the first prompt of each
    category, in category order (the same prompts for every method)."""
    panels: dict[str, list] = {}
    for method, groups in evals.items():
        items = []
        for group in ("in_domain", "ood"):
            first: dict[str, EvalRecord] = {}
            for r in groups[group].records:
                first.setdefault(r.prompt.category, r)
            items += [(r.prompt.text, r.canvas) for r in list(first.values())[:count]]
        panels[method] = items
    return panels


def image_panels(evals: dict[str, dict[str, SplitEval]], count: int, vocab: Vocab) -> dict[str, list]:
    """:func:`grid_panels`' samples as the pixels the detector saw (the codebook decoder's images)."""
    panels: dict[str, list] = {}
    for method, groups in evals.items():
        records = []
        for group in ("in_domain", "ood"):
            first: dict[str, EvalRecord] = {}
            for r in groups[group].records:
                first.setdefault(r.prompt.category, r)
            records += list(first.values())[:count]
        codes = torch.tensor([vocab.read_completion(r.completion_ids)[0] for r in records], dtype=torch.long)
        images = decode_codes(codes, size=vocab.grid_size) if records else []
        panels[method] = [(r.prompt.text, image) for r, image in zip(records, images)]
    return panels


def curve_panels(histories: dict[str, list[dict[str, Any]]],
                 rm_history: list[dict[str, float]] | None) -> dict[str, dict[str, tuple[list, list]]]:
    """Training curves from the trainers' logged histories, as moving averages (window: a twentieth of the
    run) so that the trend shows through the per-batch noise."""
    def series(history: list[dict[str, Any]], key: str) -> tuple[list, list]:
        points = [(r["step"], float(r[key])) for r in history
                  if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        window = max(1, len(points) // 20)
        values = [v for _, v in points]
        smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
                  for i in range(len(values))]
        return [s for s, _ in points], smooth

    panels = {"SFT: completion NLL (nats per token)": {"SFT": series(histories["SFT"], "loss")},
              "DPO: implicit-reward accuracy on its pairs": {"DPO": series(histories["DPO"], "rewards/accuracies")},
              "GRPO: detector reward of its rollouts": {"GRPO": series(histories["GRPO"], "reward/detector/mean")}}
    if rm_history:
        panels["Reward model: Bradley–Terry accuracy on its batches"] = {
            "reward model": series(rm_history, "rewards/accuracies")}
    return panels


# ---------------------------------------------------------------------------------------------- the run

@dataclasses.dataclass
class Study:
    """One demo run as its stages share it: the settings, the output folder, the task (vocabulary, prompt
    sets, completion budget), the trainer fields every stage passes (``common``), the detector as the
    training reward, and what the stages leave: seconds, logged histories, files and checkpoints."""

    settings: DemoSettings
    out: Path
    log: Callable[[str], None]
    device: str
    vocab: Vocab
    sets: Any  # the PromptSets of make_prompt_sets
    train_specs: list[PromptSpec]  # the training prompts used (the first train_prompts of sets.train)
    budget: int
    longest_prompt: int
    common: dict[str, Any]
    train_reward: Callable[..., list[float]]
    train_prompts: list[list[int]]
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    histories: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    files: dict[str, Path] = dataclasses.field(default_factory=dict)
    checkpoints: dict[str, Path] = dataclasses.field(default_factory=dict)

    def timed(self, stage: str, started: float) -> None:
        self.timings[stage] = time.perf_counter() - started
        self.log(f"  ({self.timings[stage]:.1f} s)")

    def load(self, method: str):
        """The checkpoint of ``method`` as an eval-mode model."""
        return load_policy(self.checkpoints[method], self.device, self.settings)

    def image(self, model):
        """``model`` as the rollout's image model (None for the llama architecture)."""
        return demo_image_model(model, self.vocab) if self.settings.image else None

    def sample(self, model, prompts: Sequence[Sequence[int]], num_samples: int, seed: int) -> list[list[int]]:
        """``num_samples`` completions per prompt at ``sample_temperature`` and ``cfg_weight``, seeded."""
        return sample_completions(model, prompts, self.vocab, num_samples=num_samples, max_new_tokens=self.budget,
                                  temperature=self.settings.sample_temperature,
                                  generator=torch.Generator(device=self.device).manual_seed(seed),
                                  image=self.image(model), cfg_weight=self.settings.cfg_weight,
                                  plan_max_tokens=plan_budget(self.vocab) if self.settings.cot else 0)


def open_study(settings: DemoSettings, out_dir: str | Path, log: Callable[[str], None]) -> Study:
    """The :class:`Study` of a run into ``out_dir``: the stage folders a previous run left there removed,
    the task's vocabulary saved as a tokenizer (every checkpoint carries it, so the RL runs open the SFT
    checkpoint as a complete model directory; the data stay token ids), and the run's header logged."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("data", "sft", "dpo", "grpo", "reward_model"):
        shutil.rmtree(out / name, ignore_errors=True)
    device = settings.resolved_device()
    vocab = Vocab()
    sets = make_prompt_sets(seed=settings.seed)
    train_specs = list(sets.train[:settings.train_prompts] if settings.train_prompts else sets.train)
    boi = settings.image and not settings.cot
    # with a plan the conditional prompts have no <boi>, the SFT data's unconditional prompts do
    longest_prompt = max(len(vocab.encode_prompt(p.text, boi=settings.image)) for p in sets.train + sets.test + sets.ood)
    budget = completion_budget(vocab, settings.cot, image=settings.image)
    tokenizer_dir = out / "data" / "tokenizer"
    vocab.hf_tokenizer().save_pretrained(tokenizer_dir)
    common = {"tokenizer": str(tokenizer_dir), "max_prompt_length": longest_prompt, "max_completion_length": budget,
              "device": device, "seed": settings.seed, "progress": True, "keep_checkpoints": 1, "log_every": 1,
              "lr_scheduler": "cosine"}
    train_reward = pixel_reward(vocab, pass_weight=settings.reward_pass_weight,
                                clutter_penalty=settings.reward_clutter_penalty)
    run = ", ".join(x for x in ("quick run" if settings.quick else "full run", "plan first (--cot)" if settings.cot
                                else "", f"training reward: {settings.reward}", f"seed {settings.seed}",
                                f"device {device}") if x)
    policy = (f"Janus (Llama trunk, hidden {settings.hidden_size}, {settings.num_layers} layers; image head over "
              f"{vocab.codebook} codes, {vocab.grid_size ** 2} image tokens), random init; CFG weight "
              f"{settings.cfg_weight:g}" if settings.image else
              f"Llama, hidden {settings.hidden_size}, {settings.num_layers} layers, random init")
    log(f"fastrl demo ({run})\nSFT, then DPO and GRPO from the same SFT checkpoint; images decoded to pixels and "
        f"scored by the detector.\nTask: {vocab.grid_size}x{vocab.grid_size} canvas, {len(vocab)} tokens; prompts: "
        f"{len(train_specs)} train, {len(sets.test)} in-domain test, {len(sets.ood)} out-of-domain. Policy: {policy}. "
        f"Output: {out}")
    return Study(settings=settings, out=out, log=log, device=device, vocab=vocab, sets=sets, train_specs=train_specs,
                 budget=budget, longest_prompt=longest_prompt, common=common, train_reward=train_reward,
                 train_prompts=[vocab.encode_prompt(p.text, boi=boi) for p in train_specs])


def sft_stage(study: Study):
    """1. SFT on the imperfect teacher's sequences (``train_sft``); returns the SFT model (eval mode)."""
    from fastrl.train import SFTConfig, train_sft

    settings, vocab, out = study.settings, study.vocab, study.out
    started = time.perf_counter()
    examples = sft_examples(study.train_specs, vocab, perfect_rate=settings.perfect_rate, cot=settings.cot,
                            samples_per_prompt=settings.sft_samples_per_prompt, seed=settings.seed)
    rows = sft_rows(examples, vocab, settings)
    study.files["sft_data"] = write_jsonl(out / "data" / "sft.jsonl", rows)
    steps = settings.sft_epochs * (len(rows) // settings.sft_batch)
    uncond = sum(r["unconditional"] for r in rows)
    study.log(f"\n[1/5] SFT: {len(rows)} teacher sequences ({sum(e.perfect for e in examples)} perfect, the rest "
              f"flawed{', each with its plan' if settings.cot else ''}"
              f"{f'; {uncond} with the unconditional prompt' if settings.image else ''}), {steps} steps of "
              f"{settings.sft_batch}")
    image = image_generation(vocab, settings, 1.0)
    result = train_sft(SFTConfig(
        model_config=model_config(vocab, settings, _positions(study.longest_prompt + study.budget)),
        train_data=str(study.files["sft_data"]), output_dir=str(out / "sft"), batch_size=settings.sft_batch,
        num_epochs=settings.sft_epochs, learning_rate=settings.sft_lr, warmup_steps=max(1, steps // 20),
        **({"image_generation": image} if image else {}), **study.common))
    study.histories["SFT"], study.checkpoints["SFT"] = result.history, result.checkpoint
    sft_model = study.load("SFT")
    study.timed("sft", started)
    return sft_model


def reward_stage(study: Study, sft_model) -> tuple[Callable[..., list[float]], list[dict[str, Any]] | None]:
    """2. The training reward: the detector on the pixels, or (``reward="learned"``) a Bradley–Terry reward
    model trained by ``train_rm`` on the scorer's preferences between canvases of the training prompts,
    checked on pairs of the test prompts (from the SFT checkpoint for the llama architecture; a fresh
    Llama classifier over the task's tokens for Janus, which has no sequence-classification form).
    Returns the reward callable and the reward model's logged history (None for the detector)."""
    from fastrl.train import RewardModel, RMConfig, train_rm

    settings, vocab, out = study.settings, study.vocab, study.out
    if settings.reward == "scorer":
        study.log(f"\n[2/5] training reward: the detector's score of the decoded pixels{_reward_formula(settings)}")
        return study.train_reward, None
    started = time.perf_counter()
    k = settings.rm_canvases_per_prompt // 2
    drawn = study.sample(sft_model, study.train_prompts, k, settings.seed + 101)
    samples = {p.text: drawn[i * k:(i + 1) * k] for i, p in enumerate(study.train_specs)}
    per_prompt = settings.rm_canvases_per_prompt
    rows = pair_rows(reward_model_pairs(study.train_specs, vocab, samples, canvases_per_prompt=per_prompt,
                                        seed=settings.seed), vocab)
    held_out = pair_rows(reward_model_pairs(study.sets.test, vocab, {}, canvases_per_prompt=per_prompt,
                                            seed=settings.seed + 1), vocab)
    study.files["rm_data"] = write_jsonl(out / "data" / "rm_pairs.jsonl", rows)
    start = "a Llama sequence classifier over the task's tokens" if settings.image else \
        "the SFT model with a score head"
    study.log(f"\n[2/5] training reward: a Bradley–Terry reward model ({start}), "
              f"{settings.rm_steps} steps of {settings.rm_batch} on {len(rows)} scorer preferences between canvases "
              f"of the training prompts (teacher, scattered and SFT-sampled canvases)")
    model = ({"model_config": llama_model_config(vocab, settings, _positions(study.longest_prompt + study.budget),
                                                 vocab_size=len(vocab))} if settings.image
             else {"model": str(study.checkpoints["SFT"])})
    # AdamW with decay on every matrix, 10 warm-up steps then linear decay; the score read at <eos>
    result = train_rm(RMConfig(**model, train_data=str(study.files["rm_data"]),
                               output_dir=str(out / "reward_model"), batch_size=settings.rm_batch,
                               max_steps=settings.rm_steps, learning_rate=settings.rm_lr, weight_decay=0.01,
                               warmup_steps=10, **{**study.common, "lr_scheduler": "linear"}))
    # reward_model/ itself is the model directory (config and weights of the last checkpoint)
    study.files["reward_model"] = out / "reward_model"
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(result.checkpoint / name, study.files["reward_model"] / name)
    reward_fn = RewardModel(str(study.files["reward_model"]), batch_size=256, device=study.device,
                            to_ids=lambda p, c: reward_model_ids(vocab, p, c))
    accuracy = pair_accuracy(reward_fn, held_out)
    study.log(f"  it orders {accuracy:.1%} of {len(held_out)} held-out pairs (test prompts) as the scorer does")
    (study.files["reward_model"] / "history.json").write_text(json.dumps(
        {"pairs": len(rows), "held_out_pairs": len(held_out), "held_out_accuracy": accuracy,
         "history": result.history}, indent=1), encoding="utf-8")
    study.timed("reward_model", started)
    return reward_fn, result.history


def dpo_stage(study: Study, sft_model, reward_fn: Callable[..., list[float]]) -> None:
    """3. DPO (``train_dpo``) from the SFT checkpoint on best-vs-worst pairs of SFT samples ranked by the reward."""
    from fastrl.train import DPOConfig, train_dpo

    settings, out = study.settings, study.out
    started = time.perf_counter()
    k = settings.dpo_samples
    groups = [p for p in study.train_prompts for _ in range(settings.dpo_rounds)]
    drawn = study.sample(sft_model, groups, k, settings.seed + 202)
    rewards = [float(r) for r in reward_fn([p for p in groups for _ in range(k)], drawn)]
    rows = []
    for g, prompt in enumerate(groups):
        pair = preference_pair(rewards[g * k:(g + 1) * k])
        if pair is not None:
            rows.append({"prompt": prompt, "chosen": drawn[g * k + pair[0]], "rejected": drawn[g * k + pair[1]]})
    study.files["dpo_data"] = write_jsonl(out / "data" / "dpo_pairs.jsonl", rows)
    steps = settings.dpo_epochs * (len(rows) // settings.dpo_batch)
    study.log(f"\n[3/5] DPO: {len(drawn)} completions sampled from the SFT model ({settings.dpo_rounds} groups of {k} "
              f"per prompt{_cfg(settings)}); {len(rows)} best-vs-worst pairs (groups without a preference dropped); "
              f"{steps} steps of {settings.dpo_batch} pairs, beta {settings.dpo_beta}")
    image = image_generation(study.vocab, settings, settings.cfg_weight)
    result = train_dpo(DPOConfig(model=str(study.checkpoints["SFT"]), train_data=str(study.files["dpo_data"]),
                                 output_dir=str(out / "dpo"), batch_size=settings.dpo_batch,
                                 num_epochs=settings.dpo_epochs, learning_rate=settings.dpo_lr, beta=settings.dpo_beta,
                                 warmup_steps=max(1, steps // 10), **({"image_generation": image} if image else {}),
                                 **study.common))
    study.histories["DPO"], study.checkpoints["DPO"] = result.history, result.checkpoint
    study.timed("dpo", started)


def grpo_stage(study: Study, reward_fn: Callable[..., list[float]]) -> None:
    """4. GRPO (``train_grpo``) from the SFT checkpoint: the policy's own rollouts (with CFG), G per prompt,
    the reward a callable (with a reward model, the detector rides along with weight 0: logged for the
    curves, never optimised)."""
    from fastrl.train import GRPOConfig, train_grpo

    settings, out = study.settings, study.out
    started = time.perf_counter()
    study.files["grpo_data"] = write_jsonl(out / "data" / "grpo_prompts.jsonl", [
        {"prompt": ids, "text": p.text, "category": p.category}
        for p, ids in zip(study.train_specs, study.train_prompts)])
    study.log(f"\n[4/5] GRPO: {settings.grpo_steps} steps of {settings.grpo_batch} prompts x {settings.group_size} "
              f"samples ({settings.grpo_steps * settings.grpo_batch * settings.group_size} completions"
              f"{_cfg(settings)}), beta {settings.grpo_beta}")
    scorer = settings.reward == "scorer"
    image = image_generation(study.vocab, settings, settings.cfg_weight)
    text = {} if image else {"stop_token_ids": [study.vocab.eos_id]}
    result = train_grpo(GRPOConfig(model=str(study.checkpoints["SFT"]), train_data=str(study.files["grpo_data"]),
                                   output_dir=str(out / "grpo"), batch_size=settings.grpo_batch,
                                   max_steps=settings.grpo_steps, learning_rate=settings.grpo_lr,
                                   num_generations=settings.group_size, temperature=settings.sample_temperature,
                                   beta=settings.grpo_beta,
                                   reward_funcs=[study.train_reward] if scorer else [reward_fn, study.train_reward],
                                   reward_weights=None if scorer else [1.0, 0.0],
                                   warmup_steps=max(1, settings.grpo_steps // 20),
                                   **({"image_generation": image} if image else text), **study.common))
    study.histories["GRPO"], study.checkpoints["GRPO"] = result.history, result.checkpoint
    del result
    study.timed("grpo", started)


def evaluation_stage(study: Study, sft_model) -> dict[str, dict[str, SplitEval]]:
    """5. Every model samples the in-domain test and out-of-domain prompts (the same prompts and random
    numbers for every model), scored by the detector from the pixels. Rows: the SFT model without
    guidance (image models only), the SFT model at ``cfg_weight``, its best-of-N (``best_of_n`` > 1),
    DPO and GRPO at ``cfg_weight``."""
    settings, sets = study.settings, study.sets
    started = time.perf_counter()
    w = settings.cfg_weight
    study.log(f"\n[5/5] evaluation: {settings.eval_samples} images per prompt sampled at temperature "
              f"{settings.eval_temperature}{_cfg(settings)}, scored by the detector from the pixels: {len(sets.test)} "
              f"in-domain test prompts, {len(sets.ood)} out-of-domain prompts")
    runs: list[tuple[str, Any, float, bool]] = []  # (row, model, cfg weight, best-of-N)
    if settings.image:
        runs.append(("SFT (w = 1)", sft_model, 1.0, False))
    runs.append(("SFT", sft_model, w, False))
    if settings.best_of_n > 1:
        runs.append((f"SFT best-of-{settings.best_of_n}", sft_model, w, True))
    runs += [(method, None, w, False) for method in study.checkpoints if method != "SFT"]
    evals: dict[str, dict[str, SplitEval]] = {}
    for row, model, cfg_weight, best in runs:
        model = model if model is not None else study.load(row)
        options = dict(max_new_tokens=study.budget, device=study.device, image=study.image(model),
                       cfg_weight=cfg_weight)
        evals[row] = {}
        for split, prompts, offset in (("in_domain", sets.test, 303), ("ood", sets.ood, 404)):
            if best:
                evals[row][split] = best_of_n_eval(model, prompts, study.vocab, settings, seed=settings.seed + offset,
                                                   reward=study.train_reward, **options)
            else:
                evals[row][split] = evaluate_policy(model, prompts, study.vocab, settings,
                                                    seed=settings.seed + offset, **options)
    study.timed("eval", started)
    return evals


def run_demo(settings: DemoSettings, out_dir: str | Path, *, log: Callable[[str], None] = print) -> DemoResult:
    """Run every stage (see the module docstring) into ``out_dir``; return the tables and the files written.

    The stage folders and result files a previous run left in ``out_dir`` are replaced; nothing else in
    the folder is touched."""
    study = open_study(settings, out_dir, log)
    sft_model = sft_stage(study)
    reward_fn, rm_history = reward_stage(study, sft_model)
    dpo_stage(study, sft_model, reward_fn)
    grpo_stage(study, reward_fn)
    evals = evaluation_stage(study, sft_model)

    summaries = {m: {g: s.summary() for g, s in groups.items()} for m, groups in evals.items()}
    table = results_table(summaries, metric="pass")
    reward_table = results_table(summaries, metric="reward")
    markdown = markdown_table(table) + "\n" + markdown_table(reward_table)
    study.files.update(_write_outputs(study.out, settings, table, reward_table, markdown, summaries, study.timings,
                                      study.checkpoints, curve_panels(study.histories, rm_history),
                                      grid_panels(evals, settings.grid_prompts),
                                      image_panels(evals, settings.grid_prompts, study.vocab), log))
    return DemoResult(table, reward_table, markdown, summaries, study.timings, study.files)


def _cfg(settings: DemoSettings) -> str:
    return f", CFG weight {settings.cfg_weight:g}" if settings.image else ""


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to the output folder when it lies inside it (results.json stays valid when moved)."""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _positions(tokens: int) -> int:
    return 16 * math.ceil(tokens / 16)


def _reward_formula(settings: DemoSettings) -> str:
    parts = []
    if settings.reward_clutter_penalty != CLUTTER_PENALTY:
        parts.append(f"clutter penalty {settings.reward_clutter_penalty} per object")
    if settings.reward_pass_weight:
        parts.append(f"{1 - settings.reward_pass_weight:g} x reward + {settings.reward_pass_weight:g} x passed")
    return f" ({'; '.join(parts)})" if parts else " (its reward: the share of checks that hold, minus clutter)"


def _write_outputs(out: Path, settings: DemoSettings, table, reward_table, markdown: str, summaries, timings,
                   checkpoints, curves, panels, images, log) -> dict[str, Path]:
    files = {}
    policy = (f"a tiny Janus, CFG weight {settings.cfg_weight:g} (the first row: the SFT model without guidance)"
              if settings.image else "a tiny Llama writing the cells as words")
    best = f"; best-of-{settings.best_of_n}: the best of {settings.best_of_n} SFT samples by the training reward" \
        if settings.best_of_n > 1 else ""
    header = (f"# fastrl demo results\n\nSFT, then DPO and GRPO from the same SFT checkpoint "
              f"({'quick' if settings.quick else 'full'} run; {policy}; training reward: {settings.reward}"
              f"{'; plan first (--cot)' if settings.cot else ''}; seed {settings.seed}{best}). {settings.eval_samples} "
              f"images sampled per prompt at temperature {settings.eval_temperature}, decoded to pixels and scored by "
              f"the detector. "
              f"First table: pass rate (every check holds and no clutter); second: mean reward (the share of "
              f"checks that hold, minus {CLUTTER_PENALTY} per clutter object). Each split's overall is the mean "
              f"over its categories.\n\n")
    files["results_md"] = out / "results.md"
    files["results_md"].write_text(header + markdown, encoding="utf-8")
    files["results_json"] = out / "results.json"
    files["results_json"].write_text(json.dumps(
        {"settings": dataclasses.asdict(settings), "pass": table, "reward": reward_table, "summaries": summaries,
         "checkpoints": {m: _relative(c, out) for m, c in checkpoints.items()}}, indent=1, sort_keys=True), encoding="utf-8")
    try:
        from fastrl.tasks.t2i.render import plot_training_curves, render_canvases, render_images

        files["curves_png"] = plot_training_curves(out / "reward_curves.png", curves,
                                                   title="Training curves (from the trainers' logs)")
        files["canvases_png"] = render_canvases(out / "canvases.png", panels,
                                                title="What the detector found: in-domain test prompts, then "
                                                      "out-of-domain")
        files["images_png"] = render_images(out / "images.png", images,
                                            title="The decoded images (48 x 48 pixels) of those samples")
    except ImportError as e:  # matplotlib is optional
        log(f"  no PNGs: {e}")
    return files
