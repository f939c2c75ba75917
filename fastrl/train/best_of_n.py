"""Best-of-N at test time: sample N images per prompt and keep the one a reward scores highest.

The test-time strategy of Image-Generation-CoT (the predecessor of the DPO-vs-GRPO study): no
training, only more samples and a judge. :func:`best_of_n` draws the N images of each prompt with
:func:`fastrl.rollout.generate` (``image=``, classifier-free guidance ``cfg_weight``, an optional
text plan), decodes each image once, scores them with the rewards of :mod:`fastrl.train.rewards`
(image rewards get the pixels) and keeps, per prompt, the sample with the highest combined reward
(the first of equal ones; an unscorable sample never wins unless all are). :func:`write_best_of_n`
writes the winners as PNGs with a JSONL of every score; ``fastrl best-of-n CONFIG --n N --out DIR``
does both from a trainer config (:func:`best_of_n_from_config`).
"""

from __future__ import annotations

import json
import math
import numbers
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastrl.rollout import generate
from fastrl.rollout.image import ImageModel, image_model
from fastrl.train import rewards as rewards_lib

__all__ = ["BestOfN", "best_of_n", "best_of_n_from_config", "write_best_of_n", "write_png"]


@dataclass
class BestOfN:
    """Per prompt, the best of its N samples, and every sample's scores.

    Args:
        completion_ids: P lists: each prompt's winning completion (unified ids: plan, then codes).
        codes: ``[P, image_tokens]`` int64, the winners' image codes.
        images: ``[P, H, W, 3]`` uint8, the winners' pixels.
        scores: ``[P]`` fp32, the winners' combined reward (NaN when no sample was scorable).
        all_scores: ``[P, N]`` fp32, the combined reward of every sample.
        rewards: ``[P, N, R]`` fp32, each reward of every sample (NaN = unscorable).
        index: ``[P]`` int64, the winning sample of each prompt.
        names: the R rewards' names.
    """

    completion_ids: list[list[int]]
    codes: torch.Tensor
    images: torch.Tensor
    scores: torch.Tensor
    all_scores: torch.Tensor
    rewards: torch.Tensor
    index: torch.Tensor
    names: list[str]

    def __len__(self) -> int:
        return len(self.completion_ids)


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _rewards(reward) -> list[rewards_lib.RewardFunction]:
    specs = list(reward) if isinstance(reward, (list, tuple)) else [reward]
    if not specs:
        raise ValueError("reward: give at least one reward")
    out = [r if isinstance(r, rewards_lib.RewardFunction) else rewards_lib.reward_function(r, f"reward[{i}]")
           for i, r in enumerate(specs)]
    names = [r.name for r in out]
    if len(set(names)) != len(names):  # distinct names, as load_rewards gives them
        out = [rewards_lib.RewardFunction(**{**r.__dict__, "name": f"{r.name}_{i}"}) if names.count(r.name) > 1
               else r for i, r in enumerate(out)]
    return out


def _uncond_for(uncond, count: int):
    """``uncond_prompt_ids`` as one sequence for all prompts, or a list of one per prompt (or None)."""
    if uncond is None:
        return None
    if isinstance(uncond, torch.Tensor):
        return uncond
    items = list(uncond)
    if items and all(isinstance(u, (list, tuple, torch.Tensor)) for u in items):
        if len(items) != count:
            raise ValueError(f"uncond_prompt_ids: {len(items)} prompts for {count} prompts")
        return items
    return items


def best_of_n(model, prompts: Sequence, reward, n: int, *, cfg_weight: float = 1.0,
              generator: torch.Generator | None = None, batch_size: int = 8, temperature: float = 1.0,
              top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, columns: Sequence[dict] | None = None,
              reward_weights: Sequence[float] | None = None, uncond_prompt_ids=None, plan_max_tokens: int = 0,
              tokenizer=None, decode_batch_size: int = 16, engine: str = "auto",
              progress: Callable[[int, int], None] | None = None) -> BestOfN:
    """Sample ``n`` images of each prompt and keep the best by ``reward``.

    Prompts go through :func:`fastrl.rollout.generate` ``batch_size`` at a time (each prompt
    prefilled once, its ``n`` samples drawn together, with CFG when ``cfg_weight != 1``); every image
    is decoded once and the pixels shared by the rewards (:func:`fastrl.train.rewards.score`, with
    ``group_size = n``: a pairwise preference reward compares the n images of a prompt).

    Args:
        model: an :class:`~fastrl.rollout.image.ImageModel`, or a model it wraps
            (:func:`~fastrl.rollout.image.image_model`: a Janus).
        prompts: P prompts' token ids (lists or 1-D integer tensors), e.g. ending with the
            begin-of-image token.
        reward: a reward (a callable, ``"module:function"``, a
            :class:`~fastrl.train.rewards.RewardFunction`, e.g. an
            :class:`~fastrl.train.image_rewards.ImageTextReward`) or a list of them.
        n: N, samples per prompt (>= 1).
        cfg_weight: the classifier-free guidance weight (>= 0; 1: none).
        generator: a ``torch.Generator`` on the model's device type, for reproducible draws.
        batch_size: prompts per :func:`~fastrl.rollout.generate` call (>= 1).
        temperature: the sampling temperature (> 0 here: greedy would draw one image N times).
        top_k: top-k filter (0 = off).
        top_p: top-p filter (1 = off).
        min_p: min-p filter (0 = off).
        columns: P dicts, each prompt's data columns for the rewards (e.g. its caption), or None.
        reward_weights: one weight per reward for the combined score (default all 1).
        uncond_prompt_ids: the unconditional prompt (one id sequence, or one per prompt); default the
            image model's.
        plan_max_tokens: > 0: a text plan of at most this many tokens before each image (BiCoT).
        tokenizer: decodes each sample's plan into the ``completion`` column (text rewards), or None.
        decode_batch_size: images per decoder call.
        engine: the rollout engine (:func:`~fastrl.rollout.generate`).
        progress: ``progress(done, total)`` after each batch of prompts, or None.

    Returns:
        A :class:`BestOfN`.

    Raises:
        ValueError: ``n`` / ``batch_size`` < 1, no prompt, ``columns`` / ``reward_weights`` of the
            wrong length, ``temperature`` <= 0, and :func:`~fastrl.rollout.generate`'s and the
            rewards' errors, each naming the argument or the reward.
    """
    image = model if isinstance(model, ImageModel) else image_model(model)
    n = _positive("n", n)
    batch_size = _positive("batch_size", batch_size)
    prompts = [list(torch.as_tensor(p).reshape(-1).tolist()) if isinstance(p, torch.Tensor) else list(p)
               for p in prompts]
    if not prompts:
        raise ValueError("prompts: give at least one prompt")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise ValueError(f"temperature must be > 0 for best-of-N (greedy draws one image N times), got "
                         f"{temperature!r}")
    if columns is not None and len(columns) != len(prompts):
        raise ValueError(f"columns: {len(columns)} dicts for {len(prompts)} prompts")
    rewards = _rewards(reward)
    if reward_weights is not None and len(reward_weights) != len(rewards):
        raise ValueError(f"reward_weights: needs one weight per reward ({len(rewards)}), got {len(reward_weights)}")
    uncond = _uncond_for(uncond_prompt_ids, len(prompts))
    per_prompt_uncond = isinstance(uncond, list) and uncond and isinstance(uncond[0], (list, tuple, torch.Tensor))

    winners, codes, images, best, every, tables, picks = [], [], [], [], [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        out = generate(image.model, [torch.tensor(p, dtype=torch.long) for p in chunk], image=image, num_samples=n,
                       cfg_weight=cfg_weight, generator=generator, temperature=temperature, top_k=top_k, top_p=top_p,
                       min_p=min_p, plan_max_tokens=plan_max_tokens, engine=engine,
                       uncond_prompt_ids=uncond[start:start + batch_size] if per_prompt_uncond else uncond)
        ids, lengths = out.completion_ids.cpu(), out.lengths.cpu().tolist()
        completions = [ids[i, :length].tolist() for i, length in enumerate(lengths)]
        pixels = rewards_lib.decode_images(image, completions, batch_size=decode_batch_size)
        rows = [dict(columns[start + i // n]) if columns is not None else {} for i in range(len(completions))]
        if tokenizer is not None:
            plans = tokenizer.batch_decode([c[:max(0, len(c) - image.image_tokens)] for c in completions],
                                           skip_special_tokens=True)
            for row, plan in zip(rows, plans):
                row["completion"] = plan
        for row in rows:
            row.setdefault("finish_reason", "stop")
        table = rewards_lib.score(rewards, [chunk[i // n] for i in range(len(completions))], completions, rows,
                                  image=image, group_size=n, images=pixels)
        combined = rewards_lib.combine(table, reward_weights).view(len(chunk), n)
        pick = torch.nan_to_num(combined, nan=-math.inf).argmax(1)  # the first of equal maxima
        for p in range(len(chunk)):
            row = p * n + int(pick[p])
            winners.append(completions[row])
            images.append(pixels[row])
        codes.append(image.codes([winners[-len(chunk) + p] for p in range(len(chunk))]))
        best.append(combined.gather(1, pick[:, None])[:, 0])
        every.append(combined)
        tables.append(table.view(len(chunk), n, -1))
        picks.append(pick)
        if progress is not None:
            progress(min(start + batch_size, len(prompts)), len(prompts))
    return BestOfN(completion_ids=winners, codes=torch.cat(codes), images=torch.stack(images),
                   scores=torch.cat(best), all_scores=torch.cat(every), rewards=torch.cat(tables),
                   index=torch.cat(picks), names=[r.name for r in rewards])


# ---------------------------------------------------------------------------------------------- files

def write_png(path: str | Path, pixels: torch.Tensor) -> Path:
    """Write one RGB image as a PNG (with Pillow when installed, else a plain zlib encoder).

    Args:
        path: the file to write.
        pixels: ``[H, W, 3]`` uint8.

    Returns:
        The path written.

    Raises:
        ValueError: ``pixels`` not ``[H, W, 3]`` uint8.
    """
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 3 or pixels.shape[-1] != 3 \
            or pixels.dtype != torch.uint8:
        raise ValueError("pixels must be a uint8 [H, W, 3] tensor")
    path = Path(path)
    array = pixels.contiguous().cpu().numpy()
    try:
        from PIL import Image
    except ImportError:
        height, width = array.shape[:2]
        raw = b"".join(b"\x00" + array[y].tobytes() for y in range(height))  # filter 0 on every row

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                         + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
        return path
    Image.fromarray(array).save(path)
    return path


def write_best_of_n(result: BestOfN, out: str | Path, *, prompts: Sequence[Sequence[int]] | None = None,
                    tokenizer=None) -> dict[str, Path]:
    """Write a :class:`BestOfN` to a new directory: ``best_<i>.png`` per prompt and ``scores.jsonl``.

    Each JSONL line: ``prompt_index``, ``image`` (the PNG's name), ``best`` (the winning sample),
    ``score`` (its combined reward), ``scores`` (every sample's), ``rewards`` (the winner's, by name),
    ``completion`` (the winner's ids) and, when given, ``prompt`` (ids) and ``prompt_text``. NaN is
    written as null.

    Args:
        result: the :class:`BestOfN`.
        out: a directory that does not exist or is empty.
        prompts: the P prompts' token ids, or None.
        tokenizer: decodes them into ``prompt_text``, or None.

    Returns:
        ``{"dir": ..., "scores": ..., "images": [...]}`` of the paths written (``images`` a list).

    Raises:
        ValueError: ``out`` is a file or a non-empty directory (nothing is overwritten).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out: {str(out)!r} exists and is not an empty directory (best-of-N writes a new one)")
    out.mkdir(parents=True, exist_ok=True)

    def plain(v: float) -> float | None:
        return None if math.isnan(v) else float(v)

    written = []
    with open(out / "scores.jsonl", "w", encoding="utf-8") as f:
        for i in range(len(result)):
            name = f"best_{i:04d}.png"
            written.append(write_png(out / name, result.images[i]))
            winner = int(result.index[i])
            record = {"prompt_index": i, "image": name, "best": winner, "score": plain(float(result.scores[i])),
                      "scores": [plain(v) for v in result.all_scores[i].tolist()],
                      "rewards": {k: plain(v) for k, v in zip(result.names, result.rewards[i, winner].tolist())},
                      "completion": result.completion_ids[i]}
            if prompts is not None:
                record["prompt"] = list(prompts[i])
                if tokenizer is not None:
                    record["prompt_text"] = tokenizer.decode(list(prompts[i]), skip_special_tokens=True)
            f.write(json.dumps(record) + "\n")
    return {"dir": out, "scores": out / "scores.jsonl", "images": written}


def best_of_n_from_config(config, n: int, out: str | Path, *, num_prompts: int | None = None,
                          batch_size: int = 4, cfg_weight: float | None = None, model: str | None = None,
                          progress: Callable[[int, int], None] | None = None) -> tuple[BestOfN, dict[str, Path]]:
    """Best-of-N on a trainer config's model, prompts and rewards (``fastrl best-of-n``).

    The config's ``model`` / ``model_config`` (or ``model``, e.g. a trained checkpoint), its
    ``image_generation`` (CFG weight, plan, unconditional prompt), ``train_data`` prompts,
    ``reward_funcs`` / ``reward_model`` / ``reward_weights``, sampling settings (``temperature``,
    ``top_k``, ``top_p``, ``min_p``), ``seed`` and ``device``.

    Args:
        config: a :class:`~fastrl.train.config.GRPOConfig` (or another online config) with
            ``image_generation``.
        n: samples per prompt.
        out: the output directory (new or empty).
        num_prompts: the first this many prompts (default all).
        batch_size: prompts per generate call.
        cfg_weight: overrides ``image_generation.cfg_weight``.
        model: a local model directory replacing the config's model.
        progress: ``progress(done, total)`` after each batch, or None.

    Returns:
        ``(result, paths)``: the :class:`BestOfN` and :func:`write_best_of_n`'s paths.

    Raises:
        ValueError: a config without ``image_generation`` (naming it), a non-empty ``out``, and the
            loading errors (ConfigError, DataError, RewardError).
    """
    from fastrl.train.config import ConfigError
    from fastrl.train.data import load_prompts
    from fastrl.train.model import build_model, image_adapter, load_tokenizer
    from fastrl.train.online import load_run_rewards

    name = type(config).__name__
    if getattr(config, "image_generation", None) is None:
        raise ConfigError(f"{name}.image_generation: best-of-N samples images; set image_generation")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out: {str(out)!r} exists and is not an empty directory (best-of-N writes a new one)")
    if num_prompts is not None:
        num_prompts = _positive("num_prompts", num_prompts)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)
    source = config.tokenizer or model or config.model
    if config.tokenizer is None and source is not None and not any(
            (Path(source) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        source = None  # an image model saved without a tokenizer: the prompts are token ids
    tokenizer = load_tokenizer(source)
    net = build_model(config, device, path=model).eval()
    image = image_adapter(config, net)
    vocab = max(net.get_input_embeddings().weight.shape[0], image.offset + image.codebook)
    data = load_prompts(config, tokenizer, vocab)
    rewards = load_run_rewards(config, None, tokenizer, device)
    options = config.image_options()
    count = len(data) if num_prompts is None else min(num_prompts, len(data))
    prompts = data.prompts[:count]
    columns = [{k: v for k, v in data.rows[i].items() if k not in ("prompt_ids", "completion_ids")}
               for i in range(count)]
    generator = torch.Generator(device=device.type).manual_seed(config.seed)
    with torch.no_grad():
        result = best_of_n(image, prompts, rewards, n,
                           cfg_weight=options["cfg_weight"] if cfg_weight is None else cfg_weight,
                           generator=generator, batch_size=batch_size, temperature=config.temperature,
                           top_k=config.top_k, top_p=config.top_p, min_p=config.min_p, columns=columns,
                           reward_weights=config.reward_weights, uncond_prompt_ids=options["uncond_prompt"],
                           plan_max_tokens=options["plan_max_tokens"] if options["plan"] == "text" else 0,
                           tokenizer=tokenizer, progress=progress)
    return result, write_best_of_n(result, out, prompts=prompts, tokenizer=tokenizer)
