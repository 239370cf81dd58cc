"""Deletion requests: parsing JSON Lines logs and checking them against the data snapshot.

A bad line never stops the good ones: it becomes a rejection that names the file, the line and the
reason, in words a person can act on and a code a machine can count.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.ids import request_id_value

# A user's or item's id: an integer, or a string id (a UUID, a SKU) made the integer the data loader makes of it
Id = Annotated[int, BeforeValidator(request_id_value)]


class DeletionRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str = Field(min_length=1, max_length=200)
    user_id: Id
    scope: Literal["user", "interactions"]
    item_ids: list[Id] | None = None
    received_at: datetime

    @field_validator("received_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    @model_validator(mode="after")
    def _items_match_scope(self) -> DeletionRequest:
        if self.scope == "interactions" and not self.item_ids:
            raise ValueError("scope 'interactions' needs a non-empty item_ids list")
        if self.scope == "user" and self.item_ids is not None:
            raise ValueError("scope 'user' forgets every interaction; item_ids must be absent")
        return self


@dataclass(frozen=True)
class Rejection:
    source: str
    line: int | None
    reason: str  # machine-readable code
    message: str  # a sentence for a person
    request_id: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Received:
    request: DeletionRequest
    source: str
    line: int


CLAIMED_FILE = "claimed.jsonl"  # in a batch folder: the requests the batch claimed, with raw ids (the hand-over)


def write_received(path: Path, entries: list[Received]) -> None:
    """Requests with where they came from, one JSON object per line (the hand-over between steps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for entry in entries:
            record = {"request": entry.request.model_dump(mode="json"), "source": entry.source, "line": entry.line}
            out.write(json.dumps(record) + "\n")


def read_received(path: Path) -> list[Received]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [Received(DeletionRequest.model_validate(row["request"]), row["source"], row["line"]) for row in rows]


def describe(rejections: list[Rejection]) -> list[str]:
    return [f"rejected {r.source}:{r.line}: {r.reason}: {r.message}" for r in rejections]


def _pydantic_reason(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in item['loc']) or 'request'}: {item['msg']}" for item in error.errors()
    )


def parse_log(path: Path | str, max_line_bytes: int) -> tuple[list[Received], list[Rejection]]:
    """Every line of every file becomes a Received request or a Rejection; blank lines are skipped."""
    from pipeline.storage import read_logs

    received, rejected = [], []
    for file in read_logs(path):
        got, refused = parse_lines(file.uri, file.content, max_line_bytes)
        received += got
        rejected += refused
    return received, rejected


def parse_lines(source: str, content: bytes, max_line_bytes: int) -> tuple[list[Received], list[Rejection]]:
    """One file's bytes (read locally or from object storage): a BOM and CRLF line ends are accepted; a line
    longer than max_line_bytes is refused before it is parsed."""
    received, rejected = [], []
    for number, raw in enumerate(content.splitlines(), start=1):
        if len(raw) > max_line_bytes:
            message = f"line is {len(raw):,} bytes, more than the {max_line_bytes:,} a request may take"
            rejected.append(Rejection(source, number, "line_too_long", message))
            continue
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
        except UnicodeDecodeError as error:
            rejected.append(Rejection(source, number, "not_utf8", f"line is not UTF-8 text: {error}"))
            continue
        if not text:
            continue
        try:
            payload = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as error:
            rejected.append(Rejection(source, number, "malformed_json", f"not valid JSON: {error}"[:500]))
            continue
        if not isinstance(payload, dict):
            rejected.append(Rejection(source, number, "not_an_object", "a request must be a JSON object"))
            continue
        request_id = payload.get("request_id") if isinstance(payload.get("request_id"), str) else None
        try:
            received.append(Received(DeletionRequest.model_validate(payload), source, number))
        except ValidationError as error:
            rejected.append(Rejection(source, number, "invalid_request", _pydantic_reason(error), request_id))
    return received, rejected
