"""Markdown table of a pytest-benchmark JSON: median per contender and its ratio to fastrl.

    python benchmarks/report.py benchmarks/results/<device>/bench.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def table(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for b in data["benchmarks"]:
        groups[b["group"]][b["extra_info"]["contender"]] = b["stats"]["median"]
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
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(table(sys.argv[1]))
