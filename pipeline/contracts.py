"""Data contracts, checked with Great Expectations 1.x: one suite for deletion logs, one for splits.

The deletion-log suite runs on every file's parsed requests, after the line parser has refused what is not a
request at all (bad JSON, wrong types, missing or extra fields: pipeline.requests). It checks types and the
scope set again, item ids present exactly when the scope is interactions, request ids unique (the first one
wins), received_at not in the future, and the referential rules: the user is in the data snapshot, the items
are in that user's history. Every row an expectation flags is quarantined with that expectation's reason.
The split suite runs before any model is touched; a violation stops the batch.
Both keep GX's own validation result (JSON) for the batch's MLflow run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache

import pandas as pd

from pipeline.data import Snapshot
from pipeline.pii import pii_key, user_key
from pipeline.requests import DeletionRequest, Received, Rejection

# expectation -> (quarantine reason, what a person reads); checked in this order, the first failure names the row
REQUEST_RULES = {
    "request_id_first_use": ("duplicate_request_id", "request id {request_id!r} appears more than once"),
    "received_at": ("future_timestamp", "received_at {received_at} is later than now"),
    "user_key": ("unknown_user", "user {user} (keyed hash) is not in the data snapshot"),
    "items_in_history": ("unknown_items", "items {missing} are not in the history of user {user} (keyed hash)"),
    "scope": ("invalid_request", "scope {scope!r} is not 'user' or 'interactions'"),
    "items_match_scope": ("invalid_request", "item_ids must be given exactly when the scope is 'interactions'"),
}


class ContractViolation(ValueError):
    """Data broke a contract where no quarantine is possible (a split); the message lists what failed."""


@cache
def _context():
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False, "metric_calculations": False}
    return context, context.data_sources.add_pandas("lethe")


def _validate(name: str, frame: pd.DataFrame, expectations: list) -> dict:
    """Run a suite on a dataframe; GX's result as a JSON-able dict."""
    import great_expectations as gx

    context, source = _context()
    asset = source.add_dataframe_asset(f"{name}-{len(source.assets)}")
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": frame})
    suite = gx.ExpectationSuite(name=f"{name}-{len(source.assets)}", expectations=expectations)
    result = batch.validate(suite, result_format={"result_format": "COMPLETE", "partial_unexpected_count": 0})
    return _without_values(result.to_json_dict())


def _without_values(result: dict) -> dict:
    """GX's result minus the offending values themselves: row indices and counts stay, but nothing that
    could carry a user id goes on to the MLflow run (the ledger keeps the details)."""
    for item in result["results"]:
        for key in ("unexpected_list", "partial_unexpected_list", "partial_unexpected_counts",
                    "partial_unexpected_index_list", "unexpected_index_query"):  # fmt: skip
            item["result"].pop(key, None)
    return result


def _failures(result: dict) -> dict[str, list[int]]:
    """Column (or rule) -> indices of the rows each failed expectation flagged."""
    flagged: dict[str, list[int]] = {}
    for item in result["results"]:
        if item["success"]:
            continue
        kwargs = item["expectation_config"]["kwargs"]
        column = kwargs.get("column") or kwargs.get("column_A") or item["expectation_config"]["type"]
        flagged.setdefault(column, []).extend(item["result"].get("unexpected_index_list") or [])
    return flagged


@dataclass
class DeletionLogContract:
    """Callable check for the ledger's ingest: (parsed requests) -> (valid, quarantined); keeps GX's results."""

    snapshot: Snapshot
    clock_skew_s: float = 0.0  # a request stamped this far ahead of our clock still counts as "now"
    now: datetime | None = None  # default: the time of each check
    results: list[dict] = field(default_factory=list)
    # the ledger's honored user keys and (key -> items): erased from the snapshot, yet a repeat of such a request
    # is valid, and the claim answers it as already honored
    honored: tuple[set[str], dict[str, set[int]]] = (set(), {})

    def __post_init__(self) -> None:
        interactions = self.snapshot.interactions
        self.key = pii_key()
        honored_users, honored_items = self.honored
        known = {user_key(u, self.key) for u in interactions.user_id.unique()}
        self.users = sorted(known | honored_users | set(honored_items))
        self.histories = interactions.groupby("user_id").item_id.agg(set).to_dict()

    def frame(self, received: list[Received]) -> pd.DataFrame:
        requests = [entry.request for entry in received]
        return pd.DataFrame(
            {
                "request_id": [r.request_id for r in requests],
                "user_key": [user_key(r.user_id, self.key) for r in requests],  # GX never sees a raw id
                "scope": [r.scope for r in requests],
                "received_at": pd.to_datetime([r.received_at for r in requests], utc=True),
                "items_match_scope": [(r.scope == "interactions") == bool(r.item_ids) for r in requests],
                "items_in_history": [self._items_known(r) for r in requests],
                "request_id_first_use": ~pd.Series([r.request_id for r in requests]).duplicated(keep="first"),
            }
        )

    def _items_known(self, request: DeletionRequest) -> bool:
        if request.scope != "interactions":
            return True
        key = user_key(request.user_id, self.key)
        if key in self.honored[0]:
            return True  # the whole user was forgotten: the claim answers this as already honored
        held = self.histories.get(request.user_id, set()) | self.honored[1].get(key, set())
        return set(request.item_ids or ()) <= held

    def suite(self, now: datetime) -> list:
        import great_expectations as gx

        expect = gx.expectations
        return [
            expect.ExpectColumnToExist(column=column) for column in ("request_id", "user_key", "scope", "received_at")
        ] + [
            expect.ExpectColumnValuesToNotBeNull(column="request_id"),
            expect.ExpectColumnValuesToBeInTypeList(column="request_id", type_list=["str"]),
            expect.ExpectColumnValuesToBeInSet(column="request_id_first_use", value_set=[True]),
            expect.ExpectColumnValuesToBeInSet(column="scope", value_set=["user", "interactions"]),
            expect.ExpectColumnValuesToBeInSet(column="items_match_scope", value_set=[True]),
            expect.ExpectColumnValuesToBeBetween(
                column="received_at", max_value=pd.Timestamp(now) + pd.Timedelta(seconds=self.clock_skew_s)
            ),
            expect.ExpectColumnValuesToBeInSet(column="user_key", value_set=self.users),
            expect.ExpectColumnValuesToBeInSet(column="items_in_history", value_set=[True]),
        ]

    def __call__(self, received: list[Received]) -> tuple[list[Received], list[Rejection]]:
        if not received:
            return [], []
        frame = self.frame(received)
        result = _validate("deletion_log", frame, self.suite(self.now or datetime.now(UTC)))
        self.results.append(result)
        flagged = _failures(result)
        reasons: dict[int, str] = {}
        for rule in REQUEST_RULES:  # the first rule a row breaks names it
            for index in flagged.get(rule, []):
                reasons.setdefault(index, rule)
        unexplained = set().union(*map(set, flagged.values())) - set(reasons) if flagged else set()
        for index in unexplained:  # a type or presence check with no finer rule
            reasons[index] = "request_id"
        valid, rejected = [], []
        for index, entry in enumerate(received):
            rule = reasons.get(index)
            if rule is None:
                valid.append(entry)
                continue
            request = entry.request
            code, template = REQUEST_RULES.get(rule, ("invalid_request", "the request broke the {rule} contract"))
            known = self.histories.get(request.user_id, set())
            message = template.format(
                request_id=request.request_id,
                received_at=request.received_at.isoformat(),
                user=user_key(request.user_id, self.key),
                missing=sorted(set(request.item_ids or ()) - known)[:10],
                scope=request.scope,
                rule=rule,
            )
            rejected.append(Rejection(entry.source, entry.line, code, message, request.request_id))
        return valid, rejected


def check_split(split: pd.DataFrame, requests: list[DeletionRequest], snapshot_rows: int) -> dict:
    """The split contract: every role known; each interaction once (forget and retain disjoint on user, item
    and time); every interaction of a user-scope request forgotten when the user is a member, and no such user
    left in retain or the non-member reference; every listed interaction forgotten; rows add up to the
    snapshot. Returns GX's result; raises ContractViolation naming each failed expectation."""
    import great_expectations as gx
    from great_expectations.expectations.row_conditions import Column

    from pipeline.splits import ROLES

    whole = {r.user_id for r in requests if r.scope == "user"}
    listed = {(r.user_id, item) for r in requests if r.scope == "interactions" for item in r.item_ids}
    frame = split[["user_id", "item_id", "position", "member", "role"]].copy()
    frame["whole_user"] = frame.user_id.isin(whole)
    pairs = pd.Series(list(zip(frame.user_id, frame.item_id, strict=True)), index=frame.index)
    frame["listed"] = pairs.isin(listed)
    frame["must_forget"] = frame.member & (frame.whole_user | frame.listed)
    frame["forgotten"] = frame.role == "forget"
    expect = gx.expectations
    # Column-wise expectations only: GX checks value pairs (ExpectColumnPairValuesToBeInSet) row by row in
    # Python, 3 s for the tiny config's 31k rows and linear beyond.
    result = _validate(
        "split",
        frame,
        [
            expect.ExpectColumnValuesToBeInSet(column="role", value_set=list(ROLES)),
            expect.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "item_id", "position"]),
            # forgotten exactly when it must be: a member's row under a user-scope request, or a listed one
            expect.ExpectColumnPairValuesToBeEqual(column_A="must_forget", column_B="forgotten"),
            # a user who asked to be forgotten whole is in no reference: forgotten (member) or excluded (not)
            expect.ExpectColumnValuesToBeInSet(
                column="role",
                value_set=["forget", "excluded"],
                row_condition=Column("whole_user") == True,  # noqa: E712
            ),
            expect.ExpectTableRowCountToEqual(value=snapshot_rows),
        ],
    )
    if not result["success"]:
        failed = [
            f"{item['expectation_config']['type']}({_describe(item['expectation_config']['kwargs'])}): "
            f"{item['result'].get('unexpected_count', item['result'].get('observed_value'))} rows"
            for item in result["results"]
            if not item["success"]
        ]
        raise ContractViolation("the split broke its contract: " + "; ".join(failed))
    return result


def _describe(kwargs: dict) -> str:
    named = [f"{k}={v}" for k, v in kwargs.items() if k in ("column", "column_A", "column_B", "column_list")]
    if condition := kwargs.get("row_condition"):  # a comparison, as GX serializes it
        named.append(f"where {condition['column']['name']} {condition['operator']} {condition['parameter']}")
    return ", ".join(named)


# What a team's interaction file must hold (data.source: file). Column -> what a person reads when it breaks.
INTERACTION_COLUMNS = {"user_id": "a user id", "item_id": "an item id", "timestamp": "when the interaction happened"}
OPTIONAL_COLUMNS = ("rating", "title", "genres")


def check_interactions(frame: pd.DataFrame, source: str, min_users: int, latest: datetime) -> dict:
    """The contract of a team's own interactions, before any snapshot is cut from them: the required columns;
    ids that are integers or strings and never null; timestamps that parse (unix seconds or datetimes) and lie
    between 1970 and `latest`; ratings that are numbers; no interaction twice (user, item, time); and at least
    `min_users` users with the 3 interactions a split needs (train, validation, test). `frame` carries the
    parsed `timestamp_s` beside the raw columns. Returns GX's result; raises ContractViolation naming each
    failure and how many rows it flagged, so a broken file is a report, not a traceback."""
    import great_expectations as gx
    from great_expectations.expectations.row_conditions import Column

    expect = gx.expectations
    missing = [column for column in INTERACTION_COLUMNS if column not in frame.columns]
    if missing:
        named = ", ".join(f"{column} ({INTERACTION_COLUMNS[column]})" for column in missing)
        raise ContractViolation(
            f"{source}: the interactions lack the column(s) {named}; found {list(frame.columns)[:10]}"
        )
    suite = [expect.ExpectColumnValuesToNotBeNull(column=column) for column in ("user_id", "item_id", "timestamp")]
    suite += [
        expect.ExpectColumnValuesToBeInTypeList(column=column, type_list=["int", "str"])
        for column in ("user_id", "item_id")
    ]
    suite += [
        # a timestamp given that is neither unix seconds nor a datetime parses to nothing
        expect.ExpectColumnValuesToNotBeNull(
            column="timestamp_s", row_condition=Column("timestamp_given") == True  # noqa: E712
        ),
        expect.ExpectColumnValuesToBeBetween(column="timestamp_s", min_value=0, max_value=latest.timestamp()),
        expect.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "item_id", "timestamp_s"]),
    ]
    if "rating" in frame.columns:
        suite.append(expect.ExpectColumnValuesToBeInTypeList(column="rating", type_list=["int", "float"]))
    result = _validate("interactions", frame, suite)
    per_user = frame.groupby("user_id", dropna=True).size() if len(frame) else pd.Series(dtype=int)
    enough = int((per_user >= 3).sum())
    users = _validate(
        "interactions_per_user",
        pd.DataFrame({"users_with_3_interactions": [enough]}),
        [expect.ExpectColumnValuesToBeBetween(column="users_with_3_interactions", min_value=min_users)],
    )
    failed = [_interaction_failure(item, len(frame)) for item in result["results"] if not item["success"]]
    if not users["success"]:
        failed.append(
            f"only {enough} of {len(per_user)} users have the 3 interactions a split needs (train, validation, test); "
            f"data.min_users is {min_users}"
        )
    if len(frame) == 0:
        failed.insert(0, "the file holds no interactions")
    if failed:
        raise ContractViolation(f"{source}: the interactions broke their contract: " + "; ".join(failed))
    return {"rows": result, "users": users}


def _interaction_failure(item: dict, rows: int) -> str:
    kind, kwargs = item["expectation_config"]["type"], item["expectation_config"]["kwargs"]
    column = kwargs.get("column") or ", ".join(kwargs.get("column_list", [])).replace("timestamp_s", "timestamp")
    count = item["result"].get("unexpected_count")
    what = {
        "expect_column_values_to_not_be_null": "empty",
        "expect_column_values_to_be_in_type_list": "of a type other than " + " or ".join(kwargs.get("type_list", [])),
        "expect_column_values_to_be_between": "outside [1970, now]",
        "expect_compound_columns_to_be_unique": "in repeats (the same user, item and time more than once)",
    }.get(kind, kind)
    if column == "timestamp_s":
        column = "timestamp"
        if kind == "expect_column_values_to_not_be_null":
            what = "neither unix seconds nor a datetime"
    return f"{column}: {count} of {rows} rows {what}"
