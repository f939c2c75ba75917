"""The ``fastrl`` command: ``fastrl info``, ``fastrl demo``, ``fastrl train sft|dpo|grpo|online-dpo``."""

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
    from fastrl.tasks import showcase

    print("fastrl demo (a showcase of the sampler and a group-relative policy gradient; the\n"
          "text-to-image-token DPO vs GRPO demo replaces it when it lands)\n")
    worst = showcase.sampler_accuracy(draws=args.draws, seed=args.seed)
    print()
    first, last = showcase.policy_gradient(steps=args.steps, seed=args.seed)
    ok = worst < 0.01 and last > first
    print(f"\n{'OK' if ok else 'UNEXPECTED'}: worst TV distance {worst:.4f}; reward {first:.3f} -> {last:.3f}")
    return 0 if ok else 1


TRAIN_METHODS = ("sft", "dpo", "grpo", "online-dpo")


def _train(args: argparse.Namespace) -> int:
    """``fastrl train METHOD [--config FILE.yaml] [--field value ...]``: the YAML file, then the
    overrides (one ``--field value`` per config field; see ``fastrl train METHOD --help``)."""
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
    from fastrl.train import RewardError
    from fastrl.train.distributed import close_world

    try:
        result = train(config)
    except (ConfigError, DataError, RewardError) as e:  # found once the data, model or rewards are loaded
        print(f"fastrl train {args.method}: {e}", file=sys.stderr)
        return 2
    finally:
        close_world()  # the command owns the process (and the torchrun process group)
    last = result.history[-1] if result.history else {}
    shown = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "rewards/accuracies", "reward/mean", "tokens_per_s")
                      if k in last)
    print(f"fastrl train {args.method}: {result.steps} steps ({shown}); checkpoint {result.checkpoint}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastrl", description="fastrl: fast DPO- and GRPO-family training")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("info", help="versions, GPUs and available backends")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_info)
    p = sub.add_parser("demo", help="run the embedded demo on the CPU")
    p.add_argument("--steps", type=int, default=60, help="policy-gradient steps (default 60)")
    p.add_argument("--draws", type=int, default=200_000, help="sampler draws per setting (default 200000)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)
    p = sub.add_parser("train", help="train with SFT, DPO, GRPO or online DPO from a YAML config", add_help=False,
                       allow_abbrev=False, usage="fastrl train {sft,dpo,grpo,online-dpo} [--config FILE.yaml] "
                       "[--FIELD VALUE ...] (see fastrl train METHOD --help)")
    p.add_argument("method", choices=TRAIN_METHODS)
    p.add_argument("--config", help="YAML file of config fields")
    p.add_argument("-h", "--help", action="store_true", help="list the config fields of METHOD")
    p.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":
        args.overrides = extra  # config fields, parsed by the config's own parser
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "steps", 1) < 1 or getattr(args, "draws", 1) < 1:
        print("fastrl: --steps and --draws must be >= 1", file=sys.stderr)
        return 2
    return args.func(args)
