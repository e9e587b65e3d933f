"""Model layer of modelgate: registry, manifests, hash-verified loading and inference.

Nothing here knows about HTTP; the API layer maps :class:`ModelError` subclasses to responses.
Training and conversion (:mod:`ml.train`, which imports scikit-learn) are imported where they are
used, so that a serving process does not pay for scikit-learn.
"""

from ml.errors import InvalidFeatures, ModelError, ModelNotFound, ModelUnavailable
from ml.loading import VersionStatus
from ml.manifest import FLOAT32_MAX, Manifest, read_manifest, sha256_file, write_manifest
from ml.model import LoadedModel, Prediction
from ml.onnx_export import ConversionError
from ml.registry import DEFAULT_MODEL, ModelInfo, ModelProblem, ModelRegistry

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
    "read_manifest",
    "sha256_file",
    "write_manifest",
]
