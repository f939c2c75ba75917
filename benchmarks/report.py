"""Markdown tables of pytest-benchmark JSON files: median per contender and its ratio to fastrl,
and the peak memory when recorded.

    python benchmarks/report.py benchmarks/results/<device>/bench_*.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def table(path: str) -> str:
    """The tables of one JSON file."""
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    memory: dict[str, dict[str, int]] = defaultdict(dict)
    for b in data["benchmarks"]:
        groups[b["group"]][b["extra_info"]["contender"]] = b["stats"]["median"]
        if b["extra_info"].get("peak_extra_bytes") is not None:
            memory[b["group"]][b["extra_info"]["contender"]] = b["extra_info"]["peak_extra_bytes"]
    contenders = sorted({c for g in groups.values() for c in g}, key=lambda c: (c != "fastrl", c))
    head = "| case | " + " | ".join(f"{c} (ms)" for c in contenders) + " | " + " | ".join(
        f"{c} / fastrl" for c in contenders if c != "fastrl") + " |"
    lines = [f"Machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}, "
             f"{data['machine_info'].get('cpu', {}).get('count', '?')} logical cores", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for group in sorted(groups):
        med = groups[group]
        cells = [f"{med[c] * 1e3:.2f}" if c in med else "-" for c in contenders]
        ratios = [f"{med[c] / med['fastrl']:.1f}x" if c in med and "fastrl" in med else "-"
                  for c in contenders if c != "fastrl"]
        lines.append(f"| {group} | " + " | ".join(cells + ratios) + " |")
    if memory:
        lines += ["", "Peak memory above the inputs (MiB):", "",
                  "| case | " + " | ".join(contenders) + " |", "|" + "---|" * (len(contenders) + 1)]
        for group in sorted(memory):
            cells = [f"{memory[group][c] / 2**20:.0f}" if c in memory[group] else "-" for c in contenders]
            lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print("\n\n".join(f"### {path}\n\n{table(path)}" for path in sys.argv[1:]))
