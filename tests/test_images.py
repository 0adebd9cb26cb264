"""The inlining policy, local files, job validation and redaction; property-based tests
(hypothesis) that no input makes the parser or the URI checks raise anything but a
documented JobError."""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.errors import ERROR_TYPES, JobError
from worker.fetch import AddressGuard, display_url, storage_endpoint
from worker.images import ImagePolicy, backend_reads_uris
from worker.settings import INLINE_MODES, InlineMode

from .helpers import EXAMPLES, job_error

PNG = (EXAMPLES / "red-square.png").read_bytes()
GIF = (EXAMPLES / "yellow-dot.gif").read_bytes()
PROPERTY = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


# -- which backend reads gs:// itself ------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "base_url", "embedded", "expected"),
    [
        (
            "auto",
            "https://us-central1-aiplatform.googleapis.com/v1/projects/p/locations/us-central1/endpoints/openapi",
            False,
            True,
        ),
        ("auto", "https://aiplatform.googleapis.com/v1/projects/p/locations/global", False, True),
        (
            "auto",
            "https://psc.example.internal/v1/projects/p/locations/l/endpoints/openapi",
            False,
            True,
        ),
        ("auto", "https://api.openai.com/v1", False, False),
        ("auto", "http://localhost:11434/v1", False, False),
        ("auto", "https://aiplatform.googleapis.com.evil.example/v1", False, False),
        ("auto", "http://127.0.0.1:9/v1", True, True),
        ("vertex", "http://localhost:8000/v1", False, True),
        ("other", "https://aiplatform.googleapis.com/v1", False, False),
    ],
)
def test_backend_detection(backend: str, base_url: str, embedded: bool, expected: bool) -> None:
    assert backend_reads_uris(backend, base_url, embedded_simulator=embedded) is expected


# -- inlining policy --------------------------------------------------------------------------


async def test_never_passes_remote_uris_through() -> None:
    policy = ImagePolicy(file_root=None, inline_images="never")
    for uri in ("gs://b/o.jpg", "https://example.com/a.png", "data:image/png;base64,AAAA"):
        assert await policy.resolve(uri) == uri


async def test_auto_for_vertex_passes_gs_and_data_but_fetches_https() -> None:
    policy = ImagePolicy(file_root=None, inline_images="auto", backend_reads_uris=True)
    assert await policy.resolve("gs://b/o.jpg") == "gs://b/o.jpg"
    assert await policy.resolve("data:image/png;base64,AAAA") == "data:image/png;base64,AAAA"
    # https:// is fetched (here: no fetcher was given, so that fails as fetch_failed).
    err = await job_error(policy.resolve("https://example.com/a.png"))
    assert err.type == "fetch_failed"


async def test_inlined_data_urls_are_decoded_and_relabelled_from_the_bytes() -> None:
    policy = ImagePolicy(file_root=None, inline_images="always")
    lying = "data:image/jpeg;base64," + base64.b64encode(GIF).decode()
    assert await policy.resolve(lying) == "data:image/gif;base64," + base64.b64encode(GIF).decode()
    for uri, kind in [
        ("data:image/png;base64,%%%", "invalid_image_uri"),
        ("data:image/png;base64", "invalid_image_uri"),
        (
            "data:image/png;base64," + base64.b64encode(b"plain text").decode(),
            "unsupported_media_type",
        ),
        ("data:text/plain,hello", "unsupported_media_type"),
    ]:
        err = await job_error(policy.resolve(uri))
        assert err.type == kind, uri
    small = ImagePolicy(file_root=None, inline_images="always", max_image_bytes=100)
    err = await job_error(small.resolve("data:image/png;base64," + base64.b64encode(PNG).decode()))
    assert err.type == "image_too_large"


@pytest.mark.parametrize(
    ("uri", "kind"),
    [
        ("ftp://example.com/a.png", "unsupported_scheme"),
        ("javascript:alert(1)", "unsupported_scheme"),
        ("HTTP://example.com/a.png", "unsupported_scheme"),
        ("file://remote.example/etc/passwd", "unsupported_scheme"),
        ("https:example.com/a.png", "invalid_image_uri"),
        ("gs://bucket-only", "invalid_image_uri"),
        ("gs:///object", "invalid_image_uri"),
    ],
)
async def test_bad_uris_are_refused_with_the_right_type(uri: str, kind: str) -> None:
    policy = ImagePolicy(file_root=None, inline_images="never")
    err = await job_error(policy.resolve(uri))
    assert err.type == kind


async def test_http_only_when_allowed() -> None:
    policy = ImagePolicy(file_root=None, inline_images="never", allow_http=True)
    assert await policy.resolve("http://example.com/a.png") == "http://example.com/a.png"


# -- local files -------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "sub").mkdir(parents=True)
    (r / "sub" / "ok.png").write_bytes(PNG)
    (r / "notes.txt").write_text("not an image")
    (r / "big.png").write_bytes(PNG + bytes(5000))
    (tmp_path / "secret.png").write_bytes(PNG)
    (r / "link-out.png").symlink_to(tmp_path / "secret.png")
    (r / "link-in.png").symlink_to(r / "sub" / "ok.png")
    os.mkfifo(r / "pipe.png")
    return r


@pytest.mark.parametrize(
    ("uri", "kind"),
    [
        ("sub/ok.png", None),
        ("link-in.png", None),
        ("file:sub/ok.png", None),
        ("sub/../sub/ok.png", None),
        ("link-out.png", "file_not_allowed"),
        ("../secret.png", "file_not_allowed"),
        ("sub/../../secret.png", "file_not_allowed"),
        ("/etc/passwd", "file_not_allowed"),
        ("file:///etc/passwd", "file_not_allowed"),
        ("file:///%2e%2e/etc/passwd", "file_not_allowed"),
        ("missing.png", "file_not_found"),
        ("sub", "file_not_found"),
        ("pipe.png", "file_not_found"),
        ("notes.txt", "unsupported_media_type"),
        ("big.png", "image_too_large"),
    ],
)
async def test_local_files_only_below_the_root(root: Path, uri: str, kind: str | None) -> None:
    policy = ImagePolicy(file_root=str(root), max_image_bytes=4096)
    if uri.startswith("file:") and not uri.startswith("file:/"):
        uri = f"file://{root}/{uri.removeprefix('file:')}"
    if kind is None:
        assert (
            await policy.resolve(uri) == "data:image/png;base64," + base64.b64encode(PNG).decode()
        )
    else:
        err = await job_error(policy.resolve(uri))
        assert err.type == kind, err.message


async def test_untrusted_sources_get_no_local_files(root: Path) -> None:
    policy = ImagePolicy(file_root=None)
    err = await job_error(policy.resolve(str(root / "sub" / "ok.png")))
    assert err.type == "file_not_allowed"


def _outcome(fn: Any, *args: Any) -> Any:
    """The function's result, or the JobError it raised (anything else propagates)."""
    try:
        return fn(*args)
    except JobError as exc:
        return exc


# -- properties -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
uri_text = st.one_of(
    st.text(max_size=300),
    st.builds(
        lambda scheme, rest: scheme + rest,
        st.sampled_from(
            [
                "gs://",
                "https://",
                "http://",
                "data:",
                "file:",
                "file://",
                "ftp://",
                "GS://",
                "",
                "/",
            ]
        ),
        st.text(max_size=200),
    ),
)


@PROPERTY
@given(uri_text, st.sampled_from(INLINE_MODES), st.booleans())
def test_uri_checks_raise_only_documented_errors(uri: str, mode: InlineMode, vertex: bool) -> None:
    policy = ImagePolicy(file_root=None, inline_images=mode, backend_reads_uris=vertex)
    sent = _outcome(lambda: asyncio.run(policy.resolve(uri)))
    if isinstance(sent, JobError):
        assert sent.type in ERROR_TYPES
    else:
        assert sent.startswith(("gs://", "https://", "data:"))


@PROPERTY
@given(st.text(max_size=80) | st.ip_addresses().map(str))
def test_host_guard_raises_only_documented_errors(host: str) -> None:
    outcome = _outcome(AddressGuard().check_host, host)
    if isinstance(outcome, JobError):
        assert outcome.type in ("blocked_address", "invalid_image_uri")
    display_url("https://" + host + "/x?sig=secret")


@PROPERTY
@given(
    st.ip_addresses(network="127.0.0.0/8")
    | st.ip_addresses(network="10.0.0.0/8")
    | st.ip_addresses(network="169.254.0.0/16")
    | st.ip_addresses(network="::ffff:127.0.0.0/104")
    | st.ip_addresses(network="fe80::/10")
    | st.ip_addresses(network="fc00::/7")
)
def test_internal_ranges_are_always_blocked(ip: Any) -> None:
    assert AddressGuard().blocked_reason(ip) is not None


# -- secrets ------------------------------------------------------------------------------------


def test_fetch_messages_never_carry_the_query() -> None:
    assert display_url("https://u:p@h.example:8443/a/b.png?X-Goog-Signature=s#f") == (
        "https://h.example:8443/a/b.png"
    )


def test_storage_endpoint_follows_storage_emulator_host() -> None:
    assert storage_endpoint({}) == ("https://storage.googleapis.com", False)
    assert storage_endpoint({"STORAGE_EMULATOR_HOST": "localhost:9023"}) == (
        "http://localhost:9023",
        True,
    )
    assert storage_endpoint({"STORAGE_EMULATOR_HOST": "https://gcs.test/"}) == (
        "https://gcs.test",
        True,
    )


async def test_inline_budget_bounds_reads_and_keeps_only_what_the_url_needs(
    tmp_path: Path,
) -> None:
    import anyio

    image = tmp_path / "red.png"
    image.write_bytes((EXAMPLES / "red-square.png").read_bytes())
    policy = ImagePolicy(
        file_root=str(tmp_path), max_image_bytes=10_000, inline_budget_bytes=40_000
    )
    assert policy.budget is not None

    url, held = await policy.resolve_held(str(image))

    assert url.startswith("data:image/png;base64,")
    # After the read only the URL and the request body's copy of it stay reserved.
    assert held == 2 * len(url) == policy.budget.used
    # With the budget full, a new read (which reserves the worst case first) waits ...
    filler = policy.budget.capacity - policy.budget.used
    await policy.budget.take(filler)
    finished: list[tuple[str, int]] = []

    async def read() -> None:
        finished.append(await policy.resolve_held(str(image)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        await anyio.wait_all_tasks_blocked()
        assert finished == []  # blocked: nothing else can make progress
        assert policy.budget.used == policy.budget.capacity
        tg.cancel_scope.cancel()
    assert finished == []
    assert policy.budget.used == policy.budget.capacity  # the cancelled wait took nothing
    # ... and goes ahead once jobs release what they held.
    policy.budget.give(filler)
    policy.release(held)
    assert policy.budget.used == 0
    _, again = await policy.resolve_held(str(image))
    policy.release(again)
    assert policy.budget.used == 0
    # A failed read gives its reservation back.
    with pytest.raises(JobError):
        await policy.resolve_held(str(tmp_path / "missing.png"))
    assert policy.budget.used == 0
