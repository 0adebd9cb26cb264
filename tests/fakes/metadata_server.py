"""A fake GCE metadata server for exercising the real ``google-auth`` library.

``google.auth.compute_engine`` reads ``GCE_METADATA_HOST`` (``host:port``) once, when
``google.auth.compute_engine._metadata`` is imported, and ``GCE_METADATA_IP`` on every
call (it is the target of the ``ping()`` done by ``google.auth.default()`` to detect
GCE). Point both at :attr:`MetadataServer.host_port` *before* google-auth is imported
(typically in a subprocess), with ``GOOGLE_APPLICATION_CREDENTIALS`` unset and
``CLOUDSDK_CONFIG`` pointing to an empty directory so no other ADC source wins.

What google-auth does against this server (2.4x):

* ``GET /`` with ``Metadata-Flavor: Google``; GCE is detected when the answer is 200 and
  carries the response header ``Metadata-Flavor: Google``.
* ``GET /computeMetadata/v1/project/project-id`` (plain text).
* ``GET /computeMetadata/v1/instance/service-accounts/default/?recursive=true`` (JSON
  with ``email``, ``scopes`` and ``aliases``).
* ``GET /computeMetadata/v1/instance/service-accounts/default/token[?scopes=a,b]``
  (JSON ``access_token``/``expires_in``/``token_type``). google-auth sets
  ``expiry = utcnow() + expires_in`` and treats a token as stale
  ``_helpers.REFRESH_THRESHOLD`` (3 min 45 s) before that, so with a TTL of a few
  seconds ``credentials.valid`` is already False right after a refresh: code under test
  that relies on ``valid``/``expired`` will refresh before every use.
* 500/503/504/408/429 answers are retried by google-auth (backoff starting at ~1 s).

Every response carries ``Metadata-Flavor: Google``. Requests under ``/computeMetadata/``
without the ``Metadata-Flavor: Google`` request header, or with ``X-Forwarded-For``,
get 403 like the real server; unknown paths get 404.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from collections.abc import Callable
from typing import Any, Self

from aiohttp import web

from . import start_app

TOKEN_PREFIX = "ya29.fixture-"
_V1 = "/computeMetadata/v1/"
_SA_PREFIX = _V1 + "instance/service-accounts/"
_DEFAULT_SCOPES = (
    "https://www.googleapis.com/auth/cloud-platform",
    "https://www.googleapis.com/auth/userinfo.email",
)


class MetadataServer:
    """Loopback fake of the GCE metadata server (see module docstring)."""

    def __init__(
        self,
        *,
        token_ttl_s: float = 3600.0,
        project_id: str = "test-project",
        email: str = "worker@test-project.iam.gserviceaccount.com",
        on_issue: Callable[[str, float], None] | None = None,
        delay_s: float = 0.0,
        on_revoke: Callable[[list[str]], None] | None = None,
        numeric_project_id: str = "123456789012",
        zone: str = "us-central1-a",
        scopes: tuple[str, ...] = _DEFAULT_SCOPES,
    ) -> None:
        self.token_ttl_s = token_ttl_s
        self.project_id = project_id
        self.email = email
        self.on_issue = on_issue
        self.on_revoke = on_revoke
        self.delay_s = delay_s
        self.numeric_project_id = numeric_project_id
        self.zone = zone
        self.scopes = list(scopes)
        #: Answer the next N token requests with 503 (google-auth retries those).
        self.fail_next = 0
        #: (token, issued_at epoch, expires_at epoch), in issue order.
        self.issued: list[tuple[str, float, float]] = []
        self.revoked: set[str] = set()
        #: Every request seen: (method, path with query string).
        self.requests: list[tuple[str, str]] = []
        #: ``scopes`` query parameter of each token request (None when absent).
        self.token_scopes: list[str | None] = []
        self.token_requests = 0
        self.failed_token_requests = 0
        self.rejected_requests = 0
        self.port = 0
        self.host = "127.0.0.1"
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def host_port(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host_port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if self._runner is not None:
            raise RuntimeError("MetadataServer already started")
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner, self.port = await start_app(app, host, port)
        self._runner = runner
        self.host = host

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ token state
    def revoke_all(self) -> None:
        """Mark every token issued so far as revoked and tell ``on_revoke``."""
        newly = [tok for tok, _, _ in self.issued if tok not in self.revoked]
        self.revoked.update(newly)
        if self.on_revoke is not None and newly:
            self.on_revoke(newly)

    def is_valid(self, token: str, now: float | None = None) -> bool:
        """True when ``token`` was issued here, is not revoked and has not expired."""
        if token in self.revoked:
            return False
        now = time.time() if now is None else now
        return any(tok == token and now < exp for tok, _, exp in self.issued)

    @property
    def tokens(self) -> list[str]:
        return [tok for tok, _, _ in self.issued]

    def _issue(self) -> tuple[str, int]:
        ttl = float(self.token_ttl_s)
        token = TOKEN_PREFIX + secrets.token_urlsafe(24)
        issued_at = time.time()
        expires_at = issued_at + ttl
        self.issued.append((token, issued_at, expires_at))
        if self.on_issue is not None:
            self.on_issue(token, expires_at)
        return token, max(0, math.ceil(ttl))

    # ------------------------------------------------------------------ HTTP
    @staticmethod
    def _reply(
        status: int, body: str | dict[str, Any] | list[Any], *, content_type: str | None = None
    ) -> web.Response:
        if isinstance(body, str):
            text = body
            ctype = content_type or "application/text"
        else:
            text = json.dumps(body)
            ctype = content_type or "application/json"
        return web.Response(
            status=status,
            text=text,
            content_type=ctype,
            headers={"Metadata-Flavor": "Google", "Server": "Metadata Server for VM"},
        )

    def _not_found(self, path: str) -> web.Response:
        return self._reply(404, f"404 Not Found: no metadata at {path}\n", content_type="text/html")

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path_qs))
        path = request.path
        if "X-Forwarded-For" in request.headers:
            self.rejected_requests += 1
            return self._reply(403, "Request denied: X-Forwarded-For header present\n")
        if path == "/":
            if request.method != "GET":
                return self._reply(405, "Method not allowed\n")
            return self._reply(200, "computeMetadata/\n")
        if not (path == "/computeMetadata" or path.startswith("/computeMetadata/")):
            return self._not_found(path)
        if request.headers.get("Metadata-Flavor") != "Google":
            self.rejected_requests += 1
            return self._reply(
                403,
                "Your client does not have permission to get URL "
                f"{path} from this server. Missing Metadata-Flavor:Google header.\n",
                content_type="text/html",
            )
        if path in ("/computeMetadata", "/computeMetadata/"):
            return self._method_get(request) or self._reply(200, "v1/\n")
        if path == "/computeMetadata/v1":
            path = _V1
        if path.startswith(_SA_PREFIX) and path.endswith("/token"):
            return await self._token(request, path)
        if (bad := self._method_get(request)) is not None:
            return bad
        return self._metadata(request, path)

    @staticmethod
    def _method_get(request: web.Request) -> web.Response | None:
        if request.method != "GET":
            return MetadataServer._reply(405, "Method not allowed\n")
        return None

    def _account(self, name: str) -> bool:
        return name in ("default", self.email)

    def _sa_info(self) -> dict[str, Any]:
        return {"aliases": ["default"], "email": self.email, "scopes": list(self.scopes)}

    def _metadata(self, request: web.Request, path: str) -> web.Response:
        recursive = request.query.get("recursive", "").lower() == "true"
        rel = path[len(_V1) :] if path.startswith(_V1) else None
        if rel is None:
            return self._not_found(path)
        sa_info = self._sa_info()
        instance: dict[str, Any] = {
            "id": 4520031799277581759,
            "zone": f"projects/{self.numeric_project_id}/zones/{self.zone}",
            "hostname": f"worker.{self.zone}.c.{self.project_id}.internal",
            "serviceAccounts": {"default": sa_info, self.email: sa_info},
        }
        project = {"projectId": self.project_id, "numericProjectId": int(self.numeric_project_id)}
        text_leaves: dict[str, str] = {
            "project/project-id": self.project_id,
            "project/numeric-project-id": self.numeric_project_id,
            "instance/id": str(instance["id"]),
            "instance/zone": str(instance["zone"]),
            "instance/hostname": str(instance["hostname"]),
            "universe/universe-domain": "googleapis.com",
        }
        if rel in text_leaves:
            return self._reply(200, text_leaves[rel])
        if rel == "":
            if recursive:
                return self._reply(200, {"instance": instance, "project": project})
            return self._reply(200, "instance/\noauth/\nproject/\nuniverse/\n")
        if rel in ("instance", "instance/"):
            if recursive:
                return self._reply(200, instance)
            return self._reply(200, "hostname\nid\nservice-accounts/\nzone\n")
        if rel in ("project", "project/"):
            if recursive:
                return self._reply(200, project)
            return self._reply(200, "numeric-project-id\nproject-id\n")
        if rel in ("instance/service-accounts", "instance/service-accounts/"):
            if recursive:
                return self._reply(200, instance["serviceAccounts"])
            return self._reply(200, f"default/\n{self.email}/\n")
        if rel.startswith("instance/service-accounts/"):
            parts = rel[len("instance/service-accounts/") :].split("/")
            if not self._account(parts[0]):
                return self._not_found(path)
            leaf = "/".join(parts[1:])
            if leaf == "":
                if recursive:
                    return self._reply(200, sa_info)
                return self._reply(200, "aliases\nemail\nidentity\nscopes\ntoken\n")
            if leaf == "email":
                return self._reply(200, self.email)
            if leaf == "aliases":
                return self._reply(200, "default\n")
            if leaf == "scopes":
                return self._reply(200, "".join(s + "\n" for s in self.scopes))
        return self._not_found(path)

    async def _token(self, request: web.Request, path: str) -> web.Response:
        account = path[len(_SA_PREFIX) : -len("/token")]
        if not self._account(account):
            return self._not_found(path)
        if request.method not in ("GET", "POST"):
            return self._reply(405, "Method not allowed\n")
        if request.method == "POST":
            await request.read()
        self.token_requests += 1
        self.token_scopes.append(request.query.get("scopes"))
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        if self.fail_next > 0:
            self.fail_next -= 1
            self.failed_token_requests += 1
            return self._reply(503, "Service Unavailable: token backend overloaded\n")
        token, expires_in = self._issue()
        return self._reply(
            200, {"access_token": token, "expires_in": expires_in, "token_type": "Bearer"}
        )
