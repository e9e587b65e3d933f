"""Parsing a pull's SOURCE (a string an operator or an API client sends: hostile until parsed
here) into one of the kinds modelgate fetches, and the form of it that may be recorded."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from ml.manifest import MAX_SOURCE_CHARS

SourceKind = Literal["file", "https", "s3", "mlflow"]
# What a fetched artifact is: data (an ONNX graph, a skops file) or a program (a pickle).
ArtifactKind = Literal["onnx", "skops", "pickle"]

# S3 bucket names (3-63 of lowercase letters, digits, '.', '-'); keys up to S3's 1,024 bytes.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_MAX_KEY_CHARS = 1024
# MLflow registered model names and aliases: no '/', bounded; an alias is a word.
_MLFLOW_NAME_RE = re.compile(r"^[^/@\s][^/@]{0,255}$")
_MLFLOW_VERSION_RE = re.compile(r"^[1-9][0-9]{0,8}$")
_MLFLOW_ALIAS_RE = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class SourceError(ValueError):
    """A source that cannot be pulled; the message is one line, safe to show to the operator
    who sent it (never a credential, a file's contents or a digest it computed)."""


@dataclass(frozen=True, slots=True)
class Source:
    """A parsed SOURCE. ``location`` is a local path (file), the URL (https), the key (s3) or
    the registered model's name (mlflow); ``bucket`` is the S3 bucket; ``version``/``alias``
    name the MLflow model version."""

    kind: SourceKind
    location: str
    bucket: str | None = None
    version: str | None = None
    alias: str | None = None

    @property
    def recorded(self) -> str:
        """The URI as a manifest records it: no userinfo, no query, no fragment."""
        if self.kind == "file":
            return Path(self.location).as_uri()[:MAX_SOURCE_CHARS]
        if self.kind == "s3":
            return f"s3://{self.bucket}/{self.location}"[:MAX_SOURCE_CHARS]
        if self.kind == "mlflow":
            tail = f"/{self.version}" if self.version else f"@{self.alias}"
            return f"models:/{self.location}{tail}"[:MAX_SOURCE_CHARS]
        return redact_url(self.location)


def redact_url(url: str) -> str:
    """``url`` without userinfo, query or fragment (where credentials hide), bounded."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))[:MAX_SOURCE_CHARS]


def parse_source(text: str) -> Source:
    """Parse SOURCE: ``file://``/a plain path, ``https://``, ``s3://bucket/key``,
    ``models:/<name>/<version>`` or ``models:/<name>@<alias>``. Raises :class:`SourceError`."""
    if not text or len(text) > MAX_SOURCE_CHARS:
        raise SourceError(f"the source must be 1 to {MAX_SOURCE_CHARS} characters")
    if _CONTROL_RE.search(text):
        raise SourceError("the source contains control characters")
    if text.startswith("models:/"):
        return _mlflow_source(text[len("models:/") :])
    scheme, sep, _ = text.partition("://")
    if not sep:
        return Source("file", _local_path(text))
    scheme = scheme.lower()
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise SourceError("the source is not a valid URI") from None
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise SourceError("file:// takes a local path (file:///path/to/model.onnx)")
        return Source("file", _local_path(unquote(parts.path)))
    if scheme == "https":
        if not parts.hostname:
            raise SourceError("https:// needs a host")
        return Source("https", text)
    if scheme == "http":
        raise SourceError("http:// is refused: an artifact is fetched over https:// only")
    if scheme == "s3":
        bucket, key = parts.netloc, parts.path.lstrip("/")
        if not _BUCKET_RE.fullmatch(bucket) or not key or len(key) > _MAX_KEY_CHARS:
            raise SourceError("s3:// takes s3://bucket/key (a bucket name and an object key)")
        if parts.query or parts.fragment:
            raise SourceError("s3:// takes no query or fragment")
        return Source("s3", key, bucket=bucket)
    raise SourceError(
        "unsupported source: use models:/, s3://, https:// or file:// (or a local path)"
    )


def _local_path(text: str) -> str:
    """An absolute local path (symbolic links resolved where they resolve)."""
    try:
        return str(Path(text).resolve())
    except (OSError, RuntimeError, ValueError):  # a loop of links, say
        raise SourceError("the source is not a usable local path") from None


def _mlflow_source(rest: str) -> Source:
    if "@" in rest:
        name, _, alias = rest.rpartition("@")
        if _MLFLOW_NAME_RE.fullmatch(name) and _MLFLOW_ALIAS_RE.fullmatch(alias):
            return Source("mlflow", name, alias=alias)
    else:
        name, _, version = rest.rpartition("/")
        if _MLFLOW_NAME_RE.fullmatch(name) and _MLFLOW_VERSION_RE.fullmatch(version):
            return Source("mlflow", name, version=version)
    raise SourceError(
        "models:/ takes models:/<name>/<version> or models:/<name>@<alias> "
        "(MLflow's stages are deprecated: use an alias)"
    )
