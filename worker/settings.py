"""Settings: defaults < ``--config`` file < ``WORKER_<SECTION>__<KEY>`` env < CLI flags.

Every key lives in one section dataclass below and is documented, with its default, in
``config/default.toml``. :meth:`Settings.validate` runs at start-up, so a bad value stops
the process before any job is touched (the CLI prints one line and exits 2).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from .errors import ConfigError

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_PROMPT",
    "INLINE_MODES",
    "TIERS",
    "AuthMode",
    "BigQuerySinkSettings",
    "EndpointSettings",
    "GcsSinkSettings",
    "HttpSettings",
    "ImageBackend",
    "ImageSettings",
    "ImageUrlForm",
    "InlineMode",
    "LogSettings",
    "ModelSettings",
    "PriceSettings",
    "ProgressMode",
    "ProvisionedMode",
    "PubSubSettings",
    "ResolvedEndpoint",
    "RetrySettings",
    "Settings",
    "SimulatorSettings",
    "SinksSettings",
    "StoreSettings",
    "Tier",
    "WorkerSettings",
    "default_prices",
    "is_global",
    "load_settings",
    "resolve_endpoints",
    "vertex_base_url",
]

DEFAULT_MODEL = "google/gemini-2.0-flash-001"
DEFAULT_PROMPT = "Describe the following image:"
ENV_PREFIX = "WORKER_"

# Every mode is a Literal: mypy checks the code's uses, and loading a value checks it
# against the same list (see _coerce), so the allowed values live in one place.
AuthMode = Literal["google", "api-key", "none"]
ImageUrlForm = Literal["string", "object"]
InlineMode = Literal["auto", "always", "never"]
ImageBackend = Literal["auto", "vertex", "other"]
LatencyDist = Literal["fixed", "lognormal"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "text"]
#: The live progress display of ``run`` and ``serve`` (auto: on a terminal with text logs).
ProgressMode = Literal["auto", "on", "off"]
Concurrency = int | Literal["auto"]
#: Vertex AI consumption options (see worker/model.py for the headers each one sends).
Tier = Literal["standard", "priority", "flex"]
#: Provisioned Throughput: use it first when the project has it (auto), only it, or never.
ProvisionedMode = Literal["auto", "only", "never"]
TIERS: tuple[Tier, ...] = get_args(Tier)

AUTH_MODES: tuple[AuthMode, ...] = get_args(AuthMode)
INLINE_MODES: tuple[InlineMode, ...] = get_args(InlineMode)


def is_global(base_url: str) -> bool:
    """A Vertex AI URL of the ``global`` location (the only one serving Flex PayGo)."""
    return "/locations/global/" in base_url + "/"


def vertex_base_url(project: str, location: str) -> str:
    host = (
        "aiplatform.googleapis.com"
        if location == "global"
        else f"{location}-aiplatform.googleapis.com"
    )
    return f"https://{host}/v1/projects/{project}/locations/{location}/endpoints/openapi"


@dataclass
class EndpointSettings:
    """One entry of ``[[model.endpoints]]``: an OpenAI-compatible base URL, or a Vertex AI
    location (with ``model.project``), and what bounds the requests sent to it."""

    url: str = ""
    location: str = ""
    # Shown in records, logs and metrics; default: the location, else the URL's host.
    name: str = ""
    # Share of the work when several endpoints have room (relative).
    weight: float = 1.0
    # This endpoint's own concurrency ceiling; 0: worker.concurrency / max_concurrency.
    max_concurrency: int = 0
    # This endpoint's own hard ceilings; 0: worker.rpm / worker.tpm.
    rpm: float = 0.0
    tpm: float = 0.0
    # Serve only jobs of this tier (e.g. a "global" entry kept for flex); "": every tier
    # the endpoint supports (flex only on the global location).
    tier: Tier | Literal[""] = ""

    def validate(self, key: str) -> None:
        _require(bool(self.url) != bool(self.location), key, "needs exactly one of url or location")
        if self.url:
            _require(
                self.url.startswith(("http://", "https://")),
                f"{key}.url",
                "must start with http:// or https://",
            )
        _require(self.weight > 0, f"{key}.weight", "must be > 0")
        _require(0 <= self.max_concurrency <= 10_000, f"{key}.max_concurrency", "must be 0..10000")
        _require(self.rpm >= 0 and self.tpm >= 0, f"{key}.rpm", "rpm and tpm must be >= 0")


@dataclass(frozen=True)
class ResolvedEndpoint:
    """An endpoint as the worker uses it: a base URL and its bounds, all defaults applied."""

    name: str
    base_url: str
    weight: float
    max_concurrency: int
    rpm: float
    tpm: float
    tiers: frozenset[Tier]


@dataclass
class ModelSettings:
    base_url: str = ""
    project: str = ""
    location: str = ""
    # Several endpoints (regions, backends); empty: the one above. See EndpointSettings.
    endpoints: list[EndpointSettings] = field(default_factory=list)
    # Comma-separated Vertex AI locations, one endpoint each (with project); e.g.
    # "us-central1,europe-west4,global".
    locations: str = ""
    model: str = DEFAULT_MODEL
    prompt: str = DEFAULT_PROMPT
    max_tokens: int = 0
    timeout_s: float = 120.0
    auth: AuthMode = "google"
    api_key_env: str = "OPENAI_API_KEY"
    image_url_form: ImageUrlForm = "string"
    # The consumption tier of jobs that do not name one.
    tier: Tier = "standard"
    provisioned: ProvisionedMode = "auto"
    # Flex PayGo answers slowly: its requests get this timeout (Vertex AI's default is
    # 20 minutes, its maximum 30).
    flex_timeout_s: float = 1200.0
    # Generation settings sent with every request ("none": not sent); a job's own win.
    temperature: float | Literal["none"] = "none"
    top_p: float | Literal["none"] = "none"
    seed: int | Literal["none"] = "none"
    stop: str = ""
    # A JSON Schema file: answers are JSON objects that match it (see [schemas]).
    response_schema: str = ""

    def generation(self) -> dict[str, Any]:
        """The generation settings sent in the body (those set)."""
        out: dict[str, Any] = {}
        if self.max_tokens:
            out["max_tokens"] = self.max_tokens
        for name in ("temperature", "top_p", "seed"):
            value = getattr(self, name)
            if value != "none":
                out[name] = value
        if self.stop:
            out["stop"] = self.stop
        return out

    def validate(self) -> None:
        _require(bool(self.model.strip()), "model.model", "must not be empty")
        _require(bool(self.prompt.strip()), "model.prompt", "must not be empty")
        _require(self.max_tokens >= 0, "model.max_tokens", "must be >= 0 (0 = not sent)")
        _require(0 < self.timeout_s <= 3600, "model.timeout_s", "must be > 0 and <= 3600")
        _require(bool(self.api_key_env), "model.api_key_env", "must name an environment variable")
        if self.temperature != "none":
            _require(0 <= self.temperature <= 2, "model.temperature", "must be 0..2 or none")
        if self.top_p != "none":
            _require(0 < self.top_p <= 1, "model.top_p", "must be > 0 and <= 1, or none")
        _require(
            0 < self.flex_timeout_s <= 1800,
            "model.flex_timeout_s",
            "must be > 0 and <= 1800 (Vertex AI's maximum for Flex PayGo)",
        )
        if self.base_url:
            _require(
                self.base_url.startswith(("http://", "https://")),
                "model.base_url",
                "must start with http:// or https://",
            )
        for i, endpoint in enumerate(self.endpoints):
            endpoint.validate(f"model.endpoints[{i}]")

    def resolved_base_url(self) -> str:
        """The base URL in force: explicit, else Vertex AI's for project and location."""
        if self.base_url:
            return self.base_url.rstrip("/")
        project = self.project or os.environ.get("GOOGLE_CLOUD_PROJECT", "")
        location = self.location or os.environ.get("GOOGLE_CLOUD_LOCATION", "")
        if not project or not location:
            raise ConfigError(
                "model.base_url",
                "not set: give --base-url, or --project and --location "
                "(or GOOGLE_CLOUD_PROJECT and GOOGLE_CLOUD_LOCATION)",
            )
        return vertex_base_url(project, location)

    def _project(self, key: str) -> str:
        project = self.project or os.environ.get("GOOGLE_CLOUD_PROJECT", "")
        _require(
            bool(project), key, "a Vertex AI location needs --project (or GOOGLE_CLOUD_PROJECT)"
        )
        return project


def resolve_endpoints(settings: Settings) -> list[ResolvedEndpoint]:
    """Every endpoint the worker sends to, with names, bounds and tiers resolved.

    ``[[model.endpoints]]`` (or ``--endpoint``) wins; else ``model.locations``; else the
    one endpoint of ``model.base_url`` / project and location, as before there were many.
    """
    m, w = settings.model, settings.worker
    entries = list(m.endpoints)
    if not entries and m.locations.strip():
        entries = [
            EndpointSettings(location=loc.strip()) for loc in m.locations.split(",") if loc.strip()
        ]
    if not entries:
        entries = [EndpointSettings(url=m.resolved_base_url())]
    out: list[ResolvedEndpoint] = []
    for i, e in enumerate(entries):
        key = f"model.endpoints[{i}]" if m.endpoints else "model.locations"
        base_url = (e.url or vertex_base_url(m._project(key), e.location)).rstrip("/")
        name = e.name or e.location or _endpoint_name(base_url)
        tiers: frozenset[Tier] = (
            frozenset({e.tier})
            if e.tier
            else frozenset(
                {"standard", "priority", "flex"}
                if is_global(base_url)
                else {"standard", "priority"}
            )
        )
        if e.tier == "flex":
            _require(
                is_global(base_url),
                f"{key}.tier",
                "flex needs the global endpoint (Vertex AI serves Flex PayGo only there)",
            )
        out.append(
            ResolvedEndpoint(
                name=name,
                base_url=base_url,
                weight=e.weight,
                max_concurrency=e.max_concurrency,
                rpm=e.rpm or w.rpm,
                tpm=e.tpm or w.tpm,
                tiers=tiers,
            )
        )
    names = [e.name for e in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    _require(not dupes, "model.endpoints", f"names must be unique; repeated: {', '.join(dupes)}")
    served = frozenset().union(*(e.tiers for e in out))
    _require(
        m.tier in served,
        "model.tier",
        f"no endpoint serves {m.tier!r}"
        + (" (flex needs the global location: --locations ...,global)" if m.tier == "flex" else ""),
    )
    return out


def _endpoint_name(base_url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(base_url)
    match = re.search(r"/locations/([^/]+)/", parts.path + "/")
    if match:
        return match.group(1)
    host = parts.hostname or base_url
    return f"{host}:{parts.port}" if parts.port else host


@dataclass
class PriceSettings:
    """One model's list price, USD per million tokens, and a multiplier per tier (0: not
    known, so results of that tier get ``cost_usd: null``)."""

    input_usd_per_mtok: float = 0.0
    output_usd_per_mtok: float = 0.0
    flex_multiplier: float = 0.0
    priority_multiplier: float = 0.0

    def validate(self, key: str) -> None:
        for name in (
            "input_usd_per_mtok",
            "output_usd_per_mtok",
            "flex_multiplier",
            "priority_multiplier",
        ):
            _require(getattr(self, name) >= 0, f"{key}.{name}", "must be >= 0")


def default_prices() -> dict[str, PriceSettings]:
    """Vertex AI list prices (Standard PayGo, USD per 1M tokens), read 2026-11-30 from
    Google's pricing page (cloud.google.com/vertex-ai/generative-ai/pricing) as quoted in
    LiteLLM's price table. Flex PayGo is 50% of Standard (Vertex AI's Flex PayGo page);
    Google publishes no single Priority multiplier, so it is left unknown."""
    return {
        "google/gemini-2.0-flash-001": PriceSettings(0.15, 0.60, flex_multiplier=0.5),
        "google/gemini-2.5-flash": PriceSettings(0.30, 2.50, flex_multiplier=0.5),
        "google/gemini-2.5-flash-lite": PriceSettings(0.10, 0.40, flex_multiplier=0.5),
    }


@dataclass
class RetrySettings:
    max_attempts: int = 8
    deadline_s: float = 600.0
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def validate(self) -> None:
        _require(1 <= self.max_attempts <= 100, "retry.max_attempts", "must be 1..100")
        _require(0 < self.deadline_s <= 86_400, "retry.deadline_s", "must be > 0 and <= 86400")
        _require(self.initial_backoff_s >= 0, "retry.initial_backoff_s", "must be >= 0")
        _require(
            self.max_backoff_s >= self.initial_backoff_s,
            "retry.max_backoff_s",
            "must be >= retry.initial_backoff_s",
        )


@dataclass
class WorkerSettings:
    source: str = "stdin:"
    sink: str = "stdout:"
    dead_letter: str = ""
    # An int, or "auto" for the adaptive limiter bounded by min/max_concurrency.
    concurrency: Concurrency = 32
    min_concurrency: int = 1
    max_concurrency: int = 256
    # Jobs admitted from the source but not finished; 0 means twice the concurrency ceiling.
    max_jobs_in_flight: int = 0
    # Hard ceilings for a known quota (token buckets); 0 = none. Tokens are estimated
    # before a request and corrected from the answer's usage.
    rpm: float = 0.0
    tpm: float = 0.0
    # Stop admitting jobs once this much (USD) has been spent in this process's run; 0:
    # no budget. Needs a price for the model ([prices]).
    budget_usd: float = 0.0
    # Local files a job may name are read only below this directory ("" = working dir for
    # file/stdin sources, nowhere for remote sources).
    allow_file_root: str = ""
    # After SIGTERM/SIGINT: how long jobs in flight get to finish before they are nacked.
    shutdown_grace_s: float = 20.0

    def validate(self) -> None:
        _require(bool(self.source), "worker.source", "must not be empty")
        _require(0 <= self.shutdown_grace_s <= 3600, "worker.shutdown_grace_s", "must be 0..3600")
        _require(bool(self.sink), "worker.sink", "must not be empty")
        if isinstance(self.concurrency, int):
            _require(
                1 <= self.concurrency <= 10_000,
                "worker.concurrency",
                "must be an integer 1..10000 or 'auto'",
            )
        _require(1 <= self.min_concurrency <= 10_000, "worker.min_concurrency", "must be 1..10000")
        _require(
            self.min_concurrency <= self.max_concurrency <= 10_000,
            "worker.max_concurrency",
            "must be >= worker.min_concurrency and <= 10000",
        )
        _require(self.max_jobs_in_flight >= 0, "worker.max_jobs_in_flight", "must be >= 0")
        _require(self.rpm >= 0, "worker.rpm", "must be >= 0 (0 = no ceiling)")
        _require(self.tpm >= 0, "worker.tpm", "must be >= 0 (0 = no ceiling)")
        _require(self.budget_usd >= 0, "worker.budget_usd", "must be >= 0 (0 = no budget)")

    @property
    def concurrency_ceiling(self) -> int:
        return self.max_concurrency if self.concurrency == "auto" else int(self.concurrency)

    @property
    def jobs_in_flight_limit(self) -> int:
        return self.max_jobs_in_flight or 2 * self.concurrency_ceiling


@dataclass
class PubSubSettings:
    """Pub/Sub pull source, topic sinks and the push endpoint (``worker serve``)."""

    # Messages held (pulled, not yet acked or nacked); 0: jobs in flight + 25%.
    max_outstanding_messages: int = 0
    max_outstanding_bytes: int = 104_857_600
    # Each lease extension (modifyAckDeadline) asks for this much; also how soon a crashed
    # worker's messages come back.
    lease_extension_s: int = 60
    # Leases are not extended past this age; the message is then redelivered.
    max_lease_s: int = 3600
    # Acks and nacks gathered this long go out in one request.
    ack_window_s: float = 0.05
    request_timeout_s: float = 60.0
    # A call retried on transient errors (429, 5xx, resets) gives up after this long.
    retry_deadline_s: float = 60.0
    # worker serve: verify push OIDC tokens when set.
    push_audience: str = ""
    # Comma-separated service-account emails allowed to push (empty: any verified one).
    push_allowed_emails: str = ""
    # Where Google's OIDC signing certificates are fetched ("" = Google's).
    push_certs_url: str = ""

    def validate(self) -> None:
        _require(
            self.max_outstanding_messages >= 0,
            "pubsub.max_outstanding_messages",
            "must be >= 0 (0 = jobs in flight + 25%)",
        )
        _require(
            self.max_outstanding_bytes >= 65_536,
            "pubsub.max_outstanding_bytes",
            "must be >= 65536",
        )
        _require(10 <= self.lease_extension_s <= 600, "pubsub.lease_extension_s", "must be 10..600")
        _require(
            self.lease_extension_s <= self.max_lease_s <= 604_800,
            "pubsub.max_lease_s",
            "must be >= pubsub.lease_extension_s and <= 604800",
        )
        _require(0 <= self.ack_window_s <= 1, "pubsub.ack_window_s", "must be 0..1")
        _require(
            0 < self.request_timeout_s <= 600, "pubsub.request_timeout_s", "must be > 0 and <= 600"
        )
        _require(
            0 < self.retry_deadline_s <= 3600, "pubsub.retry_deadline_s", "must be > 0 and <= 3600"
        )
        if self.push_allowed_emails.strip():
            _require(
                bool(self.push_audience),
                "pubsub.push_allowed_emails",
                "needs pubsub.push_audience (tokens are only checked when an audience is set)",
            )
        if self.push_certs_url:
            _require(
                self.push_certs_url.startswith(("http://", "https://")),
                "pubsub.push_certs_url",
                "must start with http:// or https://",
            )

    @property
    def allowed_emails(self) -> frozenset[str]:
        return frozenset(e.strip() for e in self.push_allowed_emails.split(",") if e.strip())


@dataclass
class ImageSettings:
    """How image URIs become what the model is sent (see worker/images.py)."""

    # auto: Vertex AI reads gs:// and data: itself, everything else is fetched and inlined;
    # always: fetch and inline everything; never: pass every remote URI through.
    inline_images: InlineMode = "auto"
    # What "auto" assumes about the model: auto decides from the base URL.
    backend: ImageBackend = "auto"
    allow_http: bool = False
    # Lets job URLs reach loopback and private ranges (link-local, i.e. the cloud metadata
    # server, multicast, unspecified and reserved addresses stay refused).
    allow_private_networks: bool = False
    max_image_bytes: int = 7 * 1024 * 1024
    # Inlined image bytes all jobs may hold at once (0: no limit); bounds memory however
    # many jobs are admitted (see worker/images.py ImagePolicy.budget).
    max_inline_bytes_in_flight: int = 512 * 1024 * 1024
    fetch_timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 10.0
    max_redirects: int = 3
    fetch_attempts: int = 3
    ca_bundle: str = ""

    def validate(self) -> None:
        _require(
            1 <= self.max_image_bytes <= 1024**3, "images.max_image_bytes", "must be 1..1073741824"
        )
        _require(
            self.max_inline_bytes_in_flight == 0
            or self.max_inline_bytes_in_flight >= self.max_image_bytes,
            "images.max_inline_bytes_in_flight",
            "must be 0 (no limit) or at least images.max_image_bytes",
        )
        for key in ("fetch_timeout_s", "connect_timeout_s", "read_timeout_s"):
            value = getattr(self, key)
            _require(0 < value <= 3600, f"images.{key}", "must be > 0 and <= 3600")
        _require(0 <= self.max_redirects <= 10, "images.max_redirects", "must be 0..10")
        _require(1 <= self.fetch_attempts <= 10, "images.fetch_attempts", "must be 1..10")
        if self.ca_bundle:
            _require(Path(self.ca_bundle).is_file(), "images.ca_bundle", "must name a PEM file")


@dataclass
class SimulatorSettings:
    """The bundled simulator, started in-process when ``embedded`` (local runs, demos)."""

    embedded: bool = False
    latency_ms: float = 0.0
    latency_dist: LatencyDist = "fixed"
    rate_limit_rps: float = 0.0
    error_rate: float = 0.0
    reset_rate: float = 0.0

    def validate(self) -> None:
        _require(self.latency_ms >= 0, "simulator.latency_ms", "must be >= 0")
        _require(
            self.rate_limit_rps >= 0, "simulator.rate_limit_rps", "must be >= 0 (0 = no limit)"
        )
        _require(0 <= self.error_rate <= 1, "simulator.error_rate", "must be 0..1")
        _require(0 <= self.reset_rate <= 1, "simulator.reset_rate", "must be 0..1")


@dataclass
class HttpSettings:
    """The side server for probes and metrics (``/healthz``, ``/readyz``, ``/metrics``)."""

    port: int = 0  # 0: no server
    # All interfaces: the kubelet's probes and the scraper come from outside the pod.
    host: str = "0.0.0.0"
    # /healthz turns 503 when nothing was pulled or finished (and the source did not
    # answer "nothing to do") for this long.
    stall_timeout_s: float = 300.0
    # /healthz turns 503 when the event loop fell this far behind its watchdog.
    max_loop_lag_s: float = 5.0

    def validate(self) -> None:
        _require(0 <= self.port <= 65_535, "http.port", "must be 0..65535 (0 = no server)")
        _require(bool(self.host), "http.host", "must not be empty")
        _require(
            0 < self.stall_timeout_s <= 86_400, "http.stall_timeout_s", "must be > 0 and <= 86400"
        )
        _require(0 < self.max_loop_lag_s <= 3600, "http.max_loop_lag_s", "must be > 0 and <= 3600")


@dataclass
class LogSettings:
    level: LogLevel = "info"
    format: LogFormat = "auto"
    progress: ProgressMode = "auto"

    def validate(self) -> None:
        return None


@dataclass
class GcsSinkSettings:
    """``gs://BUCKET/PREFIX/`` sinks: records as JSONL objects, rolled by count, size, age."""

    # An object is finalised (and the jobs in it acked) at whichever comes first.
    roll_records: int = 10_000
    roll_bytes: int = 64 * 1024 * 1024
    roll_age_s: float = 10.0
    # Also finalise once no record has come for this long (0: off), so that a finished
    # batch run, or a pipeline whose admitted jobs all wait on this object, does not wait
    # out roll_age_s. Smaller: quicker acks, more (smaller) objects when traffic is thin.
    roll_idle_s: float = 0.5
    # Names this replica's objects (PREFIX/YYYY/MM/DD/HH/<time>-<replica>-<run>-<seq>.jsonl,
    # <run> random per process); empty: the host name and process id.
    replica: str = ""
    request_timeout_s: float = 120.0
    # A failed upload is retried (same object name, ifGenerationMatch=0) this long.
    retry_deadline_s: float = 300.0

    def validate(self) -> None:
        _require(
            1 <= self.roll_records <= 10_000_000, "sinks.gcs.roll_records", "must be 1..10000000"
        )
        _require(
            1024 <= self.roll_bytes <= 5 * 1024**3,
            "sinks.gcs.roll_bytes",
            "must be 1024..5368709120",
        )
        _require(0 < self.roll_age_s <= 3600, "sinks.gcs.roll_age_s", "must be > 0 and <= 3600")
        _require(0 <= self.roll_idle_s <= 3600, "sinks.gcs.roll_idle_s", "must be 0..3600")
        _require(
            self.replica == "" or self.replica.replace("-", "").replace("_", "").isalnum(),
            "sinks.gcs.replica",
            "must be letters, digits, - and _ only",
        )
        _require(
            0 < self.request_timeout_s <= 3600,
            "sinks.gcs.request_timeout_s",
            "must be > 0 and <= 3600",
        )
        _require(
            0 < self.retry_deadline_s <= 86_400,
            "sinks.gcs.retry_deadline_s",
            "must be > 0 and <= 86400",
        )


@dataclass
class BigQuerySinkSettings:
    """``bq:PROJECT.DATASET.TABLE`` sinks: rows streamed with ``tabledata.insertAll``."""

    # Create the table (partitioned by finished_at, clustered by status) if it is missing.
    create_table: bool = False
    # Rows per insertAll request (BigQuery recommends about 500).
    max_rows_per_request: int = 500
    request_timeout_s: float = 60.0
    retry_deadline_s: float = 300.0

    def validate(self) -> None:
        _require(
            1 <= self.max_rows_per_request <= 50_000,
            "sinks.bigquery.max_rows_per_request",
            "must be 1..50000",
        )
        _require(
            0 < self.request_timeout_s <= 3600,
            "sinks.bigquery.request_timeout_s",
            "must be > 0 and <= 3600",
        )
        _require(
            0 < self.retry_deadline_s <= 86_400,
            "sinks.bigquery.retry_deadline_s",
            "must be > 0 and <= 86400",
        )


@dataclass
class SinksSettings:
    gcs: GcsSinkSettings = field(default_factory=GcsSinkSettings)
    bigquery: BigQuerySinkSettings = field(default_factory=BigQuerySinkSettings)

    def validate(self) -> None:
        self.gcs.validate()
        self.bigquery.validate()


StoreKey = Literal["content", "uri"]


@dataclass
class StoreSettings:
    """The result store: reuse by content and exactly-once model calls per job id."""

    # none | sqlite:PATH | redis://HOST:PORT/DB (rediss:// for TLS)
    uri: str = "none"
    # content: an image is known by its bytes (or a gs:// object's generation and checksum);
    # uri: by its URI alone (cheaper; wrong if objects are overwritten in place).
    key: StoreKey = "content"
    # Stored answers lapse after this long; 0: never.
    ttl_s: float = 0.0
    # A claim on a job or an answer lapses after this long unless renewed (a crashed
    # holder's work is picked up again after it).
    lease_s: float = 60.0
    # How long a job waits for another worker's answer to the same job or image before it
    # calls the model itself.
    wait_s: float = 120.0

    def validate(self) -> None:
        _require(
            self.uri == "none" or self.uri.startswith(("sqlite:", "redis://", "rediss://")),
            "store.uri",
            "must be none, sqlite:PATH or redis://HOST:PORT/DB",
        )
        _require(self.ttl_s >= 0, "store.ttl_s", "must be >= 0 (0 = never)")
        _require(1 <= self.lease_s <= 3600, "store.lease_s", "must be 1..3600")
        _require(0 <= self.wait_s <= 3600, "store.wait_s", "must be 0..3600")


@dataclass
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    retry: RetrySettings = field(default_factory=RetrySettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    images: ImageSettings = field(default_factory=ImageSettings)
    simulator: SimulatorSettings = field(default_factory=SimulatorSettings)
    pubsub: PubSubSettings = field(default_factory=PubSubSettings)
    log: LogSettings = field(default_factory=LogSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    sinks: SinksSettings = field(default_factory=SinksSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    #: ``[prices."MODEL"]`` tables; defaults: default_prices().
    prices: dict[str, PriceSettings] = field(default_factory=default_prices)
    #: ``[schemas]``: output schemas by name (``name = "path/to/schema.json"``), chosen per
    #: job with its ``schema`` field.
    schemas: dict[str, str] = field(default_factory=dict)

    def validate(self) -> Settings:
        for f in dataclasses.fields(self):
            if f.name not in ("prices", "schemas"):
                getattr(self, f.name).validate()
        for model, price in self.prices.items():
            price.validate(f"prices.{model}")
        if self.worker.budget_usd:
            _require(
                self.model.model in self.prices,
                "worker.budget_usd",
                f"needs a price for {self.model.model!r} in [prices] (the spend cannot be known)",
            )
        return self

    def set(self, dotted: str, value: Any) -> None:
        """Set ``section.key`` (or ``section.sub.key``) from a file, env or flag value,
        coercing and checking its type."""
        *path, key = dotted.split(".")
        section: Any = self
        for i, name in enumerate(path):
            inner = getattr(section, name, None) if name in _field_names(section) else None
            if inner is None or not dataclasses.is_dataclass(inner):
                raise ConfigError(dotted, f"unknown section {'.'.join(path[: i + 1])!r}")
            section = inner
        if not path:
            raise ConfigError(dotted, "needs a section: SECTION.KEY")
        hints = typing.get_type_hints(type(section))
        if key in hints and dataclasses.is_dataclass(getattr(section, key)):
            raise ConfigError(dotted, f"is a table: set {dotted}.KEY")
        if key not in hints:
            known = ", ".join(
                f.name
                for f in dataclasses.fields(section)
                if not dataclasses.is_dataclass(getattr(section, f.name))
            )
            raise ConfigError(dotted, f"unknown key (known keys: {known})")
        setattr(section, key, _coerce(dotted, value, hints[key]))


def _field_names(obj: Any) -> frozenset[str]:
    return (
        frozenset(f.name for f in dataclasses.fields(obj))
        if dataclasses.is_dataclass(obj)
        else frozenset()
    )


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` (from TOML, the environment or a flag) as the type ``hint`` names.

    Literal choices are matched case-insensitively, so ``WORKER_LOG__LEVEL=DEBUG`` works;
    ``int | Literal["auto"]`` takes either. Anything else is a ConfigError naming the key.
    """
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, list):
            return [
                v if isinstance(v, item) else _build(item, v, f"{key}[{i}]")
                for i, v in enumerate(value)
            ]
        raise ConfigError(key, "must be a list of tables ([[...]] in the config file)")
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if typing.get_origin(hint) is typing.Union:
        options = typing.get_args(hint)
    choices: list[str] = []
    for kind in options:
        if typing.get_origin(kind) is Literal:
            allowed = typing.get_args(kind)
            text = value.strip().lower() if isinstance(value, str) else value
            if text in allowed:
                return text
            choices += [str(a) for a in allowed]
        elif kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _BOOL_WORDS:
                return value.lower() in ("1", "true", "yes", "on")
            choices.append("true or false")
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                return int(value)
            choices.append("an integer")
        elif kind is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            choices.append("a number")
        elif kind is str:
            if isinstance(value, str):
                return value
            choices.append("a string")
    raise ConfigError(key, f"must be {' or '.join(choices)} (got {value!r})")


def _build(cls: Any, table: Any, key: str) -> Any:
    """A dataclass from a TOML table, each value coerced and checked like any setting."""
    if not isinstance(table, Mapping):
        raise ConfigError(key, "must be a table")
    hints = typing.get_type_hints(cls)
    obj = cls()
    for name, value in table.items():
        if name not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(cls))
            raise ConfigError(f"{key}.{name}", f"unknown key (known keys: {known})")
        setattr(obj, name, _coerce(f"{key}.{name}", value, hints[name]))
    return obj


_BOOL_WORDS = frozenset({"1", "true", "yes", "on", "0", "false", "no", "off"})


def _apply_mapping(
    settings: Settings, data: Mapping[str, Any], origin: str, prefix: str = ""
) -> None:
    for name, body in data.items():
        dotted = f"{prefix}{name}"
        if not prefix and name == "prices" and isinstance(body, Mapping):
            # Model names hold dots and slashes: [prices."google/gemini-2.0-flash-001"].
            for model, table in body.items():
                settings.prices[model] = _build(PriceSettings, table, f"prices.{model}")
            continue
        if not prefix and name == "schemas" and isinstance(body, Mapping):
            for schema_name, path in body.items():
                if not isinstance(path, str) or not path:
                    raise ConfigError(
                        f"schemas.{schema_name}", "must be the path of a JSON Schema file"
                    )
                settings.schemas[schema_name] = path
            continue
        if not prefix and not isinstance(body, Mapping):
            raise ConfigError(name, f"{origin}: expected a [{name}] table")
        if isinstance(body, Mapping):
            _apply_mapping(settings, body, origin, f"{dotted}.")
        else:
            settings.set(dotted, body)


def load_settings(
    config_file: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build validated settings. ``overrides`` are CLI flags as ``{"section.key": value}``."""
    settings = Settings()
    if config_file:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("--config", f"file not found: {path}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
        _apply_mapping(settings, data, str(path))
    environ = os.environ if env is None else env
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX) and "__" in name:
            # WORKER_SECTION__KEY, or WORKER_SECTION__SUB__KEY for a nested table.
            settings.set(
                ".".join(part.lower() for part in name[len(ENV_PREFIX) :].split("__")), value
            )
    for dotted, value in (overrides or {}).items():
        if value is not None:
            settings.set(dotted, value)
    return settings.validate()
