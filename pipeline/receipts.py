"""Deletion receipts: what a team returns to the person who asked, or to a regulator, signed with its own key.

A receipt names the request by its keyed hash (never the raw id), when it was received and honored, the model
version that honors it, the gate's evidence (p-values, power, thresholds) and the ledger event it rests on (its
hash in the tamper-evident chain). It is signed with Ed25519 (the `cryptography` package) over its canonical
JSON. Verification checks the signature against the team's public key and then the ledger: the event exists,
honors this request with this version and this evidence, and the chain up to now is intact.

The private key lives outside params and manifests: a PEM file named by LETHE_RECEIPT_KEY_FILE (a mounted
Secret in a cluster); `lethe receipt keygen` writes a pair.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import os
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pipeline.ledger import Ledger
from pipeline.pii import pii_key

KEY_VARIABLE = "LETHE_RECEIPT_KEY_FILE"
KIND = "lethe.deletion-receipt"


class ReceiptError(ValueError):
    """A receipt that cannot be issued or does not verify; the message says why."""


def request_hash(request_key: str) -> str:
    return hmac.new(pii_key(), request_key.encode(), hashlib.sha256).hexdigest()[:32]


def canonical(payload: dict) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def generate_keys(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    secret, public = folder / "receipt_key.pem", folder / "receipt_key.pub.pem"
    secret.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    secret.chmod(0o600)
    public.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return secret, public


def private_key() -> Ed25519PrivateKey:
    path = os.environ.get(KEY_VARIABLE)
    if not path:
        raise ReceiptError(f"{KEY_VARIABLE} is not set: name the team's Ed25519 key file (`lethe receipt keygen`)")
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as error:
        raise ReceiptError(f"{KEY_VARIABLE}={path}: not a readable PEM private key ({error})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ReceiptError(f"{KEY_VARIABLE}={path}: an Ed25519 key is needed, not {type(key).__name__}")
    return key


def load_public_key(path: Path | None) -> Ed25519PublicKey:
    if path is None:
        return private_key().public_key()
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as error:
        raise ReceiptError(f"{path}: not a readable PEM public key ({error})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ReceiptError(f"{path}: an Ed25519 public key is needed")
    return key


def fingerprint(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _honoring(ledger: Ledger, request_id: str) -> tuple[dict, dict, dict]:
    """The request's ledger row, its honoring event, and the event whose evidence answers it (the original's,
    for a repeat answered as already honored)."""
    history = ledger.history(request_id)
    if history is None:
        raise ReceiptError(f"no request {request_id!r} in the ledger")
    row = next((entry for entry in history["entries"] if entry["key"] == request_id), history["entries"][0])
    if row["state"] != "honored":
        raise ReceiptError(f"request {request_id!r} is {row['state']}, not honored: there is nothing to certify yet")
    event = ledger.honoring_event(row["key"])
    source = event
    if event["evidence"] is None and row.get("original_key"):
        source = ledger.honoring_event(row["original_key"])
    return row, event, source


def issue(ledger: Ledger, request_id: str, registered_model: str) -> dict:
    key = private_key()
    row, event, source = _honoring(ledger, request_id)
    payload = {
        "kind": KIND,
        "version": 1,
        "issued_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "request": {
            "hashed_id": request_hash(row["key"]),
            "scope": row["scope"],
            "received_at": row["received_at"],
            "honored_at": event["at"],
            "answered_as": event["reason"] or "unlearned",
            "answered_by": request_hash(row["original_key"]) if row.get("original_key") else None,
        },
        "model": {"registered_model": registered_model, "version": event["model_version"]},
        "evidence": source["evidence"],
        "ledger": {"event_hash": event["hash"], "prev_hash": event["prev_hash"]},
        "public_key_sha256": fingerprint(key.public_key()),
    }
    signature = key.sign(canonical(payload))
    return {"payload": payload, "signature": base64.b64encode(signature).decode()}


def verify(receipt: dict, ledger: Ledger, public_key: Ed25519PublicKey) -> dict:
    """Raises ReceiptError naming the first check that fails; returns what was checked."""
    try:
        payload, signature = receipt["payload"], base64.b64decode(receipt["signature"], validate=True)
    except (KeyError, TypeError, ValueError) as error:
        raise ReceiptError(f"not a Lethe receipt: {error}") from None
    if payload.get("public_key_sha256") != fingerprint(public_key):
        raise ReceiptError("signed with another key than the one given (public key fingerprints differ)")
    try:
        public_key.verify(signature, canonical(payload))
    except InvalidSignature:
        raise ReceiptError("the signature does not match the receipt's content: it was altered or not ours") from None
    event = ledger.event_with_hash(payload["ledger"]["event_hash"])
    if event is None:
        raise ReceiptError("the ledger holds no event with the receipt's hash")
    if event["to_state"] != "honored" or request_hash(event["request_key"]) != payload["request"]["hashed_id"]:
        raise ReceiptError("the ledger event does not honor this request")
    if event["model_version"] != payload["model"]["version"]:
        raise ReceiptError("the ledger names another model version")
    chain = ledger.verify()
    if not chain["ok"]:
        raise ReceiptError(
            f"the ledger's chain is broken: {chain['first_broken_event'] or chain['first_inconsistent_request']}"
        )
    return {"signature": "valid", "ledger_event": event["id"], "chain_events": chain["events_checked"]}


def render_html(receipt: dict) -> str:
    payload = receipt["payload"]
    request, model = payload["request"], payload["model"]
    tests = (payload.get("evidence") or {}).get("tests", {})
    rows = "".join(
        f"<tr><td>{html.escape(a)}</td><td>{t.get('p_value')}</td><td>{t.get('p_holm')}</td>"
        f"<td>{t.get('auc')}</td><td>{t.get('mde')}</td><td>{t.get('n_forgotten')} / {t.get('n_reference')}</td></tr>"
        for a, t in tests.items()
    )
    gate = (payload.get("evidence") or {}).get("gate", {})
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Deletion receipt</title></head><body>"
        f"<h1>Deletion receipt</h1><p>Request {html.escape(request['hashed_id'])} "
        f"({html.escape(str(request['scope']))}),"
        f" received {html.escape(str(request['received_at']))}, honored {html.escape(str(request['honored_at']))} "
        f"by {html.escape(model['registered_model'])} version {html.escape(str(model['version']))}.</p>"
        f"<h2>Evidence</h2><p>Gate: alpha {gate.get('alpha')}, power {gate.get('power')}, NDCG margin "
        f"{gate.get('max_ndcg_drop')}.</p><table><tr><th>attack</th><th>p</th><th>p (Holm)</th><th>AUC</th>"
        f"<th>detects AUC from</th><th>n forgotten / reference</th></tr>{rows}</table>"
        f"<p>Ledger event {html.escape(payload['ledger']['event_hash'])}; signed with key "
        f"{html.escape(payload['public_key_sha256'])} (Ed25519). The JSON file is the signed original.</p>"
        "</body></html>"
    )
