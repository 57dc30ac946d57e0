"""Embedded datasets that ship inside PyPI packages, so the offline demo runs on any machine.

``builtin:chitchat-text`` and ``builtin:chitchat-chat`` come from the ``chitchat-dataset``
package (MIT): 7,168 real conversations between two people. The first speaker of a conversation
becomes the ``user``, the second the ``assistant``.

``builtin:chitchat-preference`` turns them into preference pairs for an offline reward model: the
prompt is a user turn, ``chosen`` the reply that really followed it, ``rejected`` a reply from
another, seeded-random conversation (next-utterance selection, as in ConvAI2's ranking task). A
reward model trained on it scores how well a reply answers what was said.

``builtin:chitchat-text-train`` / ``-heldout`` and ``builtin:chitchat-chat-train`` / ``-heldout``
split the conversations: the last ``HELDOUT_CONVERSATIONS`` are held out (the shipped base model
``chitchat-5m`` never trained on them).

``builtin:chitchat-thumbs`` is the same pairs unpaired, as thumbs for KTO: the real reply with
``label: true``, the random one with ``label: false``, alternating so each batch holds both.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable

from alignloop.data.records import Row
from alignloop.errors import DataError

TURNS_PER_CHAT_RECORD = 4  # user, assistant, user, assistant: short enough for a tiny context
# The last conversations are kept out of the shipped base model's training (``-train`` / ``-heldout``
# below): its held-out loss, and the demo's, are measured on people's words no model here has read.
HELDOUT_CONVERSATIONS = 200


def builtin_rows(name: str) -> list[Row]:
    makers = {"chitchat-text": _chitchat_text, "chitchat-chat": _chitchat_chat, "chitchat-preference": _chitchat_preference,
              "chitchat-thumbs": _chitchat_thumbs, "chitchat-prompts": _chitchat_prompts}
    for base in ("chitchat-text", "chitchat-chat"):
        makers[f"{base}-train"] = functools.partial(_conversation_slice, makers[base], held_out=False)
        makers[f"{base}-heldout"] = functools.partial(_conversation_slice, makers[base], held_out=True)
    if name not in makers:
        raise DataError(f"builtin:{name}: unknown built-in dataset; choose one of {', '.join('builtin:' + k for k in makers)}")
    return makers[name]()


@functools.lru_cache(maxsize=1)
def chitchat_conversations() -> tuple[tuple[tuple[str, str], ...], ...]:
    """Every conversation as a tuple of (role, text) turns, roles alternating user/assistant."""
    try:
        import chitchat_dataset
    except ImportError:
        raise DataError("builtin:chitchat-*: needs the `chitchat-dataset` package (pip install chitchat-dataset)") from None
    # Read the package's file ourselves: its Dataset class leaves the file handle open.
    with open(chitchat_dataset._PATH, encoding="utf-8") as f:
        raw = json.load(f)
    conversations = []
    for conv in raw.values():
        turns = []
        first_sender = conv["messages"][0][0]["sender"] if conv["messages"] else None
        for turn in conv["messages"]:
            text = " ".join(m["text"].strip() for m in turn if m["text"].strip())
            if not text:
                continue
            role = "user" if turn[0]["sender"] == first_sender else "assistant"
            if turns and turns[-1][0] == role:  # merge a speaker's consecutive turns
                turns[-1] = (role, turns[-1][1] + " " + text)
            else:
                turns.append((role, text))
        if len(turns) >= 2:
            conversations.append(tuple(turns))
    return tuple(conversations)


def _conversation_slice(make: Callable[[], list[Row]], held_out: bool) -> list[Row]:
    """The rows of all but the last ``HELDOUT_CONVERSATIONS`` conversations, or of those last ones."""
    first_held = len(chitchat_conversations()) - HELDOUT_CONVERSATIONS
    return [row for row in make() if (_conversation_number(row) > first_held) == held_out]


def _conversation_number(row: Row) -> int:
    return int(row.where.split("conversation ")[1].split()[0])


def _chitchat_text() -> list[Row]:
    return [
        Row({"text": "\n".join(text for _, text in conv)}, f"builtin:chitchat-text conversation {i + 1}")
        for i, conv in enumerate(chitchat_conversations())
    ]


def _chitchat_chat() -> list[Row]:
    rows = []
    for i, conv in enumerate(chitchat_conversations()):
        for start in range(0, len(conv) - 1, TURNS_PER_CHAT_RECORD):
            window = conv[start : start + TURNS_PER_CHAT_RECORD]
            if window[0][0] != "user":
                continue
            if window[-1][0] != "assistant":
                window = window[:-1]
            if len(window) >= 2:
                messages = [{"role": role, "content": text} for role, text in window]
                rows.append(Row({"messages": messages}, f"builtin:chitchat-chat conversation {i + 1} turn {start + 1}"))
    return rows


def _chitchat_preference() -> list[Row]:
    conversations = chitchat_conversations()
    replies = [(i, text) for i, conv in enumerate(conversations) for role, text in conv if role == "assistant"]
    rng = random.Random(0)
    rows = []
    for i, conv in enumerate(conversations):
        for k in range(len(conv) - 1):
            (role, prompt), (_, reply) = conv[k], conv[k + 1]
            if role != "user":
                continue
            other, rejected = rng.choice(replies)
            while other == i or rejected == reply:
                other, rejected = rng.choice(replies)
            rows.append(Row({"prompt": prompt, "chosen": reply, "rejected": rejected},
                            f"builtin:chitchat-preference conversation {i + 1} turn {k + 1}"))
            break  # one pair per conversation: 7k pairs, every conversation once
    return rows


def _chitchat_thumbs() -> list[Row]:
    rows = []
    for i, pair in enumerate(_chitchat_preference()):
        good = i % 2 == 0  # alternate, so every stretch of rows has both labels
        completion = pair.fields["chosen"] if good else pair.fields["rejected"]
        rows.append(Row({"prompt": pair.fields["prompt"], "completion": completion, "label": good},
                        pair.where.replace("chitchat-preference", "chitchat-thumbs")))
    return rows


def _chitchat_prompts() -> list[Row]:
    """Each conversation's opening line as a chat prompt (one user message): what people say first."""
    return [Row({"prompt": [{"role": "user", "content": conv[0][1]}]}, f"builtin:chitchat-prompts conversation {i + 1}")
            for i, conv in enumerate(chitchat_conversations()) if conv[0][0] == "user"]
