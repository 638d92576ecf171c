"""The verifications table: one row per answer, with its label once a client gives one.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sdm_verifications",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("created_at", sa.Float(precision=53), nullable=False),
        sa.Column("bundle", sa.String(1024), nullable=False),
        sa.Column("bundle_sha256", sa.String(64), nullable=False),
        sa.Column("head_version", sa.String(64), nullable=False),
        sa.Column("route", sa.String(64), nullable=False),
        sa.Column("alpha", sa.Float(precision=53), nullable=False),
        sa.Column("admitted", sa.Boolean, nullable=False),
        sa.Column("prediction", sa.Integer, nullable=False),
        sa.Column("probability", sa.Float(precision=53), nullable=False),
        sa.Column("q", sa.Integer, nullable=False),
        sa.Column("q_prime", sa.Float(precision=53), nullable=False),
        sa.Column("d", sa.Float(precision=53), nullable=False),
        sa.Column("abstention_reason", sa.String(32), nullable=True),
        sa.Column("h", sa.LargeBinary, nullable=False),
        sa.Column("h_dim", sa.Integer, nullable=False),
        sa.Column("prompt", sa.Text, nullable=True),
        sa.Column("answer", sa.Text, nullable=True),
        sa.Column("label", sa.String(16), nullable=True),
        sa.Column("labelled_at", sa.Float(precision=53), nullable=True),
        sa.Column("note", sa.Text, nullable=True),
    )
    op.create_index("ix_sdm_verifications_created_at", "sdm_verifications", ["created_at"])
    op.create_index("ix_sdm_verifications_labelled_at", "sdm_verifications", ["labelled_at"])


def downgrade() -> None:
    op.drop_index("ix_sdm_verifications_labelled_at", table_name="sdm_verifications")
    op.drop_index("ix_sdm_verifications_created_at", table_name="sdm_verifications")
    op.drop_table("sdm_verifications")
