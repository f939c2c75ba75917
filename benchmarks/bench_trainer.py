"""Training steps: fastrl's GRPO and DPO trainers beside TRL's GRPOTrainer / DPOTrainer (no vLLM), in
tokens per second and peak memory (GitHub issue 9).

    make bench                                            # with the other suites (TRL when installed)
    python benchmarks/bench_trainer.py --device cpu       # this suite alone: table + JSON in results/<device>/
    python benchmarks/bench_trainer.py --device gpu       # Qwen2-0.5B shape in bf16 (needs CUDA)
    python benchmarks/bench_trainer.py --device cpu -k grpo_async   # one case (pytest -k on the test ids)

Both sides train the same model (a random initialisation saved once to a local directory with a
word-level tokenizer; both load it by path, which TRL needs to build its reference model), on the
same data, batch, group size, lengths, optimiser settings and loss settings:

- **GRPO**: P prompts x G completions per step, loss dapo, ε 0.2, μ = 1 (on-policy), β = 0 (no
  reference model) and β = 0.04 (a frozen reference), temperature 1, no top-k / top-p, the same
  batched reward callable (:func:`reward_even_tokens`). Completions have a fixed length: fastrl
  has no stop token (``stop_token_ids: []``), TRL's generation gets ``min_new_tokens`` = the
  completion length (HF's processor masks the EOS logit until then), so both sides process exactly
  P·G·(prompt + completion) tokens per step (checked in every run).
- **DPO**: B pairs per step, prompt and completions of fixed lengths (each completion ends with
  EOS), loss sigmoid, β 0.1, reference live (a frozen model scores each batch) or precomputed
  (once before training; not timed).
- **GRPO async** (case ``grpo async``, GitHub issue 19): the shapes and settings of ``grpo beta=0``,
  three contenders at equal cores (``CASE_CONTENDERS``; ``--threads`` does not change them):
  ``fastrl-async``, fastrl with ``async_rollout: {enabled: true, max_staleness: 1, threads: 1}`` in
  a process of 1 thread (its rollout worker process samples and scores step t+1 with 1 thread while
  the trainer trains step t), against synchronous ``fastrl`` and ``trl`` in one process of 2
  threads each: 2 cores in all three. fastrl-async's loss is the same dapo loss with GRPO's truncated
  importance-sampling correction (``is_cap`` 3, the async default) for batches sampled one update
  behind. The table adds fastrl-async's tokens/s and memory over each other contender's (the median
  of the per-round ratios; all three alternate within each round), its mean staleness, the
  trainer's wait for batches (phase ``wait``) and the worker's own rollout / reward seconds per step.
  On GPU (``make bench-gpu``) the case is fastrl-async against fastrl at the GPU shapes, the trainer
  and the worker time-sharing the one GPU; it has not run here (no GPU): the tests build its config
  and check that ``--device gpu`` refuses to start without CUDA.

Settings both share: fp32 on CPU (TRL: ``use_cpu=True, bf16=False``), bf16 weights on GPU
(TRL: ``bf16=True``), no gradient checkpointing (TRL turns it on by default), AdamW with torch's
fused kernel (both defaults), lr 1e-5 constant, gradient clipping at 1.0, one micro-batch per step,
logging every step, no checkpoints during the run. Each side uses its own default attention kernel.

**Measurement.** Every contender runs in its own fresh process (``--worker``), so that its peak
memory is its own: VmHWM (peak RSS) of the process on CPU, ``torch.cuda.max_memory_allocated`` on
GPU. fastrl-async's peak RSS is its trainer's VmHWM plus its rollout worker's peak, which the
trainer process reads after the run has joined the worker (``getrusage(RUSAGE_CHILDREN).ru_maxrss``:
the kernel's high-water RSS of the exited child, the counter VmHWM shows; both parts are in the JSON;
the sum over-counts the pages both processes map). On GPU the async case also records the
device-wide memory in use (``torch.cuda.mem_get_info`` sampled every 10 ms, both processes and
their CUDA contexts) above what was in use at the start, for both of its contenders; its table
compares that. Processes alternate fastrl, TRL, fastrl, TRL ... for ``rounds`` rounds, so a load from other
jobs falls on both. Each runs ``warmup + steps`` optimiser steps; the step period is the wall-clock
time between the ends of consecutive steps (fastrl: ``elapsed_s`` of its per-step metrics; TRL: a
callback's ``on_step_end``), so it covers everything, logging and data loading included.
``tokens_per_s`` = tokens per step x ``steps`` / the time of the last ``steps`` periods (median over
rounds); ``tokens_per_s_ratio_to`` is the median of the per-round ratios (round r of both sides ran
back to back, under the same load). The pytest-benchmark statistics of each result are its step
periods (all rounds); ``peak_extra_bytes`` is the peak of the whole process (there are no inputs).
The phase breakdown (mean seconds per step): fastrl's own telemetry (``time/<phase>``); for TRL the
same phases timed around its methods (``_generate``, ``_calculate_rewards``, the reference model's
forward, ``training_step`` less ``_prepare_inputs``, the optimiser's ``step``); ``other`` is the
rest of the period.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCALE = os.environ.get("FASTRL_BENCH_SCALE", "cpu")

MODEL = {
    "cpu": dict(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024),
    # Qwen2-0.5B's shape (config.json of Qwen/Qwen2-0.5B), random weights
    "gpu": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True),
}
# method grpo: prompts x group completions; method dpo: pairs; lengths in tokens
CASES = {
    "cpu": {
        "grpo beta=0": dict(method="grpo", prompts=2, group=4, prompt_len=16, completion_len=32, beta=0.0),
        "grpo beta=0.04": dict(method="grpo", prompts=2, group=4, prompt_len=16, completion_len=32, beta=0.04),
        "dpo live": dict(method="dpo", pairs=8, prompt_len=32, completion_len=32, reference="live"),
        "dpo precomputed": dict(method="dpo", pairs=8, prompt_len=32, completion_len=32, reference="precomputed"),
        # the shapes of "grpo beta=0"; fastrl-async: a rollout worker samples a step ahead (max_staleness
        # 1), its intra-op threads worker_threads
        "grpo async": dict(method="grpo", prompts=2, group=4, prompt_len=16, completion_len=32, beta=0.0,
                           max_staleness=1, worker_threads=1),
    },
    "gpu": {
        "grpo beta=0": dict(method="grpo", prompts=8, group=8, prompt_len=128, completion_len=256, beta=0.0),
        "grpo beta=0.04": dict(method="grpo", prompts=8, group=8, prompt_len=128, completion_len=256, beta=0.04),
        "dpo live": dict(method="dpo", pairs=8, prompt_len=512, completion_len=512, reference="live"),
        "dpo precomputed": dict(method="dpo", pairs=8, prompt_len=512, completion_len=512, reference="precomputed"),
        # trainer and rollout worker time-share the one GPU; worker_threads None: fastrl's default
        "grpo async": dict(method="grpo", prompts=8, group=8, prompt_len=128, completion_len=256, beta=0.0,
                           max_staleness=1, worker_threads=None),
    },
}
# steps timed per process, warm-up steps before them, processes per contender; CPU threads per process
RUN = {"cpu": dict(warmup=3, steps=20, rounds=4, threads=1), "gpu": dict(warmup=2, steps=3, rounds=1, threads=0)}
CONTENDERS = ["fastrl", "trl", "fastrl-async"]  # every contender a worker process can run
# Who runs each case, and the CPU threads of each contender's process (None: the run's ``threads``
# setting, FASTRL_BENCH_TRAINER_THREADS / --threads). A case not named here runs DEFAULT_CONTENDERS.
# "grpo async" compares at equal cores, 2 on CPU: fastrl-async's trainer process (1 thread) and its
# rollout worker (the case's worker_threads, 1), against fastrl and TRL in one process of 2 threads.
DEFAULT_CONTENDERS = [("fastrl", None), ("trl", None)]
CASE_CONTENDERS = {
    "cpu": {"grpo async": [("fastrl-async", 1), ("fastrl", 2), ("trl", 2)]},
    "gpu": {"grpo async": [("fastrl-async", None), ("fastrl", None)]},
}
LEARNING_RATE = 1e-5
DPO_BETA = 0.1
SPECIAL = ["<pad>", "<eos>", "<bos>"]  # ids 0, 1, 2; data tokens are drawn from the other ids
EOS = 1


def case_contenders(scale: str, case_name: str, threads: int) -> list[tuple[str, int]]:
    """``(contender, threads)`` of each contender of a case, in the order the rounds run them.

    Args:
        scale: ``"cpu"`` or ``"gpu"``.
        case_name: a key of ``CASES[scale]``.
        threads: the run's CPU threads per process (stands for a contender's None).

    Returns:
        The pairs of ``CASE_CONTENDERS`` (``DEFAULT_CONTENDERS`` for a case it does not name).
    """
    pairs = CASE_CONTENDERS.get(scale, {}).get(case_name, DEFAULT_CONTENDERS)
    return [(c, threads if t is None else t) for c, t in pairs]


def settings(scale: str) -> dict:
    """``RUN[scale]`` with the FASTRL_BENCH_TRAINER_{WARMUP,STEPS,ROUNDS,THREADS} overrides."""
    out = dict(RUN[scale])
    for key in out:
        value = os.environ.get(f"FASTRL_BENCH_TRAINER_{key.upper()}")
        if value:
            out[key] = int(value)
    return out


def tokens_per_step(case: dict) -> int:
    if case["method"] == "grpo":
        return case["prompts"] * case["group"] * (case["prompt_len"] + case["completion_len"])
    return 2 * case["pairs"] * (case["prompt_len"] + case["completion_len"])


def reward_even_tokens(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """The reward of both sides, in TRL's form (both call it alike: text as ``completions``, the token
    ids as ``completion_ids``): the fraction of even token ids in each completion."""
    return [sum(t % 2 == 0 for t in c) / max(len(c), 1) for c in completion_ids]


# ---------------------------------------------------------------------------------------------- setup

def build_model_dir(root: Path, scale: str) -> Path:
    """A seeded random Qwen2 of ``MODEL[scale]`` (fp32 on CPU, bf16 on GPU) saved in ``root/model``, and a
    word-level tokenizer over its whole vocabulary (``<pad> <eos> <bos> w3 w4 ...``) in ``root/tokenizer``
    (a directory of its own: next to a qwen2 config.json, transformers 5's AutoTokenizer would load it
    as a Qwen2Tokenizer with a byte-level pre-tokenizer)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    fields = MODEL[scale]
    words = SPECIAL + [f"w{i}" for i in range(len(SPECIAL), fields["vocab_size"])]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    fast.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    config = Qwen2Config(**fields, pad_token_id=0, eos_token_id=EOS, bos_token_id=2)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16 if scale == "gpu" else torch.float32)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = 0
    model.save_pretrained(root / "model")
    return root


def write_data(path: Path, case: dict, rows: int, vocab: int, seed: int = 0) -> Path:
    """``rows`` examples of fixed lengths as JSONL, each cell twice: token ids (fastrl reads ids
    as they are) and the same tokens as text (TRL tokenises text)."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(len(SPECIAL), vocab) for _ in range(n)]

    def text(ids: list[int]) -> str:
        return " ".join("<eos>" if t == EOS else f"w{t}" for t in ids)

    with open(path, "w") as f:
        for _ in range(rows):
            prompt = tokens(case["prompt_len"])
            row = {"prompt": prompt, "prompt_text": text(prompt) + " "}
            if case["method"] == "dpo":  # completions end with EOS (TRL appends one to text that lacks it)
                for column in ("chosen", "rejected"):
                    ids = tokens(case["completion_len"] - 1) + [EOS]
                    row[column], row[f"{column}_text"] = ids, text(ids)
            f.write(json.dumps(row) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- worker

def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss() -> int:
    peak = _proc_status("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return peak


def _children_peak_rss() -> int:
    """The peak RSS of this process's largest child that has exited and been waited for: the kernel's
    high-water RSS (the counter VmHWM shows) kept at its exit, ``getrusage(RUSAGE_CHILDREN).ru_maxrss``.
    fastrl-async's rollout worker is such a child once the run has closed it (joined)."""
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux


class _DevicePeak:
    """The device-wide GPU memory in use (``torch.cuda.mem_get_info``: every process on it, CUDA
    contexts included) sampled every ``interval`` seconds in a thread; ``peak_bytes`` is its highest
    value above the memory in use when sampling started."""

    def __init__(self, interval: float = 0.01):
        import threading

        import torch

        self.torch, self.interval = torch, interval
        self.base = self.peak = self._used()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _used(self) -> int:
        free, total = self.torch.cuda.mem_get_info()
        return total - free

    def _loop(self) -> None:
        while not self.done.wait(self.interval):
            self.peak = max(self.peak, self._used())

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self._used())

    @property
    def peak_bytes(self) -> int:
        return self.peak - self.base


def _summary(periods: list[float], phases: list[dict[str, float]], tokens: int) -> dict:
    """tokens/s over the timed periods and each phase's mean seconds per timed step."""
    names = sorted({k for p in phases for k in p})
    return {"periods_s": periods, "tokens_per_step": tokens, "tokens_per_s": tokens * len(periods) / sum(periods),
            "phases_s": {k: statistics.fmean(p.get(k, 0.0) for p in phases) for k in names}}


def fastrl_config(case: dict, root: Path, data: Path, out: Path, total: int, cuda: bool, *,
                  asynchronous: bool = False):
    """fastrl's config of a case: a :class:`~fastrl.train.GRPOConfig` or :class:`~fastrl.train.DPOConfig`.

    Args:
        case: one of ``CASES[scale]``.
        root: the workspace (``model/``, ``tokenizer/``).
        data: the case's JSONL.
        out: the run's output directory.
        total: optimiser steps.
        cuda: bf16 on CUDA, else fp32 on CPU.
        asynchronous: GRPO with ``async_rollout`` (the case's ``max_staleness`` and ``worker_threads``).

    Returns:
        The validated config.
    """
    from fastrl.train import DPOConfig, GRPOConfig

    common = dict(model=str(root / "model"), tokenizer=str(root / "tokenizer"), train_data=str(data),
                  output_dir=str(out), max_steps=total, max_prompt_length=case["prompt_len"],
                  max_completion_length=case["completion_len"],
                  dtype="bfloat16" if cuda else "float32", learning_rate=LEARNING_RATE, lr_scheduler="constant",
                  max_grad_norm=1.0, log_every=1, progress=False, save_every=0, keep_checkpoints=1, seed=0,
                  device="cuda" if cuda else "cpu")
    if asynchronous and (case["method"] != "grpo" or "max_staleness" not in case):
        raise ValueError(f"fastrl-async runs a GRPO case with max_staleness, not {case}")
    if case["method"] == "grpo":
        if asynchronous:
            common["async_rollout"] = {"enabled": True, "max_staleness": case["max_staleness"],
                                       "threads": case.get("worker_threads")}
        return GRPOConfig(**common, batch_size=case["prompts"], num_generations=case["group"], stop_token_ids=[],
                          reward_funcs=[reward_even_tokens], temperature=1.0, loss_type="dapo", epsilon=0.2,
                          beta=case["beta"], num_iterations=1, log_completions=0)
    return DPOConfig(**common, batch_size=case["pairs"], loss_type="sigmoid", beta=DPO_BETA,
                     reference=case["reference"])


def run_fastrl(case: dict, root: Path, data: Path, out: Path, total: int, warmup: int, cuda: bool, *,
               asynchronous: bool = False) -> dict:
    """fastrl's run of a case (:func:`fastrl_config`), checked and summarised.

    Returns:
        :func:`_summary`'s dict; with ``asynchronous`` also ``staleness_mean`` (over every step),
        ``worker_threads`` and ``worker_phases_s`` (the worker's mean seconds per timed step of
        rollout and reward, concurrent with the trainer's phases).
    """
    from fastrl.train import train

    config = fastrl_config(case, root, data, out, total, cuda, asynchronous=asynchronous)
    history = train(config).history
    if len(history) != total:
        raise RuntimeError(f"fastrl logged {len(history)} steps, expected {total}")
    for record in history:
        if record["tokens"] != tokens_per_step(case):
            raise RuntimeError(f"fastrl processed {record['tokens']} tokens in a step, expected "
                               f"{tokens_per_step(case)}")
        if case["method"] == "grpo" and record["completions/min_length"] != case["completion_len"]:
            raise RuntimeError(f"fastrl completion shorter than {case['completion_len']}: {record}")
        if asynchronous and not 0 <= record.get("async/staleness", -1) <= case["max_staleness"]:
            raise RuntimeError(f"fastrl-async step without a staleness in [0, {case['max_staleness']}]: {record}")
    ends = [h["elapsed_s"] for h in history]
    periods = [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:])]
    # time/<phase> are seconds; time/reward_share is a fraction of the step
    phases = [{k[len("time/"):]: v for k, v in h.items() if k.startswith("time/") and not k.endswith("_share")}
              for h in history[warmup:]]
    for p, period in zip(phases, periods):
        p["other"] = period - sum(p.values())
    out = _summary(periods, phases, tokens_per_step(case))
    if asynchronous:
        out["staleness_mean"] = statistics.fmean(h["async/staleness"] for h in history)
        threads = history[-1].get("async/worker_threads")
        out["worker_threads"] = None if threads is None else int(threads)
        names = sorted({k for h in history[warmup:] for k in h if k.startswith("worker/") and k.endswith("_s")})
        out["worker_phases_s"] = {k[len("worker/"):-len("_s")]: statistics.fmean(h.get(k, 0.0)
                                                                                 for h in history[warmup:])
                                  for k in names}
    return out


def run_trl(case: dict, root: Path, data: Path, out: Path, total: int, warmup: int, cuda: bool) -> dict:
    import torch
    import trl
    from datasets import load_dataset
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    from transformers import AutoTokenizer, TrainerCallback

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class StepClock(TrainerCallback):
        """Wall-clock time at the end of each optimiser step, and the phases timed during it."""

        def __init__(self):
            self.ends: list[float] = []
            self.steps: list[dict[str, float]] = []
            self.current: dict[str, float] = defaultdict(float)
            self.in_prepare = False

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.ends.append(time.perf_counter())
            self.steps.append(dict(self.current))
            self.current.clear()

    clock = StepClock()

    def timed(obj, name: str, phase: str):
        fn = getattr(obj, name)

        def wrapper(*args, **kwargs):
            sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                clock.current[phase] += time.perf_counter() - start

        setattr(obj, name, wrapper)

    def text_dataset(columns: list[str]):
        # through a JSONL file: datasets' fingerprint of an in-memory table (Dataset.from_list) fails to
        # pickle with pyarrow 26 (MonthDayNano)
        path = out / "text.jsonl"
        with open(path, "w") as f:
            for line in data.read_text().splitlines():
                row = json.loads(line)
                f.write(json.dumps({c: row[f"{c}_text"] for c in columns}) + "\n")
        return load_dataset("json", data_files=str(path), split="train", cache_dir=str(out / "datasets"))

    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    common = dict(output_dir=str(out), max_steps=total, learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
                  max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                  activation_checkpointing=False, dataloader_num_workers=0, seed=0,
                  model_init_kwargs={"dtype": "bfloat16" if cuda else "float32"},
                  **({"bf16": True} if cuda else {"use_cpu": True, "bf16": False}))
    if case["method"] == "grpo":
        tokenizer.padding_side = "left"
        dataset = text_dataset(["prompt"])
        args = trl.GRPOConfig(**common, per_device_train_batch_size=case["prompts"] * case["group"],
                              num_generations=case["group"], max_completion_length=case["completion_len"],
                              generation_kwargs={"min_new_tokens": case["completion_len"]}, temperature=1.0,
                              loss_type="dapo", epsilon=0.2, beta=case["beta"], num_iterations=1)
        trainer = trl.GRPOTrainer(model=str(root / "model"), reward_funcs=[reward_even_tokens], args=args,
                                  train_dataset=dataset, processing_class=tokenizer, callbacks=[clock])
        timed(trainer, "_generate", "rollout")
        timed(trainer, "_calculate_rewards", "reward")
    else:
        dataset = text_dataset(["prompt", "chosen", "rejected"])
        args = trl.DPOConfig(**common, per_device_train_batch_size=case["pairs"], beta=DPO_BETA, loss_type=["sigmoid"],
                             precompute_ref_log_probs=case["reference"] == "precomputed", max_length=None)
        trainer = trl.DPOTrainer(model=str(root / "model"), args=args, train_dataset=dataset,
                                 processing_class=tokenizer, callbacks=[clock])
        for example in trainer.train_dataset:
            n = len(example["prompt_ids"]) + len(example["chosen_ids"]) + len(example["prompt_ids"]) \
                + len(example["rejected_ids"])
            if n != 2 * (case["prompt_len"] + case["completion_len"]):
                raise RuntimeError(f"TRL tokenised a pair to {n} tokens, expected "
                                   f"{2 * (case['prompt_len'] + case['completion_len'])}")
    prepare, step = trainer._prepare_inputs, trainer.training_step

    def prepare_inputs(*args, **kwargs):
        clock.in_prepare = True
        start = time.perf_counter()
        try:
            return prepare(*args, **kwargs)
        finally:
            sync()
            clock.current["_prepare"] += time.perf_counter() - start
            clock.in_prepare = False

    trainer._prepare_inputs = prepare_inputs
    trainer.training_step = step
    timed(trainer, "training_step", "_training_step")
    if getattr(trainer, "ref_model", None) is not None:
        starts = []

        def pre_hook(module, args, kwargs=None):
            sync()
            starts.append(time.perf_counter())

        def post_hook(module, args, output):
            sync()
            where = "_reference_in_prepare" if clock.in_prepare else "_reference_outside"
            clock.current[where] += time.perf_counter() - starts.pop()

        trainer.ref_model.register_forward_pre_hook(pre_hook)
        trainer.ref_model.register_forward_hook(post_hook)
    optimizer_start = []

    def optimizer_pre(optimizer, args, kwargs):
        sync()
        optimizer_start.append(time.perf_counter())

    def optimizer_post(optimizer, args, kwargs):
        sync()
        clock.current["optimizer"] += time.perf_counter() - optimizer_start.pop()

    pre = register_optimizer_step_pre_hook(optimizer_pre)
    post = register_optimizer_step_post_hook(optimizer_post)
    try:
        trainer.train()
    finally:
        pre.remove()
        post.remove()
    if len(clock.ends) != total:
        raise RuntimeError(f"TRL ran {len(clock.ends)} steps, expected {total}")
    if trainer.args.gradient_checkpointing:
        raise RuntimeError("TRL ran with gradient checkpointing")
    if case["method"] == "grpo":
        lengths = [h for h in trainer.state.log_history if "completions/min_length" in h]
        short = [h["completions/min_length"] for h in lengths if h["completions/min_length"] != case["completion_len"]]
        if len(lengths) != total or short:
            raise RuntimeError(f"TRL completions were not all {case['completion_len']} tokens: {short}")
        seen = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
        steps_tokens = [b - a for a, b in zip([0.0] + seen, seen)]
        if any(t != tokens_per_step(case) for t in steps_tokens):
            raise RuntimeError(f"TRL processed {steps_tokens} tokens per step, expected {tokens_per_step(case)}")
    periods = [b - a for a, b in zip(clock.ends[warmup - 1:], clock.ends[warmup:])]
    phases = []
    for raw, period in zip(clock.steps[warmup:], periods):
        ref_in, ref_out = raw.get("_reference_in_prepare", 0.0), raw.get("_reference_outside", 0.0)
        p = {"rollout": raw.get("rollout", 0.0), "reward": raw.get("reward", 0.0), "reference": ref_in + ref_out,
             "train": raw.get("_training_step", 0.0) - raw.get("_prepare", 0.0) - ref_out,
             "prepare_other": raw.get("_prepare", 0.0) - raw.get("rollout", 0.0) - raw.get("reward", 0.0) - ref_in,
             "optimizer": raw.get("optimizer", 0.0)}
        p["other"] = period - sum(p.values())
        phases.append(p)
    return _summary(periods, phases, tokens_per_step(case))


def worker(contender: str, scale: str, case_name: str, workdir: Path, output: Path, warmup: int, steps: int,
           threads: int) -> None:
    """One contender's run in this (fresh) process; writes its result JSON to ``output``.

    ``peak_rss_bytes`` is this process's VmHWM; for fastrl-async it is that plus the rollout worker's
    peak (:func:`_children_peak_rss`, read after the run has joined the worker): ``trainer_peak_rss_bytes``
    and ``worker_peak_rss_bytes`` are the two parts. The sum of the two peaks is an upper bound of the
    pair's peak: pages both map (the shared copy of the weights) count in each. On GPU, a case with
    ``max_staleness`` also records ``cuda_device_peak_bytes`` (:class:`_DevicePeak`, both processes
    of fastrl-async) beside the trainer process's allocator peak ``cuda_peak_bytes``."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    cuda = scale == "gpu"
    result: dict = {"contender": contender, "case": case_name, "threads": torch.get_num_threads()}
    try:
        if contender == "trl":
            import trl
            from trl import DPOTrainer, GRPOTrainer  # noqa: F401  (trl imports lazily: load them before the base RSS)

            result["version"] = trl.__version__
        else:
            import fastrl.train  # noqa: F401  (imported before the base RSS is read, as trl is)

            result["version"] = importlib.metadata.version("fastrl")
    except Exception as e:  # a missing or broken install: skip with the reason
        result["skipped"] = f"{contender} is not importable: {type(e).__name__}: {e}"
        output.write_text(json.dumps(result))
        return
    import transformers

    result["transformers"] = transformers.__version__
    result["base_rss_bytes"] = _proc_status("VmRSS")
    case = CASES[scale][case_name]
    out = Path(tempfile.mkdtemp(prefix=f"{contender}-", dir=workdir))
    args = (case, workdir, workdir / f"{_slug(case_name)}.jsonl", out, warmup + steps, warmup, cuda)
    device_peak = _DevicePeak() if cuda and "max_staleness" in case else contextlib.nullcontext()
    with device_peak:
        if contender == "trl":
            result.update(run_trl(*args))
        else:
            result.update(run_fastrl(*args, asynchronous=contender == "fastrl-async"))
    result["peak_rss_bytes"] = _peak_rss()
    if contender == "fastrl-async":
        result["trainer_peak_rss_bytes"] = result["peak_rss_bytes"]
        result["worker_peak_rss_bytes"] = _children_peak_rss()
        if not result["worker_peak_rss_bytes"]:
            raise RuntimeError("fastrl-async: no exited child process: the rollout worker was not joined")
        result["peak_rss_bytes"] += result["worker_peak_rss_bytes"]
    if cuda:
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
        if isinstance(device_peak, _DevicePeak):
            result["cuda_device_peak_bytes"] = device_peak.peak_bytes
    shutil.rmtree(out, ignore_errors=True)
    output.write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------- driver

def _slug(name: str) -> str:
    return name.replace(" ", "_").replace("=", "")


def _env(threads: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", WANDB_DISABLED="true",
               TRL_EXPERIMENTAL_SILENCE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


@contextlib.contextmanager
def workspace(scale: str, cases: list[str], rows: int):
    """A temporary directory with the model and each case's data."""
    root = Path(tempfile.mkdtemp(prefix="fastrl-bench-trainer-"))
    try:
        build_model_dir(root, scale)
        for name in cases:
            write_data(root / f"{_slug(name)}.jsonl", CASES[scale][name], rows, MODEL[scale]["vocab_size"])
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def measure_case(scale: str, case_name: str, *, contenders=None, warmup: int, steps: int, rounds: int,
                 threads: int, workdir: Path, log=print) -> dict[str, dict]:
    """Each contender's runs of one case, alternating contenders (A, B, A, B ...), one process each.

    Args:
        contenders: names (each with ``threads``) or ``(name, threads)`` pairs; None: the case's
            :func:`case_contenders`.
        threads: CPU threads per process (OMP_NUM_THREADS and torch's) of a contender given by name.

    Returns:
        Per contender: ``runs`` (each worker's result), or ``skipped`` with the reason.
    """
    if contenders is None:
        contenders = case_contenders(scale, case_name, threads)
    pairs = [(c, threads) if isinstance(c, str) else tuple(c) for c in contenders]
    results: dict[str, dict] = {c: {"runs": []} for c, _ in pairs}
    for r in range(rounds):
        for contender, threads in pairs:
            if "skipped" in results[contender]:
                continue
            env = _env(threads)
            output = workdir / f"result-{contender}-{_slug(case_name)}-{r}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", contender, "--case", case_name,
                   "--device", scale, "--workdir", str(workdir), "--output", str(output), "--warmup", str(warmup),
                   "--steps", str(steps), "--threads", str(threads)]
            started = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0 or not output.exists():
                raise RuntimeError(f"{contender} worker for {case_name!r} failed ({proc.returncode}):\n"
                                   f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
            run = json.loads(output.read_text())
            if "skipped" in run:
                results[contender] = {"skipped": run["skipped"]}
                log(f"  {case_name} {contender}: skipped: {run['skipped']}")
                continue
            results[contender]["runs"].append(run)
            log(f"  {case_name} round {r + 1} {contender}: {run['tokens_per_s']:.0f} tokens/s, peak RSS "
                f"{run['peak_rss_bytes'] / 2**20:.0f} MiB ({time.perf_counter() - started:.1f} s with start-up)")
    return results


def aggregate(runs: list[dict]) -> dict:
    """Medians over rounds: tokens/s, peak memory, each phase; every round's values kept."""
    phases = sorted({k for r in runs for k in r["phases_s"]})
    out = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
           "tokens_per_s_rounds": [r["tokens_per_s"] for r in runs],
           "tokens_per_step": runs[0]["tokens_per_step"],
           "step_s": statistics.median(p for r in runs for p in r["periods_s"]),
           "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in runs),
           "peak_rss_bytes_rounds": [r["peak_rss_bytes"] for r in runs],
           "base_rss_bytes": statistics.median(r["base_rss_bytes"] for r in runs),
           "phases_s": {k: statistics.median(r["phases_s"].get(k, 0.0) for r in runs) for k in phases},
           "version": runs[0]["version"], "transformers": runs[0]["transformers"], "threads": runs[0]["threads"]}
    for key in ("cuda_peak_bytes", "cuda_device_peak_bytes", "trainer_peak_rss_bytes", "worker_peak_rss_bytes",
                "staleness_mean"):
        if key in runs[0]:
            out[key] = statistics.median(r[key] for r in runs)
    if "worker_phases_s" in runs[0]:  # fastrl-async: its rollout worker
        out["worker_threads"] = runs[0]["worker_threads"]
        names = sorted({k for r in runs for k in r["worker_phases_s"]})
        out["worker_phases_s"] = {k: statistics.median(r["worker_phases_s"].get(k, 0.0) for r in runs) for k in names}
    return out


# ---------------------------------------------------------------------------------------------- pytest

try:
    import pytest
except ImportError:  # the worker and the command line need no pytest
    pytest = None

_MEASURED: dict[str, dict] = {}
_WORKDIR: dict[str, Path] = {}


def _measured(case_name: str) -> dict[str, dict]:
    """One paired measurement per case, shared by its contenders' tests."""
    if case_name not in _MEASURED:
        run = settings(SCALE)
        if "root" not in _WORKDIR:
            stack = contextlib.ExitStack()
            _WORKDIR["root"] = stack.enter_context(workspace(SCALE, list(CASES[SCALE]), _rows(run)))
            import atexit

            atexit.register(stack.close)
        contenders = [(c, t) for c, t in case_contenders(SCALE, case_name, run["threads"])
                      if c != "trl" or importlib.util.find_spec("trl") is not None]
        _MEASURED[case_name] = measure_case(SCALE, case_name, contenders=contenders, warmup=run["warmup"],
                                            steps=run["steps"], rounds=run["rounds"], threads=run["threads"],
                                            workdir=_WORKDIR["root"], log=lambda *a: None)
        if "trl" in dict(case_contenders(SCALE, case_name, run["threads"])) and "trl" not in dict(contenders):
            _MEASURED[case_name]["trl"] = {"skipped": "trl is not installed (pip install trl, or .[peers])"}
    return _MEASURED[case_name]


def _rows(run: dict) -> int:
    """Examples per data file: enough that no run wraps an epoch."""
    most = max(c.get("pairs", 0) or c["prompts"] for c in CASES[SCALE].values())
    return most * (run["warmup"] + run["steps"])


def _record(benchmark, case_name: str, contender: str, result: dict, measured: dict[str, dict]) -> None:
    case = CASES[SCALE][case_name]
    agg = aggregate(result["runs"])
    benchmark.group = f"train_step {case_name} " + (
        f"P={case['prompts']} G={case['group']} prompt={case['prompt_len']} completion={case['completion_len']}"
        if case["method"] == "grpo" else f"pairs={case['pairs']} prompt={case['prompt_len']} "
                                         f"completion={case['completion_len']}")
    # pytest-benchmark times a call in this process; a step runs in a worker process (its own peak
    # memory), so the statistics are the step periods the workers measured, every round's.
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.stats.stats.data[:] = [p for r in result["runs"] for p in r["periods_s"]]
    extra = {"op": "train_step", "contender": contender, "case": case_name, **case, "device": "cuda" if SCALE == "gpu"
             else "cpu", "device_name": _device().device_name(), "model": {k: v for k, v in MODEL[SCALE].items()
                                                                  if k != "max_position_embeddings"},
             "dtype": "bfloat16" if SCALE == "gpu" else "float32", **settings(SCALE), **agg,
             "median_s": agg["step_s"]}
    if "worker_threads" in agg:  # fastrl-async: the trainer's threads and the rollout worker's
        extra["cores"] = agg["threads"] + (agg["worker_threads"] or 0)
    # the whole process (no inputs); on GPU in the async case, the device's (both of fastrl-async's processes)
    extra["peak_extra_bytes"] = agg.get("cuda_device_peak_bytes", agg.get("cuda_peak_bytes", agg["peak_rss_bytes"]))
    extra.update(ratios(result["runs"], {c: r["runs"] for c, r in measured.items() if c != contender and "runs" in r}))
    benchmark.extra_info.update(extra)


def ratios(mine: list[dict], others: dict[str, list[dict]]) -> dict:
    """This contender's tokens/s over each other's, the median of the per-round ratios (round r of
    each ran back to back, under the same load), and its peak memory over theirs (medians)."""
    out: dict[str, dict] = {}
    agg = aggregate(mine)
    for c, runs in others.items():
        theirs = aggregate(runs)
        per_round = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(mine, runs)]
        out.setdefault("tokens_per_s_ratio_to", {})[c] = statistics.median(per_round)
        out.setdefault("tokens_per_s_ratio_rounds", {})[c] = per_round
        out.setdefault("peak_rss_ratio_to", {})[c] = agg["peak_rss_bytes"] / theirs["peak_rss_bytes"]
        for key in ("cuda_peak_bytes", "cuda_device_peak_bytes"):
            if key in agg and theirs.get(key):
                out.setdefault(key.replace("_bytes", "_ratio_to"), {})[c] = agg[key] / theirs[key]
    return out


def _device():
    """benchmarks/device.py (results directory, device name)."""
    sys.path.insert(0, str(HERE))
    try:
        import device
    finally:
        sys.path.remove(str(HERE))
    return device


if pytest is not None and __name__ != "__main__":
    PARAMS = [(case, c) for case in CASES[SCALE] for c, _ in case_contenders(SCALE, case, 0)]

    @pytest.mark.parametrize("case,contender", PARAMS,
                             ids=[f"{_slug(case)}-{c}" for case, c in PARAMS])
    def test_train_step(benchmark, case, contender):
        pytest.importorskip("transformers")
        measured = _measured(case)
        result = measured[contender]
        if "skipped" in result:
            pytest.skip(result["skipped"])
        _record(benchmark, case, contender, result, measured)


# ---------------------------------------------------------------------------------------------- command line

def table(path: str) -> str:
    """Markdown: tokens/s of each side and their ratio, peak memory, and each side's phases."""
    data = json.loads(Path(path).read_text())
    by_case: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in data["benchmarks"]:
        by_case[b["extra_info"]["case"]][b["extra_info"]["contender"]] = b["extra_info"]
    cuda = any(e.get("cuda_peak_bytes") for runs in by_case.values() for e in runs.values())
    mem = "CUDA peak (MiB)" if cuda else "peak RSS (MiB)"
    lines = [f"| case | fastrl tokens/s | TRL tokens/s | fastrl / TRL | fastrl {mem} | TRL {mem} | fastrl / TRL "
             f"memory |", "|---|---|---|---|---|---|---|"]
    key = "cuda_peak_bytes" if cuda else "peak_rss_bytes"
    def cell(e, k, scale=1.0):
        return f"{e[k] / scale:.0f}" if e and e.get(k) is not None else "-"

    for case, runs in by_case.items():
        f, t = runs.get("fastrl"), runs.get("trl")
        ratio = f"{f['tokens_per_s_ratio_to']['trl']:.2f}x" if f and t else "-"
        mratio = f"{f[key] / t[key]:.2f}" if f and t else "-"
        lines.append(f"| {case} | {cell(f, 'tokens_per_s')} | {cell(t, 'tokens_per_s')} | {ratio} | "
                     f"{cell(f, key, 2**20)} | {cell(t, key, 2**20)} | {mratio} |")
    lines += ["", "tokens/s: median over rounds; fastrl / TRL: median of the per-round ratios (each round ran "
              "both back to back)."]
    lines += _async_table(by_case, cuda)
    lines += ["", "Phases (ms per step, median over rounds of the mean over timed steps):", "",
              "| case | contender | step | rollout | reward | reference | train | optimizer | wait | other |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for case, runs in by_case.items():
        for contender, e in sorted(runs.items()):
            p = dict(e["phases_s"])
            if "prepare_other" in p:  # TRL's data preparation besides rollout / reward / reference
                p["other"] = p.get("other", 0.0) + p.pop("prepare_other")
            if "data" in p:  # fastrl DPO's batch building
                p["other"] = p.get("other", 0.0) + p.pop("data")
            cells = [f"{p.get(k, 0.0) * 1e3:.1f}" for k in ("rollout", "reward", "reference", "train", "optimizer",
                                                           "wait", "other")]
            lines.append(f"| {case} | {contender} | {e['step_s'] * 1e3:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _async_table(by_case: dict[str, dict[str, dict]], cuda: bool) -> list[str]:
    """The cases with a fastrl-async contender: each contender's cores, tokens/s and peak memory, and
    fastrl-async's ratios to the others (its tokens/s ratio: the median of the per-round ratios)."""
    cases = {case: runs for case, runs in by_case.items() if "fastrl-async" in runs}
    if not cases:
        return []
    mem = "device peak (MiB)" if cuda else "peak RSS (MiB)"
    lines = ["", "Asynchronous rollout at equal cores (fastrl-async: the trainer process and its rollout worker; "
             "fastrl, TRL: one process):", "",
             f"| case | contender | cores | tokens/s | {mem} | fastrl-async / contender tokens/s | "
             f"fastrl-async / contender memory |", "|---|---|---|---|---|---|---|"]
    notes = []
    for case, runs in cases.items():
        a = runs["fastrl-async"]
        key = "cuda_device_peak_bytes" if cuda else "peak_rss_bytes"
        for contender in ["fastrl-async"] + sorted(c for c in runs if c != "fastrl-async"):
            e = runs[contender]
            name = "TRL" if contender == "trl" else contender
            cores = (f"{e['threads']} + {e.get('worker_threads')}" if contender == "fastrl-async"
                     else str(e["threads"]))
            memory = f"{e[key] / 2**20:.0f}" if e.get(key) is not None else "-"
            if contender == "fastrl-async":
                ratio = mratio = "-"
            else:
                r = a.get("tokens_per_s_ratio_to", {}).get(contender)
                ratio = f"{r:.2f}x" if r is not None else "-"
                mratio = f"{a[key] / e[key]:.2f}" if a.get(key) and e.get(key) else "-"
            lines.append(f"| {case} | {name} | {cores} | {e['tokens_per_s']:.0f} | {memory} | {ratio} | {mratio} |")
        worker = a.get("worker_phases_s", {})
        parts = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in worker.items())
        part = f"; worker ms per step: {parts}" if parts else ""
        notes.append(f"{case}: fastrl-async max_staleness {a.get('max_staleness')}, mean staleness "
                     f"{a.get('staleness_mean', float('nan')):.2f}, trainer waits "
                     f"{a['phases_s'].get('wait', 0.0) * 1e3:.1f} ms per step{part}"
                     + (f"; peak RSS trainer {a['trainer_peak_rss_bytes'] / 2**20:.0f} + worker "
                        f"{a['worker_peak_rss_bytes'] / 2**20:.0f} MiB" if a.get("worker_peak_rss_bytes") else ""))
    return lines + [""] + notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="scale: tiny fp32 CPU model, or "
                        "Qwen2-0.5B shape in bf16 on CUDA")
    parser.add_argument("--warmup", type=int, help="warm-up steps per process")
    parser.add_argument("--steps", type=int, help="timed steps per process")
    parser.add_argument("--rounds", type=int, help="processes per contender, alternating")
    parser.add_argument("--threads", type=int, help="torch threads per process on CPU (0 = torch's default)")
    parser.add_argument("--json", help="pytest-benchmark JSON (default benchmarks/results/<device>/bench_trainer.json)")
    parser.add_argument("-k", dest="select", help="pytest -k expression (e.g. 'grpo')")
    # worker mode (one contender in a fresh process)
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.device, args.case, Path(args.workdir), Path(args.output), args.warmup, args.steps,
               args.threads)
        return 0
    for key in ("warmup", "steps", "rounds", "threads"):
        if getattr(args, key) is not None:
            os.environ[f"FASTRL_BENCH_TRAINER_{key.upper()}"] = str(getattr(args, key))
    os.environ["FASTRL_BENCH_SCALE"] = args.device
    if args.device == "gpu":
        import torch

        if not torch.cuda.is_available():
            print("--device gpu needs a CUDA device", file=sys.stderr)
            return 2
    path = args.json or os.path.join(_device().results_dir(), "bench_trainer.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    import pytest as _pytest

    code = _pytest.main([str(Path(__file__).resolve()), "--benchmark-only", f"--benchmark-json={path}", "-q",
                         "-p", "no:cacheprovider", *(["-k", args.select] if args.select else [])])
    if os.path.exists(path):
        print(table(path))
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
