#!/usr/bin/env bash
# How the shipped base model chitchat-5m (src/alignloop/models/weights/chitchat-5m) was made, with
# alignloop's own stages: continued pretraining of the built-in tiny-5m Llama on the chitchat
# conversations' text, then SFT on the same conversations as chat records, both holding out the
# last 200 conversations (builtin:chitchat-*-heldout), then the weights stored in bf16.
# About 45 min (pretrain) + 6 min (SFT) on a 2-core Intel Xeon with AMX (bf16), one to two threads; minutes on a GPU.
set -euo pipefail
OUT=${OUT:-runs/chitchat-5m}
export HF_HUB_OFFLINE=1

alignloop pretrain --run.output_dir="$OUT" --run.name=pretrain --model.name_or_path=tiny-5m \
    --data.path=builtin:chitchat-text-train --data.eval_path=builtin:chitchat-text-heldout --data.max_length=128 \
    --train.batch_size=32 --train.max_steps=2500 --train.warmup_steps=100 --train.lr=1e-3 --train.weight_decay=0.1 \
    --train.eval_every=500 --train.eval_batches=null --train.save_every=250 --train.precision=bf16 --train.seed=0

alignloop sft --run.output_dir="$OUT" --run.name=sft --model.name_or_path="$OUT/pretrain/final" \
    --data.path=builtin:chitchat-chat-train --data.eval_path=builtin:chitchat-chat-heldout --data.max_length=128 \
    --train.batch_size=32 --train.max_steps=500 --train.warmup_steps=20 --train.lr=5e-4 \
    --train.eval_every=100 --train.eval_batches=null --train.save_every=100 --train.precision=bf16 --train.seed=0

# bf16 weights (10 MB instead of 20); the tokenizer and generation config as trained.
python3 - "$OUT/sft/final" "$OUT/shipped" <<'EOF'
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
source, target = sys.argv[1:]
AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(target)
AutoTokenizer.from_pretrained(source).save_pretrained(target)
EOF
