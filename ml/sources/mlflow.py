"""``models:/<name>/<version>`` and ``models:/<name>@<alias>`` from an MLflow tracking server,
through MLflow's own client (the ``mlflow`` extra, imported only here).

Only two files are downloaded: the version's ``MLmodel`` (which flavors it has) and the one file
the served flavor names. MLflow's registry stages are deprecated; aliases are the way to name
"the version to serve".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml.sources.uri import ArtifactKind, Source, SourceError, redact_url

# The MLmodel file is a few hundred bytes of YAML.
_MAX_MLMODEL_BYTES = 1 << 20
# The file a flavor names: a bare file name inside the model directory.
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
PICKLE_FORMATS = ("pickle", "cloudpickle")


@dataclass(frozen=True, slots=True)
class MlflowArtifact:
    """The downloaded file of the served flavor, its kind and MLflow's version number."""

    path: Path
    kind: ArtifactKind
    version: str


def fetch_mlflow(source: Source, workdir: Path, tracking_uri: str | None) -> MlflowArtifact:
    """Resolve the version (an alias through the registry), then download its ``MLmodel`` and
    the served flavor's file into ``workdir``. Raises :class:`SourceError`."""
    if not tracking_uri:
        raise SourceError("models:/ needs MODELGATE_MLFLOW_TRACKING_URI (the MLflow server)")
    try:
        from mlflow import MlflowClient
        from mlflow.artifacts import download_artifacts
        from mlflow.exceptions import MlflowException
    except ImportError:
        raise SourceError(
            "models:/ needs MLflow's client: pip install 'modelgate[mlflow]'"
        ) from None
    server = redact_url(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if source.alias is not None:
            found = client.get_model_version_by_alias(source.location, source.alias)
        else:
            found = client.get_model_version(source.location, str(source.version))
        version = str(found.version)
        base = client.get_model_version_download_uri(source.location, version)
        mlmodel = Path(
            download_artifacts(
                artifact_uri=f"{base.rstrip('/')}/MLmodel",
                dst_path=str(workdir),
                tracking_uri=tracking_uri,
            )
        )
        kind, file_name = _served_flavor(_read_mlmodel(mlmodel))
        path = Path(
            download_artifacts(
                artifact_uri=f"{base.rstrip('/')}/{file_name}",
                dst_path=str(workdir),
                tracking_uri=tracking_uri,
            )
        )
    except MlflowException as exc:
        code = str(getattr(exc, "error_code", "") or "error")[:64]
        if code == "RESOURCE_DOES_NOT_EXIST":
            raise SourceError(f"MLflow at {server} has no {source.recorded}") from None
        raise SourceError(f"MLflow at {server} refused {source.recorded}: {code}") from None
    except SourceError:
        raise
    except Exception as exc:
        # The client's transport errors (requests, urllib3) and its artifact repositories'.
        raise SourceError(
            f"cannot fetch {source.recorded} from MLflow at {server}: {type(exc).__name__}"
        ) from None
    if not path.is_file():
        raise SourceError(f"{source.recorded}: its model file is not a file")
    return MlflowArtifact(path=path, kind=kind, version=version)


def _read_mlmodel(path: Path) -> dict[str, Any]:
    import yaml

    with path.open("rb") as fileobj:
        data = fileobj.read(_MAX_MLMODEL_BYTES + 1)
    if len(data) > _MAX_MLMODEL_BYTES:
        raise SourceError("the version's MLmodel file is too large")
    try:
        document = yaml.safe_load(data)
    except yaml.YAMLError:
        raise SourceError("the version's MLmodel file is not YAML") from None
    if not isinstance(document, dict) or not isinstance(document.get("flavors"), dict):
        raise SourceError("the version's MLmodel file lists no flavors")
    return document


def _served_flavor(mlmodel: dict[str, Any]) -> tuple[ArtifactKind, str]:
    """Which flavor modelgate serves (onnx first, else sklearn) and the file it names."""
    flavors: dict[str, Any] = mlmodel["flavors"]
    onnx = flavors.get("onnx")
    sklearn = flavors.get("sklearn")
    if isinstance(onnx, dict):
        return "onnx", _file_name(onnx.get("data"))
    if isinstance(sklearn, dict):
        serialization = sklearn.get("serialization_format")
        file_name = _file_name(sklearn.get("pickled_model"))
        if serialization == "skops":
            return "skops", file_name
        if serialization in PICKLE_FORMATS:
            return "pickle", file_name
        raise SourceError(
            f"the sklearn flavor's serialization {str(serialization)[:32]!r} "
            "is not one modelgate reads (skops)"
        )
    names = ", ".join(sorted(str(name)[:32] for name in flavors)[:10]) or "none"
    raise SourceError(f"the model's flavors ({names}) include neither onnx nor sklearn")


def _file_name(value: object) -> str:
    if not isinstance(value, str) or not _FILE_RE.fullmatch(value):
        raise SourceError("the MLmodel file names its model file oddly (not a bare file name)")
    return value
