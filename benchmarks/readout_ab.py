"""What running a classifier's last layer only where it reads (``alignloop.models.readout``) saves.

The same ``alignloop reward`` run twice per repeat, in alternating child processes: as shipped,
and with the read-out switched off (``readout_of`` patched to find none, so every position runs
through the last layer, as before). Both do the same work and reach the same losses; the script
checks that. Two workloads:

* ``minilm``: the offline default backbone (MiniLM-L6, text pairs) on the UKPConvArg1 cross-topic
  training split (``reward_splits.py``), 16 pairs a step, max_length 256;
* ``llama40m``: the shared benchmark's 40M Llama on ``pref.jsonl`` (8 pairs of 2 × 256 tokens),
  TRL's batching, as ``stage_vs_trl.py --stage reward`` runs it.

    .venv/bin/python benchmarks/readout_ab.py --workloads minilm,llama40m --steps 20 --repeats 3

Median ``perf/step_s`` over steps 2..N of each run, the median over repeats, and their ratio.
Writes ``$BENCH_WORK/results/readout_ab.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = (
    "import sys, alignloop.models.readout as r\n"
    "if sys.argv.pop(1) == 'off':\n"
    "    r.readout_of = lambda model: None\n"
    "from alignloop.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def workload_args(name: str, bench_work: Path) -> list[str]:
    if name == "minilm":
        data = bench_work / "reward-data" / "ukp-train.jsonl"
        if not data.is_file():
            sys.exit(f"{data}: missing; run benchmarks/reward_splits.py first")
        return ["--model.name_or_path=minilm-l6", f"--data.path={data}", "--data.max_length=256", "--train.batch_size=16",
                "--train.lr=5e-5"]
    if name == "llama40m":
        assets = bench_work / "assets"
        if not (assets / "READY").is_file():
            sys.exit(f"{assets}: missing; run ../shared/bench/trl_baseline.py --prepare (see benchmarks/README.md)")
        return [f"--model.name_or_path={assets / 'model-40m'}", f"--data.path={assets / 'pref.jsonl'}", "--data.max_length=256",
                "--train.batch_size=8", "--train.lr=1e-5", "--reward.batching=random", "--reward.length_groups=1"]
    sys.exit(f"--workloads: unknown {name!r} (minilm, llama40m)")


def run(mode: str, name: str, args: argparse.Namespace, out: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-{mode}-", dir=out))
    cmd = [sys.executable, "-c", CHILD, mode, "reward", *workload_args(name, args.bench_work), "--data.eval_fraction=0",
           "--train.epochs=null", f"--train.max_steps={args.steps}", "--train.lr_schedule=constant", "--train.warmup_steps=0",
           "--train.precision=fp32", f"--train.threads={args.threads}", "--train.seed=0", "--train.log_every=1",
           "--train.eval_every=0", "--train.save_every=0", "--train.resume=never", f"--run.output_dir={run_dir}",
           "--run.name=rm"]
    log = run_dir / "log.txt"
    with log.open("w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                               env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if code != 0:
        sys.exit(f"{name} {mode}: exit {code}, see {log}")
    metrics = [json.loads(line) for line in (run_dir / "rm" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "perf/step_s" in m]
    return {"s_per_step": statistics.median(m["perf/step_s"] for m in steps[1:]),
            "mean_loss": statistics.fmean(m["train/loss"] for m in steps), "steps": len(steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="minilm,llama40m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bench-work", type=Path, default=Path(os.environ.get("BENCH_WORK", REPO / "bench-work")))
    args = ap.parse_args()
    out = args.bench_work / "_out"
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for name in args.workloads.split(","):
        runs = {"on": [], "off": []}
        for rep in range(args.repeats):
            for mode in (("on", "off") if rep % 2 == 0 else ("off", "on")):  # alternate, so drift hits both
                runs[mode].append(run(mode, name, args, out))
                print(f"[{name} rep {rep}] read-out {mode:3s} {runs[mode][-1]['s_per_step']:.3f} s/step, "
                      f"mean loss {runs[mode][-1]['mean_loss']:.6f}", flush=True)
        on, off = (statistics.median(r["s_per_step"] for r in runs[m]) for m in ("on", "off"))
        loss_gap = max(abs(a["mean_loss"] - b["mean_loss"]) for a, b in zip(runs["on"], runs["off"]))
        results[name] = {"on_s": on, "off_s": off, "ratio": off / on, "max_loss_gap": loss_gap, "runs": runs}
    lines = ["| workload | s/step, read-out off | s/step, read-out on | off / on | max mean-loss gap |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['off_s']:.3f} | {r['on_s']:.3f} | {r['ratio']:.3f}× | {r['max_loss_gap']:.1e} |")
    table = "\n".join(lines)
    print(table)
    dest = args.bench_work / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "readout_ab.md").write_text(f"{table}\n\nCommand: `{' '.join(sys.argv)}`\n")
    (dest / "readout_ab.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
