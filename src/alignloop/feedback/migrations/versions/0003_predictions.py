"""Served classifiers: the ``predictions`` table (what was shown, with its propensity) and
feedback on a prediction (``feedback.prediction_id``, ``correct``, ``label``, ``entities``;
``completion_id`` becomes nullable, as a prediction's feedback has no completion).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UTC_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("id", sa.String(100), nullable=False),
        sa.Column("request_id", sa.String(100), nullable=False),
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("task", sa.String(16), nullable=False),
        sa.Column("input_text", sa.Text, nullable=False),
        sa.Column("input_tokens", sa.JSON, nullable=True),
        sa.Column("shown", sa.JSON, nullable=False),
        sa.Column("best", sa.JSON, nullable=False),
        sa.Column("entities", sa.JSON, nullable=True),
        sa.Column("probabilities", sa.JSON, nullable=False),
        sa.Column("propensity", sa.Double, nullable=False),
        sa.Column("exploration", sa.JSON, nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_predictions"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_predictions_user_id_users"),
        sa.ForeignKeyConstraint(["model_version"], ["models.version"], name="fk_predictions_model_version_models"),
    )
    op.create_index("ix_predictions_request_id", "predictions", ["request_id"])
    op.create_index("ix_predictions_user_id", "predictions", ["user_id"])
    op.create_index("ix_predictions_model_version", "predictions", ["model_version"])
    # SQLite cannot drop NOT NULL or add a foreign key in place: batch mode copies the table
    # (nothing references feedback, so the copy keeps every row and id).
    with op.batch_alter_table("feedback") as batch:
        batch.alter_column("completion_id", existing_type=sa.String(100), nullable=True)
        batch.add_column(sa.Column("prediction_id", sa.String(100), nullable=True))
        batch.add_column(sa.Column("correct", sa.Boolean, nullable=True))
        batch.add_column(sa.Column("label", sa.String(200), nullable=True))
        batch.add_column(sa.Column("entities", sa.JSON, nullable=True))
        batch.create_foreign_key("fk_feedback_prediction_id_predictions", "predictions", ["prediction_id"], ["id"])
        batch.create_index("ix_feedback_prediction_id", ["prediction_id"])


def downgrade() -> None:
    # Feedback on predictions has no completion: it goes with the predictions it was about.
    op.execute("DELETE FROM feedback WHERE completion_id IS NULL")
    with op.batch_alter_table("feedback") as batch:
        batch.drop_index("ix_feedback_prediction_id")
        batch.drop_constraint("fk_feedback_prediction_id_predictions", type_="foreignkey")
        for column in ("entities", "label", "correct", "prediction_id"):
            batch.drop_column(column)
        batch.alter_column("completion_id", existing_type=sa.String(100), nullable=False)
    op.drop_table("predictions")
