"""Which attention kernel runs a packed batch, and the xformers path.

A packed batch is one row of sequences back to back whose ``position_ids`` restart at 0 for each
sequence (:func:`fastrl.train.packing.pack`). Three kernels keep the sequences apart:

- ``flash``: flash-attn's varlen kernel (transformers' ``flash_attention_2``, which derives
  ``cu_seqlens`` from the position-id restarts). Needs the ``flash-attn`` package and a GPU.
- ``xformers``: ``xformers.ops.memory_efficient_attention`` with a
  ``BlockDiagonalCausalMask.from_seqlens`` built from the same restarts (registered with
  transformers as the attention implementation :data:`XFORMERS`). Needs the ``xformers``
  package; no ``[T, T]`` mask is built.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with a dense block-diagonal
  causal mask (transformers builds it), so a packed row of T tokens costs T² positions.

``auto`` takes the first of flash, xformers, sdpa that is installed and fits: both fused kernels
need a CUDA device, flash-attn also bf16/fp16 compute (xformers runs fp32 through PyTorch's
memory-efficient kernel), xformers a model without sliding-window layers.
Asking for a kernel that is not installed is a ``ValueError`` that names the ``attention`` option
and how to install the package.

>>> select("sdpa", "cpu")
'sdpa'
>>> select("auto", "cpu")   # no GPU: the fused kernels are never chosen
'sdpa'
>>> select("fast", "cpu")
Traceback (most recent call last):
...
ValueError: attention must be one of auto, flash, xformers, sdpa; got 'fast'
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import torch

__all__ = ["ATTENTION_CHOICES", "XFORMERS", "hf_implementation", "installed", "packed_seqlens", "register_xformers",
           "select", "sliding_window_layers", "xformers_attention"]

ATTENTION_CHOICES = ("auto", "flash", "xformers", "sdpa")
# the name under which the xformers path is registered with transformers' AttentionInterface
XFORMERS = "fastrl_xformers"
HF_NAMES = {"flash": "flash_attention_2", "xformers": XFORMERS, "sdpa": "sdpa"}
PACKAGES = {"flash": ("flash-attn", "flash_attn", "pip install flash-attn --no-build-isolation"),
            "xformers": ("xformers", "xformers", "pip install --no-deps xformers (a wheel built for this torch)")}
VARLEN = ("flash_attention_2", "flash_attention_3", XFORMERS)  # HF implementations without a dense packed mask


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (looked up, not imported).

    Args:
        module: a dotted module name; one already in ``sys.modules`` counts, a ``None`` entry there
            does not.

    Returns:
        True when it can be imported.
    """
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def sliding_window_layers(config: Any) -> bool:
    """Whether a transformers config has sliding-window attention layers.

    xformers' path here builds a plain block-diagonal causal mask, so it refuses those models.

    Args:
        config: a transformers config (its text config is read for a multimodal one), or None.

    Returns:
        True when some layer is not full attention (``layer_types``) or the config turns
        ``use_sliding_window`` on with a ``sliding_window``; False for None.
    """
    if config is None:
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None)
    if layer_types:
        return any(t != "full_attention" for t in layer_types)
    return bool(getattr(text, "use_sliding_window", False) and getattr(text, "sliding_window", None))


def select(attention: str, device: torch.device | str, *, model_config: Any = None, half: bool = True) -> str:
    """The packed-attention path for ``attention`` on ``device``.

    ``auto`` takes the first of flash, xformers, sdpa that is installed and fits (see the module
    docstring).

    Args:
        attention: ``"auto"``, ``"flash"``, ``"xformers"`` or ``"sdpa"``.
        device: the training device; off CUDA ``auto`` is always sdpa.
        model_config: the transformers config, to refuse xformers for sliding-window models.
        half: the attention inputs are bf16/fp16 (flash-attn's only dtypes: ``auto`` passes it over
            for fp32).

    Returns:
        ``"flash"``, ``"xformers"`` or ``"sdpa"``.

    Raises:
        ValueError: ``attention`` is not a choice, names a kernel whose package is not installed
            (the message says how to install it), or xformers for a sliding-window model.
    """
    if not isinstance(attention, str) or attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}; got {attention!r}")
    device = torch.device(device)
    if attention == "auto":
        if device.type != "cuda":
            return "sdpa"
        if half and installed("flash_attn"):
            return "flash"
        if installed("xformers") and not sliding_window_layers(model_config):
            return "xformers"
        return "sdpa"
    if attention in PACKAGES:
        dist, module, how = PACKAGES[attention]
        if not installed(module):
            raise ValueError(f"attention={attention!r} needs the {dist} package, which is not installed: {how}; "
                             f"or set attention to auto or sdpa")
    if attention == "xformers" and sliding_window_layers(model_config):
        raise ValueError("attention='xformers' does not support models with sliding-window layers; "
                         "use attention='flash' or 'sdpa'")
    return attention


def hf_implementation(path: str) -> str:
    """The transformers ``attn_implementation`` of a path from :func:`select`.

    The xformers implementation is registered with transformers on first use.

    Args:
        path: ``"flash"``, ``"xformers"`` or ``"sdpa"``.

    Returns:
        ``"flash_attention_2"``, :data:`XFORMERS` or ``"sdpa"``.
    """
    if path == "xformers":
        register_xformers()
    return HF_NAMES[path]


# ------------------------------------------------------------------------------------------ xformers path
def register_xformers() -> None:
    """Register :func:`xformers_attention` (and its mask builder) with transformers as :data:`XFORMERS`.

    Idempotent.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(XFORMERS, xformers_attention)
    AttentionMaskInterface.register(XFORMERS, _xformers_mask)


def _xformers_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: Any = 0,
                   attention_mask: torch.Tensor | None = None, **kwargs):
    """No mask where :func:`xformers_attention` builds its own (no padding mask, queries and keys
    the same positions: a training forward or a prefill); SDPA's mask everywhere else (padding,
    decoding against a cache), where the attention falls back to SDPA."""
    if attention_mask is None and q_length == kv_length and _zero(q_offset) and _zero(kv_offset):
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def _zero(offset: Any) -> bool:
    return isinstance(offset, int) and offset == 0


_SEQLENS_CACHE: list = [None, None, None]  # (position_ids, its shape/version key, seqlens): one sync per forward


def packed_seqlens(position_ids: torch.Tensor | None, batch: int, length: int) -> list[int]:
    """Lengths of the sequences in ``batch`` rows of ``length`` positions laid end to end.

    A new sequence starts at each row start and wherever a position id is not the previous one plus
    1 (transformers' packed-sequence rule). The result for the last ``position_ids`` seen is cached
    (one device sync per forward, not one per layer).

    Args:
        position_ids: ``[batch, length]`` or ``[1, length]`` (broadcast over the rows) int64 (any
            integer dtype), or None: each row is one sequence.
        batch: the number of rows.
        length: positions per row.

    Returns:
        The sequence lengths, in order; they sum to ``batch * length``.

    Example:
        >>> packed_seqlens(torch.tensor([[0, 1, 2, 0, 1, 0]]), 1, 6)
        [3, 2, 1]
    """
    if position_ids is None:
        return [length] * batch
    key = (tuple(position_ids.shape), position_ids._version, batch, length)
    if _SEQLENS_CACHE[0] is position_ids and _SEQLENS_CACHE[1] == key:
        return _SEQLENS_CACHE[2]
    pos = position_ids.expand(batch, length)
    start = torch.ones_like(pos, dtype=torch.bool)
    start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    bounds = torch.nonzero(start.reshape(-1)).reshape(-1).tolist() + [batch * length]
    seqlens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    _SEQLENS_CACHE[:] = [position_ids, key, seqlens]
    return seqlens


def xformers_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       sliding_window: int | None = None, is_causal: bool | None = None, **kwargs):
    """A transformers attention function over xformers' memory-efficient kernel.

    Causal self-attention without a padding mask (training forwards, packed or not, and prefills)
    runs ``xformers.ops.memory_efficient_attention`` on the B·L positions as one ``[1, B·L, H, D]``
    row under ``BlockDiagonalCausalMask.from_seqlens`` of :func:`packed_seqlens`; anything else (a
    padding mask, a decode step against a cache) goes to transformers' SDPA function with the SDPA
    mask :func:`_xformers_mask` built. Grouped-query key/value heads are repeated to H (xformers'
    5-D grouped form has no backward).

    Args:
        module: the attention layer (its ``is_causal`` is read when ``is_causal`` is None).
        query: ``[B, H, L, D]`` fp32, bf16 or fp16.
        key: ``[B, Hkv, L, D]``, ``query``'s dtype, H a multiple of Hkv (``[B, Hkv, S, D]`` against
            a cache).
        value: ``[B, Hkv, L, D]``, ``query``'s dtype.
        attention_mask: the mask transformers built (e.g. bool or floating ``[B, 1, L, S]``), or
            None (the xformers path).
        dropout: attention dropout probability.
        scaling: the score scale; None: ``1 / sqrt(D)``.
        sliding_window: must be None on the xformers path.
        is_causal: None: the module's ``is_causal`` (default True).
        **kwargs: transformers' extra arguments; ``position_ids`` marks the packed sequences.

    Returns:
        ``(out, None)``: ``out`` ``[B, L, H, D]`` in ``query``'s dtype, no attention weights.

    Raises:
        ValueError: a sliding window on the xformers path.
    """
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    batch, heads, length, head_dim = query.shape
    if attention_mask is not None or key.shape[2] != length or not causal:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if sliding_window is not None:
        raise ValueError("attention='xformers' does not support sliding-window layers; use 'flash' or 'sdpa'")
    from xformers.ops import memory_efficient_attention
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask

    seqlens = packed_seqlens(kwargs.get("position_ids"), batch, length)
    bias = BlockDiagonalCausalMask.from_seqlens(seqlens, device=query.device)
    groups = heads // key.shape[1]
    q = query.transpose(1, 2).reshape(1, batch * length, heads, head_dim)
    # xformers' 5-D grouped-query form has no backward: repeat the key/value heads instead
    k, v = (t.transpose(1, 2)[:, :, :, None, :].expand(batch, length, t.shape[1], groups, t.shape[-1])
            .reshape(1, batch * length, heads, t.shape[-1]) for t in (key, value))
    out = memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout, scale=scaling)
    return out.reshape(batch, length, heads, out.shape[-1]), None
