#!/usr/bin/env python
"""alignloop's online RL step against TRL's GRPOTrainer / RLOOTrainer on the shared work, same run.

The work (``../shared/bench/README.md``): 2 prompts × 4 samples per step, 128-token prompts,
exactly 128 sampled tokens (no early stop), T = 1, KV cache, reward = share of "good" words,
lr 1e-5 constant, 10 steps with the first excluded, median s/step, 2 threads. GRPO with β = 0
(TRL's default), RLOO with β = 0.05 (TRL's default); alignloop's loss aggregation is "token",
TRL's default ``dapo``. PPO (alignloop only: TRL 1.16 has none) runs the same shapes plus its critic.

* alignloop: ``alignloop grpo|rloo|ppo`` with the flags below; s/step = median ``perf/step_s``,
  decoded tokens/s = ``perf/rollout_tokens_per_s`` (completion tokens / rollout seconds).
* TRL: ``trl_baseline.py --one grpo|rloo`` in its own venv; decoded tokens/s = 8 × 128 / its
  median time in ``_generate``.

Peak RSS of each child from ``os.wait4``. Runs alternate alignloop, TRL per cell.

    .venv/bin/python benchmarks/rl_vs_trl.py                       # 5m and 40m, grpo, rloo, ppo, fp32
    .venv/bin/python benchmarks/rl_vs_trl.py --sizes 5m --algos grpo
    .venv/bin/python benchmarks/rl_vs_trl.py --sizes 40m --precisions bf16   # where the CPU has bf16 matmuls

Precisions: ``fp32`` on both sides; ``bf16`` is alignloop's ``--train.precision=bf16`` (bf16
weights, so the rollout decodes in bf16 with no re-casting; fp32 master weights and optimiser)
against TRL's ``bf16=True`` (autocast over fp32 weights), the nearest TRL has.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench_common import REPO, add_trl_arguments, resolve_trl_arguments, run_child

PROMPTS_PER_STEP, SAMPLES, NEW_TOKENS, LR = 2, 4, 128, 1e-5
TRL_BETA = {"grpo": 0.0, "rloo": 0.05}


def reward_file(bench: Path) -> Path:
    path = bench / "_out" / "good_words_reward.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "import json, os\n"
        f"GOOD = set(json.load(open({str(bench / 'assets' / 'good_words.json')!r})))\n"
        "def good_words(prompts, completions, **fields):\n"
        "    return [sum(w in GOOD for w in c.split()) / max(1, len(c.split())) for c in completions]\n")
    return path


def run_alignloop(args, algo: str, size: str, precision: str, logs: Path, cpu_linear: str = "auto") -> dict:
    bench = args.bench_work
    out = Path(tempfile.mkdtemp(prefix=f"rl-{algo}-{size}-", dir=bench / "_out"))
    beta = TRL_BETA.get(algo, 0.05)
    cmd = [str(REPO / ".venv/bin/alignloop"), algo, f"--model.name_or_path={bench / 'assets' / f'model-{size}'}",
           f"--data.path={bench / 'assets' / 'prompts.jsonl'}", f"--rl.reward={reward_file(bench)}:good_words",
           f"--train.batch_size={PROMPTS_PER_STEP if algo != 'ppo' else PROMPTS_PER_STEP * SAMPLES}",
           f"--rl.group_size={SAMPLES if algo != 'ppo' else 1}", f"--rl.kl_coef={beta}", "--rl.loss_aggregation=token",
           f"--sampling.max_new_tokens={NEW_TOKENS}", "--sampling.stop_at_eos=false", "--sampling.batch_size=8",
           f"--train.max_steps={args.steps}", f"--train.lr={LR}", "--train.lr_schedule=constant", "--train.warmup_steps=0",
           "--train.max_grad_norm=1.0", f"--train.threads={args.threads}", "--train.eval_every=0", "--train.save_every=0",
           "--train.resume=never", f"--train.precision={precision}", f"--model.cpu_linear={cpu_linear}",
           f"--run.output_dir={out}", "--run.name=run"]
    if algo == "ppo":  # one PPO epoch, one minibatch: the same number of updates as GRPO's step
        cmd += ["--rl.epochs=1", "--rl.minibatches=1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    log = logs / f"alignloop-{algo}-{size}-{precision}-{cpu_linear}.log"
    code, wall, rss = run_child(cmd, log, env, REPO)
    res = {"impl": "alignloop", "cpu_linear": cpu_linear, "algo": algo, "size": size, "precision": precision, "wall_s": wall, "peak_rss_mb": rss}
    if code != 0:
        res["error"] = f"exit {code}, see {log}"
        return res
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = rows[args.warmup:]
    res.update(step_s=statistics.median(r["perf/step_s"] for r in timed),
               rollout_s=statistics.median(r["perf/rollout_s"] for r in timed),
               train_s=statistics.median(r["perf/train_s"] for r in timed),
               decode_tok_s=statistics.median(r["perf/rollout_tokens_per_s"] for r in timed),
               tokens=statistics.median(r["train/tokens"] for r in timed),
               reward=statistics.mean(r["train/reward"] for r in rows))
    shutil.rmtree(out, ignore_errors=True)
    return res


def run_trl(args, algo: str, size: str, precision: str, logs: Path) -> dict:
    cmd = [str(args.trl_python), str(args.trl_script), "--one", algo, "--size", size, "--precision", precision,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    log = logs / f"trl-{algo}-{size}-{precision}.log"
    code, wall, rss = run_child(cmd, log, dict(os.environ, BENCH_WORK=str(args.bench_work)), args.bench_work)
    res = {"impl": "trl", "algo": algo, "size": size, "precision": precision, "wall_s": wall, "peak_rss_mb": rss}
    line = next((x for x in log.read_text().splitlines() if x.startswith("RESULT_JSON ")), None)
    if code != 0 or line is None:
        res["error"] = f"exit {code}, see {log}"
        return res
    r = json.loads(line[len("RESULT_JSON "):])
    completions = r["config"]["completions_per_step"]
    res.update(step_s=r["step_s_median"], rollout_s=r["rollout_s_median"], train_s=r["train_part_s_median"],
               decode_tok_s=completions * NEW_TOKENS / r["gen_s_median"], tokens=completions * NEW_TOKENS)
    return res


def impl(result: dict) -> str:
    return result["impl"] + (f" (cpu_linear={result['cpu_linear']})" if result.get("cpu_linear", "auto") != "auto" else "")


def table(results: list[dict]) -> str:
    out = ["| algo | size | precision | impl | s/step | rollout s | train s | decoded tok/s | peak RSS MB | TRL/alignloop s/step | decode ×TRL |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    trl = {(r["algo"], r["size"], r["precision"]): r for r in results if r["impl"] == "trl" and "error" not in r}
    for r in results:
        if "error" in r:
            out.append(f"| {r['algo']} | {r['size']} | {r['precision']} | {impl(r)} | error: {r['error']} | | | | | | |")
            continue
        anchor = trl.get((r["algo"], r["size"], r["precision"]))
        ratio = f"{anchor['step_s'] / r['step_s']:.2f}×" if anchor and r["impl"] == "alignloop" else ""
        decode = f"{r['decode_tok_s'] / anchor['decode_tok_s']:.2f}×" if anchor and r["impl"] == "alignloop" else ""
        out.append(f"| {r['algo']} | {r['size']} | {r['precision']} | {impl(r)} | {r['step_s']:.3f} | {r['rollout_s']:.3f} | {r['train_s']:.3f} | "
                   f"{r['decode_tok_s']:.0f} | {r['peak_rss_mb']:.0f} | {ratio} | {decode} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="5m,40m")
    ap.add_argument("--algos", default="grpo,rloo,ppo")
    ap.add_argument("--precisions", default="fp32", help="comma list of fp32, bf16")
    ap.add_argument("--cpu-linear", default="auto", help="comma list of alignloop's model.cpu_linear values to run (auto, onednn, torch)")
    add_trl_arguments(ap)
    args = resolve_trl_arguments(ap.parse_args())
    logs = args.bench_work / "results" / "rl_vs_trl-logs"
    logs.mkdir(parents=True, exist_ok=True)
    results = []
    for size in args.sizes.split(","):
        for precision in args.precisions.split(","):
            for algo in args.algos.split(","):
                for cpu_linear in args.cpu_linear.split(","):
                    results.append(run_alignloop(args, algo, size, precision, logs, cpu_linear))
                    print(json.dumps(results[-1]), flush=True)
                if algo in TRL_BETA:
                    results.append(run_trl(args, algo, size, precision, logs))
                    print(json.dumps(results[-1]), flush=True)
    text = table(results)
    print(text)
    out = args.bench_work / "results"
    (out / "rl_vs_trl.md").write_text(text + "\n")
    (out / "rl_vs_trl.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
