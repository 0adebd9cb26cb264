"""``bq:PROJECT.DATASET.TABLE``: one row per record in a BigQuery table.

**Insert method: ``tabledata.insertAll`` (the REST streaming API) with an ``insertId``
per row, not the Storage Write API.** The Write API's committed streams give exactly-once
appends: a retried ``AppendRows`` at an offset already written is refused. But that
protects one writer's stream against its own retries, which is also what ``insertId``
does here (best effort, for about a minute): an insertAll whose answer was lost is sent
again with the same ids and BigQuery drops the copies. Neither covers what actually
duplicates records in this worker: a job redelivered by Pub/Sub (an ack that failed, a
lease that lapsed) is described again, often by another replica, minutes later, and
would be appended to that replica's stream at a new offset. So readers deduplicate by
``id`` either way (``QUALIFY ROW_NUMBER() OVER (PARTITION BY id ORDER BY finished_at
DESC) = 1``). Committed streams would also cost per-writer state: a stream per replica,
created at start, its next offset kept in step with every append, finalised (or left to
expire) on shutdown, and nothing to carry across a restart. And the Write API speaks
gRPC with protobuf rows (grpcio, protobuf and google-cloud-bigquery-storage: large
native wheels) where insertAll is one JSON POST on the aiohttp this worker already uses.
insertAll's costs: it is priced higher per GB, and its dedup is best effort.

Rows: :data:`TABLE_SCHEMA` is the table ``prepare`` creates (with ``create_table``):
partitioned by day on ``finished_at``, clustered by ``status``. :func:`record_row` turns
a record into a row: known fields only (a record may carry fields the table lacks), JSON
columns sent as JSON text, timestamps as the records' RFC 3339 strings. An existing
table is used as it is; columns of ours it lacks are left out of rows (and logged once).

Writes: rows go in requests of at most ``max_rows_per_request`` rows and ~9 MB, each with
``skipInvalidRows`` so one bad row cannot hold the others back. A row BigQuery refuses as
``invalid`` comes back as a :class:`~worker.protocols.Rejection` (the job is dead-lettered
as ``sink_rejected``); rows that failed for any other reason (``backendError``,
``timeout``, ``stopped``...) are sent again, without the rows already stored, under the
same insertIds (see :func:`insert_id`). Failed requests
(5xx, 429, rate-limit 403s, resets, timeouts) are retried by :func:`worker.retry.retry_call`
within ``retry_deadline_s``; then ``write`` raises and the batch's jobs are handed back.

Endpoint: ``https://bigquery.googleapis.com/bigquery/v2`` with the process's Google token;
with ``BIGQUERY_EMULATOR_HOST`` (``host:port`` or a URL) the emulator, with no credentials.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from ..errors import BigQueryError, ConfigError, Kind
from ..protocols import Record, Rejection, SinkBase, TokenProvider
from ..retry import RetryPolicy, RetryState, kind_for_status, retry_after_s, retry_call
from ..settings import BigQuerySinkSettings

__all__ = [
    "BIGQUERY_URL",
    "COLUMNS",
    "TABLE_SCHEMA",
    "BigQuerySink",
    "TableRef",
    "bigquery_endpoint",
    "insert_id",
    "parse_table",
    "record_row",
]

log = logging.getLogger("worker.bigquery")

BIGQUERY_URL = "https://bigquery.googleapis.com/bigquery/v2"


def _col(name: str, type_: str, description: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": type_, "mode": "NULLABLE", "description": description, **extra}


#: The table ``prepare`` creates: one row per job, as the records of :mod:`worker.jobs`
#: (result records: ``status`` "ok"; dead letters: ``status`` "error" with ``error`` and
#: ``input``). In tables.insert's JSON shape.
TABLE_SCHEMA: list[dict[str, Any]] = [
    _col("id", "STRING", "The job's id (a job that ran twice has two rows)", mode="REQUIRED"),
    _col("image_uri", "STRING", "The image described (signed URLs without their signature)"),
    _col("status", "STRING", "ok, or error for a dead letter"),
    _col("description", "STRING", "The model's description of the image"),
    _col("output", "JSON", "Structured output, when the job asked for it"),
    _col("model", "STRING", "The model that answered"),
    _col("endpoint", "STRING", "The endpoint that answered"),
    _col("tier", "STRING", "The endpoint's tier"),
    _col(
        "usage",
        "RECORD",
        "Tokens the model counted",
        fields=[
            {"name": "prompt_tokens", "type": "INT64", "mode": "NULLABLE"},
            {"name": "completion_tokens", "type": "INT64", "mode": "NULLABLE"},
            {"name": "total_tokens", "type": "INT64", "mode": "NULLABLE"},
        ],
    ),
    _col("cost_usd", "FLOAT64", "Estimated cost of the model call, in US dollars"),
    _col("attempts", "INT64", "Model calls made for the job"),
    _col("latency_s", "FLOAT64", "Seconds from the job's start to its record"),
    _col("finished_at", "TIMESTAMP", "When the record was made (partitioning column)"),
    _col("cached", "BOOL", "True when the answer came from the result store"),
    _col("source", "JSON", "Where the job came from (e.g. the Pub/Sub message id)"),
    _col(
        "error",
        "RECORD",
        "Why a dead letter failed",
        fields=[
            {"name": "type", "type": "STRING", "mode": "NULLABLE"},
            {"name": "message", "type": "STRING", "mode": "NULLABLE"},
        ],
    ),
    _col("input", "STRING", "A dead letter's job as received (at most 4 KB)"),
]

_JSON_COLUMNS = frozenset(c["name"] for c in TABLE_SCHEMA if c["type"] == "JSON")
_SUBFIELDS: dict[str, tuple[str, ...]] = {
    c["name"]: tuple(f["name"] for f in c["fields"]) for c in TABLE_SCHEMA if "fields" in c
}
COLUMNS: tuple[str, ...] = tuple(c["name"] for c in TABLE_SCHEMA)
_KNOWN = frozenset(COLUMNS)

# insertAll refuses requests over 10 MB; leave room for headers and our own JSON.
MAX_REQUEST_BYTES = 9_000_000
# BigQuery's limit on an insertId's length; longer job ids are hashed.
MAX_INSERT_ID_CHARS = 128
# Per-row reasons that say the row itself is bad. Anything else (backendError, timeout,
# stopped, internalError) is about this attempt, and the row is sent again.
_INVALID_ROW_REASONS = frozenset({"invalid"})
# Reasons that make a 403 (or any status) worth another try: BigQuery reports rate
# limits as 403 rateLimitExceeded / quotaExceeded, and some 5xx-like failures by reason.
_RATE_LIMIT_REASONS = frozenset({"rateLimitExceeded", "quotaExceeded"})
_TRANSIENT_REASONS = frozenset({"backendError", "internalError"})
_MAX_REASON_CHARS = 300

_PROJECT = re.compile(r"(?:[a-z][a-z0-9.-]*[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]")
_DATASET = re.compile(r"\w{1,1024}")
_TABLE = re.compile(r"[\w-]{1,1024}")


@dataclass(frozen=True, slots=True)
class TableRef:
    project: str
    dataset: str
    table: str

    def __str__(self) -> str:
        return f"{self.project}.{self.dataset}.{self.table}"

    @property
    def dataset_path(self) -> str:
        return f"projects/{quote(self.project, safe=':')}/datasets/{quote(self.dataset, safe='')}"

    @property
    def table_path(self) -> str:
        return f"{self.dataset_path}/tables/{quote(self.table, safe='')}"


def parse_table(spec: str, key: str = "worker.sink") -> TableRef:
    """``bq:PROJECT.DATASET.TABLE`` (the ``bq:`` prefix optional) as a :class:`TableRef`.
    A domain-scoped project (``example.com:proj``) may contain dots; the last two dots
    separate the dataset and the table."""
    rest = spec.removeprefix("bq:")
    usage = "use bq:PROJECT.DATASET.TABLE (bq:my-project.results.descriptions)"
    parts = rest.rsplit(".", 2)
    if len(parts) != 3 or not all(parts):
        raise ConfigError(key, f"{spec!r} is not a table; {usage}")
    project, dataset, table = parts
    if not _PROJECT.fullmatch(project):
        raise ConfigError(
            key,
            f"{project!r} is not a project id (6-30 lowercase letters, digits and "
            f"hyphens, starting with a letter); {usage}",
        )
    if not _DATASET.fullmatch(dataset):
        raise ConfigError(
            key, f"{dataset!r} is not a dataset id (letters, digits, underscores); {usage}"
        )
    if not _TABLE.fullmatch(table):
        raise ConfigError(
            key,
            f"{table!r} is not a table id (letters, digits, underscores, dashes); {usage}",
        )
    return TableRef(project, dataset, table)


def bigquery_endpoint(env: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """The BigQuery REST root and whether it is an emulator. Like Google's clients,
    ``BIGQUERY_EMULATOR_HOST`` may be ``host:port`` (http assumed) or a full URL."""
    value = (os.environ if env is None else env).get("BIGQUERY_EMULATOR_HOST", "").strip()
    if not value:
        return BIGQUERY_URL, False
    if "://" not in value:
        value = "http://" + value
    value = value.rstrip("/")
    if not value.endswith("/bigquery/v2"):
        value += "/bigquery/v2"
    return value, True


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def record_row(record: Record, columns: Collection[str] | None = None) -> dict[str, Any]:
    """The row for ``record``: the fields :data:`TABLE_SCHEMA` knows (and ``columns``, the
    table's, has), None left out; ``output`` and ``source`` as JSON text (what insertAll
    takes for JSON columns); ``usage`` and ``error`` with their known subfields only.
    Raises ValueError for a value JSON cannot hold (NaN, infinity)."""
    row: dict[str, Any] = {}
    for name, value in record.items():
        if value is None or name not in _KNOWN or (columns is not None and name not in columns):
            continue
        if name in _JSON_COLUMNS:
            value = _json_text(value)
        elif name in _SUBFIELDS and isinstance(value, dict):
            value = {k: value[k] for k in _SUBFIELDS[name] if value.get(k) is not None}
        row[name] = value
    return row


def insert_id(record: Record) -> str:
    """The row's insertId: the record's id, so that a request sent again is deduplicated.
    A dead letter's gets ``#error``: when a result row is refused and its dead letter goes
    to the same table, the dead letter must not look like a copy of the refused row. Ids
    longer than BigQuery allows are hashed (the same id, the same hash)."""
    rid = str(record.get("id"))
    if record.get("status", "ok") != "ok":
        rid = f"{rid}#{record.get('status')}"
    if len(rid) <= MAX_INSERT_ID_CHARS:
        return rid
    return "sha256:" + hashlib.sha256(rid.encode("utf-8", "surrogatepass")).hexdigest()


_INSERT_HEAD = b'{"skipInvalidRows":true,"rows":['
_INSERT_TAIL = b"]}"


def _chunks(
    rows: Sequence[tuple[int, bytes]], *, max_rows: int, max_bytes: int
) -> Iterator[list[tuple[int, bytes]]]:
    chunk: list[tuple[int, bytes]] = []
    size = len(_INSERT_HEAD) + len(_INSERT_TAIL)
    for row in rows:
        n = len(row[1]) + 1
        if chunk and (len(chunk) >= max_rows or size + n > max_bytes):
            yield chunk
            chunk, size = [], len(_INSERT_HEAD) + len(_INSERT_TAIL)
        chunk.append(row)
        size += n
    if chunk:
        yield chunk


def _error_of(raw: bytes) -> tuple[str, str]:
    """Google's ``{"error": {"errors": [{"reason"}], "status", "message"}}``: the first
    reason (else the status) and the message; short and secret-free."""
    try:
        body = json.loads(raw)
    except ValueError:
        return "UNKNOWN", raw[:200].decode("utf-8", "replace")
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return "UNKNOWN", raw[:200].decode("utf-8", "replace")
    reasons = [e.get("reason") for e in err.get("errors") or () if isinstance(e, dict)]
    code = next((str(r) for r in reasons if r), None) or str(err.get("status") or "UNKNOWN")
    return code, str(err.get("message") or "")[:500]


def _row_reason(errors: list[dict[str, Any]]) -> str:
    """What BigQuery said about a refused row, short: ``invalid (location): message``."""
    first = next((e for e in errors if e.get("reason") in _INVALID_ROW_REASONS), errors[0])
    text = str(first.get("reason") or "invalid")
    if first.get("location"):
        text += f" ({first['location']})"
    if first.get("message"):
        text += f": {first['message']}"
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."


class BigQuerySink(SinkBase):
    """Streams records into one BigQuery table (see the module's docstring).

    Built before the process's token provider starts: :meth:`set_tokens` hands it over
    (only Google credentials are ever sent, and none to an emulator).
    """

    # A write is a round trip that batches do not share; several at once keep rows
    # flowing while one waits. Row order does not matter in a table.
    max_concurrent_writes = 4

    def __init__(
        self,
        spec: str,
        *,
        settings: BigQuerySinkSettings,
        tokens: TokenProvider | None = None,
        key: str = "worker.sink",
    ) -> None:
        self.table = parse_table(spec, key)
        self.name = f"bq:{self.table}"
        self.settings = settings
        self.base_url, self.emulator = bigquery_endpoint()
        self._key = key
        self._tokens: TokenProvider | None = None
        if tokens is not None:
            self.set_tokens(tokens)
        #: How each call is retried (tests may swap in a faster one).
        self.retry = RetryPolicy(
            attempts=None,
            deadline_s=settings.retry_deadline_s,
            initial_backoff_s=0.2,
            max_backoff_s=10.0,
        )
        self._session: aiohttp.ClientSession | None = None
        # The table's columns, known once prepare() has read (or created) it.
        self._columns: frozenset[str] | None = None
        self._created = False
        #: Calls made, by name; retries; rows stored and refused. For tests and summaries.
        self.requests: dict[str, int] = {}
        self.retries = 0
        self.rows_inserted = 0
        self.rows_rejected = 0

    def __repr__(self) -> str:
        return f"BigQuerySink({self.name!r}, base_url={self.base_url!r})"

    def set_tokens(self, tokens: TokenProvider) -> None:
        """Use the process's token provider if it holds Google credentials (a third-party
        API key is never sent to Google); an emulator gets no credentials at all."""
        if not self.emulator and tokens.google:
            self._tokens = tokens

    # -- plumbing ------------------------------------------------------------------------

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=16),
                timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout_s),
                raise_for_status=False,
            )
        return self._session

    async def _once(self, call: str, method: str, path: str, body: bytes | None) -> dict[str, Any]:
        self.requests[call] = self.requests.get(call, 0) + 1
        headers = {"Content-Type": "application/json"} if body is not None else {}
        token = ""
        if not self.emulator:
            if self._tokens is None:
                raise BigQueryError(
                    0, "UNAUTHENTICATED", "no Google credentials for BigQuery", kind="permanent"
                )
            token = await self._tokens.token()
            if token:
                headers["Authorization"] = f"Bearer {token}"
        try:
            async with self._get_session().request(
                method, f"{self.base_url}/{path}", data=body, headers=headers
            ) as resp:
                raw = await resp.read()
                status = resp.status
                hinted = retry_after_s(resp.headers)
        except TimeoutError:
            raise BigQueryError(0, "timeout", "no answer in time", kind="transient") from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise BigQueryError(
                0, "connection_error", type(exc).__name__, kind="transient"
            ) from None
        if 200 <= status < 300:
            try:
                answer = json.loads(raw) if raw.strip() else {}
            except ValueError:
                answer = None
            if not isinstance(answer, dict):
                raise BigQueryError(status, "bad_answer", "not a JSON object", kind="transient")
            return answer
        code, message = _error_of(raw)
        kind: Kind = kind_for_status(status)
        if code in _RATE_LIMIT_REASONS:
            kind = "rate_limited"
        elif code in _TRANSIENT_REASONS:
            kind = "transient"
        elif status == 404 and call == "insertAll" and self._created:
            # Streaming into a table created moments ago can briefly answer notFound.
            kind = "transient"
        if kind == "unauthorized" and self._tokens is not None and token:
            await self._tokens.refresh_after_rejection(token)
        raise BigQueryError(status, code, message, kind=kind, retry_after_s=hinted)

    def _note_retry(self, exc: BaseException, kind: Kind, delay: float, state: RetryState) -> None:
        self.retries += 1
        log.debug(
            "bigquery_retry_scheduled",
            extra={
                "sink": self.name,
                "error": str(exc),
                "attempt": state.attempts,
                "delay_s": round(delay, 3),
            },
        )

    async def _call(
        self, call: str, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        return await retry_call(
            lambda: self._once(call, method, path, data), self.retry, on_retry=self._note_retry
        )

    # -- the table -------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Read the table; create it if it is missing and ``create_table`` is set. What
        the operator must fix (no credentials, no dataset, no table, no permission) is a
        :class:`~worker.errors.ConfigError`."""
        if self._columns is not None:
            return
        if not self.emulator and self._tokens is None:
            raise ConfigError(
                self._key,
                f'{self.name} needs Google credentials (model.auth = "google", from '
                "Application Default Credentials); set BIGQUERY_EMULATOR_HOST for an emulator",
            )
        try:
            table = await self._call("tables.get", "GET", self.table.table_path)
        except BigQueryError as exc:
            if exc.status != 404:
                raise self._config_error(
                    f"read table {self.table}", exc, "bigquery.tables.get"
                ) from None
            table = await self._create_missing_table()
        self._use_table(table)

    async def _create_missing_table(self) -> dict[str, Any]:
        ref = self.table
        dataset = f"{ref.project}.{ref.dataset}"
        try:
            await self._call("datasets.get", "GET", ref.dataset_path)
        except BigQueryError as exc:
            if exc.status == 404:
                raise ConfigError(
                    self._key,
                    f"dataset {dataset} does not exist; create it (bq mk --dataset "
                    f"{ref.project}:{ref.dataset}): the worker creates tables, not datasets",
                ) from None
            raise self._config_error(
                f"read dataset {dataset}", exc, "bigquery.datasets.get"
            ) from None
        if not self.settings.create_table:
            raise ConfigError(
                self._key,
                f"table {ref} does not exist; create it, or pass --bq-create-table "
                "(sinks.bigquery.create_table = true) and the worker creates it",
            )
        resource = {
            "tableReference": {
                "projectId": ref.project,
                "datasetId": ref.dataset,
                "tableId": ref.table,
            },
            "description": "image-describer-worker records: one row per job",
            "schema": {"fields": TABLE_SCHEMA},
            "timePartitioning": {"type": "DAY", "field": "finished_at"},
            "clustering": {"fields": ["status"]},
        }
        try:
            table = await self._call(
                "tables.insert", "POST", f"{ref.dataset_path}/tables", resource
            )
        except BigQueryError as exc:
            if exc.status != 409:
                raise self._config_error(
                    f"create table {ref}", exc, "bigquery.tables.create"
                ) from None
            # Another replica created it first.
            return await self._call("tables.get", "GET", ref.table_path)
        self._created = True
        log.info("bigquery_table_created", extra={"sink": self.name})
        return table

    def _use_table(self, table: dict[str, Any]) -> None:
        fields = (table.get("schema") or {}).get("fields") or []
        columns = frozenset(str(f.get("name")) for f in fields if isinstance(f, dict))
        if "id" not in columns:
            raise ConfigError(
                self._key, f"table {self.table} has no id column; it cannot hold records"
            )
        missing = [c for c in COLUMNS if c not in columns]
        if missing:
            log.warning(
                "bigquery_table_lacks_columns",
                extra={"sink": self.name, "columns": missing},
            )
        self._columns = columns & _KNOWN

    def _config_error(self, action: str, exc: BigQueryError, permission: str) -> ConfigError:
        if exc.status == 403:
            return ConfigError(
                self._key,
                f"cannot {action}: permission denied ({exc.message}); the "
                f"worker's account needs {permission} (roles/bigquery.dataEditor on the "
                "dataset grants it)",
            )
        return ConfigError(self._key, f"cannot {action}: {exc}")

    # -- rows ------------------------------------------------------------------------------

    async def write(self, records: Sequence[Record]) -> list[Rejection]:
        """Insert every record; return only when each row is stored or refused for good
        (the refusals are returned). Raise when the retry budget runs out: some rows of
        the batch may then be stored already, and the retry of its jobs may add them
        again (BigQuery drops such copies, best effort, for about a minute)."""
        if self._columns is None:
            await self.prepare()
        rejections: list[Rejection] = []
        encoded: list[tuple[int, bytes]] = []
        for i, record in enumerate(records):
            rid = record.get("id")
            if not isinstance(rid, str) or not rid:
                rejections.append(Rejection(i, "the record has no id"))
                continue
            try:
                row = record_row(record, self._columns)
                data = json.dumps(
                    {"insertId": insert_id(record), "json": row},
                    ensure_ascii=False,
                    allow_nan=False,
                    separators=(",", ":"),
                ).encode("utf-8", "surrogatepass")
            except (TypeError, ValueError) as exc:
                rejections.append(Rejection(i, f"the record is not valid JSON: {exc}"))
                continue
            if len(data) + len(_INSERT_HEAD) + len(_INSERT_TAIL) > MAX_REQUEST_BYTES:
                rejections.append(
                    Rejection(i, f"the row is {len(data)} bytes; insertAll takes up to 9 MB")
                )
                continue
            encoded.append((i, data))
        max_rows = self.settings.max_rows_per_request
        for chunk in _chunks(encoded, max_rows=max_rows, max_bytes=MAX_REQUEST_BYTES):
            rejections += await self._insert(chunk)
        self.rows_rejected += len(rejections)
        return sorted(rejections, key=lambda r: r.index)

    async def _insert(self, chunk: list[tuple[int, bytes]]) -> list[Rejection]:
        """One insertAll request, retried until every row is stored or refused as
        invalid: a failed request is sent again whole, rows that failed transiently are
        sent again alone; both with their insertIds."""
        path = f"{self.table.table_path}/insertAll"
        pending = chunk
        refused: list[Rejection] = []

        async def attempt() -> None:
            nonlocal pending
            body = _INSERT_HEAD + b",".join(data for _, data in pending) + _INSERT_TAIL
            answer = await self._once("insertAll", "POST", path, body)
            failed: dict[int, list[dict[str, Any]]] = {}
            for entry in answer.get("insertErrors") or ():
                index = entry.get("index") if isinstance(entry, dict) else None
                if not isinstance(index, int) or not 0 <= index < len(pending):
                    raise BigQueryError(
                        200, "bad_answer", f"insertErrors names row {index!r}", kind="permanent"
                    )
                errors = [e for e in entry.get("errors") or () if isinstance(e, dict)]
                failed.setdefault(index, []).extend(errors or [{"reason": "unknown"}])
            again: list[tuple[int, bytes]] = []
            reasons: set[str] = set()
            for index, errors in failed.items():
                if any(e.get("reason") in _INVALID_ROW_REASONS for e in errors):
                    refused.append(Rejection(pending[index][0], _row_reason(errors)))
                else:
                    again.append(pending[index])
                    reasons.update(str(e.get("reason")) for e in errors)
            self.rows_inserted += len(pending) - len(failed)
            if again:
                pending = again
                raise BigQueryError(
                    200,
                    "row_errors",
                    f"{len(again)} rows not stored ({', '.join(sorted(reasons))})",
                    kind="transient",
                )

        await retry_call(attempt, self.retry, on_retry=self._note_retry)
        return refused

    async def existing_ids(self) -> set[str]:
        """Empty: resume is for file sources and file sinks. Asking a table for its ids is
        a query job that scans the id column of every partition, billed each run."""
        return set()

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
