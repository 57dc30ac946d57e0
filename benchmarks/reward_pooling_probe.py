"""Probe: does a mean-pooled reward head beat BERT's CLS pooler on MiniLM-L6?

all-MiniLM-L6-v2 was trained by sentence-transformers with *mean* pooling, while a stock
``BertForSequenceClassification`` (what ``alignloop reward`` trains and saves, so that plain
transformers loads it) reads the CLS token through BERT's pooler. This script fine-tunes the
same backbone both ways on a split written by ``reward_splits.py`` — plain PyTorch and
transformers, outside alignloop, so that only the head differs — and prints held-out accuracy.

    .venv/bin/python benchmarks/reward_pooling_probe.py mean hh 512 &
    .venv/bin/python benchmarks/reward_pooling_probe.py cls hh 512 &

Arguments: pooling (mean|cls), split (hh|ukp), max_length, epochs (1), lr (5e-5). One thread
each (two run side by side on two cores); 16 pairs a step, AdamW, linear decay, dropout off,
one segment "Human: …\\nAssistant: …" truncated from the left.
"""

import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from alignloop.models.reward import builtin_encoder_path

torch.set_num_threads(1)
torch.manual_seed(0)
pool = sys.argv[1]
split = sys.argv[2] if len(sys.argv) > 2 else "hh"
maxlen = int(sys.argv[3]) if len(sys.argv) > 3 else 512
epochs = int(sys.argv[4]) if len(sys.argv) > 4 else 1
lr = float(sys.argv[5]) if len(sys.argv) > 5 else 5e-5
data = Path(os.environ.get("BENCH_WORK", Path(__file__).resolve().parents[1] / "bench-work")) / "reward-data"

path = builtin_encoder_path("minilm-l6")
tok = AutoTokenizer.from_pretrained(path)
tok.truncation_side = "left"
body = AutoModel.from_pretrained(path, add_pooling_layer=(pool == "cls"))
body.eval()  # dropout off
head = torch.nn.Linear(384, 1)


def render(prompt, resp):
    if isinstance(prompt, list):
        prompt = "\n".join(("Human: " if m["role"] == "user" else "Assistant: ") + m["content"] for m in prompt)
        return prompt + "\nAssistant: " + resp
    return prompt + "\n" + resp


def load(f):
    rows = [json.loads(line) for line in open(f)]
    last = lambda r: r if isinstance(r, str) else r[-1]["content"]  # noqa: E731
    return [(render(r["prompt"], last(r["chosen"])), render(r["prompt"], last(r["rejected"]))) for r in rows]


train, test = load(data / f"{split}-train.jsonl"), load(data / f"{split}-test.jsonl")


def score(texts):
    enc = tok(texts, truncation=True, max_length=maxlen, padding=True, return_tensors="pt")
    out = body(**enc)
    if pool == "cls":
        h = out.pooler_output
    else:
        m = enc["attention_mask"].unsqueeze(-1).float()
        h = (out.last_hidden_state * m).sum(1) / m.sum(1)
    return head(h).squeeze(-1)


params = list(body.parameters()) + list(head.parameters())
opt = torch.optim.AdamW(params, lr=lr)
steps = epochs * ((len(train) + 15) // 16)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
t, step = time.time(), 0
for ep in range(epochs):
    random.Random(ep).shuffle(train)
    for i in range(0, len(train), 16):
        b = train[i:i + 16]
        r = score([c for c, _ in b] + [r for _, r in b])
        loss = -F.logsigmoid(r[:len(b)] - r[len(b):]).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % 20 == 0:
            print(step, steps, round(loss.item(), 4), round(time.time() - t), flush=True)
correct = 0
with torch.no_grad():
    for i in range(0, len(test), 32):
        b = test[i:i + 32]
        r = score([c for c, _ in b] + [r for _, r in b])
        correct += (r[:len(b)] > r[len(b):]).sum().item()
print(pool, split, maxlen, epochs, "acc", correct / len(test), "time", round(time.time() - t))
