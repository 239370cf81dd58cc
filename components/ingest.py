"""Take the deletion log (a .jsonl file or a folder of them) into the ledger: every line ends validated or
quarantined with a reason; a file ingested before is skipped whole. Writes the batch's quarantine report."""

from __future__ import annotations

import json
from functools import partial

from components._common import batch_arguments, context, entry_point, open_ledger, parser, snapshot_dir, write_manifest
from pipeline.contracts import DeletionLogContract
from pipeline.data import read_snapshot
from pipeline.requests import parse_lines
from pipeline.storage import read_logs


def main(argv: list[str] | None = None) -> dict:
    cli = batch_arguments(parser("ingest", __doc__))
    cli.add_argument("--deletion-log", required=True, help="a .jsonl file, a folder of them, or s3://bucket/prefix/")
    args = cli.parse_args(argv)
    settings, home = context(args)
    snapshot = read_snapshot(snapshot_dir(args, home))
    ledger = open_ledger(settings, home, f"batch {args.batch_dir.name}")
    contract = DeletionLogContract(snapshot, settings.ledger.max_clock_skew_s, honored=ledger.honored())
    files = []

    def logs():
        for log in read_logs(args.deletion_log, settings.landing):
            files.append(log.uri)
            yield log

    counts = ledger.ingest(
        logs(),
        partial(parse_lines, max_line_bytes=settings.ledger.max_line_bytes),
        contract,
    )
    (args.batch_dir / "contracts").mkdir(parents=True, exist_ok=True)  # GX's own results, for the audit
    (args.batch_dir / "contracts" / "deletion_log.json").write_text(json.dumps(contract.results, default=str))
    for entry in counts.quarantine:
        print(f"quarantined {entry['source']}:{entry['line']}: {entry['reason']}: {entry['message']}")
    return write_manifest(
        args.batch_dir / "ingest.json",
        {
            "deletion_log": str(args.deletion_log),
            "files": files,
            **counts.as_dict(),
        },
    )


if __name__ == "__main__":
    entry_point("ingest", main)
