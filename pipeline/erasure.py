"""Lethe keeps no copy of what it erased.

Until a request is honored its data stays where it is, so that a rejected batch can be retried. Once the ledger
holds it as honored, every copy Lethe made of the person's interactions goes:
- the data snapshot's interactions, rewritten without them; its manifest records the new content hash and
  the hash it replaced (`erasures`), so that a base model trained before the erasure is still known as built
  from this snapshot's lineage;
- every batch folder's split table and claimed requests (the raw ids of the people a batch forgot);
- any other Parquet table with user_id and item_id columns under the roots it is given (LETHE_HOME holds the
  local MLflow artifact store too; Lethe logs no rows to MLflow, and the erasure scan test checks that);
- in a DVC workspace, the outputs above are committed again and `dvc gc --workspace` drops the cache entries of
  the old files.

Rows are found by the keyed hash of their user id (pipeline.pii), never by a list of raw ids kept somewhere:
the ledger holds only keys. Each file is replaced whole (written beside it, then renamed over it), so a crash
leaves the old file or the new one, and the next erasure (every claim runs one) finishes the work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from pipeline.pii import user_key, user_keys
from pipeline.requests import CLAIMED_FILE, read_received, write_received

SNAPSHOT_MANIFEST = "manifest.json"  # beside a snapshot's interactions.parquet (pipeline.data)


class ErasureFailed(RuntimeError):
    """A store could not be purged; the message names it. The requests stay honored (the model forgot them);
    the next erasure tries again."""


def _replace(path: Path, write) -> None:
    partial = path.with_name(f".{path.name}.erasing")
    write(partial)
    os.replace(partial, path)


def purge_table(path: Path, users: set[str], pairs: dict[str, set[int]], now: str) -> int:
    """Drop the honored rows from one Parquet table with user_id and item_id columns; the rows dropped."""
    import pandas as pd  # here, not at import: every step imports this module for ErasureFailed

    from pipeline.data import content_hash, drop_forgotten, interaction_counts

    frame = pd.read_parquet(path)
    if not {"user_id", "item_id"} <= set(frame.columns):
        return 0
    ids = user_keys(frame.user_id.unique())
    kept = drop_forgotten(
        frame, {ids[k] for k in users if k in ids}, {ids[k]: items for k, items in pairs.items() if k in ids}
    )
    dropped = len(frame) - len(kept)
    if not dropped:
        return 0
    kept = kept.reset_index(drop=True)
    manifest_path = path.with_name(SNAPSHOT_MANIFEST)
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    _replace(path, lambda target: kept.to_parquet(target, index=False))
    if manifest is not None and "content_hash" in manifest:  # a data snapshot: its hash changes, and says why
        new_hash = content_hash(kept)
        manifest["erasures"] = [
            *manifest.get("erasures", []),
            {"at": now, "rows": dropped, "from_hash": manifest["content_hash"], "to_hash": new_hash},
        ]
        manifest["content_hash"] = new_hash
        manifest["counts"] = {**manifest.get("counts", {}), **interaction_counts(kept)}
        manifest.pop("excluded", None)
        _replace(manifest_path, lambda target: target.write_text(json.dumps(manifest, indent=2)))
    return dropped


def purge_claimed(path: Path, users: set[str], pairs: dict[str, set[int]]) -> int:
    """Drop honored requests from a batch's claimed list (the only place outside the data with raw ids)."""
    entries = read_received(path)
    key_of = {entry.request.user_id: user_key(entry.request.user_id) for entry in entries}

    def honored(request) -> bool:
        key = key_of[request.user_id]
        items = set(request.item_ids or ())
        return key in users or (request.scope == "interactions" and items <= pairs.get(key, set()))

    kept = [entry for entry in entries if not honored(entry.request)]
    if len(kept) < len(entries):
        _replace(path, lambda target: write_received(target, kept))
    return len(entries) - len(kept)


def snapshot_hashes(manifest: dict) -> set[str]:
    """Every content hash this snapshot has had: the current one and those its erasures replaced."""
    return {manifest["content_hash"], *(e["from_hash"] for e in manifest.get("erasures", []))}


def _tables(root: Path):
    """Parquet tables under a root, outside DVC's own folder (its cache is addressed by content: it is cleaned
    by `dvc gc`, never rewritten)."""
    for path in sorted(root.rglob("*.parquet")):
        if ".dvc" not in path.relative_to(root).parts and not path.name.startswith("."):
            yield path


def dvc_stages(root: Path, purged: list[str]) -> list[str]:
    """The stages of a DVC workspace's dvc.yaml whose outputs hold any of these files."""
    import yaml

    stages = yaml.safe_load((root / "dvc.yaml").read_text()).get("stages", {}) if (root / "dvc.yaml").exists() else {}
    owners = []
    for name, stage in stages.items():
        outs = [next(iter(out)) if isinstance(out, dict) else out for out in stage.get("outs", [])]
        if any(Path(p).resolve().is_relative_to((root / out).resolve()) for p in purged for out in outs):
            owners.append(name)
    return owners


def dvc_collect(root: Path, purged: list[str]) -> dict:
    """Commit again the stages whose outputs hold purgeable files (their consumers, such as the base model's training,
    then show as changed: they were built from the old data), and drop every cache entry the workspace no
    longer uses, the old files' among them."""
    dvc = str(Path(sys.executable).with_name("dvc"))
    stages = dvc_stages(root, purged)
    done = {"committed": stages}
    for command in (["commit", "--force", *stages] if stages else None, ["gc", "--workspace", "--force"]):
        if command is None:
            continue
        result = subprocess.run([dvc, *command], cwd=root, capture_output=True, text=True, check=False,
                                env={**os.environ, "DVC_NO_ANALYTICS": "1"})  # fmt: skip
        if result.returncode != 0:
            reason = " ".join((result.stderr or result.stdout).split())[-400:]
            raise ErasureFailed(f"DVC workspace {root}: `dvc {' '.join(command)}` failed: {reason}")
    return done


def erase(roots: list[Path], honored: tuple[set[str], dict[str, set[int]]], dvc_roots: list[Path] = ()) -> dict:
    """Purge every honored user's and interaction's rows under `roots` (and the DVC workspaces `dvc_roots`,
    whose cache is collected afterwards). Idempotent: a second run finds nothing and changes nothing. Returns
    what it did, by file, in counts (no ids)."""
    users, pairs = honored
    now = datetime.now(UTC).isoformat()
    record = {"tables": {}, "claimed": {}, "dvc": {}}
    if not users and not pairs:
        return {**record, "rows": 0}
    seen = set()
    for root in dvc_roots:
        if not (Path(root) / ".dvc").is_dir():
            raise ErasureFailed(f"{root}: not a DVC workspace (no .dvc folder)")
    for root in [*roots, *dvc_roots]:
        root = Path(root).resolve()
        if not root.exists():
            continue
        # the snapshot last: a crash before it leaves the snapshot, which the next erasure reads again
        tables = sorted(_tables(root), key=lambda p: p.name == "interactions.parquet")
        for path in tables:
            if path in seen:
                continue
            seen.add(path)
            if dropped := purge_table(path, users, pairs, now):
                record["tables"][str(path)] = dropped
        for path in sorted(root.rglob(CLAIMED_FILE)):
            if path not in seen and ".dvc" not in path.relative_to(root).parts:
                seen.add(path)
                if dropped := purge_claimed(path, users, pairs):
                    record["claimed"][str(path)] = dropped
    for root in dvc_roots:  # every stage holding such files, purged now or not: an earlier erasure may have
        root = Path(root).resolve()  # purged them and died before DVC heard of it
        record["dvc"][str(root)] = dvc_collect(root, [str(p) for p in seen if p.is_relative_to(root)])
    record["rows"] = sum(record["tables"].values())
    return record
