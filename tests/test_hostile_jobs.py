"""1,000 good jobs mixed with 100 hostile ones, through the real pipeline, the real
AsyncOpenAI client and the simulator: every good job described, every hostile one
dead-lettered with the right type, the worker alive, and no secret in any output."""

from __future__ import annotations

import base64
import io
import json
import logging
import random
from pathlib import Path

import pytest

from worker.app import run_worker
from worker.errors import JobError
from worker.jobs import fallback_id, parse_job
from worker.logs import JsonFormatter
from worker.settings import Settings
from worker.simulator import Simulator

from .helpers import EXAMPLES, jobs_file, read_jsonl

API_KEY = "sk-fixture-" + "k3y" * 8  # recognisable: must never appear in any output
SIGNATURE = "f00dfacecafe5ec7e7"  # a signed URL's signature carried by hostile jobs


def _hostile(i: int, root: Path) -> tuple[str, str]:
    """The i-th hostile job line and the error type it must be dead-lettered with."""
    kinds: list[tuple[str, str]] = [
        (f'{{"image_uri": "gs://b/x-{i}.jpg"', "invalid_json"),
        (f'{{"id": "h{i}", image_uri: 1}}', "invalid_json"),
        (f"[1, 2, {i}]", "invalid_job"),
        (json.dumps({"id": f"h{i}", "image_uri": i}), "invalid_job"),
        (json.dumps({"id": f"h{i}", "image_uri": "gs://b/o.jpg", "prompt": ["x"]}), "invalid_job"),
        (json.dumps({"id": {"x": i}, "image_uri": "gs://b/o.jpg"}), "invalid_job"),
        (json.dumps({"id": f"h{i}"}), "missing_image_uri"),
        (json.dumps({"id": f"h{i}", "image_uri": None}), "missing_image_uri"),
        (json.dumps({"id": f"h{i}", "image_uri": f"gs://b/\u0000{i}.jpg"}), "invalid_image_uri"),
        (json.dumps({"id": f"h{i}", "image_uri": "gs://b/" + "x" * 3000}), "invalid_image_uri"),
        (json.dumps({"id": f"h{i}", "image_uri": ""}), "invalid_image_uri"),
        (f"ftp://example.com/{i}.png", "unsupported_scheme"),
        (json.dumps({"id": f"h{i}", "image_uri": "javascript:alert(1)"}), "unsupported_scheme"),
        (
            json.dumps({"id": f"h{i}", "image_uri": f"http://example.com/{i}.png"}),
            "unsupported_scheme",
        ),
        (
            json.dumps({"id": f"h{i}", "image_uri": "file://evil.example/etc/passwd"}),
            "unsupported_scheme",
        ),
        (
            json.dumps({"id": f"h{i}", "image_uri": "gs://b/o.jpg", "prompt": "A" * 70_000}),
            "job_too_large",
        ),
        (json.dumps({"id": f"h{i}", "image_uri": "/etc/passwd"}), "file_not_allowed"),
        (
            json.dumps({"id": f"h{i}", "image_uri": "../../../../../../etc/hostname"}),
            "file_not_allowed",
        ),
        (json.dumps({"id": f"h{i}", "image_uri": str(root / "escape.png")}), "file_not_allowed"),
        (
            json.dumps({"id": f"h{i}", "image_uri": str(root / f"missing-{i}.png")}),
            "file_not_found",
        ),
        (
            json.dumps({"id": f"h{i}", "image_uri": str(root / "notes.txt")}),
            "unsupported_media_type",
        ),
        (json.dumps({"id": f"h{i}", "image_uri": str(root / "huge.png")}), "image_too_large"),
        (
            json.dumps(
                {
                    "id": f"h{i}",
                    "image_uri": f"https://127.0.0.1/{i}.png?X-Goog-Signature={SIGNATURE}",
                }
            ),
            "blocked_address",
        ),
        (
            json.dumps(
                {
                    "id": f"h{i}",
                    "image_uri": "https://169.254.169.254/computeMetadata/v1/instance/"
                    f"service-accounts/default/token?n={i}",
                }
            ),
            "blocked_address",
        ),
        (f"https://metadata.google.internal/computeMetadata/v1/?n={i}", "blocked_address"),
        (f"https://[::ffff:127.0.0.1]/{i}.png", "blocked_address"),
        (f"https://localhost:1/{i}.png?sig={SIGNATURE}", "blocked_address"),
        (f"https://0x7f.1/{i}.png", "blocked_address"),
        (f"https://2130706433/{i}.png", "blocked_address"),
        (f"https://10.1.2.3/{i}.png", "blocked_address"),
        (f"https://[fe80::1]/{i}.png", "blocked_address"),
        (f"https://0.0.0.0/{i}.png", "blocked_address"),
        (
            f"https://nowhere-{i}.invalid/x.png?access_token=ya29.fixture-{SIGNATURE}",
            "fetch_failed",
        ),
        (
            json.dumps(
                {
                    "id": f"h{i}",
                    "image_uri": "data:image/png;base64,"
                    + base64.b64encode(f"not a png {i}".encode()).decode(),
                }
            ),
            "model_rejected",
        ),
    ]
    return kinds[i % len(kinds)]


def _expected_id(line: str) -> str:
    raw = line.encode()
    try:
        return parse_job(raw).id
    except JobError as exc:
        return exc.job_id or fallback_id(raw)


def _text(path: Path) -> str:
    return path.read_text()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "images"
    r.mkdir()
    for p in EXAMPLES.iterdir():
        (r / p.name).write_bytes(p.read_bytes())
    (r / "notes.txt").write_text("hello")
    (r / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300_000))
    (tmp_path / "outside.png").write_bytes((EXAMPLES / "red-square.png").read_bytes())
    (r / "escape.png").symlink_to(tmp_path / "outside.png")
    return r


async def test_thousand_good_jobs_survive_a_hundred_hostile_ones(
    fast_settings: Settings,
    sim: Simulator,
    tmp_path: Path,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HOSTILE_TEST_API_KEY", API_KEY)
    fast_settings.model.auth = "api-key"
    fast_settings.model.api_key_env = "HOSTILE_TEST_API_KEY"
    fast_settings.worker.allow_file_root = str(root)
    fast_settings.worker.concurrency = 32
    fast_settings.images.max_image_bytes = 200_000
    fast_settings.images.fetch_attempts = 1

    examples = sorted(p.name for p in EXAMPLES.iterdir())
    good: dict[str, str] = {}
    for i in range(1000):
        uri = (
            str(root / examples[i % len(examples)]) if i % 20 == 0 else f"gs://bucket/good-{i}.jpg"
        )
        good[f"good-{i}"] = json.dumps({"id": f"good-{i}", "image_uri": uri})
    hostile = [_hostile(i, root) for i in range(100)]
    lines = list(good.values()) + [line for line, _ in hostile]
    random.Random(6).shuffle(lines)
    fast_settings.worker.source = jobs_file(tmp_path, lines)
    expected = {_expected_id(line): kind for line, kind in hostile}
    assert len(expected) == 100  # every hostile job is told apart by its id

    # Log exactly as the worker does in production (JSON on stderr), into a buffer.
    log_buffer = io.StringIO()
    handler = logging.StreamHandler(log_buffer)
    handler.setFormatter(JsonFormatter())
    root_logger = logging.getLogger()
    root_logger.addHandler(handler)
    previous_level = root_logger.level
    root_logger.setLevel(logging.DEBUG)
    try:
        stats = await run_worker(fast_settings)
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(previous_level)

    results_path = Path(fast_settings.worker.sink.removeprefix("jsonl:"))
    dead_path = results_path.with_name("results.dead-letter.jsonl")
    results, dead = read_jsonl(results_path), read_jsonl(dead_path)

    assert stats.failed == 0
    assert stats.ok == 1000
    assert sorted(r["id"] for r in results) == sorted(good)
    assert all(r["status"] == "ok" for r in results)
    got = {d["id"]: d["error"]["type"] for d in dead}
    assert got == expected
    assert all(d["error"]["message"] for d in dead)
    # The model saw only good jobs and the one hostile kind only it can judge.
    assert sim.stats().requests == 1000 + sum(k == "model_rejected" for k in expected.values())
    # The key went to the model, and nowhere else.
    assert any(r.authorized for r in sim.requests)
    captured = capsys.readouterr()
    outputs = {
        "results": _text(results_path),
        "dead-letter": _text(dead_path),
        "logs": log_buffer.getvalue(),
        "stdout": captured.out,
        "stderr": captured.err,
    }
    assert "job_dead_lettered" in outputs["logs"]
    # The secrets were there to leak: the records keep the URL with the signature redacted.
    assert "X-Goog-Signature=<redacted>" in outputs["dead-letter"]
    for name, text in outputs.items():
        for secret in (API_KEY, "k3yk3yk3y", SIGNATURE, "ya29.fixture"):
            assert secret not in text, f"{secret!r} leaked into {name}"
