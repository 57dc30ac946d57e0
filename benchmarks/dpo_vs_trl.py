#!/usr/bin/env python
"""alignloop's DPO step against TRL's DPOTrainer on the shared work, same run.

The work (``../shared/bench/README.md``, DPO row): 8 preference pairs per step, chosen and rejected
256 tokens each, β = 0.1, sigmoid loss, AdamW lr 1e-5 constant, 2 threads, fp32 (``--precision
bf16``: alignloop's ``--train.precision=bf16``, bf16 weights with fp32 master weights, against
TRL's ``bf16=True``, autocast over fp32 weights, the nearest TRL has).

* **s/step**: median over steps 2..N. TRL runs the reference model forward every step; alignloop
  computed the reference log-probs once before step 1, so its steps hold only the policy's
  forward and backward.
* **end to end**: wall time of the whole command for ``--e2e-steps`` steps (default 64), the
  one-off reference pass included, so the saving is stated honestly.

Peak RSS of each child from ``os.wait4``.

    .venv/bin/python benchmarks/dpo_vs_trl.py --sizes 5m,40m --e2e-sizes 5m
    .venv/bin/python benchmarks/dpo_vs_trl.py --sizes 40m --e2e-sizes "" --precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench_common import REPO, add_trl_arguments, resolve_trl_arguments, run_child


def run_alignloop(args, size: str, steps: int, logs: Path, tag: str, cpu_linear: str = "auto") -> dict:
    bench = args.bench_work
    out = Path(tempfile.mkdtemp(prefix=f"dpo-{size}-", dir=bench / "_out"))
    cmd = [str(REPO / ".venv/bin/alignloop"), "dpo", f"--model.name_or_path={bench / 'assets' / f'model-{size}'}",
           f"--data.path={bench / 'assets' / 'pref.jsonl'}", "--data.eval_fraction=0", "--data.max_length=256",
           "--preference.loss=sigmoid", "--preference.beta=0.1", "--train.batch_size=8", f"--train.max_steps={steps}",
           "--train.lr=1e-5", "--train.lr_schedule=constant", "--train.warmup_steps=0", "--train.max_grad_norm=1.0",
           f"--train.threads={args.threads}", "--train.eval_every=0", "--train.save_every=0", "--train.resume=never",
           f"--train.precision={args.precision}", f"--model.cpu_linear={cpu_linear}", f"--run.output_dir={out}", "--run.name=run"]
    log = logs / f"alignloop-{tag}-{cpu_linear}.log"
    code, wall, rss = run_child(cmd, log, dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"), REPO)
    res = {"impl": "alignloop", "cpu_linear": cpu_linear, "size": size, "steps": steps, "wall_s": wall, "peak_rss_mb": rss}
    if code != 0:
        res["error"] = f"exit {code}, see {log}"
        return res
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    res["step_s"] = statistics.median(r["perf/step_s"] for r in rows[args.warmup:])
    match = re.search(r"reference log-probs of \d+ sequences in ([\d.]+) s", log.read_text())
    res["reference_pass_s"] = float(match.group(1)) if match else None
    res["mean_loss"] = statistics.mean(r["train/loss"] for r in rows)
    shutil.rmtree(out, ignore_errors=True)
    return res


def run_trl(args, size: str, steps: int, logs: Path, tag: str) -> dict:
    cmd = [str(args.trl_python), str(args.trl_script), "--one", "dpo", "--size", size, "--precision", args.precision,
           "--steps", str(steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    log = logs / f"trl-{tag}.log"
    code, wall, rss = run_child(cmd, log, dict(os.environ, BENCH_WORK=str(args.bench_work)), args.bench_work)
    res = {"impl": "trl", "size": size, "steps": steps, "wall_s": wall, "peak_rss_mb": rss}
    line = next((x for x in log.read_text().splitlines() if x.startswith("RESULT_JSON ")), None)
    if code != 0 or line is None:
        res["error"] = f"exit {code}, see {log}"
        return res
    r = json.loads(line[len("RESULT_JSON "):])
    res.update(step_s=r["step_s_median"], mean_loss=r["final_loss"])
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="5m,40m", help="sizes for the s/step comparison (10 steps)")
    ap.add_argument("--e2e-sizes", default="5m", help="sizes for the end-to-end comparison")
    ap.add_argument("--e2e-steps", type=int, default=64)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--cpu-linear", default="auto", help="comma list of alignloop's model.cpu_linear values to run (auto, onednn, torch)")
    add_trl_arguments(ap)
    args = resolve_trl_arguments(ap.parse_args())
    logs = args.bench_work / "results" / f"dpo_vs_trl-{args.precision}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    results = []
    plan = [(s, args.steps, "step") for s in args.sizes.split(",") if s] + \
           [(s, args.e2e_steps, "e2e") for s in args.e2e_sizes.split(",") if s]
    variants = args.cpu_linear.split(",")
    for size, steps, kind in plan:
        runs = [lambda tag, c=c: run_alignloop(args, size, steps, logs, tag, c) for c in variants]
        for runner in [*runs, lambda tag: run_trl(args, size, steps, logs, tag)]:
            r = runner(f"{kind}-{size}")
            r["kind"] = kind
            results.append(r)
            print(json.dumps(r), flush=True)
    lines = ["| measure | size | steps | alignloop | TRL | TRL / alignloop |", "|---|---|---|---|---|---|"]
    for size, steps, kind in plan:
        (t,) = [r for r in results if r["size"] == size and r["kind"] == kind and r["impl"] == "trl"]
        for a in [r for r in results if r["size"] == size and r["kind"] == kind and r["impl"] == "alignloop"]:
            variant = f" (cpu_linear={a['cpu_linear']})" if len(variants) > 1 else ""
            if "error" in a or "error" in t:
                lines.append(f"| {kind}{variant} | {size} | {steps} | {a.get('error', '')} | {t.get('error', '')} | |")
                continue
            key = "step_s" if kind == "step" else "wall_s"
            label = "s/step" if kind == "step" else "wall s (reference pass included)"
            lines.append(f"| {label}{variant} | {size} | {steps} | {a[key]:.3f} | {t[key]:.3f} | {t[key] / a[key]:.2f}× |")
            lines.append(f"| peak RSS MB{variant} | {size} | {steps} | {a['peak_rss_mb']:.0f} | {t['peak_rss_mb']:.0f} | |")
            if a.get("reference_pass_s") is not None:
                lines.append(f"| one-off reference pass s{variant} | {size} | {steps} | {a['reference_pass_s']:.1f} | (every step) | |")
    text = f"precision: {args.precision}\n\n" + "\n".join(lines)
    print(text)
    (args.bench_work / "results" / f"dpo_vs_trl-{args.precision}.md").write_text(text + "\n")
    (args.bench_work / "results" / f"dpo_vs_trl-{args.precision}.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
