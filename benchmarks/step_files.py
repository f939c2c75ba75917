"""Which fastrl source files one GRPO step passes through (the count docs/architecture.md states).

Runs a tiny GRPO training on the CPU (a 2-layer Qwen2 of random weights, 4 prompts x 4 completions of 4
tokens, KL to a reference so that the reference forward is in the step) and records, with
``sys.setprofile``, every file of the ``fastrl`` package in which a Python function runs between the
second step's first data read (``BatchOrder.next``) and the return of its optimiser step
(``optimizer_step``): rollout, rewards, advantages, reference and old log-probs, loss, backward,
optimiser. The first step is left out so that one-time work (imports, tokenizer, compile caches) is
not counted. Kernels (``kernels/``, installed as ``fastrl.kernels``) sit outside the package folder and
are not counted; on the CPU the torch implementations run instead of them.

    python benchmarks/step_files.py            # the list and the count
    python benchmarks/step_files.py --json     # {"files": [...], "count": N}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path


def step_files(beta: float = 0.04) -> list[str]:
    """The package files (relative to the repository) a GRPO step runs code in, sorted."""
    import fastrl
    from fastrl.train import GRPOConfig, train_grpo
    from fastrl.train import run as run_mod

    root = Path(fastrl.__file__).resolve().parent
    seen: set[str] = set()
    state = {"on": False, "steps": 0, "done": False}

    def profile(frame, event, arg):
        if event == "call":
            path = frame.f_code.co_filename
            if path.startswith(str(root)):
                seen.add(os.path.relpath(path, root.parent))

    order_cls = run_mod.BatchOrder
    real_next, real_step = order_cls.next, run_mod.optimizer_step

    def next_(self):
        if state["steps"] == 1 and not state["on"] and not state["done"]:  # the second step
            state["on"] = True
            sys.setprofile(profile)
        return real_next(self)

    def optimizer_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        if state["on"]:
            sys.setprofile(None)
            state["on"], state["done"] = False, True
        state["steps"] += 1
        return out

    def emits_seven(prompt_ids, completion_ids, **columns):
        return sum(t == 7 for t in completion_ids) / len(completion_ids)

    order_cls.next, run_mod.optimizer_step = next_, optimizer_step
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rng = random.Random(0)
            data = Path(tmp) / "prompts.jsonl"
            data.write_text("".join(json.dumps({"prompt": [rng.randrange(8, 64) for _ in range(4)]}) + "\n"
                                    for _ in range(16)))
            tiny = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "max_position_embeddings": 128}
            train_grpo(GRPOConfig(model_config=tiny, train_data=str(data), output_dir=str(Path(tmp) / "out"),
                                  batch_size=4, num_generations=4, max_completion_length=4, max_steps=3,
                                  progress=False, seed=0, reward_funcs=[emits_seven], log_completions=1, beta=beta))
    finally:
        sys.setprofile(None)
        order_cls.next, run_mod.optimizer_step = real_next, real_step
    if not state["done"]:
        raise RuntimeError("the second step was not traced (did the run take fewer than 2 steps?)")
    return sorted(seen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print {files, count} as JSON")
    args = parser.parse_args(argv)
    files = step_files()
    if args.json:
        print(json.dumps({"files": files, "count": len(files)}))
    else:
        print("\n".join(files))
        print(f"{len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
