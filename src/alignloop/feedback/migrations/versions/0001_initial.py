"""The first schema: users, models, conversations and messages, completions, feedback and
idempotency keys.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UTC_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=True),
        sa.Column("admin", sa.Boolean, nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("name", name="uq_users_name"),
        sa.UniqueConstraint("key_hash", name="uq_users_key_hash"),
    )
    op.create_table(
        "models",
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("version", name="pk_models"),
    )
    op.create_table(
        "conversations",
        sa.Column("id", sa.String(100), nullable=False),
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("updated_at", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_conversations"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_conversations_user_id_users"),
    )
    op.create_index("ix_conversations_user_id", "conversations", ["user_id"])
    op.create_table(
        "messages",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("conversation_id", sa.String(100), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_messages"),
        sa.UniqueConstraint("conversation_id", "position", name="uq_messages_conversation_id_position"),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversations.id"],
                                name="fk_messages_conversation_id_conversations"),
    )
    op.create_table(
        "completions",
        sa.Column("id", sa.String(100), nullable=False),
        sa.Column("request_id", sa.String(100), nullable=False),
        sa.Column("choice_index", sa.Integer, nullable=False),
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("endpoint", sa.String(16), nullable=False),
        sa.Column("prompt_messages", sa.JSON, nullable=True),
        sa.Column("prompt_text", sa.Text, nullable=True),
        sa.Column("rendered_prompt", sa.Text, nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_text", sa.Text, nullable=False),
        sa.Column("completion_token_ids", sa.JSON, nullable=False),
        sa.Column("finish_reason", sa.String(16), nullable=False),
        sa.Column("sampling", sa.JSON, nullable=False),
        sa.Column("latency_ms", sa.Double, nullable=False),
        sa.Column("ttft_ms", sa.Double, nullable=True),
        sa.Column("conversation_id", sa.String(100), nullable=True),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_completions"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_completions_user_id_users"),
        sa.ForeignKeyConstraint(["model_version"], ["models.version"], name="fk_completions_model_version_models"),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversations.id"],
                                name="fk_completions_conversation_id_conversations"),
    )
    op.create_index("ix_completions_request_id", "completions", ["request_id"])
    op.create_index("ix_completions_user_id", "completions", ["user_id"])
    op.create_index("ix_completions_model_version", "completions", ["model_version"])
    op.create_index("ix_completions_conversation_id", "completions", ["conversation_id"])
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("target", sa.String(201), nullable=False),
        sa.Column("completion_id", sa.String(100), nullable=False),
        sa.Column("other_completion_id", sa.String(100), nullable=True),
        sa.Column("up", sa.Boolean, nullable=True),
        sa.Column("rating", sa.Integer, nullable=True),
        sa.Column("verdict", sa.String(16), nullable=True),
        sa.Column("left", sa.String(1), nullable=True),
        sa.Column("correction", sa.Text, nullable=True),
        sa.Column("comment", sa.Text, nullable=True),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("updated_at", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_feedback"),
        sa.UniqueConstraint("user_id", "kind", "target", name="uq_feedback_user_id_kind_target"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_feedback_user_id_users"),
        sa.ForeignKeyConstraint(["completion_id"], ["completions.id"], name="fk_feedback_completion_id_completions"),
        sa.ForeignKeyConstraint(["other_completion_id"], ["completions.id"],
                                name="fk_feedback_other_completion_id_completions"),
    )
    op.create_index("ix_feedback_user_id_updated_at", "feedback", ["user_id", "updated_at"])
    op.create_index("ix_feedback_kind", "feedback", ["kind"])
    op.create_index("ix_feedback_completion_id", "feedback", ["completion_id"])
    op.create_index("ix_feedback_other_completion_id", "feedback", ["other_completion_id"])
    op.create_table(
        "idempotency_keys",
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("response", sa.JSON, nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("user_id", "key", name="pk_idempotency_keys"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_idempotency_keys_user_id_users"),
    )


def downgrade() -> None:
    for table in ("idempotency_keys", "feedback", "completions", "messages", "conversations", "models", "users"):
        op.drop_table(table)
