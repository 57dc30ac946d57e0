#!/usr/bin/env python
"""Two processes against one on the benchmark's 40M model: wall time, s/step and peak memory
per process, for each ``train.strategy``, on SFT, DPO and GRPO.

Every run does the same work at the same global batch (the benchmark's, ``../shared/bench``):
one process with ``train.batch_size=B`` and 2 threads, or ``torchrun --nproc_per_node 2`` with
``B/2`` per process and 1 thread each, so both use the machine's 2 cores. Peak memory is each
process's own ``ru_maxrss``, written by the process itself at its end (a torchrun's children are
not the launcher's to report); the table shows the largest over the processes.

What sharding must show is the memory: under ``fsdp`` and ``zero3`` a process keeps half of the
weights, gradients and AdamW state (16 bytes a parameter in fp32, 650 MB at 40M) where DDP keeps
all of it. Peak RSS also counts what the allocator holds on to after tensors are freed (it grows
from step to step with the varying shapes of DPO's batches under every strategy), so each process
also samples its RSS every 0.5 s right after handing freed memory back (:func:`trimmed_rss_mb`),
and the table gives the peak of those too. (Counting live tensors through ``gc.get_objects`` from a
sampling thread was tried: it can catch a tuple half built by an import and crash it.)
Speed on two CPU cores is not what FSDP is for: every block's weights are all-gathered in the
forward and again in the backward, over gloo (TCP on loopback).

    .venv/bin/python benchmarks/scale_out.py                       # sft, dpo, grpo × one, ddp, fsdp
    .venv/bin/python benchmarks/scale_out.py --stages sft --strategies ddp fsdp zero3 --steps 6

Needs the benchmark assets (``python ../shared/bench/trl_baseline.py --prepare`` with
``BENCH_WORK`` set; see benchmarks/README.md). Writes <bench-work>/results/scale_out.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import REPO
from rl_vs_trl import reward_file

BATCH = {"sft": 8, "dpo": 8, "grpo": 2}  # sequences, pairs, prompts (× 4 samples) per optimizer step


def stage_args(stage: str, bench: Path, steps: int) -> list[str]:
    assets = bench / "assets"
    common = [f"--model.name_or_path={assets / 'model-40m'}", f"--train.max_steps={steps}", "--train.lr=1e-5",
              "--train.lr_schedule=constant", "--train.warmup_steps=0", "--train.eval_every=0", "--train.save_every=0",
              "--train.resume=never", "--model.cpu_linear=torch"]
    if stage == "sft":
        return ["sft", f"--data.path={assets / 'sft.jsonl'}", "--data.eval_fraction=0", *common]
    if stage == "dpo":
        return ["dpo", f"--data.path={assets / 'pref.jsonl'}", "--data.eval_fraction=0", "--data.max_length=256", *common]
    return ["grpo", f"--data.path={assets / 'prompts.jsonl'}", f"--rl.reward={reward_file(bench)}:good_words",
            "--rl.group_size=4", "--rl.kl_coef=0", "--sampling.max_new_tokens=128", "--sampling.stop_at_eos=false", *common]


def run(stage: str, strategy: str, args: argparse.Namespace, logs: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"scale-{stage}-{strategy}-", dir=args.bench_work / "_out"))
    processes = 1 if strategy == "one" else 2
    child = [str(Path(__file__).resolve()), "--child", str(out)]
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd = [*launcher, *child, *stage_args(stage, args.bench_work, args.steps), f"--run.output_dir={out}", "--run.name=run",
           f"--train.batch_size={BATCH[stage] // processes}", f"--train.threads={2 // processes}",
           *([f"--train.strategy={strategy}"] if processes > 1 else [])]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(2 // processes))
    log = logs / f"{stage}-{strategy}.log"
    started = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    res = {"stage": stage, "strategy": strategy, "processes": processes, "wall_s": time.perf_counter() - started}
    peaks = [json.loads(p.read_text()) for p in sorted(out.glob("rss-*.json"))]
    if code != 0 or len(peaks) != processes:
        res["error"] = f"exit {code}, see {log}"
        return res
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    res.update(step_s=statistics.median(r["perf/step_s"] for r in rows[1:]), peak_rss_mb=max(p["peak_rss_mb"] for p in peaks),
               peak_trimmed_mb=max(p["peak_trimmed_mb"] for p in peaks),
               last_loss=rows[-1].get("train/loss", rows[-1].get("train/reward")))
    shutil.rmtree(out, ignore_errors=True)
    return res


def trimmed_rss_mb() -> float:
    """This process's resident memory right after glibc's ``malloc_trim`` has handed freed memory
    back to the system: close to what is alive (weights, gradients, optimiser state, buffers,
    the moment's activations, the libraries), without what the allocator keeps after frees."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(out: str, argv: list[str]) -> None:
    """One process of a run: alignloop's CLI, its trimmed RSS sampled every 0.5 s, then this
    process's peak RSS and peak trimmed RSS in ``out``."""
    import threading

    from alignloop.cli import main

    peak_trimmed = [0.0]

    def sample() -> None:
        while True:
            peak_trimmed[0] = max(peak_trimmed[0], trimmed_rss_mb())
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    code = main(argv)
    rank = os.environ.get("RANK", "0")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out, f"rss-{rank}.json").write_text(json.dumps({"peak_rss_mb": peak, "peak_trimmed_mb": peak_trimmed[0]}))
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)  # past gloo's exit race (STACK.md)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", nargs="+", default=["sft", "dpo", "grpo"], choices=list(BATCH))
    ap.add_argument("--strategies", nargs="+", default=["one", "ddp", "fsdp"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--bench-work", type=Path, default=Path(os.environ.get("BENCH_WORK", REPO / "bench-work")))
    args = ap.parse_args()
    args.bench_work = args.bench_work.resolve()
    logs = args.bench_work / "results" / "scale_out-logs"
    logs.mkdir(parents=True, exist_ok=True)
    (args.bench_work / "_out").mkdir(exist_ok=True)
    results = []
    for stage in args.stages:
        for strategy in args.strategies:
            res = run(stage, strategy, args, logs)
            print(json.dumps(res), flush=True)
            results.append(res)
    lines = [f"CPU: {cpu_name()}, {os.cpu_count()} cores. 40M model, global batch as the benchmark's; "
             f"{args.steps} steps, s/step the median of steps 2..{args.steps}.", "",
             "| stage | strategy | processes | wall s | s/step | peak RSS per process MB | peak trimmed RSS per process MB | last loss (GRPO: reward) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['stage']} | {r['strategy']} | {r['processes']} | – | – | – | – | {r['error']} |")
        else:
            lines.append(f"| {r['stage']} | {r['strategy']} | {r['processes']} | {r['wall_s']:.1f} | {r['step_s']:.3f} | "
                         f"{r['peak_rss_mb']:,.0f} | {r['peak_trimmed_mb']:,.0f} | {r['last_loss']:.4f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    (args.bench_work / "results" / "scale_out.md").write_text(md)
    (args.bench_work / "results" / "scale_out.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
