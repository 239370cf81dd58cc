"""The ledger: requests, their append-only events, and the files already ingested.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "requests",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        # request_id for accepted requests; "q:<file hash>:<line>" for lines quarantined without a usable id
        sa.Column("key", sa.String(255), nullable=False, unique=True),
        sa.Column("request_id", sa.String(255), nullable=True),
        sa.Column("user_key", sa.String(64), nullable=True),  # HMAC of the user id, never the id itself
        sa.Column("scope", sa.String(16), nullable=True),
        sa.Column("item_ids", sa.JSON, nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("batch_id", sa.String(64), nullable=True, index=True),
        sa.Column("model_version", sa.String(32), nullable=True),
        sa.Column("reason", sa.String(64), nullable=True),
        sa.Column("message", sa.Text, nullable=True),
        sa.Column("failed_nights", sa.Integer, nullable=False, server_default="0"),
        sa.Column("source", sa.Text, nullable=True),
        sa.Column("line", sa.Integer, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("request_key", sa.String(255), sa.ForeignKey("requests.key"), nullable=False, index=True),
        sa.Column("from_state", sa.String(16), nullable=True),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("batch_id", sa.String(64), nullable=True),
        sa.Column("model_version", sa.String(32), nullable=True),
        sa.Column("reason", sa.String(64), nullable=True),
    )
    op.create_table(
        "ingested_files",
        sa.Column("content_sha256", sa.String(64), primary_key=True),
        sa.Column("uri", sa.Text, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("lines", sa.Integer, nullable=False),
        sa.Column("ingested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("ingested_files")
    op.drop_table("events")
    op.drop_table("requests")
