"""Reward models of generated images: image-text scores and pairwise preferences.

Both are reward callables of :mod:`fastrl.train.rewards` whose signature names ``images``, so a run
decodes each completion's image once per step and hands the pixels (uint8 ``[N, H, W, 3]``) to
them. From Python put them in ``reward_funcs`` (or give one as ``reward_model``); in a YAML config
give ``reward_model`` as a mapping (:func:`image_reward_model`)::

    reward_model: {kind: clip, path: models/clip-vit-b32, prompt_column: caption}

- :class:`ImageTextReward` scores (image, prompt) pairs with a local Hugging Face model: built in, the
  CLIP-style image-text similarity (a model with ``get_image_features`` / ``get_text_features``:
  ``scale * cos(image embedding, text embedding)``); any other model through its forward
  (``pixel_values``, ``input_ids``, ``attention_mask`` -> one score per pair) or a ``score``
  callable.
- :class:`ImagePreferenceReward` asks a pairwise model ``P(image i preferred over image j | prompt)``
  about every two images of a group (as Pref-GRPO): its reward is each image's win rate in its group,
  and the ``pref_grpo`` advantage estimator reads its preference matrix. :class:`ScorePreference`
  turns a scorer into such a model (``sigmoid((s_i - s_j) / temperature)``, a Bradley-Terry
  preference; with a CLIP scorer it is the ``clip_preference`` kind).

Prompts reach the model as text (the data column ``prompt_column``, or the prompt ids decoded by the
run's tokenizer) tokenised by the model's own tokenizer, or, when the model has no tokenizer, as
token ids (the prompt ids themselves, or ``text_ids(prompt_ids)``). Images are resized (shortest side
to the vision model's ``image_size``, bicubic with antialiasing), centre-cropped and normalised by the
model's image mean / std (a processor's or ``preprocessor_config.json``'s, else CLIP's), or by a
``preprocess`` callable. Scoring runs on the model's device, in batches, without gradients.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CLIP_MEAN", "CLIP_STD", "KINDS", "ImagePreferenceReward", "ImageTextReward", "ScorePreference",
           "check_image_reward_spec", "image_reward_model", "pixel_values", "score_tensor"]

KINDS = ("clip", "clip_preference")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_SPEC_KEYS = {"kind", "path", "prompt_column", "scale", "temperature", "both_orders", "batch_size", "name"}


def score_tensor(result) -> torch.Tensor | None:
    """A scoring model's output as a tensor of scores (None when it holds no tensor).

    Its ``logits`` (or the output itself), the first of a tuple, ``[N, 1]`` squeezed to ``[N]``: what
    :class:`fastrl.train.rewards.RewardModel` and :class:`ImageTextReward` read.

    Args:
        result: what the model's forward returned.

    Returns:
        The scores, or None.
    """
    scores = getattr(result, "logits", result)
    if isinstance(scores, (tuple, list)):
        scores = scores[0]
    if not isinstance(scores, torch.Tensor):
        return None
    return scores[:, 0] if scores.dim() == 2 and scores.shape[1] == 1 else scores


def pixel_values(images: torch.Tensor, size: int | tuple[int, int], *, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, crop: bool = True) -> torch.Tensor:
    """A vision model's input from uint8 pixels: resize, centre crop, normalise.

    Args:
        images: ``[n, H, W, 3]`` uint8 (a decoded batch).
        size: the side of the model's input (an int: square), or ``(height, width)``.
        mean: per-channel mean of the [0, 1] pixels (CLIP's by default).
        std: per-channel std.
        crop: resize the shortest side to ``size`` then centre-crop (CLIP's preprocessing); False:
            resize straight to ``size``.

    Returns:
        ``[n, 3, h, w]`` fp32.

    Raises:
        ValueError: ``images`` not ``[n, H, W, 3]`` uint8, a ``size`` < 1, ``mean`` / ``std`` not 3
            values.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] != 3 \
            or images.dtype != torch.uint8:
        raise ValueError("images must be a uint8 [n, H, W, 3] tensor, got "
                         + (f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor)
                            else type(images).__name__))
    h, w = (size, size) if isinstance(size, numbers.Integral) else tuple(size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be >= 1, got {size!r}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std must hold 3 values (R, G, B), got {list(mean)} and {list(std)}")
    x = images.permute(0, 3, 1, 2).float() / 255.0
    if crop:
        side = images.shape[1:3]
        ratio = max(h / side[0], w / side[1])
        rh, rw = max(h, round(side[0] * ratio)), max(w, round(side[1] * ratio))
    else:
        rh, rw = h, w
    if (rh, rw) != tuple(x.shape[2:]):
        x = nn.functional.interpolate(x, size=(rh, rw), mode="bicubic", align_corners=False,
                                      antialias=rh < x.shape[2] or rw < x.shape[3]).clamp(0, 1)
    top, left = (rh - h) // 2, (rw - w) // 2
    x = x[:, :, top:top + h, left:left + w]
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def _features(out: Any) -> torch.Tensor:
    """A ``get_*_features`` result as a tensor (transformers 5 returns an output whose pooler_output is
    the projected embedding; older versions the tensor itself)."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise ValueError(f"model: get_*_features returned {type(out).__name__}, not an embedding tensor")


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _preprocess_settings(processor, path: Path | None) -> dict[str, Any]:
    """image_mean / image_std / crop size from a processor or a directory's preprocessor_config.json."""
    source: dict[str, Any] = {}
    if processor is not None:
        proc = getattr(processor, "image_processor", processor)
        source = {k: getattr(proc, k, None) for k in ("image_mean", "image_std", "crop_size", "size", "do_center_crop")}
    elif path is not None and (path / "preprocessor_config.json").is_file():
        source = json.loads((path / "preprocessor_config.json").read_text(encoding="utf-8"))
    out: dict[str, Any] = {}
    if source.get("image_mean") is not None:
        out["mean"] = tuple(float(v) for v in source["image_mean"])
    if source.get("image_std") is not None:
        out["std"] = tuple(float(v) for v in source["image_std"])
    for key in ("crop_size", "size"):
        value = source.get(key)
        if isinstance(value, dict):
            value = dict(value)
            if "height" in value and "width" in value:
                out["size"] = (int(value["height"]), int(value["width"]))
                break
            if "shortest_edge" in value:
                out["size"] = int(value["shortest_edge"])
                break
        elif isinstance(value, numbers.Integral):
            out["size"] = int(value)
            break
    if source.get("do_center_crop") is False:
        out["crop"] = False
    return out


class ImageTextReward:
    """A reward from a model that scores (image, prompt) pairs: CLIP-style similarity built in.

    Called as a batched reward, ``reward(prompt_ids, completion_ids, images, **columns) -> list[float]``
    (``images`` uint8 ``[N, H, W, 3]``); :meth:`score_images` scores pixels and prompts directly. Each
    distinct prompt's text embedding is computed once per call.

    Args:
        model: a local model directory (loaded with ``AutoModel``, e.g. a ``CLIPModel``; its
            tokenizer and ``preprocessor_config.json`` are read when present) or an ``nn.Module``.
            With ``get_image_features`` and ``get_text_features`` (CLIP, SigLIP, ...) the score is
            ``scale * cos(image, text)``; otherwise ``model(pixel_values=, input_ids=,
            attention_mask=)`` must give one score per pair (a tensor ``[n]`` / ``[n, 1]``, or
            ``.logits`` of that shape), or give ``score``.
        tokenizer: the model's own text tokenizer (prompts are then text); None: prompts go in as
            token ids.
        processor: a Hugging Face (image) processor whose ``image_mean``, ``image_std`` and crop size
            the built-in preprocessing uses (the processor itself is not called: no Pillow needed).
        preprocess: ``preprocess(images uint8 [n, H, W, 3]) -> [n, 3, h, w]`` floating, replacing the
            built-in preprocessing.
        prompt_tokenizer: the run's tokenizer, which decodes prompt ids into the text this model
            reads (when there is no ``prompt_column``).
        prompt_column: the data column holding each prompt's text (e.g. the caption), or None.
        text_ids: ``text_ids(prompt_ids) -> ids`` of the model's text vocabulary, for a model without a
            tokenizer (default: the prompt ids themselves).
        score: ``score(model, pixel_values, input_ids, attention_mask) -> [n]``, replacing the built-in
            score.
        scale: multiplies the cosine similarity (1: the cosine itself; CLIP's logits use 100).
        batch_size: images (and prompts) per forward.
        device: where a model loaded from a directory goes (a module stays where it is).
        dtype: the dtype a model loaded from a directory is read in.
        name: the reward's name (metrics ``reward/<name>/mean``).

    Raises:
        ValueError: a directory without a config.json or that does not load, something that is not an
            ``nn.Module``, a ``batch_size`` < 1, a non-finite ``scale``.
        TypeError: ``preprocess`` / ``score`` / ``text_ids`` not callable.
    """

    batched = True
    image_reward = True

    def __init__(self, model, *, tokenizer=None, processor=None, preprocess: Callable | None = None,
                 prompt_tokenizer=None, prompt_column: str | None = None, text_ids: Callable | None = None,
                 score: Callable | None = None, scale: float = 1.0, batch_size: int = 32,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, name: str = "image_text"):
        for arg, value in (("preprocess", preprocess), ("score", score), ("text_ids", text_ids)):
            if value is not None and not callable(value):
                raise TypeError(f"{arg} must be callable, got {type(value).__name__}")
        path = None
        if isinstance(model, (str, os.PathLike)):
            path = Path(model)
            if not (path / "config.json").is_file():
                raise ValueError(f"model: {str(path)!r} is not a local model directory with a config.json")
            from transformers import AutoModel

            try:
                model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype).to(device)
            except Exception as e:
                raise ValueError(f"model: cannot load {str(path)!r} with AutoModel: {e}") from e
            if tokenizer is None and (any(path.glob("tokenizer*")) or (path / "vocab.json").is_file()):
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: must be a model directory or a torch.nn.Module, got {type(model).__name__}")
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.prompt_tokenizer, self.prompt_column = tokenizer, prompt_tokenizer, prompt_column
        self.text_ids, self.score_fn, self.preprocess, self.scale = text_ids, score, preprocess, float(scale)
        self.batch_size = _positive("batch_size", batch_size)
        self.clip_like = hasattr(model, "get_image_features") and hasattr(model, "get_text_features")
        config = getattr(model, "config", None)
        vision = getattr(config, "vision_config", None)
        settings = {"size": getattr(vision, "image_size", None) or getattr(config, "image_size", None) or 224}
        settings.update(_preprocess_settings(processor, path))
        self.settings = settings
        text = getattr(config, "text_config", None) or config
        self.text_vocab = getattr(text, "vocab_size", None)
        self.text_max = getattr(text, "max_position_embeddings", None)
        pad = getattr(text, "pad_token_id", None)
        self.pad_id = pad if isinstance(pad, int) and (self.text_vocab is None or 0 <= pad < self.text_vocab) else 0
        self.__name__ = name

    def __repr__(self) -> str:
        return f"ImageTextReward({type(self.model).__name__}, name={self.__name__!r})"

    # -- inputs -----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The model's device (its first parameter's)."""
        first = next(self.model.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def _dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def prompts(self, prompt_ids: Sequence[Sequence[int]], columns: dict[str, Sequence[Any]]) -> list:
        """Each prompt in the form the model reads: its text, or its token ids (no tokenizer).

        Args:
            prompt_ids: N prompts' token ids (the run's vocabulary).
            columns: the data columns as lists (one entry per prompt).

        Returns:
            N strings, or N lists of ints.

        Raises:
            ValueError: ``prompt_column`` missing from the data or not text; a model tokenizer with no
                way to get the text (no ``prompt_column`` and no ``prompt_tokenizer``).
        """
        if self.prompt_column is not None:
            if self.prompt_column not in columns:
                raise ValueError(f"prompt_column: the data has no column {self.prompt_column!r} (columns: "
                                 f"{sorted(columns)})")
            texts = list(columns[self.prompt_column])
            if not all(isinstance(t, str) for t in texts):
                raise ValueError(f"prompt_column: column {self.prompt_column!r} must hold text")
            return texts
        if self.tokenizer is None:
            return [list(p) for p in prompt_ids]
        if self.prompt_tokenizer is None:
            raise ValueError("prompt_column: the model reads text: give prompt_column (a data column of prompt "
                             "texts) or the run's tokenizer (prompt_tokenizer) to decode the prompt ids")
        return self.prompt_tokenizer.batch_decode([list(p) for p in prompt_ids], skip_special_tokens=True)

    def _text_inputs(self, prompts: list) -> tuple[torch.Tensor, torch.Tensor]:
        if all(isinstance(p, str) for p in prompts):
            if self.tokenizer is None:
                raise ValueError("prompts: text prompts need the model's tokenizer (tokenizer=...)")
            enc = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.text_max,
                                 return_tensors="pt")
            ids = enc["input_ids"]
            mask = enc.get("attention_mask", torch.ones_like(ids))
            return ids, mask
        seqs = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                raise ValueError("prompts: give all prompts as text or all as token ids")
            ids = [int(t) for t in (self.text_ids(list(p)) if self.text_ids is not None else p)]
            if not ids:
                raise ValueError(f"prompts: prompt {i} has no tokens")
            if self.text_vocab is not None and not all(0 <= t < self.text_vocab for t in ids):
                raise ValueError(f"text_ids: prompt {i} has ids outside the model's text vocabulary "
                                 f"[0, {self.text_vocab}) (give text_ids=, or a tokenizer and text prompts)")
            if self.text_max is not None and len(ids) > self.text_max:
                raise ValueError(f"text_ids: prompt {i} has {len(ids)} tokens, more than the text model's "
                                 f"max_position_embeddings ({self.text_max})")
            seqs.append(ids)
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, :len(s)] = 1
        return ids, mask

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """The model's image input ``[n, 3, h, w]`` (its dtype) from uint8 ``[n, H, W, 3]`` pixels.

        Args:
            images: ``[n, H, W, 3]`` uint8.

        Returns:
            ``[n, 3, h, w]`` in the model's floating dtype, on the CPU.
        """
        if self.preprocess is not None:
            out = self.preprocess(images)
        else:
            out = pixel_values(images, self.settings["size"], mean=self.settings.get("mean", CLIP_MEAN),
                               std=self.settings.get("std", CLIP_STD), crop=self.settings.get("crop", True))
        return out.to(self._dtype())

    # -- scores -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def score_images(self, images: torch.Tensor, prompts: Sequence) -> torch.Tensor:
        """The score of each (image, prompt) pair.

        Args:
            images: ``[n, H, W, 3]`` uint8 pixels.
            prompts: n prompts, as text (with the model's tokenizer) or as token-id lists.

        Returns:
            ``[n]`` fp32 on the CPU.

        Raises:
            ValueError: ``images`` not ``[n, H, W, 3]`` uint8, a prompt count that is not n, a model
                output that is not one score per pair.
        """
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError("images must be a uint8 [n, H, W, 3] tensor")
        n = images.shape[0]
        if len(prompts) != n:
            raise ValueError(f"prompts: {len(prompts)} prompts for {n} images")
        if n == 0:
            return torch.zeros(0)
        keys = [p if isinstance(p, str) else tuple(int(t) for t in p) for p in prompts]
        unique = list(dict.fromkeys(keys))
        where = {k: i for i, k in enumerate(unique)}
        index = torch.tensor([where[k] for k in keys])
        device = self.device
        if self.clip_like and self.score_fn is None:
            texts = []
            for start in range(0, len(unique), self.batch_size):
                ids, mask = self._text_inputs([list(k) if isinstance(k, tuple) else k
                                               for k in unique[start:start + self.batch_size]])
                texts.append(_features(self.model.get_text_features(input_ids=ids.to(device),
                                                                    attention_mask=mask.to(device))).float())
            text = nn.functional.normalize(torch.cat(texts), dim=-1)
            out = []
            for start in range(0, n, self.batch_size):
                pv = self.pixel_values(images[start:start + self.batch_size]).to(device)
                image = nn.functional.normalize(_features(self.model.get_image_features(pixel_values=pv)).float(),
                                                dim=-1)
                out.append((image * text[index[start:start + self.batch_size].to(device)]).sum(-1) * self.scale)
            return torch.cat(out).cpu()
        ids, mask = self._text_inputs([list(k) if isinstance(k, tuple) else k for k in unique])
        out = []
        for start in range(0, n, self.batch_size):
            rows = index[start:start + self.batch_size]
            pv = self.pixel_values(images[start:start + self.batch_size]).to(device)
            args = (pv, ids[rows].to(device), mask[rows].to(device))
            if self.score_fn is not None:
                result = self.score_fn(self.model, *args)
            else:
                result = self.model(pixel_values=args[0], input_ids=args[1], attention_mask=args[2])
            scores = score_tensor(result)
            if scores is None:
                raise ValueError(f"model: returned {type(result).__name__}, not a score tensor (give score=)")
            if scores.dim() != 1 or scores.shape[0] != rows.numel():
                raise ValueError(f"model: expected one score per (image, prompt) pair ({rows.numel()}), got shape "
                                 f"{tuple(scores.shape)} (give score=)")
            out.append(scores.float())
        return torch.cat(out).cpu()

    def __call__(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], images: torch.Tensor,
                 **columns) -> list[float]:
        """The score of each completion's image against its prompt (a batched reward).

        Args:
            prompt_ids: N prompts' token ids.
            completion_ids: N completions' token ids (unused: the pixels are given).
            images: ``[N, H, W, 3]`` uint8, the completions' images.
            **columns: the data columns as lists (``prompt_column`` is read from them).

        Returns:
            N floats.
        """
        return self.score_images(images, self.prompts(prompt_ids, columns)).tolist()


class ScorePreference:
    """A pairwise preference from a per-image scorer: ``P(i over j) = sigmoid((s_i - s_j) / temperature)``.

    A Bradley-Terry preference (the stand-in the tests and the ``clip_preference`` kind use). Its
    scores are computed once per image, not once per pair.

    Args:
        scorer: an :class:`ImageTextReward` (or anything with ``score_images(images, prompts) -> [n]``).
        temperature: > 0; a smaller one makes sharper preferences.

    Raises:
        ValueError: a ``temperature`` <= 0 or not finite.
        TypeError: a ``scorer`` without ``score_images``.
    """

    def __init__(self, scorer, *, temperature: float = 1.0):
        if not callable(getattr(scorer, "score_images", None)):
            raise TypeError(f"scorer must have score_images(images, prompts), got {type(scorer).__name__}")
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.scorer, self.temperature = scorer, float(temperature)

    def scores(self, images: torch.Tensor, prompts: Sequence) -> torch.Tensor:
        """The scorer's ``[n]`` fp32 scores of ``images`` (uint8 ``[n, H, W, 3]``) against ``prompts``.

        Args:
            images: ``[n, H, W, 3]`` uint8.
            prompts: n prompts (text or token-id lists).

        Returns:
            ``[n]`` fp32.
        """
        return torch.as_tensor(self.scorer.score_images(images, prompts), dtype=torch.float32).reshape(-1)

    def from_scores(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``sigmoid((a - b) / temperature)``: the preference of scores ``a`` over ``b``, any same shape.

        Args:
            a: fp32 scores.
            b: fp32 scores, the shape of ``a``.

        Returns:
            fp32 in [0, 1], the shape of ``a``.
        """
        return torch.sigmoid((a - b) / self.temperature)

    def __call__(self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: Sequence) -> torch.Tensor:
        """``P(a preferred over b | prompt)`` per pair.

        Args:
            images_a: ``[n, H, W, 3]`` uint8.
            images_b: ``[n, H, W, 3]`` uint8.
            prompts: n prompts.

        Returns:
            ``[n]`` fp32 in [0, 1].
        """
        return self.from_scores(self.scores(images_a, prompts), self.scores(images_b, prompts))


class ImagePreferenceReward:
    """Win rates from a pairwise preference model, within each group of G images of one prompt.

    For every two images i, j of a group it asks ``prefer`` for ``P[i, j]`` = P(i preferred over j |
    prompt) (with ``both_orders``, ``(p(i, j) + 1 - p(j, i)) / 2``, which removes a model's bias for
    the first or second position; ``P[j, i] = 1 - P[i, j]``). Its reward is the win rate
    ``w_i = sum_{j != i} P[i, j] / (G - 1)`` (0.5 in a group of one), and it keeps ``P`` as
    ``last_preferences`` ``[N, G]`` (``P[i, k]`` about sample ``g G + k``), which GRPO's ``pref_grpo``
    estimator reads (:func:`fastrl.train.rewards.pairwise_preferences`): advantages
    ``(w - mean_g w) / (std_g w + eps)``, Pref-GRPO's. Under another estimator the win rates are an
    ordinary reward (with ``grpo`` the same advantages).

    Args:
        prefer: ``prefer(images_a, images_b, prompts) -> [n]`` in [0, 1] (uint8 ``[n, H, W, 3]``
            pixels, n prompts), e.g. a :class:`ScorePreference` (whose scores are then computed once
            per image).
        both_orders: ask about each pair in both orders and average.
        prompt_tokenizer: the run's tokenizer (prompts as text for ``prefer``); see
            :meth:`ImageTextReward.prompts`.
        prompt_column: the data column of the prompt texts, or None.
        batch_size: pairs per ``prefer`` call.
        name: the reward's name.

    Raises:
        TypeError: ``prefer`` not callable.
        ValueError: a ``batch_size`` < 1.
    """

    batched = True
    pairwise = True
    image_reward = True

    def __init__(self, prefer: Callable, *, both_orders: bool = True, prompt_tokenizer=None,
                 prompt_column: str | None = None, batch_size: int = 32, name: str = "image_preference"):
        if not callable(prefer):
            raise TypeError(f"prefer must be callable, got {type(prefer).__name__}")
        if not isinstance(both_orders, bool):
            raise TypeError(f"both_orders must be a bool, got {type(both_orders).__name__}")
        self.prefer, self.both_orders = prefer, both_orders
        self.prompt_tokenizer, self.prompt_column = prompt_tokenizer, prompt_column
        self.batch_size = _positive("batch_size", batch_size)
        self.last_preferences: torch.Tensor | None = None
        self.__name__ = name

    def __repr__(self) -> str:
        return f"ImagePreferenceReward({type(self.prefer).__name__}, name={self.__name__!r})"

    def _prompts(self, prompt_ids, columns) -> list:
        scorer = getattr(self.prefer, "scorer", None)
        if isinstance(scorer, ImageTextReward):  # the scorer's own rules, with this reward's text sources
            saved = scorer.prompt_tokenizer, scorer.prompt_column
            scorer.prompt_tokenizer = self.prompt_tokenizer or scorer.prompt_tokenizer
            scorer.prompt_column = self.prompt_column or scorer.prompt_column
            try:
                return scorer.prompts(prompt_ids, columns)
            finally:
                scorer.prompt_tokenizer, scorer.prompt_column = saved
        if self.prompt_column is not None:
            if self.prompt_column not in columns:
                raise ValueError(f"prompt_column: the data has no column {self.prompt_column!r}")
            return list(columns[self.prompt_column])
        if self.prompt_tokenizer is not None:
            return self.prompt_tokenizer.batch_decode([list(p) for p in prompt_ids], skip_special_tokens=True)
        return [list(p) for p in prompt_ids]

    def _pairs(self, images: torch.Tensor, prompts: list, a: list[int], b: list[int]) -> torch.Tensor:
        out = []
        for start in range(0, len(a), self.batch_size):
            ia, ib = a[start:start + self.batch_size], b[start:start + self.batch_size]
            p = torch.as_tensor(self.prefer(images[ia], images[ib], [prompts[i] for i in ia]),
                                dtype=torch.float32).reshape(-1)
            if p.numel() != len(ia):
                raise ValueError(f"prefer: returned {p.numel()} preferences for {len(ia)} pairs")
            if not bool(((p >= 0) & (p <= 1)).all()):
                raise ValueError("prefer: preferences must be probabilities in [0, 1] (NaN is not one)")
            out.append(p)
        return torch.cat(out) if out else torch.zeros(0)

    @torch.no_grad()
    def preferences(self, prompt_ids: Sequence[Sequence[int]], images: torch.Tensor, group_size: int,
                    columns: dict[str, Sequence[Any]] | None = None) -> torch.Tensor:
        """The preference matrix of N images in groups of G.

        Args:
            prompt_ids: N prompts' token ids (rows ``[g G, (g + 1) G)`` share one).
            images: ``[N, H, W, 3]`` uint8.
            group_size: G.
            columns: the data columns as lists, or None.

        Returns:
            ``[N, G]`` fp32: ``P[i, k]`` = P(sample i preferred over sample ``g G + k``), 0.5 where
            ``k`` is i itself.

        Raises:
            ValueError: N not a multiple of G; ``prefer`` giving values outside [0, 1] or a wrong count.
        """
        n, g = images.shape[0], _positive("group_size", group_size)
        if n % g:
            raise ValueError(f"group_size ({g}) must divide the number of images ({n})")
        prompts = self._prompts(prompt_ids, columns or {})
        out = torch.full((n, g), 0.5, dtype=torch.float32)
        a = [start + i for start in range(0, n, g) for i in range(g) for j in range(i + 1, g)]
        b = [start + j for start in range(0, n, g) for i in range(g) for j in range(i + 1, g)]
        if not a:
            return out
        if isinstance(self.prefer, ScorePreference):
            s = self.prefer.scores(images, prompts)
            forward = self.prefer.from_scores(s[a], s[b])
            backward = self.prefer.from_scores(s[b], s[a])
        else:
            forward = self._pairs(images, prompts, a, b)
            backward = self._pairs(images, prompts, b, a) if self.both_orders else 1 - forward
        p = (forward + 1 - backward) / 2 if self.both_orders else forward
        a_t, b_t = torch.tensor(a), torch.tensor(b)
        out[a_t, b_t % g] = p
        out[b_t, a_t % g] = 1 - p
        return out

    def __call__(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], images: torch.Tensor,
                 group_size: int | None = None, **columns) -> list[float]:
        """Each completion's win rate in its group; the matrix is kept as ``last_preferences``.

        Args:
            prompt_ids: N prompts' token ids, each repeated G times.
            completion_ids: N completions' token ids (unused: the pixels are given).
            images: ``[N, H, W, 3]`` uint8.
            group_size: G; None: the length of each run of equal prompts (which must all match).
            **columns: the data columns as lists.

        Returns:
            N floats in [0, 1].

        Raises:
            ValueError: a group whose rows do not share one prompt, or runs of unequal lengths,
                naming ``group_size``.
        """
        n = len(prompt_ids)
        if group_size is None:
            runs, start = [], 0
            for i in range(1, n + 1):
                if i == n or list(prompt_ids[i]) != list(prompt_ids[start]):
                    runs.append(i - start)
                    start = i
            if runs and len(set(runs)) != 1:
                raise ValueError(f"group_size: not given, and the runs of equal prompts have different lengths "
                                 f"{sorted(set(runs))}")
            group_size = runs[0] if runs else 1
        group_size = _positive("group_size", group_size)
        if n % group_size:
            raise ValueError(f"group_size ({group_size}) must divide the number of completions ({n})")
        for start in range(0, n, group_size):
            if any(list(prompt_ids[start + k]) != list(prompt_ids[start]) for k in range(group_size)):
                raise ValueError(f"group_size: rows {start}..{start + group_size - 1} do not share one prompt")
        matrix = self.preferences(prompt_ids, images, group_size, columns)
        self.last_preferences = matrix
        if group_size == 1:
            return [0.5] * n
        return ((matrix.sum(1) - 0.5) / (group_size - 1)).tolist()


def check_image_reward_spec(spec: Any, where: str = "reward_model") -> None:
    """Check an image reward model's config mapping without loading it.

    Args:
        spec: ``{kind: clip | clip_preference, path: DIR, prompt_column, scale, temperature,
            both_orders, batch_size, name}`` (``kind`` and ``path`` required).
        where: the config field, for the messages.

    Raises:
        ValueError: a key that is not one of those, a missing or unknown ``kind``, a ``path`` that is not a
            local model directory, a value of the wrong type; each naming ``<where>.<key>``.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: an image reward model is a mapping {{kind: ..., path: ...}}, got "
                         f"{type(spec).__name__}")
    unknown = sorted(set(map(str, spec)) - _SPEC_KEYS)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key; the keys are {', '.join(sorted(_SPEC_KEYS))}")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{where}.kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    path = spec.get("path")
    if not isinstance(path, (str, os.PathLike)) or not (Path(path) / "config.json").is_file():
        raise ValueError(f"{where}.path: {path!r} is not a local model directory with a config.json")
    for key in ("scale", "temperature"):
        value = spec.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                  or not math.isfinite(value) or (key == "temperature" and value <= 0)):
            raise ValueError(f"{where}.{key}: must be a finite number{' > 0' if key == 'temperature' else ''}, "
                             f"got {value!r}")
    if "batch_size" in spec and (isinstance(spec["batch_size"], bool) or not isinstance(spec["batch_size"], int)
                                 or spec["batch_size"] < 1):
        raise ValueError(f"{where}.batch_size: must be an int >= 1, got {spec['batch_size']!r}")
    if "both_orders" in spec and not isinstance(spec["both_orders"], bool):
        raise ValueError(f"{where}.both_orders: must be true or false, got {spec['both_orders']!r}")
    for key in ("prompt_column", "name"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise ValueError(f"{where}.{key}: must be a string, got {spec[key]!r}")


def image_reward_model(spec, *, tokenizer=None, batch_size: int = 32, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32, where: str = "reward_model"):
    """The image reward model of a config's ``reward_model`` mapping (or an object given as it is).

    Kinds: ``clip`` (:class:`ImageTextReward` on the CLIP-style model at ``path``: ``scale *`` cosine
    similarity) and ``clip_preference`` (:class:`ImagePreferenceReward` with a :class:`ScorePreference`
    on that model, ``temperature``: Pref-GRPO's win rates for the ``pref_grpo`` estimator).

    Args:
        spec: a mapping (:func:`check_image_reward_spec`), or an :class:`ImageTextReward` /
            :class:`ImagePreferenceReward` (returned as it is, given the run's tokenizer when it has
            none).
        tokenizer: the run's tokenizer (decodes prompt ids to text for a model with its own
            tokenizer).
        batch_size: images per forward (the mapping's ``batch_size`` wins).
        device: where the model runs.
        dtype: the dtype the model is read in.
        where: the config field, for the messages.

    Returns:
        An :class:`ImageTextReward` or :class:`ImagePreferenceReward`.

    Raises:
        ValueError: a bad mapping (:func:`check_image_reward_spec`) or a model that does not load.
    """
    if isinstance(spec, (ImageTextReward, ImagePreferenceReward)):
        if spec.prompt_tokenizer is None:
            spec.prompt_tokenizer = tokenizer
        return spec
    check_image_reward_spec(spec, where)
    size = spec.get("batch_size", batch_size)
    try:
        scorer = ImageTextReward(spec["path"], prompt_tokenizer=tokenizer, prompt_column=spec.get("prompt_column"),
                                 scale=spec.get("scale", 1.0), batch_size=size, device=device, dtype=dtype,
                                 name=spec.get("name") or spec["kind"])
    except ValueError as e:
        raise ValueError(f"{where}.path: {e}") from e
    if spec["kind"] == "clip":
        return scorer
    return ImagePreferenceReward(ScorePreference(scorer, temperature=spec.get("temperature", 1.0)),
                                 both_orders=spec.get("both_orders", True), prompt_tokenizer=tokenizer,
                                 prompt_column=spec.get("prompt_column"), batch_size=size,
                                 name=spec.get("name") or spec["kind"])
