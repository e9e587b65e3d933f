"""Downloading one object over https:// or from S3 into a file, bounded in size and time.

https: only https (a redirect to another scheme is refused), a timeout on every socket
operation and an overall deadline, at most ``max_bytes``. s3: through :func:`ml.s3.s3_client`;
the object's own SHA-256 checksum, when the store publishes one, is returned for checking.
"""

from __future__ import annotations

import base64
import binascii
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

from ml.s3 import S3Unavailable, s3_client
from ml.sources.uri import SourceError, redact_url

SOCKET_TIMEOUT_SECONDS = 30.0
DOWNLOAD_DEADLINE_SECONDS = 600.0
_CHUNK = 1 << 20


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects (urllib's limit of 10) only to other https:// URLs."""

    def redirect_request(
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> Any:
        if not newurl.lower().startswith("https://"):
            raise SourceError("the https:// source redirects to another scheme: refused")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _copy_bounded(body: IO[bytes], target: Path, max_bytes: int, what: str) -> int:
    """Copy ``body`` to ``target``; refuse more than ``max_bytes`` or a read past the deadline."""
    deadline = time.monotonic() + DOWNLOAD_DEADLINE_SECONDS
    size = 0
    with target.open("wb") as out:
        while chunk := body.read(_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise SourceError(f"{what} is larger than {max_bytes} bytes: refused")
            if time.monotonic() > deadline:
                raise SourceError(f"{what} took over {DOWNLOAD_DEADLINE_SECONDS:.0f}s: refused")
            out.write(chunk)
    return size


def download_https(url: str, target: Path, max_bytes: int) -> None:
    """Fetch ``url`` into ``target``. Raises :class:`SourceError`."""
    shown = redact_url(url)
    opener = urllib.request.build_opener(_HttpsOnlyRedirects())
    request = urllib.request.Request(url, headers={"User-Agent": "modelgate-pull"})  # noqa: S310
    try:
        with opener.open(request, timeout=SOCKET_TIMEOUT_SECONDS) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise SourceError(f"{shown} is larger than {max_bytes} bytes: refused")
            _copy_bounded(response, target, max_bytes, shown)
    except urllib.error.HTTPError as exc:
        raise SourceError(f"{shown} answered HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason if isinstance(exc.reason, str) else type(exc.reason).__name__
        raise SourceError(f"cannot fetch {shown}: {reason}") from None
    except (TimeoutError, OSError) as exc:
        raise SourceError(f"cannot fetch {shown}: {type(exc).__name__}") from None


def download_s3(
    bucket: str, key: str, target: Path, max_bytes: int, endpoint_url: str | None
) -> tuple[str | None, str | None]:
    """Fetch ``s3://bucket/key`` into ``target``. Returns the object's published SHA-256 (hex;
    None if the store publishes none for the whole object) and its version id (else its ETag).
    Raises :class:`SourceError`."""
    shown = f"s3://{bucket}/{key}"
    try:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
    except ImportError:
        raise SourceError("s3:// needs boto3: pip install 'modelgate[s3]'") from None
    try:
        client = s3_client(endpoint_url)
        answer = client.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        if int(answer.get("ContentLength") or 0) > max_bytes:
            raise SourceError(f"{shown} is larger than {max_bytes} bytes: refused")
        with answer["Body"] as body:
            _copy_bounded(body, target, max_bytes, shown)
    except S3Unavailable as exc:
        raise SourceError(str(exc)) from None
    except NoCredentialsError:
        raise SourceError(f"{shown}: no AWS credentials (the standard AWS chain)") from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", "error"))[:64]
        raise SourceError(f"{shown}: the store answered {code}") from None
    except (BotoCoreError, OSError) as exc:
        raise SourceError(f"cannot fetch {shown}: {type(exc).__name__}") from None
    return _published_sha256(answer), _object_version(answer)


def _published_sha256(answer: dict[str, Any]) -> str | None:
    """The hex SHA-256 of the whole object, if the store gave one (not a multipart composite)."""
    checksum = answer.get("ChecksumSHA256")
    if not isinstance(checksum, str) or "-" in checksum:
        return None
    if answer.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
        return None
    try:
        raw = base64.b64decode(checksum, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


def _object_version(answer: dict[str, Any]) -> str | None:
    version = answer.get("VersionId")
    if isinstance(version, str) and version and version != "null":
        return version[:200]
    etag = answer.get("ETag")
    return etag.strip('"')[:200] or None if isinstance(etag, str) else None
