"""Feedback as training records: the record kinds of ARCHITECTURE.md in TRL's field names.

| export  | from                      | record                                   | trains     |
| ------- | ------------------------- | ---------------------------------------- | ---------- |
| pairs   | pairwise a/b, corrections | prompt, chosen, rejected                 | reward, DPO |
| kto     | thumbs                    | prompt, completion, label                | KTO, reward |
| sft     | corrections               | prompt, completion                       | SFT        |
| ratings | ratings                   | prompt, completion, rating, user         | reward     |

The prompt is the chat messages (then completion, chosen and rejected are one assistant
message, TRL's conversational format) or the prompt string. Every record also carries its
provenance: ``feedback_id``, ``user``, ``source`` (the feedback kind), ``completion_id`` and
``model_version`` of the completion the vote was given on (for pairwise: completion A, with B as
``other_completion_id`` / ``other_model_version``; for a correction: the original answer).

What cannot become a record is skipped and counted by reason: ``tie`` and ``both_bad`` verdicts
(no preference), ``different_prompts`` (two answers to different rendered prompts are not a
pair), ``identical_answers`` (chosen equals rejected: it teaches nothing).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import sqlalchemy as sa

from alignloop.feedback import schema
from alignloop.feedback.entities import Invalid

EXPORT_KINDS = {"pairs": ("pairwise", "correction"), "kto": ("thumbs",), "sft": ("correction",), "ratings": ("rating",)}


def export_records(conn: sa.Connection, kind: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """All records of export ``kind``, oldest vote first, and the skipped votes per reason."""
    if kind not in EXPORT_KINDS:
        raise Invalid(f"field 'kind' must be one of {', '.join(EXPORT_KINDS)}, got {kind!r}", field="kind")
    feedback, users = schema.Feedback.__table__, schema.User.__table__
    a, b = schema.Completion.__table__.alias("a"), schema.Completion.__table__.alias("b")
    query = (
        sa.select(feedback.c.id, feedback.c.kind, feedback.c.up, feedback.c.rating, feedback.c.verdict,
                  feedback.c.correction, users.c.name.label("user"),
                  *_completion_columns(a, "a"), *_completion_columns(b, "b"))
        .join(users, users.c.id == feedback.c.user_id)
        .join(a, a.c.id == feedback.c.completion_id)
        .outerjoin(b, b.c.id == feedback.c.other_completion_id)
        .where(feedback.c.kind.in_(EXPORT_KINDS[kind]))
        .order_by(feedback.c.id)
    )
    records: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    for row in conn.execute(query):
        record, reason = _record(kind, row._asdict())
        if record is None:
            skipped[reason] += 1
        else:
            records.append(record)
    return records, dict(skipped)


def vote_rows(conn: sa.Connection) -> list[dict[str, Any]]:
    """Every live vote with its user, when it last changed, and both answers' facts (``a_*``,
    ``b_*``: id, endpoint, prompt, rendered prompt, text, model version), oldest first: the raw
    material of the closed loop's dataset rules (:mod:`alignloop.loop.datasets`)."""
    feedback, users = schema.Feedback.__table__, schema.User.__table__
    a, b = schema.Completion.__table__.alias("a"), schema.Completion.__table__.alias("b")
    query = (
        sa.select(feedback.c.id, feedback.c.kind, feedback.c.up, feedback.c.rating, feedback.c.verdict,
                  feedback.c.correction, feedback.c.updated_at, users.c.name.label("user"),
                  *_completion_columns(a, "a"), *_completion_columns(b, "b"))
        .join(users, users.c.id == feedback.c.user_id)
        .join(a, a.c.id == feedback.c.completion_id)
        .outerjoin(b, b.c.id == feedback.c.other_completion_id)
        .order_by(feedback.c.id)
    )
    return [row._asdict() for row in conn.execute(query)]


def _completion_columns(table: sa.FromClause, prefix: str) -> list[sa.ColumnElement]:
    names = ("id", "endpoint", "prompt_messages", "prompt_text", "rendered_prompt", "completion_text", "model_version")
    return [table.c[name].label(f"{prefix}_{name}") for name in names]


def _record(kind: str, row: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The training record for one vote, or None and the reason it was skipped."""
    chat = row["a_endpoint"] == "chat"
    prompt = row["a_prompt_messages"] if chat else row["a_prompt_text"]

    def answer(text: str) -> Any:
        return [{"role": "assistant", "content": text}] if chat else text

    provenance = {"feedback_id": row["id"], "user": row["user"], "source": row["kind"],
                  "completion_id": row["a_id"], "model_version": row["a_model_version"]}
    if kind == "kto":
        return {"prompt": prompt, "completion": answer(row["a_completion_text"]), "label": row["up"], **provenance}, ""
    if kind == "ratings":
        return {"prompt": prompt, "completion": answer(row["a_completion_text"]), "rating": row["rating"],
                **provenance}, ""
    if kind == "sft":
        return {"prompt": prompt, "completion": answer(row["correction"]), **provenance}, ""
    # pairs
    if row["kind"] == "correction":
        chosen, rejected = row["correction"], row["a_completion_text"]
        other = {"other_completion_id": None, "other_model_version": None}
    else:
        if row["verdict"] in ("tie", "both_bad"):
            return None, row["verdict"]
        if row["a_rendered_prompt"] != row["b_rendered_prompt"]:
            return None, "different_prompts"
        chosen, rejected = row["a_completion_text"], row["b_completion_text"]
        if row["verdict"] == "b":
            chosen, rejected = rejected, chosen
        other = {"other_completion_id": row["b_id"], "other_model_version": row["b_model_version"]}
    if chosen.strip() == rejected.strip():
        return None, "identical_answers"
    return {"prompt": prompt, "chosen": answer(chosen), "rejected": answer(rejected), **provenance, **other}, ""
