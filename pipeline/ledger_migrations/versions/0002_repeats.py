"""A request that repeats one already honored points at the request that honored it.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as table:  # batch mode: SQLite cannot ALTER in place
        table.add_column(sa.Column("original_key", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("requests") as table:
        table.drop_column("original_key")
