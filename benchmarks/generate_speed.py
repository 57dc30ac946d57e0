#!/usr/bin/env python
"""Decoded tokens/s of alignloop's :func:`~alignloop.rollout.generate.generate` against plain HF
``model.generate``, same process, same inputs, alternating.

The work, per call: the first 8 prompts of ``<bench-work>/assets/prompts.jsonl`` (128 words =
128 tokens each, so no padding) as one batch, exactly 128 new tokens per row, sampled at
temperature 1 from the full vocabulary, fp32, 2 torch threads. alignloop runs with
``stop_token_ids=()``; HF with ``min_new_tokens=128`` (its way of never stopping early) and
``top_k=0``: HF's default ``top_k=50`` would sample from another distribution, so it is timed
too, in its own column, for reference. tokens/s = 8 × 128 / the call's wall time (prefill
included); each cell is the median of ``--repeats`` calls after one untimed warm-up call of each.

"foreign CPU" is the CPU time other processes used during the timed calls, in cores (from
``/proc/stat`` minus this process's own): on 2 cores anything above ~0.2 slows both sides.

    .venv/bin/python benchmarks/generate_speed.py
    .venv/bin/python benchmarks/generate_speed.py --sizes 5m --repeats 5
    .venv/bin/python benchmarks/generate_speed.py --sizes 40m --profile   # where our decode time goes

Writes ``<bench-work>/results/generate_speed.md`` (the table, also printed). ``--profile`` adds,
per size, one more call of ours under ``torch.profiler``: the ops by self CPU time, and the
decode step's time split into products, attention and the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from alignloop.rollout.generate import Sampling, encode_prompts, generate

BATCH = 8
NEW_TOKENS = 128


def busy_jiffies() -> int | None:
    """CPU time all processes have used, in clock ticks (None off Linux)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return user + nice + system + irq + softirq + steal


def timed(call: Callable[[], object]) -> tuple[float, float | None]:
    """(wall seconds, foreign cores) of one call."""
    tick = os.sysconf("SC_CLK_TCK")
    busy0, own0, t0 = busy_jiffies(), os.times(), time.perf_counter()
    call()
    wall = time.perf_counter() - t0
    busy1, own1 = busy_jiffies(), os.times()
    if busy0 is None or busy1 is None:
        return wall, None
    own = (own1.user - own0.user) + (own1.system - own0.system)
    return wall, max(0.0, (busy1 - busy0) / tick - own) / wall


# Op names (self time) by what they do in a call: the prefill's and the decode steps' products
# (aten::mm is the unpacked prefill, the packed decode products are oneDNN's or MKL's own ops),
# packing the weights once per call, and attention (decode attention is bmm + softmax).
GROUPS = {
    "products": ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise", "mkl::_mkl_linear"),
    "weight packing": ("mkldnn::_reorder_linear_weight", "mkl::_mkl_reorder_linear_weight"),
    "attention": ("aten::_scaled_dot_product", "aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::masked_fill"),
}


def profile_call(call: Callable[[], object], steps: int) -> str:
    """One call under ``torch.profiler``: a table of the ops by self CPU time and the call's time
    per decode step (prefill included) split by :data:`GROUPS`; the rest is elementwise ops,
    sampling, Python and the profiler's own cost per op."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        call()
        wall = time.perf_counter() - t0
    averages = prof.key_averages()
    groups = dict.fromkeys(GROUPS, 0.0)
    for event in averages:
        for group, prefixes in GROUPS.items():
            if event.key.startswith(prefixes):
                groups[group] += event.self_cpu_time_total / 1e6
    rest = wall - sum(groups.values())
    split = " · ".join(f"{name} {seconds / steps * 1e3:.1f} ms" for name, seconds in [*groups.items(), ("the rest", rest)])
    return (f"profiled call: {wall:.2f} s for {steps} decode steps, {wall / steps * 1e3:.1f} ms a step: {split}\n\n"
            + averages.table(sort_by="self_cpu_time_total", row_limit=12))


def bench_size(assets: Path, size: str, repeats: int, with_profile: bool = False) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(assets / "tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(str(assets / f"model-{size}"), dtype=torch.float32).eval()
    with open(assets / "prompts.jsonl") as f:
        prompts = [json.loads(line)["prompt"] for _, line in zip(range(BATCH), f)]
    prompt_ids = encode_prompts(tokenizer, prompts)
    width = max(len(ids) for ids in prompt_ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids])
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids])
    sampling = Sampling(max_new_tokens=NEW_TOKENS, temperature=1.0, seed=0)

    def ours() -> None:
        out = generate(model, tokenizer, prompts, sampling, batch_size=BATCH, stop_token_ids=())
        assert all(len(ids) == NEW_TOKENS for ids in out.completion_ids)

    def hf(top_k: int) -> Callable[[], None]:
        def call() -> None:
            with torch.inference_mode():
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    do_sample=True,
                    temperature=1.0,
                    top_k=top_k,
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                    pad_token_id=pad,
                )
            assert out.shape == (BATCH, width + NEW_TOKENS)

        return call

    calls = {"ours": ours, "hf": hf(0), "hf_top50": hf(50)}
    for call in calls.values():  # warm-up: first-call allocations, lazy imports
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    foreign: list[float] = []
    for _ in range(repeats):
        for name, call in calls.items():
            wall, cores = timed(call)
            times[name].append(wall)
            if cores is not None:
                foreign.append(cores)
    tokens = BATCH * NEW_TOKENS
    result = {name: tokens / statistics.median(walls) for name, walls in times.items()}
    return {
        "size": size,
        "prompt_tokens": width,
        **result,
        "times": times,
        "foreign": statistics.median(foreign) if foreign else None,
        "profile": profile_call(ours, NEW_TOKENS) if with_profile else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench-work", default=os.environ.get("BENCH_WORK", "./bench-work"))
    parser.add_argument("--sizes", default="5m,40m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="also profile one call of ours per size")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    bench_work = Path(args.bench_work)
    rows = [bench_size(bench_work / "assets", size, args.repeats, args.profile) for size in args.sizes.split(",")]

    import transformers

    lines = [
        "# alignloop generate vs HF model.generate (decoded tokens/s)",
        "",
        (
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} · {platform.processor() or platform.machine()} "
            f"({os.cpu_count()} cores) · torch {torch.__version__}, transformers {transformers.__version__} · "
            f"{args.threads} threads · fp32 · batch {BATCH} × {rows[0]['prompt_tokens']} prompt tokens, "
            f"{NEW_TOKENS} new tokens, temperature 1 · median of {args.repeats}, alternating"
        ),
        "",
        "| size | ours tok/s | HF tok/s (top_k=0) | ratio ours/HF | HF tok/s (default top_k=50) | foreign CPU (cores) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        foreign = "n/a" if row["foreign"] is None else f"{row['foreign']:.2f}"
        lines.append(
            f"| {row['size']} | {row['ours']:.0f} | {row['hf']:.0f} | {row['ours'] / row['hf']:.2f} | "
            f"{row['hf_top50']:.0f} | {foreign} |"
        )
    for row in rows:
        if row["profile"]:
            lines += ["", f"## {row['size']}: where our decode time goes", "", "```text", row["profile"].rstrip(), "```"]
    table = "\n".join(lines) + "\n"
    print(table)
    out = bench_work / "results" / "generate_speed.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
