"""The two decoders behind :func:`fastrl.rollout.generate`: one prefill, then one step per token.

Both prefill every prompt once with the model's own forward (left-padded batch [P, Lp], Hugging Face
``DynamicCache``, logits of the last position only) and then hold ``P * G`` rows, prompt-major: the
prompt's keys and values are copied ``G`` times, once.

- :class:`LeanDecoder` (Llama, Qwen2, Qwen3, Mistral): its own static KV cache, one
  ``[N, kv_heads, L, head_dim]`` buffer per layer and a boolean mask of the slots each row may attend
  to. A step calls the model's own sub-modules (norms, projections, MLP, so LoRA or quantised linears
  still work) and does rotary embedding from a precomputed table, the cache write and the attention
  itself in a handful of ops: Hugging Face's per-step work (mask construction, cache bookkeeping,
  output dataclasses) is what costs the time at small sizes. Attention is
  ``torch.nn.functional.scaled_dot_product_attention`` with the additive mask (fp32 scores and
  softmax inside the fused kernel, whatever the model dtype). On CUDA the step is captured in CUDA
  graphs with static shapes, one graph per kv-length bucket (every ``kv_bucket`` slots, 512 by
  default): a step attends to the slots ``[0, ceil((slot + 1) / kv_bucket) * kv_bucket)``, not the
  whole cache, unwritten slots masked. The static-shape path runs the same bucketing on CPU.
- :class:`HFDecoder`: any causal LM: the model's forward with its ``DynamicCache`` each step.

Both can also run a *trunk* (the decoder stack alone, e.g. the ``LlamaModel`` inside a Janus image
model, see :mod:`fastrl.rollout.image`) with other input embeddings and output heads: ``trunk=`` names
the stack, ``modes=`` maps a mode name to ``(embed, head)`` (ids ``[n]`` -> embeddings ``[n, H]``;
hidden ``[n, H]`` -> outputs, or None for the final-norm hidden states themselves). The prefill then
runs ``trunk(inputs_embeds=embed(ids))`` and returns hidden states; each step names its mode, may
step the first ``n`` rows only, and may leave some rows' new slot masked (``live``): their position
in the sequence is not taken, so rows advance at their own pace (a row's cache may hold masked holes,
which attention skips like left padding). The ``"text"`` mode is always there: the trunk's
``embed_tokens`` and the model's lm-head. A CUDA graph is captured per kv bucket and per mode / row
count / ``live`` use (the plain text step keeps the key of its kv bucket alone).

A lean decoder can also be kept from one call to the next (:func:`kept_decoder`, freed by
:func:`release_kept`): one per model at most, reused while its rows, cache-length bucket, graph use
and the model's parameter addresses stay the same.
"""

from __future__ import annotations

import inspect
import types
import warnings
import weakref
from collections.abc import Mapping

import torch
import torch.nn.functional as F

__all__ = ["HFDecoder", "KV_BUCKET", "LEAN_MODEL_TYPES", "LeanDecoder", "hf_prefill", "kept_decoder", "kept_decoders",
           "lean_unsupported_reason", "release_kept", "trunk_prefill"]

LEAN_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
# RoPE variants whose frequencies do not depend on the sequence length (a table built once is exact).
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")
_GRAPH_LENGTH_BUCKET = 128  # CUDA-graph caches are this many slots long (rounded up): fewer re-captures
KV_BUCKET = 512  # static-shape decode attends to a multiple of this many slots (one CUDA graph per multiple)


def _cache_kwarg(model) -> str:
    """``cache`` (transformers >= 5.24) or ``past_key_values`` (before)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _cache_layers(cache):
    """(keys, values) per layer of a filled Hugging Face cache, each [P, kv_heads, Lp, head_dim]."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def hf_prefill(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
    """One forward over the left-padded prompts with the model's own ``DynamicCache``.

    Args:
        model: a Hugging Face causal LM.
        ids: ``[P, Lp]`` int64 left-padded prompt ids.
        mask: ``[P, Lp]`` int64 or bool, 1 on tokens.
        positions: ``[P, Lp]`` int64 rotary positions (counting real tokens only).

    Returns:
        ``(logits, cache)``: the last position's logits ``[P, V]`` in the model's dtype, and the filled
        ``DynamicCache``.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, _cache_kwarg(model): cache,
              "use_cache": True}
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    out = model(**kwargs)
    return out.logits[:, -1], cache


def trunk_prefill(trunk, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
    """One forward of a decoder stack over left-padded prompt embeddings with its own ``DynamicCache``.

    Args:
        trunk: a Hugging Face decoder stack (``LlamaModel``, ...) whose forward takes ``inputs_embeds``.
        embeds: ``[P, Lp, H]`` floating input embeddings (padding positions hold anything finite).
        mask: ``[P, Lp]`` int64 or bool, 1 on tokens.
        positions: ``[P, Lp]`` int64 rotary positions (counting real tokens only).

    Returns:
        ``(hidden, cache)``: the last position's final-norm hidden states ``[P, H]`` in the model's
        dtype, and the filled ``DynamicCache``.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=trunk.config)
    out = trunk(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                **{_cache_kwarg(trunk): cache})
    return out.last_hidden_state[:, -1], cache


def _parts(model, trunk):
    """(decoder stack, its config, lm-head) of a causal LM, or of a given trunk and the model's lm-head."""
    if trunk is None:
        return getattr(model, "model", None), getattr(model, "config", None), getattr(model, "lm_head", None)
    return trunk, getattr(trunk, "config", None), model.get_output_embeddings()


def lean_unsupported_reason(model, total_length: int, *, trunk=None) -> str | None:
    """Why :class:`LeanDecoder` cannot run ``model`` (None when it can).

    Args:
        model: a Hugging Face causal LM (or, with ``trunk``, the model that holds it and the lm-head).
        total_length: prompt + completion length the decode needs (a sliding window must cover it).
        trunk: the decoder stack to run instead of ``model.model`` (e.g. a Janus model's language model).

    Returns:
        A sentence, or None.
    """
    base, config, lm_head = _parts(model, trunk)
    model_type = getattr(config, "model_type", None)
    if model_type not in LEAN_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {LEAN_MODEL_TYPES}"
    if base is None or not hasattr(base, "layers") or lm_head is None:
        return "the model has no .model.layers / .lm_head"
    rope = getattr(base, "rotary_emb", None)
    if rope is None or getattr(rope, "rope_type", "default") not in _STATIC_ROPE:
        return f"rope type {getattr(rope, 'rope_type', None)!r} depends on the sequence length"
    if any(type(p).__name__ == "DTensor" for p in (model if trunk is None else base).parameters()):
        return "sharded (DTensor) parameters: their all-gather hooks sit on modules the lean step bypasses"
    for module in (base, *base.layers, *(getattr(layer, "self_attn", base) for layer in base.layers)):
        reason = _hook_reason(module)
        if reason is not None:
            return reason
    for layer in base.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")):
            return "a decoder layer lacks the Llama attention layout"
        window = getattr(attn, "sliding_window", None)
        if window is not None and window < total_length:
            return f"sliding-window attention ({window}) shorter than the sequence ({total_length})"
    return None


def _fsdp_state(hook):
    """The FSDP2 state a forward hook belongs to (``fully_shard`` registers bound methods of it), else None."""
    owner = getattr(hook, "__self__", None)
    return owner if type(owner).__name__ == "FSDPState" else None


def _hook_reason(module) -> str | None:
    """Why the hooks on ``module`` rule the lean step out (None when there are none, or only FSDP2's on
    a unit that is gathered and stays gathered through the prefill)."""
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    if hasattr(module, "_hf_hook") or any(_fsdp_state(h) is None for h in hooks):
        return f"{type(module).__name__} has forward hooks, which the lean step would bypass"
    for state in {id(s): s for s in map(_fsdp_state, hooks)}.values():
        # FSDP2's hooks gather a unit's parameters before its forward and free them after. The lean step
        # calls the unit's sub-modules, bypassing them: fine once the unit is gathered (no DTensor
        # parameters, checked above), as long as the prefill's forward, which does run them, does not
        # reshard it after (``set_reshard_after_forward(False)``, as fastrl.train.distributed.full_weights does).
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None or any(getattr(g, "post_forward_mesh_info", True) is not None for g in groups):
            return (f"{type(module).__name__} is an FSDP2 unit that reshards after its forward: gather it for the "
                    "whole rollout (unshard() and set_reshard_after_forward(False)) to run the lean step")
    return None


class LeanDecoder:
    """Static-KV decode of a Llama-family model for ``rows`` sequences of up to ``length`` tokens.

    It keeps no reference to ``model`` itself (a decoder kept for the next call must not keep it
    alive). Use: :meth:`prefill` once, then :meth:`step` per token, :meth:`release` to free the cache.

    Args:
        model: a model :func:`lean_unsupported_reason` accepts.
        rows: N, the decoded rows (``P * G``).
        length: the cache's slots (rounded up to a multiple of 128 with static shapes).
        cuda_graph: capture the step in CUDA graphs (on CUDA only).
        static_shapes: run the graphs' static-shape computation (default: with ``cuda_graph``; tests
            set it on CPU).
        kv_bucket: slots per kv-length bucket (default :data:`KV_BUCKET`, 512).
        trunk: the decoder stack to run (default ``model.model``); its lm-head stays ``model``'s.
        modes: more step modes, ``{name: (embed, head)}`` (see the module docstring); ``"text"`` is
            ``(trunk.embed_tokens, lm_head)``.

    Raises:
        ValueError: ``kv_bucket`` not a positive int.
    """

    def __init__(self, model, rows: int, length: int, *, cuda_graph: bool, static_shapes: bool | None = None,
                 kv_bucket: int | None = None, trunk=None, modes: Mapping | None = None):
        # no reference to ``model`` itself: a decoder kept for the next call must not keep it alive
        self.base, config, self.lm_head = _parts(model, trunk)
        self.modes = {"text": (self.base.embed_tokens, self.lm_head), **(modes or {})}
        self.layers = list(self.base.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.kv_heads = config.num_key_value_heads
        self.q_heads = config.num_attention_heads
        self.rows = rows
        weight = self.lm_head.weight
        self.device, self.dtype = weight.device, self.base.embed_tokens.weight.dtype
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        # static shapes: what a CUDA graph runs (slot as a tensor, the whole cache attended to). Without
        # a graph only for tests, which check on CPU the very computation the graph captures.
        self.static_shapes = self.cuda_graph if static_shapes is None else static_shapes
        if self.static_shapes:  # one graph serves every prompt length up to the bucket
            length = -(-length // _GRAPH_LENGTH_BUCKET) * _GRAPH_LENGTH_BUCKET
        self.length = length
        kv_bucket = KV_BUCKET if kv_bucket is None else kv_bucket
        if isinstance(kv_bucket, bool) or not isinstance(kv_bucket, int) or kv_bucket < 1:
            raise ValueError(f"kv_bucket must be a positive int, got {kv_bucket!r}")
        self.kv_bucket = kv_bucket
        shape = (rows, self.kv_heads, length, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        # additive attention mask shared by all layers: 0 on slots a row may attend to, -inf elsewhere
        # (one copy per KV head, so that it broadcasts in a batched matmul over rows x KV heads)
        self.bias = torch.full((rows, self.kv_heads, 1, length), float("-inf"), dtype=self.dtype, device=self.device)
        # rotary tables [L, D]; ``sin`` with its first half negated: rotate_half(x) * sin == swap_halves(x) * this
        self.cos = torch.empty(length, self.head_dim, dtype=self.dtype, device=self.device)
        self.sin = torch.empty_like(self.cos)
        # kv_len -> (CUDA graph, its logits [N, V]), one per kv-length bucket used; other modes, a part of
        # the rows or a ``live`` mask: (kv_len, mode, rows stepped, live given) -> (graph, its output)
        self._graphs = {}
        self._static = {}  # (rows stepped, live given) -> tokens, positions, slot [1], live: what graphs read
        self._pool = None  # one memory pool for all the graphs (they never run at the same time)
        self.signature = None  # what a cached decoder must match to be reused (set by the caller)

    # -- prefill --------------------------------------------------------------------------------------
    def prefill(self, model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                repeats: int, *, embed=None) -> torch.Tensor:
        """Run the prompts [P, Lp] once, copy their keys/values ``repeats`` times into slots [0, Lp).
        Returns the last position's logits [P, V]; with ``embed`` (ids -> input embeddings) the trunk
        runs on ``embed(ids)`` and the last position's hidden states [P, H] are returned."""
        if embed is None:
            logits, cache = hf_prefill(model, ids, mask, positions)
        else:
            logits, cache = trunk_prefill(self.base, embed(ids), mask, positions)
        prompt_len = ids.shape[1]
        # Every slot a row may not attend to holds 0: masked scores are -inf, so their weights are 0, and
        # 0 * value is only 0 for finite values (padding or a previous batch's slots could hold NaN).
        keep = mask.bool().repeat_interleave(repeats, 0)[:, None, :, None]  # [N, 1, Lp, 1]
        for (k, v), kc, vc in zip(_cache_layers(cache), self.keys, self.values):
            kc.zero_()
            vc.zero_()
            kc[:, :, :prompt_len] = torch.where(keep, k.repeat_interleave(repeats, 0), 0.0)
            vc[:, :, :prompt_len] = torch.where(keep, v.repeat_interleave(repeats, 0), 0.0)
        self.bias.fill_(float("-inf"))
        self.bias[..., :prompt_len].masked_fill_(keep.view(-1, 1, 1, prompt_len), 0.0)
        cos, sin = self.base.rotary_emb(self.cos[None], torch.arange(self.length, device=self.device)[None])
        self.cos.copy_(cos[0])
        self.sin.copy_(sin[0])
        self.sin[:, : self.head_dim // 2].neg_()
        return logits

    # -- decode ---------------------------------------------------------------------------------------
    def kv_len(self, slot: int) -> int:
        """Slots a static-shape step writing ``slot`` attends to: ``slot + 1`` rounded up to the bucket
        (at most the whole cache). Each distinct value is one CUDA graph."""
        return min(self.length, -(-(slot + 1) // self.kv_bucket) * self.kv_bucket)

    def _forward(self, tokens, positions, slot, kv_len, mode="text", live=None):
        """Logits [N, V] for one new token per row, written to cache slot ``slot`` (int, or a [1] tensor
        on the static-shape path, where ``kv_len`` is the slot's bucket boundary). ``tokens`` may cover
        the first n rows only; with ``live`` [n] bool the rows where it is False keep the slot masked;
        ``mode`` picks the embedding and head (see the module docstring)."""
        n, d, kv = tokens.shape[0], self.head_dim, self.kv_heads
        groups = self.q_heads // kv
        embed, head = self.modes[mode]
        bias, keys, values = self.bias, self.keys, self.values
        if n != self.rows:
            bias, keys, values = bias[:n], [c[:n] for c in keys], [c[:n] for c in values]
        if live is None:
            if isinstance(slot, int):
                bias[..., slot] = 0.0
            else:
                bias.index_fill_(3, slot, 0.0)
        else:  # 0 where the row takes the slot, -inf where it stays masked
            open_ = torch.zeros((), dtype=self.dtype, device=self.device)
            value = torch.where(live, open_, float("-inf")).view(n, 1, 1, 1).expand(n, kv, 1, 1)
            if isinstance(slot, int):
                bias[..., slot: slot + 1] = value
            else:
                bias.index_copy_(3, slot, value)
        bias = bias[..., :kv_len]  # [N, KV, 1, kv_len]: broadcast over each KV head's query heads
        cos = self.cos[positions][:, None, :]  # [N, 1, D]
        sin = self.sin[positions][:, None, :]
        x = embed(tokens)  # [N, H]
        for layer, kc, vc in zip(self.layers, keys, values):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(n, self.q_heads, d)
            k = attn.k_proj(h).view(n, kv, d)
            v = attn.v_proj(h).view(n, kv, d)
            if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before the rotation
                q, k = attn.q_norm(q), attn.k_norm(k)
            # rotary embedding of queries and keys together: x * cos + rotate_half(x) * sin
            qk = torch.cat((q, k), dim=1)
            swapped = qk.view(n, self.q_heads + kv, 2, d // 2).flip(2).view(n, self.q_heads + kv, d)
            qk = torch.addcmul(qk * cos, swapped, sin)
            q, k = qk[:, : self.q_heads], qk[:, self.q_heads:]
            if isinstance(slot, int):
                kc[:, :, slot] = k
                vc[:, :, slot] = v
            else:
                kc.index_copy_(2, slot, k[:, :, None])
                vc.index_copy_(2, slot, v[:, :, None])
            # grouped-query attention without repeating the cache: the G query heads of a KV head as the
            # query-length dimension of a [N, KV] batch. SDPA keeps the scores and softmax in fp32 (its
            # fused kernels, and on CPU its bf16 path); scores written in bf16 would be rounded to 0.125
            # at |score| ~ 20.
            out = F.scaled_dot_product_attention(q.view(n, kv, groups, d), kc[:, :, :kv_len], vc[:, :, :kv_len],
                                                 attn_mask=bias, scale=attn.scaling)
            x = x + attn.o_proj(out.reshape(n, self.q_heads * d))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = self.base.norm(x)
        return x if head is None else head(x)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, slot: int, *, mode: str = "text",
             live: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``tokens`` [n] (the first n <= N rows) at rotary ``positions`` [n] into cache slot
        ``slot``; the ``mode``'s head of the new hidden states ([n, V] logits in ``"text"``). With
        ``live`` [n] bool, rows where it is False keep that slot masked (their step's output is unused)."""
        if not self.cuda_graph:
            if self.static_shapes:
                return self._forward(tokens, positions, torch.tensor([slot], device=self.device), self.kv_len(slot),
                                     mode, live)
            return self._forward(tokens, positions, slot, slot + 1, mode, live)
        kv_len = self.kv_len(slot)
        n = tokens.shape[0]
        inputs = (n, live is not None)
        if inputs not in self._static:
            self._static[inputs] = (tokens.clone(), positions.clone(),
                                    torch.full((1,), slot, dtype=torch.long, device=self.device),
                                    None if live is None else live.clone())
        static_tokens, static_positions, static_slot, static_live = self._static[inputs]
        static_tokens.copy_(tokens)
        static_positions.copy_(positions)
        static_slot.fill_(slot)
        if live is not None:
            static_live.copy_(live)
        key = kv_len if (mode == "text" and inputs == (self.rows, False)) else (kv_len, mode, *inputs)
        if key not in self._graphs:
            self._capture(key, kv_len, mode, self._static[inputs])
            if not self.cuda_graph:  # capture failed: eager from now on
                return self._forward(tokens, positions, slot, slot + 1, mode, live)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits

    def _capture(self, key, kv_len: int, mode: str, static):
        """Capture the decode step of one kv-length bucket (and mode / rows / live use) on its first use.
        Warm-up and capture run the step for the current inputs (writing the same slot twice is
        harmless), so the cache is never disturbed."""
        static_tokens, static_positions, static_slot, static_live = static
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._forward(static_tokens, static_positions, static_slot, kv_len, mode, static_live)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._forward(static_tokens, static_positions, static_slot, kv_len, mode, static_live)
        except Exception as exc:  # a model whose sub-modules cannot be captured: run eagerly instead
            warnings.warn(f"fastrl.rollout: CUDA-graph capture failed ({exc}); decoding eagerly", stacklevel=3)
            self.cuda_graph = False
            self._graphs = {}
            return
        self._graphs[key] = (graph, logits)

    def release(self) -> None:
        self.keys = self.values = []
        self.bias = self.cos = self.sin = None
        self._graphs = {}
        self._static = {}
        self._pool = None
        self.modes = {}


class HFDecoder:
    """Any Hugging Face causal LM: its own forward and ``DynamicCache`` for every step.

    Use as :class:`LeanDecoder`: :meth:`prefill`, :meth:`step` per token, :meth:`release`.

    Args:
        model: a Hugging Face causal LM.
        rows: N, the decoded rows (``P * G``).
        length: the longest prompt + completion.
        trunk: the decoder stack to run with input embeddings (see the module docstring), or None
            for the model's own forward.
        modes: more step modes, ``{name: (embed, head)}``; ``"text"`` is the trunk's ``embed_tokens``
            and the model's lm-head (with a trunk).
    """

    def __init__(self, model, rows: int, length: int, *, trunk=None, modes: Mapping | None = None):
        self.model = model
        self.rows = rows
        self.cache = None
        self.trunk = trunk
        self.modes = {} if trunk is None else {"text": (trunk.embed_tokens, model.get_output_embeddings())}
        self.modes.update(modes or {})
        self.cache_kwarg = _cache_kwarg(model if trunk is None else trunk)
        self.logits_to_keep = _accepts(model, "logits_to_keep")
        self.mask = None
        self.length = length

    def prefill(self, model, ids, mask, positions, repeats: int, *, embed=None) -> torch.Tensor:
        if embed is None:
            logits, cache = hf_prefill(model, ids, mask, positions)
        else:
            logits, cache = trunk_prefill(self.trunk, embed(ids), mask, positions)
        cache.batch_repeat_interleave(repeats)
        self.cache = cache
        self.mask = torch.zeros(self.rows, self.length, dtype=mask.dtype, device=mask.device)
        self.mask[:, : ids.shape[1]] = mask.repeat_interleave(repeats, 0)
        return logits

    def step(self, tokens, positions, slot: int, *, mode: str = "text", live=None) -> torch.Tensor:
        n = tokens.shape[0]
        if self.trunk is None and mode == "text" and live is None and n == self.rows:
            self.mask[:, slot] = 1
            kwargs = {"input_ids": tokens[:, None], "attention_mask": self.mask[:, : slot + 1],
                      "position_ids": positions[:, None], self.cache_kwarg: self.cache, "use_cache": True}
            if self.logits_to_keep:
                kwargs["logits_to_keep"] = 1
            return self.model(**kwargs).logits[:, -1]
        # the cache holds every row: the rows not stepped feed a copy of row 0's input, their slot masked
        pad = self.rows - n
        live = torch.ones(n, dtype=torch.bool, device=tokens.device) if live is None else live
        if pad:
            tokens = torch.cat([tokens, tokens[:1].expand(pad)])
            positions = torch.cat([positions, positions[:1].expand(pad)])
            live = torch.cat([live, live.new_zeros(pad)])
        self.mask[:, slot] = live.to(self.mask.dtype)
        embed, head = self.modes[mode]
        kwargs = {"inputs_embeds": embed(tokens)[:, None], "attention_mask": self.mask[:, : slot + 1],
                  "position_ids": positions[:, None], self.cache_kwarg: self.cache, "use_cache": True}
        hidden = self.trunk(**kwargs).last_hidden_state[:n, -1]
        return hidden if head is None else head(hidden)

    def release(self) -> None:
        self.cache = self.mask = None
        self.modes = {}


# -- decoders kept between calls ----------------------------------------------------------------------------

# The lean decoder (static KV cache, CUDA graphs on GPU) of each model that a ``keep_graph=True`` call of
# generate kept for the next one: only the last one per model. Empty unless asked for: a kept cache holds
# its memory through training.
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def kept_decoder(model, rows: int, length: int, *, cuda_graph: bool) -> LeanDecoder:
    """The :class:`LeanDecoder` kept for ``model``, reused when it fits, else a new one kept in its place.

    It fits when it was built for the same ``rows``, the same cache-length bucket of ``length`` (a
    multiple of 128 slots), the same ``cuda_graph`` and the model's current parameter addresses; else
    the old one is freed first.

    Args:
        model: a model :func:`lean_unsupported_reason` accepts.
        rows: N, the decoded rows.
        length: the longest prompt + completion.
        cuda_graph: capture the step in CUDA graphs.

    Returns:
        The kept :class:`LeanDecoder`.
    """
    buckets = -(-length // _GRAPH_LENGTH_BUCKET)
    signature = (rows, buckets, cuda_graph, tuple(p.data_ptr() for p in model.parameters()))
    cached = _KEPT.get(model)
    if cached is not None and cached.signature == signature:
        return cached
    release_kept(model)  # one kept decoder per model: free the old cache before allocating the new one
    decoder = LeanDecoder(model, rows, buckets * _GRAPH_LENGTH_BUCKET, cuda_graph=cuda_graph)
    decoder.signature = signature
    _KEPT[model] = decoder
    return decoder


def release_kept(model=None) -> None:
    """Free the decoder kept for ``model`` (for every model when None) and forget it.

    Args:
        model: the model, or None for all.
    """
    if model is None:
        for decoder in list(_KEPT.values()):
            decoder.release()
        _KEPT.clear()
    else:
        decoder = _KEPT.pop(model, None)
        if decoder is not None:
            decoder.release()


def kept_decoders() -> Mapping:
    """The decoders kept now, by model.

    Returns:
        A read-only live view ``{model: LeanDecoder}``.
    """
    return types.MappingProxyType(_KEPT)
