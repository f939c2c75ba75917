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

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fastrl.ops import fused_linear_logprobs, sequence_logps
from fastrl.train import attention as attention_backends
from fastrl.train.packing import SequenceBatch, pack, pad
from fastrl.train.telemetry import flops_per_token

__all__ = ["Policy", "attention_implementation", "completion_logps", "pair_logps", "load_model", "load_tokenizer", "packing_works", "sequence_layout"]

Head = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], Any]


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
    if path is not None:
        return auto.from_pretrained(path, local_files_only=True, dtype=dtype, attn_implementation=attn_implementation,
                                    **labels)
    fields = dict(model_config)
    config = AutoConfig.for_model(fields.pop("model_type"), **{**fields, **labels})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return auto.from_config(config, dtype=dtype, attn_implementation=attn_implementation)


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
    """The model run up to its last hidden states, with the lm-head handed to a head (a loss).

    ``Policy(model)(batch, head)`` = ``head(hidden [T_c, H], lm_head.weight [V, H], lm_head.bias)``
    where ``hidden`` holds, in ``batch.labels`` order, the last hidden states that predict the
    completion tokens.

    Args:
        model: a transformers causal LM (or sequence classifier, whose score head stands in for
            the lm-head).
        compute_dtype: e.g. bf16 under autocast: casts hidden and weight (and bias) for the head;
            the cast is differentiable. None: the weight is cast to the hidden states' dtype where
            they differ.
    """

    def __init__(self, model: nn.Module, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.compute_dtype = compute_dtype

    @property
    def decoder(self) -> nn.Module:
        return self.model.get_decoder()

    @property
    def lm_head(self) -> nn.Module:
        """The lm-head; for a sequence classifier, which has none, its score head ``[num_labels, H]``."""
        head = self.model.get_output_embeddings()
        return head if head is not None else self.model.score

    def forward(self, batch: SequenceBatch, head: Head):
        """Run the decoder on ``batch`` and the head on the hidden states that predict its labels.

        Args:
            batch: the sequences (:class:`~fastrl.train.packing.SequenceBatch`), on the model's device.
            head: ``head(hidden, weight, bias)`` with ``hidden [T_c, H]`` (row j predicts
                ``batch.labels[j]``), ``weight [V, H]`` and ``bias [V]`` or None, all in the compute
                dtype.

        Returns:
            What ``head`` returns.
        """
        out = self.decoder(**batch.model_inputs(), use_cache=False)
        hidden = out.last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.score_index)
        weight, bias = self.lm_head.weight, self.lm_head.bias
        if self.compute_dtype is not None and hidden.dtype != self.compute_dtype:
            hidden, weight = hidden.to(self.compute_dtype), weight.to(self.compute_dtype)
            bias = None if bias is None else bias.to(self.compute_dtype)
        elif weight.dtype != hidden.dtype:
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        return head(hidden, weight, bias)


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
    config with ``num_labels`` (a reward model's) gives a sequence classifier.

    Args:
        config: a trainer config: ``model`` / ``model_config``, ``dtype``, ``bf16``,
            ``attn_implementation``, ``attention``, ``seed`` (and ``num_labels`` where it has one).
        device: where the model goes.
        path: a local model directory to load instead of the config's model.

    Returns:
        The ``nn.Module``.
    """
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
    return model.to(device).train()


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
    layers = decoder_layers(model)
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

    Args:
        policy: the policy; copied as it is now (call this before training or loading a
            checkpoint) unless ``path`` is given.
        config: the trainer config (:func:`build_model` reads it for ``path``).
        world: the processes (a :class:`fastrl.train.distributed.World`).
        path: a local model directory to load the reference from, instead of the copy.

    Returns:
        A :class:`Policy` in eval mode without gradients, with the policy's compute dtype.
    """
    import copy

    from fastrl.train import distributed

    model = build_model(config, world.device, path) if path is not None else copy.deepcopy(policy.model)
    ref = Policy(model, policy.compute_dtype).requires_grad_(False).eval()
    return distributed.shard(ref, decoder_layers(model), world)


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
    logps = policy(batch, lambda hidden, weight, bias: fused_linear_logprobs(hidden, weight, batch.labels, bias,
                                                                             temperature=temperature)).float()
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

    def head(hidden, weight, bias):
        token_logps = fused_linear_logprobs(hidden, weight, batch.labels, bias)
        return sequence_logps(token_logps, batch.cu_seqlens, ld_alpha=ld_alpha, pair_lengths=pair_lengths)

    seq = policy(batch, head).float()
    from fastrl.train import distributed

    distributed.reshard(policy)
    return seq[:pairs], seq[pairs:]
