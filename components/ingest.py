"""Read a deletion log (a .jsonl file or a folder of them): every line becomes a request or a rejection."""

from __future__ import annotations

from pathlib import Path

from components._common import context, entry_point, parser, write_manifest
from pipeline.requests import describe, log_files, parse_log, write_received

REQUESTS_FILE = "requests.jsonl"


def main(argv: list[str] | None = None) -> dict:
    cli = parser("ingest", __doc__)
    cli.add_argument("--deletion-log", type=Path, required=True, help="a .jsonl file or a folder of them")
    cli.add_argument("--batch-dir", type=Path, required=True, help="the batch's working folder")
    args = cli.parse_args(argv)
    settings, _ = context(args)
    files = log_files(args.deletion_log)
    received, rejected = parse_log(args.deletion_log, settings.ledger.max_line_bytes)
    write_received(args.batch_dir / REQUESTS_FILE, received)
    print("\n".join(describe(rejected)) or "no rejected lines")
    return write_manifest(
        args.batch_dir / "ingest.json",
        {
            "deletion_log": str(args.deletion_log),
            "files": [str(file) for file in files],
            "received": len(received) + len(rejected),
            "parsed": len(received),
            "rejected": [rejection.as_dict() for rejection in rejected],
        },
    )


if __name__ == "__main__":
    entry_point("ingest", main)
