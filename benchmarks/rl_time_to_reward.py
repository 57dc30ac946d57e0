#!/usr/bin/env python
"""Time to reward: how fast alignloop's online RL raises the shared benchmark's reward, in wall time.

The task of ``../shared/bench/trl_time_to_reward.py`` (run it beside this for TRL's figures):
``model-5m`` (random init), prompts.jsonl rows 0-479 for training, 2 prompts × 4 samples per step,
exactly 128 sampled tokens, T = 1, fp32, 2 threads; reward = share of "good" words (a random policy
scores ~0.10). Each run trains for ``--budget-s`` seconds (``train.time_budget_s``), then
``alignloop evaluate`` scores the final and the starting model on the held-out rows 480-511
(4 samples each, 128 tokens, same seeds for both).

Reported per run: steps, reward start → end (mean of the first / last 10 steps), held-out start →
end, and the training time (sum of ``perf/step_s``) at which the 10-step moving average of the
reward first passes 0.15, 0.20 and 0.30.

    .venv/bin/python benchmarks/rl_time_to_reward.py --runs grpo:1e-4            # ~9 min
    .venv/bin/python benchmarks/rl_time_to_reward.py --runs grpo:1e-4,rloo:1e-4:0.05,reinforce:1e-4:0.05,ppo:1e-4:0.05
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from rl_vs_trl import reward_file  # noqa: E402

TRAIN_ROWS, EVAL_ROWS, EVAL_SAMPLES = (0, 480), (480, 512), 4
THRESHOLDS, WINDOW = (0.15, 0.20, 0.30), 10


def prepare(bench: Path) -> tuple[Path, Path]:
    rows = (bench / "assets" / "prompts.jsonl").read_text().splitlines()
    out = bench / "_out" / "ttr"
    out.mkdir(parents=True, exist_ok=True)
    train, held = out / "train.jsonl", out / "heldout.jsonl"
    train.write_text("\n".join(rows[slice(*TRAIN_ROWS)]) + "\n")
    held.write_text("\n".join(row for row in rows[slice(*EVAL_ROWS)] for _ in range(EVAL_SAMPLES)) + "\n")
    return train, held


def first_time_over(rows: list[dict], threshold: float) -> float | None:
    """Training seconds at which the moving average of the last WINDOW step rewards first exceeds threshold."""
    elapsed, recent = 0.0, []
    for r in rows:
        elapsed += r["perf/step_s"]
        recent = (recent + [r["train/reward"]])[-WINDOW:]
        if len(recent) == WINDOW and sum(recent) / WINDOW > threshold:
            return elapsed
    return None


def run_one(args, algo: str, lr: str, beta: str, train: Path, held: Path) -> dict:
    bench, tag = args.bench_work, f"{algo}-lr{lr}-b{beta}"
    out = bench / "_out" / "ttr" / "runs"
    reward = f"{reward_file(bench)}:good_words"
    group = 4 if algo in ("grpo", "rloo") else 1
    cmd = [str(REPO / ".venv/bin/alignloop"), algo, f"--model.name_or_path={bench / 'assets' / 'model-5m'}",
           f"--data.path={train}", f"--rl.reward={reward}", f"--train.batch_size={8 // group}", f"--rl.group_size={group}",
           f"--rl.kl_coef={beta}", "--sampling.max_new_tokens=128", "--sampling.stop_at_eos=false", "--sampling.batch_size=8",
           f"--train.lr={lr}", "--train.lr_schedule=constant", "--train.warmup_steps=0", "--train.max_steps=100000",
           f"--train.time_budget_s={args.budget_s}", "--train.threads=2", "--train.eval_every=0", "--train.save_every=0",
           "--train.resume=never", f"--run.output_dir={out}", f"--run.name={tag}", *args.extra]
    log = bench / "results" / f"ttr-{tag}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    if code != 0:
        return {"run": tag, "error": f"exit {code}, see {log}"}
    wall = time.perf_counter() - started
    rows = [json.loads(x) for x in (out / tag / "metrics.jsonl").read_text().splitlines()]
    ev = [str(REPO / ".venv/bin/alignloop"), "evaluate", f"--candidate={out / tag / 'final'}",
          f"--baseline={bench / 'assets' / 'model-5m'}", f"--prompts={held}", f"--reward={reward}",
          "--sampling.max_new_tokens=128", "--sampling.stop_at_eos=false", "--sampling.batch_size=32", "--sampling.seed=1234",
          f"--run.output_dir={out}", f"--run.name={tag}-eval"]
    with log.open("a") as f:
        subprocess.run(ev, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, check=True)
    metrics = json.loads((out / f"{tag}-eval" / "metrics.json").read_text())
    first, last = rows[:WINDOW], rows[-WINDOW:]
    return {
        "run": tag, "steps": rows[-1]["step"], "train_s": sum(r["perf/step_s"] for r in rows), "wall_s": wall,
        "step_s_median": sorted(r["perf/step_s"] for r in rows)[len(rows) // 2],
        "reward_start": sum(r["train/reward"] for r in first) / len(first),
        "reward_end": sum(r["train/reward"] for r in last) / len(last),
        "heldout_start": metrics["baseline_reward_mean"], "heldout_end": metrics["candidate_reward_mean"],
        "kl_end": last[-1].get("train/kl"),
        **{f"time_to_{t:.2f}": first_time_over(rows, t) for t in THRESHOLDS},
    }


def table(results: list[dict]) -> str:
    out = ["| run | steps | s/step | reward start → end | held-out start → end | KL/token end | "
           + " | ".join(f"MA{WINDOW} > {t}" for t in THRESHOLDS) + " |", "|---|---|---|---|---|---|" + "---|" * len(THRESHOLDS)]
    for r in results:
        if "error" in r:
            out.append(f"| {r['run']} | error: {r['error']} |")
            continue
        times = " | ".join("never" if r[f"time_to_{t:.2f}"] is None else f"{r[f'time_to_{t:.2f}']:.0f} s" for t in THRESHOLDS)
        kl = "" if r["kl_end"] is None else f"{r['kl_end']:.3f}"
        out.append(f"| {r['run']} | {r['steps']} | {r['step_s_median']:.2f} | {r['reward_start']:.3f} → {r['reward_end']:.3f} | "
                   f"{r['heldout_start']:.3f} → {r['heldout_end']:.3f} | {kl} | {times} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="grpo:1e-4", help="comma list of algo:lr[:beta] (beta default 0)")
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--bench-work", type=Path, default=Path(os.environ.get("BENCH_WORK", REPO / "bench-work")))
    ap.add_argument("--tag", default="main")
    ap.add_argument("extra", nargs="*", help="more alignloop options, after --")
    args = ap.parse_args()
    args.bench_work = args.bench_work.resolve()
    (args.bench_work / "results").mkdir(parents=True, exist_ok=True)
    train, held = prepare(args.bench_work)
    results = []
    for spec in args.runs.split(","):
        algo, lr, *beta = spec.split(":")
        results.append(run_one(args, algo, lr, beta[0] if beta else "0", train, held))
        print(json.dumps(results[-1]), flush=True)
    text = table(results)
    print(text)
    (args.bench_work / "results" / f"ttr_{args.tag}.md").write_text(text + "\n")
    (args.bench_work / "results" / f"ttr_{args.tag}.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
