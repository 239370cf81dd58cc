"""`lethe audit`: every honored request's evidence combined into one cumulative test, and the auditor's report.

Each request honored by an unlearned model keeps, in its ledger event, its own user's item_rank z (that user's
positions ranked among strangers' on the same items, standardised by the null spread with the design effect:
N(0, 1) when the user is indistinguishable from strangers). Across requests these are independent under H0, so
Stouffer's Z = sum(z) / sqrt(n) is one test over every night, whose power grows with every request: its minimum
detectable mean shift is (z_{1-alpha/2} + z_power) / sqrt(n) in units of one request's noise.

The report (HTML, self-contained: plots inlined) holds the per-night p-values and power, histograms of
forgotten users against strangers, utility before and after with intervals, the circuits per layer, the gate's
thresholds and decisions, and the request table by hashed id and state. It is logged to MLflow.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from scipy import stats

from components._common import context, entry_point, open_ledger, parser
from pipeline.leakage import norm_quantile, upper_quantile
from pipeline.receipts import request_hash
from pipeline.registry import Registry


def cumulative_test(events: list[dict], alpha: float, power: float) -> dict:
    """Stouffer's combination of the honored requests' own z (those with one)."""
    z = [e["evidence"]["user"]["z"] for e in events if (e["evidence"].get("user") or {}).get("z") is not None]
    if not z:
        return {"requests": 0, "z": None, "p_value": None, "mde_z": None, "leak": None}
    combined = sum(z) / math.sqrt(len(z))
    p = float(2 * stats.norm.sf(abs(combined)))
    return {
        "requests": len(z),
        "z": combined,
        "p_value": p,
        "mde_z": (upper_quantile(alpha / 2) + norm_quantile(power)) / math.sqrt(len(z)),
        "leak": p <= alpha,
    }


def nights(events: list[dict], home) -> list[dict]:
    """One entry per batch: its decision, per-attack p-values and power, utility, and the manifests' figures."""
    out = {}
    for event in events:
        batch = event["batch_id"]
        if batch in out:
            out[batch]["requests"] += 1
            continue
        evidence = event["evidence"]
        folder = home.batch(batch)
        evaluation = json.loads((folder / "evaluate.json").read_text()) if (folder / "evaluate.json").exists() else {}
        gate = json.loads((folder / "gate.json").read_text()) if (folder / "gate.json").exists() else {}
        out[batch] = {
            "batch_id": batch,
            "honored_at": event["at"],
            "model_version": event["model_version"],
            "requests": 1,
            "tests": evidence.get("tests", {}),
            "thresholds": evidence.get("gate", {}),
            "utility": evidence.get("utility", {}),
            "gate": gate.get("gate"),
            "reasons": gate.get("reasons", []),
            "ndcg10_before": (evaluation.get("before") or {}).get("ndcg10_interval"),
            "ndcg10_after": (evaluation.get("after") or {}).get("ndcg10_interval"),
            "scores": (evaluation.get("after") or {}).get("scores", {}).get("item_rank"),
        }
    return list(out.values())


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def plots(entries: list[dict], circuits: dict | None) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = {}
    with_scores = [e for e in entries if e["scores"]]
    if with_scores:
        figure, axes = plt.subplots(1, len(with_scores), figsize=(4 * len(with_scores), 3), squeeze=False)
        for axis, entry in zip(axes[0], with_scores, strict=True):
            axis.hist(entry["scores"]["reference"], bins=20, alpha=0.6, density=True, label="strangers")
            axis.hist(entry["scores"]["forgotten"], bins=10, alpha=0.6, density=True, label="forgotten")
            axis.set(title=entry["batch_id"], xlabel="mean item_rank percentile")
            axis.legend(fontsize=7)
        figure.tight_layout()
        images["histograms"] = _png(figure)
        plt.close(figure)
    figure, axis = plt.subplots(figsize=(6, 3))
    for attack in sorted({a for e in entries for a in e["tests"]}):
        values = [e["tests"].get(attack, {}).get("p_value") for e in entries]
        axis.plot(range(len(entries)), [v if v is not None else float("nan") for v in values], marker="o", label=attack)
    axis.set(yscale="log", xlabel="night", ylabel="p-value (raw)", title="per-night leakage tests")
    axis.set_xticks(range(len(entries)), [e["batch_id"] for e in entries], rotation=30, fontsize=7)
    axis.legend(fontsize=7)
    figure.tight_layout()
    images["p_values"] = _png(figure)
    plt.close(figure)
    if circuits:
        sites = sorted({site for counts in circuits.values() for site in counts})
        figure, axis = plt.subplots(figsize=(7, 3))
        bottom = [0] * len(sites)
        for group, counts in circuits.items():
            heights = [counts.get(site, 0) for site in sites]
            axis.bar(sites, heights, bottom=bottom, label=group)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        axis.set(ylabel="units", title="circuits per layer (current extraction)")
        axis.tick_params(axis="x", labelsize=7, rotation=30)
        axis.legend(fontsize=7)
        figure.tight_layout()
        images["circuits"] = _png(figure)
        plt.close(figure)
    return images


def render(record: dict, images: dict[str, str]) -> str:
    esc = html.escape

    def number(value, digits=3) -> str:
        return "-" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else esc(str(value))

    def interval(entry) -> str:
        return "-" if not entry else f"{entry['value']:.4f} [{entry['low']:.4f}, {entry['high']:.4f}]"

    cumulative = record["cumulative"]
    night_rows = "".join(
        f"<tr><td>{esc(n['batch_id'])}</td><td>{esc(str(n['model_version']))}</td><td>{n['requests']}</td>"
        f"<td>{esc(str(n['gate']))}</td><td>"
        + "<br>".join(
            f"{esc(a)}: p={number(t.get('p_value'))}, Holm {number(t.get('p_holm'))}, n={t.get('n_forgotten')}, "
            f"detects AUC from {number(t.get('mde'))}"
            for a, t in n["tests"].items()
        )
        + f"</td><td>{interval(n['ndcg10_before'])}</td><td>{interval(n['ndcg10_after'])}</td>"
        f"<td>{number((n['utility'] or {}).get('lower_bound'))}</td>"
        f"<td>alpha {n['thresholds'].get('alpha')}, power {n['thresholds'].get('power')}, "
        f"margin {n['thresholds'].get('max_ndcg_drop')}</td></tr>"
        for n in record["nights"]
    )
    request_rows = "".join(
        f"<tr><td>{esc(r['hashed_id'])}</td><td>{esc(r['state'])}</td><td>{esc(str(r['model_version']))}</td>"
        f"<td>{esc(str(r['batch_id']))}</td><td>{number(r['z'])}</td></tr>"
        for r in record["requests"]
    )
    figures = "".join(
        f"<figure><img src='{src}' alt='{esc(name)}'><figcaption>{esc(name)}</figcaption></figure>"
        for name, src in images.items()
    )
    verdict = (
        "no requests with evidence in this window"
        if cumulative["z"] is None
        else f"Z = {cumulative['z']:.3f}, p = {cumulative['p_value']:.3g} over {cumulative['requests']} requests; "
        f"detects a mean shift of {cumulative['mde_z']:.3f} per request at power {record['power']}: "
        + ("<b>leakage detected</b>" if cumulative["leak"] else "no leakage detected")
    )
    chain = record["ledger_chain"]
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Lethe audit</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #999;"
        "padding:3px 6px;font-size:13px;vertical-align:top}img{max-width:100%}</style></head><body>"
        f"<h1>Lethe audit</h1><p>Written {esc(record['written_at'])}; window since {esc(str(record['since']))}"
        f"{'; request ' + esc(record['request']) if record['request'] else ''}.</p>"
        f"<h2>Cumulative test (Stouffer over honored requests)</h2><p>{verdict}</p>"
        f"<p>Ledger chain: {'intact' if chain['ok'] else 'BROKEN: ' + esc(json.dumps(chain))}, "
        f"{chain['events_checked']} events checked.</p>"
        "<h2>Nights</h2><table><tr><th>batch</th><th>model version</th><th>requests</th><th>gate</th>"
        "<th>leakage tests (power)</th><th>NDCG@10 before</th><th>NDCG@10 after</th><th>utility lower bound</th>"
        f"<th>thresholds</th></tr>{night_rows}</table>"
        f"<h2>Plots</h2>{figures}"
        "<h2>Requests</h2><table><tr><th>hashed id</th><th>state</th><th>model version</th><th>batch</th>"
        f"<th>own z</th></tr>{request_rows}</table></body></html>"
    )


def main(argv: list[str] | None = None) -> dict:
    cli = parser("audit", __doc__)
    cli.add_argument("--since", default=None, help="only requests honored from this date (YYYY-MM-DD, UTC)")
    cli.add_argument("--request", default=None, help="only this request")
    cli.add_argument("--out", type=Path, default=None, help="report folder (default: $LETHE_HOME/audit)")
    args = cli.parse_args(argv)
    settings, home = context(args)
    since = datetime.fromisoformat(args.since).replace(tzinfo=UTC) if args.since else None
    ledger = open_ledger(settings, home)
    events = ledger.honored_evidence(since)
    if args.request:
        events = [e for e in events if e["request_key"] == args.request]
        if not events:
            raise ValueError(f"no honored request {args.request!r} with evidence in the ledger")
    alpha, power = settings.gate.alpha, settings.gate.power
    circuits_file = home.circuits / "circuits.json"
    circuits = json.loads(circuits_file.read_text()).get("sizes_by_site") if circuits_file.exists() else None
    record = {
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "since": args.since,
        "request": args.request,
        "power": power,
        "cumulative": cumulative_test(events, alpha, power),
        "nights": nights(events, home),
        "requests": [
            {
                "hashed_id": request_hash(e["request_key"]),
                "state": "honored",
                "model_version": e["model_version"],
                "batch_id": e["batch_id"],
                "z": (e["evidence"].get("user") or {}).get("z"),
            }
            for e in events
        ],
        "ledger_chain": ledger.verify(),
    }
    out = args.out or home.root / "audit"
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps({k: v for k, v in record.items()}, indent=2, default=str))
    (out / "audit.html").write_text(render(record, plots(record["nights"], circuits)))
    Registry(home, settings.mlflow)
    with mlflow.start_run(run_name="audit"):
        mlflow.log_artifact(str(out / "audit.html"), artifact_path="audit")
        mlflow.log_artifact(str(out / "audit.json"), artifact_path="audit")
        if record["cumulative"]["z"] is not None:
            mlflow.log_metrics({"audit.z": record["cumulative"]["z"], "audit.p_value": record["cumulative"]["p_value"]})
    print(json.dumps({"out": str(out), **record["cumulative"], "nights": len(record["nights"])}))
    return record


if __name__ == "__main__":
    entry_point("audit", main)
