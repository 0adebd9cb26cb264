"""The ``bq:`` sink against a real BigQuery REST emulator (tests/fakes/bigquery_emulator.py).

One emulator serves the session; each test gets a dataset of its own. Faults (a lost
answer, a refused request, a row that failed transiently) come from a small proxy in
front of the emulator, which also records the insertIds of every insertAll it sees.

The emulator stores a row sent twice twice (it ignores insertId), so the tests assert
what the sink controls, the ids it sends, not BigQuery's deduplication.
"""

from __future__ import annotations

import json
import math
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web

from worker.errors import BigQueryError, ConfigError
from worker.retry import RetryPolicy
from worker.settings import BigQuerySinkSettings, Settings
from worker.simulator import Simulator
from worker.sinks.bigquery import (
    BIGQUERY_URL,
    TABLE_SCHEMA,
    BigQuerySink,
    TableRef,
    bigquery_endpoint,
    insert_id,
    parse_table,
    record_row,
)

from .fakes.bigquery_emulator import (
    EmulatorStartError,
    EmulatorUnavailable,
    start_bigquery_emulator,
)
from .helpers import read_jsonl

PROJECT = "test-project"
FAST_RETRY = RetryPolicy(
    attempts=None, deadline_s=10.0, initial_backoff_s=0.001, max_backoff_s=0.01
)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def emulator_url() -> Iterator[str]:
    """One emulator for the session. Missing means failing, never skipping: CI must run
    these tests (make pytest builds the emulator's venv first)."""
    try:
        base_url, stop = start_bigquery_emulator(PROJECT)
    except (EmulatorUnavailable, EmulatorStartError) as exc:
        problem = str(exc)
    else:
        problem = ""
    if problem:
        pytest.fail(f"BigQuery emulator: {problem}", pytrace=False)
    try:
        yield base_url
    finally:
        stop()


class BigQuery:
    """One test's dataset in the emulator, and the REST calls the tests check with."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.api_url = base_url + "/bigquery/v2"
        self.session = session
        self.dataset = f"t_{uuid.uuid4().hex[:12]}"

    def spec(self, table: str = "records") -> str:
        return f"bq:{PROJECT}.{self.dataset}.{table}"

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(method, f"{self.api_url}/{path}", json=body) as resp:
            raw = await resp.read()
            return resp.status, (json.loads(raw) if raw.strip() else None)

    async def create_dataset(self) -> None:
        ref = {"projectId": PROJECT, "datasetId": self.dataset}
        status, body = await self.call(
            "POST", f"projects/{PROJECT}/datasets", {"datasetReference": ref}
        )
        assert status == 200, body

    async def create_table(self, table: str, fields: list[dict[str, Any]]) -> None:
        ref = {"projectId": PROJECT, "datasetId": self.dataset, "tableId": table}
        status, body = await self.call(
            "POST",
            f"projects/{PROJECT}/datasets/{self.dataset}/tables",
            {"tableReference": ref, "schema": {"fields": fields}},
        )
        assert status == 200, body

    async def table(self, table: str = "records") -> dict[str, Any]:
        status, body = await self.call(
            "GET", f"projects/{PROJECT}/datasets/{self.dataset}/tables/{table}"
        )
        assert status == 200, body
        assert isinstance(body, dict)
        return body

    async def rows(self, table: str = "records") -> list[dict[str, Any]]:
        """Every row, by tabledata.list, as {column: value} (values as the API gives
        them: strings, nested records as dicts)."""
        fields = (await self.table(table))["schema"]["fields"]
        rows: list[dict[str, Any]] = []
        token = ""
        while True:
            query = "?maxResults=1000" + (f"&pageToken={token}" if token else "")
            status, body = await self.call(
                "GET", f"projects/{PROJECT}/datasets/{self.dataset}/tables/{table}/data{query}"
            )
            assert status == 200, body
            rows += [_decode(fields, row["f"]) for row in body.get("rows") or ()]
            token = body.get("pageToken") or ""
            if not token:
                return rows


def _decode(fields: list[dict[str, Any]], cells: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, cell in zip(fields, cells, strict=True):
        value = cell["v"]
        if value is not None and field["type"] in ("RECORD", "STRUCT"):
            value = _decode(field["fields"], value["f"])
        out[field["name"]] = value
    return out


@pytest.fixture
async def bq(emulator_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[BigQuery]:
    """A fresh dataset; sinks made now talk to the emulator (BIGQUERY_EMULATOR_HOST)."""
    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", emulator_url)
    async with aiohttp.ClientSession() as session:
        bigquery = BigQuery(emulator_url, session)
        await bigquery.create_dataset()
        yield bigquery
        await bigquery.call(
            "DELETE", f"projects/{PROJECT}/datasets/{bigquery.dataset}?deleteContents=true"
        )


class FaultProxy:
    """Forwards every request to the emulator, and breaks some on purpose.

    ``inserts`` holds the insertIds of every insertAll it saw, in order;
    ``authorization`` the Authorization header of every request (None: none sent).
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.inserts: list[list[str]] = []
        self.authorization: list[str | None] = []
        #: Forward the next N insertAll requests, then answer 503 (the rows are stored;
        #: the sink cannot know).
        self.lose_answers = 0
        #: Answer the next N insertAll requests 503 without forwarding them.
        self.refuse = 0
        #: insertId -> per-row reason: the next time the row comes, it is held back and
        #: reported failed with that reason (once).
        self.row_faults: dict[str, str] = {}
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.host = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self._session = aiohttp.ClientSession()
        self.host = f"127.0.0.1:{port}"
        return self.host

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _forward(self, request: web.Request, body: bytes) -> tuple[int, bytes]:
        assert self._session is not None
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            data=body or None,
            headers={"Content-Type": "application/json"},
        ) as resp:
            return resp.status, await resp.read()

    @staticmethod
    def _unavailable() -> web.Response:
        error = {
            "code": 503,
            "message": "injected by the test proxy",
            "errors": [{"reason": "backendError", "message": "injected"}],
            "status": "UNAVAILABLE",
        }
        return web.json_response({"error": error}, status=503)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.authorization.append(request.headers.get("Authorization"))
        if not request.path.endswith("/insertAll"):
            status, raw = await self._forward(request, body)
            return web.Response(status=status, body=raw, content_type="application/json")
        doc = json.loads(body)
        ids = [row["insertId"] for row in doc["rows"]]
        self.inserts.append(ids)
        if self.refuse:
            self.refuse -= 1
            return self._unavailable()
        held = {i: self.row_faults.pop(rid) for i, rid in enumerate(ids) if rid in self.row_faults}
        sent = [i for i in range(len(ids)) if i not in held]
        if held:
            doc["rows"] = [doc["rows"][i] for i in sent]
            body = json.dumps(doc).encode()
        status, raw = await self._forward(request, body)
        if self.lose_answers:
            self.lose_answers -= 1
            return self._unavailable()
        if held and status == 200:
            answer = json.loads(raw)
            errors = [
                {"index": sent[e["index"]], "errors": e["errors"]}
                for e in answer.get("insertErrors") or ()
            ]
            errors += [
                {"index": i, "errors": [{"reason": reason, "message": "injected"}]}
                for i, reason in held.items()
            ]
            raw = json.dumps({**answer, "insertErrors": errors}).encode()
        return web.Response(status=status, body=raw, content_type="application/json")


@pytest.fixture
async def proxy(
    bq: BigQuery, emulator_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of the emulator; sinks made now talk to it."""
    fault_proxy = FaultProxy(emulator_url)
    host = await fault_proxy.start()
    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", host)
    try:
        yield fault_proxy
    finally:
        await fault_proxy.stop()


MakeSink = Callable[..., BigQuerySink]


@pytest.fixture
async def make_sink() -> AsyncIterator[MakeSink]:
    """Sinks with fast retries (``create_table`` on unless said otherwise), closed after
    the test whatever happened."""
    made: list[BigQuerySink] = []

    def make(spec: str, **settings: Any) -> BigQuerySink:
        options: dict[str, Any] = {"create_table": True, **settings}
        sink = BigQuerySink(spec, settings=BigQuerySinkSettings(**options))
        sink.retry = FAST_RETRY
        made.append(sink)
        return sink

    yield make
    for sink in made:
        await sink.aclose()


def result(job_id: str, **extra: Any) -> dict[str, Any]:
    """A result record as worker.jobs.result_record makes it."""
    return {
        "id": job_id,
        "image_uri": f"gs://bucket/{job_id}.jpg",
        "status": "ok",
        "description": f"A picture called {job_id}.",
        "model": "google/gemini-2.0-flash-001",
        "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42},
        "attempts": 1,
        "latency_s": 0.25,
        "finished_at": "2026-03-04T05:06:07.089Z",
        **extra,
    }


def micros(rfc3339: str) -> str:
    """A TIMESTAMP as the emulator's tabledata.list gives it (microseconds, as text)."""
    parsed = datetime.fromisoformat(rfc3339.replace("Z", "+00:00"))
    return str(round(parsed.timestamp() * 1_000_000))


class GoogleTokensStub:
    """A token provider holding (pretend) Google credentials."""

    refreshes = 0
    refresh_failures = 0
    google = True
    expires_at = None

    def __init__(self) -> None:
        self.handed_out = 0

    async def start(self) -> None:
        return None

    async def token(self) -> str:
        self.handed_out += 1
        return "ya29.stub"

    async def refresh_after_rejection(self, rejected: str) -> None:
        return None

    async def run_refresher(self) -> None:
        return None


# -- specs, endpoint, rows (no emulator) -----------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "ref"),
    [
        ("bq:my-project.results.descriptions", TableRef("my-project", "results", "descriptions")),
        ("bq:example.com:my-proj.ds_1.t-2", TableRef("example.com:my-proj", "ds_1", "t-2")),
        ("my-project.results.descriptions", TableRef("my-project", "results", "descriptions")),
    ],
)
def test_spec_is_parsed(spec: str, ref: TableRef) -> None:
    assert parse_table(spec) == ref


@pytest.mark.parametrize(
    "spec",
    [
        "bq:",
        "bq:my-project.results",
        "bq:my-project..descriptions",
        "bq:My_Project.results.descriptions",
        "bq:abc.results.descriptions",
        "bq:my-project.re-sults.descriptions",
        "bq:my-project.results.desc/riptions",
        "bq:my-project.results.descriptions.extra",
    ],
)
def test_a_bad_spec_is_a_config_error(spec: str) -> None:
    with pytest.raises(ConfigError) as caught:
        BigQuerySink(spec, settings=BigQuerySinkSettings(), key="worker.dead_letter")
    assert caught.value.key == "worker.dead_letter"
    assert "bq:PROJECT.DATASET.TABLE" in caught.value.message


def test_endpoint_is_google_unless_an_emulator_is_named() -> None:
    assert bigquery_endpoint({}) == (BIGQUERY_URL, False)
    assert bigquery_endpoint({"BIGQUERY_EMULATOR_HOST": "localhost:9050"}) == (
        "http://localhost:9050/bigquery/v2",
        True,
    )
    assert bigquery_endpoint({"BIGQUERY_EMULATOR_HOST": "https://bq.test:8443/"}) == (
        "https://bq.test:8443/bigquery/v2",
        True,
    )


def test_rows_carry_known_fields_only_with_json_columns_as_text() -> None:
    record = result(
        "r-1",
        usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, "cached": 9},
        output={"labels": ["cat"], "score": 0.5},
        source={"message_id": "m-1"},
        cost_usd=None,
        some_future_field={"x": 1},
    )
    row = record_row(record)
    assert row["output"] == '{"labels":["cat"],"score":0.5}'
    assert row["source"] == '{"message_id":"m-1"}'
    assert row["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert "some_future_field" not in row
    assert "cost_usd" not in row  # None is NULL: left out
    assert row["finished_at"] == "2026-03-04T05:06:07.089Z"
    assert set(record_row(record, columns={"id", "status"})) == {"id", "status"}
    with pytest.raises(ValueError, match="not JSON compliant"):
        record_row(result("r-2", output={"score": math.nan}))


def test_insert_ids_follow_record_ids() -> None:
    assert insert_id(result("r-1")) == "r-1"
    assert insert_id({"id": "r-1", "status": "error"}) == "r-1#error"
    long = insert_id(result("x" * 300))
    assert long.startswith("sha256:")
    assert len(long) <= 128
    assert long == insert_id(result("x" * 300))


async def test_without_credentials_prepare_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.auth import NoTokens

    monkeypatch.delenv("BIGQUERY_EMULATOR_HOST", raising=False)
    sink = BigQuerySink("bq:my-project.results.descriptions", settings=BigQuerySinkSettings())
    sink.set_tokens(NoTokens())  # not Google credentials: never sent to Google
    try:
        with pytest.raises(ConfigError, match="needs Google credentials"):
            await sink.prepare()
    finally:
        await sink.aclose()
    assert sink.requests == {}


# -- the table -------------------------------------------------------------------------------


async def test_prepare_creates_a_day_partitioned_table_clustered_by_status(
    bq: BigQuery, make_sink: MakeSink
) -> None:
    sink = make_sink(bq.spec())
    await sink.prepare()

    table = await bq.table()
    assert table["timePartitioning"] == {"type": "DAY", "field": "finished_at"}
    assert table["clustering"] == {"fields": ["status"]}

    def shape(fields: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [
            (f["name"], f["type"], f.get("mode", "NULLABLE"), shape(f.get("fields", [])))
            for f in fields
        ]

    assert shape(table["schema"]["fields"]) == shape(TABLE_SCHEMA)
    assert [f["name"] for f in TABLE_SCHEMA if f["mode"] == "REQUIRED"] == ["id"]

    # A second worker finds the table and creates nothing.
    again = make_sink(bq.spec())
    await again.prepare()
    assert again.requests == {"tables.get": 1}


async def test_a_missing_table_names_the_flag_that_creates_it(
    bq: BigQuery, make_sink: MakeSink
) -> None:
    sink = make_sink(bq.spec(), create_table=False)
    with pytest.raises(ConfigError) as caught:
        await sink.prepare()
    assert "does not exist" in caught.value.message
    assert "--bq-create-table" in caught.value.message
    assert caught.value.key == "worker.sink"


async def test_a_missing_dataset_is_a_config_error_saying_so(
    bq: BigQuery, make_sink: MakeSink
) -> None:
    sink = make_sink(f"bq:{PROJECT}.no_such_dataset.records")
    with pytest.raises(ConfigError, match=r"dataset test-project\.no_such_dataset does not exist"):
        await sink.prepare()
    assert "tables.insert" not in sink.requests


# -- rows ------------------------------------------------------------------------------------


async def test_rows_written_match_the_schema(bq: BigQuery, make_sink: MakeSink) -> None:
    ok = result(
        "r-ok",
        endpoint="us-central1",
        tier="standard",
        cost_usd=0.000125,
        cached=False,
        output={"labels": ["cat", "sofa"], "nested": {"n": 1}},
        source={"message_id": "m-7", "delivery_attempt": 2},
        usage={"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42, "new": 1},
        a_field_from_the_future=[1, 2, 3],
    )
    dead = {
        "id": "r-dead",
        "image_uri": "gs://bucket/missing.jpg",
        "status": "error",
        "error": {"type": "fetch_failed", "message": "HTTP 404", "detail": "dropped"},
        "attempts": 3,
        "input": '{"id":"r-dead","image_uri":"gs://bucket/missing.jpg"}',
        "finished_at": "2026-03-04T05:06:08Z",
    }
    sink = make_sink(bq.spec())
    await sink.prepare()
    assert await sink.write([ok, dead]) == []

    rows = {r["id"]: r for r in await bq.rows()}
    assert set(rows) == {"r-ok", "r-dead"}
    got = rows["r-ok"]
    assert got["image_uri"] == "gs://bucket/r-ok.jpg"
    assert got["status"] == "ok"
    assert got["description"] == "A picture called r-ok."
    assert json.loads(got["output"]) == ok["output"]
    assert json.loads(got["source"]) == ok["source"]
    assert got["model"] == "google/gemini-2.0-flash-001"
    assert (got["endpoint"], got["tier"]) == ("us-central1", "standard")
    assert got["usage"] == {"prompt_tokens": "12", "completion_tokens": "30", "total_tokens": "42"}
    assert float(got["cost_usd"]) == pytest.approx(0.000125)
    assert got["attempts"] == "1"
    assert float(got["latency_s"]) == pytest.approx(0.25)
    assert got["finished_at"] == micros("2026-03-04T05:06:07.089Z")
    assert got["cached"] == "false"
    assert got["error"] is None
    assert got["input"] is None

    got = rows["r-dead"]
    assert got["status"] == "error"
    assert got["error"] == {"type": "fetch_failed", "message": "HTTP 404"}
    assert got["input"] == dead["input"]
    assert got["attempts"] == "3"
    assert got["finished_at"] == micros("2026-03-04T05:06:08Z")
    assert got["description"] is None
    assert got["usage"] is None


async def test_an_existing_table_is_used_as_it_is(bq: BigQuery, make_sink: MakeSink) -> None:
    """An older table without some of today's columns still takes rows (they carry the
    columns it has); BigQuery proper would refuse fields the table lacks."""
    await bq.create_table(
        "older",
        [
            {"name": "id", "type": "STRING", "mode": "REQUIRED"},
            {"name": "status", "type": "STRING"},
            {"name": "description", "type": "STRING"},
        ],
    )
    sink = make_sink(bq.spec("older"), create_table=False)
    await sink.prepare()
    assert await sink.write([result("r-1", output={"a": 1})]) == []
    assert "tables.insert" not in sink.requests
    assert await bq.rows("older") == [
        {"id": "r-1", "status": "ok", "description": "A picture called r-1."}
    ]


async def test_a_row_bigquery_refuses_is_rejected_and_the_others_land(
    bq: BigQuery, make_sink: MakeSink
) -> None:
    records = [result("r-0"), result("r-1", attempts="many"), result("r-2")]
    sink = make_sink(bq.spec())
    await sink.prepare()
    rejections = await sink.write(records)

    assert [r.index for r in rejections] == [1]
    # The emulator's location and message name the row's first column, not the bad one.
    assert rejections[0].reason.startswith("invalid")
    assert "Cannot convert value" in rejections[0].reason
    assert sorted(r["id"] for r in await bq.rows()) == ["r-0", "r-2"]
    assert (sink.rows_inserted, sink.rows_rejected) == (2, 1)


async def test_records_json_cannot_hold_are_rejected_without_a_request(
    bq: BigQuery, make_sink: MakeSink
) -> None:
    sink = make_sink(bq.spec())
    await sink.prepare()
    rejections = await sink.write([result("r-0", cost_usd=math.inf), {"status": "ok"}])
    assert [r.index for r in rejections] == [0, 1]
    assert "not valid JSON" in rejections[0].reason
    assert "no id" in rejections[1].reason
    assert "insertAll" not in sink.requests


@pytest.mark.parametrize("fault", ["lose_answers", "refuse"])
async def test_a_request_that_fails_once_is_sent_again_with_the_same_insert_ids(
    bq: BigQuery, proxy: FaultProxy, fault: str, make_sink: MakeSink
) -> None:
    setattr(proxy, fault, 1)
    records = [result(f"r-{i}") for i in range(5)]
    sink = make_sink(bq.spec())
    await sink.prepare()
    with anyio.fail_after(10):
        assert await sink.write(records) == []

    ids = [f"r-{i}" for i in range(5)]
    assert proxy.inserts == [ids, ids]
    assert sink.retries == 1
    stored = Counter(r["id"] for r in await bq.rows())
    assert set(stored) == set(ids)
    # A lost answer means the first copy was stored too: BigQuery drops the second by
    # insertId (best effort); the emulator keeps both.
    assert set(stored.values()) == ({2} if fault == "lose_answers" else {1})


async def test_rows_that_failed_transiently_are_sent_again_alone(
    bq: BigQuery, proxy: FaultProxy, make_sink: MakeSink
) -> None:
    proxy.row_faults = {"r-2": "backendError", "r-4": "timeout"}
    sink = make_sink(bq.spec())
    await sink.prepare()
    with anyio.fail_after(10):
        assert await sink.write([result(f"r-{i}") for i in range(5)]) == []

    assert proxy.inserts == [[f"r-{i}" for i in range(5)], ["r-2", "r-4"]]
    stored = Counter(r["id"] for r in await bq.rows())
    assert stored == {f"r-{i}": 1 for i in range(5)}


async def test_rows_go_in_requests_of_at_most_max_rows_per_request(
    bq: BigQuery, proxy: FaultProxy, make_sink: MakeSink
) -> None:
    sink = make_sink(bq.spec(), max_rows_per_request=2)
    await sink.prepare()
    assert await sink.write([result(f"r-{i}") for i in range(5)]) == []
    assert proxy.inserts == [["r-0", "r-1"], ["r-2", "r-3"], ["r-4"]]


async def test_failures_past_the_retry_deadline_fail_the_write(
    bq: BigQuery, proxy: FaultProxy, make_sink: MakeSink
) -> None:
    sink = make_sink(bq.spec())
    sink.retry = RetryPolicy(
        attempts=None, deadline_s=0.2, initial_backoff_s=0.001, max_backoff_s=0.02
    )
    await sink.prepare()
    proxy.refuse = 1_000_000
    with anyio.fail_after(10), pytest.raises(BigQueryError) as caught:
        await sink.write([result("r-0"), result("r-1")])
    assert caught.value.status == 503
    assert len(proxy.inserts) > 1
    assert all(ids == ["r-0", "r-1"] for ids in proxy.inserts)


async def test_credentials_go_to_google_never_to_an_emulator(
    bq: BigQuery, proxy: FaultProxy, make_sink: MakeSink
) -> None:
    tokens = GoogleTokensStub()
    sink = make_sink(bq.spec())
    sink.set_tokens(tokens)
    await sink.prepare()
    assert await sink.write([result("r-0")]) == []
    assert proxy.authorization and set(proxy.authorization) == {None}
    assert tokens.handed_out == 0

    # The same sink aimed at "Google" (the proxy standing in) sends the token.
    google = make_sink(bq.spec())
    google.emulator = False
    google.base_url = f"http://{proxy.host}/bigquery/v2"
    google.set_tokens(tokens)
    await google.prepare()
    assert proxy.authorization[-1] == "Bearer ya29.stub"


# -- through the pipeline ----------------------------------------------------------------------


async def test_the_pipeline_dead_letters_a_record_bigquery_refuses(
    bq: BigQuery, fast_settings: Settings, sim: Simulator, tmp_path: Path, make_sink: MakeSink
) -> None:
    """An operator's table keys rows by a numeric id: the job whose id is not a number is
    refused by BigQuery and lands in the dead-letter file as ``sink_rejected``; the
    others are stored and acked."""
    from worker.app import run_pipeline, runtime
    from worker.sinks import JsonlSink
    from worker.sources import MemorySource

    fields = [dict(f, type="INT64") if f["name"] == "id" else f for f in TABLE_SCHEMA]
    await bq.create_table("numbered", fields)
    jobs = [json.dumps({"id": i, "image_uri": f"gs://b/{i}.jpg"}).encode() for i in range(1, 6)]
    jobs.insert(2, json.dumps({"id": "job-x", "image_uri": "gs://b/x.jpg"}).encode())
    sink = make_sink(bq.spec("numbered"), create_table=False)
    dead = JsonlSink(str(tmp_path / "dead.jsonl"))

    with anyio.fail_after(30):
        async with runtime(fast_settings) as rt:
            sink.set_tokens(rt.tokens)
            stats = await run_pipeline(
                rt, MemorySource(jobs), sink, dead, resume=False, handle_signals=False
            )

    assert (stats.ok, stats.dead_lettered, stats.failed) == (5, 1, 0)
    assert sim.stats().requests == 6  # every job was described once
    letters = read_jsonl(tmp_path / "dead.jsonl")
    assert [d["id"] for d in letters] == ["job-x"]
    assert letters[0]["status"] == "error"
    assert letters[0]["error"]["type"] == "sink_rejected"
    assert "invalid" in letters[0]["error"]["message"]
    rows = await bq.rows("numbered")
    assert sorted(int(r["id"]) for r in rows) == [1, 2, 3, 4, 5]
    assert {r["status"] for r in rows} == {"ok"}
    assert all(r["description"] for r in rows)
