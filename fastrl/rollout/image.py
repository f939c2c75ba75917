"""Image-generation models: what fastrl needs to know of a model that writes images as tokens.

An :class:`ImageModel` wraps a Hugging Face model and says how a generated image token is embedded,
which head scores image tokens, how long the image segment is and how its tokens become pixels. Two
kinds:

- ``"janus"``: :class:`transformers.JanusForConditionalGeneration` (Janus, Janus-Pro). Image codes are
  embedded by ``generation_embeddings`` then ``generation_aligner`` and scored by ``generation_head``
  (``proj_out`` -> activation -> ``vision_head``); the VQ-VAE decodes them.
- ``"range"``: a plain causal LM whose image codes are the vocabulary range ``[lo, hi)`` (the Emu3,
  Chameleon, SimpleAR, Show-o layout), with a decode callable. Image tokens are scored by the lm-head
  restricted to that range.

Ids are one space per model: text tokens keep their ids and image code ``c`` (``0 <= c < codebook``)
has the id ``offset + c`` (Janus: ``offset`` = the text vocabulary size, so its ids lie past the
lm-head; range: ``offset = lo``). The last ``image_tokens`` tokens of an image completion are its
codes (a text plan, if any, comes before them).

>>> from fastrl.rollout.image import image_model, tiny_janus
>>> im = image_model(tiny_janus(seed=0))
>>> im.kind, im.codebook, im.image_tokens, im.offset
('janus', 32, 16, 64)
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["KINDS", "ImageModel", "image_model", "tiny_janus", "tiny_janus_config"]

KINDS = ("janus", "range")


def _id(name: str, value, vocab: int | None = None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < 0 or (vocab is not None and value >= vocab):
        raise ValueError(f"{name} must be a token id in [0, {vocab}), got {value}")
    return value


def _config_id(model, name: str) -> int | None:
    """A special token id from the model's generation config (its ``generation_kwargs`` too) or config."""
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "generation_kwargs", None) or {}, gen, getattr(model, "config", None)):
        value = source.get(name) if isinstance(source, dict) else getattr(source, name, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    return None


def _to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[n, H, W, 3] floats in [-1, 1] (a VQ-VAE's output) -> uint8."""
    return ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class ImageModel:
    """A model that writes images as a fixed number of codes from a codebook; see the module docstring.

    Built by :func:`image_model` (which checks the arguments). ``trunk`` is the decoder stack whose
    forward takes ``inputs_embeds``; ``text_vocab`` the lm-head's rows.

    Args:
        kind: ``"janus"`` or ``"range"``.
        model: the Hugging Face model.
        offset: the id of image code 0 in the model's id space.
        codebook: C, the number of image codes.
        image_tokens: N, the codes of one image.
        boi_id: the begin-of-image token, or None.
        eoi_id: the end-of-image token, or None.
        bos_id: the begin-of-sequence token, or None.
        pad_id: the pad token (the unconditional prompt's filler), or None.
        decode: ``codes [n, N] int64 -> pixels [n, H, W, 3]`` (uint8, or floats in [-1, 1]), or None for
            the model's own (Janus).
    """

    def __init__(self, kind: str, model: nn.Module, *, offset: int, codebook: int, image_tokens: int,
                 boi_id: int | None, eoi_id: int | None, bos_id: int | None, pad_id: int | None,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None):
        self.kind = kind
        self.model = model
        self.offset = offset
        self.codebook = codebook
        self.image_tokens = image_tokens
        self.boi_id, self.eoi_id, self.bos_id, self.pad_id = boi_id, eoi_id, bos_id, pad_id
        self._decode = decode
        self.text_vocab = int(model.get_output_embeddings().weight.shape[0])

    def __repr__(self) -> str:
        return (f"ImageModel(kind={self.kind!r}, codebook={self.codebook}, image_tokens={self.image_tokens}, "
                f"offset={self.offset}, boi_id={self.boi_id}, eoi_id={self.eoi_id})")

    # -- modules ----------------------------------------------------------------------------------------
    @property
    def trunk(self) -> nn.Module:
        """The decoder stack (a ``LlamaModel`` for Janus): ``trunk(inputs_embeds=...)`` gives the last
        hidden states (after the final norm) that both heads read."""
        return self.model.model.language_model if self.kind == "janus" else self.model.get_decoder()

    @property
    def head_weight(self) -> torch.Tensor:
        """``[C, P]``: the last linear of the image head (Janus ``vision_head``; range: lm-head rows)."""
        if self.kind == "janus":
            return self.model.model.generation_head.vision_head.weight
        return self.model.get_output_embeddings().weight[self.offset:self.offset + self.codebook]

    @property
    def head_bias(self) -> torch.Tensor | None:
        """``[C]`` or None: that linear's bias."""
        if self.kind == "janus":
            return self.model.model.generation_head.vision_head.bias
        bias = self.model.get_output_embeddings().bias
        return None if bias is None else bias[self.offset:self.offset + self.codebook]

    # -- maps -------------------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``[..., H]`` of unified ids ``[...]`` (text and image tokens mixed).

        Args:
            ids: int64 ids; for Janus ids ``>= offset`` are image codes.
        """
        text = self.model.get_input_embeddings()
        if self.kind == "range":
            return text(ids)
        is_image = ids >= self.offset
        if not bool(is_image.any()):
            return text(ids)
        out = text(torch.where(is_image, 0, ids))
        image = self.embed_codes(ids[is_image] - self.offset)  # only the image positions go through the aligner
        return out.index_put((is_image,), image.to(out.dtype))

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``[..., H]`` of image codes ``[...]`` in ``[0, C)``."""
        if self.kind == "range":
            return self.model.get_input_embeddings()(codes + self.offset)
        inner = self.model.model
        return inner.generation_aligner(inner.generation_embeddings(codes))

    def image_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The image head's input to its last linear: ``[..., P]`` from the trunk's ``[..., H]``
        (Janus: ``act(proj_out(h))``; range: ``h`` itself)."""
        if self.kind == "range":
            return hidden
        head = self.model.model.generation_head
        return head.activation_fn(head.proj_out(hidden))

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., C]`` over the codebook from the trunk's hidden states ``[..., H]``."""
        return nn.functional.linear(self.image_hidden(hidden), self.head_weight, self.head_bias)

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The lm-head's logits ``[..., V]``."""
        return self.model.get_output_embeddings()(hidden)

    def image_rows(self, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """``[T_c]`` bool: True on the last N labels of each completion bounded by ``cu_seqlens``.

        Raises:
            ValueError: a completion shorter than N (it holds no whole image).
        """
        cu = cu_seqlens.long()
        lengths = cu[1:] - cu[:-1]
        if bool((lengths < self.image_tokens).any()):
            i = int((lengths < self.image_tokens).nonzero()[0])
            raise ValueError(f"completion {i} has {int(lengths[i])} tokens, fewer than the image's "
                             f"image_tokens ({self.image_tokens})")
        position = torch.arange(int(cu[-1]), device=cu.device)
        end = torch.repeat_interleave(cu[1:], lengths)
        return position >= end - self.image_tokens

    def codes(self, completion_ids) -> torch.Tensor:
        """``[rows, N]`` int64 codes in ``[0, C)``: the last N tokens of each completion minus ``offset``.

        Args:
            completion_ids: a list of 1-D id sequences, or a ``[rows, L]`` tensor whose rows end with
                their image (pass trimmed rows, without padding after the image).

        Raises:
            ValueError: a completion shorter than N, or a token there that is not an image code (naming
                the row).
        """
        rows = list(completion_ids) if not isinstance(completion_ids, torch.Tensor) else list(completion_ids.unbind(0))
        out = []
        for i, row in enumerate(rows):
            row = torch.as_tensor(row, dtype=torch.long).reshape(-1)
            if row.numel() < self.image_tokens:
                raise ValueError(f"completion_ids row {i} has {row.numel()} tokens, fewer than image_tokens "
                                 f"({self.image_tokens})")
            code = row[row.numel() - self.image_tokens:] - self.offset
            if bool(((code < 0) | (code >= self.codebook)).any()):
                raise ValueError(f"completion_ids row {i}: its last {self.image_tokens} tokens are not all image "
                                 f"codes (ids in [{self.offset}, {self.offset + self.codebook}))")
            out.append(code)
        if not out:
            return torch.zeros(0, self.image_tokens, dtype=torch.long)
        return torch.stack(out)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Pixels of images given as codes: uint8 ``[n, H, W, 3]``, on the CPU.

        Args:
            codes: ``[n, N]`` int64 codes in ``[0, C)``.

        Raises:
            ValueError: ``codes`` of the wrong shape or out of range; a range model without a decode
                callable.
        """
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.shape[1] != self.image_tokens:
            raise ValueError(f"codes must be a [n, {self.image_tokens}] integer tensor, got "
                             f"{tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook):
            raise ValueError(f"codes must lie in [0, {self.codebook})")
        if self._decode is not None:
            pixels = self._decode(codes)
        elif self.kind == "janus":
            device = self.model.get_input_embeddings().weight.device
            with torch.no_grad():
                pixels = _to_uint8(self.model.decode_image_tokens(codes.to(device)))
        else:
            raise ValueError("decode: a range image model needs a decode callable (codes [n, N] -> uint8 "
                             "[n, H, W, 3])")
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"decode must return [n, H, W, 3] pixels, got "
                             f"{tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__}")
        if pixels.dtype != torch.uint8:
            pixels = _to_uint8(pixels)
        return pixels.cpu()

    def uncond_prompt(self, prompt: Sequence[int]) -> list[int]:
        """Janus's unconditional prompt: every token that is neither BOS nor BOI becomes the pad token
        (same length, so positions line up with the conditional prompt)."""
        pad = self.pad_id if self.pad_id is not None else 0
        keep = {self.bos_id, self.boi_id} - {None}
        return [int(t) if int(t) in keep else pad for t in prompt]


def image_model(model, *, image_token_range: Sequence[int] | None = None, image_tokens: int | None = None,
                boi_id: int | None = None, eoi_id: int | None = None, pad_id: int | None = None,
                decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ImageModel:
    """Wrap ``model`` as an :class:`ImageModel` (an :class:`ImageModel` is returned as it is).

    Args:
        model: a ``JanusForConditionalGeneration`` (kind ``"janus"``), or a causal LM with
            ``image_token_range`` (kind ``"range"``).
        image_token_range: ``[lo, hi)``: the vocabulary ids that are image codes (range models only).
        image_tokens: N, the codes per image (Janus default: ``vision_config.num_image_tokens``, 576
            for Janus-Pro at 384x384; required for range models).
        boi_id: the begin-of-image token (default: the generation config's ``boi_token_id``).
        eoi_id: the end-of-image token (default: the generation config's ``eoi_token_id``), or None.
        pad_id: the pad token of the unconditional prompt (default: the model's pad token).
        decode: ``codes [n, N] -> pixels [n, H, W, 3]`` (uint8, or floats in [-1, 1]); Janus default:
            its VQ-VAE's ``decode_image_tokens``.

    Returns:
        An :class:`ImageModel`.

    Raises:
        ValueError: naming the argument: a model with no image head and no ``image_token_range``, a
            range outside the vocabulary or empty, ``image_tokens <= 0`` or missing, a special id out of
            range.
        TypeError: a non-int id, a ``decode`` that is not callable.
    """
    if isinstance(model, ImageModel):
        return model
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a Hugging Face model, got {type(model).__name__}")
    if decode is not None and not callable(decode):
        raise TypeError(f"decode must be callable, got {type(decode).__name__}")
    head = getattr(getattr(model, "model", None), "generation_head", None)
    text_vocab = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None \
        else None
    if text_vocab is None:
        raise ValueError("model: it has no lm-head (get_output_embeddings() is None)")
    if head is not None and image_token_range is None:
        kind, offset = "janus", text_vocab
        codebook = int(head.vision_head.out_features)
        default_tokens = getattr(getattr(model.config, "vision_config", None), "num_image_tokens", None)
    elif image_token_range is not None:
        if isinstance(image_token_range, (str, bytes)) or not isinstance(image_token_range, Sequence) \
                or len(image_token_range) != 2:
            raise ValueError(f"image_token_range must be [lo, hi), got {image_token_range!r}")
        lo, hi = (_id("image_token_range", v) for v in image_token_range)
        if not 0 <= lo < hi <= text_vocab:
            raise ValueError(f"image_token_range [{lo}, {hi}) must be a non-empty range inside the vocabulary "
                             f"[0, {text_vocab})")
        kind, offset, codebook, default_tokens = "range", lo, hi - lo, None
    else:
        raise ValueError(f"model: {type(model).__name__} has no image head (no .model.generation_head, as a "
                         "JanusForConditionalGeneration has); for a causal LM whose image codes are part of its "
                         "vocabulary give image_token_range=[lo, hi)")
    image_tokens = default_tokens if image_tokens is None else image_tokens
    if image_tokens is None:
        raise ValueError("image_tokens: give the number of codes per image (a range model has no default)")
    if isinstance(image_tokens, bool) or not isinstance(image_tokens, numbers.Integral) or image_tokens <= 0:
        raise ValueError(f"image_tokens must be a positive int, got {image_tokens!r}")
    vocab = text_vocab
    boi = _id("boi_id", boi_id if boi_id is not None else _config_id(model, "boi_token_id"), vocab)
    eoi = _id("eoi_id", eoi_id if eoi_id is not None else _config_id(model, "eoi_token_id"), vocab)
    pad = _id("pad_id", pad_id if pad_id is not None else _config_id(model, "pad_token_id"), vocab)
    bos = _config_id(model, "bos_token_id")
    return ImageModel(kind, model, offset=offset, codebook=codebook, image_tokens=int(image_tokens), boi_id=boi,
                      eoi_id=eoi, bos_id=bos, pad_id=pad, decode=decode)


def tiny_janus_config(*, vocab_size: int = 64, codebook: int = 32, image_side: int = 4, hidden_size: int = 64,
                      layers: int = 2, heads: int = 4, kv_heads: int = 2, max_positions: int = 256,
                      boi_token_id: int | None = None, eoi_token_id: int | None = None):
    """A small ``JanusConfig``: a Llama language model, ``image_side``² image tokens per image.

    Text ids: 0 pad, 1 bos, 2 eos; BOI / EOI default to the last two text ids. The VQ-VAE decodes to
    ``2 * image_side`` pixels a side (one upsampling).

    Args:
        vocab_size: the text vocabulary (lm-head rows).
        codebook: C, the image codes.
        image_side: the image is ``image_side`` x ``image_side`` codes.
        hidden_size: the language model's width (also the image head's projection width; a multiple of
            16 keeps the fused losses' fast paths).
        layers: decoder layers.
        heads: attention heads.
        kv_heads: key/value heads.
        max_positions: ``max_position_embeddings``.
        boi_token_id: the begin-of-image id (default ``vocab_size - 2``).
        eoi_token_id: the end-of-image id (default ``vocab_size - 1``).

    Returns:
        ``(config, boi_token_id, eoi_token_id)``.
    """
    from transformers import JanusConfig

    boi = vocab_size - 2 if boi_token_id is None else boi_token_id
    eoi = vocab_size - 1 if eoi_token_id is None else eoi_token_id
    config = JanusConfig(
        text_config=dict(model_type="llama", vocab_size=vocab_size, hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=max_positions, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
                           projection_dim=hidden_size, num_image_tokens=image_side * image_side, depth=1,
                           mlp_ratio=2.0),
        vq_config=dict(embed_dim=8, num_embeddings=codebook, base_channels=32, channel_multiplier=[1, 1],
                       num_res_blocks=1, latent_channels=32, num_patches=image_side, projection_dim=hidden_size,
                       image_token_embed_dim=hidden_size, num_hidden_layers=1),
        image_token_id=vocab_size - 3)
    return config, boi, eoi


def tiny_janus(*, seed: int = 0, dtype: torch.dtype = torch.float32, **config):
    """A random ``JanusForConditionalGeneration`` from :func:`tiny_janus_config`, in eval mode.

    Its generation config holds ``boi_token_id`` / ``eoi_token_id``. The image parts' weights are
    redrawn with std 0.5 so that a random model's image logits are not all ties (Janus's own init
    gives near-constant logits at this size). The global random state is left as it was.

    Args:
        seed: the weights' seed.
        dtype: the parameters' dtype.
        **config: the arguments of :func:`tiny_janus_config`.

    Returns:
        The model.
    """
    from transformers import JanusForConditionalGeneration

    cfg, boi, eoi = tiny_janus_config(**config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(cfg)
        inner = model.model
        for module in (inner.generation_embeddings, inner.generation_aligner, inner.generation_head,
                       inner.language_model.embed_tokens):
            for p in module.parameters():
                nn.init.normal_(p, std=0.5) if p.dim() > 1 else nn.init.normal_(p, std=0.1)
    gen = model.generation_config
    gen.generation_kwargs = {**(getattr(gen, "generation_kwargs", None) or {}), "boi_token_id": boi,
                             "eoi_token_id": eoi}
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = 0, 1, 2
    return model.to(dtype).eval()
