"""The model call: one ``AsyncOpenAI`` per process, the seed's request, the answer's text.

The SDK's own retries are off (``max_retries=0``): :mod:`worker.retry` owns retrying, so
backoff, Retry-After and the per-job deadline are decided in one place. The SDK's
exceptions stop here: :class:`ModelClient` raises :class:`~worker.errors.ModelError`
(with its kind, status, Retry-After and a short, secret-free message), so nothing past
it knows which SDK answered.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import aiohttp
import httpx2
import openai

from .errors import EmptyAnswer, ModelError
from .limits import parse_reset_s
from .protocols import Answer, Quota, TokenProvider
from .retry import kind_for_status, retry_after_s
from .settings import TIERS, ModelSettings, ProvisionedMode, Tier

__all__ = ["ModelCall", "ModelClient", "build_messages", "endpoint_name", "tier_headers"]


def endpoint_name(base_url: str) -> str:
    """A Vertex AI URL's location (``us-central1``, ``global``), else the URL's host."""
    parts = urlsplit(base_url)
    match = re.search(r"/locations/([^/]+)/", parts.path + "/")
    if match:
        return match.group(1)
    return parts.hostname or base_url


def build_messages(prompt: str, image_url: str, *, form: str = "string") -> list[dict[str, Any]]:
    """Google's sample: one user message, a text part then an ``image_url`` part.

    ``form="string"`` sends ``"image_url": "<url>"`` exactly as the sample does (Vertex AI
    accepts it); ``"object"`` sends ``{"url": ...}`` for backends that insist on OpenAI's shape.
    """
    image: str | dict[str, str] = image_url if form == "string" else {"url": image_url}
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": prompt},
                {"type": "image_url", "image_url": image},
            ],
        }
    ]


@dataclass(frozen=True, slots=True)
class ModelCall:
    """One request as the pipeline asks for it."""

    image_url: str
    prompt: str | None = None
    tier: Tier = "standard"
    #: Body fields beyond model and messages: generation settings, response_format.
    extra: Mapping[str, Any] | None = None
    #: A second try at a structured answer: (the answer given, what was wrong with it).
    repair: tuple[str, str] | None = None


def tier_headers(tier: Tier, provisioned: ProvisionedMode, flex_timeout_s: float) -> dict[str, str]:
    """The headers Vertex AI reads to choose a consumption option (README, "Quota, regions
    and cost", cites the pages). Other OpenAI-compatible backends ignore them."""
    headers: dict[str, str] = {}
    if provisioned == "only":
        headers["X-Vertex-AI-LLM-Request-Type"] = "dedicated"  # PT only, 429 when spent
        return headers
    if provisioned == "never":
        headers["X-Vertex-AI-LLM-Request-Type"] = "shared"  # skip PT, PayGo only
    if tier in ("flex", "priority"):
        headers["X-Vertex-AI-LLM-Shared-Request-Type"] = tier
    if tier == "flex":
        headers["X-Server-Timeout"] = str(int(flex_timeout_s))
    return headers


class ModelClient:
    """One OpenAI-compatible endpoint: builds the request, sends it, reads the answer.

    Owns its ``AsyncOpenAI`` client and connection pool (close with :meth:`aclose`).
    One call is one request: it never retries, waits for quota or holds a slot; the
    endpoint pool and the pipeline do that around it. Its errors are
    :class:`~worker.errors.ModelError`; it never puts a token in one.
    """

    def __init__(
        self,
        settings: ModelSettings,
        tokens: TokenProvider,
        *,
        base_url: str | None = None,
        name: str | None = None,
        max_connections: int = 256,
    ) -> None:
        self.settings = settings
        self.tokens = tokens
        self.base_url = (base_url or settings.resolved_base_url()).rstrip("/")
        #: Shown in records, logs and metric labels (never a key or a token).
        self.name = name or endpoint_name(self.base_url)
        # Size the pool to the concurrency ceiling: a request should never queue for a
        # connection inside the HTTP client while our own limiter thinks it is in flight.
        limits = httpx2.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._http = openai.DefaultAioHttpClient(limits=limits, timeout=settings.timeout_s)
        self.client = openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key="unused" if settings.auth == "none" else tokens.token,
            max_retries=0,
            timeout=settings.timeout_s,
            http_client=self._http,
        )
        # The SDK's eight X-Stainless-* telemetry headers mean nothing to Vertex AI, and
        # every header is normalised, merged and copied on each request: leaving them out
        # saved ~0.03 ms of CPU per request (of ~0.5) in a profile against the simulator.
        stainless = [h for h in self.client.default_headers if h.lower().startswith("x-stainless")]
        if stainless:
            self.client = self.client.with_options(
                # ``omit`` removes a default header (typed as str by the SDK).
                default_headers=cast("dict[str, str]", dict.fromkeys(stainless, openai.omit))
            )
        # Built once per tier: every request shares them (the SDK copies what it merges).
        # Typed loosely on purpose: the SDK's RequestOptions type lives in a private module.
        self._options = {tier: self._tier_options(tier) for tier in TIERS}

    def _tier_options(self, tier: Tier) -> dict[str, Any]:
        s = self.settings
        headers: dict[str, Any] = dict(tier_headers(tier, s.provisioned, s.flex_timeout_s))
        if s.auth == "none":
            # No credentials at all: tell the SDK the header is left out on purpose.
            headers["Authorization"] = openai.omit
        options: dict[str, Any] = {"headers": headers} if headers else {}
        if tier == "flex":
            options["timeout"] = s.flex_timeout_s
        return options

    @property
    def request_options(self) -> Any:
        """The options a standard request passes to ``client.post`` (bench/ reuses them)."""
        return self._options["standard"]

    async def aclose(self) -> None:
        await self.client.close()

    async def describe(self, call: ModelCall) -> Answer:
        """One request. A 401 forces one token refresh (shared by every request that saw
        the same token rejected) and raises ``unauthorized``: the retry loop goes again
        at once."""
        s = self.settings
        messages = build_messages(call.prompt or s.prompt, call.image_url, form=s.image_url_form)
        if call.repair is not None:
            previous, complaint = call.repair
            messages += [
                {"role": "assistant", "content": previous},
                {"role": "user", "content": complaint},
            ]
        body: dict[str, Any] = {"model": s.model, "messages": messages}
        if call.extra:
            body.update(call.extra)
        # The token this request will carry (the SDK asks the same cached provider).
        sent = await self.tokens.token()
        try:
            return await self._create(body, call.tier)
        except openai.APIError as exc:
            error = _model_error(exc)
        if error.kind == "unauthorized":
            await self.tokens.refresh_after_rejection(sent)
        raise error

    async def _create(self, body: dict[str, Any], tier: Tier) -> Answer:
        # The hot path. ``chat.completions.create`` spends ~1 ms of CPU per call walking
        # our params against its TypedDicts (``async_maybe_transform``) and ~0.2 ms
        # building pydantic models of the answer: profiled, that was most of the worker's
        # CPU per job. ``client.post`` is the same AsyncOpenAI request path (base URL,
        # auth, headers, timeout, APIStatusError mapping) without either step; the body is
        # already plain JSON and we read the four fields we need ourselves.
        response = await self.client.post(
            "/chat/completions",
            cast_to=httpx2.Response,
            body=body,
            options=cast(Any, self._options[tier]),
        )
        answer = self._answer(response.content)
        answer.endpoint = self.name
        answer.tier = tier
        answer.quota = quota_headers(response.headers)
        return answer

    def _answer(self, content: bytes) -> Answer:
        try:
            data = json.loads(content)
            choices = data.get("choices") or []
        except (ValueError, AttributeError):
            raise EmptyAnswer("the answer is not a chat completion") from None
        choice = choices[0] if choices and isinstance(choices[0], dict) else None
        if choice is None:
            raise EmptyAnswer("no choices")
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else None
        finish_reason = choice.get("finish_reason")
        if not isinstance(text, str):
            raise EmptyAnswer(finish_reason if isinstance(finish_reason, str) else "no text")
        model = data.get("model")
        return Answer(
            text=text,
            model=model if isinstance(model, str) and model else self.settings.model,
            usage=_usage(data.get("usage")),
            finish_reason=finish_reason if isinstance(finish_reason, str) else None,
        )


def _usage(usage: Any) -> dict[str, int] | None:
    """Token counts as integers; a backend that reports none (or nonsense) gets None."""
    if not isinstance(usage, dict):
        return None
    try:
        return {
            key: int(usage.get(key) or 0)
            for key in ("prompt_tokens", "completion_tokens", "total_tokens")
        }
    except (TypeError, ValueError):
        return None


def _model_error(exc: openai.APIError) -> ModelError:
    """The SDK's exception as the worker's own (see :mod:`worker.retry` for the kinds)."""
    if isinstance(exc, openai.APIConnectionError):  # APITimeoutError included
        cause = _wire_cause(exc)
        # The SDK's aiohttp bridge reports a reset connection as a ConnectTimeout, hence an
        # APITimeoutError: only a TimeoutError underneath is a timeout. The difference
        # matters: an adaptive limit reads a timeout as congestion and cuts, and 2% of
        # connections reset by a flaky backend cut it to a fraction of the quota.
        if isinstance(cause, TimeoutError) or (
            cause is None and isinstance(exc, openai.APITimeoutError)
        ):
            return ModelError(
                0, "timeout", "no answer within the request timeout", kind="transient"
            )
        detail = type(cause).__name__ if cause is not None else "connection failed"
        return ModelError(0, "connection_error", detail, kind="transient")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        code, message = _error_body(exc)
        error = ModelError(
            status,
            code,
            message,
            kind=kind_for_status(status),
            retry_after_s=retry_after_s(exc.response.headers),
        )
        error.quota = quota_headers(exc.response.headers)
        return error
    return ModelError(0, "error", type(exc).__name__, kind="transient")


def quota_headers(headers: Mapping[str, str]) -> Quota | None:
    """(limit, remaining, reset_s) from OpenAI-style ``x-ratelimit-*-requests`` headers;
    None when the backend sends none (Vertex AI does not)."""
    remaining = headers.get("x-ratelimit-remaining-requests")
    if remaining is None:
        return None
    try:
        limit = float(headers.get("x-ratelimit-limit-requests") or "")
        left = float(remaining)
    except ValueError:
        return None
    reset = parse_reset_s(headers.get("x-ratelimit-reset-requests") or "")
    if reset is None:
        return None
    return (limit, left, reset)


def _wire_cause(exc: BaseException) -> BaseException | None:
    """The innermost OS-level cause of a connection failure (a TimeoutError, a reset...)."""
    found: BaseException | None = None
    seen = 0
    current = exc.__cause__ or exc.__context__
    while current is not None and seen < 8:
        if isinstance(current, TimeoutError):
            return current  # a timeout anywhere in the chain is the story
        # aiohttp's own connection errors count too: a peer that closes the connection
        # without answering (ServerDisconnectedError, not an OSError) is a broken
        # connection, not a timeout, though the SDK's bridge reports it as one.
        if isinstance(current, OSError | aiohttp.ClientConnectionError):
            found = current
        current = current.__cause__ or current.__context__
        seen += 1
    return found


def _error_body(exc: openai.APIStatusError) -> tuple[str, str]:
    """(status name, message) from an error body; short and secret-free. Vertex AI wraps
    its error in a list, which the SDK cannot read, so this does."""
    body: Any = exc.body
    if isinstance(body, list) and body:
        body = body[0]
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            code = inner.get("status") or inner.get("code") or inner.get("type") or ""
            message = inner.get("message")
            if isinstance(message, str):
                return str(code), message[:500]
    return "", exc.message[:500]
