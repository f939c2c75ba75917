"""Learning curves of GRPO, synchronous and with an asynchronous rollout worker (GitHub issue 19).

    python benchmarks/async_curves.py                 # 100 steps each: JSON (+ PNG) in results/<device>/
    python benchmarks/async_curves.py --steps 3 --out /tmp/curves

Both runs train the same toy task from the same seed: a tiny random Qwen2 (built from a config, vocab 64)
learns to emit one target token (:func:`emits_target`, the fraction of completion tokens equal to the
row's ``target``), 4 prompts x 8 completions of 8 tokens per step, lr 2e-2 constant. The synchronous run
samples each step with the weights of every update so far; the asynchronous one
(``async_rollout: {enabled: true, max_staleness: K}``, K = 1 by default) lets a worker process sample step
``s`` with weights up to K updates old while the trainer trains (GRPO then applies its truncated
importance-sampling correction, ``is_cap`` 3 by default). The question is whether the lag costs reward:
the JSON holds both reward curves (``reward/mean`` of each step), the mean of each over its last 10 steps
(fewer when ``--steps`` is smaller), each run's wall-clock seconds and, for the async run, each step's
staleness. Threads: the synchronous run is one process of ``--threads`` intra-op threads; the async run is
that trainer plus a worker of ``--threads`` threads (the wall times are not at equal cores; the reward
curves are the point, ``bench_trainer.py``'s "grpo async" case is the throughput comparison).

Output: ``<out>/async_curves.json`` and, when matplotlib is installed, ``<out>/async_curves.png`` (the
plot is skipped with a note otherwise). ``--out`` defaults to ``benchmarks/results/<device>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TINY_QWEN2 = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 128}
TARGET = 7
# the toy run's settings, both modes (the record repeats them)
SETTINGS = dict(batch_size=4, num_generations=8, max_completion_length=8, learning_rate=2e-2)
LAST = 10  # the final mean: the last LAST steps


def emits_target(prompt_ids, completion_ids, target=TARGET, **columns) -> float:
    """The toy reward: the fraction of completion tokens equal to the row's ``target``."""
    return sum(t == target for t in completion_ids) / max(len(completion_ids), 1)


def write_prompts(path: Path, rows: int = 64, seed: int = 0) -> Path:
    """``rows`` prompts of 3 to 6 random token ids (8 .. vocab-1), each with ``target``, as JSONL."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            prompt = [rng.randrange(8, TINY_QWEN2["vocab_size"]) for _ in range(rng.randint(3, 6))]
            f.write(json.dumps({"prompt": prompt, "target": TARGET}) + "\n")
    return path


def train_curve(data: Path, out: Path, *, steps: int, seed: int, threads: int, max_staleness: int | None) -> dict:
    """One GRPO run of the toy task.

    Args:
        data: the prompts (:func:`write_prompts`).
        out: the run's output directory.
        steps: optimiser steps.
        seed: the run's seed.
        threads: the async worker's intra-op threads (the trainer's are set by the caller).
        max_staleness: None for the synchronous run, else the async run's K.

    Returns:
        ``reward`` (per step), ``final_mean`` (last :data:`LAST` steps), ``wall_s``; async also
        ``staleness`` per step.
    """
    from fastrl.train import GRPOConfig, train

    fields = dict(model_config=dict(TINY_QWEN2), train_data=str(data), output_dir=str(out), **SETTINGS,
                  max_steps=steps, lr_scheduler="constant", progress=False, seed=seed, reward_funcs=[emits_target],
                  log_completions=0, log_every=1, save_every=0)
    if max_staleness is not None:
        fields["async_rollout"] = {"enabled": True, "max_staleness": max_staleness, "threads": threads}
    start = time.perf_counter()
    history = train(GRPOConfig(**fields)).history
    wall = time.perf_counter() - start
    if len(history) != steps:
        raise RuntimeError(f"the run logged {len(history)} steps, expected {steps}")
    reward = [float(h["reward/mean"]) for h in history]
    result = {"reward": reward, "final_mean": statistics.fmean(reward[-LAST:]), "wall_s": wall}
    if max_staleness is not None:
        result["max_staleness"] = max_staleness
        result["staleness"] = [float(h["async/staleness"]) for h in history]
    return result


def plot(results: dict, path: Path) -> bool:
    """Both reward curves in one PNG; False (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    k = results["async"]["max_staleness"]
    for mode, label in (("sync", "synchronous"), ("async", f"async, max_staleness {k}")):
        reward = results[mode]["reward"]
        ax.plot(range(1, len(reward) + 1), reward, label=f"{label} (last {min(LAST, len(reward))}: "
                                                         f"{results[mode]['final_mean']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward (emits_target)")
    ax.set_title("GRPO toy task: synchronous vs asynchronous rollout")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps of each run (default 100)")
    parser.add_argument("--max-staleness", type=int, default=1, help="the async run's max_staleness (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="both runs' seed")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the trainer and of the async "
                        "worker (default 1)")
    parser.add_argument("--out", help="directory of async_curves.json / .png (default benchmarks/results/<device>/)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.max_staleness < 0:
        parser.error(f"--max-staleness must be >= 0, got {args.max_staleness}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    if args.out:
        out = Path(args.out)
    else:
        sys.path.insert(0, str(HERE))
        import device

        out = Path(device.results_dir())
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fastrl-async-curves-") as tmp:
        data = write_prompts(Path(tmp) / "prompts.jsonl", seed=args.seed)
        results = {}
        for mode, k in (("sync", None), ("async", args.max_staleness)):
            results[mode] = train_curve(data, Path(tmp) / mode, steps=args.steps, seed=args.seed,
                                        threads=args.threads, max_staleness=k)
            print(f"{mode}: final mean reward (last {min(LAST, args.steps)} steps) "
                  f"{results[mode]['final_mean']:.4f}, {results[mode]['wall_s']:.1f} s")
    record = {"task": "emits_target", "model": TINY_QWEN2, "steps": args.steps, "seed": args.seed,
              "threads": args.threads, **SETTINGS, "last": min(LAST, args.steps), **results}
    path = out / "async_curves.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    png = out / "async_curves.png"
    if plot(results, png):
        print(f"wrote {png}")
    else:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
