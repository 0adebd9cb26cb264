"""Jobs: parsing bytes into a job (only documented error types, ever) and the records
written for it (no secret in them)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.errors import ERROR_TYPES, JobError
from worker.jobs import MAX_JOB_BYTES, error_record, fallback_id, parse_job, result_record
from worker.protocols import Answer

PROPERTY = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def _outcome(raw: bytes) -> Any:
    """parse_job's job, or the JobError it raised (anything else propagates)."""
    try:
        return parse_job(raw)
    except JobError as exc:
        return exc


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"{not json", "invalid_json"),
        (b'{"image_uri": "gs://b/o"', "invalid_json"),
        (b"[1, 2]", "invalid_job"),
        (b'"gs://b/o"', "invalid_job"),
        (b"null", "invalid_job"),
        (b"12", "invalid_job"),
        (b'{"image_uri": 5}', "invalid_job"),
        (b'{"image_uri": "gs://b/o", "prompt": 3}', "invalid_job"),
        (b'{"image_uri": "gs://b/o", "prompt": "  "}', "invalid_job"),
        (b'{"image_uri": "gs://b/o", "prompt": "\\ud800"}', "invalid_job"),
        (b'{"image_uri": "gs://b/o", "id": {"a": 1}}', "invalid_job"),
        (b'{"image_uri": "gs://b/o", "id": true}', "invalid_job"),
        (b"\xff\xfe", "invalid_job"),
        (b"{}", "missing_image_uri"),
        (b'{"image_uri": null}', "missing_image_uri"),
        (b"   ", "missing_image_uri"),
        (b'{"image_uri": ""}', "invalid_image_uri"),
        (b'{"image_uri": "gs://b/\\u0000.png"}', "invalid_image_uri"),
        (b'{"image_uri": "gs://b/\\u0085.png"}', "invalid_image_uri"),
        (b'{"image_uri": "gs://b/\\udc00.png"}', "invalid_image_uri"),
        (b'{"image_uri": " gs://b/o"}', "invalid_image_uri"),
        (json.dumps({"image_uri": "gs://b/" + "x" * 2100}).encode(), "invalid_image_uri"),
        (b"gs://b/o with spaces.png", "invalid_image_uri"),
        (b"[" * 40_000 + b"]" * 40_000, "job_too_large"),
        (b"[" * 30_000 + b"]" * 30_000, "invalid_json"),  # too deep to parse
        (b'{"image_uri": "gs://b/o", "prompt": "' + b"a" * MAX_JOB_BYTES + b'"}', "job_too_large"),
    ],
)
def test_parse_job_error_types(raw: bytes, kind: str) -> None:
    with pytest.raises(JobError) as info:
        parse_job(raw)
    assert info.value.type == kind


def test_parse_job_accepts_bom_and_keeps_the_job_id_on_errors() -> None:
    job = parse_job(b'\xef\xbb\xbf{"id": 7, "image_uri": "gs://b/o.jpg"}')
    assert (job.id, job.image_uri) == ("7", "gs://b/o.jpg")
    with pytest.raises(JobError) as info:
        parse_job(b'{"id": "mine", "image_uri": 3}')
    assert info.value.job_id == "mine"


@PROPERTY
@given(st.binary(max_size=2048))
def test_parse_job_on_arbitrary_bytes_raises_only_documented_errors(raw: bytes) -> None:
    outcome = _outcome(raw)
    if isinstance(outcome, JobError):
        assert outcome.type in ERROR_TYPES
        assert outcome.message
    else:
        assert outcome.image_uri and outcome.id


@PROPERTY
@given(
    st.dictionaries(
        st.sampled_from(["image_uri", "id", "prompt", "other"]) | st.text(max_size=5),
        json_values | st.text(max_size=300),
        max_size=5,
    )
)
def test_parse_job_on_arbitrary_objects_raises_only_documented_errors(obj: dict[str, Any]) -> None:
    job = _outcome(json.dumps(obj).encode())
    if isinstance(job, JobError):
        assert job.type in ERROR_TYPES
    else:
        # Whatever is accepted can be sent: valid UTF-8 all the way.
        json.dumps({"id": job.id, "uri": job.image_uri, "prompt": job.prompt}).encode("utf-8")


def test_records_redact_signatures_and_tokens() -> None:
    uri = (
        "https://storage.googleapis.com/b/o.png?X-Goog-Algorithm=GOOG4-RSA-SHA256"
        "&X-Goog-Signature=deadbeefcafe&x=1"
    )
    raw = json.dumps({"id": "j", "image_uri": uri + "&sig=azuresecret&access_token=ya29.fixture-x"})
    rec = error_record(
        job_id="j",
        image_uri=uri,
        error_type="fetch_failed",
        message=f"failed: {uri} with Bearer ya29.fixture-abc",
        attempts=1,
        raw=raw.encode(),
    )
    text = json.dumps(rec)
    for secret in ("deadbeefcafe", "azuresecret", "ya29.fixture"):
        assert secret not in text
    assert "X-Goog-Algorithm=GOOG4-RSA-SHA256" in text  # the rest of the URL is kept
    job = parse_job(json.dumps({"id": "k", "image_uri": uri}).encode())
    ok = result_record(job, Answer("d", "m", None, None), attempts=1, started_at=0.0)
    assert "deadbeefcafe" not in json.dumps(ok)


def test_jobs_without_an_id_get_a_stable_one() -> None:
    a = parse_job(b"gs://b/o.jpg")
    b = parse_job(b'{"image_uri": "gs://b/o.jpg"}')
    assert a.id == b.id and a.id.startswith("h-")  # reruns agree, so resume can skip it
    assert parse_job(b'{"image_uri": "gs://b/o.jpg", "prompt": "p"}').id != a.id
    assert parse_job(b"gs://b/o.jpg", default_id="m-1").id == "m-1"
    assert fallback_id(b"\xff") == fallback_id(b"\xff") != fallback_id(b"\xfe")
    assert fallback_id(b"x", "m-2") == "m-2"
