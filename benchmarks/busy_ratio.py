"""``fastrl demo --quick`` alone, then beside one busy process: the slowdown a shared CPU costs (issue 19).

Losing one of two cores to another process should cost at most 2x; intra-op threads that wait for
a descheduled peer cost more (``fastrl.train.threads``). The target: busy / quiet <= 2.2.

    python benchmarks/busy_ratio.py                 # fastrl's thread policy
    python benchmarks/busy_ratio.py --threads 2     # the old behaviour (one thread per core), to compare
    python benchmarks/busy_ratio.py --json          # also write benchmarks/results/cpu/busy_ratio.json
    python benchmarks/busy_ratio.py --dry-run       # print the commands, run nothing

The busy process is a Python spin loop started before the timed run and killed after it. Run it on an
otherwise quiet machine: other load makes both times meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT = Path(__file__).resolve().parent / "results" / "cpu" / "busy_ratio.json"
TARGET = 2.2
SPIN = [sys.executable, "-c", "while True: pass"]


def demo_command(out: Path, extra: list[str]) -> list[str]:
    """The timed command: ``fastrl demo --quick --device cpu --out OUT`` plus ``extra``."""
    return [sys.executable, "-m", "fastrl", "demo", "--quick", "--device", "cpu", "--out", str(out), *extra]


def demo_env(threads: int | None) -> dict[str, str]:
    """The demo's environment: ``OMP_NUM_THREADS=threads`` when given (fastrl honours it), else unset."""
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def timed(command: list[str], env: dict[str, str], *, busy: int) -> float:
    """Seconds ``command`` takes beside ``busy`` spinning processes.

    Raises:
        RuntimeError: the command failed (its output's tail in the message).
    """
    spinners = [subprocess.Popen(SPIN, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(busy)]
    try:
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-2000:]}")
    return seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for the demo (e.g. 2: the old one-per-core behaviour); default: fastrl's policy")
    p.add_argument("--busy", type=int, default=1, help="busy processes beside the second run (default 1)")
    p.add_argument("--json", action="store_true", help=f"write {RESULT.relative_to(RESULT.parents[2])}")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("demo_args", nargs=argparse.REMAINDER, help="after --: more `fastrl demo` arguments")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.busy < 1:
        p.error(f"--busy must be >= 1, got {args.busy}")
    if args.demo_args[:1] == ["--"]:
        args.demo_args = args.demo_args[1:]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = demo_env(args.threads)
    with tempfile.TemporaryDirectory(prefix="busy_ratio_") as tmp:
        quiet_cmd = demo_command(Path(tmp) / "quiet", args.demo_args)
        busy_cmd = demo_command(Path(tmp) / "busy", args.demo_args)
        if args.dry_run:
            print(f"OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', '(unset)')}")
            print("quiet: " + " ".join(quiet_cmd))
            print(f"busy ({args.busy} x {' '.join(SPIN)}): " + " ".join(busy_cmd))
            return 0
        quiet = timed(quiet_cmd, env, busy=0)
        busy = timed(busy_cmd, env, busy=args.busy)
    ratio = busy / quiet
    result = {"command": "fastrl demo --quick --device cpu " + " ".join(args.demo_args), "threads": args.threads,
              "policy": "OMP_NUM_THREADS" if args.threads is not None else "fastrl auto",
              "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
              "busy_processes": args.busy, "quiet_s": round(quiet, 2), "busy_s": round(busy, 2),
              "ratio": round(ratio, 3), "target": TARGET, "passed": ratio <= TARGET}
    print(f"quiet {quiet:.1f} s, beside {args.busy} busy {busy:.1f} s: {ratio:.2f}x (target <= {TARGET}x)")
    if args.json:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(json.dumps(result, indent=2) + "\n")
        print(f"Written: {RESULT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
