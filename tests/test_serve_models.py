"""What ``serve --model`` does with a folder: a chat model (causal LM) is served with a version
that is the same at every start; a classifier folder goes to /v1/classify as ``--classifier``
would send it; a reward model or a bare encoder is refused with a line naming the folder, before
the store is opened; a missing folder is named as missing, not blamed on the Hub."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from alignloop.cli import main
from alignloop.config import ServeConfig
from alignloop.errors import ModelError
from alignloop.serve.engine import ServedModel
from alignloop.serve.run import build_app

LABELS = ["negative", "neutral", "positive"]


def save_tiny(folder: Path, tokenizer: Any, head: str, num_labels: int = 1) -> Path:
    """A random tiny model saved with ``tokenizer``: a built-in tiny-1m Llama body under ``head``
    ("sequence", "token" or "none"), or for "bert-sequence" a 1-layer BERT, whose untied
    masked-LM head a causal-LM loader would draw anew at every load."""
    from transformers import (BertConfig, BertForSequenceClassification, LlamaForSequenceClassification,
                              LlamaForTokenClassification, LlamaModel)

    from alignloop.models.builtin import builtin_config

    if head == "bert-sequence":
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=128)
    else:
        config = builtin_config("tiny-1m", tokenizer)
    config.num_labels = num_labels
    if num_labels > 1:
        config.id2label = dict(enumerate(LABELS[:num_labels]))
        config.label2id = {name: i for i, name in config.id2label.items()}
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = {"sequence": LlamaForSequenceClassification, "token": LlamaForTokenClassification, "none": LlamaModel,
             "bert-sequence": BertForSequenceClassification}[head](config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, builtin_tok: Any) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-models")
    return {"sentiment": save_tiny(root / "sentiment", builtin_tok, "bert-sequence", num_labels=3),
            "tagger": save_tiny(root / "tagger", builtin_tok, "token", num_labels=3),
            "reward": save_tiny(root / "reward", builtin_tok, "sequence", num_labels=1),
            "encoder": save_tiny(root / "encoder", builtin_tok, "none")}


def built(models: list[str], db: str) -> Any:
    app = build_app(ServeConfig(models=models, db=db))
    app.state.serving.store.close()
    return app.state.serving


def test_a_classifier_folder_given_as_model_is_served_as_a_classifier(folders: dict, migrated_sqlite_url: str,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="alignloop"):
        serving = built([f"mood={folders['sentiment']}", str(folders["tagger"])], migrated_sqlite_url)
    assert serving.models == {}
    assert sorted(serving.classifiers) == ["mood", "tagger"]
    assert serving.classifiers["mood"].labels == LABELS and serving.classifiers["mood"].task == "classification"
    assert serving.classifiers["tagger"].task == "ner"
    routed = [r.getMessage() for r in caplog.records if "serving it on /v1/classify" in r.getMessage()]
    assert len(routed) == 2 and "mood" in routed[0]


def test_the_same_folder_is_one_version_at_every_start(folders: dict, tiny_model_dir: Path, migrated_sqlite_url: str) -> None:
    """Loaded as a causal LM, a classifier got a new random head, so a new version, at each start."""
    first = built([f"mood={folders['sentiment']}", f"chat={tiny_model_dir}"], migrated_sqlite_url)
    second = built([f"mood={folders['sentiment']}", f"chat={tiny_model_dir}"], migrated_sqlite_url)
    assert first.classifiers["mood"].version == second.classifiers["mood"].version
    assert first.models["chat"].version == second.models["chat"].version
    from alignloop.feedback.store import FeedbackStore

    with FeedbackStore(migrated_sqlite_url) as store:
        versions = [m["version"] for m in store.models()]
    assert sorted(versions) == sorted({first.classifiers["mood"].version, first.models["chat"].version})


@pytest.mark.parametrize("kind, message", [("reward", "a reward model (one score per text), not a chat model"),
                                           ("encoder", "neither a chat model (a causal LM) nor a classifier: its config names ['LlamaModel']")])
def test_a_folder_that_is_neither_is_refused_naming_it(kind: str, message: str, folders: dict, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    db = tmp_path / "feedback.db"
    assert main(["serve", "--model", str(folders[kind]), "--db", f"sqlite:///{db}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"alignloop: error: model {kind!r} at {str(folders[kind])!r}: {message}" in err
    assert not db.exists()  # refused before the store was opened


def test_served_model_refuses_a_classifier_itself(folders: dict) -> None:
    """/admin/deploy builds a ServedModel from a path: it refuses, too, rather than load a random head."""
    with pytest.raises(ModelError, match="a classifier .labels., not a chat model: serve it with --classifier"):
        ServedModel("chat", str(folders["sentiment"]))


def test_a_missing_folder_is_named_as_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert main(["serve", "--model", "runs/nope", "--db", f"sqlite:///{tmp_path}/feedback.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"alignloop: error: model 'nope' at 'runs/nope': no such folder ({tmp_path}/runs/nope does not exist); "
                   "give a model folder, a Hub id, the shipped chitchat-5m or a built-in size (tiny-1m, tiny-5m, tiny-20m)")
