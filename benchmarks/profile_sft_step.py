#!/usr/bin/env python
"""Where an alignloop SFT step spends its time, on the benchmark work of ``stage_vs_trl.py``.

Runs ``alignloop sft`` in this process (same CLI, same arguments as the benchmark) with
observation-only wrappers around the step's phases:

* steps 1..warmup: not measured;
* the next ``--timed`` steps: wall time per phase (collate, forward = model call incl. lm_head,
  loss, backward, grad clip, optimizer step, zero_grad, rest), no profiler attached;
* the last ``--profiled`` steps: ``torch.profiler`` (CPU), op-level self time grouped by the phase
  each op ran in, plus a flat top-N table.

Nothing in src/ is changed. Use the alignloop venv:

    .venv/bin/python benchmarks/profile_sft_step.py --size 40m --precision fp32
    .venv/bin/python benchmarks/profile_sft_step.py --size 40m --precision bf16 --trace /tmp/bf16.json

Writes ``<bench-work>/results/profile-sft-<size>-<precision>.{md,json}`` (and a Chrome trace with
``--trace``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    default_work = Path(os.environ.get("BENCH_WORK", REPO / "bench-work"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="40m")
    ap.add_argument("--precision", default="fp32", help="alignloop's --train.precision (fp32, bf16, bf16-autocast, ...)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timed", type=int, default=5)
    ap.add_argument("--profiled", type=int, default=1, help="steps under torch.profiler (later ones run slower: 1 is the cleanest)")
    ap.add_argument("--bench-work", type=Path, default=default_work)
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--trace", type=Path, default=None, help="also write a Chrome trace of the profiled steps")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    args.out_dir = (args.out_dir or args.bench_work / "results").resolve()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import accelerate
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    import alignloop.train.loop as loop
    import alignloop.train.sft as sft
    from alignloop.cli import main as cli_main

    total_steps = args.warmup + args.timed + args.profiled
    phase_s: dict[str, float] = collections.defaultdict(float)
    per_step: list[dict] = []
    state = {"step_start": None, "prof": None, "step": 0}
    profs = []  # one profiler per profiled step: a long-running one slowed the later steps down

    def timed(name, fn):
        @functools.wraps(fn)  # keeps the signature: accelerate inspects zero_grad's
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            with record_function(f"## {name}"):
                try:
                    return fn(*a, **k)
                finally:
                    phase_s[name] += time.perf_counter() - t0
        return wrapper

    # Phases of fit_causal_lm's step. Each wrapper only times and labels; arguments pass through.
    sft.collate = timed("collate", sft.collate)
    sft.completion_nll = timed("loss", sft.completion_nll)
    accelerate.Accelerator.backward = timed("backward", accelerate.Accelerator.backward)
    accelerate.Accelerator.clip_grad_norm_ = timed("clip_grad_norm", accelerate.Accelerator.clip_grad_norm_)
    torch.optim.AdamW.step = timed("optimizer.step", torch.optim.AdamW.step)
    torch.optim.AdamW.zero_grad = timed("zero_grad", torch.optim.AdamW.zero_grad)
    precision_cls = getattr(loop, "Precision", None)  # bf16 master weights: grad casts and weight refresh
    if precision_cls is not None:
        precision_cls.after_backward = timed("precision.after_backward", precision_cls.after_backward)
        precision_cls.after_step = timed("precision.after_step", precision_cls.after_step)
    from transformers.models.llama import modeling_llama as llama

    llama.LlamaForCausalLM.forward = timed("forward", llama.LlamaForCausalLM.forward)
    for cls, label in ((llama.LlamaAttention, "fwd/attention block"), (llama.LlamaMLP, "fwd/mlp block"),
                       (llama.LlamaRMSNorm, "fwd/rmsnorm")):
        cls.forward = timed(label, cls.forward)

    # Step boundaries: fit_causal_lm calls model.train() first thing in every step and
    # MetricsLog.write right after the step (log_every=1).
    orig_train = torch.nn.Module.train

    def on_train(self, mode=True):
        if mode and state["step_start"] is None and isinstance(self, llama.LlamaForCausalLM):
            state["step_start"] = time.perf_counter()
            phase_s.clear()
            if state["step"] >= args.warmup + args.timed:
                state["prof"] = profile(activities=[ProfilerActivity.CPU])
                state["prof"].__enter__()
        return orig_train(self, mode)

    torch.nn.Module.train = on_train
    orig_write = loop.MetricsLog.write

    def on_step_end(self, step, metrics):
        wall = time.perf_counter() - state["step_start"]
        state["step_start"] = None
        state["step"] = step
        per_step.append({"step": step, "wall_s": wall, "perf/step_s": metrics["perf/step_s"], **dict(phase_s)})
        if state["prof"] is not None:
            state["prof"].__exit__(None, None, None)
            profs.append(state["prof"])
            state["prof"] = None
        return orig_write(self, step, metrics)

    loop.MetricsLog.write = on_step_end

    assets = args.bench_work / "assets"
    out_root = tempfile.mkdtemp(prefix="profile-sft-", dir=args.bench_work / "_out")
    argv = [
        "sft", f"--model.name_or_path={assets / f'model-{args.size}'}", f"--data.path={assets / 'sft.jsonl'}",
        "--data.max_length=256", "--data.eval_fraction=0", "--train.batch_size=8", f"--train.max_steps={total_steps}",
        "--train.lr=1e-5", "--train.lr_schedule=constant", "--train.warmup_steps=0", "--train.max_grad_norm=1.0",
        f"--train.precision={args.precision}", f"--train.threads={args.threads}", "--train.save_every=0",
        "--train.eval_every=0", "--train.log_every=1", "--train.resume=never", f"--run.output_dir={out_root}",
    ]
    rc = cli_main(argv)
    torch.nn.Module.train = orig_train
    if rc != 0:
        print(f"alignloop exited {rc}", file=sys.stderr)
        return rc

    # ---- wall-clock phases over the timed (unprofiled) steps --------------------------------------
    timed_steps = [r for r in per_step if args.warmup < r["step"] <= args.warmup + args.timed]
    names = ["collate", "forward", "fwd/attention block", "fwd/mlp block", "fwd/rmsnorm", "loss", "backward",
             "precision.after_backward", "clip_grad_norm", "optimizer.step", "precision.after_step", "zero_grad"]
    step_med = statistics.median(r["wall_s"] for r in timed_steps)
    phases = {n: statistics.median(r.get(n, 0.0) for r in timed_steps) for n in names}
    top_level = ["collate", "forward", "loss", "backward", "precision.after_backward", "clip_grad_norm", "optimizer.step",
                 "precision.after_step", "zero_grad"]
    phases["rest (outside the phases)"] = step_med - sum(phases[n] for n in top_level)

    # ---- profiler: self CPU time per op, per enclosing phase ------------------------------------
    events = [e for prof in profs for e in prof.events()]
    by_phase_op: dict[tuple[str, str], float] = collections.defaultdict(float)
    by_op: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])

    def phase_of(evt) -> str:
        label = "other"
        p = evt
        while p is not None:
            if p.name.startswith("## ") and p.name[3:] in top_level:
                label = p.name[3:]
            p = p.cpu_parent
        return label

    for e in events:
        if e.name.startswith("## ") or e.name.startswith("ProfilerStep"):
            continue
        self_us = e.self_cpu_time_total
        if self_us <= 0:
            continue
        name = e.name
        if name.startswith("Optimizer."):
            continue  # wrapper events; their ops are counted below them
        by_phase_op[(phase_of(e), name)] += self_us
        by_op[name][0] += self_us
        by_op[name][1] += 1
    prof_total_us = sum(v[0] for v in by_op.values())
    n_prof = args.profiled
    if args.trace:
        profs[0].export_chrome_trace(str(args.trace))  # the first profiled step

    # ---- report ---------------------------------------------------------------------------------
    md = [f"# alignloop SFT step profile: {args.size} {args.precision}, 8×256, {args.threads} threads", ""]
    md.append(f"Median step wall time over {len(timed_steps)} unprofiled steps: **{step_med:.3f} s** "
              f"(alignloop perf/step_s {statistics.median(r['perf/step_s'] for r in timed_steps):.3f} s).")
    md.append("")
    md.append("| phase (wall clock, median per step) | s | share |")
    md.append("|---|---|---|")
    for n in top_level + ["rest (outside the phases)"]:
        md.append(f"| {n} | {phases[n]:.3f} | {100 * phases[n] / step_med:.1f}% |")
        if n == "forward":
            for sub in ("fwd/attention block", "fwd/mlp block", "fwd/rmsnorm"):
                md.append(f"| &nbsp;&nbsp;{sub} | {phases[sub]:.3f} | {100 * phases[sub] / step_med:.1f}% |")
    md.append("")
    prof_steps = [r for r in per_step if r["step"] > args.warmup + args.timed]
    md.append(f"Op self-CPU time over {n_prof} profiled steps (torch.profiler; those steps took "
              f"{', '.join(format(r['wall_s'], '.2f') for r in prof_steps)} s), per step, top {args.top}:")
    md.append("")
    md.append("| op | phase(s) | ms/step | share of profiled op time | calls/step |")
    md.append("|---|---|---|---|---|")
    for name, (us, calls) in sorted(by_op.items(), key=lambda kv: -kv[1][0])[: args.top]:
        where = sorted(((ph, v) for (ph, op), v in by_phase_op.items() if op == name), key=lambda x: -x[1])
        where_s = ", ".join(f"{ph} {100 * v / us:.0f}%" for ph, v in where[:3])
        md.append(f"| `{name}` | {where_s} | {us / 1e3 / n_prof:.1f} | {100 * us / prof_total_us:.1f}% | {calls / n_prof:.0f} |")
    md.append("")
    md.append("Per phase, top ops (ms/step):")
    md.append("")
    for ph in top_level + ["other"]:
        ops = sorted(((op, v) for (p, op), v in by_phase_op.items() if p == ph), key=lambda x: -x[1])
        if not ops:
            continue
        tot = sum(v for _, v in ops)
        md.append(f"- **{ph}** ({tot / 1e3 / n_prof:.0f} ms): " + ", ".join(f"`{op}` {v / 1e3 / n_prof:.0f}" for op, v in ops[:8]))
    text = "\n".join(md) + "\n"
    print(text)
    stem = args.out_dir / f"profile-sft-{args.size}-{args.precision}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({
        "size": args.size, "precision": args.precision, "threads": args.threads, "step_s_median": step_med,
        "phases_s": phases, "per_step": per_step,
        "ops_ms_per_step": {k: v[0] / 1e3 / n_prof for k, v in by_op.items()},
        "phase_ops_ms_per_step": {f"{p} | {o}": v / 1e3 / n_prof for (p, o), v in by_phase_op.items()},
    }, indent=1))
    print(f"wrote {stem.with_suffix('.md')}")
    with contextlib.suppress(Exception):
        import shutil

        shutil.rmtree(out_root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
