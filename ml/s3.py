"""The one way to an S3 client: boto3 (the ``s3`` extra), imported only when an ``s3://`` URI is
used, with an optional endpoint URL for S3-compatible stores (MinIO, Ceph, GCS's XML API).

Credentials come from boto3's standard chain only (environment, shared files, instance or pod
role): never from a flag, a URI or a setting of ours, so they are never in a command line, a log
or a manifest.
"""

from __future__ import annotations

from typing import Any

# Seconds to connect and to wait for each read; a stalled store fails the operation instead of
# holding it forever.
CONNECT_TIMEOUT_SECONDS = 10.0
READ_TIMEOUT_SECONDS = 60.0


class S3Unavailable(RuntimeError):
    """boto3 is not installed: ``pip install 'modelgate[s3]'``."""


def s3_client(endpoint_url: str | None) -> Any:
    """A boto3 S3 client on ``endpoint_url`` (None: AWS itself), with bounded timeouts and
    retries. Raises :class:`S3Unavailable` without boto3."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise S3Unavailable("s3:// needs boto3: pip install 'modelgate[s3]'") from exc
    config = Config(
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        read_timeout=READ_TIMEOUT_SECONDS,
        retries={"max_attempts": 3, "mode": "standard"},
    )
    return boto3.client("s3", endpoint_url=endpoint_url or None, config=config)
