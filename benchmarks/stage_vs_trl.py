#!/usr/bin/env python
"""alignloop vs TRL on the same work, same machine, same invocation, for one training stage.

``--stage sft`` (the default): alignloop's ``alignloop sft`` against TRL's ``SFTTrainer`` (batch
8 x 256 tokens, loss on the completion). ``--stage reward``: alignloop's ``alignloop reward``
against TRL's ``RewardTrainer`` (8 preference pairs per step, chosen and rejected 8 x 256 each in
one forward, ``LlamaForSequenceClassification(num_labels=1)`` with a new random score head,
Bradley-Terry loss).

For every (size, precision) this runs, interleaved (alignloop, TRL, alignloop, TRL, ...):

* alignloop: ``<alignloop-python> -m alignloop STAGE ...`` (through a tiny wrapper that also
  timestamps each step end, see ``ALIGNLOOP_CHILD``) on the benchmark assets: the stage's batch,
  10 steps, AdamW lr 1e-5 constant, no warmup, grad-norm clip 1.0 (TRL's default), no held-out
  set, no checkpoint before the last step, ``--train.threads`` torch threads. s/step = median of
  ``perf/step_s`` (metrics.jsonl) over steps warmup+1..steps.
* TRL: ``<trl-python> trl_baseline.py --one STAGE --size S --precision P`` with ``BENCH_WORK`` set.
  It prints one ``RESULT_JSON`` line (median s/step over the same steps).

Precisions (the benchmark's names; the alignloop mode used is in the table):
* ``fp32``: no autocast on both sides.
* ``bf16``: TRL ``bf16=True`` = bf16 autocast over fp32 weights; alignloop the same thing, which is
  ``--train.precision=bf16-autocast`` where alignloop has that mode (``bf16`` before it had).
* ``bf16-master`` (only where alignloop has ``bf16-autocast``): alignloop's ``--train.precision=bf16``
  (bf16 weights and activations, fp32 master weights and optimiser) against TRL's bf16 autocast,
  the nearest TRL has. Not the identical computation: read it as "alignloop's bf16 vs TRL's bf16".

Both are child processes started the same way; peak RSS is the child's ``ru_maxrss`` from
``os.wait4`` (so one child's peak never hides another's, as RUSAGE_CHILDREN would). Before each
run the script waits for the machine to be idle, and after it records the CPU time that other
processes used meanwhile ("foreign CPU"), so a contended measurement is visible (and retried with
``--retries``).

This file never imports trl (nor torch): TRL only runs inside its own venv, as a subprocess.

    .venv/bin/python benchmarks/stage_vs_trl.py                       # SFT: 5m,40m x fp32,bf16, 1 repeat
    .venv/bin/python benchmarks/stage_vs_trl.py --sizes 40m --precisions bf16 --repeats 3
    .venv/bin/python benchmarks/stage_vs_trl.py --stage reward        # the reward model, same matrix

Writes <bench-work>/results/<stage>_vs_trl.{md,json,png} and keeps per-run logs in
<bench-work>/results/<stage>_vs_trl-logs/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The benchmark definition, as in trl_baseline.py (BATCH, SEQ, OFFLINE_PROMPT, LR). The harness
# checks that the measured work matches it rather than trusting these numbers.
BATCH = 8
SEQ = 256
PROMPT = 64
COMPLETION = SEQ - PROMPT  # 191 words + EOS: the tokens that carry loss
LR = 1e-5

# What differs between the stages. sequences: rows through the trained forward per step (reward:
# the 8 chosen then the 8 rejected, one forward of 2 x 8).
STAGES = {
    "sft": {"data": "sft.jsonl", "sequences": BATCH, "title": "alignloop SFT vs TRL SFT",
            "chart": f"SFT {BATCH}×{SEQ}"},
    "reward": {"data": "pref.jsonl", "sequences": 2 * BATCH, "title": "alignloop reward model vs TRL RewardTrainer",
               "chart": f"reward model 2×{BATCH}×{SEQ}"},
}

# Runs alignloop's CLI exactly as `python -m alignloop` does, after wrapping two functions so the
# harness can (1) timestamp every step end the way TRL's driver does (wall time between
# consecutive step ends, so whatever alignloop does between its own perf/step_s windows is seen)
# and (2) count the positions and non-pad tokens of each step's batches (TRL's "tokens trained"):
# the stage's collation (sft: `collate(examples, pad_token_id)` -> {input_ids, attention_mask,
# ...}; reward: `collate_examples(examples, pad_id, device[, groups])` -> {"inputs": {input_ids,
# attention_mask, ...} or a list of such sub-batches (reward.length_groups), ...}, chosen and
# rejected together), and (3) note the peak RSS so far
# (VmHWM) at each step end: the whole-process peak also covers the checkpoint and final model
# alignloop writes after the last step, which TRL's run does not do. Only the stage's own module is
# imported here. Nothing in src/ is modified; the wrappers only observe.
ALIGNLOOP_CHILD = r"""
import json, os, sys, time
import alignloop.train.loop as _loop
_clock = os.environ["STAGE_VS_TRL_CLOCK"]
_pending = {"positions": 0, "tokens": 0}
if sys.argv[1] == "reward":
    import alignloop.train.reward as _reward
    _collate_examples = _reward.collate_examples
    def _counting_collate_examples(*args, **kwargs):
        batch = _collate_examples(*args, **kwargs)
        inputs = batch["inputs"]
        for sub in ([inputs] if isinstance(inputs, dict) else inputs):  # one batch, or reward.length_groups sub-batches
            _pending["positions"] += int(sub["input_ids"].numel())
            _pending["tokens"] += int(sub["attention_mask"].sum())
        return batch
    _reward.collate_examples = _counting_collate_examples
else:
    import alignloop.train.sft as _sft
    _collate = _sft.collate
    def _counting_collate(examples, pad_token_id):
        batch = _collate(examples, pad_token_id)
        _pending["positions"] += int(batch["input_ids"].numel())
        _pending["tokens"] += int(batch["attention_mask"].sum())
        return batch
    _sft.collate = _counting_collate
_write = _loop.MetricsLog.write
def _hwm_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
def _timed_write(self, step, metrics):
    now = time.perf_counter()
    with open(_clock, "a") as f:
        f.write(json.dumps({"step": step, "t": now, "peak_rss_mb": _hwm_mb(), **_pending}) + "\n")
    _pending.update(positions=0, tokens=0)
    return _write(self, step, metrics)
_loop.MetricsLog.write = _timed_write
from alignloop.cli import main
sys.argv[0] = "alignloop"
sys.exit(main(sys.argv[1:]))
"""


def alignloop_precisions(python: Path) -> list[str]:
    """The values alignloop's ``train.precision`` accepts (read from its config, in its venv)."""
    code = ("import typing\nfrom alignloop.config import TrainConfig\n"
            "print(' '.join(typing.get_args(typing.get_type_hints(TrainConfig)['precision'])))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"cannot read alignloop's precision modes: {out.stderr.strip().splitlines()[-1:]}")
    return out.stdout.split()


def precision_modes(choices: list[str]) -> dict[str, tuple[str, str]]:
    """Benchmark precision -> (alignloop --train.precision, TRL --precision)."""
    modes = {"fp32": ("fp32", "fp32")}
    if "bf16-autocast" in choices:  # bf16 means bf16 weights + fp32 master; autocast is its own mode
        modes["bf16"] = ("bf16-autocast", "bf16")
        modes["bf16-master"] = ("bf16", "bf16")
    elif "bf16" in choices:  # earlier versions: bf16 = autocast over fp32 weights, as TRL's
        modes["bf16"] = ("bf16", "bf16")
    return modes


def git_state(repo: Path) -> str:
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "src"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"
    return (head or "no commit") + (" + uncommitted changes in src/" if dirty else "")


# ---------------------------------------------------------------------------------------------
# Machine load: wait for quiet, measure what others used
# ---------------------------------------------------------------------------------------------
def cpu_jiffies() -> tuple[float, float]:
    """(busy, total) seconds of all CPUs since boot, from /proc/stat."""
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return (total - idle) / hz, total / hz


def busy_cores(seconds: float) -> float:
    b0, t0 = cpu_jiffies()
    time.sleep(seconds)
    b1, t1 = cpu_jiffies()
    ncpu = os.cpu_count() or 1
    return ncpu * (b1 - b0) / max(t1 - t0, 1e-9)


def wait_for_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (up to ``max_wait`` s) until under ``threshold`` cores are busy; return the last load."""
    deadline = time.monotonic() + max_wait
    load = busy_cores(1.0)
    announced = False
    while load > threshold and time.monotonic() < deadline:
        if not announced:
            print(f"  machine busy ({load:.2f} cores used by other processes), waiting up to {max_wait:.0f}s ...", flush=True)
            announced = True
        load = busy_cores(2.0)
    return load


def run_child(cmd: list[str], env: dict, log_path: Path, cwd: Path, timeout: float) -> dict:
    """Run ``cmd`` with stdout+stderr to ``log_path``; return exit code, wall, peak RSS, CPU use."""
    busy0, _ = cpu_jiffies()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(cwd))
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)  # we reaped it: keep Popen consistent
    wall = time.perf_counter() - t0
    busy1, _ = cpu_jiffies()
    child_cpu = usage.ru_utime + usage.ru_stime
    foreign = max(0.0, (busy1 - busy0) - child_cpu)  # CPU seconds others used meanwhile
    return {
        "returncode": proc.returncode,
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux: KiB
        "child_cpu_s": child_cpu,
        "child_sys_s": usage.ru_stime,
        "minor_faults": usage.ru_minflt,
        "child_cores": child_cpu / wall,
        "foreign_cpu_s": foreign,
        "foreign_cores": foreign / wall,  # average cores other processes used while this ran
    }


# ---------------------------------------------------------------------------------------------
# The two runs
# ---------------------------------------------------------------------------------------------
def run_alignloop(args, size: str, precision: str, tag: str, logs: Path) -> dict:
    assets = args.bench_work / "assets"
    stage = args.stage
    out_root = Path(tempfile.mkdtemp(prefix=f"alignloop-{stage}-{size}-{precision}-", dir=args.bench_work / "_out"))
    name = stage
    clock = out_root / "step_clock.jsonl"
    cli_args = [
        stage,
        f"--model.name_or_path={assets / f'model-{size}'}",
        f"--data.path={assets / STAGES[stage]['data']}",
        f"--data.max_length={SEQ}",
        "--data.eval_fraction=0",
        *(["--train.epochs=null"] if stage == "reward" else []),  # the reward stage defaults to 1 epoch
        f"--train.batch_size={BATCH}",
        "--train.grad_accum=1",
        f"--train.max_steps={args.steps}",
        f"--train.lr={LR}",
        "--train.lr_schedule=constant",
        "--train.warmup_steps=0",
        "--train.weight_decay=0.0",
        f"--train.max_grad_norm={args.max_grad_norm}",
        f"--train.precision={precision}",
        f"--model.cpu_linear={args.cpu_linear}",
        f"--train.threads={args.threads}",
        "--train.log_every=1",
        "--train.eval_every=0",
        "--train.save_every=0",
        "--train.resume=never",
        # TRL's order (a plain shuffle) and its one forward of 2x8 rows per step (--reward-length-groups)
        *(["--reward.batching=random", f"--reward.length_groups={args.reward_length_groups}"] if stage == "reward" else []),
        f"--run.output_dir={out_root}",
        f"--run.name={name}",
    ]
    if args.plain_alignloop:
        cmd = [str(args.alignloop_python), "-m", "alignloop", *cli_args]
    else:
        cmd = [str(args.alignloop_python), "-c", ALIGNLOOP_CHILD, *cli_args]
    env = dict(os.environ, STAGE_VS_TRL_CLOCK=str(clock), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    log = logs / f"alignloop-{tag}.log"
    proc = run_child(cmd, env, log, REPO, args.timeout)
    res = {"impl": "alignloop", "size": size, "precision": precision, "git": git_state(REPO), "cmd": cmd[:2] + (["<wrapper>"] if not args.plain_alignloop else []) + cli_args, "log": str(log), **proc}
    run_dir = out_root / name
    try:
        if proc["returncode"] != 0:
            tail = log.read_text().strip().splitlines()[-3:]
            raise RuntimeError(f"exit {proc['returncode']}: {' | '.join(tail)}")
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        res.update(check_alignloop_run(args, precision, run_dir, rows))
        timed = [r for r in rows if r["step"] > args.warmup]
        res["per_step_s"] = [r["perf/step_s"] for r in rows]
        res["step_s_median"] = statistics.median(r["perf/step_s"] for r in timed)
        res["step_s_min"] = min(r["perf/step_s"] for r in timed)
        res["first_step_s"] = rows[0]["perf/step_s"]
        if stage == "sft":  # SFT's train/tokens: the completion tokens that carry loss
            res["loss_tokens_per_step"] = statistics.median(r["train/tokens"] for r in timed)
        else:  # reward's train/tokens: the non-pad tokens of chosen + rejected; the loss is per pair
            res["metrics_tokens_per_step"] = statistics.median(r["train/tokens"] for r in timed)
            res["pairs_per_step"] = BATCH
        res["mean_loss"] = statistics.mean(r["train/loss"] for r in rows)
        if clock.is_file():
            ticks = [json.loads(x) for x in clock.read_text().splitlines() if x.strip()]
            intervals = [b["t"] - a["t"] for a, b in zip(ticks, ticks[1:]) if b["step"] > args.warmup]
            res["step_end_interval_s_median"] = statistics.median(intervals)
            res["tokens_per_step"] = statistics.median(t["tokens"] for t in ticks[args.warmup:])
            res["positions_per_step"] = statistics.median(t["positions"] for t in ticks[args.warmup:])
            res["peak_rss_mb_through_last_step"] = ticks[-1]["peak_rss_mb"]
            if not res["positions_per_step"]:
                raise RuntimeError(f"the wrapper saw no {stage} batches: alignloop's collation function moved (see ALIGNLOOP_CHILD)")
            if stage == "reward" and res["positions_per_step"] != STAGES[stage]["sequences"] * SEQ:
                raise RuntimeError(f"alignloop run is not the benchmark work: {res['positions_per_step']:g} positions per step "
                                   f"through the trained forward, expected 2×{BATCH}×{SEQ} = {2 * BATCH * SEQ}")
            if stage == "reward" and res["tokens_per_step"] != res["metrics_tokens_per_step"]:
                raise RuntimeError(f"tokens per step: the collated batches hold {res['tokens_per_step']:g} non-pad tokens, "
                                   f"alignloop's train/tokens says {res['metrics_tokens_per_step']:g}")
        else:  # --plain-alignloop: every sequence of this work is exactly SEQ tokens, no padding
            res["tokens_per_step"] = res["positions_per_step"] = STAGES[stage]["sequences"] * SEQ
        res["tokens_per_s"] = res["tokens_per_step"] / res["step_s_median"]
        if "loss_tokens_per_step" in res:
            res["loss_tokens_per_s"] = res["loss_tokens_per_step"] / res["step_s_median"]
    except Exception as e:  # noqa: BLE001 - reported in the table, the matrix goes on
        res["error"] = str(e)
    finally:
        if not args.keep_runs:
            shutil.rmtree(out_root, ignore_errors=True)
        else:
            res["run_dir"] = str(run_dir)
    return res


# Resolved config.yaml lines the stage's run must also hold (beyond the shared ones below).
STAGE_CONFIG_NEEDLES = {
    # max_steps from train.max_steps (not from epochs), max_length 256 (every sequence of the work,
    # no truncation), plain shuffled batches, no weight decay (TRL's default)
    "reward": ("epochs: null", f"max_length: {SEQ}", "batching: random", "weight_decay: 0.0"),
}


def stage_config_needles(args) -> tuple[str, ...]:
    if args.stage == "reward":
        return (*STAGE_CONFIG_NEEDLES["reward"], f"length_groups: {args.reward_length_groups}")
    return STAGE_CONFIG_NEEDLES.get(args.stage, ())


def check_alignloop_run(args, precision: str, run_dir: Path, rows: list[dict]) -> dict:
    """The timed steps must be the work and nothing else: no held-out evaluation, no checkpoint
    before the last step (the final one is saved after the last step's timer stops), the settings
    we asked for. Raise otherwise."""
    problems = []
    steps = [r["step"] for r in rows]
    if steps != list(range(1, args.steps + 1)):
        problems.append(f"metrics.jsonl steps {steps}, expected 1..{args.steps}")
    evals = [r["step"] for r in rows if any(k.startswith("eval/") for k in r)]
    if evals:
        problems.append(f"held-out evaluation ran at steps {evals}")
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) if (run_dir / "checkpoints").is_dir() else []
    if any(c != f"step-{args.steps}" for c in ckpts):
        problems.append(f"checkpoints inside the run: {ckpts}")
    config = {line.strip() for line in (run_dir / "config.yaml").read_text().splitlines()}
    for needle in ("eval_fraction: 0.0", "eval_path: null", "save_every: 0", f"batch_size: {BATCH}", "grad_accum: 1",
                   "lr_schedule: constant", "warmup_steps: 0", f"precision: {precision}", f"threads: {args.threads}",
                   f"max_grad_norm: {float(args.max_grad_norm)}", "gradient_checkpointing: false", "dtype: float32",
                   "r: 0", *stage_config_needles(args)):
        if needle not in config:
            problems.append(f"config.yaml lacks {needle!r}")
    lrs = {r["train/lr"] for r in rows}
    if lrs != {LR}:
        problems.append(f"learning rates {sorted(lrs)}, expected constant {LR}")
    if any("train/grad_norm" not in r for r in rows) and args.max_grad_norm > 0:
        problems.append("no train/grad_norm: clipping did not run")
    if problems:
        raise RuntimeError("alignloop run is not the benchmark work: " + "; ".join(problems))
    return {"checked": "no eval, no mid-run checkpoint, settings as asked", "checkpoints": ckpts}


def run_trl(args, size: str, precision: str, tag: str, logs: Path) -> dict:
    cmd = [str(args.trl_python), str(args.trl_script), "--one", args.stage, "--size", size, "--precision", precision,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    env = dict(os.environ, BENCH_WORK=str(args.bench_work))
    log = logs / f"trl-{tag}.log"
    proc = run_child(cmd, env, log, args.bench_work, args.timeout)
    res = {"impl": "trl", "size": size, "precision": precision, "cmd": cmd, "log": str(log), **proc}
    try:
        text = log.read_text()
        line = next((x for x in text.splitlines() if x.startswith("RESULT_JSON ")), None)
        if proc["returncode"] != 0 or line is None:
            tail = text.strip().splitlines()[-3:]
            raise RuntimeError(f"exit {proc['returncode']}: {' | '.join(tail)}")
        r = json.loads(line[len("RESULT_JSON "):])
        res["per_step_s"] = [s["s"] for s in r["per_step"]]
        res["step_s_median"] = r["step_s_median"]
        res["step_s_min"] = r["step_s_min"]
        res["first_step_s"] = r["first_step_s"]
        res["tokens_per_step"] = r["train_tokens_per_step"]
        res["positions_per_step"] = r["train_positions_per_step"]
        res["tokens_per_s"] = r["tokens_per_s"]
        if args.stage == "sft":
            res["loss_tokens_per_step"] = BATCH * r["config"]["completion_len"]
            res["loss_tokens_per_s"] = res["loss_tokens_per_step"] / r["step_s_median"]
        else:
            res["pairs_per_step"] = r["config"]["pairs_per_step"]
        res["mean_loss"] = r["final_loss"]  # Trainer's training_loss: mean over all steps
        res["self_reported_peak_rss_mb"] = r["peak_rss_mb"]
        res["versions"] = r["versions"]
        if (r["config"]["batch"], r["config"]["seq_len"], r["config"]["lr"]) != (BATCH, SEQ, LR):
            raise RuntimeError(f"TRL ran other work: {r['config']}")
    except Exception as e:  # noqa: BLE001
        res["error"] = str(e)
    return res


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def summarize(cells: dict) -> list[dict]:
    rows = []
    for (size, precision), pairs in cells.items():
        ours = [p["alignloop"] for p in pairs if "error" not in p["alignloop"]]
        theirs = [p["trl"] for p in pairs if "error" not in p["trl"]]
        row = {"size": size, "precision": precision, "repeats": len(pairs),
               "alignloop_precision": pairs[0]["alignloop"]["precision"], "trl_precision": pairs[0]["trl"]["precision"]}
        errors = [p[k]["error"] for p in pairs for k in ("alignloop", "trl") if "error" in p[k]]
        if errors:
            row["errors"] = errors
        med = lambda rs, k: statistics.median(r[k] for r in rs) if rs and all(k in r for r in rs) else None  # noqa: E731
        for name, rs in (("alignloop", ours), ("trl", theirs)):
            row[name] = {
                "step_s": med(rs, "step_s_median"),
                "tokens_per_s": med(rs, "tokens_per_s"),
                "loss_tokens_per_s": med(rs, "loss_tokens_per_s"),
                "peak_rss_mb": med(rs, "peak_rss_mb"),
                "foreign_cores_max": max((r["foreign_cores"] for r in rs), default=None),
                "mean_loss": med(rs, "mean_loss"),
                "per_repeat_step_s": [r["step_s_median"] for r in rs],
            }
        if ours:
            ivals = [r["step_end_interval_s_median"] for r in ours if "step_end_interval_s_median" in r]
            row["alignloop"]["step_end_interval_s"] = statistics.median(ivals) if ivals else None
            hwm = [r["peak_rss_mb_through_last_step"] for r in ours if "peak_rss_mb_through_last_step" in r]
            row["alignloop"]["peak_rss_mb_through_last_step"] = statistics.median(hwm) if hwm else None
        if ours and theirs:
            row["ratio_trl_over_alignloop"] = row["trl"]["step_s"] / row["alignloop"]["step_s"]
            row["per_repeat_ratio"] = [p["trl"]["step_s_median"] / p["alignloop"]["step_s_median"]
                                       for p in pairs if "error" not in p["trl"] and "error" not in p["alignloop"]]
        rows.append(row)
    return rows


def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def markdown(rows: list[dict], meta: dict) -> str:
    stage = meta.get("stage", "sft")
    out = [f"# {STAGES[stage]['title']} (same work, same machine, interleaved)", ""]
    out.append(f"{meta['date']} · {meta['cpu']} ({meta['nproc']} cores) · torch threads {meta['threads']} · "
               f"{meta['steps']} steps, first {meta['warmup']} excluded, median s/step · repeats {meta['repeats']}")
    out.append(f"alignloop venv: {meta['alignloop_versions']} (git {meta['alignloop_git']}) · TRL venv: {meta.get('trl_versions', '?')}")
    out.append("")
    out.append("| size | precision | alignloop `--train.precision` | alignloop s/step | TRL s/step | speed ratio TRL/alignloop "
               "| alignloop tok/s | TRL tok/s | alignloop peak RSS MB | TRL peak RSS MB | max foreign CPU (cores) al / TRL |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, t = r["alignloop"], r["trl"]
        ratio = r.get("ratio_trl_over_alignloop")
        out.append(
            f"| {r['size']} | {r['precision']} | {r['alignloop_precision']} | {fmt(a['step_s'], '.3f')} | {fmt(t['step_s'], '.3f')} | "
            f"{fmt(ratio, '.2f') + '×' if ratio else '—'} | {fmt(a['tokens_per_s'], ',.0f')} | {fmt(t['tokens_per_s'], ',.0f')} | "
            f"{fmt(a['peak_rss_mb'], ',.0f')} | {fmt(t['peak_rss_mb'], ',.0f')} | "
            f"{fmt(a['foreign_cores_max'], '.2f')} / {fmt(t['foreign_cores_max'], '.2f')} |"
        )
    out.append("")
    errs = [(r["size"], r["precision"], e) for r in rows for e in r.get("errors", [])]
    if errs:
        out.append("**Failures:**")
        out += [f"- {s} {p}: `{e}`" for s, p, e in errs]
        out.append("")
    out.append(
        "*s/step*: median over steps "
        + f"{meta['warmup'] + 1}..{meta['steps']} (alignloop: `perf/step_s` of metrics.jsonl; TRL: time between "
        "consecutive `on_step_end`), then the median over repeats. *ratio* > 1 means alignloop is faster. "
        + (f"*tok/s*: tokens entering the trained forward per second ({BATCH}×{SEQ} = {BATCH * SEQ} per step, no padding; "
           f"TRL's definition); loss tokens are {BATCH}×{COMPLETION} = {BATCH * COMPLETION} per step (in the JSON). "
           if stage == "sft" else
           f"*tok/s*: tokens entering the trained forward per second (2×{BATCH}×{SEQ} = {2 * BATCH * SEQ} per step: "
           f"the {BATCH} chosen and {BATCH} rejected sequences, no padding; TRL's definition; TRL runs them as one "
           f"forward, alignloop with `--reward.length_groups={meta.get('reward_length_groups', '?')}` as that many); "
           f"the Bradley–Terry loss is over the {BATCH} pairs. ")
        + "*peak RSS*: `ru_maxrss` of each child process from `os.wait4`, measured identically for both. "
        "*foreign CPU*: average cores used by other processes on the machine during the run (0 = clean). "
        "*bf16*: autocast over fp32 weights on both sides (TRL `bf16=True`); *bf16-master*: alignloop's bf16 "
        "weights with fp32 master weights vs TRL's bf16 autocast (not the identical computation)."
    )
    if len(meta.get("git_per_run", [])) > 1 or meta.get("git_at_start") != meta.get("alignloop_git"):
        out.append("")
        out.append(f"**Warning:** alignloop's code changed during the run (git {meta['git_at_start']} at the start, "
                   f"{meta['alignloop_git']} at the end; alignloop runs saw: {', '.join(meta.get('git_per_run', []))}; "
                   "each run's commit is in the JSON).")
    out.append("")
    out.append("Per-repeat ratios and cross-checks: alignloop's step-end-to-step-end wall interval (includes what "
               "happens between its `perf/step_s` windows, as TRL's timing does); alignloop's peak RSS up to the end "
               "of its last step (the whole-process peak above also covers saving the final model (and a checkpoint, in versions that wrote one) "
               "after training; TRL's run saves nothing); mean training loss of both (same work => should agree"
               + ("; the score heads are new random inits, equal on both sides because both seed 0 before loading" if stage == "reward" else "")
               + "):")
    out.append("")
    out.append("| size | precision | per-repeat ratios | alignloop step-end interval s | alignloop peak RSS MB through last step | mean loss al / TRL |")
    out.append("|---|---|---|---|---|---|")
    for r in rows:
        a, t = r["alignloop"], r["trl"]
        out.append(f"| {r['size']} | {r['precision']} | {', '.join(f'{x:.2f}' for x in r.get('per_repeat_ratio', []))} | "
                   f"{fmt(a.get('step_end_interval_s'), '.3f')} | {fmt(a.get('peak_rss_mb_through_last_step'), ',.0f')} | "
                   f"{fmt(a['mean_loss'], '.4f')} / {fmt(t['mean_loss'], '.4f')} |")
    out.append("")
    out.append(f"Command: `{meta['command']}` (took {meta['total_s']:.0f} s)")
    return "\n".join(out) + "\n"


def bar_chart(rows: list[dict], path: Path, stage: str = "sft") -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart", file=sys.stderr)
        return False
    rows = [r for r in rows if r.get("ratio_trl_over_alignloop")]
    if not rows:
        return False
    labels = [f"{r['size']}\n{r['precision']}" for r in rows]
    ratios = [r["ratio_trl_over_alignloop"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(1.6 * len(rows) + 2, 5.5), 4))
    colors = ["tab:green" if x >= 1 else "tab:red" for x in ratios]
    bars = ax.bar(labels, ratios, color=colors)
    for b, r in zip(bars, rows):
        spread = r.get("per_repeat_ratio", [])
        if len(spread) > 1:
            ax.plot([b.get_x() + b.get_width() / 2] * len(spread), spread, "k.", ms=4)
        ax.annotate(f"{r['ratio_trl_over_alignloop']:.2f}×", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=9)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_ylabel("TRL s/step ÷ alignloop s/step\n(> 1: alignloop faster)")
    ax.set_title(f"alignloop vs TRL, {STAGES[stage]['chart']}, same machine")
    ax.set_ylim(0, max(max(ratios), 1.0) * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def venv_versions(python: Path, modules: list[str]) -> str:
    code = ("import importlib.metadata as m\nfor n in %r:\n    try: print(n, m.version(n))\n    except Exception: pass" % modules)
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60).stdout
    except OSError:
        return "?"
    return ", ".join(line.strip() for line in out.splitlines() if line.strip())


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


# ---------------------------------------------------------------------------------------------
def main() -> int:
    default_work = Path(os.environ.get("BENCH_WORK", REPO / "bench-work"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=sorted(STAGES), default="sft",
                    help="sft: alignloop sft vs TRL SFTTrainer; reward: alignloop reward vs TRL RewardTrainer")
    ap.add_argument("--sizes", default="5m,40m", help="comma list of 5m,40m")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16 (autocast on both), bf16-master")
    ap.add_argument("--repeats", type=int, default=1, help="alignloop/TRL pairs per cell (interleaved)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1, help="leading steps excluded from the median")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="alignloop clipping; 1.0 = TRL's default")
    ap.add_argument("--reward-length-groups", type=int, default=1,
                    help="--stage reward: alignloop's reward.length_groups, forwards per step (1 = TRL's one forward "
                         "of 2x8 rows; alignloop's default is 4, 4 forwards of 4 rows on this unpadded work)")
    ap.add_argument("--bench-work", type=Path, default=default_work, help="holds assets/ and trl-venv/ (default: $BENCH_WORK or ./bench-work)")
    ap.add_argument("--alignloop-python", type=Path, default=REPO / ".venv" / "bin" / "python")
    ap.add_argument("--trl-python", type=Path, default=None, help="default: <bench-work>/trl-venv/bin/python")
    ap.add_argument("--trl-script", type=Path, default=Path(os.environ.get("TRL_BASELINE", REPO.parent / "shared" / "bench" / "trl_baseline.py")))
    ap.add_argument("--out-dir", type=Path, default=None, help="default: <bench-work>/results")
    ap.add_argument("--quiet-wait", type=float, default=120.0, help="seconds to wait for an idle machine before each run (0: don't)")
    ap.add_argument("--foreign-threshold", type=float, default=0.15, help="retry a pair when other processes used more cores than this")
    ap.add_argument("--retries", type=int, default=2, help="re-runs of a contended pair")
    ap.add_argument("--timeout", type=float, default=900.0, help="per-run limit, seconds")
    ap.add_argument("--plain-alignloop", action="store_true", help="run `python -m alignloop` without the step-clock wrapper")
    ap.add_argument("--cpu-linear", default="auto", choices=["auto", "onednn", "torch"], help="alignloop's model.cpu_linear")
    ap.add_argument("--keep-runs", action="store_true", help="keep alignloop's run folders under <bench-work>/_out")
    args = ap.parse_args()

    args.bench_work = args.bench_work.resolve()
    args.trl_python = args.trl_python or args.bench_work / "trl-venv" / "bin" / "python"
    args.out_dir = (args.out_dir or args.bench_work / "results").resolve()
    for what, p in (("assets", args.bench_work / "assets" / "READY"), ("alignloop python", args.alignloop_python),
                    ("TRL python", args.trl_python), ("trl_baseline.py", args.trl_script)):
        if not p.exists():
            print(f"stage_vs_trl: {what} not found at {p}", file=sys.stderr)
            return 2
    sizes = [s for s in args.sizes.split(",") if s]
    precisions = [p for p in args.precisions.split(",") if p]
    modes = precision_modes(alignloop_precisions(args.alignloop_python))
    for p in precisions:
        if p not in modes:
            ap.error(f"--precisions: {p!r} is not one of {', '.join(modes)} (for this alignloop)")
    base = f"{args.stage}_vs_trl"
    logs = args.out_dir / f"{base}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    (args.bench_work / "_out").mkdir(exist_ok=True)

    t_all = time.perf_counter()
    git_at_start = git_state(REPO)
    cells: dict = {}
    attempts_log = []
    for size in sizes:
        for precision in precisions:
            al_precision, trl_precision = modes[precision]
            pairs = cells.setdefault((size, precision), [])
            for rep in range(args.repeats):
                best = None
                for attempt in range(args.retries + 1):
                    pair = {}
                    for impl, fn, mode in (("alignloop", run_alignloop, al_precision), ("trl", run_trl, trl_precision)):
                        tag = f"{size}-{precision}-r{rep}-a{attempt}"
                        idle = wait_for_quiet(args.quiet_wait) if args.quiet_wait > 0 else None
                        res = fn(args, size, mode, tag, logs)
                        res["benchmark_precision"] = precision
                        res["load_before_cores"] = idle
                        pair[impl] = res
                        msg = (f"{res['step_s_median']:.3f} s/step, {res['tokens_per_s']:,.0f} tok/s, peak RSS "
                               f"{res['peak_rss_mb']:,.0f} MB" if "error" not in res else f"FAILED: {res['error'][:300]}")
                        print(f"[{size} {precision} rep {rep} try {attempt}] {impl:9s} {msg} "
                              f"(wall {res['wall_s']:.0f}s, foreign {res['foreign_cores']:.2f} cores)", flush=True)
                    contention = max(pair[k]["foreign_cores"] for k in pair)
                    attempts_log.append({"size": size, "precision": precision, "repeat": rep, "attempt": attempt, **pair})
                    if best is None or contention < best[0]:
                        best = (contention, pair)
                    if contention <= args.foreign_threshold or any("error" in pair[k] for k in pair):
                        break
                    print(f"  contended (other processes used {contention:.2f} cores): retrying this pair", flush=True)
                pairs.append(best[1])

    rows = summarize(cells)
    trl_versions = next((p["trl"]["versions"] for ps in cells.values() for p in ps if "versions" in p["trl"]), None)
    meta = {
        "stage": args.stage,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": cpu_name(),
        "nproc": os.cpu_count(),
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "max_grad_norm": args.max_grad_norm,
        "cpu_linear": args.cpu_linear,
        **({"reward_length_groups": args.reward_length_groups} if args.stage == "reward" else {}),
        "alignloop_versions": venv_versions(args.alignloop_python, ["alignloop", "torch", "transformers", "accelerate"]),
        "alignloop_git": git_state(REPO),
        "git_at_start": git_at_start,
        "git_per_run": sorted({p["alignloop"].get("git", "?") for ps in cells.values() for p in ps}),
        "precision_modes": {p: modes[p] for p in precisions},
        "trl_versions": ", ".join(f"{k} {v}" for k, v in trl_versions.items()) if trl_versions else None,
        "command": " ".join([Path(sys.executable).name, *[a if " " not in a else repr(a) for a in sys.argv]]),
        "total_s": time.perf_counter() - t_all,
    }
    md = markdown(rows, meta)
    print()
    print(md)
    (args.out_dir / f"{base}.md").write_text(md)
    (args.out_dir / f"{base}.json").write_text(json.dumps({"meta": meta, "summary": rows, "runs": attempts_log}, indent=1))
    png = args.out_dir / f"{base}.png"
    wrote_png = bar_chart(rows, png, args.stage)
    print(f"wrote {args.out_dir / f'{base}.md'}, {args.out_dir / f'{base}.json'}" + (f", {png}" if wrote_png else ""))
    return 1 if any("errors" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
