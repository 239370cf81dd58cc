"""Alembic environment for the ledger: always run programmatically, on the connection Ledger hands over."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, version_table="lethe_ledger_version")
with context.begin_transaction():
    context.run_migrations()
