"""Turning a job's ``image_uri`` into what the model is sent.

Inlining policy (``images.inline_images``):

* ``auto`` (default): when the backend is Vertex AI, ``gs://`` and ``data:`` pass through
  (Vertex reads them itself) and ``https://`` is fetched and inlined; for any other
  backend everything is fetched and sent inline as a ``data:`` URL.
* ``always``: everything is fetched and inlined (``data:`` is decoded and checked).
* ``never``: ``gs://``, ``https://`` and ``data:`` pass through untouched.

Local paths and ``file:`` URIs are always read and inlined, only below a root directory,
and only when the source is trusted (the operator's own file or stdin). Whatever is
inlined has its MIME type sniffed from the bytes; the bytes win over any declared type.
Fetching (and its SSRF guard) lives in :mod:`worker.fetch`.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes, urlsplit

import anyio.to_thread

from .errors import JobError
from .fetch import ImageFetcher
from .limits import ByteBudget
from .settings import INLINE_MODES, InlineMode

__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "ImagePolicy",
    "backend_reads_uris",
    "sniff_mime",
]

# Vertex AI's limit for inline image data.
DEFAULT_MAX_IMAGE_BYTES = 7 * 1024 * 1024

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
# Cloud Storage bucket names: lowercase letters, digits, -, _ and . (3..222 characters).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")


def backend_reads_uris(backend: str, base_url: str, *, embedded_simulator: bool = False) -> bool:
    """Whether the model backend reads ``gs://`` and ``data:`` itself (Vertex AI does).

    ``backend`` is the ``images.backend`` setting; ``auto`` decides from the base URL: a
    host ending in ``aiplatform.googleapis.com`` or a Vertex-shaped path
    (``.../endpoints/openapi``, as Private Service Connect endpoints and the simulator's
    Vertex path have). The embedded simulator stands in for Vertex AI.
    """
    if backend != "auto":
        return backend == "vertex"
    if embedded_simulator:
        return True
    try:
        parts = urlsplit(base_url)
        host = (parts.hostname or "").rstrip(".").lower()
    except ValueError:
        return False
    return host.endswith("aiplatform.googleapis.com") or "/endpoints/openapi" in parts.path


def sniff_mime(head: bytes) -> str | None:
    """The image type from its first bytes, or None when it is not one we send."""
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx"):
            return "image/heic"
        if brand in (b"mif1", b"msf1", b"heif"):
            return "image/heif"
    return None


class ImagePolicy:
    """Turns a job's ``image_uri`` into the URL the model is sent; raises only JobError.

    Per pipeline (the file root depends on the source); the fetcher is process-wide.
    Owns the byte budget of inlined images; never sends a local file from an untrusted
    source, and never trusts a declared content type over the bytes.
    """

    def __init__(
        self,
        *,
        file_root: str | None,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        inline_images: InlineMode = "auto",
        backend_reads_uris: bool = True,
        allow_http: bool = False,
        fetcher: ImageFetcher | None = None,
        inline_budget_bytes: int = 0,
    ) -> None:
        if inline_images not in INLINE_MODES:
            raise ValueError(f"inline_images must be one of {INLINE_MODES}")
        # None: local files are not allowed at all (remote, untrusted input).
        self.file_root = Path(file_root).resolve() if file_root is not None else None
        self.max_image_bytes = max_image_bytes
        self.inline_images = inline_images
        self.allow_http = allow_http
        self.fetcher = fetcher
        # gs:// and data: are sent as they are only to a backend that reads them itself.
        self.pass_gs_and_data = inline_images == "never" or (
            inline_images == "auto" and backend_reads_uris
        )
        self.pass_web = inline_images == "never"
        # Bytes of inlined images that jobs may hold at once (0: no limit). Before a fetch
        # or file read we reserve the worst case: the raw bytes, their base64 and the
        # request body's copy of it (11/3 of the size cap); once the URL is built the
        # reservation shrinks to what the job keeps until its model call is over (the URL
        # and the body's copy). So at most budget / worst-case reads run at once, and
        # memory stays bounded however many jobs are admitted.
        self.budget = ByteBudget(inline_budget_bytes) if inline_budget_bytes > 0 else None
        self._worst_case_bytes = max_image_bytes * 11 // 3

    async def resolve(self, uri: str) -> str:
        """The URL to send for ``uri``; raises only :class:`JobError` (or cancellation)."""
        url, held = await self.resolve_held(uri)
        self.release(held)
        return url

    async def resolve_held(self, uri: str) -> tuple[str, int]:
        """Like :meth:`resolve`, plus the budget bytes the caller holds for the URL: pass
        them to :meth:`release` once the model call is over."""
        held: list[int] = []
        try:
            url = await self._resolve(uri, held)
        except BaseException:
            self.release(sum(held))
            raise
        return url, sum(held)

    def release(self, held: int) -> None:
        if held and self.budget is not None:
            self.budget.give(held)

    async def _budgeted(self, held: list[int], produce: Callable[[], Awaitable[str]]) -> str:
        """Run ``produce`` (a fetch or read that returns a data: URL) within the budget."""
        if self.budget is None:
            return await produce()
        worst = self._worst_case_bytes
        await self.budget.take(worst)
        try:
            url = await produce()
        except BaseException:
            self.budget.give(worst)
            raise
        keep = min(worst, 2 * len(url))
        self.budget.give(worst - keep)
        held.append(keep)
        return url

    async def _resolve(self, uri: str, held: list[int]) -> str:
        match = _SCHEME.match(uri)
        scheme = match.group(1).lower() if match else ""
        # Schemes are case-insensitive, but not every backend knows that: send them lowercase.
        if len(scheme) > 1:
            uri = scheme + uri[len(scheme) :]
        if scheme == "file":
            try:
                parts = urlsplit(uri)
            except ValueError:
                raise JobError("invalid_image_uri", "the file: URI cannot be parsed") from None
            if parts.netloc not in ("", "localhost"):
                raise JobError(
                    "unsupported_scheme", "file: URIs must name a local path (file:///path)"
                )
            path = unquote(parts.path)
            return await self._budgeted(held, lambda: self._inline_file(path))
        if not scheme or len(scheme) == 1:
            # No scheme (one letter would be a Windows drive): a local path.
            return await self._budgeted(held, lambda: self._inline_file(uri))
        if scheme == "data":
            return self._data(uri)
        if scheme == "gs":
            if self.pass_gs_and_data:
                return await self._gs(uri)  # checked and passed through, nothing held
            return await self._budgeted(held, lambda: self._gs(uri))
        if scheme in ("https", "http"):
            if scheme == "http" and not self.allow_http:
                raise JobError(
                    "unsupported_scheme",
                    "plain http:// is refused; use https:// (or allow_http in [images])",
                )
            if not uri[len(scheme) + 1 :].startswith("//"):
                raise JobError("invalid_image_uri", f"{scheme}: URL must be {scheme}://host/path")
            if self.pass_web:
                return uri
            what = f"{scheme}:// image"

            async def fetch() -> str:
                return self._as_data_url(await self._fetcher().fetch_url(uri), what)

            return await self._budgeted(held, fetch)
        raise JobError(
            "unsupported_scheme",
            f"scheme {scheme!r} is not supported; use gs://, https://, data: or a local path",
        )

    # -- remote ------------------------------------------------------------------------

    def _fetcher(self) -> ImageFetcher:
        if self.fetcher is None:
            raise JobError("fetch_failed", "this worker was started without an image fetcher")
        return self.fetcher

    async def _gs(self, uri: str) -> str:
        rest = uri[5:] if uri[:5].lower() == "gs://" else ""
        bucket, _, name = rest.partition("/")
        if not bucket or not name:
            raise JobError("invalid_image_uri", "gs:// URIs must be gs://BUCKET/OBJECT")
        if self.pass_gs_and_data:
            return uri
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise JobError("invalid_image_uri", f"{bucket[:80]!r} is not a valid bucket name")
        if name in (".", "..") or len(name.encode()) > 1024:
            raise JobError("invalid_image_uri", "not a valid Cloud Storage object name")
        data = await self._fetcher().fetch_gcs(bucket, name)
        return self._as_data_url(data, f"gs://{bucket}/{name}")

    def _data(self, uri: str) -> str:
        header, comma, payload = uri[5:].partition(",")
        if not comma:
            raise JobError("invalid_image_uri", "data: URLs must be data:<type>;base64,<data>")
        if self.pass_gs_and_data:
            return uri
        try:
            if header.lower().endswith(";base64"):
                data = base64.b64decode(unquote(payload), validate=True)
            else:
                data = unquote_to_bytes(payload)
        except (binascii.Error, ValueError):
            raise JobError("invalid_image_uri", "the data: URL is not valid base64") from None
        return self._as_data_url(data, "the data: URL")

    def _as_data_url(self, data: bytes, what: str) -> str:
        if len(data) > self.max_image_bytes:
            raise JobError(
                "image_too_large",
                f"{what} is larger than the limit of {self.max_image_bytes} bytes",
            )
        mime = sniff_mime(data[:32])
        if mime is None:
            raise JobError(
                "unsupported_media_type",
                f"{what} is not a JPEG, PNG, WebP, GIF or HEIC/HEIF image",
            )
        return f"data:{mime};base64,{base64.b64encode(data).decode()}"

    # -- local files -------------------------------------------------------------------

    async def _inline_file(self, path_text: str) -> str:
        if self.file_root is None:
            raise JobError(
                "file_not_allowed", "local files are not allowed for jobs from this source"
            )
        if "\0" in path_text:
            raise JobError("invalid_image_uri", "the path contains a NUL character")
        return await anyio.to_thread.run_sync(self._read_file, path_text)

    def _read_file(self, path_text: str) -> str:
        assert self.file_root is not None
        shown = path_text if len(path_text) <= 200 else path_text[:197] + "..."
        candidate = Path(path_text)
        if not candidate.is_absolute():
            candidate = self.file_root / candidate
        try:
            # resolve() follows symlinks and folds "..", so a link or a traversal that
            # leaves the root is caught here, on the real path.
            resolved = candidate.resolve()
        except (OSError, RuntimeError, ValueError):
            raise JobError("file_not_found", f"{shown} cannot be resolved") from None
        if not resolved.is_relative_to(self.file_root):
            raise JobError("file_not_allowed", f"{shown} is outside the allowed directory")
        try:
            # O_NONBLOCK: a FIFO must not hang the thread; O_NOFOLLOW: the last component
            # must not have become a symlink since it was resolved.
            fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise JobError("file_not_found", f"{shown} does not exist") from None
        except PermissionError:
            raise JobError("file_not_allowed", f"{shown} is not readable") from None
        except OSError as exc:
            raise JobError("file_not_found", f"{shown} cannot be read: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise JobError("file_not_found", f"{shown} is not a regular file")
            if info.st_size > self.max_image_bytes:
                raise JobError(
                    "image_too_large",
                    f"{shown} is {info.st_size} bytes; the limit is {self.max_image_bytes}",
                )
            chunks: list[bytes] = []
            remaining = self.max_image_bytes + 1
            while remaining > 0:
                chunk = os.read(fd, min(remaining, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
            data = b"".join(chunks)
        except OSError as exc:
            raise JobError("file_not_found", f"{shown} cannot be read: {exc.strerror}") from None
        finally:
            os.close(fd)
        return self._as_data_url(data, shown)
