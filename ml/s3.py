"""The one way to an S3 client (boto3, an optional extra: ``pip install 'modelgate[s3]'``).

Credentials come from the standard AWS chain only (environment, shared files, the instance's
or the pod's role), never from a flag or a setting of modelgate; ``endpoint_url`` points at an
S3-compatible service (MinIO, Ceph, GCS's S3 endpoint) instead of AWS."""

from __future__ import annotations

import importlib.util
from typing import Any

from ml.store import StoreError


class S3Unavailable(StoreError):
    """boto3 is not installed."""


def boto3_installed() -> bool:
    """Whether boto3 (the ``s3`` extra) can be imported."""
    return importlib.util.find_spec("boto3") is not None


def s3_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client, for AWS or the S3-compatible service at ``endpoint_url``."""
    try:
        import boto3  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        raise S3Unavailable("an s3:// location needs boto3: pip install 'modelgate[s3]'") from None
    return boto3.client("s3", endpoint_url=endpoint_url or None)
