"""The policy: a Hugging Face causal LM, run up to its last hidden states, with the lm-head
handed to a fused-linear loss (logits are never materialised in training).

``load_model`` builds the model from a local directory (``local_files_only``) or from a config
with a seeded random initialisation; :class:`Policy` wraps it so that one ``forward`` runs the
decoder on a :class:`~fastrl.train.packing.SequenceBatch`, gathers the hidden states that predict
completion tokens, and calls a *head* on them with the lm-head weight. Everything the head needs
is used inside that forward, which is what FSDP2 needs: the root module's parameters (embeddings,
final norm, lm-head) are gathered for the forward of the module that ``fully_shard`` wrapped.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fastrl.losses import dpo_loss
from fastrl.ops import fused_linear_logprobs, sequence_logps
from fastrl.rollout.image import ImageModel
from fastrl.train import attention as attention_backends
from fastrl.train.adapters import AdapterReference, apply_adapters, is_peft, linear_parts
from fastrl.train.packing import SequenceBatch, pack, pad, with_unconditional
from fastrl.train.telemetry import flops_per_token

__all__ = ["Head", "Policy", "attention_implementation", "check_image_completions", "check_offline_image_lengths",
           "completion_logps", "dpo_head", "freeze_unused", "image_adapter", "image_completion_length",
           "image_layout", "image_prompts", "load_model", "load_tokenizer", "logprob_head", "model_type",
           "packing_works", "pair_logps", "sequence_layout", "unconditional_prompt", "with_adapters"]


class Head:
    """What :class:`Policy` computes from the hidden states that predict a batch's labels.

    Two forms of one computation:

    - ``fused(hidden [T, P], weight [V, P], bias [V] or None, labels [T])``: from the rows, a linear
      head and the labels it scores (a fused-linear loss: no ``[tokens, V]`` logits). Text runs and
      image runs whose scored tokens are all image codes call only this form (for images with the
      image head's last linear and the codes as labels).
    - ``from_logps(logps [T_c] fp32, entropy [T_c] fp32 or None)``: from the per-token log-probs in
      ``batch.labels`` order, differentiable; used when a batch mixes text-plan tokens (scored by the
      lm-head) and image tokens (scored by the image head), so the loss aggregates over both at once.

    Args:
        fused: the fused form.
        from_logps: the log-prob form (None: this head serves text-only and image-only batches).
        temperature: the log-probs of the log-prob form are those of ``softmax(logits / temperature)``.
        entropy: the log-prob form needs the per-token entropy too.
    """

    def __init__(self, fused: Callable[..., Any], from_logps: Callable[..., Any] | None = None, *,
                 temperature: float = 1.0, entropy: bool = False):
        self.fused, self.from_logps = fused, from_logps
        self.temperature, self.entropy = float(temperature), bool(entropy)

    def __call__(self, hidden, weight, bias, labels):
        return self.fused(hidden, weight, bias, labels)


def logprob_head(temperature: float = 1.0) -> Head:
    """The :class:`Head` of the per-token log-probs (the old / reference log-probs, SFT's NLL terms).

    Args:
        temperature: the log-probs of ``softmax(logits / temperature)``.

    Returns:
        The head; it returns ``[T_c]`` fp32 log-probs in label order.
    """
    return Head(lambda hidden, weight, bias, labels: fused_linear_logprobs(hidden, weight, labels, bias,
                                                                           temperature=temperature),
                lambda logps, entropy: logps, temperature=temperature)


def dpo_head(loss_fn, batch: SequenceBatch, ref_chosen, ref_rejected) -> Head:
    """The DPO-family loss of a pair batch (B chosen sequences, then B rejected): ``(loss, metrics)``.

    The fused form is ``loss_fn`` (a :class:`fastrl.losses.FusedLinearDPOLoss`) itself; the log-prob
    form sums each sequence's token log-probs (LD-DPO weights as ``loss_fn``'s ``ld_alpha``) and
    calls :func:`fastrl.losses.dpo_loss` with the same settings, lengths and NLL terms.

    Args:
        loss_fn: the :class:`~fastrl.losses.FusedLinearDPOLoss`.
        batch: the pair batch.
        ref_chosen: ``[B]`` floating reference log-probs of the chosen completions, or None.
        ref_rejected: ``[B]`` floating, of the rejected ones, or None.

    Returns:
        The :class:`Head`.
    """
    ld_alpha = loss_fn.extras["ld_alpha"]

    def fused(hidden, weight, bias, labels):
        return loss_fn(hidden, weight, labels, ref_chosen, ref_rejected, cu_seqlens=batch.cu_seqlens, bias=bias)

    def from_logps(token_logps, entropy):
        counts = batch.completion_lengths.to(token_logps.device)
        pairs = counts.numel() // 2
        pair_lengths = None
        if ld_alpha is not None:
            shorter = torch.minimum(counts[:pairs], counts[pairs:])
            pair_lengths = torch.cat([shorter, shorter])
        seq = sequence_logps(token_logps, batch.cu_seqlens, ld_alpha=ld_alpha, pair_lengths=pair_lengths)
        nll = None if ld_alpha is None else -sequence_logps(token_logps, batch.cu_seqlens)[:pairs]
        return dpo_loss(seq[:pairs], seq[pairs:], ref_chosen, ref_rejected, chosen_lengths=counts[:pairs],
                        rejected_lengths=counts[pairs:], chosen_nll=nll, settings=loss_fn.settings)

    return Head(fused, from_logps, temperature=loss_fn.extras["temperature"])


def attention_implementation(requested: str, device: torch.device, attention: str = "auto", *,
                             model_config: Any = None, half: bool = True) -> str:
    """The transformers ``attn_implementation`` to build the model with.

    Args:
        requested: the config's ``attn_implementation``: an explicit one (flash_attention_2, sdpa,
            eager) is used as is; ``auto`` follows ``attention``.
        device: the training device.
        attention: the packed-attention switch (auto | flash | xformers | sdpa, see
            :func:`fastrl.train.attention.select`): auto -> flash_attention_2 on CUDA with
            flash-attn installed, else xformers' memory-efficient attention when installed, else
            sdpa.
        model_config: the transformers config, to refuse xformers for sliding-window models.
        half: bf16/fp16 compute (flash-attn runs only then).

    Returns:
        The ``attn_implementation`` string.

    Raises:
        ValueError: a switch whose package is missing (or a bad switch), naming ``attention``.
    """
    if requested != "auto":
        return requested
    return attention_backends.hf_implementation(
        attention_backends.select(attention, device, model_config=model_config, half=half))


def load_model(path: str | None, model_config: dict | None, *, dtype: torch.dtype, attn_implementation: str,
               seed: int, num_labels: int | None = None) -> nn.Module:
    """A causal LM from a local directory, or randomly initialised from a config.

    On the CPU; the caller moves it.

    Args:
        path: the local model directory (``local_files_only``), or None to build from
            ``model_config``.
        model_config: ``model_type`` plus the config's fields, read when ``path`` is None.
        dtype: the parameters' dtype.
        attn_implementation: the transformers attention implementation
            (:func:`attention_implementation`).
        seed: the random initialisation runs under ``torch.manual_seed(seed)`` (the global RNG
            state is restored after).
        num_labels: None for a causal LM; else a sequence classifier with that many outputs
            (``AutoModelForSequenceClassification``; a causal LM's directory gives its body, the
            head is new).

    Returns:
        The ``nn.Module``, on the CPU.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if num_labels is None else AutoModelForSequenceClassification
    labels = {} if num_labels is None else {"num_labels": num_labels}
    janus = num_labels is None and model_type(path, model_config) == "janus"
    if janus:  # an image-generation model (not a causal LM in the auto mappings)
        from transformers import JanusForConditionalGeneration as auto
    if path is not None:
        model = auto.from_pretrained(path, local_files_only=True, dtype=dtype, attn_implementation=attn_implementation,
                                     **labels)
        if janus:
            _restore_generation_kwargs(model, path)
        return model
    fields = dict(model_config)
    config = AutoConfig.for_model(fields.pop("model_type"), **{**fields, **labels})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if janus:
            return auto._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
        return auto.from_config(config, dtype=dtype, attn_implementation=attn_implementation)


def _restore_generation_kwargs(model: nn.Module, path: str) -> None:
    """Janus keeps its begin / end-of-image ids in ``generation_config.json``'s ``generation_kwargs``,
    which ``from_pretrained`` writes but does not read back; restore them."""
    import json
    from pathlib import Path

    try:
        saved = json.loads((Path(path) / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    kwargs = saved.get("generation_kwargs")
    gen = getattr(model, "generation_config", None)
    if isinstance(kwargs, dict) and gen is not None and not getattr(gen, "generation_kwargs", None):
        gen.generation_kwargs = dict(kwargs)


def model_type(path: str | None, model_config: dict | None) -> str | None:
    """The ``model_type`` of a local model directory's ``config.json``, or of ``model_config``.

    Args:
        path: a local model directory, or None.
        model_config: a config mapping, read when ``path`` is None.

    Returns:
        The model type, or None when it cannot be read.
    """
    import json
    from pathlib import Path

    if path is not None:
        try:
            return json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError):
            return None
    return (model_config or {}).get("model_type")


def load_tokenizer(path: str | None):
    """The tokenizer of a local directory, or None (data are then token ids).

    Args:
        path: the local directory (``local_files_only``), or None.

    Returns:
        The transformers tokenizer, or None when ``path`` is None.
    """
    if path is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


class Policy(nn.Module):
    """The model run up to its last hidden states, with a head (a loss) on the rows that predict labels.

    Text: ``Policy(model)(batch, head)`` = ``head(hidden [T_c, H], lm_head.weight [V, H], lm_head.bias,
    batch.labels)`` where ``hidden`` holds, in ``batch.labels`` order, the last hidden states that
    predict the completion tokens.

    Image generation (``image``, an :class:`~fastrl.rollout.image.ImageModel`): the trunk reads
    ``image.embed(input_ids)`` (text and image ids in one space). The last N labels of every
    completion are image codes (``image.image_rows``): their rows go through ``image.image_hidden``
    and are scored by the image head's last linear (``head_weight`` / ``head_bias``) over the
    codebook, labels minus ``image.offset``; the other rows (a text plan) by the lm-head. When every
    scored row is an image row the head's fused form gets the image head: no ``[tokens, C]``
    logits. When a batch mixes both, two differentiable :func:`fastrl.ops.fused_linear_logprobs`
    calls give the per-token log-probs (and entropy when the head asks), merged in label order, and
    the head's log-prob form computes the loss from them: one aggregation over text and image tokens.
    A batch with ``uncond_index`` (:func:`~fastrl.train.packing.with_unconditional`) scores image
    tokens under the classifier-free-guidance mix: the head is linear, so mixing the image head's
    inputs ``g = g_u + w (g_c - g_u)`` gives exactly ``log_softmax(u + w (c - u))`` of the logits,
    both branches differentiated.

    Args:
        model: a transformers causal LM (or sequence classifier, whose score head stands in for
            the lm-head), or an image-generation model with ``image``.
        compute_dtype: e.g. bf16 under autocast: casts hidden and weight (and bias) for the head;
            the cast is differentiable. None: the weight is cast to the hidden states' dtype where
            they differ.
        image: the :class:`~fastrl.rollout.image.ImageModel` of ``model``, or None (text).
        cfg_weight: w, the guidance weight of batches that carry unconditional rows.
    """

    def __init__(self, model: nn.Module, compute_dtype: torch.dtype | None = None, image: ImageModel | None = None,
                 cfg_weight: float = 1.0):
        super().__init__()
        self.model = model
        self.compute_dtype = compute_dtype
        if image is not None and not isinstance(image, ImageModel):
            raise TypeError(f"image must be an ImageModel or None, got {type(image).__name__}")
        if image is not None and image.model is not model:
            raise ValueError("image must wrap this policy's model (image.model is not model)")
        self.image = image
        self.cfg_weight = float(cfg_weight)

    @property
    def decoder(self) -> nn.Module:
        return self.image.trunk if self.image is not None else self.model.get_decoder()

    @property
    def lm_head(self) -> nn.Module:
        """The lm-head; for a sequence classifier, which has none, its score head ``[num_labels, H]``."""
        head = self.model.get_output_embeddings()
        return head if head is not None else self.model.score

    def head_parts(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight, bias)`` of the lm-head as it computes: with LoRA on the lm-head ``W + scale * B @ A``
        (:func:`fastrl.train.adapters.linear_parts`), a ``modules_to_save`` head's trained copy."""
        head = self.lm_head
        if type(head).__module__.startswith("peft."):  # a peft wrapper (LoRA layer, modules_to_save copy)
            return linear_parts(head)
        return head.weight, getattr(head, "bias", None)

    def _cast(self, hidden, weight, bias):
        if self.compute_dtype is not None and hidden.dtype != self.compute_dtype:
            hidden, weight = hidden.to(self.compute_dtype), weight.to(self.compute_dtype)
            bias = None if bias is None else bias.to(self.compute_dtype)
        elif weight.dtype != hidden.dtype:
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        return hidden, weight, bias

    def forward(self, batch: SequenceBatch, head: Head | Callable):
        """Run the decoder on ``batch`` and the head on the hidden states that predict its labels.

        Args:
            batch: the sequences (:class:`~fastrl.train.packing.SequenceBatch`), on the model's device.
            head: a :class:`Head`; or a plain ``head(hidden, weight, bias)`` called on every scored
                row with the lm-head (``hidden [T_c, H]``, ``weight [V, H]``, ``bias [V]`` or None, in
                the compute dtype), as text runs and the packing check use it.

        Returns:
            What ``head`` returns.
        """
        if self.image is None:
            out = self.decoder(**batch.model_inputs(), use_cache=False)
            hidden = out.last_hidden_state
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.score_index)
            hidden, weight, bias = self._cast(hidden, *self.head_parts())
            if isinstance(head, Head):
                return head.fused(hidden, weight, bias, batch.labels)
            return head(hidden, weight, bias)
        return self._image_forward(batch, head)

    def _image_forward(self, batch: SequenceBatch, head):
        image = self.image
        inputs = batch.model_inputs()
        ids = inputs.pop("input_ids")
        out = image.trunk(inputs_embeds=image.embed(ids), **inputs, use_cache=False)
        flat = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
        hidden = flat.index_select(0, batch.score_index)
        if not isinstance(head, Head):  # every row with the lm-head (the packing check)
            return head(*self._cast(hidden, self.lm_head.weight, self.lm_head.bias))
        rows = image.image_rows(batch.cu_seqlens.to(hidden.device))
        image_index = rows.nonzero().squeeze(1)
        g = image.image_hidden(hidden.index_select(0, image_index))
        if batch.uncond_index is not None and self.cfg_weight != 1.0:
            g_u = image.image_hidden(flat.index_select(0, batch.uncond_index))
            g = g_u + self.cfg_weight * (g - g_u)
        g, weight, bias = self._cast(g, image.head_weight, image.head_bias)
        codes = batch.labels.index_select(0, image_index) - image.offset
        bad = (codes < 0) | (codes >= image.codebook)
        if bool(bad.any()):  # e.g. a code of -100 would be read as the fused op's ignore_index: never silently
            j = int(image_index[int(bad.nonzero()[0])])
            raise ValueError(f"labels: the image position {j} holds id {int(batch.labels[j])}, not an image code "
                             f"(ids in [{image.offset}, {image.offset + image.codebook}))")
        if image_index.numel() == batch.labels.numel():
            return head.fused(g, weight, bias, codes)
        if head.from_logps is None:
            raise ValueError("this head has no log-prob form, which a batch of text-plan and image tokens needs")
        text_index = (~rows).nonzero().squeeze(1)
        text_h, text_w, text_b = self._cast(hidden.index_select(0, text_index), self.lm_head.weight,
                                            self.lm_head.bias)
        text = fused_linear_logprobs(text_h, text_w, batch.labels.index_select(0, text_index), text_b,
                                     temperature=head.temperature, return_entropy=head.entropy)
        img = fused_linear_logprobs(g, weight, codes, bias, temperature=head.temperature,
                                    return_entropy=head.entropy)
        if not head.entropy:
            text, img = (text,), (img,)
        merged = []
        for t, i in zip(text, img):
            full = t.new_zeros(batch.labels.shape[0], dtype=torch.float32)
            full = full.index_put((text_index,), t.float()).index_put((image_index,), i.float())
            merged.append(full)
        return head.from_logps(merged[0], merged[1] if head.entropy else None)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (the classes named in ``model._no_split_modules``), in order.

    They are the units of FSDP sharding and of ``compile``.

    Args:
        model: a transformers model.

    Returns:
        The blocks, in module order.

    Raises:
        ValueError: the model names no decoder-layer class in ``_no_split_modules``.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder-layer class in _no_split_modules")
    return layers


@torch.no_grad()
def packing_works(policy: Policy, vocab_size: int, device: torch.device) -> bool:
    """Whether this model keeps packed sequences apart.

    Two short random sequences run packed and padded must give the same hidden states. (A model
    whose attention ignores the position-id restarts would let packed sequences see each other; the
    trainer then pads instead.) Warns when they differ.

    Args:
        policy: the :class:`Policy` to try (run without gradients).
        vocab_size: the range of the random token ids.
        device: the policy's device.

    Returns:
        True when packed and padded hidden states agree (to 1e-3 in fp32, 5e-2 in half precision,
        relative to their largest magnitude).
    """
    gen = torch.Generator().manual_seed(0)
    def tokens(n: int) -> list[int]:
        return torch.randint(0, vocab_size, (n,), generator=gen).tolist()

    prompts, completions = [tokens(3), tokens(2)], [tokens(2), tokens(4)]
    a = policy(pack(prompts, completions).to(device), lambda h, w, b: h)
    b = policy(pad(prompts, completions).to(device), lambda h, w, b: h)
    # leakage between sequences changes hidden states by O(1); rounding by far less
    atol = 1e-3 if a.dtype == torch.float32 else 5e-2
    a, b = a.float(), b.float()
    scale = max(1.0, float(b.abs().max()))
    ok = bool((a - b).abs().max() <= atol * scale)
    if not ok:
        warnings.warn(f"{type(policy.model).__name__} does not separate packed sequences "
                      f"(max hidden difference {float((a - b).abs().max()):.3g}); padding instead", stacklevel=2)
    return ok


def sequence_layout(model, packing_ok: bool):
    """The batch layout: packed or padded, whichever costs fewer FLOPs for each batch.

    With flash-attn's varlen kernel or xformers' block-diagonal mask packing always wins; with a
    mask-based attention (SDPA, eager) a packed row of T tokens attends over all T² positions (its
    block-diagonal mask is dense), a padded batch of N rows of length L over N·L², so many short
    sequences (G completions of short prompts) run cheaper padded.

    Args:
        model: the transformers model (its config's attention implementation and sizes).
        packing_ok: whether packing works for it (:func:`packing_works`); False: always padded.

    Returns:
        ``layout(prompts, completions) -> SequenceBatch``: :func:`~fastrl.train.packing.pack`,
        :func:`~fastrl.train.packing.pad`, or a function choosing between them per batch.
    """
    if not packing_ok:
        return pad
    if model.config._attn_implementation in attention_backends.VARLEN:  # no dense mask: packing always wins
        return pack
    text = model.config.get_text_config()
    per_slot = flops_per_token(model)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_area = 4.0 * text.num_hidden_layers * text.num_attention_heads * head_dim  # QKᵀ and AV

    def layout(prompts: list[list[int]], completions: list[list[int]]) -> SequenceBatch:
        lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
        total, rows, longest = sum(lengths), len(lengths), max(lengths)
        packed = per_slot * total + per_area * total * total
        padded = per_slot * rows * longest + per_area * rows * longest * longest
        return (pack if packed <= padded else pad)(prompts, completions)

    return layout


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(config, device: torch.device, path: str | None = None) -> nn.Module:
    """The config's model (or the one at ``path``) on ``device``, in training mode.

    In the config's dtype and attention implementation (:func:`attention_implementation`); a
    config with ``num_labels`` (a reward model's) gives a sequence classifier. With the config's
    ``peft_config`` the config's model gets LoRA adapters (:func:`fastrl.train.adapters.apply_adapters`:
    a ``peft.PeftModel``, base frozen); a model loaded from ``path`` (a reference) gets none.

    Args:
        config: a trainer config: ``model`` / ``model_config``, ``dtype``, ``bf16``,
            ``attn_implementation``, ``attention``, ``seed``, ``peft_config`` (and ``num_labels``
            where it has one).
        device: where the model goes.
        path: a local model directory to load instead of the config's model. A model given from
            Python (an ``nn.Module`` as ``path`` or as ``config.model``) is used itself, not copied, with
            its own attention implementation, cast to the config's dtype.

    Returns:
        The ``nn.Module``.

    Raises:
        ConfigError: ``peft_config`` that the model refuses (no module matches ``target_modules``,
            several processes, ...), naming it.
    """
    given = path if path is not None else config.model
    if isinstance(given, nn.Module):  # given from Python (a trainer's `model`): used as it is, in the config's dtype
        model = given.to(DTYPES[config.dtype])
        if path is None and getattr(config, "peft_config", None) is not None:
            model = with_adapters(model, config)
        return model.to(device).train()
    model_config = None
    if config.attn_implementation == "auto":  # the HF config, for the checks of the attention switch
        from transformers import AutoConfig

        if path is not None or config.model is not None:
            model_config = AutoConfig.from_pretrained(path or config.model, local_files_only=True)
        else:
            fields = dict(config.model_config)
            model_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    attn = attention_implementation(config.attn_implementation, device, getattr(config, "attention", "auto"),
                                    model_config=model_config,
                                    half=config.dtype in ("bfloat16", "float16") or bool(config.bf16))
    labels = getattr(config, "num_labels", None)  # a reward model's config (RMConfig): a sequence classifier
    if path is not None:
        model = load_model(path, None, dtype=DTYPES[config.dtype], attn_implementation=attn, seed=config.seed,
                           num_labels=labels)
    else:
        model = load_model(config.model, config.model_config, dtype=DTYPES[config.dtype], attn_implementation=attn,
                           seed=config.seed, num_labels=labels)
        if getattr(config, "peft_config", None) is not None:
            model = with_adapters(model, config)
    return model.to(device).train()


def with_adapters(model: nn.Module, config) -> nn.Module:
    """``model`` with the LoRA adapters of ``config.peft_config`` (:func:`fastrl.train.adapters.apply_adapters`).

    Args:
        model: the run's transformers model (built by :func:`build_model`, or given from Python).
        config: the trainer config: ``peft_config``, ``seed``, ``model``.

    Returns:
        The ``peft.PeftModel``; ``model`` itself when ``peft_config`` is None or it is a PEFT model already.

    Raises:
        ConfigError: the model refuses the adapters, naming ``peft_config``.
    """
    from fastrl.train.config import ConfigError

    if getattr(config, "peft_config", None) is None or is_peft(model):
        return model
    try:
        base = config.model if isinstance(config.model, (str, os.PathLike)) else None  # a directory, for the adapter
        return apply_adapters(model, config.peft_config, seed=config.seed, base=base)
    except (ImportError, ValueError, TypeError) as e:  # e.g. no module matches target_modules
        message = str(e).removeprefix("peft_config: ")
        raise ConfigError(f"{type(config).__name__}.peft_config: {message}") from None


# image_model's arguments -> the image_generation keys that set them
_IMAGE_KEYS = {"model": "image_generation", "image_tokens": "image_generation.image_tokens",
               "image_token_range": "image_generation.image_token_range", "boi_id": "image_generation.boi_token_id",
               "eoi_id": "image_generation.eoi_token_id", "pad_id": "image_generation"}


def image_adapter(config, model: nn.Module) -> ImageModel | None:
    """The :class:`~fastrl.rollout.image.ImageModel` of an image run's model, or None for a text run.

    Args:
        config: a trainer config with ``image_generation`` (None: a text run).
        model: the run's model.

    Returns:
        The adapter (:func:`fastrl.rollout.image.image_model` with the config's ``image_tokens``,
        ``image_token_range``, ``boi_token_id``, ``eoi_token_id``), or None.

    Raises:
        ConfigError: the model has no image head, or a setting does not fit the model, naming the field.
    """
    from fastrl.rollout.image import image_model
    from fastrl.train.config import ConfigError

    options = config.image_options() if hasattr(config, "image_options") else None
    if options is None:
        return None
    name = type(config).__name__
    decode = options["decode"]
    if isinstance(decode, str):
        decode = _import_callable(decode, f"{name}.image_generation.decode")
    try:
        image = image_model(model, image_token_range=options["image_token_range"],
                            image_tokens=options["image_tokens"], boi_id=options["boi_token_id"],
                            eoi_id=options["eoi_token_id"], decode=decode)
    except (TypeError, ValueError) as e:
        word = str(e).split(" ", 1)[0].rstrip(":")
        raise ConfigError(f"{name}.{_IMAGE_KEYS.get(word, 'image_generation')}: {e}") from None
    codes = range(image.offset, image.offset + image.codebook)
    for key in ("uncond_prompt", "plan_stop_token_ids"):  # text ids: inside the lm-head, not image codes
        for t in options.get(key) or ():
            if not 0 <= t < image.text_vocab or t in codes:
                raise ConfigError(f"{name}.image_generation.{key}: id {t} is not a text token of the model (text ids "
                                  f"are [0, {image.text_vocab}) outside the image codes [{codes.start}, {codes.stop}))")
    return image


def freeze_unused(image: ImageModel) -> None:
    """Freeze what an image-generation run never trains (no gradient, no optimiser state).

    A Janus model's image-understanding encoder and aligner and its VQ-VAE take no part in
    generating image tokens (the VQ-VAE only decodes them to pixels).

    Args:
        image: the :class:`~fastrl.rollout.image.ImageModel`.
    """
    if image.kind != "janus":
        return
    inner = image.model.model
    for name in ("vision_model", "aligner", "vqmodel"):
        module = getattr(inner, name, None)
        if module is not None:
            module.requires_grad_(False)


def _import_callable(spec: str, where: str):
    """The callable named by ``"module:function"`` (a dotted module, or a ``.py`` file path)."""
    import importlib
    import importlib.util
    from pathlib import Path

    from fastrl.train.config import ConfigError

    module_name, _, attr = spec.partition(":")
    try:
        if module_name.endswith(".py"):
            found = importlib.util.spec_from_file_location(f"_fastrl_decode_{abs(hash(module_name))}",
                                                           Path(module_name))
            if found is None or not Path(module_name).is_file():
                raise ImportError(f"no file {module_name!r}")
            module = importlib.util.module_from_spec(found)
            found.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the config's
        raise ConfigError(f"{where}: importing {module_name!r} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{where}: {module_name!r} has no callable {attr!r}")
    return fn


def unconditional_prompt(image: ImageModel, prompt: list[int], given: list[int] | None = None) -> list[int]:
    """The unconditional prompt of ``prompt``, ending with the begin-of-image token.

    It is ``given`` (the config's ``uncond_prompt``) or Janus's pad-masked prompt
    (:meth:`~fastrl.rollout.image.ImageModel.uncond_prompt`), with the begin-of-image token appended
    when it does not end with it (the unconditional branch starts at the image), as the rollout has it.

    Args:
        image: the :class:`~fastrl.rollout.image.ImageModel`.
        prompt: the conditional prompt's token ids.
        given: a fixed unconditional prompt, or None.

    Returns:
        The token ids.
    """
    ids = list(given) if given is not None else image.uncond_prompt(prompt)
    if image.boi_id is not None and (not ids or ids[-1] != image.boi_id):
        ids.append(image.boi_id)
    return ids


def image_prompts(image: ImageModel | None, config, prompts: list[list[int]]) -> list[list[int]]:
    """An image run's prompts: without a plan each ends with the begin-of-image token.

    With ``plan: none`` the token is appended where a prompt does not end with it (as Janus's
    processor appends it); with a text plan, or on a text run, the prompts are as they are.

    Args:
        image: the run's :class:`~fastrl.rollout.image.ImageModel`, or None.
        config: the trainer config.
        prompts: the prompts' token ids.

    Returns:
        The prompts (the same list when nothing changes).
    """
    if image is None or image.boi_id is None or config.image_options()["plan"] != "none":
        return prompts
    if all(p and p[-1] == image.boi_id for p in prompts):
        return prompts
    return [p if p and p[-1] == image.boi_id else [*p, image.boi_id] for p in prompts]


def image_layout(policy: Policy, layout, config):
    """The batch layout of an image run: ``layout``, with the unconditional sequences when CFG-mixed.

    When the policy trains on the CFG-mixed log-prob (``train_logps: cfg``, ``cfg_weight != 1``) each
    batch also holds the unconditional sequences (:func:`~fastrl.train.packing.with_unconditional`).

    Args:
        policy: the :class:`Policy`.
        layout: ``layout(prompts, completions) -> SequenceBatch``.
        config: the trainer config (``image_generation``'s ``uncond_prompt``).

    Returns:
        ``layout(prompts, completions) -> SequenceBatch``.
    """
    if policy.image is None or policy.cfg_weight == 1.0:
        return layout
    image, given = policy.image, config.image_options()["uncond_prompt"]

    def guided(prompts: list[list[int]], completions: list[list[int]]) -> SequenceBatch:
        return with_unconditional(layout, prompts, completions,
                                  [unconditional_prompt(image, p, given) for p in prompts], image.image_tokens)

    return guided


def image_completion_length(image: ImageModel, config) -> int:
    """The longest completion of an image run, in tokens.

    The image's N codes, after a text plan and its begin-of-image token with ``plan: text``.

    Args:
        image: the run's :class:`~fastrl.rollout.image.ImageModel`.
        config: the trainer config (``image_generation``).

    Returns:
        The token count.
    """
    options = config.image_options()
    return image.image_tokens + (options["plan_max_tokens"] + 1 if options["plan"] == "text" else 0)


def check_offline_image_lengths(image: ImageModel | None, config) -> None:
    """An image run on data (DPO, SFT) must keep whole images: ``max_completion_length >= N``.

    Args:
        image: the run's :class:`~fastrl.rollout.image.ImageModel`, or None (nothing to check).
        config: the trainer config.

    Raises:
        ConfigError: ``max_completion_length`` below the image's codes, naming it.
    """
    from fastrl.train.config import ConfigError

    if image is not None and config.max_completion_length < image.image_tokens:
        raise ConfigError(f"{type(config).__name__}.max_completion_length: {config.max_completion_length} would cut "
                          f"the images ({image.image_tokens} codes each, after any text plan); raise it")


def check_image_completions(image: ImageModel, completions: list[list[int]], where) -> None:
    """Each completion must end with a whole image (N codes) and hold no image code before it.

    Args:
        image: the :class:`~fastrl.rollout.image.ImageModel`.
        completions: the completions' token ids.
        where: ``where(i)`` names completion i in the error (a data file's row and column).

    Raises:
        ValueError: a completion that does not, naming it.
    """
    lo, hi, n = image.offset, image.offset + image.codebook, image.image_tokens
    for i, ids in enumerate(completions):
        codes = ids[len(ids) - n:] if len(ids) >= n else []
        if len(ids) < n or any(not lo <= t < hi for t in codes):
            raise ValueError(f"{where(i)}: an image completion must end with {n} image codes (ids in [{lo}, {hi})); "
                             f"got {len(ids)} tokens ending {ids[-min(len(ids), 4):]} (cut by max_completion_length?)")
        if image.kind == "janus" and any(t >= lo for t in ids[:len(ids) - n]):
            raise ValueError(f"{where(i)}: image codes before the last {n} tokens (the text plan takes text ids "
                             f"only, < {lo})")


def prepare_for_training(policy: Policy, config, world) -> Policy:
    """Gradient checkpointing, ``torch.compile`` of each decoder layer, FSDP2 sharding.

    The features the config asks for, in the order they must be applied.

    Args:
        policy: the :class:`Policy` to prepare (its model is changed in place).
        config: a trainer config: ``gradient_checkpointing``, ``compile``.
        world: the processes (a :class:`fastrl.train.distributed.World`); FSDP2 shards over them,
            a no-op in one process.

    Returns:
        The policy, sharded when the world has several processes.
    """
    from fastrl.train import distributed

    model = policy.model
    layers = decoder_layers(policy.decoder if policy.image is not None else model)
    if config.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.compile:
        for layer in layers:
            layer.compile()
    return distributed.shard(policy, layers, world)


def frozen_copy(policy: Policy, config, world, path: str | None = None) -> Policy:
    """A frozen reference model, sharded like the policy.

    A LoRA policy (a PEFT model) needs no copy: its reference is the policy with its adapters
    disabled (:class:`fastrl.train.adapters.AdapterReference`), the base model, which the policy
    equals at the start (LoRA's B starts at zero). Only a reference that must follow the policy
    (online DPO's ``reference_update: previous_iterate``) is still a copy of the whole PEFT model.

    Args:
        policy: the policy; copied as it is now (call this before training or loading a
            checkpoint) unless ``path`` is given.
        config: the trainer config (:func:`build_model` reads it for ``path``).
        world: the processes (a :class:`fastrl.train.distributed.World`).
        path: a local model directory to load the reference from, instead of the copy.

    Returns:
        A :class:`Policy` in eval mode without gradients, with the policy's compute dtype; for a
        LoRA policy an :class:`~fastrl.train.adapters.AdapterReference`.
    """
    import copy

    from fastrl.train import distributed

    if path is None and is_peft(policy.model) and getattr(config, "reference_update", "fixed") == "fixed":
        return AdapterReference(policy).eval()
    model = build_model(config, world.device, path) if path is not None else copy.deepcopy(policy.model)
    image = None
    if policy.image is not None:  # the same adapter settings, over the copy
        image = copy.copy(policy.image)
        image.model = model
    ref = Policy(model, policy.compute_dtype, image, policy.cfg_weight).requires_grad_(False).eval()
    return distributed.shard(ref, decoder_layers(ref.decoder if image is not None else model), world)


@torch.no_grad()
def completion_logps(policy, batch: SequenceBatch, *, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs of every completion token of ``batch`` under ``policy``, without gradients.

    The old / reference log-probs of a GRPO step, through the fused lm-head (no ``[tokens, V]`` logits).

    Args:
        policy: a :class:`Policy` (sharded or not; resharded after the forward).
        batch: a :class:`~fastrl.train.packing.SequenceBatch` of prompts and completions.
        temperature: the log-probs are those of ``softmax(logits / temperature)``.

    Returns:
        ``[T_c]`` fp32, packed like ``batch.labels`` (bounded by ``batch.cu_seqlens``).
    """
    logps = policy(batch, logprob_head(temperature)).float()
    from fastrl.train import distributed

    distributed.reshard(policy)
    return logps


@torch.no_grad()
def pair_logps(policy, batch: SequenceBatch, *, ld_alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of a batch of preference pairs under ``policy``, without gradients.

    Args:
        policy: a :class:`Policy` (sharded or not; resharded after the forward).
        batch: a :class:`~fastrl.train.packing.SequenceBatch` of 2B sequences, chosen first, then rejected
            (pair i = sequences i and B + i).
        ld_alpha: LD-DPO: weight of the tokens beyond the shorter completion of each pair (None: all 1).

    Returns:
        ``(chosen [B], rejected [B])`` fp32.
    """
    lengths = batch.completion_lengths.to(batch.labels.device)
    pairs = lengths.numel() // 2
    pair_lengths = None
    if ld_alpha is not None:
        shorter = torch.minimum(lengths[:pairs], lengths[pairs:])
        pair_lengths = torch.cat([shorter, shorter])

    def sequences(token_logps, entropy=None):
        return sequence_logps(token_logps, batch.cu_seqlens, ld_alpha=ld_alpha, pair_lengths=pair_lengths)

    head = Head(lambda hidden, weight, bias, labels: sequences(fused_linear_logprobs(hidden, weight, labels, bias)),
                sequences)
    seq = policy(batch, head).float()
    from fastrl.train import distributed

    distributed.reshard(policy)
    return seq[:pairs], seq[pairs:]
