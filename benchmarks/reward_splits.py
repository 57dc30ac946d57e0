#!/usr/bin/env python
"""Held-out splits of real human preferences for the reward-model benchmark, and the length
baselines a reward model has to beat on them.

* UKPConvArg1Strict, cross-topic: of the 16 debates, 4 whole debates (both stances) are held out:
  sort the debate names, shuffle them with ``random.Random(0)``, take the first 4. Argument
  quality must then transfer to unseen topics. That split is fold 0 of a 4-fold cross-topic
  split: fold k holds out debates 4k…4k+3 of the same shuffled list, so over the four folds every
  debate (every pair) is held out once (``ukp-fold{k}-{train,test}.jsonl``; fold 0's files are
  ``ukp-train.jsonl`` / ``ukp-test.jsonl``).
* HH-RLHF harmless-base test file: a fixed 80/20 split of its pairs (row indices shuffled with
  ``random.Random(0)``, the first 20% are the test set); rows keep their file order. The same
  rule applied to the training 80% gives a development split (``hh-dev-{train,test}.jsonl``):
  settings are chosen on it, so the test set is read once per setting that is reported.

Baselines on each test set (ties count half):

* UKP, "longer argument wins": chosen has more characters than rejected.
* hh, "shorter answer wins": the chosen final reply has fewer characters than the rejected one.

Writes, into ``<bench-work>/reward-data/``: ``ukp-train.jsonl``, ``ukp-test.jsonl``,
``hh-train.jsonl``, ``hh-test.jsonl`` (TRL preference records, written by
:func:`alignloop.data.convert.write_jsonl`) and ``baselines.json``.

    .venv/bin/python benchmarks/reward_splits.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import asdict
from pathlib import Path

from alignloop.data.convert import convert_hh_rlhf, read_ukp_convarg, write_jsonl
from alignloop.data.load import read_rows
from alignloop.data.records import Row

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
SEED = 0
HELD_OUT_DEBATES = 4
HH_TEST_FRACTION = 0.2


def split_ukp(rows: list[Row], fold: int = 0) -> tuple[list[Row], list[Row], list[str]]:
    """Train rows, test rows and the held-out debates (whole debates, both stances) of ``fold``."""
    debates = sorted({row.fields["group"] for row in rows})
    random.Random(SEED).shuffle(debates)
    held_out = debates[fold * HELD_OUT_DEBATES : (fold + 1) * HELD_OUT_DEBATES]
    train = [row for row in rows if row.fields["group"] not in held_out]
    test = [row for row in rows if row.fields["group"] in held_out]
    return train, test, held_out


def split_hh(rows: list[Row]) -> tuple[list[Row], list[Row]]:
    """A fixed 80/20 split; both parts keep the file's order."""
    order = list(range(len(rows)))
    random.Random(SEED).shuffle(order)
    test_indices = set(order[: int(len(rows) * HH_TEST_FRACTION)])
    train = [row for i, row in enumerate(rows) if i not in test_indices]
    test = [row for i, row in enumerate(rows) if i in test_indices]
    return train, test


def length_rule_accuracy(pairs: list[tuple[int, int]], longer_wins: bool) -> float:
    """Accuracy of "the longer (or shorter) side is chosen" over (chosen, rejected) lengths; ties half."""
    score = 0.0
    for chosen, rejected in pairs:
        if chosen == rejected:
            score += 0.5
        elif (chosen > rejected) == longer_wins:
            score += 1.0
    return score / len(pairs)


def main() -> None:
    default_work = Path(os.environ.get("BENCH_WORK", REPO / "bench-work"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-work", type=Path, default=default_work, help="default: $BENCH_WORK or ./bench-work")
    ap.add_argument("--ukp", type=Path, default=SHARED_DATA / "ukpconvarg1" / "UKPConvArg1Strict-CSV")
    ap.add_argument("--hh", type=Path, default=SHARED_DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz")
    args = ap.parse_args()
    out = args.bench_work / "reward-data"

    ukp_rows = read_ukp_convarg(args.ukp)
    ukp_train, ukp_test, held_out = split_ukp(ukp_rows)
    hh_rows, hh_counts = convert_hh_rlhf(read_rows(str(args.hh)))
    hh_train, hh_test = split_hh(hh_rows)
    hh_dev_train, hh_dev_test = split_hh(hh_train)
    for name, rows in [("ukp-train", ukp_train), ("ukp-test", ukp_test), ("hh-train", hh_train), ("hh-test", hh_test),
                       ("hh-dev-train", hh_dev_train), ("hh-dev-test", hh_dev_test)]:
        write_jsonl((r.fields for r in rows), out / f"{name}.jsonl")

    # The final reply only: a diverged hh pair (5 of 2,312) has several messages per side.
    ukp_lengths = [(len(r.fields["chosen"]), len(r.fields["rejected"])) for r in ukp_test]
    hh_lengths = [(len(r.fields["chosen"][-1]["content"]), len(r.fields["rejected"][-1]["content"])) for r in hh_test]
    result = {
        "ukp": {
            "source": str(args.ukp),
            "held_out_debates": held_out,
            "train_pairs": len(ukp_train),
            "test_pairs": len(ukp_test),
            "baseline": "longer argument wins (characters; ties half)",
            "baseline_test_accuracy": round(length_rule_accuracy(ukp_lengths, longer_wins=True), 4),
        },
        "hh": {
            "source": str(args.hh),
            "conversion": asdict(hh_counts),
            "train_pairs": len(hh_train),
            "test_pairs": len(hh_test),
            "dev_split": {"train_pairs": len(hh_dev_train), "test_pairs": len(hh_dev_test)},
            "baseline": "shorter final reply wins (characters; ties half)",
            "baseline_test_accuracy": round(length_rule_accuracy(hh_lengths, longer_wins=False), 4),
        },
        "seed": SEED,
    }
    folds = []
    for fold in range(1, len({row.fields["group"] for row in ukp_rows}) // HELD_OUT_DEBATES):
        train, test, debates = split_ukp(ukp_rows, fold)
        write_jsonl((r.fields for r in train), out / f"ukp-fold{fold}-train.jsonl")
        write_jsonl((r.fields for r in test), out / f"ukp-fold{fold}-test.jsonl")
        lengths = [(len(r.fields["chosen"]), len(r.fields["rejected"])) for r in test]
        folds.append({"fold": fold, "held_out_debates": debates, "train_pairs": len(train), "test_pairs": len(test),
                      "baseline_test_accuracy": round(length_rule_accuracy(lengths, longer_wins=True), 4)})
    result["ukp"]["other_folds"] = folds
    (out / "baselines.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"UKP cross-topic: held out {', '.join(held_out)}")
    print(f"  train {len(ukp_train)} pairs, test {len(ukp_test)} pairs")
    print(f"  longer argument wins: {result['ukp']['baseline_test_accuracy']:.3f} on test")
    for f in folds:
        print(f"  fold {f['fold']}: held out {', '.join(f['held_out_debates'])}; {f['train_pairs']} / {f['test_pairs']} pairs,"
              f" longer wins {f['baseline_test_accuracy']:.3f}")
    print(f"hh-rlhf harmless-base: {hh_counts.kept} of {hh_counts.pairs} pairs ({hh_counts.diverged} diverged early)")
    print(f"  train {len(hh_train)} pairs, test {len(hh_test)} pairs")
    print(f"  shorter answer wins: {result['hh']['baseline_test_accuracy']:.3f} on test")
    print(f"  development split of the training pairs: {len(hh_dev_train)} / {len(hh_dev_test)} (hh-dev-{{train,test}})")
    print(f"wrote {out}/{{ukp,hh}}-{{train,test}}.jsonl and baselines.json")


if __name__ == "__main__":
    main()
