#!/usr/bin/env bash
# The CUDA path on a lent GPU machine: SFT in fp32 / bf16 / bf16-autocast and a reward model,
# on a built-in tiny Llama, through the same CLI as on CPU. Prints each run's first and last
# loss, median s/step and tokens/s. Needs torch+transformers+accelerate there; chitchat-dataset
# travels as a wheel in .whl/ (see the device tool's README).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 ALIGNLOOP_CACHE=/tmp/alignloop-cache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; RUNS=/tmp/gpu-runs
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
common="--model.name_or_path=tiny-20m --data.max_samples=4000 --train.save_every=0 --train.eval_every=20 --run.output_dir=$RUNS"
for p in fp32 bf16 bf16-autocast; do
  python3 -m alignloop sft $common --run.name=sft-$p --train.precision=$p --train.max_steps=60 --train.batch_size=32 --data.max_length=256 2>&1 | tail -2
done
python3 -m alignloop reward $common --run.name=reward --data.path=builtin:chitchat-preference --train.epochs=null \
  --train.max_steps=80 --train.batch_size=32 --train.lr=3e-4 --data.max_length=128 --data.eval_fraction=0.1 2>&1 | tail -2
python3 - "$RUNS" <<'PY'
import json, pathlib, statistics, sys
for run in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    m = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x["perf/step_s"] for x in m[1:]]
    evals = [x for x in m if any(k.startswith("eval/") for k in x)]
    print(json.dumps({"run": run.name, "loss_first": round(m[0]["train/loss"], 4), "loss_last": round(m[-1]["train/loss"], 4),
                      "eval_last": {k: round(v, 4) for k, v in evals[-1].items() if k.startswith("eval/")} if evals else None,
                      "median_step_s": round(statistics.median(steps), 4),
                      "tokens_per_s": round(statistics.median(x["perf/tokens_per_s"] for x in m[1:]), 1),
                      "complete": (run / "final" / "trainer_state.json").is_file()}))
PY
