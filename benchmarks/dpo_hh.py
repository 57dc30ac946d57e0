#!/usr/bin/env python
"""DPO on real human preferences: hh-rlhf harmless-base, the 80/20 split of ``reward_splits.py``.

Starts from a small SFT'd model: ``alignloop demo``'s (built-in tiny-5m, continued pretraining on
chitchat text, SFT on chitchat conversations), built once into ``$BENCH_WORK/_out/dpo_hh/demo``.
Then ``alignloop dpo`` for one epoch over the 1,850 training pairs (chat prompts through the
model's chat template; sides cut to ``--max-length`` tokens, counted), and reports the held-out
preference accuracy of the implicit reward (β·log π/π_ref of chosen > rejected) on the 462 test
pairs, before (0 by construction: the policy is the reference) and after, with a Wilson interval.

    .venv/bin/python benchmarks/reward_splits.py      # once: writes $BENCH_WORK/reward-data/hh-*.jsonl
    .venv/bin/python benchmarks/dpo_hh.py
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-work", type=Path, default=Path(os.environ.get("BENCH_WORK", REPO / "bench-work")))
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", default="1e-4")
    ap.add_argument("--beta", default="0.1")
    ap.add_argument("--loss", default="sigmoid")
    args = ap.parse_args()
    bench = args.bench_work.resolve()
    data = bench / "reward-data"
    out = bench / "_out" / "dpo_hh"
    out.mkdir(parents=True, exist_ok=True)
    alignloop = str(REPO / ".venv/bin/alignloop")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    sft = out / "demo" / "sft" / "final"
    if not sft.is_dir():
        subprocess.run([alignloop, "demo", f"--output-dir={out}"], check=True, env=env, cwd=REPO)
    name = f"dpo-{args.loss}-lr{args.lr}-b{args.beta}"
    started = time.perf_counter()
    log = out / f"{name}.log"
    with log.open("w") as f:
        subprocess.run([alignloop, "dpo", f"--model.name_or_path={sft}", f"--data.path={data / 'hh-train.jsonl'}",
                        f"--data.eval_path={data / 'hh-test.jsonl'}", f"--data.max_length={args.max_length}",
                        f"--preference.loss={args.loss}", f"--preference.beta={args.beta}", "--train.epochs=1",
                        "--train.batch_size=8", f"--train.lr={args.lr}", "--train.lr_schedule=linear", "--train.warmup_steps=10",
                        "--train.eval_every=0", "--train.save_every=0", "--train.threads=2", "--train.resume=never",
                        f"--run.output_dir={out}", f"--run.name={name}"], check=True, env=env, cwd=REPO, stdout=f,
                       stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    n = 462
    acc = last["eval/rewards/accuracy"]
    z = 1.959964
    centre = (acc + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((acc * (1 - acc) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    cut = [line for line in log.read_text().splitlines() if "were cut" in line]
    result = {"run": name, "steps": last["step"], "wall_s": wall, "heldout_accuracy": acc,
              "heldout_accuracy_wilson95": [centre - half, centre + half], "heldout_margin": last["eval/rewards/margin"],
              "train_accuracy_last": last["train/rewards/accuracy"], "truncation": cut}
    print(json.dumps(result, indent=2))
    (bench / "results").mkdir(exist_ok=True)
    (bench / "results" / f"dpo_hh-{name}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
