"""Tamper evidence: every event carries its hash and the previous event's; the honoring event its evidence.

Events written before this revision are chained here, in id order, so that `lethe ledger verify` covers them.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from pipeline.ledger import GENESIS, event_digest

    with op.batch_alter_table("events") as table:  # batch mode: SQLite cannot ALTER in place
        table.add_column(sa.Column("evidence", sa.JSON, nullable=True))
        table.add_column(sa.Column("prev_hash", sa.String(64), nullable=True))
        table.add_column(sa.Column("hash", sa.String(64), nullable=True))
    events = sa.table(
        "events",
        *(sa.column(name) for name in ("id", "request_key", "from_state", "to_state", "actor", "batch_id")),
        *(sa.column(name) for name in ("model_version", "reason", "prev_hash", "hash")),
        sa.column("at", sa.DateTime(timezone=True)),
        sa.column("evidence", sa.JSON),
    )
    connection = op.get_bind()
    previous = GENESIS
    for row in connection.execute(sa.select(events).order_by(events.c.id)).all():
        digest = event_digest(row, previous)
        connection.execute(sa.update(events).where(events.c.id == row.id).values(prev_hash=previous, hash=digest))
        previous = digest


def downgrade() -> None:
    with op.batch_alter_table("events") as table:
        for name in ("hash", "prev_hash", "evidence"):
            table.drop_column(name)
