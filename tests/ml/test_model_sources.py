"""ml.sources and ml.pull without servers: what a SOURCE may be and how it is recorded, how
skl2onnx's default graphs are adapted (and what is refused, saying what to change), skops read
with modelgate's own trusted types and checked trees, and the pickle policy."""

from __future__ import annotations

import base64
import hashlib
import operator
import zipfile
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from skl2onnx import to_onnx
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from ml.manifest import MAX_SOURCE_CHARS
from ml.pull import PullRefused, PullRequest, pull
from ml.sources import SourceConfig, SourceError, parse_source
from ml.sources.artifacts import adapt_onnx, load_skops
from ml.sources.remote import _published_sha256

# The skops extra (CI installs it; without it this module is skipped, which
# MODELGATE_TEST_REQUIRE_SERVICES=1 turns into a failure).
skops_io = pytest.importorskip("skops.io")

IRIS = load_iris()


@pytest.fixture(scope="module")
def logistic() -> LogisticRegression:
    return LogisticRegression(max_iter=1000).fit(IRIS.data, IRIS.target)


@pytest.mark.parametrize(
    ("text", "recorded"),
    [
        ("models:/fraud/3", "models:/fraud/3"),
        ("models:/fraud@champion", "models:/fraud@champion"),
        ("s3://team-models/a/b.onnx", "s3://team-models/a/b.onnx"),
        (
            "https://user:secret@host.example:8443/m.onnx?X-Amz-Signature=s#f",
            "https://host.example:8443/m.onnx",
        ),
        ("file:///srv/m.skops", "file:///srv/m.skops"),
        ("/srv/m.skops", "file:///srv/m.skops"),
    ],
)
def test_a_source_is_recorded_without_its_credentials(text: str, recorded: str) -> None:
    assert parse_source(text).recorded == recorded


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("http://host/m.onnx", "https:// only"),
        ("ftp://host/m.onnx", "unsupported source"),
        ("models:/fraud/Production", "use an alias"),
        ("models:/fraud", "models:/<name>/<version>"),
        ("s3://Bad_Bucket/key", "s3://bucket/key"),
        ("s3://bucket/", "s3://bucket/key"),
        ("file://elsewhere/m.onnx", "local path"),
        ("https://host:port/m.onnx", "not a valid URI"),
        ("models:/a\n/1", "control characters"),
        ("s3://bucket/" + "k" * MAX_SOURCE_CHARS, "1 to 2048"),
    ],
)
def test_a_source_modelgate_does_not_fetch_is_refused_saying_why(text: str, reason: str) -> None:
    with pytest.raises(SourceError, match=reason):
        parse_source(text)


def test_skl2onnx_defaults_are_adapted_and_answer_as_the_original(
    logistic: LogisticRegression,
) -> None:
    import onnxruntime

    original = to_onnx(logistic, IRIS.data[:1].astype(np.float32)).SerializeToString()
    adapted, classes = adapt_onnx(original)
    assert classes == ["0", "1", "2"]
    session = onnxruntime.InferenceSession(adapted, providers=["CPUExecutionProvider"])
    [given] = session.get_inputs()
    assert given.type == "tensor(double)"
    [probabilities] = session.run(["probabilities"], {given.name: IRIS.data})
    assert np.abs(probabilities - logistic.predict_proba(IRIS.data)).max() < 1e-5


def test_an_onnx_graph_modelgate_cannot_serve_is_refused_saying_what_to_change() -> None:
    regressor = LinearRegression().fit(IRIS.data, IRIS.target)
    graph = to_onnx(regressor, IRIS.data[:1].astype(np.float32)).SerializeToString()
    with pytest.raises(SourceError, match="a label per row and a probability per class"):
        adapt_onnx(graph)
    with pytest.raises(SourceError, match="not an ONNX model"):
        adapt_onnx(b"not onnx")


def _skops_file(tmp_path: Path, estimator: Any) -> Path:
    path = tmp_path / "model.skops"
    skops_io.dump(estimator, path)
    return path


def test_skops_is_read_with_modelgates_trusted_types_only(tmp_path: Path) -> None:
    untrusted = make_pipeline(
        FunctionTransformer(operator.neg), LogisticRegression(max_iter=1000)
    ).fit(IRIS.data, IRIS.target)
    with pytest.raises(SourceError, match=r"types modelgate does not trust: _operator\.neg"):
        load_skops(_skops_file(tmp_path, untrusted), 1 << 20)


def test_a_forged_decision_tree_is_refused_before_anything_predicts_with_it(
    tmp_path: Path,
) -> None:
    forest = RandomForestClassifier(n_estimators=2, random_state=0).fit(IRIS.data, IRIS.target)
    assert load_skops(_skops_file(tmp_path, forest), 1 << 20).predict(IRIS.data[:1]) is not None
    tree = forest.estimators_[1].tree_
    state = tree.__getstate__()
    nodes = state["nodes"].copy()
    nodes["left_child"][0] = 0  # the root is its own child: a walk that never ends
    state["nodes"] = nodes
    tree.__setstate__(state)
    with pytest.raises(SourceError, match="decision tree that is not well formed"):
        load_skops(_skops_file(tmp_path, forest), 1 << 20)


def test_a_pickle_is_refused_unless_allowed_and_pinned_and_leaves_nothing(
    logistic: LogisticRegression, tmp_path: Path
) -> None:
    artifact = tmp_path / "model.joblib"
    joblib.dump(logistic, artifact)
    digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
    model_dir = tmp_path / "models"
    config = SourceConfig()
    with pytest.raises(PullRefused, match="unpickling it runs whatever code it carries"):
        pull(model_dir, PullRequest(str(artifact), "m", sha256=digest), config)
    with pytest.raises(PullRefused, match="needs its SHA-256"):
        pull(model_dir, PullRequest(str(artifact), "m", allow_pickle=True), config)
    assert not (model_dir / "m").exists() or not any((model_dir / "m").iterdir())
    result = pull(
        model_dir, PullRequest(artifact.as_uri(), "m", sha256=digest, allow_pickle=True), config
    )
    assert (result.unpickled, result.manifest.version, result.manifest.runtime) == (
        True,
        "1",
        "onnx",
    )
    assert result.manifest.source == artifact.as_uri()


def test_an_artifact_over_the_size_bound_is_refused(tmp_path: Path) -> None:
    artifact = tmp_path / "big.onnx"
    artifact.write_bytes(b"x" * 4096)
    with pytest.raises(PullRefused, match="larger than 1024 bytes"):
        pull(tmp_path / "models", PullRequest(str(artifact), "m"), SourceConfig(max_bytes=1024))


def test_only_a_whole_object_sha256_that_s3_publishes_is_taken_as_its_digest() -> None:
    digest = hashlib.sha256(b"model").digest()
    encoded = base64.b64encode(digest).decode()
    assert _published_sha256({"ChecksumSHA256": encoded}) == digest.hex()
    assert _published_sha256({"ChecksumSHA256": encoded, "ChecksumType": "FULL_OBJECT"}) == (
        digest.hex()
    )
    # A multipart upload's checksum of checksums, a CRC only, or garbage: nothing to compare.
    assert _published_sha256({"ChecksumSHA256": f"{encoded}-3"}) is None
    assert _published_sha256({"ChecksumSHA256": encoded, "ChecksumType": "COMPOSITE"}) is None
    assert _published_sha256({"ChecksumCRC32": "NhCmhg=="}) is None
    assert _published_sha256({"ChecksumSHA256": "not base64!"}) is None


def test_a_skops_archive_that_unpacks_past_the_size_bound_is_refused(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.skops"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("schema.json", b"\0" * (4 << 20))  # 4 MiB of zeros, a few KiB packed
    assert bomb.stat().st_size < 64 << 10
    with pytest.raises(PullRefused, match="unpacks to more than"):
        pull(tmp_path / "models", PullRequest(str(bomb), "m"), SourceConfig(max_bytes=1 << 20))


@pytest.mark.parametrize("text", ["~nobody-at-all/m.onnx", "file:///srv/a%20b.onnx"])
def test_local_paths_are_taken_literally(text: str) -> None:
    source = parse_source(text)
    assert source.kind == "file"
    assert source.location.endswith(("/~nobody-at-all/m.onnx", "/srv/a b.onnx"))
