"""Turning a job's ``image_uri`` into what the model is sent.

``gs://``, ``https://`` and ``data:`` pass through (Vertex AI reads them itself). Local
paths and ``file:`` URIs are read and sent inline as ``data:`` URLs, with the MIME type
sniffed from the bytes; they are allowed only below a root directory, and only when the
source is trusted (the operator's own file or stdin). Anything else is refused.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

import anyio.to_thread

from .errors import JobError

__all__ = ["DEFAULT_MAX_IMAGE_BYTES", "ImagePolicy", "sniff_mime"]

# Vertex AI's limit for inline image data.
DEFAULT_MAX_IMAGE_BYTES = 7 * 1024 * 1024

_PASS_THROUGH = ("gs://", "https://", "data:")


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
    def __init__(
        self, *, file_root: str | None, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    ) -> None:
        # None: local files are not allowed at all (remote, untrusted input).
        self.file_root = Path(file_root).resolve() if file_root is not None else None
        self.max_image_bytes = max_image_bytes

    async def resolve(self, uri: str) -> str:
        """The URL to send for ``uri``; raises :class:`JobError` when it cannot be sent."""
        if uri.startswith(_PASS_THROUGH):
            return uri
        lowered = uri[:16].lower()
        if lowered.startswith(("gs://", "https://", "data:")):
            return uri
        if lowered.startswith("file:"):
            parts = urlsplit(uri)
            if parts.netloc not in ("", "localhost"):
                raise JobError(
                    "unsupported_scheme", "file: URIs must name a local path (file:///path)"
                )
            return await self._inline_file(unquote(parts.path))
        scheme = urlsplit(uri).scheme if "://" in uri or uri.startswith(("http:", "ftp:")) else ""
        if scheme:
            raise JobError(
                "unsupported_scheme",
                f"scheme {scheme!r} is not supported; use gs://, https://, data: or a local path",
            )
        return await self._inline_file(uri)

    async def _inline_file(self, path_text: str) -> str:
        if self.file_root is None:
            raise JobError(
                "file_not_allowed", "local files are not allowed for jobs from this source"
            )
        return await anyio.to_thread.run_sync(self._read_file, path_text)

    def _read_file(self, path_text: str) -> str:
        assert self.file_root is not None
        candidate = Path(path_text)
        if not candidate.is_absolute():
            candidate = self.file_root / candidate
        # resolve() follows symlinks, so a link pointing outside the root is caught too.
        resolved = candidate.resolve()
        if not resolved.is_relative_to(self.file_root):
            raise JobError("file_not_allowed", f"{path_text} is outside the allowed directory")
        try:
            size = os.stat(resolved).st_size
            if size > self.max_image_bytes:
                raise JobError(
                    "image_too_large",
                    f"{path_text} is {size} bytes; the limit is {self.max_image_bytes}",
                )
            with open(resolved, "rb") as handle:
                data = handle.read(self.max_image_bytes + 1)
        except FileNotFoundError:
            raise JobError("file_not_found", f"{path_text} does not exist") from None
        except IsADirectoryError:
            raise JobError("file_not_found", f"{path_text} is a directory") from None
        except PermissionError:
            raise JobError("file_not_allowed", f"{path_text} is not readable") from None
        except OSError as exc:
            raise JobError(
                "file_not_found", f"{path_text} cannot be read: {exc.strerror}"
            ) from None
        if len(data) > self.max_image_bytes:
            raise JobError(
                "image_too_large", f"{path_text} is larger than {self.max_image_bytes} bytes"
            )
        mime = sniff_mime(data[:32])
        if mime is None:
            raise JobError(
                "unsupported_media_type",
                f"{path_text} is not a JPEG, PNG, WebP, GIF or HEIC/HEIF image",
            )
        return f"data:{mime};base64,{base64.b64encode(data).decode()}"
