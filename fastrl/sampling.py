"""Token sampling: temperature, top-k, top-p and min-p, per row, seeded; C++ on CPU, CUDA on GPU.

CUDA tensors run the CUDA kernel (``csrc/cuda/sampling.cu``) when the extension was built with it
(``fastrl._C.cuda_enabled()``, shown by ``fastrl info``), else the torch reference. For the same seed,
CPU and GPU draw the same uniform per row, so they pick the same tokens except where a draw falls
within fp32 rounding of a CDF boundary.

>>> import torch, fastrl
>>> logits = torch.randn(4, 32000)
>>> g = torch.Generator().manual_seed(0)
>>> tokens, logprobs = fastrl.sampling.sample(logits, temperature=0.7, top_p=0.9, generator=g)
>>> tokens.shape, tokens.dtype, logprobs.dtype
(torch.Size([4]), torch.int64, torch.float32)
"""

from __future__ import annotations

import numbers

import torch

from fastrl import _checks, _extension
from fastrl.ops import dispatch, torch_impl

__all__ = ["SampleErrors", "sample"]

_SEED_HIGH = 2**62  # seeds are drawn from [0, 2**62) of the generator's stream


def _setting(name: str, value, rows: int, device: torch.device, *, integer: bool, check):
    """(scalar, per-row tensor or None) for one sampling setting."""
    if isinstance(value, torch.Tensor):
        return (0 if integer else 1.0), _checks.check_row_tensor(name, value, rows, device, integer=integer)
    return check(name, value), None


def _draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    if generator is None:
        return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=device)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but logits are on {device}; "
                         f"use torch.Generator(device='{device.type}')")
    return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=device, generator=generator)


class SampleErrors:
    """A deferred check of :func:`sample`'s rows, for loops that sample every step (a decode loop).

    Passed as ``sample(..., errors=handle)``, a call raises nothing for bad rows (NaN or ``+inf``
    logits, a row of only ``-inf``, an out-of-range value in a per-row setting tensor): such a row
    gets token -1 and NaN log-probs, and the error is recorded in a two-word int64 tensor on the
    device (``word``), with no host-device sync (an eager CUDA call syncs once to raise). Settings
    given as numbers are still checked at the call. :meth:`check` (one small device-to-host copy)
    then raises the ``ValueError`` that call would have raised eagerly, same message, and clears the
    record. Of several errors since the last check the one kept is the smallest code: a bad setting
    before bad logits, then the lowest row.

    Args:
        device: the device of the logits it will check (a bare ``"cuda"`` means the current CUDA
            device); :func:`sample` refuses a handle on another device.

    Example:
        >>> import torch, fastrl
        >>> errors = fastrl.sampling.SampleErrors("cpu")
        >>> x = torch.randn(3, 10); x[1, 2] = float("nan")
        >>> tokens, _ = fastrl.sampling.sample(x, errors=errors)  # no raise here
        >>> int(tokens[1])
        -1
        >>> errors.check()
        Traceback (most recent call last):
        ...
        ValueError: logits must not contain NaN or +inf (row 1)
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.word = torch.tensor([-1, 0], dtype=torch.int64, device=self.device)  # -1: no error
        self._message: str | None = None  # the torch path checks on the host: its message, kept

    def reset(self) -> None:
        """Forget what was recorded (asynchronous on CUDA)."""
        self.word[0] = -1
        self._message = None

    def check(self) -> None:
        """Raise the recorded error, if any (and clear it); on CUDA this waits for the queued calls."""
        if self._message is not None:
            message = self._message
            self.reset()
            raise ValueError(message)
        word = self.word.to("cpu", copy=True)  # a copy even on the cpu: reset() rewrites the word
        if int(word[0]) != -1:
            self.reset()
            torch.ops.fastrl.sample_check(word)

    def _record(self, message: str) -> None:
        if self._message is None:
            self._message = message

    def __repr__(self) -> str:
        return f"SampleErrors(device={self.device})"


def sample(
    logits: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
    generator: torch.Generator | None = None,
    return_filtered_logprobs: bool = False,
    errors: SampleErrors | None = None,
    uncond_logits: torch.Tensor | None = None,
    cfg_weight: float = 1.0,
    token_range: tuple[int, int] | None = None,
    return_cond_logprobs: bool = False,
):
    """Draw one token per row of ``logits``, after temperature, top-k, top-p and min-p filtering.

    Filters apply in Hugging Face's order, each keeping ties at its boundary: ``temperature``
    scales the logits, ``top_k`` keeps the k most probable tokens, ``top_p`` keeps, of those, the
    smallest most-probable set whose mass reaches ``top_p``, ``min_p`` keeps tokens with
    ``p >= min_p * max p``. The exact distribution is
    :func:`fastrl.ops.torch_impl.sampling_distribution`. ``-inf`` logits mark banned tokens.

    Draws are reproducible: the same ``generator`` state, logits and settings give the same tokens,
    whatever the number of threads (on GPU bit for bit: the CUDA kernel sums masses in integers).
    (Under ``torch.compile`` the per-call seed comes from the compiled graph's random stream:
    reproducible from ``torch.manual_seed``, but not the eager draws; pass no ``generator`` there.)

    Each setting is a number for every row or a tensor of per-row values (``[B]``, or 0-d: one
    value for all rows) on the logits' device.

    Classifier-free guidance: with ``uncond_logits`` and ``cfg_weight`` w the op draws from the mix
    ``u + (c - u) * w`` (c = ``logits``, u = ``uncond_logits``; Hugging Face's order), formed in fp32
    per element while it reads the rows, so no mixed ``[B, V]`` tensor is built. A ``-inf`` in either
    branch bans the token; NaN or ``+inf`` in either is a bad row. ``w == 1`` (or no ``uncond_logits``)
    is the unguided sampler exactly. ``token_range=(lo, hi)`` restricts the draw to the tokens
    ``[lo, hi)`` (e.g. the image codes of a vocabulary): the op reads the strided view
    ``logits[:, lo:hi]`` (nothing copied or masked), so every softmax and filter is over that range,
    and the returned tokens are vocabulary ids in ``[lo, hi)``.

    Args:
        logits: ``[B, V]`` fp32, bf16 or fp16, V >= 1.
        temperature: >= 0 (0 = greedy); a number, or a ``[B]`` floating tensor.
        top_k: >= 0 (0 = off; k >= V is off too); an int, or a ``[B]`` integer tensor.
        top_p: in (0, 1] (1 = off); a number, or a ``[B]`` floating tensor.
        min_p: in [0, 1] (0 = off); a number, or a ``[B]`` floating tensor.
        generator: a ``torch.Generator`` on the logits' device type, the source of the per-call
            seed; None: torch's default generator.
        return_filtered_logprobs: also return each token's log-prob under the filtered,
            renormalised distribution it was drawn from.
        errors: a :class:`SampleErrors` on the logits' device: the row checks are deferred to
            ``errors.check()`` (no sync per call), and a bad row gets token -1 and NaN log-probs.
        uncond_logits: ``[B, V]``, the unconditional branch's logits for classifier-free guidance:
            the shape, dtype and device of ``logits``; None: no guidance.
        cfg_weight: the guidance weight w, a real >= 0 (1: no guidance; 0: the unconditional branch).
        token_range: ``(lo, hi)`` with ``0 <= lo < hi <= V``: only those tokens can be drawn; None:
            the whole vocabulary.
        return_cond_logprobs: also return each token's log-prob under ``softmax(logits / T)`` over
            the range (the conditional branch alone, without the guidance mix).

    Returns:
        ``(tokens [B] int64, logprobs [B] fp32)``, ``logprobs`` being each token's log-prob under
        ``softmax(logits / T)`` (what importance-sampling corrections need; 0 - or -log(#tied
        maxima) - for greedy rows); under guidance and a range: ``softmax(mix / T)`` over the range.
        With ``return_filtered_logprobs=True`` a next tensor, ``[B]`` fp32, holds its log-prob under
        the filtered, renormalised distribution; with ``return_cond_logprobs=True`` a last one, ``[B]``
        fp32, its log-prob under the conditional branch (equal to ``logprobs`` without guidance;
        greedy rows: ``-log(#tied maxima of logits)`` at a maximum of ``logits``, else ``-inf``).

    Raises:
        TypeError: an argument of the wrong kind (e.g. a ``generator`` that is not a
            ``torch.Generator``, ``errors`` not a :class:`SampleErrors`), naming it.
        ValueError: a wrong shape, dtype or device, naming the argument; NaN or ``+inf`` logits, a
            row of only ``-inf``, or a setting out of range (on CUDA this costs one small
            device-to-host copy per call; inside CUDA-graph capture nothing is checked and such a
            row gets token -1 and NaN log-probs instead; with ``errors`` these row checks raise
            from ``errors.check()``). Settings given as numbers are checked at the call.
    """
    _checks.check_tensor("logits", logits, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    rows, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension, got shape (B, 0)")
    _checks.check_bool("return_filtered_logprobs", return_filtered_logprobs)
    _checks.check_bool("return_cond_logprobs", return_cond_logprobs)
    w = _checks.check_real("cfg_weight", cfg_weight, low=0.0)
    if uncond_logits is not None:
        _checks.check_tensor("uncond_logits", uncond_logits, dtypes=(logits.dtype,), device=logits.device)
        if uncond_logits.shape != logits.shape:
            raise ValueError(f"uncond_logits must have the shape of logits {tuple(logits.shape)}, "
                             f"got {tuple(uncond_logits.shape)}")
    elif w != 1.0:
        raise ValueError(f"cfg_weight ({w}) needs uncond_logits (the unconditional branch's logits to mix with)")
    uncond = uncond_logits if w != 1.0 else None  # w == 1: the unguided path, uncond_logits unread
    lo = 0
    if token_range is not None:
        lo, hi = _token_range(token_range, vocab)
        logits = logits[:, lo:hi]  # a row-strided view: the op reads it in place
        uncond = None if uncond is None else uncond[:, lo:hi]
        vocab = hi - lo
    dev = logits.device
    t, t_rows = _setting("temperature", temperature, rows, dev, integer=False,
                         check=lambda n, v: _checks.check_real(n, v, low=0.0))
    k, k_rows = _setting("top_k", top_k, rows, dev, integer=True,
                         check=lambda n, v: min(_checks.check_int(n, v, low=0), vocab))  # k >= V: off
    p, p_rows = _setting("top_p", top_p, rows, dev, integer=False,
                         check=lambda n, v: _checks.check_real(n, v, low=0.0, high=1.0, low_open=True))
    m, m_rows = _setting("min_p", min_p, rows, dev, integer=False,
                         check=lambda n, v: _checks.check_real(n, v, low=0.0, high=1.0))
    if errors is not None:
        if not isinstance(errors, SampleErrors):
            raise TypeError(f"errors must be a fastrl.sampling.SampleErrors, got {type(errors).__name__}")
        if errors.device != dev:  # both carry an index on CUDA (SampleErrors resolves a bare "cuda")
            raise ValueError(f"errors is on {errors.device} but logits are on {dev}")
    seed = _draw_seed(generator, dev)

    # Compiled code always calls the operator (Dynamo cannot trace the backend setting).
    if not torch.compiler.is_compiling() and (dispatch.requested_backend() == "torch"
                                              or (dev.type == "cuda" and not _extension.cuda_enabled())):
        try:
            out = _sample_reference(logits, seed, t, k, p, m, t_rows, k_rows, p_rows, m_rows, uncond, w)
        except ValueError as e:
            if errors is None:
                raise
            errors._record(str(e))  # this path has checked on the host already; every row is marked bad
            nan = torch.full((rows,), float("nan"), device=dev)
            out = (torch.full((rows,), -1, dtype=torch.int64, device=dev), nan, nan.clone(), nan.clone())
        tokens, logprobs, filtered, cond = out
    else:
        _extension.require("fastrl.sampling.sample")
        word = None if errors is None else errors.word
        cond = None
        if return_cond_logprobs and uncond is not None:
            cond = torch.empty(rows, dtype=torch.float32, device=dev)
        tokens, logprobs, filtered = torch.ops.fastrl.sample(logits, seed, t, k, p, m, t_rows, k_rows, p_rows,
                                                             m_rows, word, uncond, w, cond)
        if return_cond_logprobs and cond is None:
            cond = logprobs.clone()  # no guidance: the conditional branch is what was sampled
    if lo:
        tokens = torch.where(tokens >= 0, tokens + lo, tokens)  # bad rows keep token -1
    out = (tokens, logprobs) + ((filtered,) if return_filtered_logprobs else ())
    return out + ((cond,) if return_cond_logprobs else ())


def _token_range(token_range, vocab: int) -> tuple[int, int]:
    """(lo, hi) of a ``token_range`` argument, checked against the vocabulary size (any fault, the
    kind of value included, is a ValueError naming ``token_range``)."""
    pair = isinstance(token_range, (tuple, list)) and len(token_range) == 2
    if not pair or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in token_range):
        raise ValueError(f"token_range must be a pair (lo, hi) of ints, got {token_range!r}")
    lo, hi = int(token_range[0]), int(token_range[1])
    if not 0 <= lo < hi <= vocab:
        raise ValueError(f"token_range must satisfy 0 <= lo < hi <= V = {vocab}, got ({lo}, {hi})")
    return lo, hi


def _sample_reference(logits, seed, temperature, top_k, top_p, min_p, temperatures, top_ks, top_ps, min_ps,
                      uncond=None, cfg_weight=1.0):
    """The torch path (``FASTRL_BACKEND=torch``, and CUDA tensors when the extension was built
    without its CUDA kernels): same distribution and, through :func:`torch_impl.philox_uniform`, the
    same uniforms as the C++ and CUDA samplers. Returns tokens, log-probs, filtered log-probs and the
    conditional branch's log-probs."""
    settings = {
        "temperature": temperature if temperatures is None else temperatures,
        "top_k": top_k if top_ks is None else top_ks,
        "top_p": top_p if top_ps is None else top_ps,
        "min_p": min_p if min_ps is None else min_ps,
    }
    if uncond is not None and cfg_weight != 1.0:
        _check_row_values(torch_impl.cfg_logits(logits, uncond, cfg_weight), settings)
    else:
        _check_row_values(logits, settings)
    s = int(seed.reshape(-1)[0].item())
    u = torch.tensor([torch_impl.philox_uniform(s, r) for r in range(logits.shape[0])], dtype=torch.float64)
    return torch_impl.sample(logits, u, uncond=uncond, cfg_weight=cfg_weight, return_cond_logprobs=True, **settings)


def _check_row_values(logits: torch.Tensor, settings: dict) -> None:
    """Value checks that the C++ sampler does in its row loop (the reference has none)."""
    if (torch.isnan(logits) | (logits == float("inf"))).any():
        raise ValueError("logits must not contain NaN or +inf")
    if (logits == float("-inf")).all(dim=-1).any():
        raise ValueError("logits has a row with no finite value (every entry is -inf)")
    bounds = {"temperature": (0.0, None, False), "top_k": (0, None, False), "top_p": (0.0, 1.0, True),
              "min_p": (0.0, 1.0, False)}
    for name, value in settings.items():
        if not isinstance(value, torch.Tensor):
            continue
        low, high, low_open = bounds[name]
        bad = ~torch.isfinite(value.double()) | (value <= low if low_open else value < low)
        if high is not None:
            bad |= value > high
        if bad.any():
            raise ValueError(f"{name} has an out-of-range value {value[bad][0].item()} "
                             f"for row {int(bad.nonzero()[0])}")


def _register_sample_op() -> None:
    """Fake kernel (torch.compile) and, without the CUDA build, a CUDA kernel on the torch path
    (with it, csrc/cuda/sampling_ops.cpp registers the CUDA kernel for the op)."""

    @torch.library.register_fake("fastrl::sample")
    def _(logits, seed, temperature, top_k, top_p, min_p, temperatures, top_ks, top_ps, min_ps, error=None,
          uncond=None, cfg_weight=1.0, cond_logprobs=None):
        rows = logits.shape[0]
        return (logits.new_empty(rows, dtype=torch.int64), logits.new_empty(rows, dtype=torch.float32),
                logits.new_empty(rows, dtype=torch.float32))

    if not _extension.cuda_enabled():
        def _cuda_reference(logits, seed, temperature, top_k, top_p, min_p, temperatures, top_ks, top_ps, min_ps,
                            error=None, uncond=None, cfg_weight=1.0, cond_logprobs=None):
            # checks on the host, so raises at once even with an error word
            tokens, logprobs, filtered, cond = _sample_reference(logits, seed, temperature, top_k, top_p, min_p,
                                                                 temperatures, top_ks, top_ps, min_ps, uncond,
                                                                 cfg_weight)
            if cond_logprobs is not None:
                cond_logprobs.copy_(cond)
            return tokens, logprobs, filtered

        torch.library.register_kernel("fastrl::sample", "cuda", _cuda_reference)


if _extension.available():
    _register_sample_op()
