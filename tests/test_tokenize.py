"""Loss masks: exactly the completion (and its end marker) is trained; prompts, system and user
turns and role headers are not. Overlong records follow data.overlong; raw text packs into blocks."""

from __future__ import annotations

import re

import pytest

from alignloop.data.records import Row
from alignloop.data.tokenize import Example, pack_texts, tokenize_conversation, tokenize_prompt_completion, tokenize_sft_rows
from alignloop.errors import DataError, ModelError

EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

SYSTEM = {"role": "system", "content": "You are a terse helper."}
CONVERSATION = [
    SYSTEM,
    {"role": "user", "content": "Hi there, who are you?"},
    {"role": "assistant", "content": "Hello! I am a small model."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Two plus two is four."},
]


def trained_runs(tokenizer, example: Example) -> list[str]:
    """The decoded text of each maximal run of consecutive trained tokens."""
    runs: list[list[int]] = []
    previous = 0
    for token, trained in zip(example.input_ids, example.loss_mask):
        if trained:
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = trained
    return [tokenizer.decode(run) for run in runs]


def untrained_text(tokenizer, example: Example) -> str:
    return tokenizer.decode([t for t, m in zip(example.input_ids, example.loss_mask) if not m])


@pytest.fixture
def fresh_tok(tiny_model_dir):
    """A private copy of the built-in tokenizer that a test may change."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture
def no_template_tok(no_chat_template_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(no_chat_template_model_dir))
    assert not tokenizer.chat_template  # the fixture really removed it
    return tokenizer


# --- prompt→completion strings -------------------------------------------------------------------
def test_plain_completion_trains_exactly_the_completion_and_eos(builtin_tok):
    example = tokenize_prompt_completion(builtin_tok, "What is two plus two?", " It is four.")

    assert len(example.input_ids) == len(example.loss_mask)
    assert trained_runs(builtin_tok, example) == [" It is four." + EOS]
    assert untrained_text(builtin_tok, example) == "What is two plus two?"
    assert example.input_ids[-1] == builtin_tok.eos_token_id


def test_sft_rows_of_plain_strings_use_the_same_masks(builtin_tok):
    rows = [Row({"prompt": "Say hi.", "completion": " Hi!"}, "x.jsonl:1")]
    examples, stats = tokenize_sft_rows(rows, "prompt_completion", builtin_tok, max_length=64, overlong="error")
    assert examples == [tokenize_prompt_completion(builtin_tok, "Say hi.", " Hi!")]
    assert (stats.truncated, stats.dropped) == (0, 0)


# --- chat ----------------------------------------------------------------------------------------
def test_chat_trains_each_assistant_turn_and_its_end_marker_only(builtin_tok):
    example = tokenize_conversation(builtin_tok, CONVERSATION, train_from=0, where="x.jsonl:1")

    assert builtin_tok.decode(example.input_ids) == builtin_tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert trained_runs(builtin_tok, example) == [
        "Hello! I am a small model." + IM_END + "\n",
        "Two plus two is four." + IM_END + "\n",
    ]
    trained = "".join(trained_runs(builtin_tok, example))
    for text in ("terse helper", "Hi there", "two plus two?", IM_START, "assistant\n"):
        assert text not in trained
    # Every header and every non-assistant turn is in the prompt part.
    prompt_part = untrained_text(builtin_tok, example)
    assert prompt_part.count(IM_START + "assistant\n") == 2
    assert "You are a terse helper." in prompt_part and "What is two plus two?" in prompt_part


def test_sft_rows_of_chat_records_train_every_assistant_turn(builtin_tok):
    rows = [Row({"messages": CONVERSATION}, "x.jsonl:1")]
    (example,), _ = tokenize_sft_rows(rows, "chat", builtin_tok, max_length=256, overlong="error")
    assert trained_runs(builtin_tok, example) == [
        "Hello! I am a small model." + IM_END + "\n",
        "Two plus two is four." + IM_END + "\n",
    ]


def test_conversational_prompt_completion_trains_only_the_completion_turn(builtin_tok):
    prompt, completion = CONVERSATION[:4], CONVERSATION[4:]
    rows = [Row({"prompt": prompt, "completion": completion}, "x.jsonl:1")]

    (example,), _ = tokenize_sft_rows(rows, "prompt_completion", builtin_tok, max_length=256, overlong="error")

    assert trained_runs(builtin_tok, example) == ["Two plus two is four." + IM_END + "\n"]
    # The earlier assistant turn is context, not a target.
    assert "Hello! I am a small model." in untrained_text(builtin_tok, example)
    assert builtin_tok.decode(example.input_ids) == builtin_tok.apply_chat_template(CONVERSATION, tokenize=False)


def test_chat_data_without_a_chat_template_is_a_model_error(no_template_tok):
    rows = [Row({"messages": CONVERSATION}, "x.jsonl:1")]
    with pytest.raises(ModelError, match="no chat template"):
        tokenize_sft_rows(rows, "chat", no_template_tok, max_length=256, overlong="error")


def test_conversational_prompt_completion_without_a_chat_template_is_a_model_error(no_template_tok):
    rows = [Row({"prompt": CONVERSATION[:2], "completion": CONVERSATION[2:3]}, "x.jsonl:1")]
    with pytest.raises(ModelError, match="chat template"):
        tokenize_sft_rows(rows, "prompt_completion", no_template_tok, max_length=256, overlong="error")


def test_plain_strings_need_no_chat_template(no_template_tok):
    rows = [Row({"prompt": "Say hi.", "completion": " Hi!"}, "x.jsonl:1")]
    (example,), _ = tokenize_sft_rows(rows, "prompt_completion", no_template_tok, max_length=64, overlong="error")
    assert trained_runs(no_template_tok, example) == [" Hi!" + EOS]


def test_template_that_rewrites_earlier_turns_is_refused(fresh_tok):
    # The turn count in the first line changes as turns are added, so earlier text is not a prefix.
    fresh_tok.chat_template = "{{ messages | length }}\n" + fresh_tok.chat_template
    with pytest.raises(DataError, match=re.escape("x.jsonl:9: the chat template rewrites earlier turns")):
        tokenize_conversation(fresh_tok, CONVERSATION, train_from=0, where="x.jsonl:9")


# --- overlong records ----------------------------------------------------------------------------
def overlong_rows() -> list[Row]:
    return [
        Row({"prompt": "Short.", "completion": " Yes."}, "x.jsonl:1"),
        Row({"prompt": "A longer question here.", "completion": " " + "very " * 20 + "long answer."}, "x.jsonl:2"),
    ]


def test_overlong_truncate_cuts_ids_and_mask_to_max_length(builtin_tok):
    full, _ = tokenize_sft_rows(overlong_rows(), "prompt_completion", builtin_tok, max_length=1000, overlong="error")

    examples, stats = tokenize_sft_rows(overlong_rows(), "prompt_completion", builtin_tok, max_length=12, overlong="truncate")

    assert (stats.truncated, stats.dropped) == (1, 0)
    assert examples[0] == full[0]
    assert examples[1] == Example(full[1].input_ids[:12], full[1].loss_mask[:12])


def test_overlong_drop_skips_the_record(builtin_tok):
    examples, stats = tokenize_sft_rows(overlong_rows(), "prompt_completion", builtin_tok, max_length=12, overlong="drop")
    assert (stats.truncated, stats.dropped) == (0, 1)
    assert examples == [tokenize_prompt_completion(builtin_tok, "Short.", " Yes.")]


def test_overlong_error_names_the_record_and_the_setting(builtin_tok):
    with pytest.raises(DataError) as e:
        tokenize_sft_rows(overlong_rows(), "prompt_completion", builtin_tok, max_length=12, overlong="error")
    message = str(e.value)
    assert message.startswith("x.jsonl:2: ")
    assert "data.max_length=12" in message
    assert "data.overlong=truncate|drop" in message  # the remedy


def test_truncation_that_leaves_no_completion_token_drops_the_record(builtin_tok):
    rows = [Row({"prompt": "word " * 30, "completion": " answer"}, "x.jsonl:1")]
    examples, stats = tokenize_sft_rows(rows, "prompt_completion", builtin_tok, max_length=8, overlong="truncate")
    assert examples == []
    assert stats.dropped == 1


# --- packing raw text ----------------------------------------------------------------------------
def test_pack_texts_makes_equal_blocks_of_documents_joined_by_eos(builtin_tok):
    texts = ["The first document.", "A second one, a bit longer than the first.", "Third."]
    stream = []
    for text in texts:
        stream += builtin_tok(text)["input_ids"] + [builtin_tok.eos_token_id]

    blocks = pack_texts(texts, builtin_tok, block_size=5)

    assert len(blocks) == len(stream) // 5  # the short tail is dropped
    assert all(len(b.input_ids) == 5 and b.loss_mask == [1] * 5 for b in blocks)
    assert [t for b in blocks for t in b.input_ids] == stream[: 5 * len(blocks)]


def test_pack_texts_shorter_than_one_block_names_the_setting(builtin_tok):
    with pytest.raises(DataError, match=re.escape("fewer than one block of data.max_length=512")):
        pack_texts(["Too short."], builtin_tok, block_size=512)
