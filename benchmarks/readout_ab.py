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
    .venv/bin/python benchmarks/readout_ab.py --in-process --steps 10

Median ``perf/step_s`` over steps 2..N of each run, the median over repeats, and their ratio.
On a machine whose speed drifts by more than the saving between runs, ``--in-process``
alternates the two modes step by step in one process instead, on one fixed batch (the forward
and backward of the reward model, no optimiser): MiniLM on 32 rows of 128 tokens, the 40M Llama
on 8 pairs of a 64-token prompt and two 192-token responses, the prompt run once.
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


def in_process(name: str, args: argparse.Namespace) -> dict:
    """Forward + backward of one fixed batch, read-out on and off alternately, ``args.steps`` each."""
    import time

    import torch
    import transformers

    import alignloop.models.readout as readout
    from alignloop.models.prefix import plan_prefixes, shared_prefix_forward

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    g = torch.Generator().manual_seed(0)
    if name == "minilm":
        from alignloop.models.reward import builtin_encoder_path

        model = transformers.AutoModelForSequenceClassification.from_pretrained(builtin_encoder_path("minilm-l6"), num_labels=1)
        ids = torch.randint(1000, 20000, (32, 128), generator=g)

        def forward():
            return readout.classifier_logits(model, input_ids=ids, attention_mask=torch.ones_like(ids))
    else:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(args.bench_work / "assets" / "model-40m", num_labels=1)
        model.config.pad_token_id = 0
        rows = []
        for _ in range(8):
            prompt = torch.randint(4, 2048, (64,), generator=g).tolist()
            rows += [prompt + torch.randint(4, 2048, (192,), generator=g).tolist() for _ in range(2)]
        plan = plan_prefixes(rows, [255] * len(rows), 0)

        def forward():
            return shared_prefix_forward(model, plan, causal_lm=False).logits
    model.eval()  # dropout off (alignloop trains reward models without it); gradients still flow
    found = readout.readout_of
    times: dict = {"on": [], "off": []}
    for step in range(args.steps + 1):
        for mode in (("on", "off") if step % 2 == 0 else ("off", "on")):
            readout.readout_of = found if mode == "on" else (lambda model: None)
            start = time.perf_counter()
            forward().sum().backward()
            model.zero_grad(set_to_none=False)
            if step:  # the first of each is warm-up
                times[mode].append(time.perf_counter() - start)
    readout.readout_of = found
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    print(f"[{name} in-process] read-out on {on:.3f} s, off {off:.3f} s", flush=True)
    return {"on_s": on, "off_s": off, "ratio": off / on, "max_loss_gap": None, "times": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="minilm,llama40m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--in-process", action="store_true", help="alternate the modes step by step in this process")
    ap.add_argument("--bench-work", type=Path, default=Path(os.environ.get("BENCH_WORK", REPO / "bench-work")))
    args = ap.parse_args()
    out = args.bench_work / "_out"
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for name in args.workloads.split(","):
        if args.in_process:
            workload_args(name, args.bench_work)  # the same checks that its data is there
            results[name] = in_process(name, args)
            continue
        runs = {"on": [], "off": []}
        for rep in range(args.repeats):
            for mode in (("on", "off") if rep % 2 == 0 else ("off", "on")):  # alternate, so drift hits both
                runs[mode].append(run(mode, name, args, out))
                print(f"[{name} rep {rep}] read-out {mode:3s} {runs[mode][-1]['s_per_step']:.3f} s/step, "
                      f"mean loss {runs[mode][-1]['mean_loss']:.6f}", flush=True)
        on, off = (statistics.median(r["s_per_step"] for r in runs[m]) for m in ("on", "off"))
        loss_gap = max(abs(a["mean_loss"] - b["mean_loss"]) for a, b in zip(runs["on"], runs["off"]))
        results[name] = {"on_s": on, "off_s": off, "ratio": off / on, "max_loss_gap": loss_gap, "runs": runs}
    what = "s (forward + backward), in one process" if args.in_process else "s/step"
    lines = [f"| workload | {what}, read-out off | read-out on | off / on | max mean-loss gap |", "|---|---|---|---|---|"]
    for name, r in results.items():
        gap = "—" if r["max_loss_gap"] is None else f"{r['max_loss_gap']:.1e}"
        lines.append(f"| {name} | {r['off_s']:.3f} | {r['on_s']:.3f} | {r['ratio']:.3f}× | {gap} |")
    table = "\n".join(lines)
    print(table)
    dest = args.bench_work / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "readout_ab.md").write_text(f"{table}\n\nCommand: `{' '.join(sys.argv)}`\n")
    (dest / "readout_ab.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
