"""Read a deletion log (a .jsonl file or a folder of them): every line becomes a request or a rejection."""

from __future__ import annotations

import json
from pathlib import Path

from components._common import entry_point, parser, write_manifest
from pipeline.requests import log_files, parse_log

REQUESTS_FILE = "requests.jsonl"


def main(argv: list[str] | None = None) -> dict:
    cli = parser("ingest", __doc__)
    cli.add_argument("--deletion-log", type=Path, required=True, help="a .jsonl file or a folder of them")
    cli.add_argument("--batch-dir", type=Path, required=True, help="the batch's working folder")
    args = cli.parse_args(argv)
    files = log_files(args.deletion_log)
    received, rejected = parse_log(args.deletion_log)
    args.batch_dir.mkdir(parents=True, exist_ok=True)
    with (args.batch_dir / REQUESTS_FILE).open("w") as out:
        for entry in received:
            out.write(
                json.dumps(
                    {"request": entry.request.model_dump(mode="json"), "source": entry.source, "line": entry.line}
                )
                + "\n"
            )
    for rejection in rejected:
        print(f"rejected {rejection.source}:{rejection.line}: {rejection.reason}: {rejection.message}")
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
