"""The landing zone: deletion logs from a local folder or from `s3://bucket/prefix/`, through one interface.

A source lists its log files (`.jsonl` / `.json`) in name order and reads their bytes. Nothing is ever
deleted or moved: which files were taken in is the ledger's record (`ingested_files`, by content hash).
S3 goes through boto3; the endpoint comes from configuration (`landing.s3_endpoint_url`, else boto3's own
AWS_ENDPOINT_URL / profile resolution), so a MinIO, a moto server or AWS itself are the same code path.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

LOG_SUFFIXES = (".jsonl", ".json")


class LandingUnavailable(ConnectionError):
    """The landing zone cannot be listed or read; the message names it and says why."""


class LogFile(NamedTuple):
    uri: str
    content: bytes


class LocalLanding:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def uris(self) -> list[str]:
        if self.path.is_dir():
            return [str(p) for p in sorted(self.path.iterdir()) if p.is_file() and p.suffix in LOG_SUFFIXES]
        if self.path.is_file():
            return [str(self.path)]
        raise FileNotFoundError(f"{self.path}: no such deletion log file or directory")

    def read(self, uri: str) -> bytes:
        return Path(uri).read_bytes()


class S3Landing:
    def __init__(self, uri: str, settings=None) -> None:
        """`settings` (params.yaml's `landing`): the endpoint, and how long a call may take and how often it
        is tried (botocore's standard retry mode) before the ingest fails naming the endpoint."""
        import boto3
        from botocore.config import Config

        parsed = urlparse(uri)
        if not parsed.netloc:
            raise ValueError(f"{uri}: an S3 landing zone is s3://bucket/prefix/")
        self.uri, self.bucket, self.prefix = uri, parsed.netloc, parsed.path.lstrip("/")
        bounds = {}
        if settings is not None:
            bounds = {
                "connect_timeout": settings.s3_connect_timeout_s,
                "read_timeout": settings.s3_read_timeout_s,
                "retries": {"mode": "standard", "total_max_attempts": settings.s3_max_attempts},
            }
        endpoint = settings.s3_endpoint_url if settings is not None else None
        self.client = boto3.client("s3", endpoint_url=endpoint, config=Config(**bounds))
        self.endpoint = self.client.meta.endpoint_url

    def _call(self, action: str, function, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return function(**kwargs)
        except (ClientError, BotoCoreError) as error:
            reason = " ".join(str(error).split())
            raise LandingUnavailable(
                f"S3 landing zone {self.uri} (endpoint {self.endpoint}): cannot {action}: {reason}"
            ) from None

    def uris(self) -> list[str]:
        keys = []
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call("list objects", lambda **kw: list(paginator.paginate(**kw)), Bucket=self.bucket,
                           Prefix=self.prefix)  # fmt: skip
        for page in pages:
            keys += [item["Key"] for item in page.get("Contents", []) if item["Key"].endswith(LOG_SUFFIXES)]
        return [f"s3://{self.bucket}/{key}" for key in sorted(keys)]

    def read(self, uri: str) -> bytes:
        key = urlparse(uri).path.lstrip("/")
        response = self._call(f"read {uri}", self.client.get_object, Bucket=self.bucket, Key=key)
        return response["Body"].read()


def landing(source: str | Path, settings=None) -> LocalLanding | S3Landing:
    """`settings`: params.yaml's `landing` (the S3 endpoint and bounds); None: boto3's defaults."""
    text = str(source)
    if text.startswith("s3://"):
        return S3Landing(text, settings)
    if "://" in text:
        raise ValueError(f"{text}: a deletion log is a local path or s3://bucket/prefix/")
    return LocalLanding(text)


def read_logs(source: str | Path, settings=None) -> Iterator[LogFile]:
    """Every log file of the source, in name order, one at a time (a large landing zone is not held at once)."""
    zone = landing(source, settings)
    for uri in zone.uris():
        yield LogFile(uri, zone.read(uri))
