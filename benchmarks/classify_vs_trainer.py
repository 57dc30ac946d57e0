#!/usr/bin/env python
"""`alignloop classify` against Hugging Face's ``Trainer`` (the standard fine-tuning recipe) on the
same backbone, data, epochs, batch size, learning rate and max length: test macro F1 (TweetEval
emotion) or entity micro F1 (WikiANN English, WNUT-17), wall time and peak RSS.

    .venv/bin/python benchmarks/classify_vs_trainer.py                                  # emotion + wikiann, full
    .venv/bin/python benchmarks/classify_vs_trainer.py --tasks emotion,wnut --epochs 3
    .venv/bin/python benchmarks/classify_vs_trainer.py --max-train 64 --max-test 32 --epochs 1   # a smoke run

Each side is a child process (peak RSS: its own ``ru_maxrss``, from ``os.wait4``), started the same
way with the same threads:

* alignloop: ``python -m alignloop classify`` with the test split as ``data.eval_path``, so the run's
  own closing report (``metrics.json``) is the test score; it also evaluates on up to 16 batches of
  it after the last step (``train.eval_batches``), which counts in its wall time.
* Trainer: ``AutoModelForSequenceClassification`` + ``DataCollatorWithPadding``, or
  ``AutoModelForTokenClassification`` + ``DataCollatorForTokenClassification`` with the usual
  ``tokenize_and_align_labels`` (first sub-token carries the tag, the rest -100); no evaluation or
  saving during training, then ``trainer.predict`` on the test split. Its defaults stay: random
  batches (no ``group_by_length``), the last partial batch kept (alignloop drops it, so it runs up to
  one step an epoch fewer).

Both read the same records (written once, as JSONL, by this script with alignloop's readers) and
the same sorted label list; scores come from scikit-learn (macro F1) and seqeval (entity micro F1,
``mode=None``), each word read at its first sub-token and words past max_length predicted O on both sides.

Outputs in ``--out-dir`` (default ``$BENCH_WORK/results`` or ``./bench-work/results``):
``classify_vs_trainer.md`` (the table, also printed), ``classify_vs_trainer.json``, the children's
logs and run folders under ``classify_vs_trainer-work/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, run_child  # noqa: E402

sys.path.insert(0, str(REPO / "src"))  # this checkout's alignloop, as the children get through PYTHONPATH

DATA = REPO.parent / "shared" / "data"
TASKS = {  # name: (kind, train, test, headline metric)
    "emotion": ("classification", f"tweeteval:{DATA}/tweeteval-emotion/train", f"tweeteval:{DATA}/tweeteval-emotion/test", "macro_f1"),
    "wikiann": ("ner", f"conll:{DATA}/wikiann-en/train", f"conll:{DATA}/wikiann-en/test", "micro_f1"),
    "wnut": ("ner", f"conll:{DATA}/wnut17/wnut17train.conll", f"conll:{DATA}/wnut17/emerging.test.annotated", "micro_f1"),
}


def prepare(task: str, folder: Path, max_train: int | None, max_test: int | None) -> dict:
    """The task's train and test records as JSONL, and its label list, in ``folder``."""
    from alignloop.data.load import load_records
    from alignloop.train.classify import SUPERVISED_KINDS, label_names_of

    kind, train_path, test_path, _ = TASKS[task]
    folder.mkdir(parents=True, exist_ok=True)
    train, train_kind = load_records(train_path, SUPERVISED_KINDS, max_train)
    test, _ = load_records(test_path, SUPERVISED_KINDS, max_test)
    for name, rows in (("train", train), ("test", test)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r.fields, ensure_ascii=False) + "\n" for r in rows))
    labels = label_names_of(train, train_kind)
    (folder / "labels.json").write_text(json.dumps(labels))
    return {"kind": kind, "train_rows": len(train), "test_rows": len(test), "labels": labels}


def alignloop_command(args: argparse.Namespace, folder: Path) -> list[str]:
    return [sys.executable, "-m", "alignloop", "classify", f"--model.name_or_path={args.model}",
            f"--data.path={folder / 'train.jsonl'}", f"--data.eval_path={folder / 'test.jsonl'}",
            f"--data.max_length={args.max_length}", f"--run.output_dir={folder}", "--run.name=alignloop",
            "--train.resume=never", f"--train.epochs={args.epochs}", f"--train.batch_size={args.batch_size}",
            f"--train.lr={args.lr}", f"--train.warmup_steps={args.warmup_steps}", "--train.lr_schedule=linear",
            f"--train.weight_decay={args.weight_decay}", f"--train.seed={args.seed}", "--train.eval_every=0",
            "--train.save_every=0", f"--train.threads={args.threads}"]


def trainer_child(folder: Path, args: argparse.Namespace) -> None:
    """The Trainer side, in its own process: train, predict the test split, print RESULT_JSON."""
    import numpy as np
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer,
                              DataCollatorForTokenClassification, DataCollatorWithPadding, Trainer, TrainingArguments)

    from alignloop.models.reward import builtin_encoder_path

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model_path = builtin_encoder_path(args.model) if args.model == "minilm-l6" else args.model
    labels = json.loads((folder / "labels.json").read_text())
    label2id = {name: i for i, name in enumerate(labels)}
    train = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
    ner = "tokens" in train[0]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    auto = AutoModelForTokenClassification if ner else AutoModelForSequenceClassification
    torch.manual_seed(args.seed)
    model = auto.from_pretrained(model_path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id)

    def encode(rows: list[dict]) -> list[dict]:
        if not ner:
            enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=args.max_length)
            return [{"input_ids": ids, "attention_mask": mask, "labels": label2id[str(r["label"])]}
                    for ids, mask, r in zip(enc["input_ids"], enc["attention_mask"], rows)]
        enc = tokenizer([r["tokens"] for r in rows], is_split_into_words=True, truncation=True, max_length=args.max_length)
        out = []
        for i, r in enumerate(rows):  # tokenize_and_align_labels, as in transformers' token-classification example
            previous, tags = None, []
            for word in enc.word_ids(i):
                tags.append(-100 if word is None or word == previous else label2id[r["tags"][word]])
                previous = word
            out.append({"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": tags})
        return out

    collator = (DataCollatorForTokenClassification if ner else DataCollatorWithPadding)(tokenizer)
    training = TrainingArguments(
        output_dir=str(folder / "trainer"), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=args.warmup_steps,
        lr_scheduler_type="linear", weight_decay=args.weight_decay, seed=args.seed, save_strategy="no",
        eval_strategy="no", logging_steps=50, report_to=[], use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=training, train_dataset=encode(train), data_collator=collator)
    trained = trainer.train()
    logits = trainer.predict(encode(test)).predictions
    if not ner:
        from sklearn.metrics import accuracy_score, f1_score

        gold = [str(r["label"]) for r in test]
        predicted = [labels[i] for i in np.argmax(logits, -1)]
        scores = {"macro_f1": f1_score(gold, predicted, labels=labels, average="macro", zero_division=0),
                  "accuracy": accuracy_score(gold, predicted)}
    else:
        from seqeval.metrics import f1_score

        enc = tokenizer([r["tokens"] for r in test], is_split_into_words=True, truncation=True, max_length=args.max_length)
        outside = labels.index("O")
        predicted = []
        for i, r in enumerate(test):
            first = {}
            for position, word in enumerate(enc.word_ids(i)):
                if word is not None and word not in first:
                    first[word] = position
            predicted.append([labels[int(np.argmax(logits[i][first[w]]))] if w in first else labels[outside]
                              for w in range(len(r["tokens"]))])
        gold = [r["tags"] for r in test]
        scores = {"micro_f1": f1_score(gold, predicted, average="micro", mode=None, zero_division=0),
                  "macro_f1": f1_score(gold, predicted, average="macro", mode=None, zero_division=0)}
    result = {"scores": scores, "steps": trained.global_step, "train_s": trained.metrics["train_runtime"],
              "in_process_s": time.perf_counter() - started}
    print("RESULT_JSON " + json.dumps(result), flush=True)


def alignloop_result(folder: Path) -> dict:
    run = folder / "alignloop"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"scores": json.loads((run / "metrics.json").read_text()), "steps": metrics[-1]["step"],
            "train_s": sum(m.get("perf/step_s", 0.0) for m in metrics),
            "padding": sum(m["train/padding"] for m in metrics) / len(metrics)}


def trainer_result(log: Path) -> dict:
    line = next((x for x in log.read_text().splitlines() if x.startswith("RESULT_JSON ")), None)
    if line is None:
        raise SystemExit(f"the Trainer child printed no result; see {log}")
    return json.loads(line[len("RESULT_JSON "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="emotion,wikiann", help=f"comma-separated, of {', '.join(TASKS)}")
    ap.add_argument("--model", default="minilm-l6", help="backbone: minilm-l6 (the PyPI-shipped MiniLM-L6) or an HF id/folder")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-train", type=int, default=None, help="first N training records (a smoke run)")
    ap.add_argument("--max-test", type=int, default=None, help="first N test records")
    ap.add_argument("--out-dir", type=Path, default=Path(os.environ.get("BENCH_WORK", REPO / "bench-work")) / "results")
    ap.add_argument("--trainer-child", type=Path, default=None, help=argparse.SUPPRESS)  # internal: run the Trainer side
    args = ap.parse_args()
    if args.trainer_child is not None:
        trainer_child(args.trainer_child, args)
        return

    work = args.out_dir / "classify_vs_trainer-work"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    results = []
    for task in args.tasks.split(","):
        folder = work / task
        info = prepare(task, folder, args.max_train, args.max_test)
        print(f"{task}: {info['train_rows']} train / {info['test_rows']} test rows, {len(info['labels'])} labels", flush=True)
        code, wall, rss = run_child(alignloop_command(args, folder), folder / "alignloop.log", env, REPO)
        if code != 0:
            raise SystemExit(f"alignloop classify failed ({code}); see {folder / 'alignloop.log'}")
        ours = {**alignloop_result(folder), "wall_s": wall, "peak_rss_mb": rss}
        passed = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                  if k in ("model", "epochs", "batch_size", "lr", "warmup_steps", "weight_decay", "max_length", "seed", "threads")]
        code, wall, rss = run_child([sys.executable, __file__, f"--trainer-child={folder}", *passed],
                                    folder / "trainer.log", env, REPO)
        if code != 0:
            raise SystemExit(f"the Trainer child failed ({code}); see {folder / 'trainer.log'}")
        theirs = {**trainer_result(folder / "trainer.log"), "wall_s": wall, "peak_rss_mb": rss}
        results.append({"task": task, **info, "alignloop": ours, "trainer": theirs})

    metric = {t: TASKS[t][3] for t in TASKS}
    lines = [f"# alignloop classify vs HF Trainer ({args.model}, {args.epochs:g} epochs × batch {args.batch_size}, "
             f"lr {args.lr:g}, max_length {args.max_length}, {args.threads} threads; {platform.processor() or platform.machine()})", "",
             "| task | rows train / test | metric | alignloop | Trainer | wall s alignloop / Trainer | train s alignloop / Trainer "
             "| steps | peak RSS MB alignloop / Trainer | alignloop padding |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        a, t, m = r["alignloop"], r["trainer"], metric[r["task"]]
        lines.append(f"| {r['task']} | {r['train_rows']:,} / {r['test_rows']:,} | {m} | {a['scores'][m]:.3f} | "
                     f"{t['scores'][m]:.3f} | {a['wall_s']:.0f} / {t['wall_s']:.0f} | {a['train_s']:.0f} / {t['train_s']:.0f} | "
                     f"{a['steps']} / {t['steps']} | {a['peak_rss_mb']:,.0f} / {t['peak_rss_mb']:,.0f} | {100 * a['padding']:.1f}% |")
    table = "\n".join(lines) + "\n"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "classify_vs_trainer.md").write_text(table)
    (args.out_dir / "classify_vs_trainer.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                                       "results": results}, indent=2))
    print(table)


if __name__ == "__main__":
    main()
