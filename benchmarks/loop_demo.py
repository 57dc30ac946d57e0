#!/usr/bin/env python
"""The closed loop's numbers: ``alignloop demo`` once per hidden preference, on this machine.

For each preference (mixture first, in a fresh folder, so its wall time includes building the
base model; the others reuse it): the demo's wall time, the seconds of each step of each
iteration (collect / export / train / evaluate / register / promote), the feedback rows each
iteration consumed, the held-out utility of the deployed version and the candidate, each
candidate's win rate against the deployed version with its 95% Wilson CI and KL per token, the
gate's decision, and the final deployed version against v0. Target (issue 9): mixture win rate vs
v0 ≥ 70% after 3 iterations, within the KL budget; the demo ≤ 10 minutes on 2 cores.

    .venv/bin/python benchmarks/loop_demo.py                       # all four, ~25 min
    .venv/bin/python benchmarks/loop_demo.py --preferences length  # one

Results: bench-work/results/loop_demo.json and a markdown table on stdout. Run it on a quiet
machine (``flock /tmp/bench.lock``): the step times are wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from alignloop.loop.pipeline import STEPS

ROOT = Path(__file__).resolve().parent.parent


def run_one(preference: str, out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "alignloop", "demo", "--output-dir", str(out), "--preference", preference],
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"demo --preference {preference} failed:\n{done.stderr[-3000:]}")
    folder = out / "demo" / f"loop-{preference}"
    iterations = []
    for path in sorted(folder.glob("iter-*/state.json"), key=lambda p: int(p.parent.name.removeprefix("iter-"))):
        state = json.loads(path.read_text())
        s = state["steps"]
        m = s["evaluate"].get("metrics", {})
        iterations.append({
            "iteration": int(path.parent.name.removeprefix("iter-")),
            "seconds": {k: s[k]["seconds"] for k in STEPS},
            "feedback_given": sum(s["collect"].get("feedback", {}).values()),
            "feedback_rows_in_datasets": s["export"]["feedback_rows"], "datasets": s["export"]["counts"],
            "feedback_rows_behind_candidate": s["register"].get("feedback_rows"),
            "deployed_utility": m.get("baseline_reward_mean"), "candidate_utility": m.get("candidate_reward_mean"),
            "win_rate": m.get("win_rate"), "win_rate_ci": [m.get("win_rate_lower"), m.get("win_rate_upper")],
            "kl_per_token": m.get("kl_per_token"), "promoted": s["promote"]["promoted"],
        })
    final = json.loads((folder / "final-vs-v0.json").read_text())
    return {"preference": preference, "wall_s": round(seconds, 1), "iterations": iterations,
            "final_vs_v0": final.get("metrics"), "gate": s["evaluate"].get("gate")}


def table(results: list[dict]) -> str:
    lines = ["| preference | demo wall | iter | collect / export / train / evaluate / register / promote (s) | feedback rows: in datasets / behind candidate "
             "| utility deployed → candidate | win rate vs deployed (CI) | KL/token | promoted |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        for it in r["iterations"]:
            sec = " / ".join(f"{it['seconds'][k]:.1f}" for k in STEPS)
            lo, hi = it["win_rate_ci"]
            lines.append(f"| {r['preference']} | {r['wall_s'] / 60:.1f} min | {it['iteration']} | {sec} | {it['feedback_rows_in_datasets']} / {it['feedback_rows_behind_candidate']} | "
                         f"{it['deployed_utility']:.3f} → {it['candidate_utility']:.3f} | {100 * it['win_rate']:.0f}% "
                         f"({100 * lo:.0f}–{100 * hi:.0f}%) | {it['kl_per_token']:.3f} | {'yes' if it['promoted'] else 'no'} |")
    lines += ["", "| preference | final vs v0: win rate (CI) | utility v0 → final | KL/token to v0 |", "| --- | --- | --- | --- |"]
    for r in results:
        m = r["final_vs_v0"]
        if not m:
            lines.append(f"| {r['preference']} | v0 still deployed | — | — |")
            continue
        lines.append(f"| {r['preference']} | {100 * m['win_rate']:.0f}% ({100 * m['win_rate_lower']:.0f}–{100 * m['win_rate_upper']:.0f}%) | "
                     f"{m['baseline_reward_mean']:.3f} → {m['candidate_reward_mean']:.3f} | {m['kl_per_token']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preferences", default="mixture,sentiment,length,topic")
    parser.add_argument("--out", default=str(ROOT / "bench-work" / "loop"))
    parser.add_argument("--results", default=str(ROOT / "bench-work" / "results" / "loop_demo.json"))
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)  # the first demo builds the base model: its wall time is the README's
    results = []
    for preference in args.preferences.split(","):
        results.append(run_one(preference, out))
        print(f"{preference}: {results[-1]['wall_s']:.0f} s", flush=True)
    target = Path(args.results)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
