"""Markdown tables and plots of pytest-benchmark JSON files written by the suites.

    python benchmarks/report.py benchmarks/results/<device>/bench_*.json [--no-plots] [--output FILE.md]

Per file: a table of median times per case (group) and contender with each contender's time over
fastrl's (> 1: fastrl is faster), fastrl's achieved bandwidth or FLOP/s and its fraction of the
device's limit where recorded, and a table of peak memory. With matplotlib installed, one PNG per op
is written next to the JSON (``<file>-<op>.png``): fastrl's speed-up over each contender and the
peak memory of each contender, per shape. Without matplotlib the plots are skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _machine(data: dict) -> str:
    info = data.get("machine_info", {})
    dev = info.get("fastrl_device", {})
    if dev.get("gpu"):
        parts = [dev["gpu"]]
        if dev.get("peaks"):
            parts.append(f"limits {dev['peaks']['hbm_bytes_per_s'] / 1e12:.2f} TB/s, "
                         f"{dev['peaks']['bf16_flops'] / 1e12:.0f} TFLOP/s bf16 dense (datasheet)")
        if dev.get("driver"):
            parts.append(f"driver {dev['driver']}")
    else:
        cpu = info.get("cpu", {})
        parts = [f"{cpu.get('brand_raw', dev.get('device', '?'))}, {cpu.get('count', '?')} logical cores"]
    versions = ", ".join(f"{k} {dev[k]}" for k in ("torch", "triton", "cuda") if dev.get(k))
    return "Machine: " + "; ".join(parts) + (f" ({versions})" if versions else "")


def _contenders(benchmarks: list[dict]) -> list[str]:
    names = {b["extra_info"].get("contender", b["name"]) for b in benchmarks}
    return sorted(names, key=lambda c: (c != "fastrl", c))


def _rate(extra: dict) -> str:
    if "tokens_per_s" in extra and "achieved_bytes_per_s" not in extra and "achieved_flops" not in extra:
        return f"{extra['tokens_per_s']:.3g} tokens/s"
    if "achieved_bytes_per_s" in extra:
        value, unit = extra["achieved_bytes_per_s"], "B/s"
    elif "achieved_flops" in extra:
        value, unit = extra["achieved_flops"], "FLOP/s"
    else:
        return "-"
    prefix, scale = next(((p, s) for p, s in (("T", 1e12), ("G", 1e9), ("M", 1e6)) if value >= s), ("", 1))
    text = f"{value / scale:.3g} {prefix}{unit}"
    if "fraction_of_peak" in extra:
        text += f" ({extra['fraction_of_peak']:.0%})"
    return text


def _grouped(data: dict) -> dict[str, dict[str, dict]]:
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in data["benchmarks"]:
        groups[b["group"]][b["extra_info"].get("contender", b["name"])] = b
    return groups


def table(path: str) -> str:
    """The Markdown tables of one JSON file."""
    data = _load(path)
    groups = _grouped(data)
    contenders = _contenders(data["benchmarks"])
    peers = [c for c in contenders if c != "fastrl"]
    head = ("| case | " + " | ".join(f"{c} (ms)" for c in contenders) + " | "
            + "".join(f"{c} / fastrl | " for c in peers) + "fastrl rate (of limit) |")
    lines = [_machine(data), "", head, "|" + "---|" * (head.count("|") - 1)]
    for group in sorted(groups):
        runs = groups[group]
        med = {c: b["stats"]["median"] for c, b in runs.items()}
        cells = [f"{med[c] * 1e3:.2f}" if c in med else "-" for c in contenders]
        ratios = [f"{med[c] / med['fastrl']:.2f}x" if c in med and med.get("fastrl") else "-" for c in peers]
        rate = _rate(runs["fastrl"]["extra_info"]) if "fastrl" in runs else "-"
        lines.append(f"| {group} | " + " | ".join(cells + ratios + [rate]) + " |")
    memory = {g: {c: b["extra_info"]["peak_extra_bytes"] for c, b in runs.items()
                  if b["extra_info"].get("peak_extra_bytes") is not None} for g, runs in groups.items()}
    memory = {g: m for g, m in memory.items() if m}
    if memory:
        lines += ["", "Peak memory above the inputs (MiB):", "",
                  "| case | " + " | ".join(contenders) + " |", "|" + "---|" * (len(contenders) + 1)]
        for group in sorted(memory):
            cells = [f"{memory[group][c] / 2**20:.0f}" if c in memory[group] else "-" for c in contenders]
            lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _shape_label(group: str, op: str) -> str:
    label = group[len(op):].strip() if group.startswith(op) else group
    return label.replace(" torch.", " ").replace(" ", "\n")


def plots(path: str) -> list[str]:
    """One PNG per op next to ``path``: speed-up of fastrl over each contender, and peak memory."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print(f"matplotlib is not installed: no plots for {path} (pip install matplotlib, or .[bench])",
              file=sys.stderr)
        return []
    data = _load(path)
    by_op: dict[str, dict[str, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for b in data["benchmarks"]:
        extra = b["extra_info"]
        by_op[extra.get("op", "benchmark")][b["group"]][extra.get("contender", b["name"])] = b
    written = []
    stem = os.path.splitext(path)[0]
    for op, groups in sorted(by_op.items()):
        names = sorted(groups)
        contenders = _contenders([b for g in groups.values() for b in g.values()])
        peers = [c for c in contenders if c != "fastrl"]
        has_memory = any(b["extra_info"].get("peak_extra_bytes") is not None
                         for g in groups.values() for b in g.values())
        fig, axes = plt.subplots(1, 2 if has_memory else 1, figsize=(6 + 1.2 * len(names), 4.5), squeeze=False)
        x = range(len(names))
        ax = axes[0][0]
        width = 0.8 / max(len(peers), 1)
        for i, peer in enumerate(peers):
            speedups = [groups[g][peer]["stats"]["median"] / groups[g]["fastrl"]["stats"]["median"]
                        if peer in groups[g] and "fastrl" in groups[g] else 0 for g in names]
            # bars from 1x: up where fastrl is faster, down where it is slower
            ax.bar([j + (i - (len(peers) - 1) / 2) * width for j in x], [v - 1 if v else 0 for v in speedups],
                   width, bottom=1.0, label=peer)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x")
        ax.yaxis.set_major_formatter(fmt)
        ax.yaxis.set_minor_formatter(fmt)
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.set_ylabel("speed-up of fastrl (their time / fastrl's)")
        ax.set_xticks(list(x), [_shape_label(g, op) for g in names], fontsize=7)
        ax.set_title(f"{op}: speed-up")
        if peers:
            ax.legend(fontsize=7)
        if has_memory:
            ax = axes[0][1]
            width = 0.8 / len(contenders)
            for i, c in enumerate(contenders):
                mem = [(groups[g][c]["extra_info"].get("peak_extra_bytes") or 0) / 2**20 if c in groups[g] else 0
                       for g in names]
                ax.bar([j + (i - (len(contenders) - 1) / 2) * width for j in x], mem, width, label=c)
            ax.set_ylabel("peak memory above the inputs (MiB)")
            ax.set_xticks(list(x), [_shape_label(g, op) for g in names], fontsize=7)
            ax.set_title(f"{op}: peak memory")
            ax.legend(fontsize=7)
        dev = data.get("machine_info", {}).get("fastrl_device", {})
        fig.suptitle(dev.get("gpu") or dev.get("device") or "", fontsize=9)
        fig.tight_layout()
        out = f"{stem}-{op}.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="pytest-benchmark JSON files")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--output", help="also write the Markdown to this file")
    args = parser.parse_args(argv)
    sections = []
    for path in args.files:
        section = f"### {os.path.basename(path)}\n\n{table(path)}"
        if not args.no_plots:
            for png in plots(path):
                rel = os.path.relpath(png, os.path.dirname(os.path.abspath(args.output)) if args.output else ".")
                section += f"\n\n![{os.path.basename(png)}]({rel})"
        sections.append(section)
    text = "\n\n".join(sections)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
