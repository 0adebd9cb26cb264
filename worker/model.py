"""The model call: one ``AsyncOpenAI`` per process, the seed's request, the answer's text.

The SDK's own retries are off (``max_retries=0``): :mod:`worker.retry` owns retrying, so
backoff, Retry-After and the per-job deadline are decided in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx2
import openai

from .auth import NoTokens, TokenProvider
from .settings import ModelSettings

__all__ = ["Answer", "ModelClient", "build_messages"]


@dataclass(slots=True, frozen=True)
class Answer:
    text: str
    model: str
    usage: dict[str, int] | None
    finish_reason: str | None


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


class ModelClient:
    def __init__(
        self, settings: ModelSettings, tokens: TokenProvider, *, max_connections: int = 256
    ) -> None:
        self.settings = settings
        self.tokens = tokens
        self.base_url = settings.resolved_base_url()
        # Size the pool to the concurrency ceiling: a request should never queue for a
        # connection inside the HTTP client while our own limiter thinks it is in flight.
        limits = httpx2.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._http = openai.DefaultAioHttpClient(limits=limits, timeout=settings.timeout_s)
        self.client = openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key="unused" if isinstance(tokens, NoTokens) else tokens.token,
            max_retries=0,
            timeout=settings.timeout_s,
            http_client=self._http,
        )
        self._extra: dict[str, Any] = {}
        if isinstance(tokens, NoTokens):
            # No credentials at all: tell the SDK the header is left out on purpose.
            self._extra["extra_headers"] = {"Authorization": openai.omit}
        if settings.max_tokens:
            self._extra["max_tokens"] = settings.max_tokens

    async def aclose(self) -> None:
        await self.client.close()

    async def describe(self, image_url: str, prompt: str | None = None) -> Answer:
        """One request; a 401 forces one token refresh and one immediate retry."""
        messages = build_messages(
            prompt or self.settings.prompt, image_url, form=self.settings.image_url_form
        )
        # The token this request will carry (the SDK asks the same cached provider).
        sent = await self.tokens.token()
        try:
            return await self._create(messages)
        except openai.AuthenticationError:
            # Revoked or expired early: the provider refreshes once however many requests
            # saw the same token rejected, then this request goes again at once.
            await self.tokens.refresh_after_rejection(sent)
            return await self._create(messages)

    async def _create(self, messages: list[dict[str, Any]]) -> Answer:
        completion = await self.client.chat.completions.create(
            model=self.settings.model,
            messages=messages,  # type: ignore[arg-type]
            **self._extra,
        )
        choice = completion.choices[0] if completion.choices else None
        text = choice.message.content if choice is not None else None
        if text is None:
            raise EmptyAnswer(choice.finish_reason if choice is not None else "no choices")
        usage = completion.usage
        return Answer(
            text=text,
            model=completion.model or self.settings.model,
            usage=(
                {
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                    "total_tokens": usage.total_tokens,
                }
                if usage is not None
                else None
            ),
            finish_reason=choice.finish_reason if choice is not None else None,
        )


class EmptyAnswer(Exception):
    """The model answered 200 with no text (e.g. a safety block): permanent for this job."""
