"""Turning records into token ids and loss masks.

* Prompt→completion (plain strings): ``prompt`` is tokenised with the tokenizer's special tokens
  (BOS where it adds one), ``completion`` without, then EOS is appended; only the completion and
  its EOS carry loss.
* Conversational records (``messages``, or ``prompt``/``completion`` as message lists) are rendered
  with the tokenizer's chat template. A turn's trained span is found by rendering the
  conversation up to that turn with ``add_generation_prompt=True`` and again including the turn:
  the difference is the assistant's content and its end-of-turn marker. Tokens whose first
  character falls inside a trained span carry loss; role headers, system text and user turns do
  not. ``messages`` records train every assistant turn; ``prompt``/``completion`` records train
  the completion turns only.
* Raw text for pretraining is tokenised, joined with EOS and cut into equal blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from alignloop.data.records import Row
from alignloop.errors import DataError, ModelError


@dataclass
class Example:
    """One training sequence. ``loss_mask[i]`` is 1 where token ``input_ids[i]`` is predicted with loss."""

    input_ids: list[int]
    loss_mask: list[int]


@dataclass
class TokenizeStats:
    truncated: int = 0
    dropped: int = 0


def tokenize_sft_rows(
    rows: list[Row],
    kind: str,
    tokenizer: Any,
    max_length: int,
    overlong: Literal["truncate", "drop", "error"],
) -> tuple[list[Example], TokenizeStats]:
    """Tokenise prompt→completion or chat rows for SFT, applying the ``overlong`` policy."""
    stats = TokenizeStats()
    examples = []
    for row in rows:
        if kind == "chat":
            example = tokenize_conversation(tokenizer, row.fields["messages"], train_from=0, where=row.where)
        elif isinstance(row.fields["prompt"], list):
            prompt, completion = row.fields["prompt"], row.fields["completion"]
            example = tokenize_conversation(tokenizer, prompt + completion, train_from=len(prompt), where=row.where)
        else:
            example = tokenize_prompt_completion(tokenizer, row.fields["prompt"], row.fields["completion"])
        if len(example.input_ids) > max_length:
            if overlong == "error":
                raise DataError(
                    f"{row.where}: {len(example.input_ids)} tokens, longer than data.max_length={max_length}; "
                    "raise data.max_length or set data.overlong=truncate|drop"
                )
            if overlong == "drop":
                stats.dropped += 1
                continue
            stats.truncated += 1
            example = Example(example.input_ids[:max_length], example.loss_mask[:max_length])
        if sum(example.loss_mask) == 0:
            stats.dropped += 1  # truncation cut off every completion token
            continue
        examples.append(example)
    return examples, stats


def tokenize_prompt_completion(tokenizer: Any, prompt: str, completion: str) -> Example:
    """Plain strings: ``[BOS] prompt completion EOS`` with loss on ``completion EOS``."""
    eos = require_eos(tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos]
    return Example(prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids))


def tokenize_conversation(tokenizer: Any, messages: list[dict], train_from: int, where: str) -> Example:
    """Render ``messages`` with the chat template; loss on assistant turns at index ≥ ``train_from``."""
    text, spans = render_with_trained_spans(tokenizer, messages, train_from, where)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(start <= first < end for start, end in spans)) for first, _ in encoding["offset_mapping"]]
    return Example(list(encoding["input_ids"]), mask)


def render_with_trained_spans(
    tokenizer: Any, messages: list[dict], train_from: int, where: str
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns to train on."""
    require_chat_template(tokenizer)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < train_from:
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(
                f"{where}: the chat template rewrites earlier turns when later ones are added, so the "
                "assistant turns cannot be located; train on prompt/completion records instead"
            )
        spans.append((len(before), len(through)))
    return text, spans


def pack_texts(texts: list[str], tokenizer: Any, block_size: int) -> list[Example]:
    """Tokenise documents, join them with EOS and cut the stream into ``block_size`` blocks.

    The tail shorter than a block is dropped; every token of a block carries loss.
    """
    eos = require_eos(tokenizer)
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise DataError(f"the text has {len(stream)} tokens, fewer than one block of data.max_length={block_size}")
    return [Example(stream[i * block_size : (i + 1) * block_size], [1] * block_size) for i in range(n_blocks)]


def require_eos(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ModelError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token; completions need one to end")
    return tokenizer.eos_token_id


def require_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template, which chat data needs; "
            "set model.tokenizer to one that has, or use prompt/completion strings"
        )
