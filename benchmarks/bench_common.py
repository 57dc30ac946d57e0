"""What the side-by-side benchmark scripts share: running a child with its own peak RSS, and the
arguments that locate the benchmark work and TRL's venv."""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_child(cmd: list[str], log: Path, env: dict, cwd: Path) -> tuple[int, float, float]:
    """Run ``cmd`` with its output in ``log``; return (exit code, wall seconds, peak RSS MB of that
    child, from ``os.wait4``: not ``RUSAGE_CHILDREN``, whose maximum carries over from earlier children)."""
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss / 1024


def add_trl_arguments(ap: argparse.ArgumentParser) -> None:
    """--steps/--warmup/--threads of the shared work and where it and TRL's venv live."""
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bench-work", type=Path, default=Path(os.environ.get("BENCH_WORK", REPO / "bench-work")))
    ap.add_argument("--trl-python", type=Path, default=None, help="default: $BENCH_WORK/trl-venv/bin/python")
    ap.add_argument("--trl-script", type=Path, default=REPO.parent / "shared" / "bench" / "trl_baseline.py")


def resolve_trl_arguments(args: argparse.Namespace) -> argparse.Namespace:
    args.bench_work = args.bench_work.resolve()
    args.trl_python = args.trl_python or args.bench_work / "trl-venv" / "bin" / "python"
    return args
