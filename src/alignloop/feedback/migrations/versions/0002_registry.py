"""The model registry: parent, run folder, datasets, evaluation and deployment of each model
version, and the feedback rows that trained it (``model_feedback``).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UTC_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:  # SQLite adds a foreign key by copying the table
        batch.add_column(sa.Column("parent_version", sa.String(64), nullable=True))
        batch.add_column(sa.Column("run_dir", sa.Text, nullable=True))
        batch.add_column(sa.Column("datasets", sa.JSON, nullable=True))
        batch.add_column(sa.Column("evaluation", sa.JSON, nullable=True))
        batch.add_column(sa.Column("deployed", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("promoted_at", UTC_TIME, nullable=True))
        batch.create_foreign_key("fk_models_parent_version_models", "models", ["parent_version"], ["version"])
    op.create_table(
        "model_feedback",
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("feedback_id", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("user_name", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("model_version", "feedback_id", name="pk_model_feedback"),
        sa.ForeignKeyConstraint(["model_version"], ["models.version"], name="fk_model_feedback_model_version_models"),
    )
    op.create_index("ix_model_feedback_user_name", "model_feedback", ["user_name"])


def downgrade() -> None:
    op.drop_index("ix_model_feedback_user_name", table_name="model_feedback")
    op.drop_table("model_feedback")
    with op.batch_alter_table("models") as batch:
        batch.drop_constraint("fk_models_parent_version_models", type_="foreignkey")
        for column in ("promoted_at", "deployed", "evaluation", "datasets", "run_dir", "parent_version"):
            batch.drop_column(column)
