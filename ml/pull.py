"""``modelgate models pull``: fetch a model from where a team keeps it (:mod:`ml.sources`),
decide what may be done with it, and register it as a new version the way ``register`` does.

Everything happens in a temporary directory and then in the registry's hidden staging
directory, renamed into place at the end (:func:`ml.train.register_model`,
:func:`ml.train.register_onnx`): a pull that fails or is interrupted leaves no version behind.

The pickle policy: an ONNX graph or a skops file is data, read without running any of its code;
a pickle (joblib, pickle, cloudpickle: MLflow's older sklearn default) is a program that runs when
it is read. A pickle is refused unless the operator passes both ``allow_pickle`` and the
artifact's SHA-256: consent to run exactly that file and no other. The caller audits it.
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ml.manifest import NAME_PATTERN, SHA256_PATTERN, VERSION_PATTERN, Manifest
from ml.onnx_export import ConversionError
from ml.sources import Fetched, SourceConfig, SourceError, fetch, parse_source
from ml.sources.uri import ArtifactKind

__all__ = ["PullRefused", "PullRequest", "PullResult", "pull"]

logger = logging.getLogger(__name__)


class PullRefused(ValueError):
    """The pull was refused or failed; nothing was registered. The message is one line, safe to
    show to the operator (no credential, no file contents, no computed digest)."""


@dataclass(frozen=True, slots=True)
class PullRequest:
    """What to pull and as what: ``version`` None is MLflow's version number for ``models:/``,
    else the next free one; ``sha256`` pins the artifact (required for https:// and to allow a
    pickle)."""

    source: str
    name: str
    version: str | None = None
    sha256: str | None = None
    allow_pickle: bool = False


@dataclass(frozen=True, slots=True)
class PullResult:
    """The registered version, what its artifact was and its SHA-256 (for the audit event)."""

    manifest: Manifest
    artifact_kind: ArtifactKind
    artifact_sha256: str
    unpickled: bool


def check_request(request: PullRequest) -> None:
    """Refuse a malformed request before anything is fetched. Raises :class:`PullRefused`."""
    if not re.fullmatch(NAME_PATTERN, request.name):
        raise PullRefused("name: letters, digits, '_' and '-' (at most 64, starting alphanumeric)")
    if request.version is not None and not re.fullmatch(VERSION_PATTERN, request.version):
        raise PullRefused("version: a number from 1 to 999999999")
    if request.sha256 is not None and not re.fullmatch(SHA256_PATTERN, request.sha256):
        raise PullRefused("sha256: 64 lowercase hexadecimal digits")
    if request.allow_pickle and request.sha256 is None:
        raise PullRefused("allowing a pickle needs its SHA-256 too (--sha256)")
    try:
        parse_source(request.source)
    except SourceError as exc:
        raise PullRefused(str(exc)) from None


def pull(model_dir: Path, request: PullRequest, config: SourceConfig) -> PullResult:
    """Fetch, check and register ``request.source`` as a version of ``request.name``, not
    activated. Raises :class:`PullRefused`; a version exists afterwards only if it returns."""
    check_request(request)
    source = parse_source(request.source)
    with tempfile.TemporaryDirectory(prefix="modelgate-pull-") as workdir:
        try:
            fetched = fetch(source, Path(workdir), config, expected_sha256=request.sha256)
            return _register(model_dir, request, fetched, config.max_bytes)
        except (SourceError, ConversionError, ValueError) as exc:
            raise PullRefused(str(exc)) from None
        except OSError as exc:
            raise PullRefused(f"the pull failed: {exc.strerror or type(exc).__name__}") from None
        except Exception as exc:
            # A model from elsewhere may fail in ways of its own when it is converted and
            # checked (a forged estimator's arrays, say): refused, never a crash of the caller.
            logger.warning("pull of %s refused: %s", source.recorded, type(exc).__name__)
            raise PullRefused(
                f"the model cannot be registered: {type(exc).__name__} while checking it"
            ) from None


def _register(
    model_dir: Path, request: PullRequest, fetched: Fetched, max_bytes: int
) -> PullResult:
    # Registering converts and checks with scikit-learn and skl2onnx: imported by the first pull,
    # not by every serving process that may never pull (about a second of CPU each).
    from ml.model_files import register_estimator
    from ml.sources.artifacts import (
        PICKLE_REFUSED,
        adapt_onnx,
        load_pickle,
        load_skops,
    )
    from ml.train import register_onnx

    version = request.version or fetched.version_hint
    if version is not None and not re.fullmatch(VERSION_PATTERN, version):
        raise PullRefused(f"the source's version {version[:20]!r} is not a version number")
    if fetched.kind == "onnx":
        adapted, classes = adapt_onnx(fetched.path.read_bytes())
        manifest = register_onnx(
            model_dir,
            request.name,
            adapted,
            class_names=classes,
            version=version,
            activate=False,
            source=fetched.source,
            source_version=fetched.source_version,
        )
        return PullResult(manifest, "onnx", fetched.sha256, unpickled=False)
    if fetched.kind == "pickle":
        # check_request made sure a pickle allowed is also pinned; the digest was checked.
        if not (request.allow_pickle and request.sha256 == fetched.sha256):
            raise PullRefused(PICKLE_REFUSED)
        estimator = load_pickle(fetched.path)
    else:
        estimator = load_skops(fetched.path, max_bytes)
    manifest = register_estimator(
        model_dir,
        estimator,
        request.name,
        version,
        source=fetched.source,
        source_version=fetched.source_version,
    )
    return PullResult(manifest, fetched.kind, fetched.sha256, unpickled=fetched.kind == "pickle")
