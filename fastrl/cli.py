"""The ``fastrl`` command: ``fastrl info``, ``fastrl demo``."""

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "steps", 1) < 1 or getattr(args, "draws", 1) < 1:
        print("fastrl: --steps and --draws must be >= 1", file=sys.stderr)
        return 2
    return args.func(args)
