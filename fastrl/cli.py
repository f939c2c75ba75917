"""The ``fastrl`` command: ``fastrl info``, ``fastrl demo``, ``fastrl train sft|dpo|grpo|online-dpo|rm``,
``fastrl best-of-n CONFIG``."""

from __future__ import annotations

import argparse
import json
import sys


def _info(args: argparse.Namespace) -> int:
    from fastrl import info

    report = info.collect()
    print(json.dumps(report, indent=2) if args.json else info.format_report(report))
    return 0


def _demo(args: argparse.Namespace) -> int:
    """``fastrl demo``: SFT, then DPO and GRPO from the same checkpoint on the text-to-image-token task,
    evaluated in-domain and out of domain (:mod:`fastrl.tasks.t2i.pipeline`)."""
    from fastrl.tasks.t2i.pipeline import DemoSettings, run_demo

    if args.seed < 0:
        print("fastrl demo: --seed must be >= 0", file=sys.stderr)
        return 2
    scaling = {k: v for k, v in (("group_size", args.group_size), ("train_prompts", args.prompts),
                                 ("cfg_weight", args.cfg_weight), ("best_of_n", args.best_of)) if v is not None}
    try:
        settings = DemoSettings.preset(quick=args.quick, cot=args.cot, reward=args.reward, seed=args.seed,
                                       device=args.device, **scaling)
        settings.resolved_device()
    except ValueError as e:
        print(f"fastrl demo: {e}", file=sys.stderr)
        return 2
    result = run_demo(settings, args.out)
    print(f"\n{result.markdown}")
    print(f"{sum(result.timings.values()):.0f} s in all ("
          + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in result.timings.items()) + ")")
    print("Written: " + ", ".join(str(result.files[k]) for k in ("results_md", "results_json", "curves_png",
                                                                 "canvases_png") if k in result.files))
    return 0


TRAIN_METHODS = ("sft", "dpo", "grpo", "online-dpo", "rm")


def _train(args: argparse.Namespace) -> int:
    """``fastrl train METHOD [--config FILE.yaml] [--field value ...]``: the YAML file, then the
    overrides (one ``--field value`` per config field; see ``fastrl train METHOD --help``).

    Exit codes: 0 done; 2 a bad config, data or reward (the message names it; a used output_dir
    without ``--resume`` / ``--overwrite_output_dir`` too); 130 / 143 stopped by SIGINT (Ctrl-C) /
    SIGTERM after checkpointing the step in progress (``interrupted at step N; checkpoint PATH;
    continue with --resume auto``)."""
    from fastrl.train import ConfigError, DataError, config_class, load_config, train

    if args.help:
        from transformers import HfArgumentParser

        prog = f"fastrl train {args.method} [--config FILE.yaml]"
        HfArgumentParser(config_class(args.method), prog=prog).print_help()
        return 0
    try:
        config = load_config(args.method, args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"fastrl train {args.method}: {e}", file=sys.stderr)
        return 2
    import signal

    from fastrl.train import RewardError, TrainingInterrupted
    from fastrl.train.distributed import close_world

    try:
        result = train(config)
    except (ConfigError, DataError, RewardError) as e:  # found once the data, model or rewards are loaded
        print(f"fastrl train {args.method}: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:  # SIGINT / SIGTERM: the step's checkpoint is written
        print(f"fastrl train {args.method}: interrupted at step {e.step}; checkpoint {e.checkpoint}; continue with "
              f"--resume auto", file=sys.stderr)
        return 128 + int(e.signal)  # 130 (SIGINT), 143 (SIGTERM), as the shell reports a process killed by it
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the training loop
        print(f"fastrl train {args.method}: interrupted at once; no checkpoint written (those already written "
              f"stay: continue with --resume auto)", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        close_world()  # the command owns the process (and the torchrun process group)
    last = result.history[-1] if result.history else {}
    shown = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "rewards/accuracies", "reward/mean", "tokens_per_s")
                      if k in last)
    print(f"fastrl train {args.method}: {result.steps} steps ({shown}); checkpoint {result.checkpoint}")
    return 0


def _best_of_n(args: argparse.Namespace) -> int:
    """``fastrl best-of-n CONFIG --n N --out DIR [--FIELD value ...]``: N images per prompt of the config's
    model and prompts, the best by its rewards, written as PNGs and a JSONL of scores
    (:func:`fastrl.train.best_of_n.best_of_n_from_config`)."""
    import math

    from fastrl.train import ConfigError, DataError, RewardError, load_config
    from fastrl.train.best_of_n import best_of_n_from_config

    prog = "fastrl best-of-n"
    for flag, value, low in (("--n", args.n, 1), ("--batch-size", args.batch_size, 1),
                             ("--num-prompts", args.num_prompts, 1)):
        if value is not None and value < low:
            print(f"{prog}: {flag} must be >= {low}, got {value}", file=sys.stderr)
            return 2
    if args.cfg_weight is not None and not args.cfg_weight >= 0:
        print(f"{prog}: --cfg-weight must be >= 0, got {args.cfg_weight}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.method, args.config, args.overrides)
        result, paths = best_of_n_from_config(config, args.n, args.out, num_prompts=args.num_prompts,
                                              batch_size=args.batch_size, cfg_weight=args.cfg_weight,
                                              model=args.model)
    except (ConfigError, DataError, RewardError, FileNotFoundError, ValueError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2

    def mean(values) -> float:
        kept = [v for v in values if not math.isnan(v)]
        return sum(kept) / len(kept) if kept else math.nan

    best, every = mean(result.scores.tolist()), mean(result.all_scores.reshape(-1).tolist())
    print(f"{prog}: {len(result)} prompts x {args.n} samples; mean score of the best {best:.4g}, of every sample "
          f"{every:.4g}")
    print(f"Written: {paths['dir']} ({len(paths['images'])} PNGs, {paths['scores'].name})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastrl", description="fastrl: fast DPO- and GRPO-family training")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("info", help="versions, GPUs and available backends")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_info)
    p = sub.add_parser("demo", help="DPO vs GRPO on a small text-to-image-token task, end to end (minutes on a CPU)")
    p.add_argument("--quick", action="store_true", help="fewer samples and steps (about a minute; the tests run it)")
    p.add_argument("--cot", action="store_true", help="the model writes a plan (objects and cells) before the image")
    p.add_argument("--reward", choices=("scorer", "learned"), default="scorer",
                   help="training reward: the scorer, or a Bradley-Terry reward model trained on its preferences "
                        "(evaluation always uses the scorer)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default): cuda when available, else cpu")
    p.add_argument("--group-size", type=int, help="GRPO samples per prompt (default 4)")
    p.add_argument("--prompts", type=int, help="training prompts used, the data volume (default: all 270)")
    p.add_argument("--cfg-weight", type=float, help="classifier-free guidance weight of the rollouts (default 3; 1 = none)")
    p.add_argument("--best-of", type=int, help="N of the best-of-N row (default 4; 1 = no row)")
    p.set_defaults(func=_demo)
    p = sub.add_parser("train", help="train with SFT, DPO, GRPO or online DPO, or a reward model (rm), from a YAML "
                       "config", add_help=False, allow_abbrev=False,
                       usage=f"fastrl train {{{','.join(TRAIN_METHODS)}}} [--config FILE.yaml] "
                       "[--FIELD VALUE ...] (see fastrl train METHOD --help)")
    p.add_argument("method", choices=TRAIN_METHODS)
    p.add_argument("--config", help="YAML file of config fields")
    p.add_argument("-h", "--help", action="store_true", help="list the config fields of METHOD")
    p.set_defaults(func=_train)
    p = sub.add_parser("best-of-n", help="sample N images per prompt and keep the best by the config's rewards "
                       "(test-time best-of-N); PNGs and a JSONL of scores", allow_abbrev=False,
                       usage="fastrl best-of-n CONFIG.yaml --n N --out DIR [options] [--FIELD VALUE ...]")
    p.add_argument("config", help="YAML trainer config with image_generation, train_data (the prompts) and "
                   "rewards")
    p.add_argument("--n", type=int, default=4, help="samples per prompt (default 4)")
    p.add_argument("--out", required=True, help="output folder; must not exist or be empty")
    p.add_argument("--method", choices=("grpo", "online-dpo"), default="grpo",
                   help="the config's method (default grpo); its fields are read")
    p.add_argument("--model", default=None, help="local model directory replacing the config's (e.g. a checkpoint)")
    p.add_argument("--num-prompts", type=int, default=None, help="the first this many prompts (default all)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per generate call (default 4)")
    p.add_argument("--cfg-weight", type=float, default=None, help="overrides image_generation.cfg_weight")
    p.set_defaults(func=_best_of_n)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("train", "best-of-n"):
        args.overrides = extra  # config fields, parsed by the config's own parser
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)
