"""The base model that ships inside the package, ``chitchat-5m``: it loads by name wherever a model
name goes, and it has learned language: on conversations it never trained on (the last
``HELDOUT_CONVERSATIONS`` of the chitchat corpus) its loss is far below an untrained model's, and
its greedy replies are made of words people write."""

from __future__ import annotations

import re

import pytest
import torch

from alignloop.config import ModelConfig
from alignloop.data.builtin import builtin_rows
from alignloop.demo import SHIPPED_BASE, heldout_chat_loss
from alignloop.models.builtin import SHIPPED, builtin_model, builtin_tokenizer
from alignloop.models.load import load_causal_lm, load_tokenizer, model_family

# Measured on the shipped weights: 4.155 on these rows (3.900 on all 1,690: README, "Two
# commands"); an untrained tiny-5m scores ~ln(4096) = 8.3. The bound leaves room for float
# differences between CPUs, not for a model that did not learn.
MAX_HELDOUT_LOSS = 4.4
HELDOUT_ROWS = 300  # of 1,690 held-out chat records: enough for a stable mean, quick on 2 cores


def test_the_shipped_base_loads_by_name_as_a_chat_model() -> None:
    assert (SHIPPED[SHIPPED_BASE] / "model.safetensors").is_file()
    cfg = ModelConfig(name_or_path=SHIPPED_BASE)
    tokenizer = load_tokenizer(cfg)
    model = load_causal_lm(cfg, tokenizer, seed=0)
    assert model_family(SHIPPED_BASE, "model")[0] == "causal_lm"
    assert model.num_parameters() < 6_000_000
    assert tokenizer.chat_template  # ChatML, as the built-in tokenizer


def test_the_shipped_base_has_learned_the_held_out_conversations(tmp_path) -> None:
    rows = builtin_rows("chitchat-chat-heldout")[:HELDOUT_ROWS]
    trained = heldout_chat_loss(SHIPPED[SHIPPED_BASE], rows)
    torch.manual_seed(0)
    untrained_dir = tmp_path / "untrained"
    tokenizer = builtin_tokenizer()
    builtin_model("tiny-5m", tokenizer).save_pretrained(untrained_dir)
    tokenizer.save_pretrained(untrained_dir)
    untrained = heldout_chat_loss(untrained_dir, rows)
    assert trained < MAX_HELDOUT_LOSS
    assert untrained - trained > 3.0


def test_the_shipped_base_replies_in_words_people_write() -> None:
    from alignloop.demo import _replies

    words_people_write = {w for row in builtin_rows("chitchat-text-train") for w in re.findall(r"[a-z']+", row.fields["text"].lower())}
    openings = [row.fields["messages"][:1] for row in builtin_rows("chitchat-chat-heldout")[:60:20]]
    replies = _replies(SHIPPED[SHIPPED_BASE], openings)
    words = [w for reply in replies for w in re.findall(r"[a-z']+", reply.lower())]
    assert len(words) >= 15, replies
    known = sum(w in words_people_write for w in words) / len(words)
    assert known >= 0.9, (known, replies)


@pytest.mark.parametrize("name", ["chitchat-5m"])
def test_a_missing_shipped_model_is_named(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """An install without the weights (a packaging mistake) says which folder is missing."""
    from alignloop.errors import ModelError
    from alignloop.models import builtin

    monkeypatch.setitem(builtin.SHIPPED, name, tmp_path / "gone")
    with pytest.raises(ModelError, match="gone"):
        load_tokenizer(ModelConfig(name_or_path=name))
