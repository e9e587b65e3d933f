"""The one way to an S3 client (boto3, an optional extra: ``pip install 'modelgate[s3]'``),
imported only when an ``s3://`` location is used: the model store's (``ml.store``) and the
pulls' (``ml.sources.remote``).

Credentials come from boto3's standard chain only (environment, shared files, the instance's or
the pod's role), never from a flag, a URI or a setting of modelgate, so they are never in a
command line, a log or a manifest; ``endpoint_url`` points at an S3-compatible service (MinIO,
Ceph, GCS's S3 endpoint) instead of AWS."""

from __future__ import annotations

import importlib.util
from typing import Any

from ml.store import StoreError

# Seconds to connect and to wait for each read; a stalled store fails the operation instead of
# holding it (or the self-check's thread) forever.
CONNECT_TIMEOUT_SECONDS = 10.0
READ_TIMEOUT_SECONDS = 60.0


class S3Unavailable(StoreError):
    """boto3 is not installed."""


def boto3_installed() -> bool:
    """Whether boto3 (the ``s3`` extra) can be imported."""
    return importlib.util.find_spec("boto3") is not None


def s3_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client for AWS, or for the S3-compatible service at ``endpoint_url``, with
    bounded timeouts and retries. Raises :class:`S3Unavailable` without boto3."""
    try:
        import boto3  # type: ignore[import-untyped,unused-ignore]
        from botocore.config import Config  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        raise S3Unavailable("an s3:// location needs boto3: pip install 'modelgate[s3]'") from None
    config = Config(
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        read_timeout=READ_TIMEOUT_SECONDS,
        retries={"max_attempts": 3, "mode": "standard"},
    )
    return boto3.client("s3", endpoint_url=endpoint_url or None, config=config)
