"""Generation settings (``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``): a
job's own are checked (a bad one is an ``invalid_job`` naming the field), the worker's
come from flags or the config, a job's win, and what is sent is what the simulator saw
(``SimStats.settings_seen`` and the recorded request bodies).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from worker.errors import ConfigError, JobError
from worker.jobs import parse_job
from worker.settings import Settings, load_settings
from worker.simulator import Simulator

from .helpers import REPO, quick_settings, read_jsonl, worker_env
from .inprocess import Job, run_jobs

URI = "gs://bucket/photo.jpg"


def settings_for(sim: Simulator) -> Settings:
    s = quick_settings()
    s.model.base_url = sim.vertex_base_url()
    s.retry.deadline_s = 20.0
    return s.validate()


def raw_job(fields: str) -> bytes:
    """A job whose generation fields are given as JSON text (for values ``json.dumps``
    cannot write, or writes differently: huge integers, NaN)."""
    return f'{{"id": "j", "image_uri": "{URI}", {fields}}}'.encode()


HUGE = "1" + "0" * 400  # a valid JSON integer, far beyond any float

# (JSON text of the fields, what the message must say)
BAD: dict[str, tuple[str, str]] = {
    "max_tokens string": ('"max_tokens": "100"', "max_tokens must be an integer"),
    "max_tokens float": ('"max_tokens": 1.5', "max_tokens must be an integer"),
    "max_tokens bool": ('"max_tokens": true', "max_tokens must be an integer"),
    "max_tokens zero": ('"max_tokens": 0', "max_tokens must be 1..1000000"),
    "max_tokens negative": ('"max_tokens": -5', "max_tokens must be 1..1000000"),
    "max_tokens too many": ('"max_tokens": 1000001', "max_tokens must be 1..1000000"),
    "temperature string": ('"temperature": "hot"', "temperature must be a number"),
    "temperature bool": ('"temperature": false', "temperature must be a number"),
    "temperature NaN": ('"temperature": NaN', "temperature must be a number"),
    "temperature list": ('"temperature": [1]', "temperature must be a number"),
    "temperature negative": ('"temperature": -0.1', "temperature must be 0..2"),
    "temperature above 2": ('"temperature": 2.01', "temperature must be 0..2"),
    "temperature infinite": ('"temperature": 1e999', "temperature must be 0..2"),
    "temperature huge integer": (f'"temperature": {HUGE}', "temperature must be 0..2"),
    "top_p zero": ('"top_p": 0', "top_p must be > 0 and <= 1"),
    "top_p above 1": ('"top_p": 1.5', "top_p must be > 0 and <= 1"),
    "top_p huge negative integer": (f'"top_p": -{HUGE}', "top_p must be > 0 and <= 1"),
    "top_p string": ('"top_p": "0.9"', "top_p must be a number"),
    "seed float": ('"seed": 7.5', "seed must be a 64-bit integer"),
    "seed string": ('"seed": "7"', "seed must be a 64-bit integer"),
    "seed bool": ('"seed": true', "seed must be a 64-bit integer"),
    "seed 2**63": (f'"seed": {2**63}', "seed must be a 64-bit integer"),
    "seed below -2**63": (f'"seed": {-(2**63) - 1}', "seed must be a 64-bit integer"),
    "stop empty string": ('"stop": ""', "stop must be a string or a list of 1 to 4 strings"),
    "stop empty list": ('"stop": []', "stop must be a string or a list of 1 to 4 strings"),
    "stop five": ('"stop": ["a","b","c","d","e"]', "stop must be a string or a list of 1 to 4"),
    "stop number": ('"stop": [1]', "stop must be a string or a list of 1 to 4 strings"),
    "stop object": ('"stop": {"a": 1}', "stop must be a string or a list of 1 to 4 strings"),
    "stop blank item": ('"stop": ["ok", ""]', "stop must be a string or a list of 1 to 4"),
    "stop too long": (f'"stop": "{"x" * 257}"', "stop must be a string or a list of 1 to 4"),
    "stop lone surrogate": ('"stop": "\\ud800"', "stop is not valid Unicode"),
}


@pytest.mark.parametrize(("fields", "message"), list(BAD.values()), ids=list(BAD))
def test_a_bad_generation_field_is_an_invalid_job(fields: str, message: str) -> None:
    with pytest.raises(JobError) as info:
        parse_job(raw_job(fields))
    assert info.value.type == "invalid_job"
    assert message in info.value.message
    assert info.value.job_id == "j"  # the dead letter keeps the job's own id


GOOD: dict[str, tuple[str, dict[str, Any]]] = {
    "max_tokens bounds": ('"max_tokens": 1', {"max_tokens": 1}),
    "max_tokens top": ('"max_tokens": 1000000', {"max_tokens": 1_000_000}),
    "temperature bounds": ('"temperature": 0, "top_p": 1', {"temperature": 0.0, "top_p": 1.0}),
    "temperature 2": ('"temperature": 2', {"temperature": 2.0}),
    "seed bounds": (f'"seed": {-(2**63)}', {"seed": -(2**63)}),
    "seed top": (f'"seed": {2**63 - 1}', {"seed": 2**63 - 1}),
    "stop string": (f'"stop": "{"x" * 256}"', {"stop": "x" * 256}),
    "stop four": ('"stop": ["a","b","c","d"]', {"stop": ["a", "b", "c", "d"]}),
    "all null": ('"temperature": null, "seed": null', {}),
}


@pytest.mark.parametrize(("fields", "expected"), list(GOOD.values()), ids=list(GOOD))
def test_valid_generation_fields_are_kept_as_sent(fields: str, expected: dict[str, Any]) -> None:
    assert parse_job(raw_job(fields)).generation == expected


async def test_bad_jobs_are_dead_lettered_without_a_model_call(
    sim: Simulator, tmp_path: Path
) -> None:
    jobs = [
        raw_job(fields).decode().replace('"j"', json.dumps(name))
        for name, (fields, _) in BAD.items()
    ]
    run = await run_jobs(
        settings_for(sim), [*jobs, {"id": "fine", "image_uri": URI}], tmp_path / "r"
    )

    assert run.stats.failed == 0  # every bad job has a dead letter, none crashed
    dead = {str(d["id"]): d["error"] for d in run.dead}
    assert set(dead) == set(BAD)
    for name, (_, message) in BAD.items():
        assert dead[name]["type"] == "invalid_job", name
        assert message in dead[name]["message"], name
    assert [r["id"] for r in run.results] == ["fine"]
    assert sim.stats().requests == 1


async def test_a_jobs_settings_reach_the_model(sim: Simulator, tmp_path: Path) -> None:
    job = {
        "id": "a",
        "image_uri": URI,
        "max_tokens": 3,
        "temperature": 0.25,
        "top_p": 0.5,
        "seed": 42,
        "stop": ["zzz", "of"],
    }
    run = await run_jobs(settings_for(sim), [job], tmp_path / "r")

    assert run.dead == []
    [request] = sim.requests
    body = request.body
    assert {k: body[k] for k in ("max_tokens", "temperature", "top_p", "seed", "stop")} == {
        "max_tokens": 3,
        "temperature": 0.25,
        "top_p": 0.5,
        "seed": 42,
        "stop": ["zzz", "of"],
    }
    assert sim.stats().settings_seen == {
        "max_tokens=3": 1,
        "temperature=0.25": 1,
        "top_p=0.5": 1,
        "seed=42": 1,
        'stop=["zzz","of"]': 1,
    }
    # They took effect: the answer stops before "of" ("A simulated description of ...").
    [record] = run.results
    assert record["description"] == "A simulated description "


async def test_a_jobs_own_setting_wins_over_the_workers(sim: Simulator, tmp_path: Path) -> None:
    settings = settings_for(sim)
    settings.model.temperature = 0.2
    settings.model.seed = 7
    jobs: list[Job] = [
        {"id": "own", "image_uri": "gs://bucket/own.jpg", "temperature": 1.5},
        {"id": "worker", "image_uri": "gs://bucket/worker.jpg"},
    ]
    await run_jobs(settings, jobs, tmp_path / "r")

    sent = {r.body["messages"][0]["content"][1]["image_url"]: r.body for r in sim.requests}
    own, worker = sent["gs://bucket/own.jpg"], sent["gs://bucket/worker.jpg"]
    assert own["temperature"] == 1.5 and own["seed"] == 7  # only what the job sets wins
    assert worker["temperature"] == 0.2 and worker["seed"] == 7
    assert sim.stats().settings_seen == {"temperature=1.5": 1, "temperature=0.2": 1, "seed=7": 2}


async def test_worker_flags_reach_the_model(sim: Simulator, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "a", "image_uri": URI}) + "\n")
    out = tmp_path / "out.jsonl"
    proc = await anyio.run_process(
        [
            sys.executable, "-m", "worker", "run", "--source", f"file:{jobs}", "--sink", f"jsonl:{out}",
            "--base-url", sim.vertex_base_url(), "--auth", "none", "--log-format", "json",
            "--temperature", "0.3", "--top-p", "0.8", "--seed", "-12", "--stop", "zzz",
            "--max-tokens", "50",
        ],
        cwd=REPO,
        env=worker_env(),
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    assert [r["status"] for r in read_jsonl(out)] == ["ok"]
    [request] = sim.requests
    assert {k: request.body.get(k) for k in ("temperature", "top_p", "seed", "stop", "max_tokens")} == {
        "temperature": 0.3,
        "top_p": 0.8,
        "seed": -12,
        "stop": "zzz",
        "max_tokens": 50,
    }  # fmt: skip
    assert sim.stats().settings_seen == {
        "temperature=0.3": 1,
        "top_p=0.8": 1,
        "seed=-12": 1,
        'stop="zzz"': 1,
        "max_tokens=50": 1,
    }


async def test_unset_worker_settings_are_not_sent(sim: Simulator, tmp_path: Path) -> None:
    await run_jobs(settings_for(sim), [{"id": "a", "image_uri": URI}], tmp_path / "r")
    [request] = sim.requests
    assert not {"temperature", "top_p", "seed", "stop", "max_tokens"} & set(request.body)
    assert sim.stats().settings_seen == {}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("model.temperature", 2.5),
        ("model.temperature", -1),
        ("model.top_p", 0),
        ("model.top_p", 1.01),
        ("model.max_tokens", -1),
    ],
)
def test_bad_worker_settings_stop_the_start(key: str, value: float) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(overrides={key: value})
    assert info.value.key == key
