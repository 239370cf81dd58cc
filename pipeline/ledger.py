"""The ledger: for every deletion request ever received, where it stands and how it got there.

SQLAlchemy 2 Core on SQLite (the default, under LETHE_HOME) or PostgreSQL (by URL). Two tables carry the
bookkeeping: `requests`, one row per request (or per quarantined line), and `events`, append-only, one row
per state change with who made it and when. `ingested_files` records every file taken in, by content hash,
so that ingesting the same file twice changes nothing. The schema is created and upgraded by alembic
migrations (pipeline/ledger_migrations), never by create_all.

States: received -> validated | quarantined; validated -> in_batch (claimed by one batch, atomically);
in_batch -> honored | pending_retry; pending_retry -> in_batch again, or needs_retrain after
`ledger.max_failed_nights` rejected nights; needs_retrain -> in_batch (the retrain fallback) -> honored.
A claimable request that asks again for what is honored already (the same person, or interactions already
forgotten) goes straight to honored at claim, reason `already_honored`, with the model version and the key
of the request that honored it; a claimed request the batch cannot act on is quarantined with a reason and
the rest of the batch goes on.

Raw user ids never enter the ledger: a request carries the keyed hash of its user (pipeline.pii).

Tamper evidence: each event carries the SHA-256 of its own content and of the event before it (`prev_hash`,
`hash`), so an event changed, removed or inserted behind the ledger's back breaks the chain from there on;
`verify()` recomputes it and names the first broken event, and checks that every request's state is the one its
last event says. The honoring event of a request also carries the gate's evidence for it (numbers only: p-values,
power, thresholds, the model version), which receipts and the audit read.
"""

from __future__ import annotations

import functools
import getpass
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from pipeline.jsonsafe import plain_numbers
from pipeline.pii import pii_key, user_key
from pipeline.requests import DeletionRequest, Rejection

MIGRATIONS = Path(__file__).resolve().parent / "ledger_migrations"
STATES = ("received", "validated", "quarantined", "in_batch", "honored", "pending_retry", "needs_retrain")
CLAIMABLE = ("validated", "pending_retry", "needs_retrain")

metadata = sa.MetaData()
requests_table = sa.Table(
    "requests",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("key", sa.String(255)),
    sa.Column("request_id", sa.String(255)),
    sa.Column("user_key", sa.String(64)),
    sa.Column("scope", sa.String(16)),
    sa.Column("item_ids", sa.JSON),
    sa.Column("received_at", sa.DateTime(timezone=True)),
    sa.Column("state", sa.String(16)),
    sa.Column("batch_id", sa.String(64)),
    sa.Column("model_version", sa.String(32)),
    sa.Column("reason", sa.String(64)),
    sa.Column("message", sa.Text),
    sa.Column("failed_nights", sa.Integer),
    sa.Column("source", sa.Text),
    sa.Column("line", sa.Integer),
    sa.Column("original_key", sa.String(255)),  # a repeat: the request that honored it first
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
)
events_table = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("request_key", sa.String(255)),
    sa.Column("from_state", sa.String(16)),
    sa.Column("to_state", sa.String(16)),
    sa.Column("at", sa.DateTime(timezone=True)),
    sa.Column("actor", sa.String(128)),
    sa.Column("batch_id", sa.String(64)),
    sa.Column("model_version", sa.String(32)),
    sa.Column("reason", sa.String(64)),
    sa.Column("evidence", sa.JSON),  # the honoring event: the gate's figures for this request (numbers only)
    sa.Column("prev_hash", sa.String(64)),
    sa.Column("hash", sa.String(64)),
)
files_table = sa.Table(
    "ingested_files",
    metadata,
    sa.Column("content_sha256", sa.String(64), primary_key=True),
    sa.Column("uri", sa.Text),
    sa.Column("size", sa.BigInteger),
    sa.Column("lines", sa.Integer),
    sa.Column("ingested_at", sa.DateTime(timezone=True)),
    sa.Column("actor", sa.String(128)),
)


log = logging.getLogger(__name__)

GENESIS = "0" * 64  # the `prev_hash` of the first event
CHAINED = ("request_key", "from_state", "to_state", "at", "actor", "batch_id", "model_version", "reason", "evidence")
CHAIN_LOCK = 7417384502  # PostgreSQL: writers append to the chain one at a time


def _canonical(value):
    if isinstance(value, datetime):  # SQLite hands back naive datetimes; every time stored is UTC
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC).isoformat(timespec="microseconds")
    return value


def event_digest(event, previous: str) -> str:
    """SHA-256 of an event's content (the CHAINED fields, canonical JSON) and of the hash before it."""
    get = event.get if isinstance(event, dict) else lambda key: getattr(event, key)
    body = {key: _canonical(get(key)) for key in CHAINED}
    payload = json.dumps({"previous": previous, **body}, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class LedgerUnavailable(ConnectionError):
    """The ledger's database cannot be reached or migrated; the message says which URL and why."""


def _database_call(retry: bool):
    """A public ledger operation that loses its database (refused, reset, timed out) is tried `attempts` times
    in all with doubling waits, then fails with LedgerUnavailable naming the URL: a night never hangs on it and
    never dies on a bare driver traceback. Each operation is one transaction that a retry redoes whole, and
    each is idempotent (a claim picks up what it holds, honor and fail move only in_batch rows), so a retry
    after a commit whose answer was lost does no harm. `retry=False` for ingest, whose files are a stream:
    what it committed is skipped by file hash when the night runs again."""

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            attempts = self.attempts if retry else 1
            for attempt in range(1, attempts + 1):
                try:
                    return method(self, *args, **kwargs)
                except (sa.exc.OperationalError, sa.exc.InterfaceError) as error:
                    reason = " ".join(str(error.orig).split())
                    if attempt == attempts:
                        raise LedgerUnavailable(
                            f"ledger database {_safe_url(self.url)} is unavailable ({method.__name__}, "
                            f"{attempt} attempt{'s' if attempt > 1 else ''}): {reason}"
                        ) from None
                    wait = self.backoff_s * 2 ** (attempt - 1)
                    log.warning("ledger %s failed (%s); again in %.1f s", method.__name__, reason, wait)
                    time.sleep(wait)
                    self.engine.dispose()  # a fresh connection next time, not a dead one from the pool

        return wrapper

    return decorate


def default_actor() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}"


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def _now() -> datetime:
    return datetime.now(UTC)


def _safe_url(url: str) -> str:
    return sa.engine.make_url(url).render_as_string(hide_password=True)


@dataclass(frozen=True)
class LedgerRequest:
    """A request as a batch sees it: no raw user id, only its keyed hash."""

    key: str
    request_id: str
    user_key: str
    scope: str
    item_ids: tuple[int, ...] | None
    received_at: datetime
    state: str
    failed_nights: int


@dataclass
class IngestCounts:
    received: int = 0  # lines that held something (blank lines are not requests)
    validated: int = 0
    quarantined: int = 0
    duplicates: int = 0  # already in the ledger with the same content: nothing changed
    files_skipped: list[str] = field(default_factory=list)  # whole files ingested before (same content hash)
    quarantine: list[dict] = field(default_factory=list)  # this ingest's quarantined lines: the batch's report

    def as_dict(self) -> dict:
        return asdict(self)


class Ledger:
    def __init__(self, url: str, actor: str | None = None, settings=None) -> None:
        """`settings` (params.yaml's `ledger`) bound how long a lost database is waited for: a connection
        timeout and the attempts per operation. Without them (tests, tools) one attempt, no timeout."""
        self.url, self.actor = url, actor or default_actor()
        self.attempts = settings.attempts if settings else 1
        self.backoff_s = settings.retry_backoff_s if settings else 0.0
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            # a writer waits for another instead of failing at once; claims take the write lock up front
            self.engine = sa.create_engine(url, connect_args={"timeout": 60})
            sa.event.listen(self.engine, "connect", self._sqlite_connect)
            sa.event.listen(self.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        else:
            timeout = {"connect_timeout": settings.connect_timeout_s} if settings else {}
            self.engine = sa.create_engine(url, pool_pre_ping=True, connect_args=timeout)
        self.migrate()

    @staticmethod
    def _sqlite_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # let the "begin" listener issue BEGIN IMMEDIATE itself
        dbapi_connection.execute("PRAGMA foreign_keys = ON")
        dbapi_connection.execute("PRAGMA journal_mode = WAL")

    # -- schema -----------------------------------------------------------------------------------
    def _alembic(self, connection: sa.Connection) -> Config:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        return config

    @_database_call(retry=True)
    def migrate(self) -> None:
        """Bring the schema to the newest migration (a no-op when it is there already)."""
        try:
            with self.engine.begin() as connection:
                if connection.dialect.name == "postgresql":  # two processes starting at once migrate in turn
                    connection.execute(sa.text("SELECT pg_advisory_xact_lock(7417384501)"))
                command.upgrade(self._alembic(connection), "head")
        except (sa.exc.OperationalError, sa.exc.InterfaceError):
            raise  # lost or refused: tried again
        except sa.exc.DBAPIError as error:  # a schema we may not create tables in: no retry helps
            reason = " ".join(str(error.orig).split())
            raise LedgerUnavailable(f"ledger database {_safe_url(self.url)} is unavailable: {reason}") from None

    @_database_call(retry=True)
    def schema_version(self) -> str | None:
        with self.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": "lethe_ledger_version"})
            return context.get_current_revision()

    @staticmethod
    def newest_schema_version() -> str | None:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        return ScriptDirectory.from_config(config).get_current_head()

    # -- writes -----------------------------------------------------------------------------------
    def _event(self, key, from_state, to_state, batch_id=None, model_version=None, reason=None, evidence=None) -> dict:
        return {
            "request_key": key,
            "from_state": from_state,
            "to_state": to_state,
            "at": _now(),
            "actor": self.actor,
            "batch_id": batch_id,
            "model_version": model_version,
            "reason": reason,
            "evidence": plain_numbers(evidence) if evidence is not None else None,
        }

    @staticmethod
    def _append(connection: sa.Connection, events: list[dict]) -> None:
        """Insert events at the chain's end, each hashed with the one before (in this transaction, which holds
        the chain: BEGIN IMMEDIATE on SQLite, an advisory lock on PostgreSQL)."""
        if not events:
            return
        if connection.dialect.name == "postgresql":
            connection.execute(sa.text(f"SELECT pg_advisory_xact_lock({CHAIN_LOCK})"))
        last = connection.execute(sa.select(events_table.c.hash).order_by(events_table.c.id.desc()).limit(1)).first()
        previous = last.hash if last and last.hash else GENESIS
        for event in events:
            event["prev_hash"], event["hash"] = previous, event_digest(event, previous)
            previous = event["hash"]
        connection.execute(sa.insert(events_table), events)

    @_database_call(retry=False)
    def ingest(
        self,
        files: Iterable[tuple[str, bytes]],
        parse,
        check,
    ) -> IngestCounts:
        """Take in files (uri, content): parse each, check what parsed, record every outcome in one transaction
        per file. `parse(uri, content) -> (received, rejections)`; `check(received) -> (valid, rejections)`.
        A file whose content was ingested before is skipped whole; a request id already in the ledger with the
        same content is a duplicate (nothing changes), with different content it is quarantined."""
        counts, key = IngestCounts(), pii_key()
        for uri, content in files:
            digest = hashlib.sha256(content).hexdigest()
            received, rejected = parse(uri, content)
            with self.engine.begin() as connection:
                if connection.execute(sa.select(files_table.c.uri).filter_by(content_sha256=digest)).first():
                    counts.files_skipped.append(uri)
                    counts.duplicates += len(received) + len(rejected)
                    continue
                counts.received += len(received) + len(rejected)
                fresh, rejected = self._split_known(connection, received, rejected, key, counts)
                valid, refused = check(fresh)
                rows, events = [], []
                for entry in valid:
                    rows.append(self._row(entry.request, key, "validated", entry.source, entry.line))
                    events += [
                        self._event(rows[-1]["key"], None, "received"),
                        self._event(rows[-1]["key"], "received", "validated"),
                    ]
                by_line = {(e.source, e.line): e.request for e in received}
                for rejection in [*rejected, *refused]:
                    request = by_line.get((rejection.source, rejection.line))
                    row = self._quarantine_row(rejection, request, key, digest)
                    rows.append(row)
                    events += [
                        self._event(row["key"], None, "received"),
                        self._event(row["key"], "received", "quarantined", reason=rejection.reason),
                    ]
                if rows:
                    connection.execute(sa.insert(requests_table), rows)
                    self._append(connection, events)
                connection.execute(
                    sa.insert(files_table),
                    {
                        "content_sha256": digest,
                        "uri": uri,
                        "size": len(content),
                        "lines": len(content.splitlines()),
                        "ingested_at": _now(),
                        "actor": self.actor,
                    },
                )
                counts.validated += len(valid)
                counts.quarantined += len(rejected) + len(refused)
                counts.quarantine += [r.as_dict() for r in [*rejected, *refused]]
        return counts

    def _split_known(self, connection, received, rejected, key, counts):
        """Requests whose id the ledger (or this file) already holds: the same content is a duplicate, other
        content a quarantined conflict; the rest are fresh."""
        ids = [entry.request.request_id for entry in received]
        known = {}
        for chunk in range(0, len(ids), 5000):
            part = ids[chunk : chunk + 5000]
            query = sa.select(
                requests_table.c.key, requests_table.c.user_key, requests_table.c.scope, requests_table.c.item_ids
            ).where(requests_table.c.key.in_(part))
            known.update({row.key: (row.user_key, row.scope, row.item_ids) for row in connection.execute(query)})
        fresh, rejected, seen = [], list(rejected), {}
        for entry in received:
            request = entry.request
            content = (user_key(request.user_id, key), request.scope, request.item_ids)
            previous = known.get(request.request_id) or seen.get(request.request_id)
            if previous is None:
                seen[request.request_id] = content
                fresh.append(entry)
            elif previous == content and request.request_id in known:
                counts.duplicates += 1
                counts.received -= 1  # a resubmission of a request the ledger holds is not a new request
            else:
                rejected.append(
                    Rejection(
                        entry.source,
                        entry.line,
                        "duplicate_request_id",
                        f"request id {request.request_id!r} was already used for a different request",
                        request.request_id,
                    )
                )
        return fresh, rejected

    def _row(self, request: DeletionRequest, key: bytes, state: str, source: str, line: int) -> dict:
        now = _now()
        return {
            "key": request.request_id,
            "request_id": request.request_id,
            "user_key": user_key(request.user_id, key),
            "scope": request.scope,
            "item_ids": request.item_ids,
            "received_at": request.received_at,
            "state": state,
            "reason": None,
            "message": None,
            "failed_nights": 0,
            "source": source,
            "line": line,
            "created_at": now,
            "updated_at": now,
        }

    def _quarantine_row(self, rejection: Rejection, request: DeletionRequest | None, key: bytes, digest: str) -> dict:
        now = _now()
        row = {
            "key": f"q:{digest[:16]}:{rejection.line}",
            "request_id": (rejection.request_id or "")[:255] or None,
            "user_key": None,
            "scope": None,
            "item_ids": None,
            "received_at": None,
            "state": "quarantined",
            "reason": rejection.reason,
            "message": rejection.message[:2000],
            "failed_nights": 0,
            "source": rejection.source,
            "line": rejection.line,
            "created_at": now,
            "updated_at": now,
        }
        if request is not None:
            row.update(
                user_key=user_key(request.user_id, key),
                scope=request.scope,
                item_ids=request.item_ids,
                received_at=request.received_at,
            )
        return row

    @_database_call(retry=True)
    def claim(self, batch_id: str, states: tuple[str, ...] = CLAIMABLE) -> list[LedgerRequest]:
        """Move every request in `states` into this batch, atomically, and return them with any this batch holds
        already (a rerun of the same batch picks up its own requests). A request that repeats what is honored
        already is answered instead (see `_repeats`): honored by the version that honored the original, never
        claimed. PostgreSQL: the rows are locked with FOR UPDATE SKIP LOCKED, so a second batch claiming at the
        same time skips them; SQLite: the transaction holds the database's write lock from its first statement
        (BEGIN IMMEDIATE)."""
        with self.engine.begin() as connection:
            rows = connection.execute(
                sa.select(requests_table)
                .where(requests_table.c.state.in_(states))
                .order_by(requests_table.c.id)
                .with_for_update(skip_locked=True)
            ).all()
            held = connection.execute(
                sa.select(requests_table)
                .where(requests_table.c.state == "in_batch", requests_table.c.batch_id == batch_id)
                .order_by(requests_table.c.id)
            ).all()
            repeats = self._repeats(connection, rows)
            for row in rows:
                if row.key in repeats:
                    original = repeats[row.key]
                    self._move(
                        connection,
                        [row.key],
                        row.state,
                        "honored",
                        batch_id=batch_id,
                        model_version=original.model_version,
                        reason="already_honored",
                        message=f"already honored by request {original.request_id!r} in model version "
                        f"{original.model_version}",
                        original_key=original.key,
                    )
            rows = [row for row in rows if row.key not in repeats]
            for state in sorted({row.state for row in rows}):
                keys = [row.key for row in rows if row.state == state]
                self._move(connection, keys, state, "in_batch", batch_id=batch_id)
        return [_as_request(row, state="in_batch") for row in [*held, *rows]]

    @staticmethod
    def _repeats(connection: sa.Connection, rows) -> dict[str, sa.Row]:
        """Of `rows`, those that ask for nothing the ledger has not honored already, each with the honored request
        that answers it: a user honored at user scope answers any later request of that user; interactions
        answer a later request whose items they cover. People do ask twice."""
        user_keys = sorted({row.user_key for row in rows if row.user_key})
        if not user_keys:
            return {}
        honored = connection.execute(
            sa.select(requests_table)
            .where(requests_table.c.state == "honored", requests_table.c.user_key.in_(user_keys))
            .order_by(requests_table.c.id)
        ).all()
        whole, items = {}, {}
        for row in honored:
            if row.scope == "user":
                whole.setdefault(row.user_key, row)
            else:
                for item in row.item_ids or ():
                    items.setdefault(row.user_key, {})[item] = row
        answered = {}
        for row in rows:
            if row.user_key in whole:
                answered[row.key] = whole[row.user_key]
            elif row.scope == "interactions" and row.item_ids:
                covered = items.get(row.user_key, {})
                if all(item in covered for item in row.item_ids):
                    answered[row.key] = covered[row.item_ids[-1]]
        return answered

    def _move(
        self,
        connection,
        keys,
        from_state,
        to_state,
        batch_id=None,
        model_version=None,
        reason=None,
        message=None,
        original_key=None,
        count_failure=False,
        evidence=None,
    ) -> None:
        """Move the requests `keys` (all in `from_state`) to `to_state` with one event each, in `connection`'s
        transaction; `evidence(key)` gives an event's evidence."""
        values = {"state": to_state, "updated_at": _now()}
        if batch_id is not None:
            values["batch_id"] = batch_id
        if to_state != "in_batch":
            values.update(reason=reason, message=message)
        if model_version is not None:
            values["model_version"] = model_version
        if original_key is not None:
            values["original_key"] = original_key
        if count_failure:
            values["failed_nights"] = requests_table.c.failed_nights + 1
        for start in range(0, len(keys), 5000):
            part = keys[start : start + 5000]
            connection.execute(sa.update(requests_table).where(requests_table.c.key.in_(part)).values(**values))
            self._append(
                connection,
                [
                    self._event(k, from_state, to_state, batch_id, model_version, reason, evidence and evidence(k))
                    for k in part
                ],
            )

    @_database_call(retry=True)
    def _finish(
        self,
        batch_id: str,
        to_state: str,
        model_version=None,
        reason=None,
        message=None,
        where=None,
        failed=True,
        evidence=None,
    ) -> int:
        """Move this batch's in_batch requests (those matching `where`, if given) to `to_state`, with events;
        `failed` counts the night against them (ledger.max_failed_nights); `evidence(user_key)` gives the
        evidence each request's event carries."""
        with self.engine.begin() as connection:
            condition = sa.and_(requests_table.c.batch_id == batch_id, requests_table.c.state == "in_batch")
            if where is not None:
                condition = sa.and_(condition, where)
            found = connection.execute(sa.select(requests_table.c.key, requests_table.c.user_key).where(condition))
            users = {row.key: row.user_key for row in found}
            keys = list(users)
            if keys:
                self._move(
                    connection,
                    keys,
                    "in_batch",
                    to_state,
                    batch_id,
                    None if model_version is None else str(model_version),
                    reason,
                    message,
                    count_failure=failed,
                    evidence=(lambda key: evidence(users[key])) if evidence else None,
                )
            return len(keys)

    @_database_call(retry=True)
    def stuck_batches(self, other_than: str) -> list[str]:
        """Batches other than this one that still hold requests in_batch: runs that died before the ledger
        heard their outcome (the DAG runs one batch at a time, so none of them is still running)."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.select(requests_table.c.batch_id)
                .where(requests_table.c.state == "in_batch", requests_table.c.batch_id != other_than)
                .distinct()
            )
            return sorted(row.batch_id for row in rows)

    def release(self, batch_id: str, reason: str, message: str) -> int:
        """An interrupted batch's requests wait for the next claim; an interruption is not a failed night."""
        return self._finish(batch_id, "pending_retry", reason=reason, message=message, failed=False)

    def quarantine_claimed(self, batch_id: str, request_ids: list[str], reason: str, message: str) -> int:
        """Claimed requests this batch cannot act on (found at claim time): quarantined with the reason, so that
        the rest of the batch goes on; not a failed night."""
        where = requests_table.c.key.in_(list(request_ids))
        return self._finish(batch_id, "quarantined", reason=reason, message=message, where=where, failed=False)

    @_database_call(retry=True)
    def answered(self, batch_id: str) -> list[dict]:
        """The repeats this batch's claim answered: request id, the original's and the honoring version."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.select(requests_table)
                .where(requests_table.c.batch_id == batch_id, requests_table.c.reason == "already_honored")
                .order_by(requests_table.c.id)
            ).all()
        return [
            {"request_id": r.request_id, "original": r.original_key, "model_version": r.model_version} for r in rows
        ]

    def honor(self, batch_id: str, model_version: str, evidence=None) -> int:
        """The batch's model was promoted: its requests are honored by that model version. `evidence(user_key)`:
        the gate's figures each request's honoring event keeps (numbers only)."""
        return self._finish(batch_id, "honored", model_version=str(model_version), failed=False, evidence=evidence)

    def fail(self, batch_id: str, reason: str, message: str, max_failed_nights: int) -> dict[str, int]:
        """The batch was rejected: its requests wait for the next night, or need a retrain after too many."""
        last = requests_table.c.failed_nights + 1 >= max_failed_nights
        return {
            "needs_retrain": self._finish(batch_id, "needs_retrain", reason=reason, message=message, where=last),
            "pending_retry": self._finish(batch_id, "pending_retry", reason=reason, message=message),
        }

    # -- reads ------------------------------------------------------------------------------------
    @_database_call(retry=True)
    def verify(self) -> dict:
        """Recompute the events' hash chain and check every request's state against its last event. Names the
        first broken event (its id and what is wrong) or the first request whose state no event explains."""
        previous, checked, broken = GENESIS, 0, None
        with self.engine.connect() as connection:
            for row in connection.execute(sa.select(events_table).order_by(events_table.c.id)):
                checked += 1
                if row.prev_hash != previous:
                    broken = {"event_id": row.id, "request_key": row.request_key, "problem": "does not link to the "
                              f"event before it (prev_hash {row.prev_hash}, expected {previous})"}  # fmt: skip
                elif row.hash != event_digest(row, previous):
                    problem = "its content does not match its hash (changed after it was written)"
                    broken = {"event_id": row.id, "request_key": row.request_key, "problem": problem}
                if broken:
                    break
                previous = row.hash
            last_state = dict(
                connection.execute(
                    sa.select(events_table.c.request_key, events_table.c.to_state).where(
                        events_table.c.id.in_(
                            sa.select(sa.func.max(events_table.c.id)).group_by(events_table.c.request_key)
                        )
                    )
                ).all()
            )
            mismatch = None
            for row in connection.execute(
                sa.select(requests_table.c.key, requests_table.c.state).order_by(requests_table.c.id)
            ):
                if last_state.get(row.key) != row.state:
                    mismatch = {"request_key": row.key, "problem": f"state {row.state!r} but its last event says "
                                f"{last_state.get(row.key)!r}"}  # fmt: skip
                    break
        return {
            "ok": broken is None and mismatch is None,
            "events_checked": checked,
            "head": previous if broken is None else None,
            "first_broken_event": broken,
            "first_inconsistent_request": mismatch,
        }

    @_database_call(retry=True)
    def honoring_event(self, request_key: str) -> dict | None:
        """The event that honored a request (its evidence, version and hash), or None."""
        with self.engine.connect() as connection:
            row = (
                connection.execute(
                    sa.select(events_table)
                    .where(events_table.c.request_key == request_key, events_table.c.to_state == "honored")
                    .order_by(events_table.c.id.desc())
                    .limit(1)
                )
                .mappings()
                .first()
            )
        return {k: _plain(v) for k, v in row.items()} if row else None

    @_database_call(retry=True)
    def event_with_hash(self, digest: str) -> dict | None:
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(events_table).where(events_table.c.hash == digest)).mappings().first()
        return {k: _plain(v) for k, v in row.items()} if row else None

    @_database_call(retry=True)
    def honored_evidence(self, since: datetime | None = None) -> list[dict]:
        """Every honoring event with evidence, oldest first: what `lethe audit` combines."""
        query = sa.select(events_table).where(events_table.c.to_state == "honored")
        if since is not None:
            query = query.where(events_table.c.at >= since)
        with self.engine.connect() as connection:
            rows = connection.execute(query.order_by(events_table.c.id)).mappings().all()
        # a JSON column keeps None as JSON null, not SQL NULL: repeats' events (no evidence of their own) drop here
        return [{k: _plain(v) for k, v in row.items()} for row in rows if row["evidence"]]

    @_database_call(retry=True)
    def counts(self) -> dict[str, int]:
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.select(requests_table.c.state, sa.func.count()).group_by(requests_table.c.state)
            ).all()
        found = dict(rows)
        return {state: int(found.get(state, 0)) for state in STATES}

    @_database_call(retry=True)
    def history(self, request_id: str) -> dict | None:
        """One request's row and every state change, oldest first (quarantined lines match their request id too)."""
        with self.engine.connect() as connection:
            rows = (
                connection.execute(
                    sa.select(requests_table)
                    .where(sa.or_(requests_table.c.key == request_id, requests_table.c.request_id == request_id))
                    .order_by(requests_table.c.id)
                )
                .mappings()
                .all()
            )
            if not rows:
                return None
            entries = []
            for row in rows:
                events = (
                    connection.execute(
                        sa.select(events_table)
                        .where(events_table.c.request_key == row["key"])
                        .order_by(events_table.c.id)
                    )
                    .mappings()
                    .all()
                )
                entries.append(
                    {
                        **{k: _plain(v) for k, v in row.items() if k != "id"},
                        "events": [
                            {k: _plain(v) for k, v in e.items() if k not in ("id", "request_key")} for e in events
                        ],
                    }
                )
        return {"request_id": request_id, "entries": entries}

    @_database_call(retry=True)
    def honored(self) -> tuple[set[str], dict[str, set[int]]]:
        """What no load of training data may contain: user keys honored at user scope, and per user key the
        items honored at interaction scope."""
        users, items = set(), {}
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.select(requests_table.c.user_key, requests_table.c.scope, requests_table.c.item_ids).where(
                    requests_table.c.state == "honored"
                )
            )
            for row in rows:
                if row.scope == "user":
                    users.add(row.user_key)
                else:
                    items.setdefault(row.user_key, set()).update(row.item_ids or [])
        return users, items

    @_database_call(retry=True)
    def batch(self, batch_id: str) -> list[LedgerRequest]:
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(requests_table).where(requests_table.c.batch_id == batch_id)).all()
        return [_as_request(row) for row in rows]

    def dispose(self) -> None:
        self.engine.dispose()


def _as_request(row, state: str | None = None) -> LedgerRequest:
    received_at = row.received_at if row.received_at.tzinfo else row.received_at.replace(tzinfo=UTC)
    return LedgerRequest(
        row.key,
        row.request_id,
        row.user_key,
        row.scope,
        tuple(row.item_ids) if row.item_ids else None,
        received_at,
        state or row.state,
        row.failed_nights,
    )


def _plain(value):
    if isinstance(value, datetime):  # SQLite hands back naive datetimes; every time stored is UTC
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    return value
