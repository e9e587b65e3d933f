"""Model layer of modelgate: registry, manifests, hash-verified loading and inference.

Nothing here knows about HTTP; the API layer maps :class:`ModelError` subclasses to responses.
"""

from ml.errors import InvalidFeatures, ModelError, ModelNotFound, ModelUnavailable
from ml.loading import VersionStatus
from ml.manifest import FLOAT32_MAX, Manifest, read_manifest, sha256_file, write_manifest
from ml.model import LoadedModel, Prediction
from ml.onnx_export import ConversionError
from ml.registry import DEFAULT_MODEL, ModelInfo, ModelProblem, ModelRegistry
from ml.train import convert_version, has_model, register_model, train_default

__all__ = [
    "DEFAULT_MODEL",
    "FLOAT32_MAX",
    "ConversionError",
    "InvalidFeatures",
    "LoadedModel",
    "Manifest",
    "ModelError",
    "ModelInfo",
    "ModelNotFound",
    "ModelProblem",
    "ModelRegistry",
    "ModelUnavailable",
    "Prediction",
    "VersionStatus",
    "convert_version",
    "has_model",
    "read_manifest",
    "register_model",
    "sha256_file",
    "train_default",
    "write_manifest",
]
