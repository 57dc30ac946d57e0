#!/usr/bin/env python
"""From feedback alone (issue 29): a classifier learns from users' correct/wrong verdicts on its own
predictions, on TweetEval emotion (4 classes), every model trained by ``alignloop classify``.

1. Logging policy: MiniLM-L6 (``minilm-l6``) trained with ``alignloop classify`` on 200 labelled
   train tweets (a seeded random draw).
2. Traffic: the other train tweets, in a seeded order. The logging policy predicts each and shows a
   label chosen by the serving exploration (``epsilon:0.1``, :mod:`alignloop.rollout.exploration`),
   storing its propensity.
3. Simulated users know the true label; they say correct/wrong, flipped with probability 5%
   (``--noise``), and name no label, or (second table) name the right one on 30% of their "wrong"
   verdicts (``--named``; only where the shown label really is wrong: a noisy "wrong" on a right
   prediction names nothing).
4. After the first n verdicts (500 / 1,000 / 2,000 / 3,000), three models start from the logging
   policy and train on those n texts:
   (a) ``classify.objective=bandit``: the feedback objective (the estimator chosen on validation,
       step 5), with the named labels' cross-entropy in the second table;
   (b) the naive rule: supervised cross-entropy on the shown labels users confirmed (plus the
       named labels in the second table);
   (c) full supervision on the same n texts with their true labels (the ceiling).
   Each is scored on the test split: macro-F1; a paired bootstrap CI (test tweets resampled, both
   models' predictions kept together) of (a) − (b); and the share of the gap (c) − logging that
   (a) closes.
5. ``--select``: the estimator is chosen on the validation split at ``--select-n`` verdicts (first
   table's users): each candidate in ``--candidates`` trains once; the best validation macro-F1 is
   used for (a). The measurement is written to ``selection.json``.

Settings: max_length 64 (tweets are short: a few are cut, counted in the logs), batch 32, lr 5e-5
linear, 2 epochs over the feedback, ``train.threads`` from ``--threads``, seed 0 everywhere.

    .venv/bin/python benchmarks/classify_bandit.py --select --out bench-work/classify_bandit
    .venv/bin/python benchmarks/classify_bandit.py --quick   # a small slice, to check it runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench_common import REPO

DATA = REPO.parent / "shared" / "data" / "tweeteval-emotion"


# ---------------------------------------------------------------------------------------------
# Data and simulated users
# ---------------------------------------------------------------------------------------------
def read_split(data: Path, split: str, names: list[str]) -> list[dict]:
    texts = (data / f"{split}_text.txt").read_text(encoding="utf-8").splitlines()
    labels = (data / f"{split}_labels.txt").read_text().split()
    return [{"text": t.strip(), "label": names[int(y)]} for t, y in zip(texts, labels)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def epsilon_greedy_choice(probs: torch.Tensor, epsilon: float, generator: torch.Generator) -> tuple[int, float]:
    """The serving exploration ``epsilon:ε``: the best label with probability 1 − ε + ε/K, each other
    ε/K; returns (index, propensity). The same policy and draw as
    ``alignloop.rollout.exploration.choose``, used when that module is there."""
    try:
        from alignloop.rollout.exploration import Exploration, choose
    except ImportError:  # the serve branch not merged yet: the same rule, written out
        k = probs.numel()
        pi = torch.full((k,), epsilon / k, dtype=torch.float64)
        pi[int(torch.argmax(probs))] += 1.0 - epsilon
        index = int(torch.multinomial(pi, 1, generator=generator))
        return index, float(pi[index])
    return choose(probs, Exploration("epsilon", epsilon), generator)


def simulate_feedback(traffic: list[dict], probs: torch.Tensor, names: list[str], args: argparse.Namespace,
                      named_share: float) -> list[dict]:
    """Bandit records of the logging policy's ε-greedy predictions on ``traffic``, judged by users
    who know the truth, flip their verdict with probability ``args.noise`` and, on a wrong
    prediction they call wrong, name the right label with probability ``named_share``. The
    exploration and verdicts use fixed generators, so both tables see the same shown labels and
    verdicts; only the named labels differ."""
    choice = torch.Generator().manual_seed(args.seed)
    users = np.random.default_rng(args.seed)
    records = []
    for row, p in zip(traffic, probs):
        index, propensity = epsilon_greedy_choice(p, args.epsilon, choice)
        shown = names[index]
        right = shown == row["label"]
        flip, names_it = users.random() < args.noise, users.random() < named_share
        reward = int(right != flip)
        record = {"text": row["text"], "shown": shown, "propensity": propensity, "reward": reward}
        if reward == 0 and not right and names_it:
            record["label"] = row["label"]
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------------
# Training and scoring through the alignloop command
# ---------------------------------------------------------------------------------------------
def alignloop(out: Path, name: str, args: argparse.Namespace, *options: str) -> Path:
    """Run ``alignloop classify`` with the shared settings; return its final model folder."""
    final = out / name / "final"
    if final.is_dir() and (out / name / "report.md").is_file():
        return final  # done in an earlier invocation with the same folder
    cmd = [sys.executable, "-m", "alignloop", "classify", f"--run.output_dir={out}", f"--run.name={name}",
           "--data.max_length=64", "--train.batch_size=32", "--train.lr_schedule=linear", f"--train.threads={args.threads}",
           "--train.seed=0", "--train.save_every=0", "--train.eval_every=0", "--train.resume=never", *options]
    started = time.perf_counter()
    with (out / f"{name}.log").open("w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONPATH": str(REPO / "src")})
    if code != 0:
        raise SystemExit(f"{name}: alignloop classify exited {code}; see {out / f'{name}.log'}")
    print(f"  {name}: {time.perf_counter() - started:.0f} s", flush=True)
    return final


def predict(folder: Path, texts: list[str], names: list[str]) -> tuple[np.ndarray, torch.Tensor]:
    """The model's argmax label ids (in ``names`` order) and probabilities on ``texts``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignloop.models.classifier import label_names, label_probabilities

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    probs = label_probabilities(model, AutoTokenizer.from_pretrained(folder), texts, 64, 64)
    order = [label_names(model).index(n) for n in names]  # the model's ids → the benchmark's
    probs = probs[:, order]
    return probs.argmax(-1).numpy(), probs


def macro_f1(gold: np.ndarray, pred: np.ndarray, k: int) -> float:
    """Macro-averaged F1 over k classes (a class never predicted nor present scores 0, as scikit-learn's zero_division=0)."""
    confusion = np.bincount(gold * k + pred, minlength=k * k).reshape(k, k)
    tp = np.diag(confusion).astype(float)
    denominator = confusion.sum(0) + confusion.sum(1)
    return float(np.mean(np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)))


def paired_bootstrap(gold: np.ndarray, pred_a: np.ndarray | list[np.ndarray], pred_b: np.ndarray | list[np.ndarray], k: int,
                     samples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Macro-F1(a) − macro-F1(b) and its 95% percentile-bootstrap interval, test rows resampled
    with both models' predictions kept together. Lists of predictions (one pair per simulation
    seed) give the mean difference over the seeds, each resample applied to every pair."""
    pairs = list(zip(pred_a, pred_b)) if isinstance(pred_a, list) else [(pred_a, pred_b)]
    rng = np.random.default_rng(seed)
    n = len(gold)

    def delta(idx: np.ndarray) -> float:
        return float(np.mean([macro_f1(gold[idx], a[idx], k) - macro_f1(gold[idx], b[idx], k) for a, b in pairs]))

    deltas = [delta(rng.integers(0, n, n)) for _ in range(samples)]
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    return delta(np.arange(n)), float(lo), float(hi)


# ---------------------------------------------------------------------------------------------
# --backbone probe: the same experiment on frozen MiniLM features with a linear head
# ---------------------------------------------------------------------------------------------
# Fine-tuning 20-odd MiniLMs is hours on a shared 2-core CPU; a linear softmax head on frozen
# MiniLM-L6 sentence features trains in a second, so the whole table, the estimator search and
# several simulation seeds fit in minutes. The losses are alignloop's own (BANDIT_LOSSES,
# feedback_objective); only the model is smaller than `alignloop classify`'s.
def frozen_features(texts: list[str], cache: Path) -> torch.Tensor:
    """(N, 384) mean-pooled last hidden states of MiniLM-L6 (max_length 64), cached in ``cache``."""
    if cache.is_file():
        return torch.load(cache)
    from transformers import AutoModel, AutoTokenizer

    from alignloop.models.reward import builtin_encoder_path

    path = builtin_encoder_path("minilm-l6")
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    features = torch.zeros(len(texts), model.config.hidden_size)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # batches of similar length
    with torch.inference_mode():
        for start in range(0, len(order), 64):
            chunk = order[start:start + 64]
            batch = tokenizer([texts[i] for i in chunk], truncation=True, max_length=64, padding=True, return_tensors="pt")
            mask = batch["attention_mask"][..., None].float()
            features[chunk] = (model(**batch).last_hidden_state * mask).sum(1) / mask.sum(1)
    torch.save(features, cache)
    return features


def fit_head(head: torch.nn.Linear, loss_of, steps: int = 300, lr: float = 1e-2, keep_best=None) -> torch.nn.Linear:
    """Full-batch Adam on ``loss_of(head)``; every method gets the same budget. With ``keep_best``
    (head → validation macro-F1), the head is scored every 20 steps and the best one is returned:
    early stopping on the labelled validation split, the same rule for every method (a fixed step
    count overfits a few hundred rows and underfits three thousand, which would make the
    full-label "ceiling" fall below the others at small n)."""
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-3)
    best, best_state = -1.0, None
    for step in range(1, steps + 1):
        loss = loss_of(head)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if keep_best is not None and step % 20 == 0:
            score = keep_best(head)
            if score > best:
                best, best_state = score, {k: v.clone() for k, v in head.state_dict().items()}
    if best_state is not None:
        head.load_state_dict(best_state)
    return head


def probe_bandit_loss(estimator: str, x: torch.Tensor, records: list[dict], names: list[str], estimates: torch.Tensor,
                      label_weight: float = 1.0):
    """The loss :func:`alignloop.train.classify.bandit_feedback_loss` computes, for a linear head on features ``x``."""
    from alignloop.losses import BANDIT_LOSSES, feedback_objective

    settings = dict(option.removeprefix("--classify.").split("=", 1) for option in CANDIDATES[estimator])
    bandit = BANDIT_LOSSES[settings.pop("bandit_loss")]
    settings = {key: float(value) for key, value in settings.items()}
    shown = torch.tensor([names.index(r["shown"]) for r in records])
    propensity = torch.tensor([r["propensity"] for r in records])
    reward = torch.tensor([float(r["reward"]) for r in records])
    named = torch.tensor(["label" in r for r in records])
    target = torch.tensor([names.index(r.get("label", r["shown"])) for r in records])

    def loss_of(head: torch.nn.Linear) -> torch.Tensor:
        class_logps = torch.log_softmax(head(x), dim=1)
        extra = {"class_logps": class_logps, "shown": shown, "reward_estimates": estimates} if bandit.needs_classes else {}
        bandit_loss, _ = bandit.loss(class_logps.gather(1, shown[:, None]).squeeze(1), propensity, reward, **extra,
                                     **{name: settings[name] for name in bandit.settings})
        return feedback_objective(bandit_loss, class_logps.gather(1, target[:, None]).squeeze(1), named,
                                  label_weight=label_weight)[0]

    return loss_of


def cross_entropy_loss(x: torch.Tensor, labels: torch.Tensor):
    return lambda head: torch.nn.functional.cross_entropy(head(x), labels)


def run_probe(args: argparse.Namespace, out: Path, names: list[str], seed_rows: list[dict], traffic: list[dict],
              val: list[dict], test: list[dict], sizes: list[int], cpu_name: str) -> dict:
    """The whole benchmark on frozen features, for ``args.sim_seeds`` simulation seeds (the first
    gives the table and the bootstrap CIs; the others the spread)."""
    k = len(names)
    feats = {split: frozen_features([r["text"] for r in rows], out / f"features-{split}-{len(rows)}.pt")
             for split, rows in (("seed", seed_rows), ("traffic", traffic), ("val", val), ("test", test))}
    mean, std = feats["traffic"].mean(0), feats["traffic"].std(0)
    feats = {split: (f - mean) / std for split, f in feats.items()}  # standardised: one learning rate fits every feature
    gold = {split: torch.tensor([names.index(r["label"]) for r in rows]) for split, rows in (("seed", seed_rows), ("traffic", traffic), ("val", val), ("test", test))}
    torch.manual_seed(args.seed)
    logging_head = fit_head(torch.nn.Linear(feats["seed"].shape[1], k), cross_entropy_loss(feats["seed"], gold["seed"]))
    with torch.no_grad():
        traffic_probs = torch.softmax(logging_head(feats["traffic"]), 1)

    def predictions(head: torch.nn.Linear, split: str) -> np.ndarray:
        with torch.no_grad():
            return head(feats[split]).argmax(1).numpy()

    gold_np = {split: g.numpy() for split, g in gold.items()}

    def from_logging(loss_of) -> torch.nn.Linear:
        head = torch.nn.Linear(feats["seed"].shape[1], k)
        head.load_state_dict(logging_head.state_dict())
        return fit_head(head, loss_of, keep_best=lambda h: macro_f1(gold_np["val"], predictions(h, "val"), k))
    results: dict = {"backbone": "probe", "cpu": cpu_name, "settings": vars(args) | {"data": str(args.data), "out": str(out)},
                     "names": names, "logging": {split: macro_f1(gold_np[split], predictions(logging_head, split), k) for split in ("val", "test")}}
    results["logging"]["test_macro_f1"] = results["logging"]["test"]
    sim_seeds = range(args.seed, args.seed + args.sim_seeds)
    feedback = {(table, s): simulate_feedback(traffic, traffic_probs, names, argparse.Namespace(**vars(args) | {"seed": s}),
                                              0.0 if table == "0" else args.named)
                for table in args.tables.split(",") for s in sim_seeds}

    # the estimator: best mean validation macro-F1 over the simulation seeds, at --select-n verdicts, no named labels
    measured = {}
    for name in args.candidates.split(","):
        scores = [macro_f1(gold_np["val"], predictions(from_logging(probe_bandit_loss(
            name, feats["traffic"][:args.select_n], feedback[("0", s)][:args.select_n], names, traffic_probs[:args.select_n])), "val"), k)
            for s in sim_seeds]
        measured[name] = {"mean": float(np.mean(scores)), "per_seed": scores}
        print(f"  select {name}: val macro-F1 {measured[name]['mean']:.3f} ({', '.join(f'{x:.3f}' for x in scores)})", flush=True)
    naive_val = []
    for s in sim_seeds:
        rows = feedback[("0", s)][:args.select_n]
        keep = [i for i, r in enumerate(rows) if r["reward"] == 1]
        head = from_logging(cross_entropy_loss(feats["traffic"][keep], torch.tensor([names.index(rows[i]["shown"]) for i in keep])))
        naive_val.append(macro_f1(gold_np["val"], predictions(head, "val"), k))
    estimator = max(measured, key=lambda name: measured[name]["mean"])
    results["selection"] = {"n": args.select_n, "val_macro_f1": measured, "naive_val_macro_f1": float(np.mean(naive_val)),
                            "chosen": estimator}
    results["estimator"] = estimator
    print(f"  (naive rule on validation: {np.mean(naive_val):.3f}); chosen: {estimator}", flush=True)
    # β, the named labels' weight (second table), measured the same way with the chosen estimator
    label_weight = 1.0
    if "named" in args.tables.split(","):
        betas = {}
        for beta in (1.0, 0.3, 0.0):
            betas[beta] = float(np.mean([macro_f1(gold_np["val"], predictions(from_logging(probe_bandit_loss(
                estimator, feats["traffic"][:args.select_n], feedback[("named", s)][:args.select_n], names,
                traffic_probs[:args.select_n], beta)), "val"), k) for s in sim_seeds]))
            print(f"  named labels at β={beta}: val macro-F1 {betas[beta]:.3f}", flush=True)
        label_weight = max(betas, key=betas.get)
        results["selection"]["label_weight_val_macro_f1"] = {str(b): v for b, v in betas.items()}
        results["selection"]["label_weight"] = label_weight

    for table in args.tables.split(","):
        results[f"table-{table}"] = rows_out = []
        for n in sizes:
            spread = {"bandit": [], "naive": [], "full": [], "wins": 0}
            seed_predictions: dict[str, list[np.ndarray]] = {"bandit": [], "naive": []}
            for s in sim_seeds:
                batch = feedback[(table, s)][:n]
                x = feats["traffic"][:n]
                a = from_logging(probe_bandit_loss(estimator, x, batch, names, traffic_probs[:n], label_weight))
                keep = [i for i, r in enumerate(batch) if r["reward"] == 1 or "label" in r]
                labels = torch.tensor([names.index(batch[i]["shown"] if batch[i]["reward"] == 1 else batch[i]["label"]) for i in keep])
                b = from_logging(cross_entropy_loss(x[keep], labels))
                c = from_logging(cross_entropy_loss(x, gold["traffic"][:n]))
                pred = {m: predictions(h, "test") for m, h in (("bandit", a), ("naive", b), ("full", c))}
                f1 = {m: macro_f1(gold_np["test"], p, k) for m, p in pred.items()}
                for m in ("bandit", "naive", "full"):
                    spread[m].append(f1[m])
                spread["wins"] += int(f1["bandit"] > f1["naive"])
                seed_predictions["bandit"].append(pred["bandit"])
                seed_predictions["naive"].append(pred["naive"])
                if s == args.seed:
                    delta, lo, hi = paired_bootstrap(gold_np["test"], pred["bandit"], pred["naive"], k)
                    first = dict(f1, naive_rows=len(keep))
            mean_delta, mean_lo, mean_hi = paired_bootstrap(gold_np["test"], seed_predictions["bandit"], seed_predictions["naive"], k)
            gap = first["full"] - results["logging"]["test"]
            mean_gap = np.mean(spread["full"]) - results["logging"]["test"]
            row = {"n": n, **first, "bandit_minus_naive": delta, "ci95": [lo, hi],
                   "gap_closed_by_bandit": (first["bandit"] - results["logging"]["test"]) / gap if gap > 0 else None,
                   "gap_closed_by_naive": (first["naive"] - results["logging"]["test"]) / gap if gap > 0 else None,
                   "seeds": {m: [float(np.mean(v)), float(np.std(v))] for m, v in spread.items() if m != "wins"},
                   "bandit_beats_naive_in_seeds": f"{spread['wins']}/{len(sim_seeds)}",
                   "seeds_bandit_minus_naive": mean_delta, "seeds_ci95": [mean_lo, mean_hi],
                   "mean_gap_closed_by_bandit": float((np.mean(spread["bandit"]) - results["logging"]["test"]) / mean_gap) if mean_gap > 0 else None}
            rows_out.append(row)
            print(f"table {table} n={n}: bandit {first['bandit']:.3f} naive {first['naive']:.3f} full {first['full']:.3f} "
                  f"a−b {delta:+.3f} [{lo:+.3f}, {hi:+.3f}]; over {len(sim_seeds)} seeds bandit {np.mean(spread['bandit']):.3f} "
                  f"naive {np.mean(spread['naive']):.3f} full {np.mean(spread['full']):.3f}, bandit wins {spread['wins']}; "
                  f"mean a−b {mean_delta:+.3f} [{mean_lo:+.3f}, {mean_hi:+.3f}]", flush=True)
    if args.liars:
        results["liars"] = liar_rows(args, feats, traffic_probs, traffic, names, estimator, from_logging, predictions,
                                     predictions(logging_head, "test"), gold_np["test"], max(sizes))
    return results


def liar_rows(args: argparse.Namespace, feats: dict, traffic_probs: torch.Tensor, traffic: list[dict], names: list[str],
              estimator: str, from_logging, predictions, logging_test: np.ndarray, gold_test: np.ndarray, n: int) -> list[dict]:
    """The loop's gate on candidates trained from ``n`` verdicts of an honest population (noise
    ``--noise``), one that inverts every verdict and one that answers at random: the candidate's
    test macro-F1 against the logging policy's with a paired bootstrap CI, and what the default
    classifier gate (``macro_f1_delta_lower > 0``) decides."""
    k, rows = len(names), []
    for population, noise in (("honest", args.noise), ("inverted (liars)", 1.0), ("random (liars)", 0.5)):
        batch = simulate_feedback(traffic, traffic_probs, names, argparse.Namespace(**vars(args) | {"noise": noise}), 0.0)[:n]
        head = from_logging(probe_bandit_loss(estimator, feats["traffic"][:n], batch, names, traffic_probs[:n]))
        pred = predictions(head, "test")
        delta, lo, hi = paired_bootstrap(gold_test, pred, logging_test, k)
        row = {"population": population, "n": n, "test_macro_f1": macro_f1(gold_test, pred, k), "delta_vs_logging": delta,
               "ci95": [lo, hi], "gate": "promote" if lo > 0 else "refuse"}
        rows.append(row)
        print(f"liars {population}: test macro-F1 {row['test_macro_f1']:.3f}, vs logging {delta:+.3f} [{lo:+.3f}, {hi:+.3f}] → "
              f"{row['gate']}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------
CANDIDATES = {  # estimator settings measured by --select (classify.* keys)
    "banditnet-0.5": ["--classify.bandit_loss=banditnet", "--classify.translation=0.5"],
    "banditnet-0.25": ["--classify.bandit_loss=banditnet", "--classify.translation=0.25"],
    "banditnet-0": ["--classify.bandit_loss=banditnet", "--classify.translation=0"],
    "clipped_ips-0.5": ["--classify.bandit_loss=clipped_ips", "--classify.translation=0.5", "--classify.clip=10"],
    "doubly_robust": ["--classify.bandit_loss=doubly_robust", "--classify.clip=10"],
    # for mini-batch fine-tuning: an explored row's weight (up to K/ε = 40) capped at 2, a smaller push on "wrong"
    "clipped_ips-0.25-clip2": ["--classify.bandit_loss=clipped_ips", "--classify.translation=0.25", "--classify.clip=2"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("BENCH_WORK", REPO / "bench-work")) / "classify_bandit")
    ap.add_argument("--sizes", default="500,1000,2000,3000", help="verdict counts")
    ap.add_argument("--seed-labels", type=int, default=200, help="labelled tweets the logging policy trains on")
    ap.add_argument("--epsilon", type=float, default=0.1)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--named", type=float, default=0.3, help="share of 'wrong' verdicts naming the right label (second table)")
    ap.add_argument("--epochs", type=float, default=2.0, help="epochs over the feedback")
    ap.add_argument("--logging-epochs", type=float, default=10.0, help="epochs of the logging policy over its 200 tweets")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--select", action="store_true", help="choose the estimator on validation first")
    ap.add_argument("--select-n", type=int, default=1000)
    ap.add_argument("--candidates", default=",".join(list(CANDIDATES)[:5]))
    ap.add_argument("--estimator", default="banditnet-0.5", help="used for (a) without --select")
    ap.add_argument("--tables", default="0,named", help="0 (no named labels) and/or named")
    ap.add_argument("--backbone", choices=("finetune", "probe"), default="finetune",
                    help="finetune: every model by `alignloop classify`; probe: frozen MiniLM features and a linear head (minutes)")
    ap.add_argument("--sim-seeds", type=int, default=5, help="probe: simulation seeds (exploration and users)")
    ap.add_argument("--liars", action="store_true", help="probe: also the gate's decision on candidates trained by lying populations")
    ap.add_argument("--quick", action="store_true", help="a small slice: sizes 100,200, 1 epoch, 300 test tweets")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes, args.epochs, args.logging_epochs, args.select_n = [100, 200], 1.0, 3.0, 100
    out = (args.out / "quick" if args.quick else args.out).resolve()  # never mixes with a full run's models
    out.mkdir(parents=True, exist_ok=True)
    names = [line.split("\t")[1].strip() for line in (args.data / "mapping.txt").read_text().splitlines() if line.strip()]
    k = len(names)
    train, val, test = (read_split(args.data, s, names) for s in ("train", "val", "test"))
    if args.quick:
        test = test[:300]
    order = np.random.default_rng(args.seed).permutation(len(train))
    seed_rows = [train[i] for i in order[:args.seed_labels]]
    traffic = [train[i] for i in order[args.seed_labels:]][:max(sizes + [args.select_n])]
    files = {name: write_jsonl(out / f"{name}.jsonl", rows) for name, rows in (("seed", seed_rows), ("val", val))}
    gold_test = np.array([names.index(r["label"]) for r in test])
    gold_val = np.array([names.index(r["label"]) for r in val])
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), platform.processor())
    print(f"classify_bandit: {len(seed_rows)} labelled, {len(traffic)} traffic, {len(test)} test tweets; CPU {cpu_name}", flush=True)
    if args.backbone == "probe":
        results = run_probe(args, out, names, seed_rows, traffic, val, test, sizes, cpu_name)
        (out / "results-probe.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "results-probe.md").write_text(markdown(results) + "\n")
        print(markdown(results))
        return

    logging_policy = alignloop(out, "logging", args, "--model.name_or_path=minilm-l6", f"--data.path={files['seed']}",
                               f"--data.eval_path={files['val']}", f"--train.epochs={args.logging_epochs}", "--train.lr=1e-4",
                               "--train.warmup_steps=6")
    _, traffic_probs = predict(logging_policy, [r["text"] for r in traffic], names)
    logging_test = predict(logging_policy, [r["text"] for r in test], names)[0]
    results: dict = {"cpu": cpu_name, "settings": vars(args) | {"data": str(args.data), "out": str(out)}, "names": names,
                     "logging": {"test_macro_f1": macro_f1(gold_test, logging_test, k),
                                 "val_macro_f1": macro_f1(gold_val, predict(logging_policy, [r["text"] for r in val], names)[0], k)}}
    print(f"logging policy: test macro-F1 {results['logging']['test_macro_f1']:.3f}", flush=True)
    common = [f"--train.epochs={args.epochs}", "--train.lr=5e-5", "--train.warmup_steps=10",
              f"--model.name_or_path={logging_policy}"]

    feedback = {table: simulate_feedback(traffic, traffic_probs, names, args, 0.0 if table == "0" else args.named)
                for table in args.tables.split(",")}
    first = next(iter(feedback.values()))
    results["feedback"] = {"confirmed": float(np.mean([r["reward"] for r in first])),
                           "explored": float(np.mean([r["propensity"] < 0.5 for r in first]))}

    estimator = args.estimator
    if args.select:
        rows = feedback[next(iter(feedback))][:args.select_n]
        path = write_jsonl(out / f"select-{args.select_n}.jsonl", rows)
        measured = {}
        for name in args.candidates.split(","):
            final = alignloop(out, f"select-{name}", args, *common, "--classify.objective=bandit", f"--data.path={path}",
                              *CANDIDATES[name])
            measured[name] = macro_f1(gold_val, predict(final, [r["text"] for r in val], names)[0], k)
            print(f"  select {name}: val macro-F1 {measured[name]:.3f}", flush=True)
        estimator = max(measured, key=measured.get)
        results["selection"] = {"n": args.select_n, "val_macro_f1": measured, "chosen": estimator}
        (out / "selection.json").write_text(json.dumps(results["selection"], indent=2) + "\n")
    results["estimator"] = estimator

    ceiling: dict[int, np.ndarray] = {}
    for table, records in feedback.items():
        results[f"table-{table}"] = rows_out = []
        for n in sizes:
            batch = records[:n]
            tag = f"{table}-{n}"
            bandit_path = write_jsonl(out / f"feedback-{tag}.jsonl", batch)
            naive_rows = [{"text": r["text"], "label": r["shown"] if r["reward"] == 1 else r["label"]}
                          for r in batch if r["reward"] == 1 or "label" in r]
            naive_path = write_jsonl(out / f"naive-{tag}.jsonl", naive_rows)
            a = alignloop(out, f"bandit-{tag}", args, *common, "--classify.objective=bandit", f"--data.path={bandit_path}",
                          *CANDIDATES[estimator])
            b = alignloop(out, f"naive-{tag}", args, *common, f"--data.path={naive_path}", "--data.eval_fraction=0")
            if n not in ceiling:  # the truth does not depend on what users said
                full_path = write_jsonl(out / f"full-{n}.jsonl", [{"text": t["text"], "label": t["label"]} for t in traffic[:n]])
                c = alignloop(out, f"full-{n}", args, *common, f"--data.path={full_path}", "--data.eval_fraction=0")
                ceiling[n] = predict(c, [r["text"] for r in test], names)[0]
            pred_a, pred_b = (predict(m, [r["text"] for r in test], names)[0] for m in (a, b))
            f1 = {m: macro_f1(gold_test, p, k) for m, p in (("bandit", pred_a), ("naive", pred_b), ("full", ceiling[n]))}
            delta, lo, hi = paired_bootstrap(gold_test, pred_a, pred_b, k)
            gap = f1["full"] - results["logging"]["test_macro_f1"]
            row = {"n": n, **f1, "bandit_minus_naive": delta, "ci95": [lo, hi], "naive_rows": len(naive_rows),
                   "gap_closed_by_bandit": (f1["bandit"] - results["logging"]["test_macro_f1"]) / gap if gap > 0 else None,
                   "gap_closed_by_naive": (f1["naive"] - results["logging"]["test_macro_f1"]) / gap if gap > 0 else None}
            rows_out.append(row)
            print(f"table {table} n={n}: bandit {f1['bandit']:.3f} naive {f1['naive']:.3f} full {f1['full']:.3f} "
                  f"a−b {delta:+.3f} [{lo:+.3f}, {hi:+.3f}] gap closed {row['gap_closed_by_bandit']}", flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results) + "\n")
    print(markdown(results))


def markdown(results: dict) -> str:
    logging_f1 = results["logging"]["test_macro_f1"]
    lines = [f"Backbone: {results.get('backbone', 'finetune')}. Logging policy (200 labelled tweets): test macro-F1 "
             f"{logging_f1:.3f}. Estimator for (a): `{results['estimator']}`. CPU: {results['cpu']}.", ""]
    for key, title in (("table-0", "no named labels"), ("table-named", f"{results['settings']['named']:.0%} of 'wrong' verdicts name the right label")):
        if key not in results:
            continue
        lines += [f"**{title}**", "", "| verdicts | (a) bandit | (b) confirmed only | (c) full labels | (a) − (b) [95% CI] | gap closed by (a) | by (b) |",
                  "| ---: | ---: | ---: | ---: | :---: | ---: | ---: |"]
        for r in results[key]:
            pct = lambda x: f"{100 * x:.0f}%" if x is not None else "—"  # noqa: E731
            lines.append(f"| {r['n']:,} | {r['bandit']:.3f} | {r['naive']:.3f} | {r['full']:.3f} | {r['bandit_minus_naive']:+.3f} "
                         f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] | {pct(r['gap_closed_by_bandit'])} | {pct(r['gap_closed_by_naive'])} |")
        lines.append("")
        if "seeds" in results[key][0]:
            seeds = results["settings"]["sim_seeds"]
            lines += [f"Over {seeds} simulation seeds (exploration draws and users; mean ± sd):", "",
                      "| verdicts | (a) bandit | (b) confirmed only | (c) full labels | mean (a) − (b) [95% CI] | (a) > (b) in | gap closed by (a) |",
                      "| ---: | ---: | ---: | ---: | :---: | :---: | ---: |"]
            for r in results[key]:
                m = r["seeds"]
                lines.append(f"| {r['n']:,} | {m['bandit'][0]:.3f} ± {m['bandit'][1]:.3f} | {m['naive'][0]:.3f} ± {m['naive'][1]:.3f} | "
                             f"{m['full'][0]:.3f} ± {m['full'][1]:.3f} | {r['seeds_bandit_minus_naive']:+.3f} [{r['seeds_ci95'][0]:+.3f}, "
                             f"{r['seeds_ci95'][1]:+.3f}] | {r['bandit_beats_naive_in_seeds']} | {pct(r['mean_gap_closed_by_bandit'])} |")
            lines.append("")
    if "liars" in results:
        lines += ["**The gate against lying populations** (candidates from the first simulation seed's verdicts)", "",
                  "| population | verdicts | candidate test macro-F1 | vs logging policy [95% CI] | gate (`macro_f1_delta_lower>0`) |",
                  "| --- | ---: | ---: | :---: | --- |"]
        for r in results["liars"]:
            lines.append(f"| {r['population']} | {r['n']:,} | {r['test_macro_f1']:.3f} | {r['delta_vs_logging']:+.3f} "
                         f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] | {r['gate']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
