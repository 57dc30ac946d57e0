"""Rollout generation: the local engine vs the ``openai`` engine (``rollout.engine: openai``)
against ``alignloop serve`` and against ``transformers serve``, on the same model folder, prompts
and sampling settings, in one run. Prints a table of generated tokens/s and, where the server
returns sampled token ids with log-probs, the mean and largest |engine − trainer| log-prob per
token (the gap that decides whether π_old may come from the engine).

    .venv/bin/python benchmarks/rollout_engines.py --size tiny-5m --prompts 16 --group 4 --max-tokens 64

Each engine gets the machine in turn (the servers run alone in their own process; the trainer
process waits on HTTP). Prompts are chitchat's first user turns through the model's ChatML
template, each sampled ``--group`` times (an RL group: one request with ``n`` where the server
honours it). A warm-up call per engine is not timed (model load, oneDNN choice, the probe).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from serve_load import alignloop, free_port, model_folder, stop, wait_up

REPO = Path(__file__).resolve().parent.parent


def timed(call, prompts) -> tuple[float, object]:
    started = time.perf_counter()
    generation = call(prompts)
    return time.perf_counter() - started, generation


def gap(model, generation) -> tuple[float, float] | None:
    """Mean and largest |engine − trainer| log-prob per token, where the engine's are exact."""
    from alignloop.rollout.scoring import token_logprobs

    if not generation.exact_logprobs:
        return None
    trainer = token_logprobs(model, generation.prompt_ids, generation.completion_ids, 16)
    diffs = [abs(a - b) for e, t in zip(generation.logprobs, trainer) for a, b in zip(e, t)]
    return sum(diffs) / len(diffs), max(diffs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="tiny-5m", help="built-in size saved as the model folder (random init, chitchat tokenizer, ChatML)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per engine; the best is reported")
    ap.add_argument("--transformers-cli", type=Path, default=REPO / ".venv" / "bin" / "transformers")
    args = ap.parse_args()

    from alignloop.config import ModelConfig, RolloutConfig, SamplingConfig
    from alignloop.data.load import load_records
    from alignloop.models.load import load_causal_lm, load_tokenizer
    from alignloop.rollout.generate import generate
    from alignloop.rollout.remote import ServerEngine

    work = Path(tempfile.mkdtemp(prefix="rollout-bench-"))
    folder = model_folder(args.size, work)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(folder)))
    model = load_causal_lm(ModelConfig(name_or_path=str(folder)), tokenizer, seed=0).eval()
    rows, _ = load_records("builtin:chitchat-prompts", ("prompt",), args.prompts)
    prompts = [row.fields["prompt"] for row in rows for _ in range(args.group)]
    sampling = SamplingConfig(max_new_tokens=args.max_tokens, temperature=1.0, batch_size=len(prompts))
    results = []

    def measure(name: str, call) -> None:
        call(prompts[: args.group])  # warm-up
        best = None
        for _ in range(args.repeats):
            seconds, generation = timed(call, prompts)
            if best is None or seconds < best[0]:
                best = (seconds, generation)
        seconds, generation = best
        tokens = sum(len(ids) for ids in generation.completion_ids)
        results.append((name, tokens, seconds, gap(model, generation)))
        print(f"{name}: {tokens} tokens in {seconds:.2f} s", file=sys.stderr)

    measure("local engine", lambda p: generate(model, tokenizer, p, sampling))

    db = f"sqlite:///{work}/feedback.db"
    subprocess.run(alignloop("db", "upgrade", "--db", db), check=True, capture_output=True)
    key = subprocess.run(alignloop("users", "add", f"bench-{uuid.uuid4().hex[:6]}", "--db", db), check=True, capture_output=True,
                         text=True).stdout.strip()
    port = free_port()
    proc = subprocess.Popen(alignloop("serve", "--model", f"m={folder}", "--db", db, "--port", str(port), "--rate-limit-per-minute", "0",
                                      "--tokens-per-minute", "0", "--max-batch", str(len(prompts))),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(f"http://127.0.0.1:{port}", proc, "/health")
        engine = ServerEngine(RolloutConfig(engine="openai", url=f"http://127.0.0.1:{port}/v1", api_key=key, model="m", weight_sync="none"))
        engine.check()
        measure("openai → alignloop serve", lambda p: engine.generate(model, tokenizer, p, sampling))
    finally:
        stop(proc)

    port = free_port()
    proc = subprocess.Popen([str(args.transformers_cli), "serve", "--continuous-batching", "--device", "cpu", "--dtype", "float32",
                             "--host", "127.0.0.1", "--port", str(port), str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(f"http://127.0.0.1:{port}", proc, "/v1/models")
        engine = ServerEngine(RolloutConfig(engine="openai", url=f"http://127.0.0.1:{port}/v1", api_key=None,
                                            weight_sync="model_path"))
        engine.expect(engine.publish(folder, "m"))
        measure("openai → transformers serve", lambda p: engine.generate(model, tokenizer, p, sampling))
    finally:
        stop(proc)

    cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | sed 's/.*: *//'"], capture_output=True, text=True).stdout.strip()
    print(f"\n{args.size}, {args.prompts} prompts × {args.group} samples, up to {args.max_tokens} new tokens, T=1; {cpu}\n")
    print("| engine | tokens | s | tokens/s | vs local | mean / max abs logprob gap |")
    print("|---|---:|---:|---:|---:|---|")
    local_rate = results[0][1] / results[0][2]
    for name, tokens, seconds, g in results:
        rate = tokens / seconds
        shown = "re-tokenised text: none" if g is None else ("—" if name == "local engine" else f"{g[0]:.1e} / {g[1]:.1e}")
        print(f"| {name} | {tokens} | {seconds:.2f} | {rate:.0f} | {rate / local_rate:.2f}× | {shown} |")


if __name__ == "__main__":
    main()
