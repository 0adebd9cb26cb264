"""Structured output (worker/schemas.py and the pipeline's schema check): the schema sent
as ``response_format``, the answer checked, one repair request, then ``schema_mismatch``;
named schemas chosen per job; a bad schema refused at start-up.

The simulator builds answers from the schema it is sent and, with
``schema_mismatch_rate``, breaks some on purpose, deterministically under its ``seed``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import pytest
from jsonschema.exceptions import best_match

from worker.settings import Settings, load_settings
from worker.simulator import SimConfig, Simulator

from .helpers import REPO, quick_settings, worker_env
from .inprocess import run_jobs

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "caption": {"type": "string"},
        "colours": {"type": "array", "items": {"type": "string"}},
        "count": {"type": "integer"},
    },
    "required": ["caption", "colours", "count"],
    "additionalProperties": False,
}
TAGS: dict[str, Any] = {
    "type": "object",
    "properties": {"tags": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
    "required": ["tags"],
    "additionalProperties": False,
}
# Under this seed, with schema_mismatch_rate 0.5, the simulator breaks its first answer
# and not its second (a property it drops, then a complete answer).
SEED_FIRST_BROKEN = 3


def write_schema(tmp_path: Path, name: str, document: Any) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(document) if not isinstance(document, str) else document)
    return str(path)


def settings_for(sim: Simulator, tmp_path: Path, *, schema: bool = True) -> Settings:
    s = quick_settings()
    s.model.base_url = sim.vertex_base_url()
    s.retry.deadline_s = 20.0
    if schema:
        s.model.response_schema = write_schema(tmp_path, "schema.json", SCHEMA)
    return s.validate()


@pytest.fixture
async def structured() -> AsyncIterator[Simulator]:
    """A simulator that breaks its first structured answer only."""
    config = SimConfig(record_requests=100, seed=SEED_FIRST_BROKEN, schema_mismatch_rate=0.5)
    async with Simulator(config) as sim:
        yield sim


def image_url_of(body: Any) -> str:
    return str(body["messages"][0]["content"][1]["image_url"])


def complaint_for(answer: str) -> str:
    """What jsonschema says is wrong with ``answer`` (which must be wrong)."""
    error = best_match(jsonschema.Draft202012Validator(SCHEMA).iter_errors(json.loads(answer)))
    assert error is not None, f"{answer} matches the schema"
    return str(error.message)


async def test_a_matching_answer_is_the_records_output(sim: Simulator, tmp_path: Path) -> None:
    run = await run_jobs(
        settings_for(sim, tmp_path), [{"id": "a", "image_uri": "gs://b/cat.jpg"}], tmp_path / "r"
    )

    assert run.dead == []
    [record] = run.results
    jsonschema.validate(record["output"], SCHEMA)
    # description keeps the model's text as it came; output is that text parsed.
    assert isinstance(record["description"], str)
    assert json.loads(record["description"]) == record["output"]
    assert "cat.jpg" in record["output"]["caption"]
    assert record["attempts"] == 1
    [request] = sim.requests
    assert request.body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "default", "schema": SCHEMA, "strict": True},
    }
    assert sim.stats().structured == 1


async def test_one_repair_request_carries_the_answer_and_the_complaint(
    structured: Simulator, tmp_path: Path
) -> None:
    sim = structured
    run = await run_jobs(
        settings_for(sim, tmp_path), [{"id": "a", "image_uri": "gs://b/cat.jpg"}], tmp_path / "r"
    )

    assert run.dead == []
    assert sim.stats().schema_mismatches_sent == 1
    first, repair = (r.body for r in sim.requests)
    assert len(sim.requests) == 2  # exactly one extra request
    assert len(first["messages"]) == 1
    # The repair is the same request plus the model's answer and what was wrong with it.
    user, assistant, follow_up = repair["messages"]
    assert user == first["messages"][0]
    assert repair["response_format"] == first["response_format"]
    assert assistant["role"] == "assistant"
    answer = assistant["content"]
    assert follow_up["role"] == "user"
    assert complaint_for(answer) in follow_up["content"]
    assert "did not match the required JSON schema" in follow_up["content"]

    [record] = run.results
    jsonschema.validate(record["output"], SCHEMA)
    assert json.loads(record["description"]) == record["output"]
    assert record["description"] != answer  # the repaired answer, not the broken one
    assert record["attempts"] == 2
    assert record["cost_usd"] > 0


async def test_a_repair_that_still_mismatches_is_dead_lettered(
    sim: Simulator, tmp_path: Path
) -> None:
    sim.config.schema_mismatch_rate = 1.0
    run = await run_jobs(
        settings_for(sim, tmp_path), [{"id": "a", "image_uri": "gs://b/cat.jpg"}], tmp_path / "r"
    )

    assert run.results == []
    assert len(sim.requests) == 2  # the answer, one repair, no more
    [dead] = run.dead
    assert dead["id"] == "a" and dead["status"] == "error"
    assert dead["error"]["type"] == "schema_mismatch"
    message = dead["error"]["message"]
    prefix = "the answer does not match schema 'default': "
    assert message.startswith(prefix)
    # The validator's own words about the second answer, and where in it.
    assert " is a required property" in message or " is not of type " in message
    assert message.endswith(")") and "(at " in message
    assert dead["attempts"] == 2
    assert "output" not in dead


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (json.dumps({"type": "objekt"}), "schema 'default' is not valid JSON Schema"),
        ("{not json", "is not JSON"),
        (json.dumps(["a", "list"]), "schema 'default' must be a JSON object"),
    ],
    ids=["not-json-schema", "not-json", "not-an-object"],
)
async def test_a_bad_response_schema_stops_worker_run_with_one_line(
    tmp_path: Path, content: str, expected: str
) -> None:
    bad = write_schema(tmp_path, "bad.json", content)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "a", "image_uri": "gs://b/o.jpg"}) + "\n")
    out = tmp_path / "out" / "results.jsonl"
    proc = await anyio.run_process(
        [
            sys.executable, "-m", "worker", "run", "--response-schema", bad,
            "--source", f"file:{jobs}", "--sink", f"jsonl:{out}",
            "--base-url", "http://127.0.0.1:9/v1", "--auth", "none", "--log-format", "text",
        ],
        cwd=REPO,
        env=worker_env(),
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    [line] = lines
    assert line.startswith("worker: config error: model.response_schema: ")
    assert expected in line
    if expected == "is not JSON":
        assert bad in line  # the file is named
    assert not out.exists()  # refused before anything was opened


async def test_named_schemas_from_the_config_are_chosen_per_job(
    sim: Simulator, tmp_path: Path
) -> None:
    caption = write_schema(tmp_path, "caption.json", SCHEMA)
    tags = write_schema(tmp_path, "tags.json", TAGS)
    config = tmp_path / "worker.toml"
    config.write_text(
        f"""
[model]
auth = "none"
base_url = "{sim.vertex_base_url()}"

[schemas]
caption = "{caption}"
"photo.tags" = "{tags}"
"""
    )
    settings = load_settings(config)
    jobs = [
        {"id": "c", "image_uri": "gs://b/c.jpg", "schema": "caption"},
        {"id": "t", "image_uri": "gs://b/t.jpg", "schema": "photo.tags"},
        {"id": "plain", "image_uri": "gs://b/plain.jpg"},  # no default schema: text
    ]
    run = await run_jobs(settings, jobs, tmp_path / "r")

    assert run.dead == []
    by_id = run.by_id()
    jsonschema.validate(by_id["c"]["output"], SCHEMA)
    jsonschema.validate(by_id["t"]["output"], TAGS)
    assert "output" not in by_id["plain"]
    assert "plain.jpg" in by_id["plain"]["description"]
    sent = {image_url_of(r.body): r.body.get("response_format") for r in sim.requests}
    assert sent["gs://b/c.jpg"]["json_schema"]["name"] == "caption"
    assert sent["gs://b/c.jpg"]["json_schema"]["schema"] == SCHEMA
    # A name OpenAI's API would refuse is cleaned up for the request only.
    assert sent["gs://b/t.jpg"]["json_schema"]["name"] == "photo_tags"
    assert sent["gs://b/plain.jpg"] is None


async def test_an_unknown_schema_name_is_an_invalid_job(sim: Simulator, tmp_path: Path) -> None:
    settings = settings_for(sim, tmp_path)
    jobs = [
        {"id": "unknown", "image_uri": "gs://b/o.jpg", "schema": "nope"},
        {"id": "known", "image_uri": "gs://b/o.jpg", "schema": "default"},
    ]
    run = await run_jobs(settings, jobs, tmp_path / "r")

    [dead] = run.dead
    assert dead["id"] == "unknown"
    assert dead["error"]["type"] == "invalid_job"
    assert "unknown schema 'nope'" in dead["error"]["message"]
    assert "[schemas]" in dead["error"]["message"]
    assert dead["attempts"] == 0
    assert [r["id"] for r in run.results] == ["known"]
    assert len(sim.requests) == 1  # the unknown one never reached the model

    # Without any schema configured, naming one is just as invalid.
    plain = settings_for(sim, tmp_path, schema=False)
    again = await run_jobs(plain, [jobs[1]], tmp_path / "r2")
    assert [d["error"]["type"] for d in again.dead] == ["invalid_job"]


async def test_a_cached_structured_answer_keeps_its_output(sim: Simulator, tmp_path: Path) -> None:
    settings = settings_for(sim, tmp_path)
    settings.store.uri = f"sqlite:{tmp_path / 'store.sqlite'}"
    uri = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    first = await run_jobs(settings, [{"id": "a", "image_uri": uri}], tmp_path / "r1")
    second = await run_jobs(settings, [{"id": "b", "image_uri": uri}], tmp_path / "r2")

    assert len(sim.requests) == 1
    [fresh], [cached] = first.results, second.results
    assert cached["cached"] is True
    assert cached["output"] == fresh["output"]
    assert cached["description"] == fresh["description"]
    jsonschema.validate(cached["output"], SCHEMA)
